"""STDiT (Open-Sora 1.0) as a family: every member delegates to ``models/stdit.py`` and ``accounting/flops.py``.

Nothing here computes anything new, so the numbers of the STDiT code (Open-Sora 1.0 equivalence, bit-exact
resume, the FLOP formula) are the family's: :meth:`STDiTFamily.model_fn` returns the model itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from opensora.accounting.flops import stdit_forward_flops
from opensora.models.families.base import ModelFamily, SamplerDefaults, TextSpec, TrainingObjective
from opensora.models.stdit import CONFIG_NAME, STDiT, STDiT_models, STDiTConfig


class STDiTFamily(ModelFamily):
    name = "stdit"
    sizes = {name: dataclasses.asdict(cfg) for name, cfg in STDiT_models.items()}
    text = TextSpec(encoder="t5", max_length=120, pad_with_zeros=False, mask_to_model=True,
                    reference="DeepFloyd/t5-v1_1-xxl (Open-Sora 1.0)")
    # Open-Sora 1.0 trained STDiT with IDDPM; recipes may pick rflow (the bundle records which).
    objective = TrainingObjective(name="iddpm", source="Open-Sora 1.0")
    sampler = SamplerDefaults(name="iddpm", steps=100, cfg_scale=4.0, source="Bundle.generate defaults")
    objectives = ("iddpm", "rflow")
    # Every Linear of the blocks: attention (spatial, temporal, cross) and MLP.
    lora_targets = r"blocks\.\d+\.(attn|attn_temp)\.(qkv|proj)|blocks\.\d+\.cross_attn\.(q_linear|kv_linear|proj)" \
                   r"|blocks\.\d+\.mlp\.(fc1|fc2)"
    supports_sequence_parallel = True
    diffusers_pipeline = None

    def build(self, size: str | dict, **overrides) -> STDiT:
        fields = self.size_config(size, **overrides) if isinstance(size, str) else {**size, **overrides}
        return STDiT(STDiTConfig(**fields))

    def from_pretrained(self, directory: str, dtype: torch.dtype | None = None) -> STDiT:
        return STDiT.from_pretrained(directory).to(dtype=dtype)

    def read_config(self, directory: str) -> STDiTConfig:
        import json

        return STDiTConfig(**json.loads((Path(directory) / CONFIG_NAME).read_text()))

    def in_channels(self, config: STDiTConfig) -> int:
        return config.in_channels

    def out_channels(self, config: STDiTConfig) -> int:
        return config.out_channels

    def text_dim(self, config: STDiTConfig) -> int:
        return config.caption_channels

    def patch_size(self, config: STDiTConfig) -> tuple[int, int, int]:
        return tuple(config.patch_size)  # type: ignore[return-value]

    def frame_timesteps(self, config: STDiTConfig) -> bool:
        return config.patch_size[0] == 1  # STDiT.embed_timestep takes (B, T) at a temporal patch of 1

    def forward(self, model: STDiT, x, timestep, y, mask=None) -> torch.Tensor:
        return model(x, timestep, y, mask)

    def model_fn(self, model: STDiT) -> STDiT:
        # The model itself: keeps its in-model caption dropout and force_drop_ids, and every number bit for bit.
        return model

    def forward_flops(self, config: STDiTConfig, latent_size, text_len=None, frame_timesteps=False) -> float:
        # The per-frame timestep embedding (T small Linears) is not in the published formula: it is < 0.1 %.
        return stdit_forward_flops(config, latent_size, config.model_max_length if text_len is None else text_len)

    def blocks(self, model: STDiT) -> nn.ModuleList:
        return model.blocks
