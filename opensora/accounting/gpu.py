"""GPU types: detection, dense bf16 peak TFLOP/s, default prices per GPU-hour, and a measured matmul peak.

Peaks are the vendor datasheet figures for dense bf16 tensor-core math with fp32 accumulation (what a
bf16 training step uses), *without* 2:4 sparsity, which NVIDIA datasheets often print first (e.g. H100
SXM: 1979 "with sparsity", 989 dense). MFU is always computed against these dense figures, as nanoGPT,
PaLM and torchtitan do, so our MFU numbers can be compared with theirs.

Prices are defaults only, in USD per GPU-hour, for when a config gives none. They are assumptions, not
quotes: each entry says where its number comes from. Set ``price_per_gpu_hour`` in the training config
(or ``--price`` on ``tools/cost.py``) to what you actually pay.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPUSpec:
    """What the accounting needs to know about one GPU type."""

    name: str  # canonical short name, e.g. "h100"
    peak_bf16_tflops: float  # dense bf16 tensor-core peak (no sparsity), TFLOP/s per device
    price_per_hour: float  # default USD per GPU-hour
    source: str  # where the peak and the price come from


# Rental prices vary by provider, commitment and year; ours are round mid-range on-demand figures of
# 2024-2025 GPU clouds, except H800, which is pinned to what Open-Sora 1.0's report implies
# (2808 H800 GPU-hours for about $7,000, i.e. ~$2.5 per GPU-hour).
GPU_SPECS: dict[str, GPUSpec] = {
    s.name: s
    for s in (
        GPUSpec("b200", 2250.0, 5.00, "NVIDIA HGX B200 datasheet, dense BF16 per GPU; price: assumed on-demand rate"),
        GPUSpec("h200", 989.0, 3.50, "NVIDIA H200 SXM datasheet (same tensor cores as H100 SXM); price: assumed"),
        GPUSpec("h200-nvl", 835.0, 3.50, "NVIDIA H200 NVL datasheet, 1,671 BF16 with sparsity = 835 dense; price: "
                "assumed as H200"),
        GPUSpec("h100", 989.0, 2.50, "NVIDIA H100 SXM datasheet 989.4 dense BF16; price: assumed on-demand rate"),
        GPUSpec("h100-nvl", 835.0, 2.50, "NVIDIA H100 NVL datasheet, dense BF16; price: assumed as H100"),
        GPUSpec("h100-pcie", 756.0, 2.00, "NVIDIA H100 PCIe datasheet 756 dense BF16; price: assumed"),
        GPUSpec("h800", 989.0, 2.50, "H800 SXM = H100 SXM compute; price: Open-Sora 1.0 report, $7,000 / 2808 h"),
        GPUSpec("h800-pcie", 756.0, 2.00, "H800 PCIe = H100 PCIe compute; price: assumed"),
        GPUSpec("h20", 148.0, 1.00, "NVIDIA H20 (China SKU), dense BF16 148; price: assumed"),
        GPUSpec("a100", 312.0, 1.50, "NVIDIA A100 datasheet 312 dense BF16 (SXM and PCIe); price: assumed"),
        GPUSpec("a800", 312.0, 1.50, "A800 = A100 compute; price: assumed as A100"),
        GPUSpec("l40s", 362.0, 1.00, "NVIDIA L40S datasheet 362 dense BF16; price: assumed"),
        GPUSpec("4090", 165.2, 0.40, "GeForce RTX 4090 (Ada whitepaper) 165.2 dense BF16, fp32 accumulate; price: assumed"),
        # A CPU has no datasheet tensor peak. 1 TFLOP/s is a nominal figure above what a server CPU socket
        # reaches in fp32 matmul, so a CPU MFU is never overstated; it is illustrative only. Use
        # measure_matmul_tflops("cpu") for a real one. Price 0: the CPU demo is not billed per GPU-hour.
        GPUSpec("cpu", 1.0, 0.0, "nominal, NOT a datasheet or a measurement; price: none (set --price)"),
    )
}

# Ordered (pattern, canonical name): the first match wins, so variants come before their base name.
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"b200", "b200"),
    (r"h200.*nvl", "h200-nvl"),
    (r"h200", "h200"),
    (r"h100.*nvl", "h100-nvl"),
    (r"h100.*pcie", "h100-pcie"),
    (r"h100", "h100"),
    (r"h800.*pcie", "h800-pcie"),
    (r"h800", "h800"),
    (r"\bh20\b", "h20"),
    (r"a100", "a100"),
    (r"a800", "a800"),
    (r"l40s", "l40s"),
    (r"rtx 4090|geforce 4090|\b4090\b", "4090"),
]


def canonical_gpu_name(device_name: str) -> str:
    """Maps a CUDA device name ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB") to a key of GPU_SPECS.

    An unknown device gets a slug of its own name ("nvidia-rtx-a6000"), which has no spec: its MFU is
    reported as unknown and its price must be given in the config.
    """
    low = device_name.lower()
    if low == "cpu":
        return "cpu"
    for pattern, name in _NAME_PATTERNS:
        if re.search(pattern, low):
            return name
    return re.sub(r"[^a-z0-9]+", "-", low).strip("-") or "unknown"


def detect_gpu_type(device: torch.device | str | None = None) -> str:
    """The canonical type of ``device`` (default: the current CUDA device), or "cpu" without CUDA.

    Args:
        device: a CUDA device; ignored (and "cpu" returned) when CUDA is not available.
    """
    if not torch.cuda.is_available():
        return "cpu"
    if device is not None and torch.device(device).type != "cuda":
        return "cpu"
    return canonical_gpu_name(torch.cuda.get_device_name(device))


def peak_tflops(gpu_type: str) -> float | None:
    """Dense bf16 peak TFLOP/s of ``gpu_type`` from the table, or None if unknown."""
    spec = GPU_SPECS.get(gpu_type)
    return spec.peak_bf16_tflops if spec else None


def default_price(gpu_type: str) -> float | None:
    """Default USD per GPU-hour of ``gpu_type`` from the table, or None if unknown."""
    spec = GPU_SPECS.get(gpu_type)
    return spec.price_per_hour if spec else None


def measure_matmul_tflops(
    device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16, size: int = 8192, iters: int = 20
) -> float:
    """Measured matmul throughput in TFLOP/s: the practical peak a training step can hope for.

    Times ``iters`` products of two (size, size) matrices after a warm-up, with CUDA events on a GPU and
    the wall clock on a CPU. Each product counts 2 * size^3 FLOPs.

    Args:
        device: where to measure ("cuda", "cuda:1", "cpu").
        dtype: element type; bf16 on GPU to compare with the datasheet peak, fp32 on most CPUs.
        size: matrix side; 8192 saturates an H100, 512-1024 is plenty on a CPU.
        iters: timed products.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: kernel selection, clocks, caches
        torch.matmul(a, b, out=out)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        seconds = time.perf_counter() - t0
    return 2.0 * size**3 * iters / seconds / 1e12
