"""Wan 2.1 / 2.2 (diffusers ``WanTransformer3DModel``) as a family.

Conventions of the published model, from diffusers' ``pipeline_wan.py`` and the Wan authors:

* text: UMT5-XXL states of the prompt cut to its real length and zero-padded to 512 tokens; no mask reaches
  the transformer (:meth:`WanFamily.forward` zeroes the padded positions of our encoder output);
* timestep on the 0..1000 scale, (B,) or one per token (Wan 2.2 TI2V's ``expand_timesteps`` keeps the given
  first latent frame at t = 0: our frame conditioning);
* prediction: flow matching, noise - x_0 (``FlowMatchEulerDiscreteScheduler`` / UniPC ``flow_prediction``);
  ours is x_0 - noise, so the output is negated;
* sampling: UniPC, 50 steps, guidance 5.0, ``flow_shift`` 3.0 at 480p (5.0 at 720p); training: logit-normal
  timesteps with a shift of 2 at 480p (Wan-Video/Wan2.1#291, a maintainer's answer).

Image-to-video Wan 2.1 (CLIP image states, ``image_dim``) and Wan 2.2 A14B's second expert are not covered yet.
"""

from __future__ import annotations

import math

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from opensora.models.families.base import (
    FlowShift, ModelFamily, SamplerDefaults, TextSpec, TrainingObjective, call_in_weight_dtype,
    diffusers_transformer, per_token_timesteps, text_states,
)

# Published architectures (diffusers scripts/convert_wan_to_diffusers.py; Wan2.2-TI2V-5B's config.json) and tiny
# random ones for tests (2 blocks, D = 32; text_dim 32 = the tiny T5 of models/text_encoder.py; 4 latent channels =
# the tiny Wan 2.1 VAE of models/vae.py).
_WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                   rope_max_seq_len=1024)
WAN_SIZES: dict[str, dict] = {
    "Wan2.1-T2V-1.3B": dict(_WAN_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16,
                            out_channels=16),
    "Wan2.1-T2V-14B": dict(_WAN_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16,
                           out_channels=16),
    "Wan2.2-TI2V-5B": dict(_WAN_COMMON, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48,
                           out_channels=48),
    "tiny-wan2.1": dict(_WAN_COMMON, attention_head_dim=16, num_attention_heads=2, ffn_dim=64, num_layers=2,
                        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, rope_max_seq_len=64),
}

# Wan 2.2's VAE makes 48-channel latents; the TI2V-5B transformer that takes them is the one Wan trained with
# per-token timesteps (its pipeline's expand_timesteps). Wan 2.1 accepts the shape but was not trained on it.
_TI2V_CHANNELS = 48


class WanFamily(ModelFamily):
    name = "wan"
    sizes = WAN_SIZES
    text = TextSpec(encoder="umt5", max_length=512, pad_with_zeros=True, mask_to_model=False,
                    reference="google/umt5-xxl (Wan2.1-T2V-*-Diffusers text_encoder/)")
    objective = TrainingObjective(name="rflow", logit_mean=0.0, logit_std=1.0, shift=FlowShift(2.0),
                                  source="Wan report (logit-normal) + Wan-Video/Wan2.1#291 (shift 2 at 480p)")
    sampler = SamplerDefaults(name="rflow", steps=50, cfg_scale=5.0, shift=FlowShift(3.0), negative_prompt="",
                              diffusers_scheduler="UniPCMultistepScheduler",
                              source="diffusers WanPipeline defaults; flow_shift 3.0 at 480p, 5.0 at 720p")
    objectives = ("rflow",)
    # finetrainers' Wan LoRA targets: attention projections and the FFN of every block (embedders, head untouched).
    lora_targets = r"blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|blocks\.\d+\.ffn\.net\.(0\.proj|2)"
    # diffusers declares a context-parallel plan (_cp_plan); our Ulysses wrapper does not cover these blocks yet.
    supports_sequence_parallel = False
    diffusers_pipeline = "WanPipeline"

    def build(self, size: str | dict, **overrides) -> WanTransformer3DModel:
        fields = self.size_config(size, **overrides) if isinstance(size, str) else {**size, **overrides}
        return WanTransformer3DModel(**fields)

    def from_pretrained(self, directory: str, dtype: torch.dtype | None = None) -> WanTransformer3DModel:
        return diffusers_transformer(WanTransformer3DModel, directory, dtype)

    def read_config(self, directory: str):
        from pathlib import Path

        root = Path(directory)
        sub = "transformer" if (root / "transformer" / "config.json").is_file() else None
        return WanTransformer3DModel.load_config(str(root), subfolder=sub, local_files_only=True)

    def in_channels(self, config) -> int:
        return config["in_channels"]

    def out_channels(self, config) -> int:
        return config["out_channels"] or config["in_channels"]

    def text_dim(self, config) -> int:
        return config["text_dim"]

    def patch_size(self, config) -> tuple[int, int, int]:
        return tuple(int(p) for p in config["patch_size"])  # type: ignore[return-value]

    def frame_timesteps(self, config) -> bool:
        return config["in_channels"] == _TI2V_CHANNELS

    def forward(self, model: WanTransformer3DModel, x, timestep, y, mask=None) -> torch.Tensor:
        B, _, T, H, W = x.shape
        self.check_input_size(model.config, (T, H, W))
        pt, ph, pw = self.patch_size(model.config)
        y, mask = text_states(y, mask, B)  # (B, L, Ct), (B, L)
        if mask is not None:  # the pipeline's zero padding after the prompt's real length
            y = y * mask[:, :, None].to(y.dtype)
        # The latent and text go in the weights' compute dtype; the timestep stays fp32 (the sinusoid of a bf16 t
        # rounds: 700.7 -> 700), and diffusers casts it after the sinusoid to the time embedder's dtype.
        t = per_token_timesteps(timestep.float(), (T // pt, H // ph, W // pw))  # (B,) or (B, N)
        out = call_in_weight_dtype(model, lambda m: m.patch_embedding.weight, ("hidden_states", "encoder_hidden_states"),
                                   hidden_states=x, timestep=t, encoder_hidden_states=y, return_dict=False)[0]
        return -out.float()  # (B, C, T, H, W): noise - x_0 -> x_0 - noise

    def forward_flops(self, config, latent_size, text_len=None, frame_timesteps=False) -> float:
        """Per sample (only matmuls, 2*m*n*k): N tokens, D = heads * head_dim, F ffn_dim, L text tokens (512: the
        zero padding is computed), Ct text_dim, P patch volume, C / Co channels, f freq_dim::

            patch embed 2 N C P D;  time 2 (f D + D^2 + 6 D^2) per timestep row (1, or N per token);
            text 2 L (Ct D + D^2);  per block: self-attn 8 N D^2 + 4 N^2 D, cross q/o 4 N D^2, cross k/v 4 L D^2,
            cross attention 4 N L D, FFN 4 N D F;  head 2 N D Co P
        """
        c = config
        if c["image_dim"] is not None or c["added_kv_proj_dim"] is not None:
            raise ValueError("the Wan FLOP count covers text-to-video (and TI2V) models, not Wan 2.1 I2V's image "
                             "cross-attention (image_dim / added_kv_proj_dim set)")
        N = self.video_tokens(c, latent_size)
        D = c["num_attention_heads"] * c["attention_head_dim"]
        F, f, Ct = c["ffn_dim"], c["freq_dim"], c["text_dim"]
        L = self.text.max_length if text_len is None else int(text_len)
        P = math.prod(self.patch_size(c))
        rows = N if frame_timesteps else 1
        block = 8 * N * D * D + 4 * N * N * D + 4 * N * D * D + 4 * L * D * D + 4 * N * L * D + 4 * N * D * F
        return float(2 * N * c["in_channels"] * P * D
                     + rows * 2 * (f * D + D * D + 6 * D * D)
                     + 2 * L * (Ct * D + D * D)
                     + c["num_layers"] * block
                     + 2 * N * D * self.out_channels(c) * P)

    def blocks(self, model: WanTransformer3DModel) -> nn.ModuleList:
        return model.blocks

    def diffusers_scheduler(self):
        """``WanPipeline``'s scheduler as the published Wan 2.1 / 2.2 diffusers folders ship it (their
        ``scheduler_config.json``, made by diffusers' ``convert_wan_to_diffusers.py``): UniPC on flow sigmas with
        the sampler's shift (3.0, the 480p value)."""
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=self.sampler.shift.shift)

    def diffusers_pipeline_options(self, config) -> dict:
        # Wan 2.2 TI2V-5B was trained with per-token timesteps; its pipeline must build them (expand_timesteps).
        return {"expand_timesteps": True} if self.frame_timesteps(config) else {}
