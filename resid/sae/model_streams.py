"""Training data computed on the fly: a model run on token ids as it trains (as SAELens'
``ActivationsStore`` does), instead of a harvest's stored activations.

:class:`ModelStreams` is a :class:`resid.sae.training.Source`. The sequences (not the rows)
are dealt to ``streams`` streams once: stream ``s`` holds sequences ``s, s + streams, …``.
Each epoch a stream takes its sequences in an order drawn from a generator seeded by
``(seed, stream, epoch)``, ``buffer_sequences`` at a time: the model runs on a buffer's
sequences (``batch_sequences`` per forward, under ``no_grad``, through ``run_with_cache``
with only the sites cached and ``stop_at_layer`` just past the last block they need), the
padded positions are dropped, and the buffer's rows are shuffled together by a generator
seeded by ``(seed, stream, epoch, buffer + 1)``, so that a batch mixes many sequences
rather than the neighbouring positions of a few. A global batch of ``B`` rows is
``B / streams`` rows of every stream, in stream order, whatever the number of processes,
so two ranks train the weights one rank does. The row counts come from the attention mask
alone, so a stream restarts at any step (``--resume``) by skipping whole epochs and
buffers without running the model: only the buffer the restart falls in is run again.

Rows come out as float32 on ``device`` (default: the model's), whatever the model's dtype;
a per-head site (``hook_z``) gives its heads flattened, as an SAE there reads them.

>>> data = ModelStreams(model, tokens, "blocks.3.hook_resid_pre", streams=2, seed=0)
>>> (x,) = next(data.batches(range(2), rows=512, start=0))                 # [1024, d_model]
>>> tc_data = ModelStreams(model, tokens, ("blocks.3.ln2.hook_normalized",
...                                        "blocks.3.hook_mlp_out"), streams=2)
>>> sae = train(data, TrainConfig(streams=2), "runs/sae", "blocks.3.hook_resid_pre")
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from resid.core import hooks, names
from resid.core.model import Model
from resid.core.rows import joined, rebatch
from resid.core.seeds import generator
from resid.sae.sites import site_width

MAX_STREAMS = 1 << 16
MAX_BUFFER_NUMBERS = 1 << 31  # floats one buffer may hold (8 GiB of float32)
_FIRST_BLOCK_SITE = list(names.SITES).index("hook_resid_pre")


def _check_int(name: str, value, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], not {value!r}")
    return value


class ModelStreams:
    """``model``'s activations at one site (an SAE's) or two (a transcoder's input and
    output) on ``tokens`` ``[n_sequences, pos]``, computed as they are needed, as
    ``streams`` endless shuffled streams of rows (see the module's docstring).

    ``attention_mask`` (``[n_sequences, pos]``, 1 at real tokens) marks padding, whose
    positions give no rows. ``batch_sequences`` sequences run per forward;
    ``buffer_sequences`` sequences' rows are shuffled together (bounded so that a buffer
    holds at most 2^31 floats); :meth:`mean` runs the first ``mean_sequences`` sequences.
    Neither ``model`` nor ``tokens`` is changed (the token ids are copied).

    >>> data = ModelStreams(model, tokens, "blocks.3.hook_resid_pre", streams=4, seed=1)
    >>> data.widths                                                   # (d_model,)
    >>> x, y = next(ModelStreams(model, tokens, ("blocks.3.ln2.hook_normalized",
    ...     "blocks.3.hook_mlp_out")).batches(range(1), rows=256, start=0))  # [256, d] each
    """

    def __init__(
        self,
        model: Model,
        tokens: Int[Tensor, "n_sequences pos"],
        sites: str | Sequence[str],
        streams: int = 1,
        seed: int = 0,
        *,
        attention_mask: Int[Tensor, "n_sequences pos"]
        | Bool[Tensor, "n_sequences pos"]
        | None = None,
        batch_sequences: int = 8,
        buffer_sequences: int = 64,
        mean_sequences: int = 256,
        device: torch.device | str | None = None,
    ):
        if not isinstance(model, Model):
            raise TypeError(f"model must be a resid.Model, not {type(model).__name__}")
        self.model = model
        if not isinstance(sites, (str, list, tuple)):
            raise TypeError(f"sites is a hook name or a list of them, not {type(sites).__name__}")
        self.sites = (sites,) if isinstance(sites, str) else tuple(sites)
        self.widths = self._check_sites(model, self.sites)
        n, pos = self._check_shape(model, tokens)
        _check_int("streams", streams, 1, min(n, MAX_STREAMS))
        _check_int("seed", seed, 0, 1 << 62)
        _check_int("batch_sequences", batch_sequences, 1, 1 << 20)
        _check_int("mean_sequences", mean_sequences, 1, 1 << 20)
        _check_int("buffer_sequences", buffer_sequences, 1, 1 << 20)
        top = max(1, MAX_BUFFER_NUMBERS // (pos * sum(self.widths)))
        if buffer_sequences > top:
            raise ValueError(
                f"buffer_sequences {buffer_sequences} of {pos} positions at widths "
                f"{list(self.widths)} is more than 2^31 floats in memory: pass "
                f"buffer_sequences={top} or fewer"
            )
        try:
            self.device = torch.device(device) if device is not None else model.device
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {device!r} is not a device ({e})") from None
        self.mask = self._check_mask(attention_mask, (n, pos))
        self.tokens = self._copy_tokens(model, tokens)
        self.streams, self.seed = streams, seed
        self.batch_sequences, self.buffer_sequences = batch_sequences, buffer_sequences
        self.mean_sequences = mean_sequences
        lengths = self.mask.sum(1) if self.mask is not None else torch.full((n,), pos)
        self.lengths = lengths.to(torch.int64)
        self.parts = [torch.arange(s, n, streams) for s in range(streams)]
        self.stop = self._stop_at_layer(self.sites)
        self._identity = self._fingerprint()

    # -- checks ---------------------------------------------------------------------------

    @staticmethod
    def _check_sites(model: Model, sites: tuple[str, ...]) -> tuple[int, ...]:
        if len(sites) not in (1, 2) or len(set(sites)) != len(sites):
            raise ValueError(
                f"sites must be one hook name (an SAE's) or two distinct ones (a transcoder's "
                f"input and output), not {list(sites)}"
            )
        widths = []
        for name in sites:
            if not isinstance(name, str):
                raise TypeError(f"a site is a hook name (str), not {type(name).__name__}")
            if name not in model.hook_dict:
                raise ValueError(hooks.unknown_hook_error(name, model.hook_dict).args[0])
            width = site_width(model, name)
            if width is None:
                site = names.info(name)
                axes = ", ".join(site.axes) if site is not None else "no vector per token"
                raise ValueError(
                    f"'{name}' holds {axes}, not one vector per token: a dictionary reads a "
                    "residual-stream, attention-output, MLP or hook_z site"
                )
            widths.append(width)
        return tuple(widths)

    @staticmethod
    def _check_shape(model: Model, tokens) -> tuple[int, int]:
        if not isinstance(tokens, Tensor):
            raise TypeError(
                f"tokens must be a tensor of token ids [n_sequences, pos], not "
                f"{type(tokens).__name__} (torch.from_numpy turns an array into one)"
            )
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, not a tensor of {tokens.dtype}")
        if tokens.dim() != 2 or tokens.numel() == 0:
            raise ValueError(
                f"tokens must be [n_sequences, pos] with at least one token, not shape "
                f"{tuple(tokens.shape)} (one sequence: tokens[None])"
            )
        n, pos = tokens.shape
        if pos > model.cfg.n_ctx:
            raise ValueError(
                f"{pos} positions is more than the model's context of {model.cfg.n_ctx}: "
                f"cut the sequences to {model.cfg.n_ctx} tokens or fewer"
            )
        return int(n), int(pos)

    @staticmethod
    def _copy_tokens(model: Model, tokens: Tensor) -> Tensor:
        """The streams' own copy of the token ids, on the CPU, checked against the vocabulary
        (uint16/32/64, which token files often are and which lack some ops: as int64)."""
        wide = tokens.dtype in (torch.uint16, torch.uint32, torch.uint64)
        tokens = tokens.detach().to("cpu", torch.int64 if wide else tokens.dtype, copy=True)
        lo, hi = (int(t) for t in tokens.aminmax())
        d_vocab = model.cfg.d_vocab
        if lo < 0 or hi >= d_vocab:
            bad = tokens[(tokens < 0) | (tokens >= d_vocab)].unique()[:5].tolist()
            raise ValueError(
                f"token ids {bad} are outside the model's vocabulary [0, {d_vocab}): were they "
                "made by another tokenizer?"
            )
        return tokens

    @staticmethod
    def _check_mask(mask, shape: tuple[int, int]) -> Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            raise TypeError(f"attention_mask must be a tensor, not {type(mask).__name__}")
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}, the tokens {shape}: one entry "
                "per token, 1 (or True) at real tokens and 0 at padding"
            )
        mask = mask.detach().to("cpu")
        if mask.dtype != torch.bool:
            if mask.dtype.is_floating_point or not ((mask == 0) | (mask == 1)).all():
                raise ValueError("attention_mask holds 0/1 (or bools): 1 at real tokens")
            mask = mask.bool()
        if not mask.any(1).all():
            empty = (~mask.any(1)).nonzero().flatten()[:5].tolist()
            raise ValueError(f"sequences {empty} are all padding: drop them from the tokens")
        return None if bool(mask.all()) else mask.clone()

    def _stop_at_layer(self, sites: tuple[str, ...]) -> int | None:
        """The layer to stop before: one past the last block a site is in, 0 for sites before
        the blocks (embeddings), ``None`` (run everything) for ``ln_final``'s."""
        stop = 0
        for name in sites:
            parsed = names.parse(name)
            if parsed.layer is not None:
                stop = max(stop, parsed.layer + 1)
            elif list(names.SITES).index(parsed.site.path) > _FIRST_BLOCK_SITE:
                return None
        return stop

    def _fingerprint(self) -> dict:
        tokens = hashlib.sha256(self.tokens.to(torch.int64).numpy().tobytes())
        if self.mask is not None:
            tokens.update(self.mask.numpy().tobytes())
        cfg = json.dumps(self.model.cfg.to_dict(), sort_keys=True, default=str)
        model = hashlib.sha256(f"{cfg}/{self.model.dtype}".encode()).hexdigest()
        return {
            "source": "model",
            "sequences": int(self.tokens.shape[0]),
            "positions": int(self.tokens.shape[1]),
            "rows": int(self.lengths.sum()),
            "tokens_sha256": tokens.hexdigest(),
            "model_sha256": model,
            "sites": list(self.sites),
            "buffer_sequences": self.buffer_sequences,
            "mean_sequences": self.mean_sequences,
        }

    # -- the Source protocol ----------------------------------------------------------------

    def identity(self) -> dict:
        """What a resumed run must find again: the token data's shape and SHA-256 (with its
        mask), the model config's hash, the sites and the buffering."""
        return dict(self._identity)

    def rows(self, sequences: Int[Tensor, " k"]) -> tuple[Float[Tensor, "rows width"], ...]:
        """Each site's activations at the real positions of ``sequences`` (indices into the
        tokens), sequence by sequence, positions in order: float32 on :attr:`device`.

        >>> (x,) = data.rows(torch.tensor([0, 5]))        # [real tokens of 0 and 5, d_model]
        """
        out: list[list[Tensor]] = [[] for _ in self.sites]
        for i in range(0, len(sequences), self.batch_sequences):
            chunk = sequences[i : i + self.batch_sequences]
            tokens = self.tokens[chunk].to(self.model.device, torch.long)
            mask = None if self.mask is None else self.mask[chunk]
            with torch.no_grad():
                _, cache = self.model.run_with_cache(
                    tokens,
                    names_filter=list(self.sites),
                    attention_mask=None if mask is None else mask.to(self.model.device),
                    stop_at_layer=self.stop,
                    return_type=None,
                )
            for j, name in enumerate(self.sites):
                act = cache[name]
                act = act.reshape(*act.shape[:2], -1)
                act = act.flatten(0, 1) if mask is None else act[mask.to(act.device)]
                out[j].append(act.to(self.device, torch.float32))
            del cache
        return tuple(torch.cat(parts) for parts in out)

    def mean(self) -> tuple[Float[Tensor, " width"], ...]:
        """Each site's mean row over the first ``mean_sequences`` sequences (the same on
        every rank): where a decoder bias starts."""
        first = torch.arange(min(self.mean_sequences, len(self.tokens)))
        return tuple(t.double().mean(0).float() for t in self.rows(first))

    def _stream(self, s: int, start: int) -> Iterator[tuple[Tensor, ...]]:
        """Stream ``s`` from its row ``start`` on, one piece per buffer."""
        mine = self.parts[s]
        total = int(self.lengths[mine].sum())
        epoch, skip = divmod(start, total)
        while True:
            order = mine[torch.randperm(len(mine), generator=generator(self.seed, s, epoch))]
            for b, at in enumerate(range(0, len(order), self.buffer_sequences)):
                chunk = order[at : at + self.buffer_sequences]
                n = int(self.lengths[chunk].sum())
                if skip >= n:
                    skip -= n
                    continue
                perm = torch.randperm(n, generator=generator(self.seed, s, epoch, b + 1))[skip:]
                skip = 0
                perm = perm.to(self.device)
                yield tuple(t[perm] for t in self.rows(chunk))
            epoch += 1

    def batches(
        self, streams: range, rows: int, start: int
    ) -> Iterator[tuple[Float[Tensor, "batch width"], ...]]:
        """Endless batches of ``rows`` rows from each stream in ``streams`` (joined in stream
        order), from step ``start`` on, exactly the batches a run from step 0 reaches there.

        >>> (x,) = next(data.batches(range(2, 4), rows=256, start=100))   # [512, d_model]
        """
        _check_int("rows", rows, 1, 1 << 30)
        _check_int("start", start, 0, 1 << 62)
        if not isinstance(streams, range) or not all(0 <= s < self.streams for s in streams):
            raise ValueError(
                f"streams must be a range within range({self.streams}), not {streams!r}"
            )
        its = [rebatch(self._stream(s, start * rows), rows) for s in streams]
        return joined(its, len(self.sites))

    def __repr__(self) -> str:
        n, pos = self.tokens.shape
        return (
            f"ModelStreams({n} sequences x {pos} positions, sites={list(self.sites)}, "
            f"streams={self.streams}, seed={self.seed})"
        )


__all__ = ["ModelStreams"]
