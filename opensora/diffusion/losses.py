"""Likelihood terms shared by the samplers: per-sample means, Gaussian KL, discretized decoder NLL.

The formulas follow Ho et al. 2020 and Nichol & Dhariwal 2021 (improved-diffusion), which Open-Sora 1.0
trains with; the CDF uses the same tanh approximation so that VLB values are comparable with theirs.
"""

import math

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) mean over every non-batch dim (a (B,) tensor is returned as is)."""
    return x.mean(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats; arguments broadcast."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF, tanh approximation (Page 1977), as improved-diffusion uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, bin_width: float = 2.0 / 255.0
) -> torch.Tensor:
    """Elementwise log-probability (nats) of ``x`` under a Gaussian discretized into bins of ``bin_width``.

    The outermost bins at -1 and +1 extend to -inf / +inf, so data in [-1, 1] quantised to 8 bits gets a proper
    distribution (the decoder term L_0 of the VLB). Latents are not quantised, but Open-Sora 1.0 uses the same term.

    Args:
        x: (B, ...) targets, nominally in [-1, 1].
        means: (B, ...) Gaussian means.
        log_scales: (B, ...) log standard deviations.
        bin_width: width of one quantisation bin (2/255 for 8-bit data in [-1, 1]).
    Returns:
        (B, ...) log-likelihoods.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + bin_width / 2))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - bin_width / 2))
    # Clamp before the log: far-away bins have probability that underflows to 0.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    edge = 1.0 - 1e-3  # 0.999, as improved-diffusion: values this close to +-1 are the edge bins
    return torch.where(x < -edge, log_cdf_plus, torch.where(x > edge, log_one_minus_cdf_min, log_bin))
