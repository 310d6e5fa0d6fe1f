"""Path patching: patch a head's effect along one path only.

The README's import path; the code lives in ``resid.interventions.path_patching``.

>>> from resid.path_patching import Head
"""

from resid.interventions.path_patching import (
    Head,
    path_patch,
    path_patch_sweep,
)

__all__ = ["Head", "path_patch", "path_patch_sweep"]
