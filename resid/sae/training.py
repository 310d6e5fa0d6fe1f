"""Training SAEs and transcoders, on one process or many (torchrun, DistributedDataParallel).

The data is a *source* of ``n`` streams (:class:`Source`; a harvest's shards:
``resid.harvest.streams.HarvestStreams``; rows in memory: :class:`TensorStreams`). A global
batch of ``B`` rows is ``B / n`` rows of each stream, so it does not depend on the number
of processes: rank ``r`` of ``world`` reads streams ``r * n / world ... (r + 1) * n / world``
only. Each rank's loss is its rows' summed loss divided by ``B / world`` and
DistributedDataParallel averages the gradients over the ranks, so every rank steps with
the gradient of the global batch's mean loss, as one process would. Two ranks and one
differ only in the order floats are added (a sum of two half-batches against one sum over
the batch, and the gradient all-reduce): about 1e-7 relative per step.

Architectures (``TrainConfig.architecture``):

- ``standard``: ReLU, loss ``‖x - x̂‖² + λ Σ_i a_i ‖W_dec[i]‖`` (the L1 penalty weighted by
  decoder norms, so shrinking ``W_dec`` cannot dodge it), λ ramped up over the warm-up;
- ``topk``: the ``k`` largest pre-activations, loss ``‖x - x̂‖²``;
- ``jumprelu``: ``a = relu(z) · H(z - θ)``, loss ``‖x - x̂‖² + λ Σ_i H(z_i - θ_i)`` (the L0),
  ``θ = exp(log θ)`` learnt through straight-through estimators with a rectangle kernel
  of width ``bandwidth`` (Rajamanoharan et al. 2024, as SAELens trains it).

A transcoder (``resid.sae.transcoder``) trains the same way on (input, output) pairs:
``‖y - decode(encode(x), x)‖²`` plus the same penalty.

The checkpoint is one folder, written whole by rank 0 through
:func:`resid.core.files.replace_folder` (so a kill leaves the previous one or the new one):
``sae/`` (``cfg.json`` + ``sae_weights.safetensors``, SAELens' format: ``resid.sae.load``
or ``resid.sae.load_transcoders`` read it), ``state.safetensors`` (parameters, Adam's
moments, the dead-feature counters) and ``training.json`` (the step, the configuration,
the data's identity). ``resume=True`` continues from it. Nothing draws from torch's global
generator: the data's shuffles come from generators seeded by (seed, stream, epoch,
buffer) and the learning rate is a function of the step, so the step is the whole data
position and the resumed run equals the uninterrupted one bit for bit.

>>> data = TensorStreams(acts, streams=2, seed=0)                  # acts: [n, d_in]
>>> cfg = TrainConfig(architecture="topk", d_sae=512, k=8, steps=2000, batch_size=1024)
>>> sae = train(data, cfg, "runs/sae", hook_name="blocks.1.hook_resid_pre")
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from resid.core.distributed import barrier, broadcast, collective_failure, gather
from resid.core.rows import joined
from resid.core.seeds import generator
from resid.sae import training_files as checkpoint
from resid.sae.config import SAEConfig
from resid.sae.module import SAE
from resid.sae.transcoder import Transcoder, TranscoderConfig

ARCHITECTURES = ("standard", "topk", "jumprelu")
MAX_STEPS = 1 << 40


class TrainingError(RuntimeError):
    """Training that cannot start, resume or go on (a lost rank, a changed setting); the
    message names the problem and the fix."""


class Source(Protocol):
    """Training data: ``streams`` endless streams of rows at one or more sites."""

    streams: int
    widths: tuple[int, ...]

    def batches(self, streams: range, rows: int, start: int) -> Iterator[tuple[Tensor, ...]]:
        """Batches of ``rows`` rows from each of ``streams``, joined, from step ``start``."""
        ...

    def mean(self) -> tuple[Tensor, ...]:
        """Each site's mean row."""
        ...

    def identity(self) -> dict:
        """What a resumed run must find again (JSON-able)."""
        ...


class TensorStreams:
    """Rows held in memory (``[n, width]`` tensors, the same rows of each) as ``streams``
    endless streams: stream ``s`` holds rows ``s, s + n, ...`` and shuffles them anew each
    epoch with a generator seeded by ``(seed, stream, epoch)``.

    >>> data = TensorStreams(acts, streams=2)                    # an SAE's
    >>> data = TensorStreams((x_in, y_out), streams=2)           # a transcoder's pairs
    """

    def __init__(self, data: Tensor | tuple[Tensor, ...], streams: int = 1, seed: int = 0):
        data = (data,) if isinstance(data, Tensor) else tuple(data)
        if not data or any(t.dim() != 2 or len(t) != len(data[0]) for t in data):
            raise ValueError("TensorStreams takes [n, width] tensors with the same n")
        if not isinstance(streams, int) or not 1 <= streams <= len(data[0]):
            raise ValueError(f"streams must be an int in [1, {len(data[0])}], not {streams!r}")
        self.data, self.streams, self.seed = data, streams, seed
        self.widths = tuple(int(t.shape[1]) for t in data)

    def mean(self) -> tuple[Tensor, ...]:
        return tuple(t.double().mean(0).float() for t in self.data)

    def identity(self) -> dict:
        return {"rows": len(self.data[0]), "widths": list(self.widths)}

    def _stream(self, s: int, rows: int, start: int) -> Iterator[tuple[Tensor, ...]]:
        mine = tuple(t[s :: self.streams] for t in self.data)
        n = len(mine[0])
        epoch, at = divmod(start * rows, n)
        order = torch.randperm(n, generator=generator(self.seed, s, epoch))
        while True:
            take = []
            while sum(len(t) for t in take) < rows:
                if at == n:
                    epoch, at = epoch + 1, 0
                    order = torch.randperm(n, generator=generator(self.seed, s, epoch))
                want = rows - sum(len(t) for t in take)
                take.append(order[at : at + want])
                at += len(take[-1])
            index = torch.cat(take)
            yield tuple(t[index] for t in mine)

    def batches(self, streams: range, rows: int, start: int) -> Iterator[tuple[Tensor, ...]]:
        return joined([self._stream(s, rows, start) for s in streams], len(self.widths))


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the dictionary's architecture and width, the sparsity coefficient
    (``l1``: the L1 of ``standard``, the L0 of ``jumprelu``), Adam's learning rate with a
    linear warm-up over ``warmup`` steps and a linear decay over the last fifth, the global
    ``batch_size`` (rows per step, over all ranks) split into ``streams`` streams, the seed,
    and how often to checkpoint (``checkpoint_every`` steps) and to report (``log_every``).
    A feature is dead when it has not fired for ``dead_after`` steps.

    >>> TrainConfig(architecture="jumprelu", d_sae=4096, l1=1e-3, steps=10_000)
    """

    architecture: str = "topk"
    d_sae: int = 512
    k: int = 8
    l1: float = 0.3
    lr: float = 2e-3
    steps: int = 2000
    batch_size: int = 1024
    streams: int = 1
    seed: int = 0
    warmup: int = 100
    bandwidth: float = 1e-3
    init_threshold: float = 1e-3
    checkpoint_every: int = 500
    log_every: int = 10
    dead_after: int = 1000

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; resid trains {', '.join(ARCHITECTURES)}"
            )
        for name, low, high in (
            ("d_sae", 1, 1 << 24),
            ("k", 1, 1 << 24),
            ("steps", 1, MAX_STEPS),
            ("batch_size", 1, 1 << 30),
            ("streams", 1, 1 << 16),
            ("seed", 0, 1 << 62),
            ("warmup", 0, MAX_STEPS),
            ("checkpoint_every", 1, MAX_STEPS),
            ("log_every", 1, MAX_STEPS),
            ("dead_after", 1, MAX_STEPS),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], not {value!r}")
        for name in ("l1", "lr", "bandwidth", "init_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        if self.architecture == "topk" and self.k > self.d_sae:
            raise ValueError(f"k={self.k} is more than d_sae={self.d_sae}")
        if self.batch_size % self.streams:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of streams {self.streams}: every "
                "stream gives batch_size / streams rows to each step"
            )

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict (``TrainConfig(**d)`` reads it back)."""
        return asdict(self)

    def lr_at(self, step: int) -> float:
        """The learning rate at ``step``: warm-up, flat, then a linear decay to zero over the
        last fifth (a function of the step only, so a resumed run needs no scheduler state)."""
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        return self.lr * min(warm, (self.steps - step) / max(1.0, self.steps / 5))


# -- the JumpReLU's straight-through estimators (pseudo-derivatives w.r.t. the threshold) --


def _rectangle(z: Tensor) -> Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        dz = (z > theta).to(z.dtype) * grad
        dtheta = -(theta / eps) * _rectangle((z - theta) / eps) * grad
        return dz, dtheta.reshape(-1, theta.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        dtheta = -(1.0 / eps) * _rectangle((z - theta) / eps) * grad
        return torch.zeros_like(z), dtheta.reshape(-1, theta.shape[-1]).sum(0), None


class Objective(nn.Module):
    """A dictionary (an :class:`SAE` or a :class:`Transcoder`) and its training loss.
    ``forward(x, y, scale, penalty)`` returns (``scale`` × the summed loss of the rows,
    [summed squared error, summed L0, rows], which features fired); ``y`` is the target
    (``x`` for an SAE). A JumpReLU's threshold is learnt as ``log_threshold``.

    >>> objective = Objective(sae, cfg)
    >>> loss, sums, fired = objective(x, x, 1 / len(x), cfg.l1)
    """

    def __init__(self, dictionary: SAE | Transcoder, cfg: TrainConfig):
        super().__init__()
        self.dictionary, self.cfg = dictionary, cfg
        if cfg.architecture == "jumprelu":
            with torch.no_grad():
                start = dictionary.threshold.clamp_min(1e-12).log()
            self.log_threshold = nn.Parameter(start.clone())
            dictionary.threshold.requires_grad_(False)  # written from log_threshold

    def sync(self) -> None:
        """Write the learnt threshold into the dictionary (before saving it)."""
        if self.cfg.architecture == "jumprelu":
            with torch.no_grad():
                self.dictionary.threshold.copy_(self.log_threshold.exp())

    def forward(
        self, x: Tensor, y: Tensor, scale: float, penalty: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        d, arch = self.dictionary, self.cfg.architecture
        if isinstance(d, SAE):
            pre, acts, stats = d._encode(x)
        else:
            (pre, acts), stats = d._encode(x), None
        if arch == "jumprelu":
            theta = self.log_threshold.exp()
            acts = _JumpReLU.apply(torch.relu(pre), theta, self.cfg.bandwidth)
        if isinstance(d, SAE):
            recons = d._decode(acts, stats)
        else:
            recons = d.decode(acts, x)
        sq = (recons - y).pow(2).sum(-1)
        loss = sq.sum()
        if arch == "standard" and penalty:
            loss = loss + penalty * (acts * d.W_dec.norm(dim=-1)).sum()
        elif arch == "jumprelu" and penalty:
            loss = loss + penalty * _Step.apply(pre, theta, self.cfg.bandwidth).sum()
        active = acts > 0
        sums = torch.stack([sq.sum(), active.sum().to(sq.dtype), sq.new_tensor(float(len(x)))])
        return loss * scale, sums.detach(), active.any(0)


def build(
    cfg: TrainConfig,
    widths: tuple[int, ...],
    means: tuple[Tensor, ...],
    hook_name: str,
    hook_name_out: str | None = None,
    skip: bool = False,
) -> SAE | Transcoder:
    """A fresh dictionary: decoder rows of norm 0.1 in seeded random directions, the encoder
    their transpose, the decoder bias at the mean of what it reconstructs, zero encoder bias,
    a JumpReLU's threshold at ``cfg.init_threshold``. The same on every rank.

    >>> sae = build(cfg, (64,), (mean,), "blocks.1.hook_resid_pre")
    """
    if hook_name_out is None:
        arch = cfg.architecture
        d = SAE(
            SAEConfig(
                d_in=widths[0], d_sae=cfg.d_sae, hook_name=hook_name, architecture=arch,
                k=cfg.k if arch == "topk" else None,
                metadata={"trained_with": "resid.sae.training", "train_config": cfg.to_dict()},
            )
        )  # fmt: skip
    else:
        arch = {"standard": "relu"}.get(cfg.architecture, cfg.architecture)
        if arch == "topk":
            raise TrainingError(
                "neither SAELens' nor circuit-tracer's transcoder format holds a top-k "
                "transcoder: train --arch standard or jumprelu"
            )
        d = Transcoder(
            TranscoderConfig(
                d_in=widths[0], d_sae=cfg.d_sae, d_out=widths[1], hook_name=hook_name,
                hook_name_out=hook_name_out, architecture=arch, skip=skip,
            )
        )  # fmt: skip
    g = torch.Generator().manual_seed(cfg.seed)
    out_width = widths[-1]
    with torch.no_grad():
        w = torch.randn(cfg.d_sae, out_width, generator=g, dtype=torch.float64)
        w = (0.1 * w / w.norm(dim=-1, keepdim=True)).float()
        d.W_dec.copy_(w)
        if widths[0] == out_width:
            d.W_enc.copy_(w.T)
        else:
            e = torch.randn(widths[0], cfg.d_sae, generator=g, dtype=torch.float64)
            d.W_enc.copy_((0.1 * e / e.norm(dim=0, keepdim=True)).float())
        d.b_dec.copy_(means[-1])
        if cfg.architecture == "jumprelu":
            d.threshold.fill_(cfg.init_threshold)
    return d


def train(
    source: Source,
    cfg: TrainConfig,
    out: str | Path,
    hook_name: str,
    hook_name_out: str | None = None,
    skip: bool = False,
    *,
    resume: bool = False,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log=None,
) -> SAE | Transcoder:
    """Train a dictionary on ``source`` (this process being ``rank`` of ``world``, in a
    process group already initialised when ``world > 1``), checkpointing to ``out`` every
    ``cfg.checkpoint_every`` steps and at the end; returns the trained dictionary (on every
    rank). ``hook_name_out`` trains a transcoder on (input, output) pairs; ``resume``
    continues from ``out``'s checkpoint. ``log(line)`` hears each checkpoint (rank 0).

    A failed collective (a rank killed or not answering within the process group's
    timeout) raises :class:`TrainingError` naming the step and the checkpoint to resume.

    >>> sae = train(data, cfg, "runs/sae", "blocks.1.hook_resid_pre")
    """
    if source.streams != cfg.streams:
        raise TrainingError(f"the data has {source.streams} streams, the config {cfg.streams}")
    if cfg.streams % world:
        raise TrainingError(
            f"{cfg.streams} streams cannot be shared by {world} ranks: pass a --streams that "
            f"{world} divides (the streams fix the data order, whatever the number of ranks)"
        )
    if len(source.widths) != (1 if hook_name_out is None else 2):
        raise TrainingError("an SAE trains on one site, a transcoder on its input and output")
    device = torch.device(device)
    out = Path(out)
    meta = {"config": cfg.to_dict(), "data": source.identity(), "hook_name": hook_name,
            "hook_name_out": hook_name_out, "skip": skip}  # fmt: skip
    dictionary = build(cfg, source.widths, source.mean(), hook_name, hook_name_out, skip)
    objective = Objective(dictionary, cfg).to(device)
    opt = torch.optim.Adam([p for p in objective.parameters() if p.requires_grad], lr=cfg.lr)
    last_fired = torch.zeros(cfg.d_sae, dtype=torch.int64)
    start, elapsed = 0, 0.0
    state = _start(out, objective, meta, resume, rank, world)
    if state is not None:
        start, elapsed = state["step"], state["elapsed"]
        checkpoint.restore(objective, opt, last_fired, state, device)
    model: nn.Module = objective
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(objective, device_ids=ids)
    per_rank = cfg.streams // world
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    rows = cfg.batch_size // cfg.streams
    batches = source.batches(mine, rows, start)
    scale = world / cfg.batch_size  # DDP averages over ranks: the global batch's mean loss
    bar = None
    if progress and rank == 0:
        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True)
    # accumulated on the device, read back only at reports (no per-step synchronisation)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=device)
    t0, c0, step, saved = time.perf_counter(), time.process_time(), start, start

    def save(at: int) -> None:
        objective.sync()
        if rank == 0:
            wall = time.perf_counter() - t0
            # this process's own run: steps, wall and CPU seconds (rank 0's), for benchmarks
            run = {"steps": at - start, "seconds": wall, "cpu_seconds": time.process_time() - c0}
            record = dict(meta, step=at, elapsed=elapsed + wall, run=run, world_size=world)
            checkpoint.write(out, objective, opt, last_fired, record)
            if log:
                log(f"checkpoint step {at} -> {out}")

    try:
        for step in range(start, cfg.steps):
            data = tuple(t.to(device) for t in next(batches))
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            ramp = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
            penalty = cfg.l1 * (ramp if cfg.architecture == "standard" else 1.0)
            loss, s, f = model(data[0], data[-1], scale, penalty)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += s.double()
            fired |= f
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps or done % cfg.checkpoint_every == 0:
                sums, fired = _report(sums, fired, last_fired, done, world, device, bar, t0,
                                      (done - saved) * cfg.batch_size, cfg)  # fmt: skip
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save(done)
    except (RuntimeError, OSError) as e:
        if world == 1 or not collective_failure(e):
            raise
        raise TrainingError(
            f"rank {rank} of {world}: a collective failed near step {step} (another rank died, "
            f"was killed, or did not answer within the process group's timeout): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. The last checkpoint is "
            f"in {out}: run every rank again with --resume"
        ) from e
    finally:
        if bar is not None:
            bar.close()
    del model  # DDP's reducer, before the group may be destroyed
    try:
        barrier(world)  # every rank leaves with rank 0's last checkpoint on disk, together
    except (RuntimeError, OSError) as e:
        raise TrainingError(f"rank {rank} of {world}: another rank failed at the end: {e}") from e
    objective.sync()
    return dictionary.requires_grad_(False)


def _start(out: Path, objective: Objective, meta: dict, resume: bool, rank: int, world: int):
    """Rank 0 checks that every rank was started alike and reads the checkpoint (or checks
    that ``out`` is free); its verdict reaches every rank, so a refusal stops them all
    at once rather than leaving the others waiting out the timeout."""
    metas = gather(meta, rank, world)
    verdict: str | None = None
    state = None
    if rank == 0:
        for r, theirs in enumerate(metas):
            if theirs != meta:
                diff = [k for k in meta if k != "config" and theirs.get(k) != meta[k]]
                diff += [f"{k}: {v!r} on rank 0, {theirs['config'].get(k)!r} on rank {r}"
                         for k, v in meta["config"].items() if theirs["config"].get(k) != v]  # fmt: skip
                verdict = (
                    f"rank {r} was started with other settings or data than rank 0 "
                    f"({'; '.join(diff)}): start every rank with the same command"
                )
                break
        try:
            if verdict is None and resume:
                state = checkpoint.read(out, objective, meta, TrainingError)
            elif verdict is None:
                checkpoint.check_new(out, TrainingError)
        except (TrainingError, OSError, ValueError) as e:
            verdict = str(e)
    verdict, state = broadcast((verdict, state), rank, world)
    if verdict is not None:
        raise TrainingError(verdict if rank == 0 else f"rank 0 refused to start: {verdict}")
    return state


def _report(sums, fired, last_fired, done, world, device, bar, t0, tokens, cfg):
    """All-reduce the metrics since the last report (one collective), update the dead
    feature counters and the bar; returns fresh accumulators."""
    packed = torch.cat([sums, fired.double()])
    if world > 1:
        dist.all_reduce(packed)
    packed = packed.cpu()
    sums, fired = packed[:3], packed[3:] > 0
    last_fired[fired] = done
    if bar is not None:
        rate = tokens / max(time.perf_counter() - t0, 1e-9)
        n = max(sums[2].item(), 1.0)
        bar.set_postfix(
            tok_s=f"{rate:,.0f}",
            mse=f"{sums[0].item() / n:.4g}",
            L0=f"{sums[1].item() / n:.1f}",
            dead=dead_features(last_fired, done, cfg.dead_after),
            refresh=False,
        )
        bar.update(done - bar.n)
    return torch.zeros(3, dtype=torch.float64, device=device), torch.zeros(
        cfg.d_sae, dtype=torch.bool, device=device
    )


def dead_features(last_fired: Float[Tensor, " d_sae"], step: int, after: int) -> int:
    """How many features have not fired for ``after`` steps at ``step``."""
    return int(((step - last_fired) >= after).sum())


__all__ = ["Objective", "Source", "TensorStreams", "TrainConfig", "TrainingError", "build", "train"]
