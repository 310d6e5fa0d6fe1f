"""Running a model with something attached: hooks, a cache of activations, spliced SAEs.

Everything here is one forward of the model's own (``Model.forward``) with hook functions
attached for its length, in the caller's thread or task only, and removed afterwards by
identity, even when the forward raises (see ``resid.core.hooks``). :class:`Hooked` is the
part of ``resid.Model`` that does it; the rest of the model lives in ``resid.core.model``
(the forward pass) and ``resid.core.weights`` (views of the weights).

>>> with model.hooks([("blocks.6.hook_resid_pre", steer)]):
...     logits = model("I think that")
>>> logits, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pre"])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from contextvars import ContextVar
from types import MappingProxyType

import torch
from torch import Tensor

from resid.core import hooks, names
from resid.core.cache import ActivationCache
from resid.core.hooks import HookPoint, Hooks, NameFilter
from resid.core.inputs import Input, Inputs, prepare
from resid.core.protocols import Spliceable
from resid.core.stacking import SliceInput

# id(model) -> the hook points of the SAEs spliced into it in this context (thread or task),
# as hooks are kept: a splice is visible where it was made, and in contexts copied from there
_SPLICED: ContextVar[Mapping[int, Mapping[str, HookPoint]]] = ContextVar(
    "resid_spliced", default=MappingProxyType({})
)


class Hooked:
    """Hooks, caching and splicing for ``resid.Model`` (a mixin: it reads the model's
    own hook points, ``_hook_points``, and calls its forward)."""

    _hook_points: dict[str, HookPoint]

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every hook point by name: the model's own, and those of the SAEs spliced in
        the caller's thread or task (``with model.saes(...)``), which other threads do
        not see."""
        extra = _SPLICED.get().get(id(self))
        return {**self._hook_points, **extra} if extra else self._hook_points

    @contextmanager
    def hooks(self, fwd_hooks: Hooks = (), bwd_hooks: Hooks = ()) -> Iterator[Hooked]:
        """Attach ``(name_or_filter, fn)`` hooks for the length of a ``with`` block, in this
        thread or task only.

        >>> steer = lambda resid, hook: resid + 4 * direction
        >>> with model.hooks([("blocks.6.hook_resid_pre", steer)]):
        ...     logits = model("I think that")
        """
        with hooks.attached(self.hook_dict, fwd_hooks, bwd_hooks):
            yield self

    def add_hook(
        self,
        name: str | NameFilter | Iterable[str],
        hook: hooks.HookFn,
        dir: str = "fwd",
        is_permanent: bool = False,
    ) -> None:
        """Attach ``hook`` to the sites ``name`` picks until ``reset_hooks()``, in this
        thread or task only (TransformerLens' ``add_hook``). A permanent hook also stays
        past ``reset_hooks()``; ``reset_hooks(including_permanent=True)`` removes it.
        ``dir="bwd"`` makes it a backward hook, which sees the gradient.

        >>> model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: x * 0, is_permanent=True)
        >>> model.reset_hooks(including_permanent=True)
        """
        hooks.add(self.hook_dict, name, hook, dir, is_permanent)

    def add_perma_hook(self, name: str | NameFilter, hook: hooks.HookFn, dir: str = "fwd") -> None:
        """``add_hook(..., is_permanent=True)``."""
        hooks.add(self.hook_dict, name, hook, dir, True)

    def reset_hooks(self, including_permanent: bool = False, direction: str = "both") -> None:
        """Remove every hook on this model's sites in this thread or task (those of
        enclosing ``with model.hooks(...)`` blocks too), except permanent ones unless
        ``including_permanent``."""
        hooks.reset(self.hook_dict, including_permanent, direction)

    def list_hooks(self) -> list[tuple[str, str, hooks.HookFn, bool]]:
        """``(site, "fwd" | "bwd", fn, is_permanent)`` for every hook attached in this
        thread or task, in the order they run.

        >>> [(site, d) for site, d, fn, perm in model.list_hooks()]
        """
        return hooks.listed(self.hook_dict)

    def has_hooks(self, including_permanent: bool = True) -> bool:
        """Whether any hook is attached to this model in this thread or task."""
        return any(including_permanent or not p for *_, p in self.list_hooks())

    def attached_hooks(self) -> list[str]:
        """The sites with hooks attached in the caller's context (by an enclosing
        ``with model.hooks(...)``)."""
        return hooks.any_attached(self.hook_dict.values())

    @contextmanager
    def saes(
        self, modules: Spliceable | Iterable[Spliceable], use_error_term: bool = True
    ) -> Iterator[Hooked]:
        """Splice SAEs in for the length of a ``with`` block, in this thread or task only:
        each replaces the activation at its hook site with its reconstruction, plus the
        error term (activation - reconstruction) unless ``use_error_term=False``, so by
        default the logits do not change. While spliced, each SAE's hook points are sites
        like any other (``blocks.6.hook_resid_pre.sae.hook_acts``): hooks, the cache,
        patching and attribution address them by name. Every SAE is checked against the
        model before anything is attached; on exit (even on error) nothing stays spliced.

        Hooks attached to the SAE's site *outside* this block run before the SAE (they see
        and may edit what it encodes); hooks attached inside run after it.

        A transcoder (``resid.sae.Transcoder``) is spliced at two sites: it encodes at its
        read site (``blocks.L.ln2.hook_normalized``, ...) and replaces the MLP's output at
        ``blocks.L.hook_mlp_out`` with its reconstruction plus the error term.

        >>> with model.saes([sae]):
        ...     logits, cache = model.run_with_cache(tokens)
        >>> cache["blocks.6.hook_resid_pre.sae.hook_acts"].shape   # [batch, pos, d_sae]
        """
        modules = [modules] if isinstance(modules, Spliceable) else list(modules)
        points: dict[str, HookPoint] = {}
        fwd = []
        for m in modules:
            if not isinstance(m, Spliceable):
                raise TypeError(f"model.saes takes SAEs (resid.sae.SAE), not {type(m).__name__}")
            site = m.hook_name
            if site not in self.hook_dict:
                err = hooks.unknown_hook_error(site, self.hook_dict)
                raise KeyError(
                    f"{m!r} is for the site '{site}', which this model lacks: {err.args[0]}"
                )
            m.check_fits(self)
            for suffix, hp in m.hook_points().items():
                name = f"{site}.{suffix}"
                if name in self.hook_dict or name in points:
                    raise ValueError(
                        f"'{name}' is already spliced: splice one SAE per site at a time"
                    )
                points[name] = hp
            # a module that reads one site and writes another (a transcoder) brings a hook
            # for each; an SAE brings one, at its site
            several = getattr(m, "splice_hooks", None)
            if callable(several):
                fwd.extend(several(use_error_term))
            else:
                fwd.append((site, m.splice_hook(use_error_term)))
        with ExitStack() as stack:
            stack.enter_context(self._extra_hook_points(points))
            stack.enter_context(hooks.attached(self.hook_dict, fwd))
            yield self

    def run_with_saes(
        self,
        input: Input,
        saes: Spliceable | Iterable[Spliceable],
        use_error_term: bool = True,
        **forward_kwargs,
    ):
        """One forward with ``saes`` spliced in (see ``saes``); as SAELens'
        ``HookedSAETransformer.run_with_saes``, but keeping the error term by default.

        >>> logits = model.run_with_saes(tokens, [sae], use_error_term=False)
        """
        with self.saes(saes, use_error_term):
            return self(input, **forward_kwargs)

    @contextmanager
    def _extra_hook_points(self, points: Mapping[str, HookPoint]) -> Iterator[None]:
        """Address ``points`` by name in ``hook_dict`` for the block, in the caller's
        context only, then remove exactly them (by identity)."""
        for name, hp in points.items():
            hp.name = name
        key = id(self)
        table = dict(_SPLICED.get())
        table[key] = MappingProxyType({**table.get(key, {}), **points})
        _SPLICED.set(MappingProxyType(table))
        try:
            yield
        finally:
            table = dict(_SPLICED.get())
            ours = {id(hp) for hp in points.values()}
            left = {n: hp for n, hp in table.get(key, {}).items() if id(hp) not in ours}
            if left:
                table[key] = MappingProxyType(left)
            else:
                table.pop(key, None)
            _SPLICED.set(MappingProxyType(table))

    def run_with_hooks(
        self,
        input: Input,
        fwd_hooks: Hooks = (),
        bwd_hooks: Hooks = (),
        **forward_kwargs,
    ):
        """One forward with hooks attached; they are removed afterwards, even on error.
        Backward hooks stay with the graph of this forward: call ``.backward()`` on its
        output afterwards and they run.

        >>> loss = model.run_with_hooks(tokens, return_type="loss",
        ...                             bwd_hooks=[("blocks.0.hook_resid_post", show)])
        >>> loss.backward()
        """
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(input, **forward_kwargs)

    def run_with_cache(
        self,
        input: Input | Inputs,
        names_filter: str | list[str] | NameFilter | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        incl_bwd: bool = False,
        pos_slice: SliceInput = None,
        batch_slice: SliceInput = None,
        remove_batch_dim: bool = False,
        **forward_kwargs,
    ) -> tuple[Tensor, ActivationCache]:
        """Forward, keeping the activations at the sites ``names_filter`` picks.

        ``None`` caches every site except the per-head ``attn.hook_result``, attention's
        per-head inputs (``hook_attn_in``, ``hook_q_input``, ...), ``hook_mlp_in`` and
        ``hook_tokens``, which TransformerLens builds only when switched on (name them, or
        pass a filter, to get them). The output is exactly ``model(input)``'s: what is
        cached is computed beside the forward pass. ``device`` and ``dtype`` say where and
        how the cache keeps its tensors (patterns and scales are fp32 unless ``dtype`` is
        given). With padding, ``cache.attention_mask`` marks the real tokens; activations at
        padding positions are left as computed, and resid's statistics exclude them.
        ``incl_bwd=True`` also calls ``backward()`` on the output (which must be a
        scalar, e.g. ``return_type="loss"``) and caches each site's gradient as
        ``"{name}_grad"``, as TransformerLens does. ``pos_slice`` / ``batch_slice`` keep
        only those positions / prompts in the cache (TransformerLens' slices; see
        ``ActivationCache.apply_slice_to_pos_dim``); the output is the whole run's.
        ``remove_batch_dim=True``: a one-prompt cache without its batch axis.

        >>> logits, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pre"])
        """
        device = _check_device(device)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"run_with_cache keeps activations in a float dtype, not {dtype!r}")
        if names_filter is None:
            names_filter = _all_but_head_results
        store: dict[str, Tensor] = {}

        def keep(name: str, t: Tensor) -> None:
            cast = dtype if dtype is not None and t.is_floating_point() else t.dtype  # not ids
            store[name] = t.detach().to(device=device or t.device, dtype=cast)

        def save(act: Tensor, hook: HookPoint) -> None:
            keep(hook.name, act)

        def save_grad(grad: Tensor, hook: HookPoint) -> None:
            keep(f"{hook.name}_grad", grad)

        selected = [(hp.name, save) for hp in hooks.resolve(self.hook_dict, names_filter)]
        bwd = [(name, save_grad) for name, _ in selected] if incl_bwd else []
        mask = None
        if forward_kwargs.get("start_at_layer") is None:  # prepared once, here
            input = prepare(
                self,
                input,
                forward_kwargs.pop("attention_mask", None),
                forward_kwargs.pop("padding_side", None),
                forward_kwargs.pop("prepend_bos", None),
            )
            mask = input.mask
        with torch.enable_grad() if incl_bwd else nullcontext(), self.hooks(selected, bwd):
            out = self(input, **forward_kwargs)
            if incl_bwd:
                if out.dim() != 0:
                    raise ValueError(
                        "incl_bwd=True calls backward() on the output, which must be a scalar: "
                        "pass return_type='loss'"
                    )
                out.backward()
        cache = ActivationCache(store, self, attention_mask=mask)
        if pos_slice is not None or batch_slice is not None:
            cache = cache._sliced(batch_slice, pos_slice)
        return out, cache.remove_batch_dim() if remove_batch_dim else cache


# sites the default cache leaves out: built only when asked for (the per-head results,
# attention's per-head inputs, the MLP's copy of the stream), or not activations (token ids)
_NOT_BY_DEFAULT = ("result", "attn_in", "q_input", "k_input", "v_input", "mlp_in", "tokens")


def _all_but_head_results(name: str) -> bool:
    """``run_with_cache``'s default filter: every site but the per-head ``attn.hook_result``
    (``[batch, pos, head, d_model]``, built only when asked for), attention's per-head
    inputs (``hook_attn_in``, ``hook_q_input``, ...), ``hook_mlp_in`` (a copy of the stream
    the MLP reads) and ``hook_tokens``."""
    site = names.info(name)
    return site is None or site.short not in _NOT_BY_DEFAULT


def _check_device(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"run_with_cache: {device!r} is not a device ({e})") from None
    if device.type == "meta":
        raise ValueError(
            "run_with_cache cannot keep activations on the meta device: it holds no data"
        )
    return device
