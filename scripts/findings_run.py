"""Run a findings notebook top to bottom and print each code cell's text output under its
number (``In [n]``, as Jupyter numbers it), with the notebook's wall time: how FINDINGS.md's
numbers were produced. The notebook file itself is left as it is (outputs stay stripped).

    RESID_FINDINGS_FULL=1 python scripts/findings_run.py notebooks/08_ioi_smollm2.ipynb
    python scripts/findings_run.py notebooks/06_induction_smollm2.ipynb   # the CI size
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbclient
import nbformat


def run(path: Path, timeout: int = 7200) -> float:
    """Execute ``path`` in its own folder, print its outputs, return the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": str(path.resolve().parent)}},
    )  # fmt: skip
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        for cell in nb.cells:
            if cell.cell_type != "code" or cell.execution_count is None:
                continue
            print(f"--- In [{cell.execution_count}]")
            for out in cell.outputs:
                if out.output_type == "stream":
                    print(out.text, end="")
                elif out.output_type == "error":
                    print(f"{out.ename}: {out.evalue}")
                elif "text/plain" in out.get("data", {}):
                    print(out["data"]["text/plain"])
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("notebook", type=Path)
    p.add_argument("--timeout", type=int, default=7200, help="seconds a cell may take")
    args = p.parse_args()
    print(f"{args.notebook.name}: {run(args.notebook, args.timeout):.0f}s")


if __name__ == "__main__":
    main()
