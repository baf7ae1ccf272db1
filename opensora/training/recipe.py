"""Runs a recipe's stages in order: skips finished ones, resumes the unfinished one, hands each stage the
previous stage's export.

Run directory (read by tools/demo.py, tools/cost.py and tools/sample.py)::

    OUTPUT_DIR/recipe.yaml                       # the resolved recipe of the latest run
    OUTPUT_DIR/ledger.jsonl                      # cost ledger of all stages (opensora.accounting)
    OUTPUT_DIR/<stage>/init/                     # a new model's init bundle (only for init.vae/text_encoder)
    OUTPUT_DIR/<stage>/checkpoints/step-XXXXXXXX/  # sharded DCP checkpoints, newest k kept
    OUTPUT_DIR/<stage>/metrics.jsonl             # one JSON object per logged step
    OUTPUT_DIR/<stage>/tensorboard/
    OUTPUT_DIR/<stage>/failures.jsonl            # broken or skipped clips
    OUTPUT_DIR/<stage>/export/                   # bundle of the EMA weights; bundle.yaml (last) = stage finished
                                                 # (a LoRA stage: + lora_adapters.safetensors, pytorch_lora_weights.safetensors)
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from pathlib import Path

from opensora.bundle import BUNDLE_FILE
from opensora.config import ConfigError, to_yaml
from opensora.distributed import DistInfo, barrier
from opensora.training.config import RecipeConfig, StageConfig
from opensora.training.init import write_new_bundle
from opensora.training.trainer import StopFlag, Trainer
from opensora.utils import atomic_write_path

RECIPE_FILE = "recipe.yaml"


def export_dir(run_dir: Path, stage: StageConfig) -> Path:
    """Where a stage's final bundle goes."""
    return Path(run_dir) / stage.name / "export"


def is_finished(run_dir: Path, stage: StageConfig) -> bool:
    """A stage is finished when its export's ``bundle.yaml`` (written last) exists."""
    return (export_dir(run_dir, stage) / BUNDLE_FILE).is_file()


def init_dir_of(recipe: RecipeConfig, index: int, run_dir: Path, dist_info: DistInfo) -> Path:
    """The bundle stage ``index`` starts from; writes a new model's init bundle on rank 0 if needed (collective).

    A stage with ``init.lora: continue`` starts from the previous stage's own start (its base, unmerged) and
    :func:`adapters_of` gives the adapters to load over it.

    Raises ConfigError when the stage starts from a previous stage that has not finished.
    """
    stage = recipe.stages[index]
    init = stage.init
    if init.bundle is not None:
        path = Path(init.bundle).expanduser()
        if not (path / BUNDLE_FILE).is_file():
            raise ConfigError(f"stages[{index}].init.bundle: {path} is not a pipeline bundle (no {BUNDLE_FILE})")
        return path
    if init.vae is not None:
        path = Path(run_dir) / stage.name / "init"
        if dist_info.rank == 0:
            write_new_bundle(path, init, stage.model, dict(stage.model_overrides), recipe.diffusion)
        barrier()
        return path
    previous = _finished_previous(recipe, index, run_dir)
    if init.lora == "continue":  # the previous stage's own base: its adapters are trained on, unmerged
        return init_dir_of(recipe, index - 1, run_dir, dist_info)
    return export_dir(run_dir, previous)


def adapters_of(recipe: RecipeConfig, index: int, run_dir: Path) -> Path | None:
    """The export whose adapters stage ``index`` trains on (``init.lora: continue``: the previous stage's), or None.

    Raises ConfigError when that stage has not finished.
    """
    if recipe.stages[index].init.lora != "continue":
        return None
    return export_dir(run_dir, _finished_previous(recipe, index, run_dir))


def _finished_previous(recipe: RecipeConfig, index: int, run_dir: Path) -> StageConfig:
    stage, previous = recipe.stages[index], recipe.stages[index - 1]
    if not is_finished(run_dir, previous):
        raise ConfigError(
            f"stage '{stage.name}' starts from the export of stage '{previous.name}', which has not finished "
            f"({export_dir(run_dir, previous)}); run that stage first or set stages[{index}].init"
        )
    return previous


@contextmanager
def stop_on_sigterm(flag: StopFlag):
    """While active, SIGTERM (pre-emption) sets ``flag.reason = "sigterm"`` instead of killing the process."""
    def handler(signum, frame):
        flag.reason = "sigterm"

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be caught here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_recipe(recipe: RecipeConfig, run_dir: str | Path, dist_info: DistInfo, max_steps: int | None = None,
               only_stage: str | None = None, stop: StopFlag | None = None, started: float | None = None) -> str:
    """Trains the stages of ``recipe`` that have not finished, in order.

    Args:
        recipe: the loaded recipe.
        run_dir: OUTPUT_DIR (see the module docstring).
        dist_info: from ``opensora.distributed.init_distributed``.
        max_steps: stop the running stage with a checkpoint once it reaches this step.
        only_stage: run this stage alone (it must be able to start: its init, or the previous export, exists).
        stop: a flag another party may set to stop (SIGTERM sets it while this runs).
        started: ``time.monotonic()`` at process start (train/train.py): the first stage's ledger segment bills
            from then, each later stage's from the end of the one before. None: from this call.
    Returns:
        "finished" when every stage (or ``only_stage``) is exported; else why it stopped
        ("sigterm", "budget", "max_steps"), after writing a checkpoint.
    """
    started = time.monotonic() if started is None else started
    run_dir = Path(run_dir)
    names = [s.name for s in recipe.stages]
    if only_stage is not None and only_stage not in names:
        raise ConfigError(f"--stage {only_stage}: no such stage; the recipe has {names}")
    if dist_info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write_path(run_dir / RECIPE_FILE) as tmp:
            tmp.write_text(to_yaml(recipe))
    barrier()
    stop = stop or StopFlag()
    with stop_on_sigterm(stop):
        for index, stage in enumerate(recipe.stages):
            if only_stage is not None and stage.name != only_stage:
                continue
            if is_finished(run_dir, stage):
                if dist_info.rank == 0:
                    print(f"stage '{stage.name}': finished before ({export_dir(run_dir, stage)}), skipped", flush=True)
                continue
            trainer = Trainer(recipe, stage, run_dir, init_dir_of(recipe, index, run_dir, dist_info), dist_info,
                              stop=stop, max_steps=max_steps, started=started,
                              adapters=adapters_of(recipe, index, run_dir))
            try:
                reason = trainer.train()
            finally:
                trainer.close()
                started = time.monotonic()  # the next stage's start-up bills from here
            if reason != "finished":
                return reason
    return "finished"
