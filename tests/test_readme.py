"""The README's examples run as written, offline, on what its set-up command writes.

The set-up (the README's first ```bash block) writes a random GPT-2-small-shaped checkpoint
with ``scripts/make_tiny_gpt2.py``; here the same script writes it into a temporary folder
laid out like the repository (its folders linked in), and every ```python block of the
README runs there, in order, in one fresh interpreter, as a reader pasting them one after
another would: a clean environment (no ``RESID_*`` variables), no network. A failure names
the README's line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)

RUNNER = """
import json, sys, time, traceback
blocks = json.loads(sys.argv[1])
namespace = {"__name__": "__main__"}
failed = 0
for line, code in blocks:
    start = time.perf_counter()
    try:
        # blank lines first, so that a traceback's line numbers are the README's
        exec(compile("\\n" * line + code, "README.md", "exec"), namespace)
    except BaseException:
        failed += 1
        print(f"\\nREADME.md:{line}: FAILED", flush=True)  # a block may end mid-line
        traceback.print_exc()
        print(f"README.md:{line}: FAILED", file=sys.stderr, flush=True)
        continue  # later blocks still run: every broken one is named
    print(f"\\nREADME.md:{line}: ok in {time.perf_counter() - start:.1f} s", flush=True)
sys.exit(1 if failed else 0)
"""


def blocks(lang: str) -> list[tuple[int, str]]:
    """(line of the block's first line of code, its code) for every ```lang block."""
    text = README.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start(2)), m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) == lang
    ]


def setup_commands() -> tuple[str, str]:
    """The README's set-up: the first ```bash block, two lines (.ci/run runs them)."""
    first = blocks("bash")[0][1].splitlines()
    assert len(first) == 2, "the README's first bash block is the install line and the test line"
    return first[0], first[1]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESID_", "HF_"))}
    return env | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def standin_command() -> list[str]:
    """The set-up line's ``python scripts/make_tiny_gpt2.py ...`` step, as written."""
    install = setup_commands()[0]
    step = next(s for s in install.split("&&") if "make_tiny_gpt2.py" in s)
    argv = shlex.split(step)
    assert argv[0] == "python", step
    return [sys.executable, *argv[1:]]


def test_the_readme_has_examples_and_a_two_line_setup():
    install, test = setup_commands()
    assert install.startswith("pip install") and "make_tiny_gpt2.py" in install
    assert test.split()[0] in ("pytest", "python")
    assert len(blocks("python")) >= 8
    for line, code in blocks("python"):
        compile(code, f"README.md:{line}", "exec")  # every block is Python


def tracked_top_level() -> set[str]:
    """The repository's own top-level files and folders (git's, or, outside git, all but
    hidden ones and what the set-up and the examples write)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             text=True, check=True, timeout=60)  # fmt: skip
        names = {f.split("/")[0] for f in out.stdout.split("\0") if f}
    except (OSError, subprocess.SubprocessError):
        names = set()
    if not names:
        written = {"gpt2-random", "h", "corpus.txt", "build", "dist"}
        names = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} - written
    return {n for n in names if not n.startswith(".") and (ROOT / n).exists()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder like the repository after the set-up: its folders, and the stand-in."""
    work = tmp_path_factory.mktemp("readme")
    for name in tracked_top_level():  # not what a user's runs left in the root (h/, corpus.txt)
        (work / name).symlink_to(ROOT / name)
    out = subprocess.run(standin_command(), cwd=work, env=clean_env(), capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return work


@pytest.mark.slow
def test_every_python_block_runs_in_order(workdir):
    code = blocks("python")
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(code)], cwd=workdir, env=clean_env(),
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    done = re.findall(r"^README\.md:(\d+): ok", out.stdout, re.MULTILINE)
    failed = re.findall(r"^README\.md:(\d+): FAILED", out.stdout, re.MULTILINE)
    assert out.returncode == 0 and not failed, (
        f"README blocks at lines {failed} failed ({len(done)} of {len(code)} ran):\n"
        f"{out.stderr[-8000:]}"
    )
    assert len(done) == len(code)


def test_a_store_of_a_harvest_without_activations_names_the_python_argument(tiny, tmp_path):
    """The README's harvest example needs ``activations=True`` for its next line; without it
    the error says so in Python's terms as well as the command line's."""
    from resid.harvest import ActivationStore, HarvestError, harvest

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sat on the mat.\nA second document, a little longer.\n")
    out = harvest(tiny, corpus, tmp_path / "h", ["blocks.0.hook_resid_post"], mode="rows",
                  progress=False)  # fmt: skip
    with pytest.raises(HarvestError, match=r"activations=True.*--activations"):
        ActivationStore(out, "blocks.0.hook_resid_post", batch_size=4)
