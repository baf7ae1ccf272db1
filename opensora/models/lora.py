"""LoRA on a family's transformer, through peft, and its export in diffusers' ``pytorch_lora_weights.safetensors``.

Order (finetrainers does the same; adapters injected after ``fully_shard`` would not be DTensors): build or load
the base -> :func:`apply_lora` (freezes the base, injects the adapters into the family's block Linears) ->
optimizer over the trainable parameters -> parallelize (SP -> AC -> compile -> FSDP2). ``lora_B`` starts at zero,
so the model with fresh adapters computes exactly what the base computes.

The export folds the scale alpha / r into ``lora_B`` and records alpha = r in the file's metadata: every loader
then applies the right strength, including those that ignore the metadata and assume alpha = r (diffusers
without metadata, ComfyUI; diffusers#11324, Comfy-Org/ComfyUI#15830).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from opensora.models.families.base import ModelFamily

ADAPTER_NAME = "default"  # peft's adapter name; exports and checkpoints hold this one adapter
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights looks for
# The adapters as the model holds them (keys ``X.lora_A.default.weight``, alpha not folded), with the settings they
# were trained with: what a stage with ``init.lora: continue`` trains on, bit for bit.
ADAPTERS_NAME = "lora_adapters.safetensors"
# Settings that decide what the adapters compute: a stage that continues them must keep them (dropout may change).
_ADAPTER_FIELDS = ("rank", "alpha", "target_modules")


@dataclass
class LoraSettings:
    """A stage's LoRA (None instead of this = a full fine-tune)."""

    rank: int = 16  # r: the adapters' inner width
    alpha: float = 16.0  # scale alpha / r on the adapter's output (alpha = rank: scale 1)
    dropout: float = 0.0  # dropout on the adapter's input (peft lora_dropout)
    target_modules: str | None = None  # peft regex over module names (full match); None = the family's lora_targets

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def apply_lora(model: nn.Module, family: ModelFamily, settings: LoraSettings) -> nn.Module:
    """Freezes ``model`` and injects LoRA adapters (in place) into the Linear layers the targets name.

    Args:
        model: a model of ``family`` (fp32 or bf16 base; the adapters take the base layer's dtype, see peft).
        family: its family (default targets).
        settings: rank, alpha, dropout, targets.
    Returns:
        ``model``, whose only trainable parameters are the adapters' ``lora_A`` / ``lora_B``.
    Raises:
        ValueError naming the targets if they match no module of the model.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = settings.target_modules or family.lora_targets
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, init_lora_weights=True)
    model.requires_grad_(False)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"LoRA target_modules {targets!r} match no layer of the {family.name} model: {err}") from err
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, keyed as peft and diffusers name them (``blocks.0.attn1.to_q.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapter parameters of ``model`` (what the optimizer, EMA and checkpoints of a LoRA stage hold)."""
    return [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def save_diffusers_lora(adapter_state: dict[str, torch.Tensor], family: ModelFamily, settings: LoraSettings,
                        out_dir: str | Path) -> Path:
    """Writes ``out_dir/pytorch_lora_weights.safetensors`` that the family's diffusers pipeline loads with
    ``load_lora_weights`` (keys ``transformer.<module>.lora_A/B.weight``, alpha folded into ``lora_B``).

    Args:
        adapter_state: :func:`lora_state_dict` of the trained model (gathered to full tensors under FSDP2).
        family: the model's family (its ``diffusers_pipeline`` writes the file).
        settings: the LoRA the adapters were trained with (for the scale).
        out_dir: folder to write into (created).
    Returns:
        the path of the file.
    """
    import diffusers

    if family.diffusers_pipeline is None:
        raise ValueError(f"the {family.name} family has no diffusers pipeline to export a LoRA for")
    if not adapter_state or not all(".lora_A." in k or ".lora_B." in k for k in adapter_state):
        raise ValueError("adapter_state must hold only lora_A / lora_B weights (lora_state_dict of the model)")
    state = {k: (v * settings.scale if ".lora_B." in k else v).detach().contiguous().cpu()
             for k, v in adapter_state.items()}
    modules = sorted({k.split(".lora_")[0] for k in state})
    metadata = dict(r=settings.rank, lora_alpha=settings.rank, lora_dropout=0.0, target_modules=modules,
                    init_lora_weights=True)
    from opensora.utils import atomic_write_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline = getattr(diffusers, family.diffusers_pipeline)
    with atomic_write_path(out_dir / LORA_WEIGHTS_NAME, keep_suffix=True) as tmp:
        pipeline.save_lora_weights(str(out_dir), transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata=metadata, weight_name=tmp.name,
                                   safe_serialization=True)
    return out_dir / LORA_WEIGHTS_NAME


def save_adapters(adapter_state: dict[str, torch.Tensor], settings: LoraSettings, out_dir: str | Path) -> Path:
    """Writes ``out_dir/lora_adapters.safetensors``: the adapters unchanged (no scale folded in), with the settings
    in the file's metadata, for :func:`load_adapters`.

    Args:
        adapter_state: the model's ``lora_A`` / ``lora_B`` parameters by their names in the model (full tensors).
        settings: the LoRA they were trained with.
        out_dir: folder to write into (created).
    Returns:
        the path of the file.
    """
    import json

    from safetensors.torch import save_file

    from opensora.utils import atomic_write_path

    if not adapter_state or not all(".lora_A." in k or ".lora_B." in k for k in adapter_state):
        raise ValueError("adapter_state must hold only lora_A / lora_B weights")
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(out_dir / ADAPTERS_NAME, keep_suffix=True) as tmp:
        save_file(state, str(tmp), metadata={"lora": json.dumps({f: getattr(settings, f) for f in _ADAPTER_FIELDS})})
    return out_dir / ADAPTERS_NAME


def load_adapters(model: nn.Module, path: str | Path, settings: LoraSettings) -> None:
    """Copies the adapters of :func:`save_adapters`'s file into ``model`` (after :func:`apply_lora` with
    ``settings``), in place and bit for bit.

    Raises:
        ValueError naming the settings that differ from the file's (rank, alpha, target_modules: they decide what
        the adapters compute), or the adapter weights the file and the model do not share.
    """
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        saved = json.loads(f.metadata()["lora"])
    differ = [f"{k} {saved[k]!r} (file) vs {k} {getattr(settings, k)!r}" for k in _ADAPTER_FIELDS
              if saved[k] != getattr(settings, k)]
    if differ:
        raise ValueError(f"{path}: the adapters were trained with other LoRA settings: {'; '.join(differ)}")
    state = load_file(str(path))
    params = dict(model.named_parameters())
    own = set(lora_parameter_names(model))
    if set(state) != own:
        raise ValueError(f"{path}: adapters that do not fit the model: missing {sorted(own - set(state))[:4]}, "
                         f"unexpected {sorted(set(state) - own)[:4]}")
    wrong = [k for k, v in state.items() if v.shape != params[k].shape]
    if wrong:
        raise ValueError(f"{path}: adapter shapes differ from the model's: {wrong[:4]}")
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)
