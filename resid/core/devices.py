"""Placing a model's blocks on several devices: consecutive blocks per device, the
residual stream moved at each boundary (as TransformerLens' ``n_devices`` and
``transformers``' ``device_map`` do).

The embedding, ``ln_final`` and the unembedding stay on the first device (with tied
embeddings they are one matrix), so tokens go in and logits come out where
``model.device`` says; block ``l`` runs on ``model.layer_devices[l]``, and what a hook
or a cache sees of it lives there. :func:`plan_devices` is the placement itself, a pure
function of the layer count, the devices and their free memory.

>>> plan_devices(4, ["cuda:0", "cuda:1"])                               # 2 blocks each
[device(type='cuda', index=0), device(type='cuda', index=0), device(type='cuda', index=1), device(type='cuda', index=1)]
>>> plan_devices(4, ["cuda:0", "cuda:1"], free_memory=[1e9, 3e9])      # 1 and 3
>>> model.to_devices("auto")       # or resid.load(path, device_map={"blocks.0-11": "cuda:0", ...})
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

DeviceMap = str | Mapping[str, str | torch.device] | Sequence[str | torch.device]
_RANGE = re.compile(r"blocks\.(\d+)(?:-(\d+))?")


def plan_devices(
    n_layers: int,
    devices: Sequence[str | torch.device],
    free_memory: Sequence[float] | None = None,
    layer_bytes: float | None = None,
) -> list[torch.device]:
    """The device of each of ``n_layers`` blocks: consecutive blocks per device, in the
    order given. Without ``free_memory`` the blocks are shared as evenly as they go (the
    first devices take one more when they do not divide); with it (bytes free on each
    device), in proportion to it, and with ``layer_bytes`` (one block's size) no device gets
    more blocks than fit in its free memory.

    >>> plan_devices(5, ["cuda:0", "cuda:1"])                  # 3 on cuda:0, 2 on cuda:1
    >>> plan_devices(4, ["cuda:0", "cuda:1"], [8e9, 2e9], layer_bytes=2e9)   # 3 and 1
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, not {n_layers!r}")
    devs = [torch.device(d) for d in devices]
    if not devs:
        raise ValueError("give at least one device")
    if free_memory is None:
        share = [1.0] * len(devs)
    else:
        share = [float(f) for f in free_memory]
        if len(share) != len(devs) or any(not f >= 0 or f == float("inf") for f in share):
            raise ValueError(
                f"free_memory must be one finite number >= 0 per device ({len(devs)}), "
                f"not {list(free_memory)!r}"
            )
        if sum(share) <= 0:
            raise ValueError(f"no free memory on {[str(d) for d in devs]}")
    counts = _proportional(n_layers, share)
    if layer_bytes is not None and free_memory is not None:
        if not layer_bytes > 0:
            raise ValueError(f"layer_bytes must be > 0, not {layer_bytes!r}")
        cap = [int(f // layer_bytes) for f in share]
        if sum(cap) < n_layers:
            raise ValueError(
                f"{n_layers} blocks of {layer_bytes / 2**20:.0f} MiB do not fit in the free "
                f"memory of {[str(d) for d in devs]} ({[round(f / 2**20) for f in share]} MiB; "
                f"room for {sum(cap)}): add devices or load in a smaller dtype"
            )
        excess = 0
        for i, c in enumerate(counts):  # what a device cannot hold goes to those with room
            excess += max(0, c - cap[i])
            counts[i] = min(c, cap[i])
        for i in range(len(counts)):
            more = min(excess, cap[i] - counts[i])
            counts[i] += more
            excess -= more
    return [d for d, c in zip(devs, counts, strict=True) for _ in range(c)]


def _proportional(n: int, share: list[float]) -> list[int]:
    """``n`` split in proportion to ``share`` (largest remainders; ties to the first)."""
    total = sum(share)
    exact = [n * s / total for s in share]
    counts = [int(e) for e in exact]
    order = sorted(range(len(share)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def parse_device_map(spec: Mapping[str, str | torch.device], n_layers: int) -> list[torch.device]:
    """The device of each block from ``{"blocks.0-11": "cuda:0", "blocks.12-23": "cuda:1"}``
    (ranges inclusive; ``"blocks.5"`` is one block); every block exactly once.

    >>> parse_device_map({"blocks.0-1": "cpu", "blocks.2": "cuda:0"}, 3)
    """
    out: list[torch.device | None] = [None] * n_layers
    for key, device in spec.items():
        m = _RANGE.fullmatch(str(key))
        if m is None:
            raise ValueError(
                f"device_map key {key!r}: write blocks as 'blocks.A-B' (inclusive) or 'blocks.A'"
            )
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if not lo <= hi < n_layers:
            raise ValueError(f"device_map key {key!r}: the model has blocks 0..{n_layers - 1}")
        for layer in range(lo, hi + 1):
            if out[layer] is not None:
                raise ValueError(f"device_map places block {layer} twice ({key!r})")
            out[layer] = torch.device(device)
    missing = [i for i, d in enumerate(out) if d is None]
    if missing:
        raise ValueError(f"device_map leaves blocks {missing} without a device: place every block")
    return out  # type: ignore[return-value]


def resolve(
    device_map: DeviceMap | None,
    n_layers: int,
    n_devices: int | None = None,
    layer_bytes: float | None = None,
    first_bytes: float = 0,
) -> list[torch.device]:
    """The device of each block for ``device_map`` (``"auto"``: every CUDA device, by free
    memory less ``first_bytes`` on the first (the embedding and unembedding), at most as
    many blocks of ``layer_bytes`` as fit, else the CPU; a dict of block ranges; a list of
    devices to share the blocks evenly) or ``n_devices`` (``cuda:0..n-1``, evenly, as
    TransformerLens does).

    >>> resolve("auto", 12)                       # [cpu] * 12 without CUDA
    """
    if n_devices is not None:
        if device_map is not None:
            raise ValueError("give device_map or n_devices, not both")
        if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
            raise ValueError(f"n_devices must be a positive int, not {n_devices!r}")
        if n_devices > torch.cuda.device_count():
            raise ValueError(
                f"n_devices={n_devices} but {torch.cuda.device_count()} CUDA devices are visible"
            )
        return plan_devices(n_layers, [f"cuda:{i}" for i in range(n_devices)])
    if device_map == "auto":
        n = torch.cuda.device_count()
        if n == 0:
            return [torch.device("cpu")] * n_layers
        devs = [torch.device("cuda", i) for i in range(n)]
        free = [float(torch.cuda.mem_get_info(d)[0]) for d in devs]
        free[0] = max(0.0, free[0] - first_bytes)
        return plan_devices(n_layers, devs, free, layer_bytes)
    if isinstance(device_map, Mapping):
        return parse_device_map(device_map, n_layers)
    if isinstance(device_map, (list, tuple)):
        return plan_devices(n_layers, device_map)
    raise ValueError(
        f"device_map must be 'auto', a dict like {{'blocks.0-5': 'cuda:0', 'blocks.6-11': "
        f"'cuda:1'}} or a list of devices, not {device_map!r}"
    )


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (a block's device)."""
    return next(module.parameters()).device


def place(model: nn.Module, layer_devices: Sequence[torch.device]) -> None:
    """Move block ``l`` of ``model`` to ``layer_devices[l]`` and everything else (embedding,
    ``ln_final``, unembedding) to the first block's device; record the plan as
    ``model.layer_devices``."""
    devs = [torch.device(d) for d in layer_devices]
    if len(devs) != len(model.blocks):
        raise ValueError(f"{len(devs)} devices for {len(model.blocks)} blocks")
    first = devs[0]
    for name, child in model.named_children():
        if name != "blocks":
            child.to(first)
    for p in model.parameters(recurse=False):
        p.data = p.data.to(first)
    for block, device in zip(model.blocks, devs, strict=True):
        block.to(device)
    model.layer_devices = tuple(devs)
