"""Ulysses sequence parallelism over the frame axis T of STDiT (DeepSpeed-Ulysses, arXiv:2309.14509).

Between blocks STDiT keeps activations as (B, T, S, D). The ``P`` ranks of one sequence-parallel (SP) group
receive the *same* sample; each keeps one contiguous slice of T, so block activation memory drops by ``P``:

* spatial attention, cross-attention, the MLP and the adaLN modulation act on one frame (or one token) at
  a time, so they run on a T shard unchanged;
* temporal attention needs every frame: its ``core`` (parameter-free SDPA on (B*S, heads, T, d)) is replaced
  by :class:`UlyssesAttention`, which all-to-alls q/k/v from "all heads, T/P frames" to "heads/P, all T",
  attends, and all-to-alls back;
* the temporal position embedding (T, D) enters block 0 as an argument and is sliced there with x;
* a per-frame adaLN input ``t0`` (B, T, 6D) (frame conditioning: per-frame timesteps) enters every block
  and is sliced in each, so each rank modulates its own frames; a per-sample ``t0`` (B, 6D) is left whole.

Hooks (installed by :func:`apply_sequence_parallel`, never by the model): block 0's pre-hook slices x and the
temporal embedding; the last block's forward hook all-gathers x again, so the final layer, the loss and
everything outside the blocks see the full video and are computed identically on every rank.

Gradients. Each rank's backward through the blocks only sees its own frames, so every parameter it reaches
through the blocks (block weights, and the embedders and ``t_block`` whose outputs feed the blocks) gets a
*partial* gradient, while the final layer gets the full one on every rank. Gradients are linear in the
gradient that flows in, so scaling the gradient entering the blocks by ``P`` (the gather's backward) makes
the mean over the SP group of every parameter's gradient equal to the single-process gradient. Data
parallelism over the *whole* world (FSDP2 / DDP / ZeRO all average gradients over all ranks) therefore gives
the exact gradient of the mean loss over the ``dp`` distinct samples: no separate SP all-reduce of parameter
gradients and no gather of activation gradients is needed, and FSDP2 may shard over all ranks including the
SP group. (Per-rank gradients before that average are not meaningful on their own.)

The trainer must feed the ranks of one SP group the same batch, timesteps, noise and caption-dropout draws
(see :func:`opensora.distributed.parallel.ParallelDims`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn


@torch.compiler.disable
def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    P = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(P)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _own_slice(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].contiguous()


class _SliceSeq(torch.autograd.Function):
    """Forward: keep this rank's slice. Backward: the slice's gradient in place, zeros elsewhere (no
    communication: the data-parallel average adds the other ranks' slices, see the module doc)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim, ctx.shape = group, dim, x.shape
        return _own_slice(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(ctx.shape)
        full.chunk(dist.get_world_size(ctx.group), dim=ctx.dim)[dist.get_rank(ctx.group)].copy_(grad)
        return full, None, None


class _GatherSeq(torch.autograd.Function):
    """Forward: all-gather the slices. Backward: this rank's slice of the (replicated) gradient, times P."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice(grad, ctx.group, ctx.dim) * dist.get_world_size(ctx.group), None, None


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Differentiable all-to-all: scatter ``scatter_dim`` over the ranks of ``group``, gather ``gather_dim``.

    Splits ``x`` into P pieces along ``scatter_dim``, sends piece j to rank j, concatenates what arrives along
    ``gather_dim`` in rank order; the backward is the reverse all-to-all. A functional collective, so that
    torch.compile traces it into the compiled block's graph: the ``torch.compiler.disable``d ``dist`` call it
    replaced broke every SP block into 3 graphs (11 graph breaks and 8 recompiles in 3 steps, docs/training.md).
    """
    P = dist.get_world_size(group)
    send = torch.stack(x.chunk(P, dim=scatter_dim))  # (P, ...) piece j goes to rank j
    recv = funcol.all_to_all_single_autograd(send, None, None, group)  # (P, ...) piece j came from rank j
    return torch.cat(recv.unbind(0), dim=gather_dim)


class UlyssesAttention(nn.Module):
    """Replaces an attention ``core`` whose sequence axis is sharded over ``group``.

    Takes q, k, v of shape (B', H, N/P, d) (all heads, this rank's N/P positions), returns (B', H, N/P, d).
    Requires H divisible by P.
    """

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner = inner
        self.group = group

    def forward(self, q, k, v, attn_mask=None):
        if attn_mask is not None:
            raise ValueError("UlyssesAttention does not support an attention mask over the sharded axis")
        qkv = torch.stack([q, k, v])  # (3, B', H, N/P, d): one collective instead of three
        q, k, v = all_to_all(qkv, self.group, scatter_dim=2, gather_dim=3).unbind(0)  # each (B', H/P, N, d)
        out = self.inner(q, k, v)  # (B', H/P, N, d)
        return all_to_all(out, self.group, scatter_dim=2, gather_dim=1)  # (B', H, N/P, d)


def apply_sequence_parallel(model: nn.Module, group) -> None:
    """Shards STDiT's block activations (B, T, S, D) along T over ``group`` (in place, hooks only).

    Args:
        model: an ``opensora.models.stdit.STDiT`` (uses ``config.num_heads``, ``blocks`` and each block's
            ``attn_temp.core``; see the module docstring).
        group: the sequence-parallel process group; its size P must divide the number of heads and, at run
            time, the latent frame count T (after temporal patching).
    """
    P = dist.get_world_size(group)
    num_heads = model.config.num_heads
    if num_heads % P:
        raise ValueError(f"sequence parallelism over {P} ranks needs num_heads ({num_heads}) divisible by {P}")
    blocks = model.blocks
    for block in blocks:
        block.attn_temp.core = UlyssesAttention(block.attn_temp.core, group)

    signature = inspect.signature(blocks[0].forward)

    @torch.compiler.disable
    def shard_inputs(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        x, tpe = bound.arguments["x"], bound.arguments.get("tpe")
        T = x.shape[1]
        if T % P:
            raise ValueError(
                f"sequence parallelism over {P} ranks needs the latent frame count T={T} to be divisible by {P}"
            )
        bound.arguments["x"] = _SliceSeq.apply(x, group, 1)  # (B, T/P, S, D)
        if tpe is not None:
            bound.arguments["tpe"] = _own_slice(tpe, group, 0)  # (T/P, D); a constant, no gradient
        return shard_t0(module, bound.args, bound.kwargs)

    @torch.compiler.disable
    def shard_t0(module, args, kwargs):
        # Every block gets the full per-frame t0 from the model; each rank keeps its frames' rows. Sliced with
        # _SliceSeq like x, so t_block's gradient follows the same "partial per rank, averaged" rule.
        bound = signature.bind(*args, **kwargs)
        t0 = bound.arguments["t0"]
        if t0.dim() == 3:  # (B, T, 6D) -> (B, T/P, 6D)
            bound.arguments["t0"] = _SliceSeq.apply(t0, group, 1)
        return bound.args, bound.kwargs

    @torch.compiler.disable
    def gather_output(module, args, kwargs, output):
        return _GatherSeq.apply(output, group, 1)  # (B, T, S, D)

    blocks[0].register_forward_pre_hook(shard_inputs, with_kwargs=True)
    for block in blocks[1:]:
        block.register_forward_pre_hook(shard_t0, with_kwargs=True)
    blocks[-1].register_forward_hook(gather_output, with_kwargs=True)


# ----------------------------------------------------------------------------------------------------
# Parallel sampling (tools/sample.py under torchrun): prompt groups x CFG split x SP degree
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingLayout:
    """Where a rank sits when N = dp x cfg x sp ranks sample videos.

    Rank ``r = (dp_rank * cfg + cfg_rank) * sp + sp_rank``: the ``cfg * sp`` ranks of one *video group* are
    consecutive and sample the same videos (same prompts, seed and noise); inside it the ``sp`` ranks of one
    branch shard the frames (Ulysses, as training) and the ``cfg`` (1 or 2) branches run the conditional and the
    unconditional pass. Video groups take the prompt batches round robin. The group's first rank owns (writes)
    its videos.
    """

    dp_size: int  # video groups: prompt batches sampled at once
    dp_rank: int
    cfg_size: int  # 2 with --cfg-parallel, else 1
    cfg_rank: int  # 0: conditional pass, 1: unconditional
    sp_size: int  # ranks sharding the frames of one pass
    sp_rank: int

    @staticmethod
    def build(world_size: int, rank: int, sp_size: int = 1, cfg_parallel: bool = False) -> "SamplingLayout":
        """Splits the world; ValueError naming the sizes when ``sp_size * (2 if cfg_parallel)`` does not divide it."""
        cfg = 2 if cfg_parallel else 1
        if sp_size < 1 or world_size % (sp_size * cfg):
            raise ValueError(f"--sp-size {sp_size}{' x 2 (--cfg-parallel)' if cfg_parallel else ''} must divide the "
                             f"number of ranks ({world_size})")
        return SamplingLayout(dp_size=world_size // (sp_size * cfg), dp_rank=rank // (sp_size * cfg),
                              cfg_size=cfg, cfg_rank=rank // sp_size % cfg, sp_size=sp_size, sp_rank=rank % sp_size)

    @property
    def is_owner(self) -> bool:
        """Whether this rank writes its video group's files."""
        return self.cfg_rank == 0 and self.sp_rank == 0

    def _rank(self, dp: int, c: int, s: int) -> int:
        return (dp * self.cfg_size + c) * self.sp_size + s

    def new_groups(self) -> dict:
        """This rank's ``sp``, ``cfg`` and ``video`` process groups (None where of size 1). Collective: every rank
        creates every group, in the same order."""
        mine: dict = {"sp": None, "cfg": None, "video": None}
        for dp in range(self.dp_size):
            for c in range(self.cfg_size):
                ranks = [self._rank(dp, c, s) for s in range(self.sp_size)]
                group = dist.new_group(ranks) if self.sp_size > 1 else None
                if (dp, c) == (self.dp_rank, self.cfg_rank):
                    mine["sp"] = group
            for s in range(self.sp_size):
                ranks = [self._rank(dp, c, s) for c in range(self.cfg_size)]
                group = dist.new_group(ranks) if self.cfg_size > 1 else None
                if (dp, s) == (self.dp_rank, self.sp_rank):
                    mine["cfg"] = group
            ranks = [self._rank(dp, 0, 0) + i for i in range(self.cfg_size * self.sp_size)]
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if dp == self.dp_rank:
                mine["video"] = group
        return mine


def cfg_parallel_guidance(model_fn, cfg_scale: float, guided_channels: int, group):
    """Classifier-free guidance with the two passes on the two ranks of ``group`` (xDiT's "CFG parallel").

    Rank 0 of ``group`` calls ``model_fn`` with the conditional ``model_kwargs``, rank 1 with the unconditional
    ones, each on B rows instead of 2B; the predictions are all-gathered and mixed by the same formula as the
    batched guidance (:func:`opensora.diffusion.guidance.mix_guidance`), so both ranks continue with the same x.
    """
    from opensora.diffusion.guidance import mix_guidance

    if dist.get_world_size(group) != 2:
        raise ValueError(f"CFG parallelism needs a group of 2 ranks, got {dist.get_world_size(group)}")

    def guided(x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        out = model_fn(x, t, **model_kwargs).contiguous()  # (B, C_out, ...): this rank's branch
        parts = [torch.empty_like(out) for _ in range(2)]
        dist.all_gather(parts, out, group=group)
        return mix_guidance(parts[0], parts[1], cfg_scale, guided_channels)

    return guided
