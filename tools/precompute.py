"""Fills the latent cache of a recipe's stages: VAE latents and text embeddings of every clip, once.

Training with ``data.cache_dir`` set reads latents from the cache instead of running the frozen VAE and
T5 every step (``opensora/data/latent_cache.py``); this command writes them, with the encoders the
stage will train with (those of its init bundle)::

    python tools/precompute.py --config configs/opensora_v1/recipe.yaml --stage pretrain-16x256 \\
        --set data.cache_dir=/data/cache/v1

One process per GPU, each encoding its share of the clips (``index % WORLD_SIZE == RANK``; no process
group is needed, so the processes never wait for each other)::

    torchrun --nproc_per_node 8 tools/precompute.py --config RECIPE --stage NAME

Without ``--stage`` every stage with ``data.cache_dir`` and steps > 0 is filled. Re-running resumes:
entries already in the cache are skipped, so a killed run loses at most the batch it was encoding. The
end of each stage prints what was encoded, skipped (already cached) and failed; failed clips (broken or
changed files) are listed in ``--failures`` (default ``CACHE_DIR/precompute_failures.jsonl``), as
training lists them. Exit status: 0 when done (failed clips are records, as in the data pipeline), 1 when
every clip of a stage failed, 2 on bad input (recipe key, stage name, no cache_dir, unreadable bundle).

The encoders' compute dtype does not change the keys (``--dtype bfloat16`` is about twice as fast on a GPU,
``float32`` gives the exact latents); training in bf16 finds entries made in fp32 and the other way round.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from opensora.bundle import BUNDLE_FILE, load_bundle_config, load_encoders
from opensora.config import ConfigError
from opensora.data.latent_cache import PrecomputeReport, precompute
from opensora.training import load_recipe
from opensora.training.config import RecipeConfig, check_recipe_autoencoder, stage_data_config
from opensora.training.init import write_new_bundle

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BUNDLE_WAIT_S = 600  # ranks > 0 wait this long for rank 0 to write a new model's init bundle


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="recipe file (YAML/TOML)")
    p.add_argument("--stage", default=None, help="fill only this stage's cache (default: every stage with a cache_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set data.cache_dir=/data/cache (repeatable)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="run directory, where a new model's init bundle is written as training writes it "
                        "(default: outputs/<config name>, as train/train.py)")
    p.add_argument("--batch-size", type=int, default=8, help="clips of one bucket encoded together")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="what the encoders compute in")
    p.add_argument("--store-dtype", default="float32", choices=sorted(DTYPES),
                   help="dtype of the stored tensors (bfloat16 halves the cache)")
    p.add_argument("--failures", type=Path, default=None,
                   help="JSONL of failed clips (default: CACHE_DIR/precompute_failures.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _rank_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} / WORLD_SIZE={world} from the environment: need 0 <= RANK < WORLD_SIZE")
    return rank, world, int(os.environ.get("LOCAL_RANK", 0))


def encoder_bundle(recipe: RecipeConfig, index: int, run_dir: Path, rank: int) -> Path:
    """The bundle whose VAE and text encoder stage ``index`` trains with.

    An export carries its init's encoders unchanged (``export_bundle`` copies them), so a stage that starts
    from the previous stage's export uses those of the nearest earlier stage with an init of its own; the
    cache can then be filled before the earlier stages have trained. A new model's init bundle is the one
    training writes and reuses (``OUTPUT_DIR/<stage>/init``), written here by rank 0 if it is not there yet.
    """
    first = index
    while recipe.stages[first].init.from_previous:
        first -= 1  # stages[0] always has an init of its own (RecipeConfig checks it)
    stage = recipe.stages[first]
    if stage.init.bundle is not None:
        path = Path(stage.init.bundle).expanduser()
        load_bundle_config(path)  # raises naming the directory if it is no bundle
        return path
    path = run_dir / stage.name / "init"
    if rank == 0:
        return write_new_bundle(path, stage.init, stage.model, dict(stage.model_overrides), recipe.diffusion)
    deadline = time.monotonic() + BUNDLE_WAIT_S
    while not (path / BUNDLE_FILE).is_file():  # written last by rank 0
        if time.monotonic() > deadline:
            raise ConfigError(f"rank {rank}: rank 0 did not write the init bundle {path} within {BUNDLE_WAIT_S} s")
        time.sleep(1)
    return path


def _summary(name: str, report: PrecomputeReport, failures: Path, rank: int, world: int) -> str:
    who = f" (rank {rank} of {world})" if world > 1 else ""
    line = (f"stage '{name}'{who}: {report.total} clips: {report.written} encoded, {report.existing} skipped "
            f"(already cached), {len(report.failed)} failed")
    if report.failed:
        line += f" (listed in {failures}; first: {report.failed[0]['path']}: {report.failed[0]['error']})"
    return line


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        recipe = load_recipe(args.config, args.overrides)
        rank, world, local_rank = _rank_world()
        names = [s.name for s in recipe.stages]
        if args.stage is not None and args.stage not in names:
            raise ConfigError(f"--stage {args.stage!r}: the recipe has no such stage; its stages: {', '.join(names)}")
        jobs = []
        for index, stage in enumerate(recipe.stages):
            if args.stage is not None and stage.name != args.stage:
                continue
            data_cfg = stage_data_config(recipe, stage)
            if data_cfg.cache_dir is None or stage.steps == 0:
                if args.stage is not None:
                    why = "has no data.cache_dir (set data.cache_dir or stages.N.data.cache_dir, e.g. with --set)" \
                        if data_cfg.cache_dir is None else "has steps: 0 (it trains on no data)"
                    raise ConfigError(f"stage '{stage.name}' {why}")
                continue
            jobs.append((index, stage, data_cfg))
        if not jobs:
            raise ConfigError(f"{args.config}: no stage with steps > 0 has data.cache_dir: nothing to precompute "
                              "(set data.cache_dir, e.g. --set data.cache_dir=DIR)")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if args.device is not None:
        device = torch.device(args.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    run_dir = args.output_dir or Path("outputs") / args.config.stem
    totals = PrecomputeReport()
    status = 0
    loaded: dict[Path, tuple] = {}  # stages sharing a bundle share its encoders
    for index, stage, data_cfg in jobs:
        try:
            bundle = encoder_bundle(recipe, index, run_dir, rank)
            key = bundle.resolve()
            if key not in loaded:
                loaded.clear()  # one pair of encoders in memory at a time
                loaded[key] = load_encoders(bundle, device=device, dtype=DTYPES[args.dtype])
            vae, text_encoder = loaded[key]
            check_recipe_autoencoder(recipe, vae.shape, bundle)  # as training checks it: the cache is for that VAE
            failures = args.failures or Path(data_cfg.cache_dir) / "precompute_failures.jsonl"
            report = precompute(data_cfg, vae, text_encoder, data_cfg.cache_dir, rank=rank, world_size=world,
                                batch_size=args.batch_size, device=device, dtype=DTYPES[args.store_dtype],
                                failures_path=failures, progress=not args.no_progress)
        except (ConfigError, FileNotFoundError, ValueError, OSError) as err:
            # A bad manifest, bundle or encoder directory: named, and the stages already filled stay filled.
            print(f"error: stage '{stage.name}': {type(err).__name__}: {err}", file=sys.stderr)
            return 2
        print(_summary(stage.name, report, failures, rank, world), flush=True)
        if report.total and not report.written and not report.existing:
            print(f"error: stage '{stage.name}': every clip failed; nothing in the cache can be trained on",
                  file=sys.stderr)
            status = 1
        totals.total += report.total
        totals.written += report.written
        totals.existing += report.existing
        totals.failed += report.failed
    if len(jobs) > 1:
        print(f"precompute: {len(jobs)} stages, {totals.total} clips: {totals.written} encoded, {totals.existing} "
              f"skipped (already cached), {len(totals.failed)} failed", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
