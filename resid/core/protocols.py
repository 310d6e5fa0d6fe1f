"""What the core needs of a model, a cache and a spliced module, stated as protocols.

The core's parts (heads, neurons, streams, the cache, the KV cache, generation, input
checks) work on anything shaped like a model, so they name :class:`ModelLike` here
instead of importing ``resid.core.model.Model``: the model imports its parts, never the
other way round, and there is no import cycle, not even one that only type checkers see.
``resid.Model`` satisfies every protocol here, and so does a user's class shaped like it.

>>> from resid.core.protocols import ModelLike
>>> def n_params(model: ModelLike) -> int:
...     return sum(p.numel() for p in model.parameters())
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from resid.core.config import Config
from resid.core.hooks import HookFn, HookPoint
from resid.core.layers import Block, LayerNorm, RMSNorm
from resid.core.tokenizer import Tokenizer


class ModelLike(Protocol):
    """A transformer with resid's parts and hook points: what heads, neurons, caches,
    streams, generation and input checks read of a model (``resid.Model`` is one)."""

    cfg: Config
    blocks: Sequence[Block]
    ln_final: LayerNorm | RMSNorm
    W_E: Tensor
    hook_dict: Mapping[str, HookPoint]
    padding_side: Literal["right", "left"]

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    def __call__(self, input: Any, *args: Any, **kwargs: Any) -> Any: ...

    def to_tokens(self, input: str | list[str], *args: Any, **kwargs: Any) -> Any: ...

    def to_single_token(self, text: str) -> int: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


class CacheLike(Protocol):
    """A run's activations by hook name, with the model that made them and the run's
    attention mask: what streams, heads, neurons and the decompositions read
    (``resid.ActivationCache`` is one)."""

    model: ModelLike
    attention_mask: Bool[Tensor, "batch pos"] | None

    def __getitem__(self, name: str) -> Tensor: ...

    def __contains__(self, name: object) -> bool: ...

    def __iter__(self) -> Iterator[str]: ...

    def require(self, names: list[str], needed_for: str, fix: str) -> None: ...

    def head_results(self, layer: int | None = None) -> Tensor: ...

    def decompose_resid(
        self, layer: int | None = None, where: str = "pre", **kwargs: Any
    ) -> Any: ...


@runtime_checkable
class Spliceable(Protocol):
    """What ``Model.saes`` splices in (``resid.sae.SAE`` is one): a module that replaces
    the activation at ``hook_name`` and brings hook points of its own.

    ``hook_points()`` maps suffixes (``"sae.hook_acts"``) to its HookPoints, addressed as
    ``f"{hook_name}.{suffix}"`` while spliced; ``check_fits(model)`` raises a clear error
    when it cannot run at its site of this model; ``splice_hook(use_error_term)`` is the
    forward hook that does the replacing."""

    hook_name: str

    def hook_points(self) -> Mapping[str, HookPoint]: ...

    def check_fits(self, model: ModelLike) -> None: ...

    def splice_hook(self, use_error_term: bool) -> HookFn: ...
