"""torch.distributed plumbing shared by every job that runs on torchrun (harvests, dataset
sweeps, SAE training): joining the process group with a timeout, the few collectives the
jobs need (each a no-op on one process), and telling a failed collective (a rank killed or
silent past the timeout) from any other error.

>>> rank, world, device = init_distributed("cuda")   # (0, 1, cuda) without torchrun
>>> broadcast(verdict, rank, world)                   # rank 0's object on every rank
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A process group that cannot be joined, or a collective that failed because another
    rank died or did not answer within the timeout; the message names the fix."""


def init_distributed(
    device: str | None = None, timeout_s: float = 600.0
) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``,
    …), with gloo on CPU and NCCL on CUDA, and a timeout on the rendezvous and every
    collective. Returns ``(rank, world_size, device)``; without torchrun, ``(0, 1, device)``.

    >>> rank, world, device = init_distributed("cuda")   # cuda:LOCAL_RANK under torchrun
    """
    want = (
        torch.device(device)
        if device
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif world > 1:
        if not dist.is_available():
            raise DistributedError("WORLD_SIZE > 1 but this torch has no torch.distributed")
        backend = "nccl" if want.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except Exception as e:  # rendezvous failures come in many types
            raise DistributedError(
                f"could not join the process group ({backend}, {timeout_s:.0f} s timeout): {e}. "
                "Check MASTER_ADDR/MASTER_PORT (or --rdzv-endpoint) and that every node runs torchrun"
            ) from e
        rank = dist.get_rank()
    else:
        return 0, 1, want
    if want.type == "cuda" and want.index is None:
        want = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(want)
    return rank, world, want


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, or ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(obj, rank: int, world: int):
    """Rank 0's ``obj`` (any picklable object), on every rank."""
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, rank: int, world: int) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0 (None on the others)."""
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(world: int) -> None:
    """Wait until every rank is here."""
    if world > 1:
        dist.barrier()


def collective_failure(e: BaseException) -> bool:
    """Whether ``e`` came from torch.distributed (gloo, NCCL, the store, a timeout): another
    rank died or did not answer, rather than this rank's own bug.

    >>> collective_failure(RuntimeError("[gloo] Connection closed by peer"))
    True
    """
    text = f"{type(e).__name__} {e}".lower()
    dist_error = getattr(dist, "DistError", ())
    return isinstance(e, dist_error) or any(
        w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket")
    )
