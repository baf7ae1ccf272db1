"""``parallelize``: everything that makes a model distributed, applied from outside it (torchtitan style).

Fixed order: sequence parallelism -> activation checkpointing -> torch.compile per block -> FSDP2 per block
then root (or DDP). Each step must see the model as the previous one left it: SP swaps attention cores and adds
hooks that checkpointing must replay, compile must see the checkpointed blocks, and FSDP2 must wrap the
compiled blocks so its all-gathers stay outside the compiled graphs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from opensora.distributed.env import DistInfo
from opensora.distributed.sequence_parallel import apply_sequence_parallel

ENGINES = ("fsdp", "ddp", "colossalai")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ParallelConfig:
    """How the model is distributed. Parallelism lives here, never in the model config."""

    engine: str = "fsdp"  # "fsdp" (torch FSDP2), "ddp" (torch DDP) or "colossalai" (booster; ZeRO on CUDA)
    sp_size: int = 1  # ranks per sequence-parallel group (Ulysses over frames); must divide the world size
    grad_ckpt: bool = False  # activation checkpointing of STDiT blocks (all, or the first grad_ckpt_blocks)
    grad_ckpt_blocks: int | None = None  # selective checkpointing: only the first N blocks recompute; None = all
    compile: bool = False  # torch.compile each block
    param_dtype: str = "bf16"  # compute dtype on CUDA ("fp32" or "bf16"); CPU always computes in fp32
    reduce_dtype: str = "fp32"  # gradient reduction dtype (FSDP2); only fp32 is supported
    zero_stage: int = 2  # ColossalAI LowLevelZero stage (1 or 2) on CUDA

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.sp_size < 1:
            raise ValueError(f"sp_size must be >= 1, got {self.sp_size}")
        if self.param_dtype not in DTYPES:
            raise ValueError(f"param_dtype must be one of {tuple(DTYPES)}, got {self.param_dtype!r}")
        if self.reduce_dtype != "fp32":
            raise ValueError(f"reduce_dtype must be 'fp32' (bf16 gradient sums lose too much), got {self.reduce_dtype!r}")
        if self.grad_ckpt_blocks is not None and self.grad_ckpt_blocks < 0:
            raise ValueError(f"grad_ckpt_blocks must be >= 0 or null, got {self.grad_ckpt_blocks}")
        if self.zero_stage not in (1, 2):
            raise ValueError(f"zero_stage must be 1 or 2, got {self.zero_stage}")


@dataclass(frozen=True)
class ParallelDims:
    """How the world splits into data-parallel replicas and sequence-parallel groups.

    Ranks ``[k*sp, (k+1)*sp)`` form SP group k and data-parallel rank k: they must load the same batch and
    draw the same noise, timesteps and caption dropout (seed with ``seed + dp_rank``).
    """

    dp_size: int  # distinct samples per global step / per-rank batch
    dp_rank: int  # which data shard this rank reads
    sp_size: int
    sp_rank: int  # which slice of T this rank holds inside the blocks

    @staticmethod
    def build(pcfg: ParallelConfig, dist_info: DistInfo) -> "ParallelDims":
        """Splits ``dist_info.world_size`` by ``pcfg.sp_size``; raises if it does not divide."""
        if dist_info.world_size % pcfg.sp_size:
            raise ValueError(f"sp_size {pcfg.sp_size} does not divide the world size {dist_info.world_size}")
        return ParallelDims(
            dp_size=dist_info.world_size // pcfg.sp_size,
            dp_rank=dist_info.rank // pcfg.sp_size,
            sp_size=pcfg.sp_size,
            sp_rank=dist_info.rank % pcfg.sp_size,
        )


def uses_mixed_precision(pcfg: ParallelConfig, dist_info: DistInfo) -> bool:
    """bf16 compute only on CUDA: CPU bf16 matmuls are slow and the CPU runs are for checking equality."""
    return dist_info.device.type == "cuda" and pcfg.param_dtype == "bf16"


def new_sp_group(pcfg: ParallelConfig, dist_info: DistInfo, backend: str | None = None):
    """This rank's sequence-parallel process group. Collective: every rank creates every group.

    Args:
        backend: None for the default one (NCCL on GPUs: the activations' all-to-alls); "gloo" for a group
            that exchanges host data without touching a GPU stream (the data loaders' batch agreement).
    """
    dims = ParallelDims.build(pcfg, dist_info)
    mine = None
    for k in range(dims.dp_size):
        ranks = list(range(k * pcfg.sp_size, (k + 1) * pcfg.sp_size))
        group = dist.new_group(ranks, backend=backend)
        if k == dims.dp_rank:
            mine = group
    return mine


def parallelize(model: nn.Module, pcfg: ParallelConfig, dist_info: DistInfo) -> nn.Module:
    """Makes ``model`` (an STDiT) distributed, in place where possible, and returns the module to train.

    Args:
        model: the STDiT on any device; it is moved to ``dist_info.device``. Build the optimizer *after* this
            call (FSDP2 replaces parameters by sharded DTensors), or let ``Engine.prepare`` rebuild it.
        pcfg: which parallelisms to apply. With engine "colossalai" only SP, checkpointing and compile are
            applied here; the booster does the data-parallel part.
        dist_info: from :func:`opensora.distributed.init_distributed` (the process group must exist).
    Returns:
        The same module for FSDP2 / colossalai, a ``DistributedDataParallel`` wrapper for DDP
        (use :func:`unwrap` to reach the STDiT).
    """
    ParallelDims.build(pcfg, dist_info)  # validates sp_size against the world size
    model.to(dist_info.device)

    # 1. Sequence parallelism (hooks and attention cores; the parameters are untouched).
    if pcfg.sp_size > 1:
        apply_sequence_parallel(model, new_sp_group(pcfg, dist_info))

    # 2. Activation checkpointing through the model's own switch (it wraps every block call, or the first N).
    if pcfg.grad_ckpt:
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not declare _supports_gradient_checkpointing")
        model.enable_gradient_checkpointing(True, pcfg.grad_ckpt_blocks)

    # 3. Compile each block in place (parameter names stay the same, so checkpoints are unaffected).
    if pcfg.compile:
        for block in model.blocks:
            block.compile()

    # 4. Data parallelism.
    if pcfg.engine == "fsdp":
        mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
        if uses_mixed_precision(pcfg, dist_info):
            mp = MixedPrecisionPolicy(param_dtype=DTYPES[pcfg.param_dtype], reduce_dtype=DTYPES[pcfg.reduce_dtype])
        else:
            mp = MixedPrecisionPolicy()  # fp32 everywhere
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        # The root keeps the embedders and final layer; it need not reshard: the backward needs them at once.
        # It does not cast its inputs: FSDP2 would round the float timesteps of rectified flow to bf16
        # (700.7 -> 700; steps of 4 above 512). STDiT casts the latents and captions to its weights' dtype
        # itself and embeds the timestep from fp32.
        root_mp = dataclasses.replace(mp, cast_forward_inputs=False)
        fully_shard(model, mesh=mesh, mp_policy=root_mp, reshard_after_forward=False)
    elif pcfg.engine == "ddp":
        device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        # broadcast_buffers=False: STDiT's only buffer (the null caption) is fixed after init, and DDP already
        # broadcasts it once at construction; re-sending it before every forward is wasted bandwidth.
        model = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying model of a DDP / ColossalAI wrapper (FSDP2 and compiled blocks need no unwrapping)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "unwrap") and callable(model.unwrap):  # colossalai ModelWrapper
            model = model.unwrap()
        else:
            return model
