"""One small interface over the training engines: torch FSDP2 (default), torch DDP, the ColossalAI booster.

The trainer only talks to an :class:`Engine`::

    engine = build_engine(pcfg, dist_info)
    model, optimizer = engine.prepare(model, optimizer)
    lr_scheduler = build_lr_scheduler(engine.schedule_optimizer, ...)
    engine.set_grad_sync(last_micro_step)    # gradient accumulation; before the forward
    with engine.autocast():
        loss = ...
    engine.backward(loss)
    grad_norm = engine.optimizer_step(max_norm=1.0)   # clip, update (skipped if not finite), clear the gradients

and checkpoints through ``model_state_dict`` / ``optimizer_state_dict`` (sharded, for DCP) and their
``load_*`` counterparts. ColossalAI is imported only when that engine is built.

Nothing outside this module asks which engine runs: the trainer (``opensora.training.step``) and
``tools/benchmark.py`` run the same step through these methods.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from opensora.distributed.env import DistInfo
from opensora.distributed.parallel import DTYPES, ParallelConfig, parallelize, unwrap, uses_mixed_precision


class Engine:
    """Base: the torch engines (FSDP2 and DDP). Subclasses override what differs."""

    def __init__(self, pcfg: ParallelConfig, dist_info: DistInfo):
        self.pcfg = pcfg
        self.dist = dist_info
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        # A LoRA stage: the frozen base is not state (it is rebuilt from the init bundle); checkpoints hold the
        # trainable parameters only (megabytes, not gigabytes). Set before the first state dict.
        self.trainable_only = False

    # -- set-up -----------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, family=None):
        """Parallelizes ``model`` and returns ``(model, optimizer)`` to train with.

        Args:
            model: the model (an STDiT, or any family's), on any device.
            optimizer: a fresh optimizer (no state yet) over ``model``'s parameters. FSDP2 replaces the
                parameters, so its param groups are pointed at the new ones (same class and settings).
            family: the model's ``ModelFamily`` (its blocks, whether it takes sequence parallelism); None: STDiT.
        """
        names = {id(p): n for n, p in model.named_parameters()}
        self.model = parallelize(model, self.pcfg, self.dist, family=family)
        self.optimizer = _rebind_optimizer(optimizer, unwrap(self.model), names)
        return self.model, self.optimizer

    def unwrap(self) -> nn.Module:
        """The STDiT itself (for its config, EMA updates, ...)."""
        return unwrap(self.model)

    def master_shards(self):
        """The fp32 master weights the EMA should follow when they are not the parameters
        (``opensora.training.ema.MasterShards``), else None: FSDP2 shards and DDP keep fp32 parameters."""
        return None

    @property
    def schedule_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer whose param groups' ``lr`` an LR scheduler drives."""
        return self.optimizer

    def autocast(self):
        """Context for the forward pass: bf16 autocast for DDP on CUDA; FSDP2 casts through its policy."""
        if self.pcfg.engine == "ddp" and uses_mixed_precision(self.pcfg, self.dist):
            return torch.autocast("cuda", dtype=DTYPES[self.pcfg.param_dtype])
        return contextlib.nullcontext()

    def reshard(self) -> None:
        """Drops the gathered (unsharded) copies of the parameters that a forward outside training left behind.

        FSDP2 does not reshard the root module after a forward (its backward would gather the same weights
        again), so after a forward under ``no_grad`` (validation, sampling) the root's parameters stay gathered,
        and the next training forward reuses them as they were then, not as the sharded parameters are now.
        Call it after such forwards and before the sharded parameters change outside the optimizer (the EMA
        swap of ``opensora.training.validation``). DDP and ColossalAI keep whole parameters: nothing to do.
        """
        from torch.distributed.fsdp import FSDPModule

        for module in self.unwrap().modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    # -- one step -----------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def set_grad_sync(self, enabled: bool) -> None:
        """Turns the gradient all-reduce / reduce-scatter on or off: off for the micro-steps of a gradient
        accumulation except the last (they accumulate locally). Call it before the micro-step's forward
        (DDP decides in the forward whether the backward will reduce)."""
        model = self.model
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = enabled  # what DDP.no_sync() toggles
        else:
            model.set_requires_gradient_sync(enabled)  # FSDP2

    @property
    def skips_on_device(self) -> bool:
        """True when a non-finite step is skipped on the device (no host sync): torch's fused Adam/AdamW take a
        ``found_inf`` tensor and leave weights, moments and step count untouched where it is 1. Otherwise
        :meth:`optimizer_step` reads the flag on the host (free on a CPU; one sync per step on a GPU)."""
        return bool(self.optimizer.defaults.get("fused"))

    def optimizer_step(self, max_norm: float = math.inf, found_inf: torch.Tensor | None = None) -> torch.Tensor:
        """Clips all gradients to a global L2 norm of ``max_norm``, applies the update and clears the gradients.

        The update is skipped, leaving weights and optimizer state exactly as they were, when the gradient norm
        is not finite or ``found_inf`` is true (a non-finite loss on any rank): the caller knows a step was
        skipped from ``~isfinite(norm) | found_inf``, the same rule, without asking.

        Args:
            max_norm: clipping threshold (inf: no clipping).
            found_inf: a 0-dim bool/float tensor on the device, the same on every rank; None: only the norm decides.
        Returns:
            the gradient norm before clipping: a tensor on the device, so logging it need not synchronise
            every step.
        """
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], max_norm)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        bad = nonfinite_flag(norm, found_inf)
        if self.skips_on_device:
            self.optimizer.found_inf = bad.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bad.item():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- state, for torch.distributed.checkpoint ----------------------------------------------------------
    def model_state_dict(self) -> dict:
        """Sharded (FSDP2: DTensor) or replicated model state, keyed by the model's parameter names (the trainable
        ones only, with ``trainable_only``)."""
        if self.trainable_only:
            return get_model_state_dict(self.model, options=StateDictOptions(ignore_frozen_params=True))
        return get_model_state_dict(self.model)

    def load_model_state_dict(self, state_dict: dict) -> None:
        if self.trainable_only:  # the frozen base is not in it (DCP has already refused a missing trainable key)
            set_model_state_dict(self.model, state_dict,
                                 options=StateDictOptions(ignore_frozen_params=True, strict=False))
            return
        set_model_state_dict(self.model, state_dict)

    def optimizer_state_dict(self) -> dict:
        """Optimizer state keyed by parameter names (not ids), so it reshards across world sizes."""
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_optimizer_state_dict(self, state_dict: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)

    def full_model_state_dict(self) -> dict:
        """Unsharded fp32-as-trained state on CPU, on rank 0 only (empty elsewhere). Collective."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class ColossalAIEngine(Engine):
    """The ColossalAI booster: ``LowLevelZeroPlugin`` (ZeRO stage 1/2, bf16) on CUDA as Open-Sora 1.0 trained,
    ``TorchDDPPlugin`` on CPU (gloo), so the booster path is exercised by the CPU tests.

    Under ZeRO the fp32 master weights live in the optimizer (sharded) and the model holds a bf16 working copy:
    checkpoints save the masters (gathered), never the rounded working copy, and loading sets both.
    """

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, family=None):
        from colossalai.booster import Booster
        from colossalai.booster.plugin import LowLevelZeroPlugin, TorchDDPPlugin

        if self.dist.device.type == "cuda":
            # cast_inputs=False: the booster would cast every floating input to bf16, the float timesteps of
            # rectified flow included (700.7 -> 700, steps of 4 above 512); STDiT casts its own inputs.
            # communication_dtype fp32: gradients are summed over ranks in fp32, as FSDP2's reduce_dtype.
            plugin = LowLevelZeroPlugin(stage=self.pcfg.zero_stage, precision=self.pcfg.param_dtype, initial_scale=1,
                                        cast_inputs=False, communication_dtype=DTYPES[self.pcfg.reduce_dtype])
        else:
            plugin = TorchDDPPlugin()
        self.booster = Booster(plugin=plugin)
        self.zero = isinstance(plugin, LowLevelZeroPlugin)
        # SP, checkpointing and compile from parallelize(); the booster does the data-parallel wrapping. The
        # parameters are not replaced, so the optimizer needs no rebinding.
        model = parallelize(model, self.pcfg, self.dist, family=family)
        self.model, self.optimizer, *_ = self.booster.boost(model, optimizer)
        if self.zero:
            self._found_inf = False
            self._guard_zero_update()
        return self.model, self.optimizer

    @property
    def schedule_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.optim  # the booster's wrapper holds the torch optimizer (ZeRO: over the masters)

    def backward(self, loss: torch.Tensor) -> None:
        self.booster.backward(loss, self.optimizer)

    def set_grad_sync(self, enabled: bool) -> None:
        if self.zero:
            # ZeRO-2 partitions gradients as they are reduced and cannot skip a reduction (colossalai asserts);
            # it accumulates the reduced partitions instead. ZeRO-1 can defer, as DDP does.
            if self.pcfg.zero_stage == 1:
                self.optimizer.require_grad_sync = enabled  # what LowLevelZeroOptimizer.no_sync() toggles
        else:
            self.model.module.require_backward_grad_sync = enabled  # TorchDDPModel.module is the DDP wrapper

    @property
    def skips_on_device(self) -> bool:
        return False  # both plugins read the norm on the host anyway

    def optimizer_step(self, max_norm: float = math.inf, found_inf: torch.Tensor | None = None) -> torch.Tensor:
        opt = self.optimizer
        if not self.zero:
            norm = opt.clip_grad_by_norm(max_norm)
            if not nonfinite_flag(norm, found_inf).item():
                opt.step()
            opt.zero_grad(set_to_none=True)
            return norm
        # LowLevelZero computes the norm of its reduced, partitioned gradients inside step() (fp64, one host
        # sync) and clips against its own threshold (0 = off): set the threshold, read the norm it computed.
        # In bf16 it never skips a step (BF16MixedPrecisionMixin.should_skip_step is False): a NaN norm makes
        # its clip factor NaN > 1 false, the NaN gradients reach AdamW and every master weight turns NaN. The
        # guard below sits between its norm and its update (the inner torch optimizer's step).
        opt._clip_grad_norm = max_norm if math.isfinite(max_norm) else 0.0
        self._found_inf = bool(found_inf.item()) if found_inf is not None else False
        opt.step()
        opt.zero_grad(set_to_none=True)
        return torch.tensor(float(opt._current_grad_norm), device=self.dist.device)

    def _guard_zero_update(self) -> None:
        """Makes LowLevelZero's inner optimizer skip its update when the norm LowLevelZero just computed (a host
        float by then) is not finite, or the loss was not: masters and moments stay as they were, and the
        working copy is re-gathered from the unchanged masters."""
        zero, inner = self.optimizer, self.optimizer.optim
        step = inner.step  # the bound method, with torch's hooks

        def guarded(closure=None):
            if self._found_inf or not math.isfinite(float(zero._current_grad_norm)):
                return None
            return step(closure)

        inner.step = guarded

    def model_state_dict(self) -> dict:
        if not self.zero:
            return get_model_state_dict(self.unwrap())
        self.model._force_wait_all_gather()  # finish the async parameter all-gathers of the last step
        state = get_model_state_dict(self.unwrap())  # buffers (and the names of the parameters)
        for name, full in self._gathered_masters().items():
            state[name] = full
        return state

    def load_model_state_dict(self, state_dict: dict) -> None:
        set_model_state_dict(self.unwrap(), state_dict)  # the working copy (rounded to bf16) and the buffers
        if self.zero:
            self._load_masters(state_dict)

    def optimizer_state_dict(self) -> dict:
        if self.zero:
            # LowLevelZeroOptimizer.state_dict() skips parameters that have no state yet, so the template a
            # resume builds from a fresh optimizer would have no exp_avg / exp_avg_sq / step and DCP would load
            # nothing into it. Gathered (unsharded) and keyed by parameter index: it loads on any world size.
            init_optimizer_state(self.optimizer.optim)
            return self.optimizer.state_dict()
        return get_optimizer_state_dict(self.unwrap(), self.optimizer.optim)

    def load_optimizer_state_dict(self, state_dict: dict) -> None:
        if self.zero:
            self.optimizer.load_state_dict(state_dict)
        else:
            set_optimizer_state_dict(self.unwrap(), self.optimizer.optim, state_dict)

    def full_model_state_dict(self) -> dict:
        if not self.zero:
            return get_model_state_dict(self.unwrap(), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = self.model_state_dict()
        if self.dist.rank != 0:
            return {}
        return {k: v.detach().cpu() for k, v in state.items()}

    def master_shards(self):
        """Under ZeRO: this rank's flat fp32 master shards, with the gather / scatter of their layout, so the EMA
        averages the masters (Open-Sora 1.0's EMA did), not the bf16 working copy the model holds."""
        if not self.zero:
            return None
        from opensora.training.ema import MasterShards

        masters = self.optimizer.get_working_to_master_map()
        params = dict(self.unwrap().named_parameters())
        tensors = {n: masters[id(p)] for n, p in params.items() if id(p) in masters}
        return MasterShards(tensors, lambda name, shard: self._gather_flat(params[name], shard),
                            lambda name, full, shard: self._scatter_flat(params[name], full, shard))

    # -- ZeRO's fp32 masters ------------------------------------------------------------------------------
    def _gather_flat(self, p: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        """The whole tensor, shaped like working parameter ``p``, of ``shard`` (laid out like ``p``'s flat padded
        master shard) from every rank of ``p``'s group. Collective."""
        from colossalai.zero.low_level._utils import all_gather_into_flat_tensor_nd, get_nd_world_size

        pg = self.optimizer.param_to_pg[p]
        full = torch.empty(shard.numel() * get_nd_world_size(pg), device=p.device, dtype=shard.dtype)
        all_gather_into_flat_tensor_nd(full, shard.detach().to(p.device).flatten(), pg)
        return full[: p.numel()].view(p.shape)  # the last shard is padded

    def _scatter_flat(self, p: torch.Tensor, full: torch.Tensor, shard: torch.Tensor) -> None:
        """Copies this rank's part of ``full`` (shaped like ``p``) into ``shard`` (laid out like its master shard)."""
        from colossalai.zero.low_level._utils import get_nd_rank, get_nd_world_size

        pg = self.optimizer.param_to_pg[p]
        flat = full.detach().to(shard.device, shard.dtype).flatten()
        pad = self.optimizer.get_param_padding_size(p)
        if pad:
            flat = torch.nn.functional.pad(flat, [0, pad])
        with torch.no_grad():
            shard.copy_(flat.chunk(get_nd_world_size(pg))[get_nd_rank(pg)].view_as(shard))

    def _gathered_masters(self) -> dict[str, torch.Tensor]:
        """Parameter name -> the full fp32 master weight, on every rank (all-gathers each master shard)."""
        masters = self.optimizer.get_working_to_master_map()
        # not trained (requires_grad=False) parameters have no master: the working copy is all there is
        return {name: self._gather_flat(p, masters[id(p)])
                for name, p in self.unwrap().named_parameters() if id(p) in masters}

    def _load_masters(self, state_dict: dict) -> None:
        """Copies each loaded fp32 weight into this rank's master shard (not the bf16-rounded working copy)."""
        masters = self.optimizer.get_working_to_master_map()
        for name, p in self.unwrap().named_parameters():
            if id(p) in masters:
                self._scatter_flat(p, state_dict[name], masters[id(p)])


def nonfinite_flag(norm: torch.Tensor, found_inf: torch.Tensor | None = None) -> torch.Tensor:
    """The skip rule of :meth:`Engine.optimizer_step`: a 0-dim bool tensor, true when the gradient norm is not
    finite or ``found_inf`` is set. On the device; nothing is read on the host."""
    bad = ~torch.isfinite(norm.detach().float())
    if found_inf is not None:
        bad = bad | found_inf.to(bad.device).bool()
    return bad


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Creates the per-parameter state of a fresh optimizer (AdamW: step, exp_avg, exp_avg_sq) without moving
    its parameters: one step on zero gradients at lr 0. A no-op once the optimizer has state.

    Written here rather than imported: torch's equivalent (``state_dict._init_optim_state``) is private.
    """
    if optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if any(p.grad is not None for p in params):
        raise RuntimeError("init_optimizer_state needs an optimizer without pending gradients")
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def build_engine(pcfg: ParallelConfig, dist_info: DistInfo) -> Engine:
    """The engine named by ``pcfg.engine`` ("fsdp", "ddp" or "colossalai")."""
    if pcfg.engine == "colossalai":
        return ColossalAIEngine(pcfg, dist_info)
    return Engine(pcfg, dist_info)


def _rebind_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, names: dict[int, str]):
    """``optimizer`` over ``model``'s current parameters (matched by name), if they were replaced."""
    current = dict(model.named_parameters())
    old = [p for g in optimizer.param_groups for p in g["params"]]
    if all(current.get(names.get(id(p))) is p for p in old):
        return optimizer
    if optimizer.state:
        raise ValueError("Engine.prepare needs a fresh optimizer (its state cannot follow re-sharded parameters)")
    unknown = [p for p in old if id(p) not in names]
    if unknown:
        raise ValueError(f"the optimizer holds {len(unknown)} tensors that are not parameters of the model")
    # Swap the parameters inside the existing param groups: keeps the class, every hyper-parameter and
    # any per-group setting (e.g. no weight decay for some parameters).
    for group in optimizer.param_groups:
        group["params"] = [current[names[id(p)]] for p in group["params"]]
    return optimizer
