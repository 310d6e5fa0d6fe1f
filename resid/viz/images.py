"""Static image export (PNG, SVG) of plotly figures, bounded in time.

plotly's exporter, kaleido (>= 1), drives a headless Chrome or Chromium. Without one,
kaleido's server thread dies and ``write_images`` waits for it forever; a browser that
hangs does the same. So resid

- looks for the browser first, the way kaleido does (kaleido's own finder: its
  downloaded copy, ``BROWSER_PATH``, then Chrome and Chromium on ``PATH`` and at the
  usual places), and skips the export with one line saying why when there is none;
- runs kaleido in a child process in a session of its own, which must report each batch
  of images within ``timeout`` seconds (``RESID_EXPORT_TIMEOUT``, default 60), or it and
  its browser are killed and the export is skipped, again with one line.

>>> message = export(figs, ["out/L0H0.png"])   # None when every image was written
"""

from __future__ import annotations

import importlib.util
import json
import os
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

TIMEOUT_ENV = "RESID_EXPORT_TIMEOUT"
DEFAULT_TIMEOUT = 60.0  # seconds for the browser to start and for each batch of images
BATCH = 16

# Runs in the child: no resid import, only plotly and kaleido. argv[1]: a JSON file of
# [[figure JSON, path], ...]. Prints the number of images written after each batch.
_WORKER = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import kaleido, plotly.io as pio
jobs = json.load(open(sys.argv[1], encoding="utf-8"))
start = getattr(kaleido, "start_sync_server", None)
if start:
    start(silence_warnings=True)
try:
    for i in range(0, len(jobs), int(sys.argv[2])):
        chunk = jobs[i : i + int(sys.argv[2])]
        pio.write_images([pio.from_json(f) for f, _ in chunk], [p for _, p in chunk])
        print(len(chunk), flush=True)
finally:
    if start:
        kaleido.stop_sync_server(silence_warnings=True)
"""


def find_browser() -> tuple[str | None, str]:
    """(the browser kaleido would start, "") or (None, why there is none)."""
    try:
        from choreographer.browsers.chromium import Chromium
    except ImportError as e:
        return None, f"kaleido's browser finder (choreographer) cannot be imported: {e}"
    try:
        path = Chromium.find_browser(skip_local=False)
    except Exception as e:  # a broken local download, an unreadable PATH entry, …
        return None, f"looking for Chrome failed: {e}"
    if not path:
        return None, "no Chrome or Chromium found (on PATH, at the usual places, or BROWSER_PATH)"
    try:
        st = os.stat(path)
    except OSError:
        return None, f"the browser {path} does not exist (is BROWSER_PATH right?)"
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
        return None, f"the browser {path} is not an executable file"
    return path, ""


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


def export(figs: list, paths: list[Path], progress: bool = False, what: str = "PNG") -> str | None:
    """Write ``figs[i]`` to ``paths[i]`` (format from the suffix). ``None`` when all were
    written; otherwise one line saying why they were skipped (no partial image is left)."""
    skipped = f"{what} export skipped"
    if importlib.util.find_spec("kaleido") is None:
        return (f"{skipped}: plotly's static export needs the kaleido package "
                "(pip install 'resid[png]') and Chrome or Chromium; the HTML pages are written")  # fmt: skip
    browser, why = find_browser()
    if browser is None:
        return (f"{skipped}: {why}; install Chromium (apt-get install chromium) or set "
                "BROWSER_PATH; the HTML pages are written")  # fmt: skip
    timeout = timeout_seconds()
    try:
        failure = _run_worker(figs, paths, browser, timeout, progress, what)
    except BaseException:
        _remove(paths)
        raise
    if failure:
        _remove(paths)
        return f"{skipped}: {failure}; the HTML pages are written"
    return None


def _remove(paths: list[Path]) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)


def _run_worker(figs, paths, browser: str, timeout: float, progress: bool, what: str) -> str:
    """Run the export in a child process; "" on success, else the reason."""
    with tempfile.TemporaryDirectory(prefix="resid-export-") as scratch:
        spec = Path(scratch) / "jobs.json"
        jobs = [[fig.to_json(), str(path)] for fig, path in zip(figs, paths, strict=True)]
        spec.write_text(json.dumps(jobs), encoding="utf-8")
        log = open(Path(scratch) / "stderr.txt", "w+b")  # noqa: SIM115 closed below
        env = dict(os.environ, BROWSER_PATH=browser)
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(spec), str(BATCH)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env,
            start_new_session=True,  # its browser too is in this session, killed with it
        )  # fmt: skip
        done, timed_out = 0, False
        try:
            with (
                selectors.DefaultSelector() as sel,
                tqdm(total=len(jobs), desc=what, unit="image", disable=not progress,
                     file=sys.stderr, leave=False) as bar,
            ):  # fmt: skip
                sel.register(proc.stdout, selectors.EVENT_READ)
                deadline, pending = time.monotonic() + timeout, b""
                while done < len(jobs):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        timed_out = True
                        break
                    if not sel.select(left):
                        continue
                    data = os.read(proc.stdout.fileno(), 4096)
                    if not data:
                        break  # the worker exited
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if line.strip().isdigit():
                            done += int(line)
                            bar.update(int(line))
                    deadline = time.monotonic() + timeout
            if not timed_out:
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            if proc.poll() is None:
                _kill(proc)
            proc.stdout.close()
            log.seek(0)
            err = log.read().decode(errors="replace")
            log.close()
        if timed_out:
            return (f"the browser ({browser}) did not answer within {timeout:g} s, so it was "
                    f"stopped (set {TIMEOUT_ENV} to wait longer)")  # fmt: skip
        if done == len(jobs) and proc.returncode == 0:
            return ""
        lines = [ln for ln in err.splitlines() if ln.strip()]
        reason = " ".join(lines[-1].split())[:200] if lines else f"exit status {proc.returncode}"
        return f"plotly's static export (kaleido) failed: {reason}"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``; empty elsewhere). kaleido starts the
    browser in a session of its own, so killing the worker's process group misses it."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _kill(proc: subprocess.Popen) -> None:
    """Kill the worker, its process group, and everything it started (the browser)."""
    below = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
