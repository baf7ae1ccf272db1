"""torchrun worker for tests/test_compile.py: ``compile_check`` on every rank (gloo, CPU, fp32).

    torchrun --standalone --nproc_per_node 2 tests/dist_workers/compile_worker.py --sp-size 2 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, when run as a script

from opensora.distributed import ParallelConfig, destroy_distributed, exit_process, init_distributed  # noqa: E402
from opensora.distributed.compile_check import compile_check  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", default="fsdp")
    p.add_argument("--sp-size", type=int, default=2)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--backend", default="aot_eager")
    p.add_argument("--batch-sizes", default="2,1,3")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    info = init_distributed()
    pcfg = ParallelConfig(engine=args.engine, sp_size=args.sp_size, grad_ckpt=args.grad_ckpt,
                          compile_backend=args.backend, param_dtype="fp32")
    result = compile_check(pcfg, info, batch_sizes=[int(b) for b in args.batch_sizes.split(",")])
    results = [None] * info.world_size
    dist.all_gather_object(results, result)
    if info.rank == 0:
        Path(args.out, "result.json").write_text(json.dumps(results))
    dist.barrier()
    destroy_distributed()
    return 0


if __name__ == "__main__":
    exit_process(main())
