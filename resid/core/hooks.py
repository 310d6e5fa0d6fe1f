"""Hook points: named places in the forward pass where a function may read or replace
an activation, and where a backward hook sees its gradient.

A forward hook is ``fn(activation, hook) -> activation | None``, as in TransformerLens:
return ``None`` to only look, or return a tensor of the same shape, dtype and device to
replace the activation (editing it in place works too). A backward hook is
``fn(grad, hook) -> grad | None`` and sees ``d output / d activation``. ``hook.name`` is
the site's full name, e.g. ``blocks.3.attn.hook_pattern``.

Observing never changes the result. A hook point tells the layer whether a hook replaced
the activation or wrote into it (the tensor's version counter tells); when none did, the
model keeps its fast kernels: what a cache or a read-only hook sees is computed
beside the forward pass, never instead of it.

Hooks belong to the caller's context. They are kept in a ``contextvars.ContextVar``, so
hooks attached in one thread (or asyncio task) are invisible to another thread using the
same model at the same time. They are attached for the length of one ``with`` block (or
one ``run_with_hooks`` call) and removed afterwards by identity, even when the forward
raises. A backward hook is tied to the graph of the forward it was attached for, so
``loss.backward()`` after ``run_with_hooks`` returns still runs it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from types import MappingProxyType

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]
NameFilter = Callable[[str], bool]
Hooks = Iterable[tuple["str | NameFilter | Iterable[str]", HookFn]]

# (hook point, "fwd" | "bwd") -> the functions attached in this context, in order
_Attached = Mapping[tuple["HookPoint", str], tuple[HookFn, ...]]
_ATTACHED: ContextVar[_Attached] = ContextVar("resid_hooks", default=MappingProxyType({}))


def _describe(fn: HookFn) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"hook {name!r}"


class HookPoint(nn.Module):
    """An identity on the forward pass that runs whatever hooks the caller's context
    attached to it.

    ``copy=True`` gives hooks a copy of the activation when autograd records it (for sites
    that are views of a larger tensor, like ``hook_q``, or outputs autograd saved, like
    ``hook_pattern``, so that editing them in place works under autograd); without
    autograd (``torch.no_grad()``) hooks see the activation itself and nothing is copied.
    """

    name: str = ""  # the site's full name, given by the model that holds it
    copy: bool = False

    def __init__(self, copy: bool = False) -> None:
        super().__init__()
        if copy:  # the class's default otherwise: a model builds hundreds of these
            self.copy = True

    @property
    def fns(self) -> tuple[HookFn, ...]:
        """The forward hooks attached to this site in the current context."""
        return _ATTACHED.get().get((self, "fwd"), ())

    @property
    def bwd_fns(self) -> tuple[HookFn, ...]:
        return _ATTACHED.get().get((self, "bwd"), ())

    @property
    def active(self) -> bool:
        """True when some hook, forward or backward, will see this site: a layer computes
        a value it otherwise skips (a pattern, a scale) only then."""
        table = _ATTACHED.get()
        return (self, "fwd") in table or (self, "bwd") in table

    @property
    def grad_wanted(self) -> bool:
        """True when a backward hook is attached here and autograd is recording: a value
        computed beside the forward pass must then carry the output's gradient."""
        return torch.is_grad_enabled() and (self, "bwd") in _ATTACHED.get()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.see(x)[0]

    def see(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Run the hooks on ``x``: (the activation to go on with, whether a hook changed
        it). Unchanged, it is ``x`` itself, or for ``copy=True`` the copy the hooks saw
        (equal to ``x``, so that what they kept is in the graph for autograd)."""
        attached = _ATTACHED.get()
        fns = attached.get((self, "fwd"), ())
        out, changed = self._run(x, fns) if fns else (x, False)
        bwd = attached.get((self, "bwd"), ())
        if bwd and out.requires_grad:
            out.register_hook(partial(self._run_bwd, bwd))
        return out, changed

    def _run(self, x: torch.Tensor, fns: tuple[HookFn, ...]) -> tuple[torch.Tensor, bool]:
        # a copy only where autograd could object to an in-place edit (a view, a saved
        # output); without autograd the hooks may edit the activation itself
        seen = x.clone() if self.copy and x.requires_grad else x
        try:
            version, snapshot = seen._version, None
        except RuntimeError:  # inference tensors keep no version counter: compare values
            version, snapshot = None, seen.clone()
        out = seen
        for fn in fns:
            new = fn(out, self)
            if new is not None:
                self._check(fn, new, x)
                out = new
        if out is seen:
            unchanged = (
                seen._version == version if snapshot is None else torch.equal(seen, snapshot)
            )
            return seen, not unchanged
        return out, True

    def layer(self) -> int:
        """The block this site belongs to (``blocks.3.attn.hook_z`` -> 3), as in
        TransformerLens; a ``ValueError`` for sites outside the blocks."""
        parts = self.name.split(".")
        if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
            raise ValueError(f"'{self.name}' is not inside a block: it has no layer")
        return int(parts[1])

    def _check(self, fn: HookFn, new: object, x: torch.Tensor, what: str = "activation") -> None:
        if not isinstance(new, torch.Tensor):
            raise TypeError(
                f"{_describe(fn)} on '{self.name}' returned {type(new).__name__}: return a tensor "
                f"of shape {tuple(x.shape)}, or None to leave the {what} as it is"
            )
        for prop, got, want in (
            ("shape", tuple(new.shape), tuple(x.shape)),
            ("dtype", new.dtype, x.dtype),
            ("device", new.device, x.device),
        ):
            if got != want:
                raise ValueError(
                    f"{_describe(fn)} on '{self.name}' returned a tensor of {prop} {got}, but the "
                    f"{what} there has {prop} {want}: return one like the {what} "
                    f"(e.g. out.to({'grad' if what == 'gradient' else 'act'})), or None to leave it"
                )

    def _run_bwd(self, fns: tuple[HookFn, ...], grad: torch.Tensor) -> torch.Tensor | None:
        out = grad
        for fn in fns:
            new = fn(out, self)
            if isinstance(new, tuple) and len(new) == 1:  # TransformerLens allows (grad,)
                new = new[0]
            if new is not None:
                self._check(fn, new, grad, "gradient")
                out = new
        return None if out is grad else out

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


def _plan(hook_points: dict[str, HookPoint], pairs: Hooks, kind: str) -> list:
    plan = []
    for name_or_filter, fn in pairs:
        if not callable(fn):
            raise TypeError(f"the {kind} hook for {name_or_filter!r} is {fn!r}, not a function")
        plan += [((hp, kind), fn) for hp in resolve(hook_points, name_or_filter)]
    return plan


@contextmanager
def attached(
    hook_points: dict[str, HookPoint], fwd_hooks: Hooks = (), bwd_hooks: Hooks = ()
) -> Iterator[None]:
    """Attach ``(name_or_filter, fn)`` pairs in the current context for the length of the
    block, then detach exactly those functions (by identity).

    Every name is checked before anything is attached, so a bad name leaves no hook behind.
    """
    plan = _plan(hook_points, fwd_hooks, "fwd") + _plan(hook_points, bwd_hooks, "bwd")
    table = dict(_ATTACHED.get())
    for key, fn in plan:
        table[key] = (*table.get(key, ()), fn)
    _ATTACHED.set(MappingProxyType(table))
    try:
        yield
    finally:
        table = dict(_ATTACHED.get())
        for key, fn in reversed(plan):
            fns = list(table.get(key, ()))
            for i in range(len(fns) - 1, -1, -1):
                if fns[i] is fn:
                    del fns[i]
                    break
            if fns:
                table[key] = tuple(fns)
            else:
                table.pop(key, None)
        _ATTACHED.set(MappingProxyType(table))


# the (hook point, direction) and function of every hook added with is_permanent=True in
# this context: reset() leaves them unless asked
_PERMANENT: ContextVar[tuple[tuple[tuple[HookPoint, str], HookFn], ...]] = ContextVar(
    "resid_permanent_hooks", default=()
)
_DIRS = ("fwd", "bwd")


def add(
    hook_points: dict[str, HookPoint],
    name_or_filter: str | NameFilter | Iterable[str],
    fn: HookFn,
    dir: str = "fwd",
    is_permanent: bool = False,
) -> None:
    """Attach ``fn`` in the current context until :func:`reset` (TransformerLens'
    ``add_hook``): it stays past the ``with`` blocks and ``run_with_hooks`` calls that
    follow, in this thread or task only. ``is_permanent=True``: it also stays past
    ``reset()``, until ``reset(including_permanent=True)``."""
    if dir not in _DIRS:
        raise ValueError(
            f"dir must be 'fwd' or 'bwd' (a backward hook sees the gradient), not {dir!r}"
        )
    plan = _plan(hook_points, [(name_or_filter, fn)], dir)
    table = dict(_ATTACHED.get())
    for key, f in plan:
        table[key] = (*table.get(key, ()), f)
    _ATTACHED.set(MappingProxyType(table))
    if is_permanent:
        _PERMANENT.set(_PERMANENT.get() + tuple(plan))


def _is_permanent(key: tuple[HookPoint, str], fn: HookFn) -> bool:
    return any(k == key and f is fn for k, f in _PERMANENT.get())


def reset(
    hook_points: dict[str, HookPoint], including_permanent: bool = False, direction: str = "both"
) -> None:
    """Detach, in the current context, every hook on ``hook_points`` (those of enclosing
    ``with`` blocks too, as TransformerLens' ``reset_hooks`` does), except permanent ones
    unless ``including_permanent``."""
    if direction not in (*_DIRS, "both"):
        raise ValueError(f"direction must be 'fwd', 'bwd' or 'both', not {direction!r}")
    ours = set(hook_points.values())
    table = dict(_ATTACHED.get())
    for key in list(table):
        hp, d = key
        if hp not in ours or direction not in (d, "both"):
            continue
        kept = tuple(f for f in table[key] if not including_permanent and _is_permanent(key, f))
        if kept:
            table[key] = kept
        else:
            del table[key]
    _ATTACHED.set(MappingProxyType(table))
    if including_permanent:
        _PERMANENT.set(
            tuple(
                p
                for p in _PERMANENT.get()
                if not (p[0][0] in ours and direction in (p[0][1], "both"))
            )
        )


def listed(hook_points: dict[str, HookPoint]) -> list[tuple[str, str, HookFn, bool]]:
    """``(site, "fwd" | "bwd", fn, is_permanent)`` for every hook on ``hook_points`` in
    the current context, in the order they run."""
    table = _ATTACHED.get()
    out = []
    for name, hp in hook_points.items():
        for d in _DIRS:
            out += [(name, d, f, _is_permanent((hp, d), f)) for f in table.get((hp, d), ())]
    return out


def current() -> _Attached:
    """Every hook attached in the caller's context, as one immutable mapping: the same
    object until a hook is attached or removed there (so ``is`` tells "no change")."""
    return _ATTACHED.get()


def any_attached(hook_points: Iterable[HookPoint]) -> list[str]:
    """The names of the given sites that have forward or backward hooks in this context."""
    table = _ATTACHED.get()
    if not table:
        return []
    return sorted({hp.name for hp in hook_points if (hp, "fwd") in table or (hp, "bwd") in table})
