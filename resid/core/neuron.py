"""A neuron is two vectors: it *reads* the residual stream along ``W_in[:, i]`` and
*writes* ``W_out[i]``, scaled by the nonlinearity of what it read.

For neuron ``i`` of layer ``l``, on the stream entering the MLP (``resid_mid``):

    activation = GELU( ln2(resid_mid) · read + bias )      (= blocks.l.mlp.hook_post[..., i])
    output     = activation * write                        (its share of hook_mlp_out)

``read``, ``write`` and ``bias`` are views of the weights the forward pass uses, not copies.

>>> n = model.neuron(5, 123)
>>> n.read.shape, n.write.shape                    # [d_model], [d_model]
>>> n.activation(cache).shape                      # [batch, pos]
>>> n.logit_effect(k=5)                            # tokens it pushes up and down
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from resid.core.names import act_name
from resid.core.protocols import CacheLike, ModelLike
from resid.core.stream import ResidualStream, State


@dataclass(frozen=True)
class LogitEffect:
    """The write vector through the unembedding: ``logits[t]`` for every token, and the
    ``k`` tokens it raises (``top``) and lowers (``bottom``) most, as ``(token, value)``."""

    logits: Float[Tensor, " d_vocab"]
    top: list[tuple[str, float]]
    bottom: list[tuple[str, float]]

    def __repr__(self) -> str:
        fmt = lambda pairs: ", ".join(f"{t!r} {v:+.3g}" for t, v in pairs)  # noqa: E731
        return f"LogitEffect(\n  up:   {fmt(self.top)}\n  down: {fmt(self.bottom)}\n)"


class Neuron:
    """MLP neuron ``index`` of ``layer``; get one with ``model.neuron(layer, index)``."""

    def __init__(self, model: ModelLike, layer: int, index: int):
        n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
        if not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise ValueError(f"layer must be in [0, {n_layers}), not {layer!r}")
        if not isinstance(index, int) or not -d_mlp <= index < d_mlp:
            raise ValueError(f"neuron index must be in [0, {d_mlp}), not {index!r}")
        self.model = model
        self.layer = layer % n_layers
        self.index = index % d_mlp
        self._block = model.blocks[self.layer]

    @property
    def read(self) -> Float[Tensor, " d_model"]:
        """``W_in[:, i]``: the direction the neuron reads (a view of the weights)."""
        return self._block.mlp.W_in[:, self.index]

    @property
    def write(self) -> Float[Tensor, " d_model"]:
        """``W_out[i]``: the vector it adds to the stream per unit of activation (a view)."""
        return self._block.mlp.W_out[self.index]

    @property
    def bias(self) -> Float[Tensor, ""]:
        """``b_in[i]``, added to what it reads before the nonlinearity."""
        return self._block.mlp.b_in[self.index]

    @property
    def gated(self) -> bool:
        """A gated (SwiGLU) neuron reads twice: ``gate`` through the nonlinearity, ``read``
        linearly, and its activation is their product."""
        return self._block.mlp.gated

    @property
    def gate(self) -> Float[Tensor, " d_model"]:
        """``W_gate[:, i]``: a gated neuron's second read, the one its nonlinearity sees."""
        if not self.gated:
            raise AttributeError(f"{self!r} is not gated: it has one read vector, .read")
        return self._block.mlp.W_gate[:, self.index]

    @property
    def site(self) -> str:
        """The stream it reads (through ``ln2``): ``blocks.{layer}.hook_resid_mid``, or
        ``hook_resid_pre`` in a parallel block (GPT-NeoX), whose MLP reads that."""
        return act_name(f"resid_{self._where}", self.layer)

    @property
    def _where(self) -> str:
        return "pre" if self._block.parallel else "mid"

    def _resid_mid(self, x: ResidualStream | State | CacheLike | Tensor) -> Tensor:
        if isinstance(x, Mapping):  # a cache (resid's, or any mapping of hook names)
            return x[self.site]
        if isinstance(x, (ResidualStream, State)):
            if x.site != self.site or getattr(x, "where", self._where) != self._where:
                raise ValueError(
                    f"neuron L{self.layer}N{self.index} reads {self.site}, not {x.site}: pass "
                    "that stream, or its .tensor / .vector to apply the neuron to this one anyway"
                )
            return x.tensor if isinstance(x, ResidualStream) else x.vector
        if isinstance(x, Tensor) and x.dtype.is_floating_point:
            if x.shape[-1] != self.model.cfg.d_model:
                raise ValueError(
                    f"the stream must end in d_model={self.model.cfg.d_model}, got {tuple(x.shape)}"
                )
            return x
        raise TypeError(
            f"activation takes a stream, a State, a cache or a tensor, not {type(x).__name__}"
        )

    def activation(
        self, x: ResidualStream | State | CacheLike | Float[Tensor, "... d_model"]
    ) -> Float[Tensor, "..."] | float:
        """GELU(ln2(resid_mid) · read + bias): the neuron's activation at every state of
        ``blocks.{layer}.hook_resid_mid``, given as a stream (``[batch, pos]`` out), a State
        (a float out), a cache holding that site, or a raw ``[..., d_model]`` tensor.

        >>> n.activation(cache.stream(n.layer, "mid"))    # == cache[f"blocks.{l}.mlp.hook_post"][..., i]
        """
        x = self._resid_mid(x)
        normalised = self._block.ln2.plain(x)
        pre = normalised @ self.read.to(x) + self.bias.to(x)  # query the normalised state
        mlp = self._block.mlp
        if self.gated:  # act(gate read) * linear read
            gate = normalised @ self.gate.to(x) + mlp.b_gate[self.index].to(x)
            out = mlp.act(gate) * pre
        else:
            out = mlp.act(pre)
        return out.item() if out.dim() == 0 else out

    def output(
        self, x: ResidualStream | State | CacheLike | Tensor
    ) -> Float[Tensor, "... d_model"]:
        """What the neuron adds to the stream: ``activation(x) * write``."""
        act = torch.as_tensor(self.activation(x))
        return act[..., None] * self.write.to(act)

    def logit_effect(self, k: int = 10, through_ln: bool = False) -> LogitEffect:
        """``write @ W_U`` with the ``k`` tokens raised and lowered most, as strings.

        ``through_ln=True`` sends ``write`` through ``ln_final`` first (centred where the
        norm centres, times its gain): the direction the write actually moves the logits
        (up to the norm's positive per-position scale)."""
        return write_logit_effect(self.model, self.write, k, through_ln)

    def __repr__(self) -> str:
        return f"Neuron(layer={self.layer}, index={self.index})"


def write_logit_effect(
    model: ModelLike, write: Float[Tensor, " d_model"], k: int = 10, through_ln: bool = False
) -> LogitEffect:
    """The logit effect of any write vector (a neuron's, an SAE feature's): ``write @ W_U``
    (``through_ln``: ``ln_final.centre(write) * w @ W_U``, following the model's norm), and
    the ``k`` tokens raised and lowered most, shown by the model's tokenizer (``<id>`` for
    a model that has none).

    >>> write_logit_effect(model, model.neuron(3, 7).write, k=5)
    """
    with torch.no_grad():
        v = write.detach().to(model.W_U)
        if through_ln:
            v = model.ln_final.centre(v) * model.ln_final.w.detach().to(v)
        logits = v @ model.W_U.detach()
        k = min(k, logits.shape[0])
        up, down = logits.topk(k), logits.topk(k, largest=False)
    try:
        decode = model.tokenizer.decode_each
    except ValueError:  # a vocabulary with no tokenizer: show the ids
        decode = lambda ids: [f"<{i}>" for i in ids]  # noqa: E731
    return LogitEffect(
        logits,
        list(zip(decode(up.indices.tolist()), up.values.tolist(), strict=True)),
        list(zip(decode(down.indices.tolist()), down.values.tolist(), strict=True)),
    )
