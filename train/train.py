"""Train a recipe: its stages in order, each from the previous stage's export; resumable, budgeted.

One process (CPU or one GPU)::

    python train/train.py --config configs/demo/train.yaml --output-dir runs/demo

One node, 8 GPUs (torchrun; FSDP2 by default, or ``--set parallel.engine=colossalai`` for ZeRO-2)::

    torchrun --nproc_per_node 8 train/train.py --config configs/opensora_v1/recipe.yaml --output-dir runs/v1

Several nodes (run on every node; or see train/slurm_example.sh)::

    torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        train/train.py --config configs/opensora_v1/recipe.yaml --output-dir /shared/runs/v1

With ColossalAI's launcher (same arguments)::

    colossalai run --nproc_per_node 8 --hostfile hostfile train/train.py --config configs/opensora_v1/recipe.yaml \\
        --output-dir /shared/runs/v1 --set parallel.engine=colossalai

Re-running the same command resumes: finished stages are skipped, the unfinished one continues from its latest
checkpoint. ``--stage NAME`` runs one stage alone; ``--max-steps K`` stops the running stage at step K with a
checkpoint; ``--set key=value`` overrides any recipe field (``--set stages.1.steps=2000``). SIGTERM and a
reached budget write a checkpoint and exit with status 0; a config mistake exits 2, a diverged run (too many
non-finite steps in a row) 3, with nothing non-finite written. See docs/training.md.
"""

from __future__ import annotations

import time

PROCESS_START = time.monotonic()  # before the heavy imports: the cost ledger bills start-up from here

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opensora.config import ConfigError
from opensora.distributed import destroy_distributed, exit_process, init_distributed
from opensora.training import NonFiniteError, load_recipe, run_recipe


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="recipe file (YAML/TOML)")
    p.add_argument("--output-dir", type=Path, default=None, help="run directory (default: outputs/<config name>)")
    p.add_argument("--max-steps", type=int, default=None, help="stop the running stage at this step, with a checkpoint")
    p.add_argument("--stage", default=None, help="run only this stage")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set stages.0.lr=1e-4 (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.max_steps is not None and args.max_steps < 0:
        print("error: --max-steps must be >= 0", file=sys.stderr)
        return 2
    output_dir = args.output_dir or Path("outputs") / args.config.stem
    dist_info = init_distributed()
    try:
        reason = run_recipe(recipe, output_dir, dist_info, max_steps=args.max_steps, only_stage=args.stage,
                            started=PROCESS_START)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:  # diverged: nothing non-finite was written; the message says where to resume
        print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        destroy_distributed()
    if dist_info.rank == 0:
        print(f"training {'finished' if reason == 'finished' else 'stopped: ' + reason}; run directory {output_dir}")
    return 0


if __name__ == "__main__":
    exit_process(main())  # not SystemExit: see exit_process (a rare abort in torch's teardown at exit)
