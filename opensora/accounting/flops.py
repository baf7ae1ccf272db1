"""FLOPs of STDiT, and MFU.

Only matrix products are counted, each as 2*m*n*k (a multiply and an add), as nanoGPT, PaLM (appendix B)
and torchtitan do: norms, activations, softmax and the adaLN modulation are a few % of the FLOPs and run
on other units anyway. ``tests/test_accounting.py`` checks the formula against
``torch.utils.flop_counter.FlopCounterMode`` on a real (tiny) STDiT, so it is measured, not assumed.

Notation (one sample): D hidden size, T/S frames/patches per frame after patchify, N = T*S video tokens,
L text tokens (the caption is padded to ``model_max_length``; masked tokens still cost their FLOPs),
Ct text-encoder width, P = pt*ph*pw patch volume, C in channels, Co out channels, M = mlp_ratio*D.

Forward, per sample::

    patch embed (Conv3d as a matmul)   2 * N * (C*P) * D
    t_embedder MLP (256 -> D -> D)     2 * (256*D + D*D)
    t_block (D -> 6D)                  2 * D * 6D
    caption projection (Ct -> D -> D)  2 * L * (Ct*D + D*D)
    per block (x depth):
      spatial  self-attn  qkv + proj   2 * N * D * 3D  +  2 * N * D * D
               QK^T and AV over (T, S) 2 * 2 * T * S*S * D
      temporal self-attn  qkv + proj   2 * N * D * 3D  +  2 * N * D * D
               QK^T and AV over (S, T) 2 * 2 * S * T*T * D
      cross-attn q, proj over N        2 * N * D * D   +  2 * N * D * D
                 kv over L text tokens 2 * L * D * 2D
                 QK^T and AV (N x L)   2 * 2 * N * L * D
      MLP (D -> M -> D)                2 * 2 * N * D * M
    final layer (D -> P*Co)            2 * N * D * P*Co

Training = 3 x forward (the backward pass costs two matmuls per forward matmul: gradients of inputs and
of weights). Recomputation by activation checkpointing is NOT counted: MFU measures useful work, so
turning checkpointing on lowers MFU rather than inflating it (PaLM's "model FLOPs" vs "hardware FLOPs").
The VAE and the text encoder are not included; the benchmark reports their share separately.
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

from opensora.models.autoencoders import AutoencoderShape

# Width of the sinusoidal timestep features fed to t_embedder (TimestepEmbedder default in STDiT).
TIMESTEP_FREQ_DIM = 256


class STDiTShape(Protocol):
    """The fields of an STDiT config that decide its FLOPs (``opensora.models.STDiTConfig`` has them)."""

    depth: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float
    patch_size: tuple[int, int, int]
    in_channels: int
    caption_channels: int
    model_max_length: int
    pred_sigma: bool


def _tokens(cfg: STDiTShape, latent_size: tuple[int, int, int]) -> tuple[int, int]:
    """(T, S) after patchify; raises ValueError if the patch size does not divide the latent."""
    t, h, w = (int(v) for v in latent_size)
    pt, ph, pw = (int(p) for p in cfg.patch_size)
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent size (T, H, W)={(t, h, w)} is not divisible by patch size {tuple(cfg.patch_size)}")
    return t // pt, (h // ph) * (w // pw)


def video_tokens(cfg: STDiTShape, latent_size: tuple[int, int, int]) -> int:
    """Video tokens N = T*S of one sample after patchify (what the ledger counts as "tokens").

    Args:
        cfg: an STDiT config (only ``patch_size`` is read).
        latent_size: (T, H, W) of the latent.
    """
    T, S = _tokens(cfg, latent_size)
    return T * S


def stdit_forward_flops_breakdown(
    cfg: STDiTShape, latent_size: tuple[int, int, int], text_len: int | None = None
) -> dict[str, float]:
    """Forward FLOPs of one sample, by part (the sum is :func:`stdit_forward_flops`).

    Args:
        cfg: an STDiT config (depth, hidden_size, num_heads, mlp_ratio, patch_size, in_channels,
            caption_channels, model_max_length, pred_sigma).
        latent_size: (T, H, W) of the latent (after the VAE), not of the video.
        text_len: text tokens L; None means ``cfg.model_max_length`` (captions are padded to it).
    """
    T, S = _tokens(cfg, latent_size)
    N = T * S
    D = cfg.hidden_size
    L = cfg.model_max_length if text_len is None else int(text_len)
    P = math.prod(cfg.patch_size)
    M = int(D * cfg.mlp_ratio)  # as nn.Linear(D, int(D * mlp_ratio)) in the model
    c_out = cfg.in_channels * 2 if cfg.pred_sigma else cfg.in_channels

    spatial = 2 * N * D * 3 * D + 2 * N * D * D + 2 * 2 * T * S * S * D
    temporal = 2 * N * D * 3 * D + 2 * N * D * D + 2 * 2 * S * T * T * D
    cross = 2 * N * D * D * 2 + 2 * L * D * 2 * D + 2 * 2 * N * L * D
    mlp = 2 * 2 * N * D * M
    return {
        "patch_embed": float(2 * N * cfg.in_channels * P * D),
        "t_embedder": float(2 * (TIMESTEP_FREQ_DIM * D + D * D)),
        "t_block": float(2 * D * 6 * D),
        "caption": float(2 * L * (cfg.caption_channels * D + D * D)),
        "spatial_attn": float(cfg.depth * spatial),
        "temporal_attn": float(cfg.depth * temporal),
        "cross_attn": float(cfg.depth * cross),
        "mlp": float(cfg.depth * mlp),
        "final_layer": float(2 * N * D * P * c_out),
    }


def stdit_forward_flops(cfg: STDiTShape, latent_size: tuple[int, int, int], text_len: int | None = None) -> float:
    """Forward FLOPs of STDiT for one sample (see the module docstring for the formula).

    Args:
        cfg: an STDiT config (see :func:`stdit_forward_flops_breakdown`).
        latent_size: (T, H, W) of the latent, e.g. (16, 32, 32) for 16x256x256 video with an 8x VAE.
        text_len: text tokens L; None means ``cfg.model_max_length``.
    """
    return sum(stdit_forward_flops_breakdown(cfg, latent_size, text_len).values())


def train_flops_per_sample(cfg: STDiTShape, latent_size: tuple[int, int, int], text_len: int | None = None) -> float:
    """Model FLOPs of one training sample: 3 x forward (activation recomputation not counted).

    Args:
        cfg: an STDiT config.
        latent_size: (T, H, W) of the latent.
        text_len: text tokens L; None means ``cfg.model_max_length``.
    """
    return 3.0 * stdit_forward_flops(cfg, latent_size, text_len)


def latent_size_of(
    num_frames: int,
    image_size: tuple[int, int],
    compression: int | Sequence[int] = 8,
    causal: bool = False,
    frame_step: int | None = None,
) -> tuple[int, int, int]:
    """(T, H, W) latent of a ``num_frames`` x H x W video, from the autoencoder's factors (no weights needed).

    Args:
        num_frames: video frames; a causal 3D VAE takes t*k + 1 of them (e.g. 17 for 4x), see
            ``opensora.models.autoencoders``.
        image_size: (H, W) in pixels; must divide by the spatial factors.
        compression: (t, h, w) of the autoencoder, e.g. (4, 8, 8) for Wan 2.1; or one int f, a frame-by-frame VAE's
            (1, f, f) (the older ``vae_downsample``: 8 for SD-VAE).
        causal: T' = (T - 1) // t + 1, as the causal 3D VAEs; otherwise T' = T // t.
        frame_step: valid frame counts step by this (None: t; 8 for CogVideoX, which compresses 4x).
    Raises:
        ValueError naming the size, and for a frame count that does not fit, the nearest valid ones.
    """
    if isinstance(compression, int):
        shape = AutoencoderShape.per_frame(compression)
    else:
        shape = AutoencoderShape(tuple(compression), causal, frame_step)  # type: ignore[arg-type]
    return shape.latent_size((num_frames, *image_size))


def mfu(achieved_flops_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak FLOP/s (both per device, or both in total).

    Args:
        achieved_flops_per_s: model FLOPs done per second (3 x forward per sample, no recomputation).
        peak_flops_per_s: the hardware peak in the same unit (e.g. 989e12 for one H100).
    """
    if peak_flops_per_s <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops_per_s}")
    return achieved_flops_per_s / peak_flops_per_s
