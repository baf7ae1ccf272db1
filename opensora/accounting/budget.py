"""Budgets: a dollar and/or GPU-hour cap per stage and per recipe, checked against the ledger."""

from __future__ import annotations

from dataclasses import dataclass

from opensora.accounting.ledger import Ledger, Spend


@dataclass
class BudgetConfig:
    """Spending caps; None means no cap. Reaching either cap stops the stage after a checkpoint."""

    max_dollars: float | None = None  # USD, at the ledger's price per GPU-hour
    max_gpu_hours: float | None = None  # GPU-hours (wall time x number of GPUs), crashed segments included

    def __post_init__(self):
        for name in ("max_dollars", "max_gpu_hours"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or null, got {value}")


def _over(spend: Spend, budget: BudgetConfig | None) -> str | None:
    """Which cap of ``budget`` ``spend`` has reached, as "$X of max_dollars $Y", or None."""
    if budget is None:
        return None
    if budget.max_dollars is not None and spend.dollars >= budget.max_dollars:
        return f"max_dollars ${budget.max_dollars:,.2f}"
    if budget.max_gpu_hours is not None and spend.gpu_hours >= budget.max_gpu_hours:
        return f"max_gpu_hours {budget.max_gpu_hours:,.2f}"
    return None


def _describe(spend: Spend) -> str:
    return f"{spend.gpu_hours:,.2f} GPU-hours, ${spend.dollars:,.2f}, {spend.samples:,} samples"


def check_budget(ledger: Ledger, stage_budget: BudgetConfig | None, recipe_budget: BudgetConfig | None) -> str | None:
    """None while within budget; otherwise a message saying which cap was reached and how much was spent.

    Call it on rank 0 every few steps (it reads nothing from disk) and broadcast the decision; on a
    message the trainer writes a checkpoint, ends the segment with reason "budget" and exits cleanly.

    Args:
        ledger: the running ledger (its stage is the one checked against ``stage_budget``).
        stage_budget: caps for this stage alone, or None.
        recipe_budget: caps for all stages in the ledger together, or None.
    """
    stage_spend = ledger.spent(ledger.stage)
    hit = _over(stage_spend, stage_budget)
    if hit is not None:
        return f"budget reached: stage '{ledger.stage}' spent {_describe(stage_spend)}; cap {hit}"
    recipe_spend = ledger.spent()
    hit = _over(recipe_spend, recipe_budget)
    if hit is not None:
        return (
            f"budget reached: recipe spent {_describe(recipe_spend)} "
            f"(stage '{ledger.stage}': {_describe(stage_spend)}); cap {hit}"
        )
    return None
