"""STDiT and the wrappers of the pretrained parts it uses (VAE, text encoder)."""

from opensora.models.stdit import (
    STDiT,
    STDiTConfig,
    STDiT_models,
    convert_opensora_v1_state_dict,
    count_parameters,
    load_opensora_v1_checkpoint,
    stdit_config,
)

__all__ = [
    "STDiT",
    "STDiTConfig",
    "STDiT_models",
    "convert_opensora_v1_state_dict",
    "count_parameters",
    "load_opensora_v1_checkpoint",
    "stdit_config",
]
