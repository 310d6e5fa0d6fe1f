"""Moved names keep importing from their old places, with a warning that names the new one.

A module whose names moved keeps a real file at its old path, and in it a module-level
``__getattr__`` (PEP 562) made by :func:`moved`: importing a moved name from there works,
returns the very same object, and emits a ``DeprecationWarning`` that says where to
import it from now. Nothing is patched: the old module is a file, and the name is looked
up only when asked for.

>>> __getattr__ = moved(__name__, {"Components": (Labelled, "resid.Labelled")})
>>> from resid import Components      # DeprecationWarning: ... use resid.Labelled
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any


def moved(module: str, names: Mapping[str, tuple[Any, str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``module`` that answers each of ``names`` (old name ->
    ``(object, "where it lives now")``) with the object and a ``DeprecationWarning``, and
    any other name with the usual ``AttributeError``.

    >>> __getattr__ = moved("resid.stream", {"Site": (Site, "resid.core.names.Site")})
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            obj, new = names[name]
            warnings.warn(
                f"{module}.{name} has moved: import it as {new} (the old name will go in a "
                "later release)",
                DeprecationWarning,
                stacklevel=2,
            )
            return obj
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def public_names(module: ModuleType) -> list[str]:
    """The names ``module`` offers: its ``__all__``, else every name it defines (not those
    it imports) that does not start with an underscore."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and getattr(v, "__module__", module.__name__) == module.__name__
        and not isinstance(v, ModuleType)
    ]


def forwarded(
    module: str, new: ModuleType, extra: Mapping[str, tuple[Any, str]] | None = None
) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for an old module ``module`` whose contents now live in
    the module ``new``: every public name of ``new`` (and each of ``extra``, old name ->
    ``(object, new place)``) answers from the old path with a ``DeprecationWarning``.

    >>> __getattr__, __all__ = forwarded(__name__, resid.core.config)
    """
    names = {n: (getattr(new, n), f"{new.__name__}.{n}") for n in public_names(new)}
    names.update(extra or {})
    return moved(module, names), sorted(names)
