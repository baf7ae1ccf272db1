"""torchrun worker for tests/test_pipeline_caption.py: the caption stage sharded over gloo ranks, with decoding and
``generate`` replaced by stand-ins so that a rank can be made slow, or crash, on cue.

    torchrun --standalone --nproc_per_node 2 tests/dist_workers/caption_worker.py --input M --output O --record DIR \
        [--pg-timeout-s 3] [--slow-rank 1 --slow-s 4] [--crash-rank 1 --crash-after 1] [--hang-rank 1 --stall-s 3]

Every decoded row is appended to ``DIR/decoded.rank<R>.jsonl``, so a test can tell which rows a run (re)did.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, when run as a script

from data_pipeline import caption as cap, pipeline  # noqa: E402
from data_pipeline.captioners import FAMILIES  # noqa: E402
from data_pipeline.config import CaptionConfig, RunnerConfig  # noqa: E402
from opensora.distributed import exit_process  # noqa: E402
from opensora.utils import append_jsonl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--pg-timeout-s", type=float, default=1800.0, help="the process group's collective timeout")
    parser.add_argument("--slow-rank", type=int, default=-1)
    parser.add_argument("--slow-s", type=float, default=0.0, help="seconds the slow rank spends in every generate")
    parser.add_argument("--crash-rank", type=int, default=-1)
    parser.add_argument("--crash-after", type=int, default=0, help="the crash rank dies in generate call N + 1")
    parser.add_argument("--hang-rank", type=int, default=-1, help="this rank never returns from its first generate")
    parser.add_argument("--stall-s", type=float, default=0.0, help="runner.stall_s")
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    calls = 0

    def fake_read(path, positions, layout):
        append_jsonl(Path(args.record) / f"decoded.rank{rank}.jsonl", {"path": path})
        return [np.zeros((4, 4, 3), np.uint8)]

    def fake_generate(images, cfg, max_new_tokens):
        nonlocal calls
        calls += 1
        if rank == args.crash_rank and calls > args.crash_after:
            os._exit(3)  # a hard crash: no exception, no clean-up (a segfault, the OOM killer)
        if rank == args.hang_rank:
            # A call stuck in C (a CUDA sync on a wedged GPU): SIGALRM, the row limit of workers=0, cannot end it.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            while True:
                time.sleep(3600)
        if rank == args.slow_rank:
            time.sleep(args.slow_s)
        return [("a cat sits on a mat", False, 6)] * len(images)

    cap.read_frames, cap.generate = fake_read, fake_generate
    cap.family_of = lambda model: FAMILIES["llava"]  # the stand-in reads frames as an image family's
    # The shard waits in seconds instead of minutes; a rank busy in generate for longer than the stall limit
    # must still count as alive.
    pipeline.SHARD_POLL_S, pipeline.SHARD_HEARTBEAT_S, pipeline.SHARD_STALL_S = 0.1, 0.2, 2.0
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.pg_timeout_s))
    cfg = CaptionConfig(model="stand-in", batch_size=2, task_batches=1)
    runner = RunnerConfig(workers=0, progress=False, stall_s=args.stall_s)
    pipeline.run_one("caption", cfg, args.input, args.output, runner)
    exit_process(0)


if __name__ == "__main__":
    main()
