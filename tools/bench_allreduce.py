"""Time of the data loader's per-batch agreement: one gloo all-reduce of 3 int64 on the host
(``opensora.data.sampler.ResumableDataLoader``'s step group), as docs/training.md quotes it::

    torchrun --nproc_per_node 2 tools/bench_allreduce.py
"""

import time

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo")
    group = dist.new_group(backend="gloo")
    counts = torch.zeros(3, dtype=torch.long)
    for _ in range(200):  # warm-up
        dist.all_reduce(counts, group=group)
    dist.barrier()
    start, n = time.perf_counter(), 2000
    for _ in range(n):
        dist.all_reduce(counts, group=group)
    seconds = (time.perf_counter() - start) / n
    if dist.get_rank() == 0:
        print(f"{seconds * 1e3:.3f} ms per all-reduce of 3 int64 (gloo, {dist.get_world_size()} ranks)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
