"""Every notebook runs top to bottom, offline, on a fixture model (GPT-2's shapes are not
needed to find a cell error). A user with a network runs the same notebooks on GPT-2."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_exist_and_are_stripped():
    assert len(NOTEBOOKS) >= 4
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{path.name}: outputs committed"
                )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tiny_dir, toy_dir, monkeypatch):
    monkeypatch.setenv("RESID_MODEL", str(tiny_dir))  # the notebooks' default is "gpt2"
    monkeypatch.setenv("RESID_TOY", str(toy_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    assert os.environ["RESID_MODEL"] == str(tiny_dir)
