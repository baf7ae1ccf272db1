"""A pipeline bundle as a diffusers pipeline folder: what ``tools/export_diffusers.py`` writes.

The folder is the family's own pipeline (``WanPipeline``, ``LTXPipeline``) saved by diffusers itself
(``model_index.json``, ``transformer/``, ``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``), so
``DiffusionPipeline.from_pretrained(DIR)`` loads it anywhere diffusers runs. The scheduler is the one the family's
published diffusers folders ship (``ModelFamily.diffusers_scheduler``), not this project's Euler sampler: the
export behaves as the published model's pipeline does, and users pick another scheduler the diffusers way.

A LoRA stage's export holds the base with the adapters merged (``bundle.yaml``'s model) and the adapters alone
(``pytorch_lora_weights.safetensors``). The pipeline folder holds the merged model, and the adapter file goes to
``DIR/lora/``: it applies to the stage's *base* pipeline (``pipe.load_lora_weights(DIR / "lora")``); kept out of
the folder's root so that ``load_lora_weights(DIR)`` on the merged pipeline cannot apply it a second time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import diffusers
import torch

from opensora.bundle import check_compatible, load_bundle_config, load_bundle_model, load_encoders
from opensora.config import ConfigError
from opensora.models.families import get_family
from opensora.models.lora import LORA_WEIGHTS_NAME

LORA_SUBFOLDER = "lora"  # DIR/lora/pytorch_lora_weights.safetensors: the adapters of a LoRA stage's export


def export_diffusers(bundle_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None):
    """Writes ``out_dir`` as the bundle family's diffusers pipeline (and ``lora/`` for a LoRA stage's export).

    Args:
        bundle_dir: a pipeline bundle (``tools/init_checkpoint.py``'s, or a stage's ``export``) of a family with a
            diffusers pipeline (Wan, LTX-Video).
        out_dir: the folder to write; it must not exist (written under a temporary name, then renamed, so a
            folder at ``out_dir`` is always a whole pipeline).
        dtype: weight dtype of the saved transformer, text encoder and VAE (None: as stored in the bundle).
    Returns:
        the pipeline object that was saved (its parts are the bundle's, on the CPU).
    Raises:
        ConfigError naming what the pipeline could not reproduce: a family without a diffusers pipeline
        (STDiT), an autoencoder of another class than the pipeline's, a latent scale or text length other
        than the family's.
    """
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; the export writes a new folder")
    cfg = load_bundle_config(bundle_dir)
    family = get_family(cfg.family)
    if family.diffusers_pipeline is None:
        raise ConfigError(f"{bundle_dir}: the {family.name} family has no diffusers pipeline to export to "
                          "(tools/sample.py samples its bundles)")
    # The pipeline normalises latents with the VAE config's own statistics and pads prompts to its own length;
    # a bundle that overrides either would sample differently there, so it is refused rather than exported wrong.
    if cfg.vae.scaling_factor is not None:
        raise ConfigError(f"{bundle_dir}: vae.scaling_factor {cfg.vae.scaling_factor} overrides the autoencoder's "
                          f"own normalisation, which {family.diffusers_pipeline} cannot take")
    if cfg.text_encoder.max_length != family.text.max_length:
        raise ConfigError(f"{bundle_dir}: the text encoder pads to {cfg.text_encoder.max_length} tokens; "
                          f"{family.diffusers_pipeline} pads to {family.text.max_length}")
    model = load_bundle_model(bundle_dir, cfg, dtype=dtype).eval()
    vae, text_encoder = load_encoders(bundle_dir, device="cpu", dtype=dtype, config=cfg)
    check_compatible(model, vae, text_encoder, source=bundle_dir, family=family)
    pipeline_class = getattr(diffusers, family.diffusers_pipeline)
    module = getattr(vae, "module", None)
    expected = pipeline_class.__init__.__annotations__.get("vae")
    if module is None or type(module).__name__ != getattr(expected, "__name__", expected):
        raise ConfigError(f"{bundle_dir}: {family.diffusers_pipeline} decodes with {getattr(expected, '__name__', expected)}; "
                          f"the bundle's autoencoder is {vae.name}")
    pipe = pipeline_class(tokenizer=text_encoder.tokenizer, text_encoder=text_encoder.model, vae=module,
                          scheduler=family.diffusers_scheduler(), transformer=model,
                          **family.diffusers_pipeline_options(family.config_of(model)))
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    if tmp.exists():  # left by an export that died
        shutil.rmtree(tmp)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    adapters = bundle_dir / LORA_WEIGHTS_NAME
    if adapters.is_file():
        (tmp / LORA_SUBFOLDER).mkdir()
        shutil.copy2(adapters, tmp / LORA_SUBFOLDER / LORA_WEIGHTS_NAME)
    tmp.rename(out_dir)
    return pipe
