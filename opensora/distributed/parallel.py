"""``parallelize``: everything that makes a model distributed, applied from outside it (torchtitan style).

Fixed order: sequence parallelism -> activation checkpointing -> torch.compile per block -> FSDP2 per block
then root (or DDP). Each step must see the model as the previous one left it: SP swaps attention cores and adds
hooks around the blocks, compile must see the checkpointed blocks (the checkpoint is traced into the graph), and
FSDP2 must wrap the compiled blocks so its all-gathers stay outside the compiled graphs.

What compile does was measured with :func:`opensora.distributed.compile_check.compile_check` (docs/training.md,
"torch.compile"): one graph serves every block, no graph breaks, and a batch that changes size recompiles at
most once (for a batch of 1).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

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
    compile: bool = False  # torch.compile each block (fullgraph; see apply_compile)
    compile_backend: str = "inductor"  # torch.compile backend; "aot_eager" traces the same graphs without codegen
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


def parallelize(model: nn.Module, pcfg: ParallelConfig, dist_info: DistInfo, family=None) -> nn.Module:
    """Makes ``model`` distributed, in place where possible, and returns the module to train.

    Args:
        model: the model on any device; it is moved to ``dist_info.device``. Build the optimizer *after* this
            call (FSDP2 replaces parameters by sharded DTensors), or let ``Engine.prepare`` rebuild it.
        pcfg: which parallelisms to apply. With engine "colossalai" only SP, checkpointing and compile are
            applied here; the booster does the data-parallel part.
        dist_info: from :func:`opensora.distributed.init_distributed` (the process group must exist).
        family: the model's ``opensora.models.families.ModelFamily``: its ``blocks`` are the units of
            checkpointing, compile and FSDP2, and ``supports_sequence_parallel`` gates SP. None: an STDiT.
    Returns:
        The same module for FSDP2 / colossalai, a ``DistributedDataParallel`` wrapper for DDP
        (use :func:`unwrap` to reach the model).
    Raises:
        ValueError: sequence parallelism for a family that does not support it.
    """
    ParallelDims.build(pcfg, dist_info)  # validates sp_size against the world size
    blocks = model.blocks if family is None else family.blocks(model)
    if pcfg.sp_size > 1 and family is not None and not family.supports_sequence_parallel:
        raise ValueError(f"sp_size {pcfg.sp_size}: the {family.name} family does not support sequence parallelism "
                         "yet; use sp_size 1")
    model.to(dist_info.device)

    # 1. Sequence parallelism (hooks and attention cores; the parameters are untouched).
    if pcfg.sp_size > 1:
        apply_sequence_parallel(model, new_sp_group(pcfg, dist_info))

    # 2. Activation checkpointing of every block, or of the first grad_ckpt_blocks.
    if pcfg.grad_ckpt:
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not declare _supports_gradient_checkpointing")
        if pcfg.compile or not _has_selective_switch(model):
            # inside what step 3 compiles (torchtitan); and for models whose own switch is all-or-nothing
            checkpoint_blocks(model, pcfg.grad_ckpt_blocks, blocks)
        else:
            model.enable_gradient_checkpointing(True, pcfg.grad_ckpt_blocks)  # the model's own switch (STDiT)

    # 3. Compile each block in place (parameter names stay the same, so checkpoints are unaffected).
    if pcfg.compile:
        apply_compile(model, pcfg.compile_backend, blocks)

    # 4. Data parallelism.
    if pcfg.engine == "fsdp":
        mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
        if uses_mixed_precision(pcfg, dist_info):
            mp = MixedPrecisionPolicy(param_dtype=DTYPES[pcfg.param_dtype], reduce_dtype=DTYPES[pcfg.reduce_dtype])
        else:
            mp = MixedPrecisionPolicy()  # fp32 everywhere
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        if uses_mixed_precision(pcfg, dist_info):
            shard_kept_in_fp32(model, blocks, mesh)
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


def shard_kept_in_fp32(model: nn.Module, blocks: nn.ModuleList, mesh) -> list[str]:
    """Gives the modules a diffusers model keeps in fp32 (``_keep_in_fp32_modules``) their own FSDP2 unit with fp32
    parameters, where that can be done: modules with parameters outside the blocks. Returns their names.

    A bf16 policy would otherwise compute them from bf16 copies of their weights (the fp32 masters stay fp32 either
    way). Wan's list is ``time_embedder``, ``scale_shift_table``, ``norm1/2/3`` and ``rope``:

    * ``condition_embedder.time_embedder`` gets an fp32 unit: diffusers feeds it the timestep sinusoid in its
      weights' dtype (read outside the unit's forward: the fp32 master), so the timestep embedding is computed in
      fp32 as in diffusers' own bf16 inference. It takes no input cast (``cast_forward_inputs=False``) and its output
      is cast back to the text states' dtype by diffusers.
    * inside the blocks (``norm2``'s affine weights, each block's ``scale_shift_table``) the block's bf16 copy is
      used: a nested unit inside a compiled block would put FSDP2's hooks into the compiled graph (a graph break
      under ``fullgraph``) and add an all-gather per block. Their compute stays fp32 anyway (``FP32LayerNorm``
      upcasts; the table is added to ``temb.float()``): only the values are rounded to bf16 (relative 2^-9).
    * ``scale_shift_table`` of the root and ``rope`` are a parameter and a module without parameters: nothing to
      wrap (the root's table is rounded as the blocks' are).
    """
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    inside = {id(m) for block in blocks for m in block.modules()}
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if (id(module) in inside or module is model or name.split(".")[-1] not in keep
                or any(name.startswith(w + ".") for w in wrapped) or next(module.parameters(), None) is None):
            continue
        fully_shard(module, mesh=mesh, mp_policy=fp32)
        wrapped.append(name)
    return wrapped


def _has_selective_switch(model: nn.Module) -> bool:
    """Whether the model's own ``enable_gradient_checkpointing`` takes a block count (STDiT's; diffusers' does not)."""
    switch = getattr(model, "enable_gradient_checkpointing", None)
    return switch is not None and "num_blocks" in inspect.signature(switch).parameters


def checkpoint_blocks(model: nn.Module, num_blocks: int | None = None, blocks: nn.ModuleList | None = None) -> None:
    """Activation checkpointing inside each block's ``forward``, for blocks that are then compiled (torchtitan's
    ``apply_ac`` before ``apply_compile``).

    Dynamo traces the checkpoint into the compiled graph, so the recompute is part of the compiled backward.
    The model's own switch (``enable_gradient_checkpointing``) calls ``checkpoint(block)`` from outside the
    compiled block instead; that gives the same loss and gradients too (tests/test_compile.py), but re-runs the
    whole compiled forward, and the block's hooks, in the backward. ``forward`` is replaced on the instance:
    a ``checkpoint_wrapper`` module would rename every parameter (``_checkpoint_wrapped_module.``).

    Args:
        model: the model; its first ``num_blocks`` blocks (None = all) recompute their activations in backward.
        blocks: its blocks (its family's ``blocks``); None: ``model.blocks``.
    """
    blocks = model.blocks if blocks is None else blocks
    depth = len(blocks)
    num_blocks = depth if num_blocks is None else num_blocks
    if not 0 <= num_blocks <= depth:
        raise ValueError(f"grad_ckpt_blocks must be in [0, {depth}] (the model's depth), got {num_blocks}")
    for block in list(blocks)[:num_blocks]:
        block.forward = types.MethodType(_checkpointed_forward, block)


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    return checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)


def apply_compile(model: nn.Module, backend: str = "inductor", blocks: nn.ModuleList | None = None) -> None:
    """Compiles each STDiT block in place with ``fullgraph=True`` (a graph break is an error, as in torchtitan; so
    is a 9th graph of one block, dynamo's ``recompile_limit``, where without it the block would silently run eager).

    ``Module.compile`` compiles ``_call_impl``, which dynamo does not trace into: the forward is compiled as its
    own frame, and the module's hooks (FSDP2's all-gathers, SP's slicing and gathering) run eagerly around it.
    Every block is one code object, so one graph can serve all blocks if they all see the same kinds of input;
    a pre-hook (which runs last, after FSDP2's cast and SP's slicing) makes that so:

    * ``tpe``: only block 0 receives the temporal embedding; the others get ``None``, which fails the guard on
      ``tpe``'s type and compiled a second graph (measured: 2 graphs and 1 recompile per input shape). The other
      blocks get zeros instead: adding them is exact, and fused into the layout copy before temporal attention.
    * the batch dim of ``x``, ``y``, ``t0`` and ``mask`` is marked dynamic on the first call: a batch that shrinks
      after a broken clip then reuses the graph. Left to automatic dynamic shapes, B=2, 1, 3 compiled 3 graphs
      (static 2, specialised 1, dynamic); marked, 2 (sizes >= 2, and 1, which torch always specialises).
      ``maybe_mark_dynamic``: should a later change specialise the batch, training goes on (recompiling), and
      tests/test_compile.py's recompile count fails instead. T and S (buckets) are left to automatic dynamic
      shapes: the first change of each recompiles once, with that dim dynamic from then on.

    Blocks of other models (a family's ``blocks``, e.g. diffusers' Wan blocks, which all take the same inputs)
    are compiled the same way, without the pre-hook, which knows STDiT's block inputs only.

    Args:
        model: the model, after sequence parallelism and checkpointing, before FSDP2 / DDP.
        backend: the torch.compile backend (``torch._dynamo.list_backends(exclude_tags=())`` lists them).
        blocks: its blocks (its family's ``blocks``); None: ``model.blocks``.
    """
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:  # torch.compile itself would say so only at the first forward
        raise ValueError(f"compile_backend {backend!r} is not a torch.compile backend; known: {', '.join(known)}")
    blocks = model.blocks if blocks is None else blocks
    signature = inspect.signature(type(blocks[0]).forward)
    if "tpe" not in signature.parameters:  # not STDiT's block
        for block in blocks:
            block.compile(backend=backend, fullgraph=True)
        return
    zeros: dict = {}

    @torch.compiler.disable
    def same_inputs_for_every_block(module, args, kwargs):
        bound = signature.bind(module, *args, **kwargs)
        x = bound.arguments["x"]  # (B, T, S, D); T is this rank's share under SP
        if bound.arguments.get("tpe") is None:
            key = (x.shape[1], x.shape[-1], x.dtype, x.device)
            if key not in zeros:
                zeros[key] = x.new_zeros(key[:2])  # (T, D)
            bound.arguments["tpe"] = zeros[key]
        for name in ("x", "y", "t0", "mask"):
            if bound.arguments.get(name) is not None:
                torch._dynamo.maybe_mark_dynamic(bound.arguments[name], 0)
        return bound.args[1:], bound.kwargs

    for block in blocks:
        block.register_forward_pre_hook(same_inputs_for_every_block, with_kwargs=True)
        block.compile(backend=backend, fullgraph=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying model of a DDP / ColossalAI wrapper (FSDP2 and compiled blocks need no unwrapping)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "unwrap") and callable(model.unwrap):  # colossalai ModelWrapper
            model = model.unwrap()
        else:
            return model
