"""The cache ``run_with_cache`` hands back, with the residual-stream analyses as methods
(TransformerLens' names): ``decompose_resid``, ``accumulated_resid``, ``logit_lens``,
``logit_attribution``.

The core cache (``resid.core.cache``) holds tensors by hook name and knows nothing of
analysis; this subclass adds the methods on top, so that the core never imports the
analysis layer. ``import resid`` makes it the type ``Model.run_with_cache`` builds.

>>> _, cache = model.run_with_cache("When Mary and John went to the store")
>>> cache.decompose_resid(3, "mid").labels[:3]
['embed', 'pos_embed', 'L0H0']
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from resid.analysis.decompose import contributions
from resid.analysis.lens import accumulated_resid, logit_attribution, logit_lens
from resid.core.cache import ActivationCache
from resid.core.labelled import Labelled


class AnalysisCache(ActivationCache):
    """An :class:`~resid.core.cache.ActivationCache` with the stream analyses as methods."""

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
        ``[component, batch, pos, d_model]``; see ``resid.analysis.decompose``.

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
        return_labels: bool = False,
    ) -> Float[Tensor, "component batch pos d_model"] | tuple[Tensor, list[str]]:
        """Each layer's ``resid_pre`` up to ``layer``, then the final stream (TransformerLens'
        meaning); ``apply_ln`` recomputes ``ln_final`` on each. See ``resid.analysis.lens``."""
        return accumulated_resid(self, layer, incl_mid, apply_ln, return_labels)

    def logit_lens(
        self, layer: int | None = None, return_labels: bool = False
    ) -> Float[Tensor, "component batch pos d_vocab"] | tuple[Tensor, list[str]]:
        """``ln_final(stream) @ W_U`` for each accumulated stream, ``ln_final`` recomputed on
        each; the last entry equals the model's logits. See ``resid.analysis.lens``."""
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
        ``"ln_final.b"``; the parts sum to the logit (difference). See ``resid.analysis.lens``.
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
