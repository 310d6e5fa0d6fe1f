"""Every notebook runs top to bottom, offline, on a fixture model (GPT-2's shapes are not
needed to find a cell error). A user with a network runs the same notebooks on GPT-2."""

import inspect
import json
from pathlib import Path

import pytest

import resid

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
PROBE = """import json as _json, resid as _resid
print(_json.dumps([_fingerprint(m) for m in list(globals().values()) if isinstance(m, _resid.Model)]))"""


def fingerprint(model) -> list:
    """Shapes and a checksum of the embedding: which checkpoint a model was loaded from."""
    c = model.cfg
    return [c.n_layers, c.d_model, c.d_vocab, round(float(model.W_E.detach().double().sum()), 6)]


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
    # a last cell fingerprints the models the notebook holds: the fixtures', not GPT-2
    nb.cells.append(
        nbformat.v4.new_code_cell(
            inspect.getsource(fingerprint).replace("def fingerprint", "def _fingerprint") + PROBE
        )
    )
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    held = json.loads("".join(o.get("text", "") for o in code[-1].outputs))
    fixtures = [fingerprint(resid.load(d, device="cpu")) for d in (tiny_dir, toy_dir)]
    assert held and all(s in fixtures for s in held), f"ran on {held}, not the fixtures {fixtures}"
