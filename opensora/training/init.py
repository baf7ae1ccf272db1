"""Where a stage's weights come from: a bundle, a new model fitted to a VAE and a text encoder, or a
checkpoint of Open-Sora 1.0 / PixArt-α loaded over the model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from opensora.bundle import BUNDLE_FILE, BundleConfig, write_bundle
from opensora.config import ConfigError, merge
from opensora.models.families import FAMILIES, ModelFamily, family_of_size
from opensora.models.stdit import (
    STDiT,
    STDiT_models,
    convert_opensora_v1_state_dict,
    load_opensora_v1_checkpoint,
    read_weights_file,
)
from opensora.models.text_encoder import TextEncoderConfig, make_tiny_t5
from opensora.models.vae import TINY_VAE_CONFIGS, VAEConfig, build_vae, make_tiny_vae
from opensora.training.config import InitConfig

TINY = "tiny"
# PixArt-α has no temporal attention: these STDiT parameters keep their init (zero output projection, so
# each block starts as PixArt-α's image block; Open-Sora 1.0 did the same).
PIXART_NEW_PARAMS = ".attn_temp."
# Fixed-size buffers PixArt-α saved for one resolution; STDiT computes them per input.
PIXART_DERIVED_KEYS = ("pos_embed",)


def write_new_bundle(out_dir: Path, init: InitConfig, model_name: str, model_overrides: dict, diffusion: str) -> Path:
    """The init bundle of a stage that starts a new model: :func:`write_random_bundle` from its init section.

    An existing bundle is reused (the init must not change when a run is resumed).

    Args:
        out_dir: bundle directory (the trainer uses ``OUTPUT_DIR/<stage>/init``).
        init: the stage's init section (``vae``, ``vae_subfolder``, ``text_encoder``, ``seed``).
        model_name: a named size of any family (``STDiT-debug``, ``tiny-wan2.1``, ...).
        model_overrides: STDiTConfig fields of the stage (e.g. ``space_scale``); STDiT only.
        diffusion: objective recorded in the bundle.
    """
    if not (out_dir / BUNDLE_FILE).is_file():
        write_random_bundle(out_dir, model_name, init.vae, init.text_encoder, diffusion,
                            vae_subfolder=init.vae_subfolder, seed=init.seed,
                            overrides=[("model_overrides", model_overrides)] if model_overrides else [],
                            names=("init.vae", "init.text_encoder"))
    return out_dir


def write_random_bundle(out_dir: Path, model_name: str, vae: str, text_encoder: str, diffusion: str | None, *,
                        vae_subfolder: str | None = None, seed: int = 0, overrides: Sequence[tuple[str, Any]] = (),
                        names: tuple[str, str] = ("vae", "text_encoder")) -> torch.nn.Module:
    """Writes a randomly initialised bundle of size ``model_name`` fitted to a VAE and a text encoder.

    What ``tools/init_checkpoint.py`` writes and what a stage that starts a new model starts from. "tiny"
    encoders are generated inside the bundle, local directories are referenced by absolute path; nothing is
    downloaded. The model's ``in_channels`` / ``caption_channels`` are fitted to the encoders, then
    ``overrides`` apply. ``bundle.yaml`` is written last (``write_bundle``, as a training export is).

    Args:
        out_dir: bundle directory (created).
        model_name: a named size of any family (``opensora.models.families``: ``STDiT-debug``, ``tiny-wan2.1``,
            ``tiny-ltx``, ``Wan2.1-T2V-1.3B``, ...); ``bundle.yaml`` records its family.
        vae: a local autoencoder dir (any class ``opensora.models.vae.load_autoencoder`` reads: SD-VAE, Wan,
            HunyuanVideo, CogVideoX, LTX; the class comes from its config.json), "identity" (pixel space),
            "tiny" (a random per-frame one) or "tiny-KIND" (a random one of ``TINY_VAE_CONFIGS``, e.g.
            "tiny-wan2.1": 4x8x8, 4 channels). The model's ``in_channels`` become its latent channels.
        text_encoder: a local T5 encoder dir (with tokenizer) or "tiny" (a tiny random one of the family's encoder
            class: T5, or UMT5 for Wan).
        diffusion: objective recorded in the bundle; None: the family's training objective.
        vae_subfolder: e.g. "vae" inside a diffusers pipeline repo (Stable Diffusion, Wan2.1-T2V-1.3B-Diffusers).
        seed: seed of the model's and the tiny encoders' weights (the global generators are left as they were).
        overrides: :func:`opensora.config.merge` sources of STDiTConfig fields (``parse_overrides`` of
            ``--set`` arguments, or a stage's ``model_overrides`` dict); STDiT only (other families: named sizes).
        names: what the caller calls ``vae`` and ``text_encoder``, for error messages.
    Returns:
        the model written.
    Raises:
        ConfigError: an unknown size, an encoder directory that does not exist, or a bad override; the message
            names it.
    """
    try:
        family = family_of_size(model_name)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None
    if family.name != "stdit" and overrides:
        raise ConfigError(f"{model_name}: model field overrides apply to STDiT sizes only; pick a named "
                          f"{family.name} size ({', '.join(family.sizes)})")
    diffusion = diffusion or family.objective.name
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny_kind = _tiny_vae_kind(vae, names[0])
    if tiny_kind is not None:
        make_tiny_vae(out_dir / "vae", seed=seed, kind=tiny_kind)
        # "tiny" keeps the bundle it always wrote (type kl); the other kinds are read by config.json's class.
        vae_type = "kl" if vae == TINY else "auto"
        vae_cfg, vae_build = VAEConfig(type=vae_type, path="vae"), VAEConfig(type=vae_type, path=str(out_dir / "vae"))
    elif vae == "identity":
        vae_cfg = vae_build = VAEConfig(type="identity")
    else:  # any supported autoencoder: the class comes from the directory's config.json
        vae_cfg = vae_build = VAEConfig(type="auto", path=_existing_dir(vae, names[0]), subfolder=vae_subfolder)
    if text_encoder == TINY:
        make_tiny_t5(out_dir / "text_encoder", seed=seed, encoder_type=family.text.encoder)
        te_path, te_read = "text_encoder", str(out_dir / "text_encoder")
    else:
        te_path = te_read = _existing_dir(text_encoder, names[1])
    try:
        vae_channels = build_vae(vae_build).out_channels  # the model's in_channels: the autoencoder's latent channels
    except (FileNotFoundError, ValueError) as err:  # no config.json, an unsupported class, missing weights
        raise ConfigError(f"{names[0]}: {err}") from err
    # The text width is read from the T5 config: no need to load billions of weights for a random init.
    te_width = AutoConfig.from_pretrained(te_read, local_files_only=True).d_model
    if family.name != "stdit":
        return _write_random_family_bundle(out_dir, family, model_name, vae_channels, te_width, seed,
                                           BundleConfig(family=family.name, vae=vae_cfg, diffusion=diffusion,
                                                        text_encoder=TextEncoderConfig(
                                                            type=family.text.encoder, path=te_path,
                                                            max_length=family.text.max_length)))
    fitted = ("fitted to the encoders", {"in_channels": vae_channels, "caption_channels": te_width})
    config = merge(STDiT_models[model_name], [fitted, *overrides])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = STDiT(config)
    te_cfg = TextEncoderConfig(path=te_path, max_length=config.model_max_length)
    write_bundle(out_dir, model, BundleConfig(vae=vae_cfg, text_encoder=te_cfg, diffusion=diffusion))
    return model


# Config fields of the diffusers families that take the latent channels / the text width (Wan: text_dim; LTX:
# caption_channels): a random model is fitted to its encoders through them.
_CHANNEL_FIELDS = ("in_channels", "out_channels")
_TEXT_WIDTH_FIELDS = ("text_dim", "caption_channels")


def _write_random_family_bundle(out_dir: Path, family: ModelFamily, size: str, vae_channels: int, te_width: int,
                                seed: int, config: BundleConfig) -> torch.nn.Module:
    """A random model of a diffusers family's named size, fitted to the encoders, written as a bundle."""
    named = family.size_config(size)
    fitted = {k: vae_channels for k in _CHANNEL_FIELDS if k in named}
    fitted.update({k: te_width for k in _TEXT_WIDTH_FIELDS if k in named})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = family.build(size, **fitted)
    write_bundle(out_dir, model, config)
    return model


def family_of_diffusers_folder(directory: str | Path) -> ModelFamily:
    """The family whose transformer class a diffusers folder holds (``_class_name`` of its ``config.json`` or
    ``transformer/config.json``); ConfigError naming the folder and the known classes otherwise."""
    import json

    root = Path(directory)
    path = next((p for p in (root / "transformer" / "config.json", root / "config.json") if p.is_file()), None)
    if path is None:
        raise ConfigError(f"{root}: not a diffusers model folder (no config.json nor transformer/config.json)")
    class_name = json.loads(path.read_text()).get("_class_name")
    known = {}
    for family in FAMILIES.values():
        if family.diffusers_pipeline is None:
            continue
        with torch.device("meta"):  # the class the family builds, without memory
            known[type(family.build(next(iter(family.sizes)))).__name__] = family
    if class_name not in known:
        raise ConfigError(f"{path}: _class_name {class_name!r} is none of the families' transformers "
                          f"({', '.join(f'{c} ({f.name})' for c, f in known.items())})")
    return known[class_name]


def write_pretrained_bundle(out_dir: Path, directory: str | Path) -> BundleConfig:
    """A bundle that references a pretrained diffusers pipeline folder (``transformer/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, e.g. ``Wan2.1-T2V-1.3B-Diffusers``) by absolute path: nothing is copied
    or downloaded. The family comes from the transformer's class; its text length and objective from the family.
    """
    root = Path(_existing_dir(str(directory), "--model"))
    family = family_of_diffusers_folder(root)
    missing = [sub for sub in ("vae", "text_encoder", "tokenizer") if not (root / sub).is_dir()]
    if missing:
        raise ConfigError(f"{root}: a pipeline folder needs {', '.join(missing)}/ (next to transformer/)")
    config = BundleConfig(
        family=family.name, model_dir=str(root), diffusion=family.objective.name,
        vae=VAEConfig(type="auto", path=str(root), subfolder="vae"),
        text_encoder=TextEncoderConfig(type=family.text.encoder, path=str(root), subfolder="text_encoder",
                                       tokenizer_subfolder="tokenizer", max_length=family.text.max_length),
    )
    write_bundle(out_dir, None, config)
    return config


def _tiny_vae_kind(vae: str, key: str) -> str | None:
    """The kind of tiny random VAE ``vae`` names ("tiny": the per-frame "kl"; "tiny-wan2.1": "wan2.1"), else None."""
    if vae == TINY:
        return "kl"
    if not vae.startswith(TINY + "-") or Path(vae).exists():
        return None
    kind = vae[len(TINY) + 1:]
    if kind not in TINY_VAE_CONFIGS:
        raise ConfigError(f"{key}: {vae}: no such tiny VAE; one of "
                          f"{', '.join(f'{TINY}-{k}' for k in TINY_VAE_CONFIGS)} (or '{TINY}', a per-frame one)")
    return kind


def _existing_dir(path: str, key: str) -> str:
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{key}: {path} is not a directory (a local model dir, or '{TINY}'); nothing is downloaded")
    return str(p.resolve())


def load_init_checkpoint(model: STDiT, path: str | Path, fmt: str) -> None:
    """Loads a weights file over ``model`` in place.

    Args:
        model: the STDiT (on CPU, fp32).
        path: ``.pth`` (read with ``weights_only=True``) or ``.safetensors``.
        fmt: "opensora_v1": an Open-Sora 1.0 STDiT checkpoint, every parameter must fit (strict).
            "pixart": a PixArt-α checkpoint (e.g. PixArt-XL-2-512x512.pth): every spatial parameter must fit;
            the temporal attention keeps its identity init; the 2D patch embedding gains a time axis of 1.
    """
    path = Path(path)
    if fmt == "opensora_v1":
        load_opensora_v1_checkpoint(model, path)
        return
    # convert_opensora_v1_state_dict unwraps "state_dict"/"ema"/"module." containers.
    state = convert_opensora_v1_state_dict(read_weights_file(path, "init.checkpoint"))
    state = {k: v for k, v in state.items() if k not in PIXART_DERIVED_KEYS}
    key = "x_embedder.proj.weight"
    if key in state and state[key].dim() == 4:  # (D, C, ph, pw) Conv2d -> (D, C, 1, ph, pw) Conv3d
        state[key] = state[key].unsqueeze(2)
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(state) if PIXART_NEW_PARAMS not in k)
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} is not a PixArt-α checkpoint of this model's size: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}, wrong shapes {wrong[:6]}"
        )
    model.load_state_dict(state, strict=False)
