"""Exponential moving average of the model weights, in fp32, sharded like the fp32 weights being trained.

The EMA keeps one fp32 copy per parameter, made from the fp32 weight the optimizer updates: under FSDP2 the
parameters themselves are sharded fp32 DTensors, so each rank keeps only its shard of the average and
``state_dict`` goes to ``torch.distributed.checkpoint`` as the sharded tensors. Under ColossalAI's ZeRO the model
holds a bf16 working copy and the fp32 masters live in the optimizer, sharded flat: the engine hands them over as
:class:`MasterShards` and the EMA averages the masters (as Open-Sora 1.0 did), not the rounded working copy; its
state dict and the validation swap gather them to whole tensors. Buffers (STDiT's null caption) are not averaged:
the export takes them from the model.

Update rule (DiT's ``update_ema``): ``ema = decay * ema + (1 - decay) * param`` after every optimizer step,
with an optional warm-up ``decay_t = min(decay, (1 + t) / (10 + t))`` (TensorFlow's
``ExponentialMovingAverage(num_updates=...)``) so that the EMA of a short run is not just its init.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor


@dataclass
class MasterShards:
    """fp32 master weights an engine keeps apart from the model's parameters (ZeRO), for the EMA to follow.

    Args:
        tensors: parameter name -> this rank's fp32 master (any layout, e.g. a flat padded shard); parameters
            without one (not trained) are averaged from the parameter itself.
        gather: (name, a tensor laid out like that master) -> the whole tensor, shaped like the parameter.
            Collective: every rank calls it for the same names in the same order.
        scatter: (name, a whole tensor, a tensor laid out like that master) -> fills the latter with this rank's
            part of the former.
    """

    tensors: dict[str, torch.Tensor]
    gather: Callable[[str, torch.Tensor], torch.Tensor]
    scatter: Callable[[str, torch.Tensor, torch.Tensor], None]


class EMA:
    """fp32 EMA of ``model``'s parameters (``torch.distributed.checkpoint`` Stateful).

    Args:
        model: the model being trained (after ``parallelize``: its parameters may be DTensors).
        decay: the EMA decay.
        warmup: ramp the decay up as ``(1 + step) / (10 + step)`` until it reaches ``decay``.
        masters: the engine's fp32 masters when the model holds a lower-precision working copy
            (``Engine.master_shards()``); None: the parameters are the fp32 weights.
        trainable_only: average only the parameters that train (a LoRA stage's adapters; the frozen base is its
            own average).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False, masters: MasterShards | None = None,
                 trainable_only: bool = False):
        self.decay = float(decay)
        self.warmup = warmup
        self.masters = masters
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]  # what the validation swap writes into
        held = masters.tensors if masters is not None else {}
        self.sources = [held.get(n, p) for n, p in zip(self.names, self.params)]  # what the average follows
        self._sharded = [n in held for n in self.names]
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.sources]

    def decay_at(self, step: int) -> float:
        """The decay applied by the update that completes optimizer step ``step`` (1-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int, keep: torch.Tensor | None = None) -> None:
        """Moves the average towards the current weights; call after the optimizer step ``step``.

        fp32 parameters (FSDP2 shards, CPU runs) are read in place. Lower-precision ones (the bf16 working copy
        that ZeRO keeps in the model, whole on every rank) are upcast a group of at most ``UPDATE_CHUNK``
        elements at a time: casting them all at once made an fp32 copy of the whole model every step (3 GB
        for STDiT-XL/2) on top of the average itself.

        Args:
            step: the optimizer step just taken (1-based; sets the warm-up decay).
            keep: a 0-dim bool tensor on the device, for a step whose skip decision is still on the device
                (``Engine.skips_on_device``): false leaves the average exactly as it was (a weight of 0), with
                no host sync. None: a normal update.
        """
        weight = 1.0 - self.decay_at(step)
        if keep is not None:
            gated = keep.to(torch.float32) * weight  # 0-dim, on the device
        for shadow, params in _chunks(self.shadow, self.sources, UPDATE_CHUNK):
            src = [p.detach().to(torch.float32) for p in params]
            if keep is None:
                torch._foreach_lerp_(shadow, src, weight)
            else:  # local shards: a device tensor as the weight does not mix with DTensors
                torch._foreach_lerp_([_local(t) for t in shadow], [_local(t) for t in src], [gated] * len(src))

    def whole(self, i: int) -> torch.Tensor:
        """The average of parameter ``i``, shaped like it (sharded DTensor under FSDP2; gathered, a collective,
        from ZeRO master shards)."""
        if self._sharded[i]:
            return self.masters.gather(self.names[i], self.shadow[i])
        return self.shadow[i]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameter name -> fp32 average (sharded DTensors under FSDP2; whole tensors, gathered, under ZeRO)."""
        return {name: self.whole(i) for i, name in enumerate(self.names)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copies a saved average in place (DCP loads into the tensors of :meth:`state_dict`)."""
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        with torch.no_grad():
            for i, (name, tensor) in enumerate(zip(self.names, self.shadow)):
                if self._sharded[i]:
                    self.masters.scatter(name, state[name], tensor)
                elif state[name] is not tensor:
                    tensor.copy_(state[name])

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside: the model's parameters hold the average (cast to their dtype); after: exactly their previous
        values. Works on FSDP2 shards shard by shard, and on ZeRO's working copy parameter by parameter (each
        average gathered in turn: collective). The engine's fp32 masters are not touched."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for i, p in enumerate(self.params):
                p.copy_(self.whole(i))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's full state with the averaged parameters, unsharded, fp32, on CPU.

        Collective under FSDP2 (every rank must call it); every rank gets the whole state.

        Args:
            model: the trained model, for its buffers.
        """
        out = {}
        for name, tensor in model.state_dict().items():
            out[name] = _full(tensor)
        for i, name in enumerate(self.names):
            out[name] = _full(self.whole(i)).to(torch.float32)
        return out


# Elements of lower-precision parameters upcast per EMA update call: 64 MiB of fp32 temporaries at most, and few
# enough calls that the per-call overhead is negligible (STDiT-XL/2 has 760M parameters: 12 calls).
UPDATE_CHUNK = 1 << 24


def _chunks(shadow: list[torch.Tensor], params: list[torch.Tensor], limit: int):
    """Consecutive (shadow, params) groups; a group of fp32 parameters is unbounded (it copies nothing)."""
    start, size = 0, 0
    for i, p in enumerate(params):
        if p.dtype != torch.float32 and size and size + p.numel() > limit:
            yield shadow[start:i], params[start:i]
            start, size = i, 0
        size += p.numel() if p.dtype != torch.float32 else 0
    if start < len(params):
        yield shadow[start:], params[start:]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: in-place ops reach the DTensor), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().clone()
