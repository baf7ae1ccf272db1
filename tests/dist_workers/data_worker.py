"""torchrun worker for tests/test_train_data_trust.py (gloo, CPU): the trainer's data path on 2 data-parallel ranks.

    torchrun --standalone --nproc_per_node 2 tests/dist_workers/data_worker.py dp-broken --recipe R --out DIR
    ... dp-failing --recipe R --out DIR

``dp-broken``: data parallelism over both ranks (no sequence parallelism), one sample per rank per forward, and
rank 1's first clip load fails, so its whole first batch is broken while rank 0's loads. Records, at every
micro-step, the sampler's position and the indices each rank trained on; rank 0 writes every rank's record.
``dp-failing``: the same, but every load fails on rank 1 (half the samples): each rank records where the trainer
stopped and with which error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, when run as a script

from opensora.distributed import exit_process  # noqa: E402
from tests.dist_workers.engine_worker import run_mode  # noqa: E402


def flaky_trainer(args, info, failing: int):
    """The recipe's first stage on DDP, one sample per rank per forward; rank 1's first ``failing`` loads fail."""
    from opensora.data.dataset import VideoDataset
    from opensora.training import Trainer, load_recipe
    from opensora.training.recipe import init_dir_of

    if info.rank == 1:
        load, calls = VideoDataset.load, [0]

        def flaky_load(self, index, random_start=None):
            calls[0] += 1
            if calls[0] <= failing:
                raise OSError(f"simulated read error on rank 1 (index {index})")
            return load(self, index, random_start)

        VideoDataset.load = flaky_load
    recipe = load_recipe(args.recipe, ["parallel.engine=ddp", "stages.0.micro_batch_size=1"])
    run_dir, stage = Path(args.out) / "run", recipe.stages[0]
    return Trainer(recipe, stage, run_dir, init_dir_of(recipe, 0, run_dir, info), info)


def cmd_dp_failing(args, info) -> dict:
    from opensora.config import ConfigError

    trainer = flaky_trainer(args, info, failing=10**9)
    try:
        for _ in range(10):
            trainer.train_step()
        error = None
    except ConfigError as err:
        error = str(err)
    out = dict(error=error, step=trainer.step, state=trainer.sampler.state_dict())
    trainer.close()
    return out


def cmd_dp_broken(args, info) -> dict:
    trainer = flaky_trainer(args, info, failing=1)
    seen, forward_backward = [], trainer.steps.forward_backward

    def recorded(batch, step, micro):
        seen.append(dict(consumed=trainer.sampler.samples_consumed(), epoch=trainer.sampler.epoch,
                         index=batch["index"].tolist()))
        return forward_backward(batch, step, micro)

    trainer.steps.forward_backward = recorded
    for _ in range(2):
        trainer.train_step()
    state = trainer.sampler.state_dict()
    trainer.close()
    return dict(seen=seen, state=state)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["dp-broken", "dp-failing"])
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=True)
    return run_mode(p.parse_args(argv), {"dp-broken": cmd_dp_broken, "dp-failing": cmd_dp_failing})


if __name__ == "__main__":
    exit_process(main())
