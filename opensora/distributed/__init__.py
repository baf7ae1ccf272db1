"""Distributed training: process-group set-up, ``parallelize`` (SP -> checkpointing -> compile -> FSDP2/DDP),
Ulysses sequence parallelism over frames, and one engine interface over FSDP2, DDP and the ColossalAI booster.

Nothing here is imported by the model; ColossalAI is imported only when its engine is built.
"""

from opensora.distributed.engines import ColossalAIEngine, Engine, build_engine
from opensora.distributed.env import (
    DistInfo,
    barrier,
    destroy_distributed,
    exit_process,
    get_rank,
    get_world_size,
    init_distributed,
)
from opensora.distributed.parallel import ParallelConfig, ParallelDims, new_sp_group, parallelize, unwrap
from opensora.distributed.sequence_parallel import UlyssesAttention, all_to_all, apply_sequence_parallel

__all__ = [
    "ColossalAIEngine",
    "DistInfo",
    "Engine",
    "ParallelConfig",
    "ParallelDims",
    "UlyssesAttention",
    "all_to_all",
    "apply_sequence_parallel",
    "barrier",
    "build_engine",
    "destroy_distributed",
    "exit_process",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "new_sp_group",
    "parallelize",
    "unwrap",
]
