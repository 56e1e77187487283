"""Where a hash layer's experts live: W ranks cut into expert groups of P
consecutive ranks, and the replica groups that hold the same shard
(the layout is drawn in :mod:`fairseq_hash.expert_parallel`)."""
import functools
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# fairseq's --ddp-backend values that leave ``param.expert`` parameters to us:
# legacy_ddp skips them; PyTorch's DDP is told to ignore them
# (distributed_checkpoints.prepare_expert_parallel)
EXPERT_SAFE_BACKENDS = ("pytorch_ddp", "c10d", "legacy_ddp", "no_c10d")


@dataclass
class ExpertLayout:
    world_size: int  # W
    rank: int
    parallel_size: int  # P, ranks in an expert group
    group: Optional[object]  # this rank's expert group (None when P = 1)
    replica_group: Optional[object]  # ranks holding the same shard (None when W = P)

    @property
    def shard(self) -> int:
        """This rank's position in its expert group: it holds shard ``shard`` of P."""
        return self.rank % self.parallel_size


def ranks_per_node(world_size: int) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, else the GPUs fairseq's
    spawn starts one process on each, else (processes started by hand on CPU)
    the whole world."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local:
        return min(int(local), world_size)
    if torch.cuda.is_available():
        return min(torch.cuda.device_count(), world_size)
    return world_size


@functools.lru_cache(maxsize=None)
def _groups(world_size: int, parallel_size: int):
    """Every expert group and replica group, created in the same order on all ranks
    (``new_group`` is collective); cached so all hash layers share them."""
    logger.info(f"expert parallelism: {world_size // parallel_size} expert group(s) of "
                f"{parallel_size} consecutive rank(s) (--moe-expert-parallel-size "
                f"{parallel_size})")
    expert_groups = [dist.new_group(list(range(g, g + parallel_size)))
                     for g in range(0, world_size, parallel_size)]
    replica_groups = [dist.new_group(list(range(j, world_size, parallel_size)))
                      for j in range(parallel_size)]
    return expert_groups, replica_groups


def world_size() -> int:
    """Ranks of the data-parallel world (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def expert_layout(parallel_size: int) -> ExpertLayout:
    """This rank's layout with experts spread over groups of ``parallel_size`` ranks
    (``HashLayerSpec.parallel_size_for`` chooses and checks it)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    expert_groups, replica_groups = _groups(world, parallel_size)
    return ExpertLayout(
        world_size=world, rank=rank, parallel_size=parallel_size,
        group=expert_groups[rank // parallel_size] if parallel_size > 1 else None,
        replica_group=(replica_groups[rank % parallel_size]
                       if world > parallel_size else None),
    )
