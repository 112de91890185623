"""torch.distributed facts the agent needs, read once at attach time."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def rank_info() -> RankInfo:
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    return RankInfo(rank, world, int(os.environ.get("LOCAL_RANK", rank if world > 1 else 0)))


def any_rank(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise max over all ranks (a collective: every rank must call it at the same step)."""
    merged = flags.reshape(-1).clone()
    dist.all_reduce(merged, op=dist.ReduceOp.MAX)
    return merged.reshape(flags.shape)
