"""What the trainer, the sampler, the cost ledger and the exports need from a video transformer: :class:`ModelFamily`.

A *family* is one kind of denoiser (STDiT, Wan 2.1/2.2, LTX-Video): one architecture class with many sizes.
Its spec adapts the family to this project's conventions and declares what it supports, so that the code
around it asks the spec and never names a model class (torchtitan's ``TrainSpec``, finetrainers'
``ModelSpecification``). The objectives (``opensora/diffusion``), frame conditioning and seeding stay generic.

The project's conventions, which every family's :meth:`ModelFamily.forward` takes and gives:

* latent ``x`` (B, C, T, H, W), already normalised by the autoencoder wrapper (``models/vae.py``);
* timestep ``t`` (B,) or one per latent frame (B, T), on the 0..1000 scale (``RFlow`` passes ``t * 1000``);
* text ``y`` (B, 1, L, Ct) or (B, L, Ct) and its ``mask`` (B, L) (1 = real token), as
  ``T5TextEncoder.encode`` returns them: every position holds the encoder's output, padding included;
* output (B, C_out, T, H, W) float32 whose first C channels are the prediction in the objective's sign:
  for rectified flow, x_0 - noise (``diffusion/rflow.py``). diffusers' flow-matching transformers predict
  noise - x_0, so their families negate.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class TextSpec:
    """The text encoder a family was trained with, and how its output reaches the model.

    ``pad_with_zeros``: Wan's pipeline cuts the encoder states to the prompt's real length and pads with zeros,
    and passes no mask; the family zeroes the padded positions itself, so the same encoder output serves every
    family. Otherwise the padded positions keep the encoder's states and the mask goes to the model.
    """

    encoder: str  # transformers class family: "t5" (T5EncoderModel) or "umt5" (UMT5EncoderModel)
    max_length: int  # tokens L the prompt is padded / cut to
    pad_with_zeros: bool  # see above
    mask_to_model: bool  # whether the attention mask reaches the transformer
    reference: str  # the published encoder, for docs and errors (nothing is downloaded)


@dataclass(frozen=True)
class FlowShift:
    """Timestep shift t' = s t / (1 + (s - 1) t) of a flow-matching model (``RFlow``'s ``shift``).

    Fixed (``shift``), or resolution-dependent as LTX-Video's scheduler: s = exp(mu) with mu linear in the number
    of video tokens N, from ``base_shift`` at ``base_tokens`` to ``max_shift`` at ``max_tokens`` (diffusers'
    ``calculate_shift`` and ``FlowMatchEulerDiscreteScheduler.time_shift`` "exponential", which is this same map).
    """

    shift: float = 1.0
    base_tokens: int | None = None
    max_tokens: int | None = None
    base_shift: float | None = None
    max_shift: float | None = None

    def __post_init__(self):
        dynamic = (self.base_tokens, self.max_tokens, self.base_shift, self.max_shift)
        if any(v is None for v in dynamic) != all(v is None for v in dynamic):
            raise ValueError(f"a dynamic shift needs base_tokens, max_tokens, base_shift and max_shift, got {dynamic}")
        if self.shift <= 0 or (self.base_tokens is not None and self.max_tokens <= self.base_tokens):
            raise ValueError(f"shift must be > 0 and max_tokens > base_tokens, got {self}")

    @property
    def dynamic(self) -> bool:
        return self.base_tokens is not None

    def at(self, tokens: int) -> float:
        """The shift s for a latent of ``tokens`` video tokens (the fixed shift when not dynamic)."""
        if not self.dynamic:
            return self.shift
        m = (self.max_shift - self.base_shift) / (self.max_tokens - self.base_tokens)  # type: ignore[operator]
        mu = self.base_shift + m * (tokens - self.base_tokens)  # type: ignore[operator]
        return math.exp(mu)


@dataclass(frozen=True)
class TrainingObjective:
    """The objective a family is trained (and fine-tuned) with, and its timestep distribution."""

    name: str  # "rflow" or "iddpm" (opensora.diffusion.SCHEDULERS)
    logit_mean: float = 0.0  # rflow: t = shift(sigmoid(N(logit_mean, logit_std^2)))
    logit_std: float = 1.0
    shift: FlowShift = field(default_factory=FlowShift)
    source: str = ""  # where the setting is published


@dataclass(frozen=True)
class SamplerDefaults:
    """How the family's own pipeline samples by default (what an export's ``scheduler/`` should reproduce)."""

    name: str  # our sampler: "rflow" (Euler) or "iddpm"
    steps: int
    cfg_scale: float
    shift: FlowShift = field(default_factory=FlowShift)
    shift_terminal: float | None = None  # LTX: the schedule is stretched so its last sigma is this
    negative_prompt: str = ""  # the unconditional branch of CFG ("" = the pipelines' default)
    diffusers_scheduler: str | None = None  # the scheduler class the family's diffusers pipeline ships with
    source: str = ""


class ModelFamily(abc.ABC):
    """One family of video transformers behind the project's conventions (see the module docstring).

    Subclasses set the class attributes and implement the abstract methods; one instance per family lives in
    ``opensora.models.families.FAMILIES``. ``config`` below is the family's own config object (``STDiTConfig``,
    or the diffusers model's ``FrozenDict`` config).
    """

    name: str  # key in FAMILIES and in bundle.yaml
    sizes: dict[str, dict[str, Any]]  # named sizes -> config fields (published ones, and tiny ones for tests)
    text: TextSpec
    objective: TrainingObjective
    sampler: SamplerDefaults
    objectives: tuple[str, ...]  # objectives the model's output supports
    lora_targets: str  # peft ``target_modules`` regex (full match): the adapted Linear layers, inside blocks only
    supports_sequence_parallel: bool  # our Ulysses wrapper can shard it (opensora/distributed/sequence_parallel.py)
    diffusers_pipeline: str | None  # the diffusers pipeline class of an export (None: no diffusers layout)

    # -- build --------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def build(self, size: str | dict[str, Any], **overrides) -> nn.Module:
        """A randomly initialised model of a named size (or of config fields), fp32 on the CPU."""

    @abc.abstractmethod
    def from_pretrained(self, directory: str, dtype: torch.dtype | None = None) -> nn.Module:
        """Loads a model from a local directory (its config.json and weights); never downloads."""

    @abc.abstractmethod
    def read_config(self, directory: str) -> Any:
        """The model's config from ``directory/config.json``, without weights (for forecasts and checks)."""

    def config_of(self, model: nn.Module) -> Any:
        return model.config

    def size_config(self, size: str, **overrides) -> dict[str, Any]:
        """The config fields of a named size, with some replaced; KeyError naming the known sizes."""
        if size not in self.sizes:
            raise KeyError(f"unknown {self.name} size {size!r}; known: {', '.join(self.sizes)}")
        return {**self.sizes[size], **overrides}

    # -- shapes -------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def in_channels(self, config) -> int:
        """Latent channels the model takes."""

    @abc.abstractmethod
    def out_channels(self, config) -> int:
        """Channels of :meth:`forward`'s output (the first ``in_channels`` are the prediction)."""

    @abc.abstractmethod
    def text_dim(self, config) -> int:
        """Width of the text-encoder states the model takes."""

    @abc.abstractmethod
    def patch_size(self, config) -> tuple[int, int, int]:
        """(pt, ph, pw): the latent (T, H, W) must divide by it."""

    def check_input_size(self, config, latent_size: tuple[int, int, int]) -> None:
        """Raises ValueError naming ``latent_size`` (T, H, W) if the patch size does not divide it."""
        patch = self.patch_size(config)
        if any(int(s) % p for s, p in zip(latent_size, patch)):
            raise ValueError(f"latent size (T, H, W)={tuple(latent_size)} is not divisible by the {self.name} "
                             f"patch size {patch}")

    def video_tokens(self, config, latent_size: tuple[int, int, int]) -> int:
        """Video tokens N of one sample after patchify (what the ledger counts as tokens)."""
        self.check_input_size(config, latent_size)
        return math.prod(int(s) // p for s, p in zip(latent_size, self.patch_size(config)))

    @abc.abstractmethod
    def frame_timesteps(self, config) -> bool:
        """Whether the model was trained with one timestep per latent frame (frame conditioning keeps given
        frames at t = 0); :meth:`forward` accepts (B, T) timesteps either way."""

    # -- forward ------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, model: nn.Module, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """The model's prediction in the project's conventions (module docstring).

        Args:
            model: a model of this family (possibly with LoRA adapters).
            x: (B, C, T, H, W) noisy latent.
            timestep: (B,) or (B, T) per latent frame, 0..1000.
            y: (B, 1, L, Ct) or (B, L, Ct) text-encoder states.
            mask: (B, L) text mask, 1 = real token (None: all real).
        Returns:
            (B, C_out, T, H, W) float32; the first C channels are the objective's prediction (rflow: x_0 - noise).
        """

    def model_fn(self, model: nn.Module) -> Callable[..., torch.Tensor]:
        """``f(x, t, y=..., mask=...)``, the callable the objectives and samplers take (``RFlow.training_losses``)."""

        def fn(x, timestep, y, mask=None):
            return self.forward(model, x, timestep, y, mask)

        return fn

    # -- cost ---------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def forward_flops(self, config, latent_size: tuple[int, int, int], text_len: int | None = None,
                      frame_timesteps: bool = False) -> float:
        """Matmul FLOPs (2*m*n*k) of one forward of one sample; the training FLOPs are 3x (as
        ``opensora/accounting/flops.py``: recomputation by activation checkpointing is not counted).

        Args:
            config: the model's config.
            latent_size: (T, H, W) of the latent.
            text_len: text tokens L (None: the family's ``text.max_length``).
            frame_timesteps: the timestep was (B, T) (its embedding then runs once per frame or token).
        """

    def train_flops_per_sample(self, config, latent_size: tuple[int, int, int], text_len: int | None = None) -> float:
        """Model FLOPs of one training sample: 3 x forward."""
        return 3.0 * self.forward_flops(config, latent_size, text_len)

    # -- parallelism --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The repeated transformer blocks: the units of activation checkpointing, compile and FSDP2 wrapping."""

    # -- exports ------------------------------------------------------------------------------------------------
    def diffusers_scheduler(self):
        """The scheduler the family's published diffusers pipeline ships with (``scheduler/`` of an export), built
        from :attr:`sampler`; ValueError for a family without a diffusers pipeline."""
        raise ValueError(f"the {self.name} family has no diffusers pipeline (diffusers_pipeline is None)")

    def diffusers_pipeline_options(self, config) -> dict[str, Any]:
        """Extra constructor arguments of the family's diffusers pipeline for a model of ``config`` (none)."""
        return {}


def diffusers_transformer(cls, directory: str, dtype: torch.dtype | None = None) -> nn.Module:
    """``cls.from_pretrained`` on a diffusers model folder or on a pipeline folder (its ``transformer/``), from
    local files only; FileNotFoundError naming the folder otherwise."""
    from pathlib import Path

    root = Path(directory)
    subfolder = "transformer" if (root / "transformer" / "config.json").is_file() else None
    if not (root / (subfolder or "") / "config.json").is_file():
        raise FileNotFoundError(f"{root}: no config.json (nor transformer/config.json): not a diffusers "
                                f"{cls.__name__} folder (nothing is downloaded)")
    return cls.from_pretrained(str(root), subfolder=subfolder, local_files_only=True, torch_dtype=dtype)


def call_in_weight_dtype(model: nn.Module, weight: Callable[[nn.Module], torch.Tensor], cast: tuple[str, ...],
                         **kwargs) -> Any:
    """``model(**kwargs)`` with the float inputs named in ``cast`` in the dtype of ``weight(model)`` *as the forward
    sees it* (diffusers' video transformers do not cast their inputs to their weights).

    Under FSDP2 with a bf16 ``MixedPrecisionPolicy`` the root's parameters are the sharded fp32 masters until its
    pre-forward hook gathers them as bf16 copies; a dtype read before the call is fp32 against bf16 weights. The cast
    therefore runs in a forward pre-hook registered after FSDP2's (which is prepended), for this call only. Without
    FSDP2 it is the weight's own dtype (a bf16 model for inference, fp32 on CPU). The root does not cast its inputs
    itself (``parallelize``): the timestep must stay fp32 for its sinusoid.
    """

    def to_weight_dtype(module, args, kw):
        dtype = weight(module).dtype
        return args, {**kw, **{k: kw[k].to(dtype) for k in cast}}

    handle = model.register_forward_pre_hook(to_weight_dtype, with_kwargs=True)
    try:
        return model(**kwargs)
    finally:
        handle.remove()


def per_token_timesteps(timestep: torch.Tensor, latent_grid: tuple[int, int, int]) -> torch.Tensor:
    """(B,) stays; (B, T') per latent frame -> (B, T'*H'*W') per token, tokens in (T', H', W') order as the
    diffusers transformers flatten them (Wan 2.2 TI2V's ``expand_timesteps``, LTX's per-token ``timestep``)."""
    if timestep.dim() == 1:
        return timestep
    T, H, W = latent_grid
    if timestep.dim() != 2 or timestep.shape[1] != T:
        raise ValueError(f"timestep must be (B,) or (B, T={T}) per latent frame, got shape {tuple(timestep.shape)}")
    return timestep.repeat_interleave(H * W, dim=1)  # (B, N)


def text_states(y: torch.Tensor, mask: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, L, Ct) text states and a (B, L) mask from the project's (B, 1, L, Ct) / (B, L, Ct); a mask with fewer
    rows than the batch is repeated (classifier-free guidance passes [cond; uncond] with one mask, as STDiT)."""
    if y.dim() == 4:
        y = y[:, 0]
    if mask is not None and mask.shape[0] != batch:
        mask = mask.repeat(batch // mask.shape[0], 1)
    return y, mask
