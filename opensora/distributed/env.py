"""Process-group set-up: one call that works under torchrun, `colossalai run`, and as a plain single process."""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int  # global rank
    world_size: int  # number of processes
    local_rank: int  # rank on this node (selects the GPU)
    device: torch.device  # cuda:<local_rank> or cpu
    backend: str  # "nccl" on CUDA, "gloo" on CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialises the default process group (idempotent) and returns this process's place in it.

    Under torchrun the rendezvous comes from the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...). Without
    it a world of one is created on an in-memory store, so FSDP2, DCP and the collectives in the trainer run
    the same code path on one CPU or GPU as on many.

    Args:
        backend: "nccl" or "gloo"; default nccl when CUDA is available, else gloo.
        timeout_s: collective timeout; large because a checkpoint save or export can stall other ranks.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun contract: absent means a single process
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs CUDA, but torch.cuda.is_available() is False")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        backend=dist.get_backend(),
    )


def destroy_distributed() -> None:
    """Tears down the default process group if there is one (the trainer's ``close`` and tests call it)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int = 0):
    """Ends a launched worker process with ``code``, skipping the interpreter's final C++ teardown.

    Measured here (torch 2.13, gloo, 2 ranks, tests/dist_workers/engine_worker.py run 50 times): one run
    aborted with "terminate called without an active exception" *after* ``destroy_process_group`` and after
    the atexit handlers had run, i.e. in destructors during interpreter finalisation. torchrun then reports the
    job as failed although every result had been written. The entry scripts launched by torchrun therefore
    end here: the atexit handlers still run (DataLoader workers, TensorBoard / W&B flushes, torch's own), the
    standard streams are flushed, then ``os._exit`` leaves without the finalisation step.
    """
    atexit._run_exitfuncs()  # the handlers a normal exit would run; os._exit alone would skip them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe must not change the exit code
            pass
    os._exit(code)


def barrier() -> None:
    """``dist.barrier`` when a process group exists; a no-op otherwise (checkpoint code runs in both)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """World size, 1 without a process group."""
    return dist.get_world_size() if dist.is_initialized() else 1
