"""Hook points: named places in the forward pass where a function may read or replace
an activation.

A hook is ``fn(activation, hook) -> activation | None``, as in TransformerLens: return
``None`` to only look, return a tensor of the same shape to replace the activation.
``hook.name`` is the site's full name, e.g. ``blocks.3.attn.hook_pattern``.

Hooks are attached for the length of one ``with`` block (or one ``run_with_hooks``
call) and are always removed afterwards, even when the forward raises.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]
NameFilter = Callable[[str], bool]


class HookPoint(nn.Module):
    """An identity on the forward pass that runs whatever hooks are attached to it."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self.fns: list[HookFn] = []

    @property
    def active(self) -> bool:
        """True when some hook will see this site: the model uses it to decide what to compute."""
        return bool(self.fns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            out = fn(x, self)
            if out is None:
                continue
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"hook on '{self.name}' returned {got}, but the activation there has shape "
                    f"{tuple(x.shape)}: return a tensor of the same shape, or None to leave it"
                )
            x = out
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def unknown_hook_error(name: str, valid: Iterable[str]) -> KeyError:
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return KeyError(f"no hook point named '{name}'.{hint} `model.hook_names` lists every site.")


def resolve(
    hook_points: dict[str, HookPoint], name_or_filter: str | NameFilter | Iterable[str]
) -> list[HookPoint]:
    """The hook points a name, a list of names, or a filter function picks out."""
    if isinstance(name_or_filter, str):
        if name_or_filter not in hook_points:
            raise unknown_hook_error(name_or_filter, hook_points)
        return [hook_points[name_or_filter]]
    if callable(name_or_filter):
        return [hp for name, hp in hook_points.items() if name_or_filter(name)]
    names = list(name_or_filter)
    for name in names:
        if not isinstance(name, str) or name not in hook_points:
            raise unknown_hook_error(str(name), hook_points)
    return [hook_points[n] for n in names]


@contextmanager
def attached(
    hook_points: dict[str, HookPoint],
    fwd_hooks: Iterable[tuple[str | NameFilter, HookFn]],
) -> Iterator[None]:
    """Attach ``(name_or_filter, fn)`` pairs for the length of the block, then detach them.

    Every name is checked before anything is attached, so a bad name leaves no hook behind.
    """
    plan = []
    for name_or_filter, fn in fwd_hooks:
        if not callable(fn):
            raise TypeError(f"the hook for {name_or_filter!r} is {fn!r}, not a function")
        plan += [(hp, fn) for hp in resolve(hook_points, name_or_filter)]
    try:
        for hp, fn in plan:
            hp.fns.append(fn)
        yield
    finally:
        for hp, fn in plan:
            if fn in hp.fns:
                hp.fns.remove(fn)
