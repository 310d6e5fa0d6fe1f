"""The timing harness of resid's benchmarks: each function warmed up once, then run
interleaved with its peers (A B C, A B C, ...), medians of wall and CPU time, the ratio of
each to the first (resid's), and the peak memory of one more run.

>>> r = compare({"resid": f, "HF": g}, runs=5, device="cpu")
>>> show("forward 1x128", r)
"""

from __future__ import annotations

import ctypes
import statistics
import threading
import time
from collections.abc import Callable

import psutil
import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _trim() -> None:
    """Hand freed heap back to the OS so that the next RSS baseline is honest."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_memory(fn: Callable[[], object], device: str) -> int:
    """Bytes: CUDA's peak allocation during ``fn``, or on CPU the peak RSS above the start."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base
    _trim()
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
        peak = max(peak, proc.memory_info().rss)
        del out
    finally:
        stop.set()
        thread.join()
    return peak - base


def compare(
    fns: dict[str, Callable[[], object]],
    runs: int,
    device: str,
    memory: bool = True,
    warmup: Callable[[str], object] | None = None,
) -> dict[str, dict]:
    """Warm each up once (``warmup(name)`` when a full run would be wasteful), then ``runs``
    interleaved rounds; medians, ratios, peak memory."""
    with torch.inference_mode(False), torch.no_grad():
        for name, fn in fns.items():
            warmup(name) if warmup is not None else fn()
        walls: dict[str, list[float]] = {k: [] for k in fns}
        cpus: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(runs):
            for name, fn in fns.items():
                _sync(device)
                t, c = time.perf_counter(), time.process_time()
                fn()
                _sync(device)
                walls[name].append(time.perf_counter() - t)
                cpus[name].append(time.process_time() - c)
        mem = {k: peak_memory(fn, device) if memory else None for k, fn in fns.items()}
    out = {}
    first = next(iter(fns))
    for name in fns:
        out[name] = {
            "wall_s": statistics.median(walls[name]),
            "cpu_s": statistics.median(cpus[name]),
            "walls": walls[name],
            "peak_bytes": mem[name],
        }
    ref = out[first]
    for name in fns:
        # > 1: the peer takes longer than resid
        out[name]["ratio_to_resid"] = out[name]["wall_s"] / ref["wall_s"]
        out[name]["cpu_ratio_to_resid"] = out[name]["cpu_s"] / ref["cpu_s"]
    return out


def show(title: str, result: dict[str, dict], unit: str = "s", per: float | None = None) -> None:
    print(f"\n{title}")
    print(f"  {'':44}{'wall s':>9}{'CPU s':>9}{'peer/resid':>11}{'peak MiB':>10}")
    for name, r in result.items():
        mem = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:10.0f}"
        line = f"  {name:44}{r['wall_s']:9.3f}{r['cpu_s']:9.3f}{r['ratio_to_resid']:10.2f}x{mem}"
        if per:
            line += f"   {per / r['wall_s']:7.1f} tok/s"
        print(line, flush=True)
