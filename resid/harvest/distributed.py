"""torch.distributed plumbing for a harvest: ``resid.core.distributed``'s (shared with
dataset sweeps and SAE training), with a failure to join raised as a
:class:`~resid.harvest.errors.HarvestError`.

>>> rank, world, device = init_distributed("cuda")   # (0, 1, cuda) without torchrun
>>> broadcast(verdict, rank, world)                   # rank 0's object on every rank
"""

from __future__ import annotations

import torch

from resid.core import distributed as core
from resid.core.distributed import barrier, broadcast, gather, rank_and_world
from resid.harvest.errors import HarvestError

__all__ = ["barrier", "broadcast", "gather", "init_distributed", "rank_and_world"]


def init_distributed(
    device: str | None = None, timeout_s: float = 600.0
) -> tuple[int, int, torch.device]:
    """:func:`resid.core.distributed.init_distributed`, raising :class:`HarvestError`.

    >>> rank, world, device = init_distributed("cuda")   # cuda:LOCAL_RANK under torchrun
    """
    try:
        return core.init_distributed(device, timeout_s)
    except core.DistributedError as e:
        raise HarvestError(str(e)) from e
