"""ActivationCache: what ``run_with_cache`` kept, by hook name, and the readings of the
residual stream it allows, as methods with TransformerLens' names: ``stream``,
``head_results``, ``decompose_resid``, ``accumulated_resid``, ``logit_lens``,
``logit_attribution``.

There is one cache class. ``run_with_cache`` hands out this one, and one a user builds
from tensors (``ActivationCache({name: tensor}, model)``) has every method too: the
maths lives in ``resid.core.decompose`` and ``resid.core.lens``, which read any cache
through the ``CacheLike`` protocol.

>>> logits, cache = model.run_with_cache("Hello world")
>>> cache["blocks.0.hook_resid_pre"].shape
torch.Size([1, 3, 768])
>>> cache.decompose_resid(1, "mid").labels[:3]
['embed', 'pos_embed', 'L0H0']
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from einops import einsum
from jaxtyping import Bool, Float
from torch import Tensor

from resid.core import stacking
from resid.core.decompose import contributions
from resid.core.hooks import unknown_hook_error
from resid.core.labelled import Labelled
from resid.core.lens import logit_attribution, logit_lens
from resid.core.names import act_name, info, locate
from resid.core.protocols import ModelLike
from resid.core.stacking import SliceInput, apply_slice
from resid.core.stream import ResidualStream


class ActivationCache(Mapping[str, Tensor]):
    """Activations by hook name (only those asked for), the model that made them and the
    run's attention mask (``True`` at real tokens; ``None`` when nothing is padding).

    >>> cache = ActivationCache({"blocks.0.hook_resid_pre": x}, model)
    >>> cache.stream(0, "pre").query(direction)      # [batch, pos]
    """

    def __init__(
        self,
        store: Mapping[str, Tensor],
        model: ModelLike,
        attention_mask: Bool[Tensor, "batch pos"] | None = None,
        has_batch_dim: bool = True,
    ):
        self._store = store
        self.model = model
        self.attention_mask = attention_mask  # True at real tokens; None: no padding
        self.has_batch_dim = has_batch_dim  # False after remove_batch_dim()

    def __getitem__(self, name: str | tuple) -> Tensor:
        """By hook name, or as TransformerLens: a short name (``cache["embed"]``) or
        ``(name, layer[, layer_type])`` (``cache["pattern", 3]``, ``cache["q", 2, "attn"]``,
        ``cache["scale", 4, "ln1"]``; a negative layer counts from the end)."""
        if not (isinstance(name, str) and name in self._store):
            try:
                name = stacking.key_name(self.model, name)
            except (KeyError, ValueError) as e:
                raise KeyError(str(e.args[0] if e.args else e)) from None
        if name not in self._store:
            if name in self.model.hook_dict:
                raise KeyError(f"'{name}' was not cached: add it to run_with_cache's names_filter")
            raise unknown_hook_error(name, self.model.hook_dict)
        return self._store[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} sites: {', '.join(list(self)[:4])}{', …' if len(self) > 4 else ''})"

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in self._store.values())

    # ---- the residual stream -----------------------------------------------------------

    def stream(self, layer: int, where: str = "pre") -> ResidualStream:
        """The stream at ``blocks.{layer}.hook_resid_{where}`` as a labelled ResidualStream.

        >>> cache.stream(5, "mid").query(direction)     # [batch, pos]
        """
        site = locate(self.model.cfg.n_layers, layer, where)
        return ResidualStream(self[site.name], site.name, where=site.where, cache=self)

    def final_stream(self) -> ResidualStream:
        """The stream entering ``ln_final`` (the last block's ``hook_resid_post``)."""
        return self.stream(self.model.cfg.n_layers, "final")

    def head_results(
        self, layer: int | None = None
    ) -> Float[Tensor, "batch pos head d_model"] | Float[Tensor, "layer batch pos head d_model"]:
        """What each head writes, ``[batch, pos, head, d_model]`` for one layer or
        ``[layer, batch, pos, head, d_model]`` for all: ``hook_result`` when cached, else
        computed from ``hook_z`` and ``W_O``."""
        n = self.model.cfg.n_layers
        if layer is None:
            return torch.stack([self.head_results(lyr) for lyr in range(n)])
        if not isinstance(layer, int) or not -n <= layer < n:
            raise ValueError(f"layer must be in [0, {n}), not {layer!r}")
        layer %= n
        if act_name("result", layer) in self:
            return self[act_name("result", layer)]
        self.require(
            [act_name("z", layer)],
            f"the head results of layer {layer}",
            f"[..., {act_name('z', layer)!r}]",
        )
        z = self[act_name("z", layer)]
        W_O = self.model.blocks[layer].attn.W_O.detach().to(z)
        return einsum(
            z, W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model"
        )

    def require(self, names: list[str], needed_for: str, fix: str) -> None:
        """Raise a KeyError naming the sites ``needed_for`` something that this cache lacks,
        and the ``names_filter`` (``fix``) that would have cached them."""
        missing = [n for n in names if n not in self]
        if missing:
            shown = ", ".join(missing[:6]) + (
                f" and {len(missing) - 6} more" if len(missing) > 6 else ""
            )
            raise KeyError(
                f"{needed_for} needs hooks this cache lacks: {shown}. Cache them with "
                f"run_with_cache(..., names_filter={fix})"
            )

    # ---- readings of the stream (resid.core.decompose, resid.core.lens) ---------------

    def decompose_resid(
        self,
        layer: int | None = None,
        where: str = "pre",
        heads: bool = True,
        per_neuron: bool | list[int] = False,
        mask_padding: bool = False,
    ) -> Labelled:
        """The named parts that sum to the stream at ``(layer, where)`` (``None``: final):
        ``embed``, ``pos_embed``, each head ``L{l}H{h}`` (``z @ W_O``), each attention bias
        ``L{l}.b_O``, each MLP ``L{l}.mlp`` -- or, for the layers in ``per_neuron`` (``True``:
        all), each neuron ``L{l}N{i}`` and ``L{l}.b_out``. ``heads=False`` keeps each
        attention layer whole (``L{l}.attn``). ``components`` is
        ``[component, batch, pos, d_model]``; see ``resid.core.decompose``.

        >>> parts = cache.decompose_resid(3, "mid")
        >>> parts["L2H5"].shape                          # [batch, pos, d_model]
        """
        parts = contributions(self, layer, where, heads=heads, per_neuron=per_neuron)
        return self._masked(parts, mask_padding)

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: SliceInput = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Float[Tensor, "component batch pos d_model"] | tuple[Tensor, list[str]]:
        """Each layer's ``resid_pre`` up to ``layer`` (``incl_mid``: and ``resid_mid``), then
        the final stream, with TransformerLens' meaning and labels: ``apply_ln`` recomputes
        ``ln_final`` on each into the unembedding, else scales by that layer's cached norm
        scale. A tensor (``return_labels``: and the labels). See ``resid.core.stacking``."""
        stack, labels = stacking.accumulated_resid(
            self, layer, incl_mid, apply_ln, pos_slice, mlp_input, return_labels=True
        )
        return (stack, labels) if return_labels else stack

    # ---- TransformerLens' stacks (resid.core.stacking): Labelled, or (tensor, labels) ----

    def stack_head_results(self, layer: int | None = -1, return_labels: bool = False, incl_remainder: bool = False, pos_slice: SliceInput = None, apply_ln: bool = False):  # fmt: skip
        """Every head's result before ``layer``, ``"L{l}H{h}"``: see ``resid.core.stacking``.

        >>> cache.stack_head_results(pos_slice=-1).top(3)
        """
        return stacking.stack_head_results(self, layer, return_labels, incl_remainder, pos_slice, apply_ln)  # fmt: skip

    def stack_activation(self, activation_name: str, layer: int | None = -1, sublayer_type: str | None = None) -> Labelled:  # fmt: skip
        """``self[activation_name, l]`` for each layer before ``layer``, stacked."""
        return stacking.stack_activation(self, activation_name, layer, sublayer_type)

    def stack_neuron_results(self, layer: int | None = -1, pos_slice: SliceInput = None, neuron_slice: SliceInput = None, return_labels: bool = False, incl_remainder: bool = False, apply_ln: bool = False):  # fmt: skip
        """Every neuron's write before ``layer``, ``"L{l}N{i}"``: see ``resid.core.stacking``."""
        return stacking.stack_neuron_results(self, layer, pos_slice, neuron_slice, return_labels, incl_remainder, apply_ln)  # fmt: skip

    def apply_ln_to_stack(self, residual_stack: Tensor, layer: int | None = None, mlp_input: bool = False, pos_slice: SliceInput = None, batch_slice: SliceInput = None, has_batch_dim: bool = True, recompute_ln: bool = False) -> Tensor:  # fmt: skip
        """Parts of a stream as the norm reading it sees them: see ``resid.core.stacking``."""
        return stacking.apply_ln_to_stack(self, residual_stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim, recompute_ln)  # fmt: skip

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False, expand_neurons: bool = True, apply_ln: bool = False, pos_slice: SliceInput = None, return_labels: bool = False):  # fmt: skip
        """Heads, neurons (or MLPs), embeddings and biases summing to the stream entering
        ``layer``, TransformerLens' labels: see ``resid.core.stacking``."""
        return stacking.get_full_resid_decomposition(self, layer, mlp_input, expand_neurons, apply_ln, pos_slice, return_labels)  # fmt: skip

    # ---- slicing and moving (new caches; this one is left as it is) --------------------

    def apply_slice_to_batch_dim(self, batch_slice: SliceInput) -> ActivationCache:
        """A cache of the prompts ``batch_slice`` picks (an int drops the batch axis).

        >>> cache.apply_slice_to_batch_dim((0, 2))       # the first two prompts
        """
        return self._sliced(batch_slice, None)

    def apply_slice_to_pos_dim(self, pos_slice: SliceInput) -> ActivationCache:
        """A cache of the positions ``pos_slice`` picks (for patterns and scores: the query
        positions; an int drops the axis)."""
        return self._sliced(None, pos_slice)

    def _sliced(self, batch_slice: SliceInput, pos_slice: SliceInput) -> ActivationCache:
        if not self.has_batch_dim and batch_slice is not None:
            raise ValueError("this cache has no batch axis to slice (remove_batch_dim was applied)")
        batch_axis = 0 if self.has_batch_dim else None
        out = {}
        for name, t in self._store.items():
            site = info(name.removesuffix("_grad"))
            pos = site.pos_axis if site is not None else 1
            pos -= batch_axis is None
            if pos_slice is not None:
                t = apply_slice(t, pos_slice, pos)
            if batch_slice is not None:
                t = apply_slice(t, batch_slice, 0)
            out[name] = t
        mask = self.attention_mask
        if mask is not None:
            mask = apply_slice(apply_slice(mask, pos_slice, 1), batch_slice, 0)
            mask = mask if mask.dim() == 2 else None
        keeps_batch = self.has_batch_dim and not isinstance(batch_slice, int)
        return ActivationCache(out, self.model, attention_mask=mask, has_batch_dim=keeps_batch)

    def remove_batch_dim(self) -> ActivationCache:
        """The cache of a single prompt without its batch axis (TransformerLens'
        ``remove_batch_dim``), as a new cache; a ``ValueError`` for a batch of several."""
        if not self.has_batch_dim:
            return self
        sizes = {t.shape[0] for t in self._store.values() if t.dim() > 0}
        if sizes != {1}:
            raise ValueError(f"remove_batch_dim needs a batch of one prompt, not {sorted(sizes)}")
        return self._sliced(0, None)

    def to(self, device: torch.device | str) -> ActivationCache:
        """The same activations on ``device``, as a new cache."""
        store = {name: t.to(device) for name, t in self._store.items()}
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return ActivationCache(store, self.model, mask, self.has_batch_dim)

    def logit_lens(
        self, layer: int | None = None, return_labels: bool = False
    ) -> Float[Tensor, "component batch pos d_vocab"] | tuple[Tensor, list[str]]:
        """``ln_final(stream) @ W_U`` for each accumulated stream, ``ln_final`` recomputed on
        each; the last entry equals the model's logits. See ``resid.core.lens``."""
        return logit_lens(self, layer, return_labels)

    def logit_attribution(
        self,
        target: int | str | tuple | Tensor,
        heads: bool = True,
        per_neuron: bool | list[int] = False,
        mask_padding: bool = False,
    ) -> Labelled:
        """Direct logit attribution of every part of the final stream to a token, a logit
        difference ``(a, b)``, or a direction -- ``[component, batch, pos]`` with the last part
        ``"ln_final.b"``; the parts sum to the logit (difference). See ``resid.core.lens``.
        ``mask_padding=True`` zeroes every part at padding positions (as does
        ``decompose_resid``'s), so sums and rankings over positions see real tokens only.

        >>> cache.logit_attribution((" Mary", " John")).top(5, pos=-1)
        """
        parts = logit_attribution(self, target, heads=heads, per_neuron=per_neuron)
        return self._masked(parts, mask_padding)

    def _masked(self, parts: Labelled, mask_padding: bool) -> Labelled:
        """``parts`` with every padding position zeroed, when asked and there is padding."""
        if not mask_padding or self.attention_mask is None:
            return parts
        real = self.attention_mask.to(parts.values.device)  # [batch, pos]
        shape = (1, *real.shape) + (1,) * (parts.values.dim() - 3)
        values = parts.values * real.view(shape).to(parts.values.dtype)
        return Labelled(values, parts.axes, parts.names, parts.site, parts.baseline)
