"""Accounting: GPU types and prices, STDiT FLOPs and MFU, the cost ledger, budgets and forecasts.

See docs/cost_accounting.md for the formulas, the ledger format and the rules for crashed segments.
"""

from opensora.accounting.budget import BudgetConfig, check_budget
from opensora.accounting.flops import (
    latent_size_of,
    mfu,
    stdit_forward_flops,
    stdit_forward_flops_breakdown,
    train_flops_per_sample,
    video_tokens,
)
from opensora.accounting.gpu import (
    GPU_SPECS,
    GPUSpec,
    canonical_gpu_name,
    default_price,
    detect_gpu_type,
    measure_matmul_tflops,
    peak_tflops,
)
from opensora.accounting.ledger import (
    LEDGER_NAME,
    CostSummary,
    Ledger,
    Segment,
    Spend,
    StageSummary,
    read_ledger,
    summarize,
)

__all__ = [
    "BudgetConfig",
    "CostSummary",
    "GPUSpec",
    "GPU_SPECS",
    "LEDGER_NAME",
    "Ledger",
    "Segment",
    "Spend",
    "StageSummary",
    "canonical_gpu_name",
    "check_budget",
    "default_price",
    "detect_gpu_type",
    "latent_size_of",
    "measure_matmul_tflops",
    "mfu",
    "peak_tflops",
    "read_ledger",
    "stdit_forward_flops",
    "stdit_forward_flops_breakdown",
    "summarize",
    "train_flops_per_sample",
    "video_tokens",
]
