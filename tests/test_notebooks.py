"""Every notebook runs top to bottom from a clean copy of the repository, with no
environment variable set for it, offline, as a newcomer's `jupyter execute` would.

With no ``RESID_*`` variable and no network, 01, 02 and 04 fall back to the README's
random stand-in (``gpt2-random/``, written by the first notebook that needs it, saying so
in one line), 03 and 05 load the toy model committed beside them, and the findings
notebooks (``*_smollm2``) run on the real model where it can be fetched (the
``smollm2_path`` fixture) and skip, saying why, where it cannot.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
STANDIN_LINE = "using the random stand-in gpt2-random/"


def repository_files() -> list[str]:
    """The files a clone has: git's tracked and not-ignored files (or, outside git, every
    file but caches and build output)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "gpt2-random"}
        return [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
        ]
    return [f for f in out.stdout.split("\0") if f and (ROOT / f).is_file()]


def committed(path: Path) -> str | None:
    """The notebook as git holds it (staged or committed), or None outside git / untracked."""
    rel = path.relative_to(ROOT).as_posix()
    try:
        out = subprocess.run(["git", "show", f":{rel}"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def test_notebooks_exist_and_are_stripped():
    """What is committed has no outputs. Running a notebook in place (Jupyter saves its
    outputs into the file) is fine: the check reads git's copy where there is one."""
    assert len(NOTEBOOKS) >= 5
    for path in NOTEBOOKS:
        text = committed(path)
        nb = nbformat.reads(text, as_version=4) if text else nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{path.name}: outputs committed (strip them: jupyter nbconvert "
                    "--clear-output --inplace)"
                )


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A copy of the repository's files, shared by the notebooks (so the stand-in is written
    once, by the first notebook that needs it)."""
    dest = tmp_path_factory.mktemp("clone")
    for rel in repository_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


def real_model_missing(source: str) -> str | None:
    """Why a findings notebook (which loads SmolLM2 through scripts/findings_common.py)
    cannot run here, or None: it can, or it is not one."""
    if "smollm2_path" not in source:
        return None
    spec = importlib.util.spec_from_file_location(
        "findings_common", ROOT / "scripts" / "findings_common.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.smollm2_path()  # fetches it with pip where it can
    except Exception as e:  # not found, no network, no pip: any failure is a reason
        return f"{type(e).__name__}: {e}"
    return None


def gpt2_cached() -> bool:
    import huggingface_hub

    found = huggingface_hub.try_to_load_from_cache("openai-community/gpt2", "model.safetensors")
    return isinstance(found, str)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_from_a_clean_clone(path, clone, monkeypatch, request):
    for name in [k for k in os.environ if k.startswith("RESID_")]:
        monkeypatch.delenv(name)  # the kernel inherits this process's environment
    if "smollm2" in path.stem:  # a finding on the real model (FINDINGS.md), at its CI size
        real = request.getfixturevalue("smollm2_path")  # skips, saying why, where not fetched
        monkeypatch.setenv("RESID_SMOLLM2", str(real))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    copy = clone / "notebooks" / path.name
    nb = nbformat.read(copy, as_version=4)
    missing = real_model_missing("".join(cell.source for cell in nb.cells))
    if missing:
        pytest.skip(f"{path.name} runs on the real model: {missing}")
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(copy.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    text = "\n".join(
        o.get("text", "") if isinstance(o.get("text", ""), str) else ""
        for cell in code
        for o in cell.outputs
    )
    assert "IProgress not found" not in text  # no tqdm widget warning
    if "notebook_model()" in "".join(cell.source for cell in code) and not gpt2_cached():
        # offline without GPT-2: the stand-in, announced in one line, the clone's own
        assert text.count(STANDIN_LINE) == 1, text[:2000]
        assert (clone / "gpt2-random" / "config.json").is_file()
