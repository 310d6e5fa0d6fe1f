"""SAE training throughput: 2 ranks × 1 thread against 1 rank × 1 thread (torchrun, gloo).

Both train the same SAE on the same global batches (``scripts/train_sae.py --synthetic``:
seeded random rows in memory, ``--streams 2`` on both, so both compute the same weights);
the rate is tokens (rows) per second of the training loop, read from the checkpoint's
``training.json`` (start-up and the data set-up are not counted; the one checkpoint at the
end is). The two are run alternately ``--repeats`` times and the median of each is
reported, with the load average, since the machine may be shared. On a machine busier
than its cores, wall time favours more processes (each gets a share), so the rate per
CPU second of rank 0 is reported too: with 2 ranks on 2 idle cores, the wall rate would be
about that.

    python scripts/bench_train_sae.py                        # d_in 256, d_sae 4096, batch 4096
    python scripts/bench_train_sae.py --d-in 512 --d-sae 8192 --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "train_sae.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(ranks: int, args: argparse.Namespace, out: Path) -> tuple[float, float]:
    """Tokens per wall second and per CPU second (rank 0's) of one training run on
    ``ranks`` ranks of one thread each."""
    train = [str(SCRIPT), "--synthetic", f"{args.rows},{args.d_in}", "--arch", args.arch,
             "--d-sae", str(args.d_sae), "--k", str(args.k), "--steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--streams", "2", "--warmup", "1",
             "--checkpoint-every", str(args.steps), "--log-every", str(args.steps),
             "--threads", "1", "--quiet", "--out", str(out), "--dist-timeout", "300"]  # fmt: skip
    if ranks == 1:
        argv = [sys.executable, *train]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *train]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode:
        raise SystemExit(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    run = json.loads((out / "training.json").read_text())["run"]
    tokens = run["steps"] * args.batch_size
    return tokens / run["seconds"], tokens / run["cpu_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--arch", default="topk", choices=["standard", "topk", "jumprelu"])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--rows", type=int, default=1 << 16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()

    rates: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for ranks in (1, 2):
                t0 = time.perf_counter()
                rate, per_cpu = run(ranks, args, Path(tmp) / f"r{ranks}-{i}")
                rates[ranks].append(rate)
                cpu[ranks].append(per_cpu)
                print(f"  {ranks} rank(s): {rate:,.0f} tokens/s, {per_cpu:,.0f} per CPU second "
                      f"(run {time.perf_counter() - t0:.0f} s with start-up)", flush=True)  # fmt: skip
    load1 = os.getloadavg()
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"SAE {args.arch} d_in {args.d_in} d_sae {args.d_sae} batch {args.batch_size}, "
          f"{args.steps} steps, {os.cpu_count()} cores, load average {load0[0]:.1f} -> {load1[0]:.1f}")  # fmt: skip
    print(f"1 rank x 1 thread: {one:,.0f} tokens/s;  2 ranks x 1 thread: {two:,.0f} tokens/s;  "
          f"ratio {two / one:.2f}x")  # fmt: skip
    c1, c2 = statistics.median(cpu[1]), statistics.median(cpu[2])
    print(f"per CPU second of rank 0: 1 rank {c1:,.0f}, 2 ranks {c2:,.0f}: ratio {c2 / c1:.2f}x")


if __name__ == "__main__":
    main()
