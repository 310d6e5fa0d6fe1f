"""The residual stream as a data structure: states you query (dot products) and update
(add vectors).

A :class:`ResidualStream` is the ``[batch, pos, d_model]`` tensor at one named site, and it
carries that name: ``blocks.5.hook_resid_pre`` and ``blocks.5.hook_resid_mid`` are different
objects, because the meaning of the stream changes after every layer. Its ``states`` are
the per-position vectors (:class:`State`): ``stream.states[2]`` is position 2 of a batch
of one, ``stream.states[b, 2]`` position 2 of sequence ``b``.

Directions follow the library's right-multiplication convention, ``x @ W``: ``query(v)``
takes one direction ``v: [d_model]`` or ``k`` of them as the *columns* of
``W: [d_model, k]`` -- so ``stream.query(model.W_U)`` is the unembedding of every state
(before the final LayerNorm). ``update(v)`` returns a new stream; nothing is changed in place.

>>> _, cache = model.run_with_cache("The Eiffel Tower is in")
>>> stream = cache.stream(5, "pre")            # blocks.5.hook_resid_pre
>>> stream.query(direction).shape              # [1, 7]
>>> stream.states[3].query(direction)          # a float
>>> stream.update(4 * direction).decompose().labels[-1]
'update_0'

To edit the stream during a run (activation addition, steering), attach :func:`add`:

>>> with model.hooks([resid.stream.add("blocks.5.hook_resid_pre", 4 * direction)]):
...     logits = model("I think that")
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from resid.core.hooks import HookFn, HookPoint
from resid.core.labelled import Labelled
from resid.core.names import Where, stream_site
from resid.core.protocols import CacheLike


def _direction(v: Tensor, d_model: int, what: str) -> Tensor:
    if not isinstance(v, Tensor) or not v.dtype.is_floating_point:
        got = v.dtype if isinstance(v, Tensor) else type(v).__name__
        raise TypeError(f"{what} takes a float tensor, not {got}")
    if v.dim() in (1, 2) and v.shape[0] == d_model:
        return v
    hint = ""
    if v.dim() == 2 and v.shape[1] == d_model:
        hint = " Directions are columns (x @ W): pass v.T."
    raise ValueError(
        f"{what} takes v: [d_model={d_model}] or [d_model, k], got {tuple(v.shape)}.{hint}"
    )


def _query(x: Float[Tensor, "... d_model"], v: Tensor, what: str) -> Tensor:
    v = _direction(v, x.shape[-1], what).to(x)
    return x @ v


def _update_vector(x: Tensor, v: Tensor, what: str) -> Tensor:
    if not isinstance(v, Tensor) or not v.dtype.is_floating_point:
        raise TypeError(f"{what} takes a float tensor, not {type(v).__name__}")
    try:
        fits = torch.broadcast_shapes(v.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits or v.shape[-1:] != x.shape[-1:]:
        raise ValueError(
            f"{what} adds v: [d_model={x.shape[-1]}] or one broadcastable to {tuple(x.shape)}, "
            f"got {tuple(v.shape)}"
        )
    return v.to(x)


@dataclass(frozen=True)
class State:
    """One position's vector in the residual stream at ``site``: an opaque store you read
    with dot products and write by adding.

    >>> state = cache.stream(3, "mid").states[-1]
    >>> state.query(model.W_U[:, model.to_single_token(" Paris")])   # a float
    >>> state.update(v).vector.shape                                   # [d_model]
    """

    vector: Float[Tensor, " d_model"]
    site: str
    batch: int
    pos: int

    def query(self, v: Float[Tensor, " d_model *k"]) -> float | Float[Tensor, " k"]:
        """``vector @ v``: a float for one direction, ``[k]`` for ``v: [d_model, k]``."""
        out = _query(self.vector, v, "State.query")
        return out.item() if out.dim() == 0 else out

    def update(self, v: Float[Tensor, " d_model"]) -> State:
        """A new State holding ``vector + v``."""
        v = _update_vector(self.vector, v, "State.update")
        return State(self.vector + v, self.site, self.batch, self.pos)

    def __repr__(self) -> str:
        return (
            f"State({self.site}, batch={self.batch}, pos={self.pos}, |x|={self.vector.norm():.4g})"
        )


class States:
    """``stream.states[i]`` (batch of one) or ``stream.states[b, i]``: a :class:`State`."""

    def __init__(self, stream: ResidualStream):
        self._stream = stream

    def __len__(self) -> int:
        return self._stream.tensor.shape[1]

    def __getitem__(self, index: int | tuple[int, int]) -> State:
        x = self._stream.tensor
        if isinstance(index, tuple) and len(index) == 2:
            b, p = index
        elif isinstance(index, int):
            if x.shape[0] != 1:
                raise IndexError(
                    f"this stream holds a batch of {x.shape[0]}: index states[b, pos], "
                    f"not states[{index}]"
                )
            b, p = 0, index
        else:
            raise TypeError(f"states takes a position or a (batch, pos) pair, not {index!r}")
        for i, n, axis in ((b, x.shape[0], "batch"), (p, x.shape[1], "pos")):
            if not isinstance(i, int) or not -n <= i < n:
                raise IndexError(f"{axis} index {i!r} is out of range for {n} {axis}")
        return State(x[b, p], self._stream.site, b % x.shape[0], p % x.shape[1])

    def __iter__(self) -> Iterator[State]:
        return (self[i] for i in range(len(self)))


class ResidualStream:
    """The ``[batch, pos, d_model]`` states at one site of the residual stream.

    ``site`` is the hook name (``blocks.5.hook_resid_pre``), ``layer`` and ``where`` say the
    same thing as numbers (``where`` is ``pre``, ``mid``, ``post`` or ``final``). A stream
    from a cache knows its cache, so ``decompose()`` can name its parts; a stream built by
    hand from a tensor can be queried and updated but not decomposed.

    >>> stream = ResidualStream(cache["blocks.2.hook_resid_mid"], "blocks.2.hook_resid_mid")
    >>> stream.query(model.blocks[2].mlp.W_in).shape    # [batch, pos, d_mlp]
    """

    def __init__(
        self,
        tensor: Float[Tensor, "batch pos d_model"],
        site: str,
        *,
        where: Where | None = None,
        cache: CacheLike | None = None,
        updates: tuple[tuple[str, Tensor], ...] = (),
    ):
        found = stream_site(site) if isinstance(site, str) else None
        if found is None:
            raise ValueError(
                f"site must name a residual stream hook, 'blocks.{{l}}.hook_resid_pre|mid|post', "
                f"not {site!r}"
            )
        if not isinstance(tensor, Tensor) or tensor.dim() != 3:
            got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"a residual stream is [batch, pos, d_model], got {got}")
        self.tensor = tensor
        self.site = site
        self.layer = found.layer
        self.where: Where = found.where
        if where == "final":
            if self.where != "post":
                raise ValueError(f"the final stream is a hook_resid_post, not {site}")
            self.layer, self.where = self.layer + 1, "final"
        self.cache = cache
        self._updates = updates

    @property
    def states(self) -> States:
        return States(self)

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    def query(
        self, v: Float[Tensor, " d_model *k"]
    ) -> Float[Tensor, "batch pos"] | Float[Tensor, "batch pos k"]:
        """Dot products of every state with ``v``: ``[batch, pos]`` for ``v: [d_model]``,
        ``[batch, pos, k]`` for ``v: [d_model, k]`` (``x @ v``).

        >>> stream.query(model.W_U[:, token])    # each state's unembedding of one token
        """
        return _query(self.tensor, v, "ResidualStream.query")

    def update(
        self, v: Float[Tensor, "*batch_pos d_model"], label: str | None = None
    ) -> ResidualStream:
        """A new stream with ``v`` added: ``v: [d_model]`` to every state, or any shape
        broadcastable to ``[batch, pos, d_model]``. The stream it came from is unchanged;
        ``decompose()`` of the new one lists ``v`` under ``label`` (``update_{n}`` by default).
        """
        v = _update_vector(self.tensor, v, "ResidualStream.update")
        label = label or f"update_{len(self._updates)}"
        return ResidualStream(
            self.tensor + v,
            self.site,
            where="final" if self.where == "final" else None,
            cache=self.cache,
            updates=(*self._updates, (label, v.expand_as(self.tensor))),
        )

    def decompose(self, heads: bool = True, per_neuron: bool | list[int] = False) -> Labelled:
        """The named contributions that sum to this stream; see
        ``ActivationCache.decompose_resid``. Updates made with ``update()`` come last."""
        if self.cache is None:
            raise ValueError(
                f"this stream at {self.site} was built from a tensor, not a cache, so its parts "
                "are unknown: get it with cache.stream(layer, where) to decompose it"
            )
        parts = self.cache.decompose_resid(
            self.layer, self.where, heads=heads, per_neuron=per_neuron
        )
        if not self._updates:
            return parts
        labels, extra = zip(*self._updates, strict=True)
        extra = torch.stack(extra).to(parts.components)
        return Labelled.stack(
            [*parts.labels, *labels], torch.cat([parts.components, extra]), self.site
        )

    def __repr__(self) -> str:
        return f"ResidualStream({self.site}, where={self.where!r}, shape={tuple(self.shape)})"


def add(
    site: str, v: Float[Tensor, "*batch_pos d_model"], pos: int | list[int] | slice | None = None
) -> tuple[str, HookFn]:
    """A ``(site, hook)`` pair that adds ``v`` to the activation at ``site`` during a run:
    activation addition / steering in one line. ``pos`` limits it to some positions.

    The activation is never changed in place, and ``v`` is never modified.

    >>> with model.hooks([resid.stream.add("blocks.5.hook_resid_pre", 4 * v, pos=-1)]):
    ...     logits = model("I think that")
    """
    if not isinstance(v, Tensor) or not v.dtype.is_floating_point:
        raise TypeError(f"add takes a float tensor v, not {type(v).__name__}")

    def hook(act: Tensor, hook: HookPoint) -> Tensor:
        where = act if pos is None else act[:, pos]
        delta = _update_vector(where, v, f"the add hook on '{hook.name}'")
        if pos is None:
            return act + delta
        out = act.clone()
        out[:, pos] = where + delta
        return out

    return site, hook
