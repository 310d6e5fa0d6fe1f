"""GPT-2 in torch, with a hook point at every site of the residual stream.

The forward pass is nanoGPT's, with TransformerLens' hook names (the kernels are in
``resid.core.layers``, which states the ``x @ W`` convention):

    hook_embed + hook_pos_embed                      -> blocks.0.hook_resid_pre
    for each block l:
        resid_mid  = resid_pre + attn(ln1(resid_pre))  (blocks.l.hook_attn_out)
        resid_post = resid_mid + mlp(ln2(resid_mid))   (blocks.l.hook_mlp_out)
    logits = ln_final(resid_post) @ W_U                (W_U is W_E transposed: tied)

Batches of prompts of different lengths carry an attention mask: padding is never
attended to, and with left padding each row's position embeddings count its real tokens
only, as Hugging Face's ``position_ids`` do. A ``KVCache`` lets a forward run new
positions after earlier ones without recomputing them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from resid.core import hooks
from resid.core.cache import ActivationCache
from resid.core.config import Config
from resid.core.factored import FactoredMatrix
from resid.core.generation import generate
from resid.core.head import Head
from resid.core.hooks import HookPoint, Hooks, NameFilter
from resid.core.kv_cache import KVCache
from resid.core.layers import Block, Mask, norm
from resid.core.neuron import Neuron
from resid.core.tokenizer import Tokenizer

Input = str | list[str] | Tensor
_SPLICE_LOCK = threading.Lock()  # hook_dict is replaced, never edited, under this lock


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

    def check_fits(self, model: Model) -> None: ...

    def splice_hook(self, use_error_term: bool) -> hooks.HookFn: ...


def _stacked(module: str, name: str, shape: str) -> property:
    """A ``Model`` property: every block's ``module.name``, stacked on a leading layer axis.
    Keys and values are given per query head, so with grouped-query attention the heads
    that share one appear once each (a copy, as the whole stack is)."""

    def get(self: Model) -> Tensor:
        parts = []
        for block in self.blocks:
            t = getattr(getattr(block, module), name)
            if name in ("W_K", "W_V", "b_K", "b_V"):
                t = t[[block.attn.kv_head(h) for h in range(self.cfg.n_heads)]]
            parts.append(t)
        return torch.stack(parts)

    return property(get, doc=f"``[{shape}]``: each block's ``{module}.{name}``, stacked (a copy).")


class Model(nn.Module):
    """A GPT-2 with hook points at every site.

    >>> model = resid.load("gpt2")
    >>> logits = model("The Eiffel Tower is in")   # [1, 7, 50257]: one row per prefix
    >>> logits, cache = model.run_with_cache("Hello", names_filter=lambda n: "resid" in n)
    """

    cache_type: type[ActivationCache] = ActivationCache  # `import resid` adds the analyses
    padding_side: Literal["right", "left"] = "right"

    def __init__(self, cfg: Config | None = None, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.cfg = cfg = cfg or Config()
        self._tokenizer = tokenizer
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.positional == "learned":
            self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
            self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))  # W_U, untied
        if cfg.unembed_bias:
            self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab))
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module
        if self.W_E.device.type != "meta":
            self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2's initialisation: normal(0, std) matrices, zero biases, unit LayerNorm gains."""
        for name, p in self.named_parameters():
            if name.endswith(
                ("W_E", "W_pos", "W_QKV", "W_O", "W_in", "W_out", "W_gate", "lm_head")
            ):
                nn.init.normal_(p, std=std)
            elif name.endswith(".w"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding: tied to the embedding (GPT-2), a view of ``W_E``; else its own
        matrix (``lm_head``, stored ``[d_model, d_vocab]``)."""
        return self.W_E.T if self.cfg.tie_embeddings else self.lm_head

    @property
    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_E.dtype

    # ---- heads, neurons, and every layer's weights stacked (TransformerLens' names) -----

    def head(self, layer: int, index: int) -> Head:
        """Attention head ``index`` of block ``layer``: weights, QK/OV circuits, pattern."""
        return Head(self, layer, index)

    def neuron(self, layer: int, index: int) -> Neuron:
        """MLP neuron ``index`` of ``layer``: ``.read``, ``.write``, ``.bias``,
        ``.activation(...)``, ``.logit_effect()``; see ``resid.core.neuron``."""
        return Neuron(self, layer, index)

    W_Q = _stacked("attn", "W_Q", "layer head d_model d_head")
    W_K = _stacked("attn", "W_K", "layer head d_model d_head")
    W_V = _stacked("attn", "W_V", "layer head d_model d_head")
    W_O = _stacked("attn", "W_O", "layer head d_head d_model")
    b_Q = _stacked("attn", "b_Q", "layer head d_head")
    b_K = _stacked("attn", "b_K", "layer head d_head")
    b_V = _stacked("attn", "b_V", "layer head d_head")
    b_O = _stacked("attn", "b_O", "layer d_model")
    W_in = _stacked("mlp", "W_in", "layer d_model d_mlp")
    W_out = _stacked("mlp", "W_out", "layer d_mlp d_model")
    b_in = _stacked("mlp", "b_in", "layer d_mlp")
    b_out = _stacked("mlp", "b_out", "layer d_model")

    @property
    def QK(self) -> FactoredMatrix:
        """Every head's ``W_Q W_Kᵀ``, factored: ``[layer, head, d_model, d_model]`` (refused
        for rotary models, whose QK depends on position: see ``Head.qk_at``)."""
        if self.cfg.positional == "rotary":
            raise ValueError(
                "a rotary model's QK circuits depend on the query-key distance: use "
                "model.head(layer, h).qk_at(offset)"
            )
        return FactoredMatrix(self.W_Q, self.W_K.mT)

    @property
    def OV(self) -> FactoredMatrix:
        """Every head's ``W_V W_O``, factored: ``[layer, head, d_model, d_model]``."""
        return FactoredMatrix(self.W_V, self.W_O)

    # ---- the forward pass ------------------------------------------------------------

    def forward(
        self,
        input: Input,
        return_type: Literal["logits", "loss"] | None = "logits",
        *,
        attention_mask: Tensor | None = None,
        padding_side: Literal["right", "left"] | None = None,
        past_kv_cache: KVCache | None = None,
        loss_per_token: bool = False,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"] | Tensor | None:
        """Logits for every prefix of the input: row ``i`` predicts token ``i + 1``.

        ``input`` is a string, a list of strings (padded on ``padding_side`` and masked, BOS
        prepended), or token ids ``[batch, pos]`` / ``[pos]`` with an optional
        ``attention_mask`` (1 at real tokens). Padding is never attended to, and left
        padding shifts each row's positions so that its first real token is position 0.
        Logits at padding positions are computed but mean nothing.

        ``return_type="loss"`` gives the mean next-token loss over real tokens
        (``loss_per_token=True``: ``[batch, pos - 1]``, 0 where the target is padding).
        With ``past_kv_cache`` the input is the next positions after those in the cache,
        which is extended with them. As in TransformerLens, ``start_at_layer=l`` takes
        ``input`` to be the residual stream entering block ``l``, and ``stop_at_layer=l``
        returns the residual stream entering block ``l``. ``return_type=None`` runs
        everything (``ln_final`` included) for the hooks and returns ``None``.

        >>> model(["Hi", "Hello there"], return_type="loss")     # padding excluded
        """
        if return_type not in ("logits", "loss", None):
            raise ValueError(f"return_type must be 'logits', 'loss' or None, not {return_type!r}")
        if start_at_layer is None:
            tokens, mask = self.prepare(input, attention_mask, padding_side)
            shape = tokens.shape
        elif return_type == "loss":
            raise ValueError("return_type='loss' needs tokens, so it cannot start at a layer")
        else:
            tokens, shape = None, input.shape[:2]
            mask = self.check_mask(attention_mask, shape)
        if past_kv_cache is not None:
            past_kv_cache.check(self, shape[0])
        full = mask if past_kv_cache is None else past_kv_cache.keys_mask(mask, shape)
        offset = 0 if past_kv_cache is None else past_kv_cache.length
        if offset + shape[1] > self.cfg.n_ctx:
            raise ValueError(
                f"{offset + shape[1]} positions is more than the context of {self.cfg.n_ctx}"
            )
        attn_mask = Mask(offset, full)
        if tokens is not None:
            resid = self.embed(tokens, attn_mask.positions(shape[1], self.device))
        else:
            resid = input
        kvs = past_kv_cache.layers if past_kv_cache is not None else [None] * self.cfg.n_layers
        for layer in range(self.cfg.n_layers)[start_at_layer:stop_at_layer]:
            resid = self.blocks[layer](resid, attn_mask, kvs[layer])
        if past_kv_cache is not None:
            past_kv_cache.advance(full, shape)
        if stop_at_layer is not None:
            return resid
        logits = self.unembed(resid, with_logits=return_type is not None)
        if return_type != "loss":
            return logits
        return self.loss(logits, tokens, mask, per_token=loss_per_token)

    def embed(
        self, tokens: Int[Tensor, "batch pos"], positions: Int[Tensor, "... pos"] | None = None
    ) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream's first state: token embedding plus, with learned positions,
        position embedding (rotary models add positions inside attention instead)."""
        batch, pos = tokens.shape
        if positions is None:
            positions = torch.arange(pos, device=tokens.device)
        embed = self.hook_embed(self.W_E[tokens])
        if self.cfg.positional != "learned":
            return embed
        pos_embed = self.W_pos[positions].expand(batch, pos, -1)
        if self.hook_pos_embed.active:  # hooks get a tensor of their own, never the weights
            pos_embed = self.hook_pos_embed(pos_embed.clone())
        return embed + pos_embed

    def unembed(
        self, resid: Float[Tensor, "batch pos d_model"], with_logits: bool = True
    ) -> Float[Tensor, "batch pos d_vocab"] | None:
        """``ln_final(resid) @ W_U`` (``ln_final`` runs for its hooks even when no logits
        are wanted)."""
        normalized = self.ln_final(resid)
        if not with_logits:
            return None
        logits = normalized @ self.W_U
        return logits + self.b_U if self.cfg.unembed_bias else logits

    @staticmethod
    def loss(
        logits: Float[Tensor, "batch pos d_vocab"],
        tokens: Int[Tensor, "batch pos"],
        mask: Bool[Tensor, "batch pos"] | None = None,
        per_token: bool = False,
    ) -> Tensor:
        """Next-token cross-entropy over the pairs whose input and target are both real."""
        per = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none"
        ).view(tokens.shape[0], -1)
        if mask is None:
            return per if per_token else per.mean()
        real = mask[:, 1:] & mask[:, :-1]
        per = per.masked_fill(~real, 0.0)
        return per if per_token else per.sum() / real.sum()

    # ---- hooks and caching ---------------------------------------------------------

    @contextmanager
    def hooks(self, fwd_hooks: Hooks = (), bwd_hooks: Hooks = ()) -> Iterator[Model]:
        """Attach ``(name_or_filter, fn)`` hooks for the length of a ``with`` block, in this
        thread or task only.

        >>> steer = lambda resid, hook: resid + 4 * direction
        >>> with model.hooks([("blocks.6.hook_resid_pre", steer)]):
        ...     logits = model("I think that")
        """
        with hooks.attached(self.hook_dict, fwd_hooks, bwd_hooks):
            yield self

    def attached_hooks(self) -> list[str]:
        """The sites with hooks attached in the caller's context (by an enclosing
        ``with model.hooks(...)``)."""
        return hooks.any_attached(self.hook_dict.values())

    @contextmanager
    def saes(
        self, modules: Spliceable | Iterable[Spliceable], use_error_term: bool = True
    ) -> Iterator[Model]:
        """Splice SAEs in for the length of a ``with`` block, in this thread or task only:
        each replaces the activation at its hook site with its reconstruction, plus the
        error term (activation - reconstruction) unless ``use_error_term=False``, so by
        default the logits do not change. While spliced, each SAE's hook points are sites
        like any other (``blocks.6.hook_resid_pre.sae.hook_acts``): hooks, the cache,
        patching and attribution address them by name. Every SAE is checked against the
        model before anything is attached; on exit (even on error) nothing stays spliced.

        Hooks attached to the SAE's site *outside* this block run before the SAE (they see
        and may edit what it encodes); hooks attached inside run after it.

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
        """Address ``points`` by name in ``hook_dict`` for the block, then remove exactly
        them (by identity). The dict is replaced, not edited, so a reader never sees it
        change mid-iteration."""
        with _SPLICE_LOCK:
            for name, hp in points.items():
                hp.name = name
            self.hook_dict = {**self.hook_dict, **points}
        try:
            yield
        finally:
            with _SPLICE_LOCK:
                ours = {id(hp) for hp in points.values()}
                self.hook_dict = {n: hp for n, hp in self.hook_dict.items() if id(hp) not in ours}

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
        input: Input,
        names_filter: str | list[str] | NameFilter | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        incl_bwd: bool = False,
        **forward_kwargs,
    ) -> tuple[Tensor, ActivationCache]:
        """Forward, keeping the activations at the sites ``names_filter`` picks.

        ``None`` caches every site except the per-head ``attn.hook_result`` (name it, or
        pass a filter, to get it). The output is exactly ``model(input)``'s: what is
        cached is computed beside the forward pass. ``device`` and ``dtype`` say where and
        how the cache keeps its tensors (patterns and scales are fp32 unless ``dtype`` is
        given). With padding, ``cache.attention_mask`` marks the real tokens; activations at
        padding positions are left as computed, and resid's statistics exclude them.
        ``incl_bwd=True`` also calls ``backward()`` on the output (which must be a
        scalar, e.g. ``return_type="loss"``) and caches each site's gradient as
        ``"{name}_grad"``, as TransformerLens does.

        >>> logits, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pre"])
        """
        device = _check_device(device)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"run_with_cache keeps activations in a float dtype, not {dtype!r}")
        if names_filter is None:
            names_filter = lambda name: not name.endswith("hook_result")  # noqa: E731
        store: dict[str, Tensor] = {}

        def keep(name: str, t: Tensor) -> None:
            store[name] = t.detach().to(device=device or t.device, dtype=dtype or t.dtype)

        def save(act: Tensor, hook: HookPoint) -> None:
            keep(hook.name, act)

        def save_grad(grad: Tensor, hook: HookPoint) -> None:
            keep(f"{hook.name}_grad", grad)

        selected = [(hp.name, save) for hp in hooks.resolve(self.hook_dict, names_filter)]
        bwd = [(name, save_grad) for name, _ in selected] if incl_bwd else []
        mask = None
        if forward_kwargs.get("start_at_layer") is None:
            input, mask = self.prepare(
                input,
                forward_kwargs.pop("attention_mask", None),
                forward_kwargs.pop("padding_side", None),
            )
            forward_kwargs["attention_mask"] = mask
        with torch.enable_grad() if incl_bwd else nullcontext(), self.hooks(selected, bwd):
            out = self(input, **forward_kwargs)
            if incl_bwd:
                if out.dim() != 0:
                    raise ValueError(
                        "incl_bwd=True calls backward() on the output, which must be a scalar: "
                        "pass return_type='loss'"
                    )
                out.backward()
        return out, self.cache_type(store, self, attention_mask=mask)

    # ---- tokens --------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.cfg.d_vocab != 50257:
                raise ValueError(
                    f"this model has no tokenizer (d_vocab={self.cfg.d_vocab} is not GPT-2's): "
                    "pass token ids, or give one with Model(cfg, tokenizer=...)"
                )
            self._tokenizer = Tokenizer.gpt2()
        return self._tokenizer

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool = True,
        padding_side: Literal["right", "left"] | None = None,
        return_attention_mask: bool = False,
    ) -> Int[Tensor, "batch pos"] | tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
        """Token ids ``[batch, pos]``, with ``<|endoftext|>`` first as TransformerLens does.

        Strings of different lengths are padded with the tokenizer's pad token on
        ``padding_side`` (default ``model.padding_side``, ``"right"``);
        ``return_attention_mask=True`` also gives the mask, ``True`` at real tokens, to pass
        as ``attention_mask=`` wherever tokens go. A list of strings given straight to
        ``model(...)`` gets its mask without asking.

        >>> tokens, mask = model.to_tokens(["Hi", "Hello there"], padding_side="left",
        ...                                return_attention_mask=True)
        """
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("to_tokens takes a string or a non-empty list of strings")
        side = padding_side or self.padding_side
        if side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', not {side!r}")
        tok = self.tokenizer
        encoded = [tok.encode(t) for t in texts]
        if not all(encoded):
            raise ValueError("an input string is empty: give at least one token of text")
        rows = [([tok.bos_token_id] if prepend_bos else []) + ids for ids in encoded]
        width = max(map(len, rows))
        pads = [[tok.pad_token_id] * (width - len(r)) for r in rows]
        real = [[True] * len(r) for r in rows]
        if side == "right":
            ids = [r + p for r, p in zip(rows, pads, strict=True)]
            mask = [m + [False] * len(p) for m, p in zip(real, pads, strict=True)]
        else:
            ids = [p + r for r, p in zip(rows, pads, strict=True)]
            mask = [[False] * len(p) + m for m, p in zip(real, pads, strict=True)]
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        if not return_attention_mask:
            return tokens
        return tokens, torch.tensor(mask, dtype=torch.bool, device=self.device)

    def prepare(
        self,
        input: Input,
        attention_mask: Tensor | None = None,
        padding_side: Literal["right", "left"] | None = None,
    ) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"] | None]:
        """Checked token ids on the model's device and their attention mask (``None`` when
        every token is real). Strings are tokenized, padded and masked here."""
        if isinstance(input, (str, list)):
            if attention_mask is not None:
                raise ValueError(
                    "attention_mask goes with token ids; strings get theirs from to_tokens"
                )
            tokens, mask = self.to_tokens(
                input, padding_side=padding_side, return_attention_mask=True
            )
        else:
            tokens, mask = self.tokens(input), attention_mask
        return tokens, self.check_mask(mask, tokens.shape)

    def check_mask(
        self, mask: Tensor | None, shape: tuple[int, ...]
    ) -> Bool[Tensor, "batch pos"] | None:
        """An attention mask as bools on the model's device, or ``None`` if nothing is masked."""
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            raise TypeError(f"attention_mask must be a tensor, not {type(mask).__name__}")
        mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)} but the tokens {tuple(shape)}: "
                "one entry per token, 1 (or True) at real tokens and 0 at padding"
            )
        if mask.dtype != torch.bool:
            if mask.dtype.is_floating_point or not ((mask == 0) | (mask == 1)).all():
                raise ValueError("attention_mask holds 0/1 (or bools): 1 at real tokens")
            mask = mask.bool()
        if not mask.any(1).all():
            raise ValueError("a row of attention_mask is all padding: give each row a real token")
        mask = mask.to(self.device)
        return None if bool(mask.all()) else mask

    def tokens(self, input: Input) -> Int[Tensor, "batch pos"]:
        """The input as checked token ids on the model's device (strings get BOS)."""
        if isinstance(input, (str, list)) and all(isinstance(t, str) for t in input):
            return self.to_tokens(input)
        if not isinstance(input, Tensor):
            raise TypeError(
                f"input must be a string, a list of strings or a tensor of token ids, not {type(input).__name__}"
            )
        if input.dtype.is_floating_point or input.dtype.is_complex or input.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, got a tensor of {input.dtype}")
        tokens = input.unsqueeze(0) if input.dim() == 1 else input
        if tokens.dim() != 2:
            raise ValueError(
                f"token ids must be [batch, pos] or [pos], got shape {tuple(input.shape)}"
            )
        if tokens.numel() == 0:
            raise ValueError(
                f"the input is empty (shape {tuple(input.shape)}): give at least one token"
            )
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(
                f"{tokens.shape[1]} positions is more than the context of {self.cfg.n_ctx}: "
                f"keep the last {self.cfg.n_ctx} with tokens[:, -{self.cfg.n_ctx}:]"
            )
        lo, hi = (int(t) for t in tokens.aminmax())
        if lo < 0 or hi >= self.cfg.d_vocab:
            bad = tokens[(tokens < 0) | (tokens >= self.cfg.d_vocab)].unique()[:5].tolist()
            raise ValueError(
                f"token ids {bad} are outside the vocabulary [0, {self.cfg.d_vocab}): "
                "were they made by another tokenizer?"
            )
        return tokens.to(self.device, torch.long)

    def to_str_tokens(
        self, input: str | list[str] | Tensor | list[int], prepend_bos: bool = True
    ) -> list[str] | list[list[str]]:
        """One string per token of a single sequence (a list of strings gives a list each)."""
        if isinstance(input, list) and input and all(isinstance(t, str) for t in input):
            return [self.to_str_tokens(t, prepend_bos) for t in input]
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos)
        ids = torch.as_tensor(input).flatten().tolist() if not isinstance(input, list) else input
        if isinstance(input, Tensor) and input.dim() == 2 and input.shape[0] != 1:
            raise ValueError("to_str_tokens takes one sequence; index the batch first")
        return self.tokenizer.decode_each(ids)

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        """Decode ids: ``[pos]`` gives a string, ``[batch, pos]`` a list of strings."""
        t = torch.as_tensor(tokens)
        if t.dim() == 2:
            return [self.tokenizer.decode(row) for row in t.tolist()]
        return self.tokenizer.decode(t.flatten().tolist())

    def to_single_token(self, text: str) -> int:
        """The id of a string that is exactly one token, e.g. ``" Paris"``."""
        ids = self.tokenizer.encode(text)
        if len(ids) != 1:
            raise ValueError(
                f"{text!r} is {len(ids)} tokens, not one: {self.tokenizer.decode_each(ids)}"
            )
        return ids[0]

    # ---- generation ------------------------------------------------------------------

    def generate(self, input: Input, max_new_tokens: int = 20, **kwargs) -> str | Tensor:
        """Continue the input with a KV cache; see ``resid.core.generation.generate``."""
        return generate(self, input, max_new_tokens, **kwargs)

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"Model(n_layers={c.n_layers}, n_heads={c.n_heads}, d_model={c.d_model}, "
            f"d_mlp={c.d_mlp}, d_vocab={c.d_vocab}, n_ctx={c.n_ctx}, dtype={self.dtype}, device={self.device})"
        )


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
