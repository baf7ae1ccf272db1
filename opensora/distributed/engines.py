"""One small interface over the training engines: torch FSDP2 (default), torch DDP, the ColossalAI booster.

The trainer only talks to an :class:`Engine`::

    engine = build_engine(pcfg, dist_info)
    model, optimizer = engine.prepare(model, optimizer)
    engine.set_grad_sync(last_micro_step)    # gradient accumulation; before the forward
    with engine.autocast():
        loss = ...
    engine.backward(loss)
    grad_norm = engine.clip_grad_norm(1.0)
    engine.optimizer_step()

and checkpoints through ``model_state_dict`` / ``optimizer_state_dict`` (sharded, for DCP) and their
``load_*`` counterparts. ColossalAI is imported only when that engine is built.
"""

from __future__ import annotations

import contextlib

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

    # -- set-up -----------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """Parallelizes ``model`` and returns ``(model, optimizer)`` to train with.

        Args:
            model: the STDiT, on any device.
            optimizer: a fresh optimizer (no state yet) over ``model``'s parameters. FSDP2 replaces the
                parameters, so its param groups are pointed at the new ones (same class and settings).
        """
        names = {id(p): n for n, p in model.named_parameters()}
        self.model = parallelize(model, self.pcfg, self.dist)
        self.optimizer = _rebind_optimizer(optimizer, unwrap(self.model), names)
        return self.model, self.optimizer

    def unwrap(self) -> nn.Module:
        """The STDiT itself (for its config, EMA updates, ...)."""
        return unwrap(self.model)

    def autocast(self):
        """Context for the forward pass: bf16 autocast for DDP on CUDA; FSDP2 casts through its policy."""
        if self.pcfg.engine == "ddp" and uses_mixed_precision(self.pcfg, self.dist):
            return torch.autocast("cuda", dtype=DTYPES[self.pcfg.param_dtype])
        return contextlib.nullcontext()

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

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clips all gradients to a global L2 norm of ``max_norm``; returns the norm before clipping (a tensor
        on the device, so logging it need not synchronise every step)."""
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def optimizer_step(self) -> None:
        """Applies the update and clears the gradients."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- state, for torch.distributed.checkpoint ----------------------------------------------------------
    def model_state_dict(self) -> dict:
        """Sharded (FSDP2: DTensor) or replicated model state, keyed by the STDiT's parameter names."""
        return get_model_state_dict(self.model)

    def load_model_state_dict(self, state_dict: dict) -> None:
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
    ``TorchDDPPlugin`` on CPU (gloo), so the booster path is exercised by the CPU tests."""

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        from colossalai.booster import Booster
        from colossalai.booster.plugin import LowLevelZeroPlugin, TorchDDPPlugin

        if self.dist.device.type == "cuda":
            precision = self.pcfg.param_dtype
            plugin = LowLevelZeroPlugin(stage=self.pcfg.zero_stage, precision=precision, initial_scale=1)
        else:
            plugin = TorchDDPPlugin()
        self.booster = Booster(plugin=plugin)
        self.zero = isinstance(plugin, LowLevelZeroPlugin)
        # SP, checkpointing and compile from parallelize(); the booster does the data-parallel wrapping. The
        # parameters are not replaced, so the optimizer needs no rebinding.
        model = parallelize(model, self.pcfg, self.dist)
        self.model, self.optimizer, *_ = self.booster.boost(model, optimizer)
        return self.model, self.optimizer

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

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        if not self.zero:
            return self.optimizer.clip_grad_by_norm(max_norm)
        # LowLevelZero clips inside step() against its own threshold; it only reports the norm afterwards, so
        # compute it here the way step() does (over the reduced, partitioned gradients of every group).
        opt = self.optimizer
        opt._clip_grad_norm = max_norm
        norms = []
        for group_id in range(opt.num_param_groups):
            norm = 0.0
            for grad_store in opt.pg_to_grad_store.values():
                grads = grad_store.get_working_grads_by_group_id(group_id)
                norm += opt._compute_grad_norm(dp_pg=grad_store.torch_pg, gradients=grads)
            norms.append(norm)
        return torch.tensor(sum(n**2 for n in norms) ** 0.5, device=self.dist.device)

    def model_state_dict(self) -> dict:
        if self.zero:
            self.model._force_wait_all_gather()  # finish the async parameter all-gathers of the last step
        return get_model_state_dict(self.unwrap())

    def load_model_state_dict(self, state_dict: dict) -> None:
        set_model_state_dict(self.unwrap(), state_dict)
        if self.zero:
            self.model.update_master_params()  # copy the loaded working weights into ZeRO's fp32 shards

    def optimizer_state_dict(self) -> dict:
        if self.zero:
            # Gathered (unsharded) and keyed by parameter index: it loads back on any world size.
            return self.optimizer.state_dict()
        return get_optimizer_state_dict(self.unwrap(), self.optimizer.optim)

    def load_optimizer_state_dict(self, state_dict: dict) -> None:
        if self.zero:
            self.optimizer.load_state_dict(state_dict)
        else:
            set_optimizer_state_dict(self.unwrap(), self.optimizer.optim, state_dict)

    def full_model_state_dict(self) -> dict:
        if self.zero:
            self.model._force_wait_all_gather()
        return get_model_state_dict(self.unwrap(), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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
