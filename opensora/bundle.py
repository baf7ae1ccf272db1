"""Pipeline bundles: everything needed to turn prompts into videos, in one directory.

A bundle is what ``tools/init_checkpoint.py`` writes, what training starts from and exports at the end of
every stage, and what ``tools/sample.py --ckpt`` reads::

    DIR/
      bundle.yaml          # BundleConfig: model family, which model dir, VAE, text encoder, diffusion objective
      model/               # the model's save_pretrained: config.json + weights (STDiT, or a diffusers transformer)
      vae/, text_encoder/  # only for the tiny built-in ones of debug sizes; real ones are local paths

Relative paths in ``bundle.yaml`` are relative to the bundle directory, so a bundle can be moved or copied.
``family`` (``opensora.models.families``; default ``stdit``, so bundles written before it existed load) says how
to build, call and sample the model: the sampler asks the family, never names a model class. ``model_dir`` may
be a pretrained diffusers folder (a pipeline's root or its ``transformer/``), referenced, never copied.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING

from opensora.config import ConfigError, load_config, to_yaml
from opensora.models.families import ModelFamily, get_family
from opensora.models.text_encoder import TextEncoderConfig, build_text_encoder
from opensora.models.autoencoders import AutoencoderShape
from opensora.models.vae import VAEConfig, autoencoder_shape, build_vae
from opensora.utils import atomic_write_path

BUNDLE_FILE = "bundle.yaml"
DIFFUSIONS = ("iddpm", "rflow")


@dataclass
class BundleConfig:
    """What a bundle contains. Paths may be relative to the bundle directory."""

    family: str = "stdit"  # model family (opensora.models.families.FAMILIES): how the model is built and called
    model_dir: str = "model"  # the model's save_pretrained directory (or a diffusers folder)
    vae: VAEConfig = field(default_factory=lambda: VAEConfig(type="identity"))  # latent space of the model
    # T5 encoder + tokenizer; required (MISSING) because there is no sensible default path.
    text_encoder: TextEncoderConfig = MISSING
    diffusion: str = "iddpm"  # objective the model was trained with, and the default sampler

    def __post_init__(self):
        if self.diffusion not in DIFFUSIONS:
            raise ValueError(f"diffusion must be one of {DIFFUSIONS}, got {self.diffusion!r}")
        family = get_family(self.family)  # KeyError naming the known families
        if self.diffusion not in family.objectives:
            raise ValueError(f"diffusion {self.diffusion!r}: the {self.family} family's output supports "
                             f"{', '.join(family.objectives)} only")


def resolve_path(bundle_dir: str | Path, path: str | None) -> str | None:
    """A path read from ``bundle.yaml``, as the bundle means it.

    Args:
        bundle_dir: the bundle directory.
        path: a path from its config; ``~`` is expanded. A relative one that exists inside ``bundle_dir`` is
            taken from there (so a bundle can be moved or copied); any other is returned as written.
    Returns:
        the path as a string, or None for None.
    """
    if path is None:
        return None
    p, base = Path(path).expanduser(), Path(bundle_dir)
    return str(base / p) if not p.is_absolute() and (base / p).exists() else str(p)


def load_bundle_config(directory: str | Path) -> BundleConfig:
    """Reads ``DIR/bundle.yaml`` (errors name the file and key); its paths are as written, see :func:`resolve_path`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    if not (directory / BUNDLE_FILE).is_file():
        raise FileNotFoundError(
            f"{directory} is not a pipeline bundle: {BUNDLE_FILE} is missing "
            "(make one with tools/init_checkpoint.py, or export one from training)"
        )
    return load_config(BundleConfig, directory / BUNDLE_FILE)


@dataclass
class FrameCondition:
    """Given pixel frames for :meth:`Bundle.generate`: image-to-video, video extension, an end image, or both.

    ``start`` are the first Ks frames of every video, ``end`` the last Ke; each (B, 3, K, H, W) in [-1, 1] at the
    requested size, or None. How many fit is the autoencoder's frame rule
    (:func:`opensora.diffusion.conditioning.latent_frames_given`): any count for a per-frame VAE; for a causal 3D
    VAE of factor t, ``start`` t*k + 1 frames (frame 0 alone is latent frame 0) and ``end`` a multiple of t.
    """

    start: torch.Tensor | None = None
    end: torch.Tensor | None = None

    @property
    def counts(self) -> tuple[int, int]:
        """(Ks, Ke): given frames at the start and at the end."""
        return tuple(0 if v is None else int(v.shape[2]) for v in (self.start, self.end))  # type: ignore[return-value]


@dataclass
class Bundle:
    """A loaded bundle: the denoiser, the autoencoder, the text encoder and their config."""

    model: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    config: BundleConfig
    path: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def family(self) -> ModelFamily:
        return get_family(self.config.family)

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent (T, H, W) for a video size; raises ValueError naming the size if a factor does not divide it, or
        the nearest valid frame counts if the autoencoder does not take ``num_frames`` (13 and 17 for 16 at 4x
        causal)."""
        size = self.vae.get_latent_size((num_frames, height, width))
        own_check = getattr(self.model, "check_input_size", None)  # STDiT's own message names its patch size
        if own_check is not None:
            own_check(size)
        else:
            self.family.check_input_size(self.family.config_of(self.model), size)
        return size

    def dropped_tokens(self, prompts: list[str]) -> list[int]:
        """Per prompt, how many tokens the text encoder cuts off (it keeps ``max_length``, the closing ``</s>``
        included); 0 for a prompt that fits. The model never sees the dropped words, so the CLI warns."""
        te = self.text_encoder
        ids = te.tokenizer(list(prompts), add_special_tokens=True, truncation=False)["input_ids"]
        return [max(0, len(i) - te.max_length) for i in ids]

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        num_frames: int,
        height: int,
        width: int,
        steps: int = 100,
        cfg_scale: float = 4.0,
        seed: int = 0,
        sampler: str | None = None,
        progress: bool = True,
        cond: FrameCondition | None = None,
        cfg_group=None,
        decode_group=None,
        cache=None,
        callback=None,
    ) -> torch.Tensor:
        """Samples one video per prompt.

        Args:
            prompts: captions, one video each (sampled together as one batch).
            num_frames, height, width: video size in pixels; must divide by the VAE and patch factors.
            steps: sampling steps (IDDPM respaced, or rectified-flow Euler steps).
            cfg_scale: classifier-free guidance scale; 1.0 disables guidance (one model call per step).
            seed: the initial noise and every sampling step draw from one generator seeded with this.
            sampler: "iddpm" or "rflow"; defaults to the objective the bundle was trained with. Rectified flow
                samples with the family's timestep shift at this latent size (``family.sampler.shift``; STDiT: none).
            cond: given frames (first Ks and / or last Ke of every video): they are encoded with the bundle's
                autoencoder and kept, with t = 0, at every sampling step, in both guidance branches. With an
                identity autoencoder they come out bit for bit; with a VAE within its round-trip error.
            cfg_group: CFG parallelism (``--cfg-parallel``): a process group of 2 ranks; rank 0 of it runs the
                conditional pass, rank 1 the unconditional one, and both mix the gathered predictions
                (:func:`opensora.distributed.sequence_parallel.cfg_parallel_guidance`). None: one batch of 2B.
            decode_group: the ranks that sampled this video together (SP and CFG ranks): a per-frame autoencoder
                decodes a share of the latent frames on each and gathers them. None: this process decodes all.
            cache: a :class:`opensora.sampling.StepCache`: steps whose model input barely changed reuse the last
                prediction (its ``calls`` / ``skipped`` count them). None: every step runs the model.
            callback: ``callback(step, timestep, latents)`` after each sampling step (an
                :data:`opensora.diffusion.callbacks.StepCallback`: step 0.., the timestep the model saw, the
                (B, C, T', h, w) latents after the step); a tensor it returns replaces the latents. Under CFG or
                sequence parallelism every rank calls it and must return the same tensor. None: as before.
        Every rank of a parallel group calls this with the same arguments and gets the same video.
        Returns:
            (B, 3, T, H, W) float video in [-1, 1] on the CPU.
        """
        from opensora.diffusion import build_scheduler, classifier_free_guidance

        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("every prompt must be non-empty text")
        sampler = sampler or self.config.diffusion
        family = self.family
        model_config = family.config_of(self.model)
        channels = family.in_channels(model_config)
        latent = self.latent_size(num_frames, height, width)
        device = self.device
        text = self.text_encoder.encode(list(prompts), device=device)
        y, mask = text["y"], text["mask"]
        B = len(prompts)
        generator = torch.Generator(device=device).manual_seed(seed)
        noise = torch.randn((B, channels, *latent), generator=generator, device=device)
        options = {}
        if sampler == "rflow":  # the family's sampling shift at this size (1.0, none, for STDiT)
            options["shift"] = family.sampler.shift.at(family.video_tokens(model_config, latent))
        scheduler = build_scheduler(sampler, num_sampling_steps=steps, **options)
        self.model.eval()
        model_fn = family.model_fn(self.model)
        if cfg_scale == 1.0:
            if cfg_group is not None:
                raise ValueError("CFG parallelism needs guidance (cfg_scale != 1): there is no second pass to split")
            kwargs = dict(y=y, mask=mask)
        else:
            if hasattr(self.model, "null_caption"):  # a learned null caption (STDiT): what its caption dropout trained
                null_y, null_mask = self.model.null_caption(B).to(y.dtype), mask
            else:  # the families trained with the encoded negative prompt ("" by default) in its place
                null = self.text_encoder.encode([family.sampler.negative_prompt] * B, device=device)
                null_y, null_mask = null["y"].to(y.dtype), null["mask"]
            if cfg_group is None:
                model_fn = classifier_free_guidance(model_fn, cfg_scale, guided_channels=channels)
                kwargs = dict(y=torch.cat([y, null_y]), mask=torch.cat([mask, null_mask]))
            else:
                from opensora.distributed.sequence_parallel import cfg_parallel_guidance

                branch = torch.distributed.get_rank(cfg_group)  # 0: conditional, 1: unconditional
                model_fn = cfg_parallel_guidance(model_fn, cfg_scale, channels, cfg_group)
                kwargs = dict(y=y, mask=mask) if branch == 0 else dict(y=null_y, mask=null_mask)
        if cache is not None:
            model_fn = cache.wrap(model_fn, steps)
        frames = {} if cond is None else self.encode_condition(cond, B, num_frames, height, width, noise)
        z = scheduler.sample(model_fn, noise, model_kwargs=kwargs, progress=progress, generator=generator,
                             callback=callback, **frames)
        video = self.decode(z, group=decode_group).float().clamp(-1, 1).cpu()
        if tuple(video.shape[2:]) != (num_frames, height, width):  # a decoder off its frame rule would say so here
            raise RuntimeError(f"{self.vae.name} decoded a {tuple(video.shape[2:])} video for the requested "
                               f"{(num_frames, height, width)}")
        return video

    @torch.no_grad()
    def decode(self, z: torch.Tensor, group=None) -> torch.Tensor:
        """(B, C, T', h, w) latents -> (B, 3, T, H, W) video, in the autoencoder's bounded micro-batches.

        With ``group`` (the ranks that hold the same ``z``), a per-frame autoencoder (SD-VAE, identity: each
        latent frame decodes alone, so a split changes nothing) decodes a contiguous share of the frames on each
        rank and all of them gather the video; a 3D autoencoder, whose frames depend on each other, decodes whole
        on every rank (its ``micro_batch_size`` / tiling bound the memory).
        """
        z = z.to(next(self.vae.parameters(), z).dtype)
        per_frame = self.vae.compression[0] == 1 and not self.vae.causal
        if group is None or not per_frame or torch.distributed.get_world_size(group) == 1:
            return self.vae.decode(z)
        P, r = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        mine = z.tensor_split(P, dim=2)[r]  # (B, C, ~T'/P, h, w); may be empty when T' < P
        part = self.vae.decode(mine) if mine.shape[2] else mine.new_zeros(0)
        parts = [None] * P
        torch.distributed.all_gather_object(parts, part.cpu(), group=group)  # shares differ in length by one
        return torch.cat([p for p in parts if p.numel()], dim=2).to(z.device)

    @torch.no_grad()
    def encode_condition(self, cond: FrameCondition, batch: int, num_frames: int, height: int, width: int,
                         like: torch.Tensor) -> dict[str, torch.Tensor]:
        """``cond_latent`` (like ``like``) and ``cond_mask`` (B, T') for the sampler, from given pixel frames.

        The given frames are put in place in an otherwise grey (0) video of the full length, which is encoded
        whole (the posterior's mode): a causal VAE then encodes frame 0 alone as latent frame 0, exactly as it
        would in a real video, and each given latent frame covers given pixel frames only (the frame rule,
        checked first). Raises ValueError naming a wrong shape or count.
        """
        from opensora.diffusion.conditioning import cond_mask_for, latent_frames_given

        n_start, n_end = cond.counts
        if n_start == n_end == 0:
            raise ValueError("frame condition has neither start nor end frames")
        for name, frames in (("start", cond.start), ("end", cond.end)):
            if frames is not None and (frames.dim() != 5 or tuple(frames.shape[:2]) != (batch, 3)
                                       or tuple(frames.shape[3:]) != (height, width)):
                raise ValueError(f"given {name} frames must be (B={batch}, 3, K, H={height}, W={width}), "
                                 f"got {tuple(frames.shape)}")
        first, last, total = latent_frames_given(num_frames, self.vae.compression[0], self.vae.causal, n_start, n_end)
        vae_dtype = next(self.vae.parameters(), like).dtype
        video = torch.zeros(batch, 3, num_frames, height, width, device=like.device, dtype=vae_dtype)
        if cond.start is not None:
            video[:, :, :n_start] = cond.start.to(video)
        if cond.end is not None:
            video[:, :, num_frames - n_end:] = cond.end.to(video)
        latent = self.vae.encode(video, sample_posterior=False).to(like.dtype)
        if latent.shape != like.shape:
            raise RuntimeError(f"{self.vae.name} encoded the given frames to {tuple(latent.shape)}, the noise is "
                               f"{tuple(like.shape)}")
        return dict(cond_latent=latent, cond_mask=cond_mask_for(batch, total, first, last, device=like.device))


def bundle_autoencoder_shape(directory: str | Path, config: BundleConfig | None = None) -> AutoencoderShape:
    """What a bundle's autoencoder does to shapes (factors, frame rule, channels), read from its config.json
    without loading any weights, so a size it cannot take is refused before any work."""
    cfg = load_bundle_config(directory) if config is None else config
    return autoencoder_shape(_resolved_vae_config(directory, cfg.vae))


def _resolved_vae_config(directory: str | Path, vae_cfg: VAEConfig) -> VAEConfig:
    """``vae_cfg`` with its path resolved against the bundle (see :func:`resolve_path`)."""
    if vae_cfg.path is None:
        return vae_cfg
    return VAEConfig(**{**vae_cfg.__dict__, "path": resolve_path(directory, vae_cfg.path)})


def load_bundle(directory: str | Path, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None, vae_micro_batch_size: int | None = None,
                vae_tiling: bool = False) -> Bundle:
    """Loads a bundle written by :func:`write_bundle` (weights from safetensors / ``from_pretrained`` only).

    Args:
        vae_micro_batch_size: frames (per-frame VAE) or clips (3D VAE) per decoder call, replacing the bundle's
            ``vae.micro_batch_size`` (the decoder's peak memory); None: the bundle's.
        vae_tiling: decode in spatial tiles (diffusers' ``enable_tiling``) even where the bundle does not.
    """
    directory = Path(directory)
    cfg = load_bundle_config(directory)
    if vae_micro_batch_size is not None or vae_tiling:
        vae = dataclasses.replace(cfg.vae, tiling=cfg.vae.tiling or vae_tiling,
                                  micro_batch_size=vae_micro_batch_size or cfg.vae.micro_batch_size)
        cfg = dataclasses.replace(cfg, vae=vae)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_bundle_model(directory, cfg, dtype=dtype).to(device=device).eval()
    vae, text_encoder = load_encoders(directory, device=device, dtype=dtype, config=cfg)
    check_compatible(model, vae, text_encoder, source=directory, family=get_family(cfg.family))
    return Bundle(model=model, vae=vae, text_encoder=text_encoder, config=cfg, path=directory)


def load_bundle_model(directory: str | Path, config: BundleConfig | None = None,
                      dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The bundle's model on the CPU, weights from safetensors, built by its family (``dtype`` None: as saved;
    diffusers' loader keeps the modules its class holds in fp32 there)."""
    cfg = load_bundle_config(directory) if config is None else config
    return get_family(cfg.family).from_pretrained(resolve_path(directory, cfg.model_dir), dtype=dtype)


def load_encoders(directory: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                  config: BundleConfig | None = None):
    """The frozen VAE and text encoder of a bundle (eval mode, no gradients), without its model.

    What sampling, training and ``tools/precompute.py`` build their encoders from, so all three resolve the
    bundle's paths alike (relative ones against ``directory``) and get the same weights.

    Args:
        directory: the bundle.
        device: where the weights go (default: CPU).
        dtype: weight dtype, e.g. ``torch.bfloat16`` (default: as stored).
        config: the bundle's :class:`BundleConfig` if already read (default: read ``bundle.yaml``).
    Returns:
        ``(vae, text_encoder)``.
    """
    directory = Path(directory)
    cfg = load_bundle_config(directory) if config is None else config
    vae = build_vae(_resolved_vae_config(directory, cfg.vae), device=device, dtype=dtype)
    te_cfg = TextEncoderConfig(**{**cfg.text_encoder.__dict__, "path": resolve_path(directory, cfg.text_encoder.path)})
    text_encoder = build_text_encoder(te_cfg, device=device, dtype=dtype).eval().requires_grad_(False)
    return vae, text_encoder


def check_compatible(model: torch.nn.Module, vae, text_encoder, source, family: ModelFamily | None = None) -> None:
    """The three parts must agree on latent channels and text width/length; say which does not.

    Args:
        family: the model's family (default: STDiT's). A model that declares its text length
            (STDiT's ``model_max_length``) must get exactly that many tokens.
    """
    family = get_family("stdit") if family is None else family
    c = family.config_of(model)
    channels, width = family.in_channels(c), family.text_dim(c)
    if vae.out_channels != channels:
        raise ConfigError(f"{source}: the VAE makes {vae.out_channels}-channel latents but the model takes {channels}")
    if text_encoder.output_dim != width:
        raise ConfigError(
            f"{source}: the text encoder outputs {text_encoder.output_dim} channels but the model expects {width}"
        )
    if hasattr(c, "model_max_length") and text_encoder.max_length != c.model_max_length:
        raise ConfigError(
            f"{source}: the text encoder pads to {text_encoder.max_length} tokens but the model expects {c.model_max_length}"
        )


def write_bundle(out_dir: str | Path, model: torch.nn.Module | None, config: BundleConfig,
                 copy_from: str | Path | None = None, state_dict: dict | None = None) -> Path:
    """Writes a bundle: ``model/`` (from ``model``, or ``state_dict`` with ``model``'s config; nothing for
    ``model=None``, whose ``config.model_dir`` names an existing folder), ``bundle.yaml``, and
    copies of the VAE / text-encoder directories of ``copy_from`` that ``config`` names by a relative path.

    ``bundle.yaml`` is written last, so a directory without it is never taken for a finished bundle.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        model = _with_state(model, state_dict)
    if model is not None:  # None: config.model_dir references a model folder (a pretrained diffusers one)
        model.save_pretrained(out_dir / config.model_dir)
    if copy_from is not None:
        copy_from = Path(copy_from)
        for sub in (config.vae.path, config.text_encoder.path):
            if sub and not Path(sub).is_absolute() and (copy_from / sub).is_dir():
                if (copy_from / sub).resolve() != (out_dir / sub).resolve():
                    shutil.copytree(copy_from / sub, out_dir / sub, dirs_exist_ok=True)
    with atomic_write_path(out_dir / BUNDLE_FILE) as tmp:
        tmp.write_text(f"# pipeline bundle written {time.strftime('%Y-%m-%d %H:%M:%S')}\n" + to_yaml(config))
    return out_dir


def _with_state(model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """A model of ``model``'s class and config holding ``state_dict`` (built on the meta device: no copy)."""
    with torch.device("meta"):
        clone = model_skeleton(model)
    clone.load_state_dict(state_dict, assign=True, strict=True)
    return clone


def model_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A new model of ``model``'s class and config (on the current default device; use the meta device)."""
    from_config = getattr(type(model), "from_config", None)  # diffusers ModelMixin: config.json's fields
    return from_config(model.config) if from_config is not None else type(model)(model.config)
