"""What notebooks 06, 08 and 09 (the findings on SmolLM2-135M-Instruct) share: where the
model is, and how big a run is.

The model is ``$RESID_SMOLLM2`` (a GGUF file or a folder resid loads) when set, else the
GGUF file ``scripts/fetch_smollm2.py`` keeps in its cache (``$RESID_CACHE/smollm2`` or
``~/.cache/resid/smollm2``), fetched there first if it is missing.

``RESID_FINDINGS_FULL=1`` runs the notebooks at the size whose numbers FINDINGS.md reports;
without it they run at a size that fits a CI job on two CPU cores (same code, fewer prompts,
tokens and steps).

>>> from findings_common import FULL, smollm2_path
>>> model = resid.load(smollm2_path(), device="cpu")
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_smollm2 import GGUF, cache_dir, fetch  # noqa: E402

FULL = os.environ.get("RESID_FINDINGS_FULL", "") == "1"


def smollm2_path() -> str:
    """The path to load SmolLM2-135M-Instruct from (see the module docstring).

    >>> smollm2_path()
    '/home/me/.cache/resid/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    env = os.environ.get("RESID_SMOLLM2")
    if env:
        if not Path(env).exists():
            raise FileNotFoundError(f"RESID_SMOLLM2={env} does not exist: unset it or fix the path")
        return env
    cached = cache_dir() / GGUF
    return str(cached if cached.is_file() else fetch(cache_dir()))
