"""Child processes the tests start: ranks launched as torchrun launches them,
``resid.load`` timed and measured in a fresh interpreter, and saves killed at random
moments."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

LOAD_SCRIPT = """
import json, resource, sys, time
import resid
paths, warm = json.loads(sys.argv[1]), json.loads(sys.argv[2])
if warm:
    resid.load(warm, device="cpu")  # first-call imports are then not the loader's cost
out = []
for path in paths:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    try:
        resid.load(path, device="cpu")
        error = None
    except resid.CheckpointError as e:
        error = str(e)
    out.append({"path": path, "seconds": time.monotonic() - start, "error": error,
                "extra_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024})
print(json.dumps(out))
"""  # fmt: skip


KILL_TRIALS = """
import json, os, random, signal, time

def kill_trials(save, which, seconds, trials):
    # SIGKILL a forked save of the other version ("a" <-> "b") after a random delay of up to
    # 1.3 x ``seconds``, ``trials`` times; each: the version before, the one saved, the one found
    rng = random.Random(1234)
    results = []
    for i in range(trials):
        old = which()
        new = "b" if old == "a" else "a"
        delay = rng.uniform(0, 1.3 * seconds)
        pid = os.fork()
        if pid == 0:
            try:
                save(new)
            finally:
                os._exit(0)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        results.append({"delay": delay, "old": old, "new": new, "found": which()})
    return results
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(argv: list[str], world: int = 2) -> list[subprocess.Popen]:
    """``world`` ranks of ``argv`` as torchrun would start them (its environment variables,
    one thread each), stdout and stderr piped as text."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}  # fmt: skip
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    return procs


def finish_ranks(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every rank (``timeout`` seconds each), kill any still running, assert each
    exited 0 (the message: the end of its stderr) and return their stderr."""
    errs = []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=timeout)[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return errs


def timed_loads(paths: list, warm=None, timeout: float = 120) -> list[dict]:
    """``resid.load`` of each path in one fresh interpreter (after loading ``warm``, if
    given): for each, ``{"path", "seconds", "error"`` (the CheckpointError's message or
    None), ``"extra_mb"}`` (how far the peak resident memory grew)."""
    args = [json.dumps([str(p) for p in paths]), json.dumps(warm and str(warm))]
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def kill_trials_report(script: str, *args, env=None, timeout: float = 300) -> dict:
    """Run ``script`` in a fresh interpreter with ``kill_trials(save, which, seconds,
    trials)`` defined (``KILL_TRIALS``) and ``args`` as its ``sys.argv[1:]``: the JSON report
    it prints last."""
    done = subprocess.run([sys.executable, "-c", KILL_TRIALS + script, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
