"""Training: the recipe schema, the stage runner, the trainer, EMA and the optimizer / LR schedule.

``train/train.py`` is the command line; this package is what it (and the tests) call::

    recipe = load_recipe("configs/demo/train.yaml", ["stages.0.steps=4"])
    run_recipe(recipe, "runs/demo", init_distributed())
"""

from opensora.training.config import (
    AccountingConfig,
    EMAConfig,
    InitConfig,
    LoggingConfig,
    OptimConfig,
    RecipeConfig,
    StageConfig,
    load_recipe,
    stage_data_config,
)
from opensora.training.ema import EMA
from opensora.training.nonfinite import NonFiniteError
from opensora.training.optim import WarmupSchedule, build_lr_scheduler, build_optimizer
from opensora.training.recipe import is_finished, run_recipe
from opensora.training.trainer import StopFlag, Trainer

__all__ = [
    "AccountingConfig",
    "EMA",
    "EMAConfig",
    "InitConfig",
    "LoggingConfig",
    "NonFiniteError",
    "OptimConfig",
    "RecipeConfig",
    "StageConfig",
    "StopFlag",
    "Trainer",
    "WarmupSchedule",
    "build_lr_scheduler",
    "build_optimizer",
    "is_finished",
    "load_recipe",
    "run_recipe",
    "stage_data_config",
]
