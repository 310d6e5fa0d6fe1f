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

import math
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from resid.core import devices, inputs
from resid.core.config import Config
from resid.core.generation import generate
from resid.core.hooked import Hooked
from resid.core.hooks import HookPoint
from resid.core.inputs import Input, Inputs
from resid.core.kv_cache import KVCache
from resid.core.layers import Block, KVStore, norm
from resid.core.mask import Mask
from resid.core.tokenizer import Tokenizer
from resid.core.weights import WeightViews


class Model(Hooked, WeightViews, nn.Module):
    """A GPT-2 with hook points at every site.

    Its parts, one idea each: the forward pass and tokens here; hooks, caching and
    splicing in :class:`~resid.core.hooked.Hooked`; stacked weights, heads, neurons and
    circuits in :class:`~resid.core.weights.WeightViews`; tokenizing and checking inputs
    in ``resid.core.inputs``.

    >>> model = resid.load("gpt2")
    >>> logits = model("The Eiffel Tower is in")   # [1, 7, 50257]: one row per prefix
    >>> logits, cache = model.run_with_cache("Hello", names_filter=lambda n: "resid" in n)
    """

    padding_side: Literal["right", "left"] = "right"
    #: each block's device when placed on several (``to_devices``), else None
    layer_devices: tuple[torch.device, ...] | None = None

    def __init__(self, cfg: Config | None = None, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.cfg = cfg = cfg or Config()
        self._tokenizer = tokenizer
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.hook_tokens = HookPoint()  # [batch, pos]: the token ids (a hook may swap them)
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
        self._hook_points: dict[str, HookPoint] = {}  # hook_dict adds spliced SAEs' points
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self._hook_points[name] = module
        if self.W_E.device.type != "meta":
            self.init_weights()

    def init_weights(self, std: float = 0.02, residual_scale: bool = True) -> None:
        """GPT-2's initialisation: normal(0, std) matrices, zero biases, unit norm gains,
        and the matrices that write to the residual stream (each head's ``W_O``, each
        MLP's ``W_out``) scaled down to ``std / sqrt(2 * n_layers)``, as GPT-2 does, so the
        stream's variance does not grow with depth (``residual_scale=False``: std for them
        too, as resid drew every matrix before).

        >>> Model(Config(n_layers=12)).blocks[0].attn.W_O.std()     # about 0.02 / sqrt(24)
        """
        writes = std / math.sqrt(2 * self.cfg.n_layers) if residual_scale else std
        for name, p in self.named_parameters():
            if name.endswith(("W_O", "W_out")):
                nn.init.normal_(p, std=writes)
            elif name.endswith(("W_E", "W_pos", "W_QKV", "W_in", "W_gate", "lm_head")):
                nn.init.normal_(p, std=std)
            elif name.endswith(".w"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    # ---- the forward pass ------------------------------------------------------------

    def forward(
        self,
        input: Input | Inputs,
        return_type: Literal["logits", "loss"] | None = "logits",
        *,
        attention_mask: Tensor | None = None,
        padding_side: Literal["right", "left"] | None = None,
        prepend_bos: bool | None = None,
        past_kv_cache: KVCache | None = None,
        loss_per_token: bool = False,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        tokens: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"] | Tensor | None:
        """Logits for every prefix of the input: row ``i`` predicts token ``i + 1``.

        ``input`` is a string, a list of strings (padded on ``padding_side`` and masked, BOS
        prepended), token ids ``[batch, pos]`` / ``[pos]`` with an optional
        ``attention_mask`` (1 at real tokens), or :class:`~resid.core.inputs.Inputs` from
        ``model.prepare`` (checked once already, so not checked again). Padding is never
        attended to, and left padding shifts each row's positions so that its first real
        token is position 0. Logits at padding positions are computed but mean nothing.

        ``return_type="loss"`` gives the mean next-token loss over real tokens
        (``loss_per_token=True``: ``[batch, pos - 1]``, 0 where the target is padding).
        With ``past_kv_cache`` the input is the next positions after those in the cache,
        which is extended with them. As in TransformerLens, ``start_at_layer=l`` takes
        ``input`` to be the residual stream entering block ``l``, and ``stop_at_layer=l``
        returns the residual stream entering block ``l``; started at a layer, the loss needs
        the run's ``tokens=`` (its targets). ``return_type=None`` runs everything
        (``ln_final`` included) for the hooks and returns ``None``. ``prepend_bos`` and
        ``padding_side`` say how strings are tokenized (``to_tokens``'s defaults).

        >>> model(["Hi", "Hello there"], return_type="loss")     # padding excluded
        """
        if return_type not in ("logits", "loss", None):
            raise ValueError(f"return_type must be 'logits', 'loss' or None, not {return_type!r}")
        if stop_at_layer is not None and return_type == "loss":
            raise ValueError(
                "stop_at_layer returns the residual stream entering that layer, not a loss: "
                "drop return_type='loss', or compute the loss from a full forward"
            )
        if start_at_layer is None:
            if tokens is not None:
                raise ValueError("tokens= goes with start_at_layer; otherwise pass them as input")
            tokens, mask = self.prepare(input, attention_mask, padding_side, prepend_bos)
            shape = tokens.shape
        else:
            shape = input.shape[:2]
            mask = self.check_mask(attention_mask, shape)
            if return_type == "loss":
                if tokens is None:
                    raise ValueError(
                        "return_type='loss' from start_at_layer needs tokens: pass "
                        "tokens=[batch, pos], the run's targets (whose stream you start from)"
                    )
                tokens = self.tokens(tokens)
                if tuple(tokens.shape) != tuple(shape):
                    raise ValueError(
                        f"tokens= has shape {tuple(tokens.shape)}, the stream {tuple(shape)} "
                        "(batch, pos): give the tokens of the same run"
                    )
            else:
                tokens = None
        if past_kv_cache is not None:
            past_kv_cache.check(self, shape[0], start_at_layer, stop_at_layer)
        full = mask if past_kv_cache is None else past_kv_cache.keys_mask(mask, shape)
        offset = 0 if past_kv_cache is None else past_kv_cache.length
        if offset + shape[1] > self.cfg.n_ctx:
            raise ValueError(
                f"{offset + shape[1]} positions is more than the context of {self.cfg.n_ctx}"
            )
        attn_mask = Mask(offset, full, memo={})  # derived once for every block
        if start_at_layer is None:
            if self.hook_tokens.active:  # a copy: a hook never edits the caller's tensor
                tokens = self.hook_tokens(tokens.clone())
            resid = self.embed(tokens, attn_mask.positions(shape[1], self.device))
        else:
            resid = input
        run = (resid, attn_mask, tokens, mask, return_type, loss_per_token)
        layers = (start_at_layer, stop_at_layer)
        if past_kv_cache is None:
            return self._run([None] * self.cfg.n_layers, *run, *layers)
        with past_kv_cache.extending(self, full, shape):  # all or nothing, even on Ctrl-C
            return self._run(past_kv_cache.layers, *run, *layers)

    def _run(
        self,
        kvs: list[KVStore] | list[None],
        resid: Float[Tensor, "batch pos d_model"],
        attn_mask: Mask,
        tokens: Int[Tensor, "batch pos"] | None,
        mask: Bool[Tensor, "batch pos"] | None,
        return_type: Literal["logits", "loss"] | None,
        loss_per_token: bool,
        start_at_layer: int | None,
        stop_at_layer: int | None,
    ) -> Tensor | None:
        """The blocks from ``start_at_layer`` to ``stop_at_layer``, then (unless stopped)
        the unembedding and the loss, as ``forward`` asks."""
        for layer in range(self.cfg.n_layers)[start_at_layer:stop_at_layer]:
            block = self.blocks[layer]
            if self.layer_devices is not None:  # placed on several devices: move the stream
                resid = resid.to(devices.module_device(block))
            resid = block(resid, attn_mask, kvs[layer])
        if stop_at_layer is not None:
            return resid
        if self.layer_devices is not None:
            resid = resid.to(self.device)
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
        prepend_bos: bool | None = None,
        padding_side: Literal["right", "left"] | None = None,
        return_attention_mask: bool = False,
        truncate: bool = False,
    ) -> Int[Tensor, "batch pos"] | tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
        """Token ids ``[batch, pos]``, with ``<|endoftext|>`` first as TransformerLens does
        (``prepend_bos=None``: BOS first if the tokenizer's ``add_bos_token`` says so, as it
        does for GPT-2; a GGUF file says for itself: SmolLM2's does not).

        Strings of different lengths are padded with the tokenizer's pad token on
        ``padding_side`` (default ``model.padding_side``, ``"right"``);
        ``return_attention_mask=True`` also gives the mask, ``True`` at real tokens, to pass
        as ``attention_mask=`` wherever tokens go. A list of strings given straight to
        ``model(...)`` gets its mask without asking. ``truncate=True`` keeps the first
        ``n_ctx`` positions (TransformerLens truncates by default; resid refuses an input
        past the context unless asked). See ``resid.core.inputs.to_tokens``.

        >>> tokens, mask = model.to_tokens(["Hi", "Hello there"], padding_side="left",
        ...                                return_attention_mask=True)
        """
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("to_tokens takes a string or a non-empty list of strings")
        side = padding_side or self.padding_side
        if side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', not {side!r}")
        out = inputs.to_tokens(
            self.tokenizer,
            texts,
            device=self.device,
            prepend_bos=prepend_bos,
            padding_side=side,
            return_attention_mask=return_attention_mask,
        )
        if not truncate:
            return out
        if return_attention_mask:
            return out[0][:, : self.cfg.n_ctx], out[1][:, : self.cfg.n_ctx]
        return out[:, : self.cfg.n_ctx]

    def prepare(
        self,
        input: Input | Inputs,
        attention_mask: Tensor | None = None,
        padding_side: Literal["right", "left"] | None = None,
        prepend_bos: bool | None = None,
    ) -> Inputs:
        """Checked token ids on the model's device and their attention mask (``None`` when
        every token is real), as :class:`~resid.core.inputs.Inputs` (a ``(tokens, mask)``
        pair) that ``model(...)`` and ``run_with_cache`` take without checking again.
        Strings are tokenized, padded and masked here.

        >>> tokens, mask = model.prepare(["Hi", "Hello there"])
        """
        return inputs.prepare(self, input, attention_mask, padding_side, prepend_bos)

    def check_mask(
        self, mask: Tensor | None, shape: tuple[int, ...]
    ) -> Bool[Tensor, "batch pos"] | None:
        """An attention mask as bools on the model's device, or ``None`` if nothing is masked."""
        return inputs.check_mask(mask, shape, self.device)

    def tokens(self, input: Input | Inputs) -> Int[Tensor, "batch pos"]:
        """The input as checked token ids on the model's device (strings get BOS)."""
        return inputs.check_tokens(self, input)

    def to_str_tokens(
        self, input: str | list[str] | Tensor | list[int], prepend_bos: bool | None = None
    ) -> list[str] | list[list[str]]:
        """One string per token of a single sequence (a list of strings gives a list each).

        >>> model.to_str_tokens("Hello world")
        ['<|endoftext|>', 'Hello', ' world']
        """
        if isinstance(input, list) and input and all(isinstance(t, str) for t in input):
            return [self.to_str_tokens(t, prepend_bos) for t in input]
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos)
        return inputs.to_str_tokens(self.tokenizer, input)

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        """Decode ids: ``[pos]`` gives a string, ``[batch, pos]`` a list of strings."""
        return inputs.to_string(self.tokenizer, tokens)

    def to_single_token(self, text: str) -> int:
        """The id of a string that is exactly one token, e.g. ``" Paris"``."""
        return inputs.to_single_token(self.tokenizer, text)

    def to_single_str_token(self, token: int | Tensor) -> str:
        """The text of one token id, e.g. ``model.to_single_str_token(50256)``."""
        return inputs.to_single_str_token(self.tokenizer, token)

    def get_token_position(
        self,
        single_token: str | int | Tensor,
        input: str | Tensor,
        mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
        padding_side: Literal["right", "left"] | None = None,
        attention_mask: Tensor | None = None,
    ) -> int | Int[Tensor, " batch"]:
        """Where a token first or last occurs in the input (one position per row of a
        padded batch); see ``resid.core.inputs.get_token_position``.

        >>> model.get_token_position(" John", "When Mary and John went to the store, John", mode="last")
        """
        return inputs.get_token_position(
            self, single_token, input, mode, prepend_bos, padding_side, attention_mask
        )

    # ---- devices ---------------------------------------------------------------------

    def to_devices(
        self, device_map: devices.DeviceMap | None = None, n_devices: int | None = None
    ) -> Model:
        """Place consecutive blocks on several devices (in place; returns the model):
        ``"auto"`` shares them among the CUDA devices by free memory, a dict names each
        range (``{"blocks.0-11": "cuda:0", "blocks.12-23": "cuda:1"}``), a list of devices
        shares them evenly, ``n_devices=k`` uses ``cuda:0..k-1`` (TransformerLens'); neither
        is ``"auto"``. The
        embedding and unembedding stay on the first device; the stream moves at each
        boundary; hooks and caches see each block's activations on its device.

        >>> model.to_devices({"blocks.0-5": "cuda:0", "blocks.6-11": "cuda:1"})
        """
        if device_map is None and n_devices is None:
            device_map = "auto"
        size = {n: p.numel() * p.element_size() for n, p in self.named_parameters()}
        per_block = sum(v for n, v in size.items() if n.startswith("blocks.0."))
        outside = sum(v for n, v in size.items() if not n.startswith("blocks."))
        plan = devices.resolve(device_map, self.cfg.n_layers, n_devices, per_block, outside)
        devices.place(self, plan)
        return self

    def _apply(self, fn, recurse: bool = True):
        # ``to``, ``cuda``, ``half``, ...: a model placed on several devices that now sits on
        # one is a one-device model again; on several, its plan is where the blocks now are
        out = super()._apply(fn, recurse)
        if self.layer_devices is not None:
            now = tuple(devices.module_device(block) for block in self.blocks)
            self.layer_devices = None if set(now) == {self.device} else now
        return out

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
