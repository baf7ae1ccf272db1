"""LTX-Video (diffusers ``LTXVideoTransformer3DModel``) as a family.

Conventions of the published model, from diffusers' ``pipeline_ltx.py`` and ``scripts/convert_ltx_to_diffusers.py``:

* the transformer takes *packed* tokens (B, N, C*pt*p*p) plus the latent grid and a rope interpolation scale
  (VAE temporal factor / frame rate, VAE spatial factors); :meth:`LTXFamily.forward` packs and unpacks, so it
  takes and gives (B, C, T, H, W) like every family;
* text: T5-XXL states padded to 128 tokens, the mask goes to the model (as a -10000 bias in cross-attention);
* timestep on the 0..1000 scale, (B,) or per token (the image-to-video pipeline keeps the given frame at t = 0);
* prediction: flow matching, noise - x_0; negated to ours (x_0 - noise);
* sampling: ``FlowMatchEulerDiscreteScheduler`` with a shift that grows with the video's token count
  (exp(mu), mu from 0.95 at 1024 tokens to 2.05 at 4096), the schedule stretched to end at sigma 0.1,
  50 steps, guidance 3.0, 25 fps for the rope scale.
"""

from __future__ import annotations

import math

import torch
from diffusers import LTXVideoTransformer3DModel
from einops import rearrange
from torch import nn

from opensora.models.families.base import (
    FlowShift, ModelFamily, SamplerDefaults, TextSpec, TrainingObjective, call_in_weight_dtype,
    diffusers_transformer, per_token_timesteps, text_states,
)

# LTX-Video's own autoencoder compresses 8x in time and 32x in space; its pipeline's default frame rate is 25.
LTX_VAE_COMPRESSION = (8, 32, 32)
LTX_FRAME_RATE = 25

# The published 2B model (the diffusers class defaults, Lightricks/LTX-Video 0.9.x transformer/config.json) and a
# tiny random one (2 blocks, D = 32; caption_channels 32 = the tiny T5; 8 latent channels = the tiny LTX VAE).
LTX_SIZES: dict[str, dict] = {
    "LTX-Video-2B": dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
                         attention_head_dim=64, cross_attention_dim=2048, num_layers=28, caption_channels=4096),
    "tiny-ltx": dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                     attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=32),
}

_LTX_SHIFT = FlowShift(base_tokens=1024, max_tokens=4096, base_shift=0.95, max_shift=2.05)


class LTXFamily(ModelFamily):
    name = "ltx"
    sizes = LTX_SIZES
    text = TextSpec(encoder="t5", max_length=128, pad_with_zeros=False, mask_to_model=True,
                    reference="google/t5-v1_1-xxl (LTX-Video text_encoder/)")
    # Training with the sampler's token-count shift is our choice (not a published training setting).
    objective = TrainingObjective(name="rflow", logit_mean=0.0, logit_std=1.0, shift=_LTX_SHIFT,
                                  source="ours: logit-normal with the scheduler's dynamic shift")
    sampler = SamplerDefaults(name="rflow", steps=50, cfg_scale=3.0, shift=_LTX_SHIFT, shift_terminal=0.1,
                              negative_prompt="", diffusers_scheduler="FlowMatchEulerDiscreteScheduler",
                              source="diffusers LTXPipeline defaults; scheduler of convert_ltx_to_diffusers.py")
    objectives = ("rflow",)
    lora_targets = (r"transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
                    r"|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)")
    supports_sequence_parallel = False
    diffusers_pipeline = "LTXPipeline"

    def build(self, size: str | dict, **overrides) -> LTXVideoTransformer3DModel:
        fields = self.size_config(size, **overrides) if isinstance(size, str) else {**size, **overrides}
        return LTXVideoTransformer3DModel(**fields)

    def from_pretrained(self, directory: str, dtype: torch.dtype | None = None) -> LTXVideoTransformer3DModel:
        return diffusers_transformer(LTXVideoTransformer3DModel, directory, dtype)

    def read_config(self, directory: str):
        from pathlib import Path

        root = Path(directory)
        sub = "transformer" if (root / "transformer" / "config.json").is_file() else None
        return LTXVideoTransformer3DModel.load_config(str(root), subfolder=sub, local_files_only=True)

    def patch_size(self, config) -> tuple[int, int, int]:
        return (int(config["patch_size_t"]), int(config["patch_size"]), int(config["patch_size"]))

    def in_channels(self, config) -> int:
        return config["in_channels"] // math.prod(self.patch_size(config))  # packed channels = C * pt * p * p

    def out_channels(self, config) -> int:
        return (config["out_channels"] or config["in_channels"]) // math.prod(self.patch_size(config))

    def text_dim(self, config) -> int:
        return config["caption_channels"]

    def frame_timesteps(self, config) -> bool:
        return True

    def forward(self, model: LTXVideoTransformer3DModel, x, timestep, y, mask=None, *,
                vae_compression: tuple[int, int, int] = LTX_VAE_COMPRESSION,
                frame_rate: float = LTX_FRAME_RATE) -> torch.Tensor:
        """See :meth:`ModelFamily.forward`; ``vae_compression`` and ``frame_rate`` give the rope interpolation
        scale as LTXPipeline computes it (its defaults: LTX-Video's VAE, 25 fps)."""
        B, _, T, H, W = x.shape
        self.check_input_size(model.config, (T, H, W))
        pt, p, _ = self.patch_size(model.config)
        grid = (T // pt, H // p, W // p)
        y, mask = text_states(y, mask, B)  # (B, L, Ct), (B, L)
        if mask is None:
            mask = torch.ones(y.shape[:2], device=y.device, dtype=torch.long)
        tokens = rearrange(x, "B C (T p) (H q) (W r) -> B (T H W) (C p q r)", p=pt, q=p, r=p)  # (B, N, C*P)
        t = per_token_timesteps(timestep.float(), grid)  # (B,) or (B, N)
        vt, vh, vw = vae_compression
        out = call_in_weight_dtype(model, lambda m: m.proj_in.weight, ("hidden_states", "encoder_hidden_states"),
                                   hidden_states=tokens, encoder_hidden_states=y, timestep=t,
                                   encoder_attention_mask=mask, num_frames=grid[0], height=grid[1], width=grid[2],
                                   rope_interpolation_scale=(vt / frame_rate, vh, vw), return_dict=False)[0]  # (B, N, Co*P)
        out = rearrange(out, "B (T H W) (C p q r) -> B C (T p) (H q) (W r)", T=grid[0], H=grid[1], W=grid[2],
                        p=pt, q=p, r=p)
        return -out.float()  # noise - x_0 -> x_0 - noise

    def forward_flops(self, config, latent_size, text_len=None, frame_timesteps=False) -> float:
        """Per sample (only matmuls): N tokens, D = heads * head_dim, Dc cross_attention_dim, L text tokens
        (128), Ct caption_channels, Cp packed in channels, Co out channels::

            proj_in 2 N Cp D;  time (AdaLayerNormSingle) 2 (256 D + D^2 + 6 D^2) per timestep row (1, or N);
            caption 2 L (Ct D + D^2);  per block: self-attn 8 N D^2 + 4 N^2 D, cross q/o 4 N D^2,
            cross k/v 4 L Dc D, cross attention 4 N L D, FFN (4x) 16 N D^2;  proj_out 2 N D Co
        """
        c = config
        N = self.video_tokens(c, latent_size)
        D = c["num_attention_heads"] * c["attention_head_dim"]
        Dc, Ct = c["cross_attention_dim"], c["caption_channels"]
        L = self.text.max_length if text_len is None else int(text_len)
        rows = N if frame_timesteps else 1
        block = 8 * N * D * D + 4 * N * N * D + 4 * N * D * D + 4 * L * Dc * D + 4 * N * L * D + 16 * N * D * D
        return float(2 * N * c["in_channels"] * D
                     + rows * 2 * (256 * D + D * D + 6 * D * D)
                     + 2 * L * (Ct * D + D * D)
                     + c["num_layers"] * block
                     + 2 * N * D * (c["out_channels"] or c["in_channels"]))

    def blocks(self, model: LTXVideoTransformer3DModel) -> nn.ModuleList:
        return model.transformer_blocks

    def diffusers_scheduler(self):
        """``LTXPipeline``'s scheduler as diffusers' ``convert_ltx_to_diffusers.py`` writes it: Euler with the
        token-count shift (:data:`_LTX_SHIFT`) and the schedule stretched to end at sigma 0.1."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        s = self.sampler.shift
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=s.base_shift,
                                               max_shift=s.max_shift, base_image_seq_len=s.base_tokens,
                                               max_image_seq_len=s.max_tokens,
                                               shift_terminal=self.sampler.shift_terminal)
