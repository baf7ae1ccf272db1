"""``STDiTPipeline``: an STDiT pipeline bundle as a ``diffusers.DiffusionPipeline``.

For people who use diffusers: ``from_pretrained(BUNDLE_DIR)``, ``pipe(prompt).frames`` in the diffusers video
convention (as ``WanPipeline`` returns them), so ``diffusers.utils.export_to_video`` writes them::

    from diffusers.utils import export_to_video
    from opensora import STDiTPipeline

    pipe = STDiTPipeline.from_pretrained("runs/demo/stage2/export").to("cuda")
    video = pipe("a red circle moving left", num_frames=16, height=256, width=256, num_inference_steps=100,
                 guidance_scale=4.0, seed=0).frames[0]
    export_to_video(video, "circle.mp4", fps=8)

There is no second sampler here: a call is one :meth:`opensora.bundle.Bundle.generate`, the code
``tools/sample.py`` runs, so the same bundle, prompts, seed and settings give the same frames as the CLI
(``--batch-size`` = the number of prompts of one call). ``callback_on_step_end`` is diffusers': it sees the
latents after every step and may return new ones. Wan and LTX bundles export to their own diffusers
pipelines instead (``tools/export_diffusers.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.video_processor import VideoProcessor

from opensora.bundle import DIFFUSIONS, Bundle, BundleConfig, load_bundle, load_bundle_config, write_bundle

DEFAULT_NUM_FRAMES = 16  # tools/sample.py's; an autoencoder that does not take it gets the next count it takes
OUTPUT_TYPES = ("np", "pil", "pt")


@dataclasses.dataclass
class STDiTPipelineOutput(BaseOutput):
    """What :class:`STDiTPipeline` returns.

    Args:
        frames: one video per prompt: ``np`` (B, T, H, W, 3) float in [0, 1]; ``pt`` (B, T, 3, H, W) float in
            [0, 1]; ``pil`` a list of B lists of T ``PIL.Image`` (the diffusers video convention).
    """

    frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]]


class STDiTPipeline(DiffusionPipeline):
    """Text-to-video with an STDiT pipeline bundle (``tools/init_checkpoint.py`` or a training export).

    Components: ``transformer`` (the STDiT), ``vae`` (the bundle's :class:`opensora.models.vae.VideoAutoencoder`),
    ``text_encoder`` (its T5 wrapper, tokenizer inside). ``pipe.to(device, dtype)`` moves them in place;
    ``pipe.set_progress_bar_config(disable=True)`` hides the sampling bar.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    # The text embeddings live inside Bundle.generate's guided model function, so the latents are the one
    # tensor a step callback can read and replace (diffusers' Wan also offers prompt_embeds).
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                 bundle_config: BundleConfig | None = None, bundle_path: str | None = None):
        super().__init__()
        if bundle_config is None:
            raise ValueError("STDiTPipeline needs the bundle's config: load one with STDiTPipeline.from_pretrained(DIR)")
        if bundle_config.family != "stdit":
            raise ValueError(f"STDiTPipeline samples STDiT bundles; this one is of the {bundle_config.family!r} "
                             "family: export it to its own diffusers pipeline with tools/export_diffusers.py")
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder)
        # Not registered: diffusers' config takes JSON values, and a bundle's config is bundle.yaml's business.
        self.bundle_config = bundle_config
        self.bundle_path = None if bundle_path is None else Path(bundle_path)
        self.video_processor = VideoProcessor(vae_scale_factor=vae.compression[1])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, torch_dtype: torch.dtype | None = None,
                        vae_micro_batch_size: int | None = None, vae_tiling: bool = False) -> STDiTPipeline:
        """Loads a pipeline bundle directory (local files only; a folder :meth:`save_pretrained` wrote is one).

        Args:
            pretrained_model_name_or_path: the bundle directory.
            torch_dtype: weight dtype (default: as stored). The weights load on the CPU; move them with ``.to``.
            vae_micro_batch_size, vae_tiling: the decoder's memory bounds, as ``tools/sample.py``'s
                ``--vae-micro-batch`` / ``--vae-tiling``.
        Raises:
            FileNotFoundError: not a local bundle directory (hub ids are not fetched).
            ValueError: a bundle of another family (Wan, LTX: ``tools/export_diffusers.py``).
        """
        directory = Path(pretrained_model_name_or_path)
        config = load_bundle_config(directory)  # the family is refused before any weights load
        if config.family != "stdit":
            raise ValueError(f"{directory}: STDiTPipeline samples STDiT bundles; this one is of the {config.family!r} "
                             "family: export it to its own diffusers pipeline with tools/export_diffusers.py")
        bundle = load_bundle(directory, device="cpu", dtype=torch_dtype, vae_micro_batch_size=vae_micro_batch_size,
                             vae_tiling=vae_tiling)
        return cls(transformer=bundle.model, vae=bundle.vae, text_encoder=bundle.text_encoder,
                   bundle_config=bundle.config, bundle_path=str(bundle.path))

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Writes the pipeline as a bundle (``bundle.yaml``, ``model/``, and the bundle's own VAE / text-encoder
        folders copied; encoders it references by absolute path stay referenced), which :meth:`from_pretrained`
        and ``tools/sample.py --ckpt`` read."""
        write_bundle(save_directory, self.transformer, self.bundle_config, copy_from=self.bundle_path)

    # The components are plain torch modules, not diffusers ModelMixins: diffusers' device / dtype / to read
    # ``module.device`` and ``module.dtype``, which they lack, so these three ask the parameters instead.
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(self, *args, **kwargs) -> STDiTPipeline:
        """Moves every component in place, with ``torch.nn.Module.to``'s arguments (device, dtype or both)."""
        for module in (self.transformer, self.vae, self.text_encoder):
            module.to(*args, **kwargs)
        return self

    @property
    def bundle(self) -> Bundle:
        """The components as a :class:`Bundle` (the same modules, so ``.to`` moves both)."""
        return Bundle(model=self.transformer, vae=self.vae, text_encoder=self.text_encoder,
                      config=self.bundle_config, path=self.bundle_path)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_frames: int | None = None,
        height: int = 256,
        width: int = 256,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        sampler: str | None = None,
        cache_threshold: float | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, float, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature; not mutated)
    ) -> STDiTPipelineOutput | tuple:
        """Samples one video per prompt (all prompts of a call in one batch), through :meth:`Bundle.generate`.

        Args:
            prompt: a caption or a list of them.
            num_frames: frames per video; default 16, or the nearest larger count the autoencoder takes.
            height, width: pixels; must divide by the autoencoder's and the patch's factors.
            num_inference_steps: sampling steps (``--steps``).
            guidance_scale: classifier-free guidance scale; 1 turns it off (``--cfg-scale``).
            num_videos_per_prompt: videos per prompt; they share the batch and differ by their noise.
            generator: the noise source, as in diffusers: a generator in the state ``manual_seed(s)`` left it
                samples with seed ``s`` (what ``--seed s`` does); one that has already drawn numbers gives a seed
                drawn from it. Either way it advances, so a loop over one generator gives new videos each call.
            seed: the seed itself (``--seed``); give this or ``generator``. Neither: 0, as the CLI.
            sampler: "iddpm" or "rflow" (``--sampler``); default: the bundle's objective.
            cache_threshold: the step cache's threshold (``--cache``); None: every step runs the model.
            output_type: "np", "pil" or "pt" (see :class:`STDiTPipelineOutput`).
            return_dict: False returns ``(frames,)``.
            callback_on_step_end: ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict``, called
                after each step (step 0.. in order; timestep: the one the model saw, an int for IDDPM, a float
                ``t * 1000`` for rectified flow) with ``callback_kwargs["latents"]`` the (B, C, T', h, w) latents
                after the step. As in diffusers, a ``"latents"`` in the returned dict replaces them (the rest of
                the sampling and the decoder use it); any other key is refused (ValueError), not ignored.
            callback_on_step_end_tensor_inputs: the tensors ``callback_kwargs`` holds; only ``["latents"]``.
        """
        from opensora.sampling import StepCache

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r} (the bundle decodes "
                             "inside Bundle.generate, so there are no latents to return)")
        if sampler is not None and sampler not in DIFFUSIONS:
            raise ValueError(f"sampler must be one of {DIFFUSIONS}, got {sampler!r}")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be in {self._callback_tensor_inputs}, "
                             f"got {unknown}")
        if num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be >= 1, got {num_videos_per_prompt}")
        if num_frames is None:
            num_frames = max(self.vae.nearest_valid_num_frames(DEFAULT_NUM_FRAMES))
        prompts = [p for p in prompts for _ in range(num_videos_per_prompt)]
        cache = None if cache_threshold is None else StepCache(cache_threshold)
        show = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        on_step = self._step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        video = self.bundle.generate(prompts, num_frames, height, width, steps=num_inference_steps,
                                     cfg_scale=guidance_scale, seed=self._seed(generator, seed), sampler=sampler,
                                     progress=show, cache=cache, callback=on_step)  # (B, 3, T, H, W) in [-1, 1]
        self.maybe_free_model_hooks()
        frames = self.video_processor.postprocess_video(video, output_type=output_type)
        return STDiTPipelineOutput(frames=frames) if return_dict else (frames,)

    def _step_callback(self, callback: Callable | None, tensor_inputs: list[str]):
        """diffusers' ``callback_on_step_end`` as the samplers' ``callback(step, timestep, latents)``."""
        if callback is None:
            return None

        def on_step_end(step: int, timestep: float, latents: torch.Tensor) -> torch.Tensor | None:
            named = {"latents": latents}
            returned = dict(callback(self, step, timestep, {k: named[k] for k in tensor_inputs}))
            extra = set(returned) - set(self._callback_tensor_inputs)
            if extra:
                raise ValueError(f"callback_on_step_end returned {sorted(extra)}; STDiTPipeline takes back only "
                                 f"{self._callback_tensor_inputs}")
            return returned.get("latents")

        return on_step_end

    @staticmethod
    def _seed(generator: torch.Generator | None, seed: int | None) -> int:
        """The seed :meth:`Bundle.generate` draws everything from (see ``__call__``'s ``generator``)."""
        if generator is not None and seed is not None:
            raise ValueError("give either generator or seed, not both")
        if isinstance(generator, (list, tuple)):
            raise TypeError("one generator per prompt is not supported: the prompts of a call share one batch's "
                            "noise (as tools/sample.py --batch-size); call the pipeline once per prompt instead")
        if generator is None:
            return 0 if seed is None else int(seed)
        fresh = torch.Generator(device=generator.device).manual_seed(generator.initial_seed())
        start = generator.initial_seed() if torch.equal(generator.get_state(), fresh.get_state()) else None
        # Bundle.generate seeds its own generator, so the caller's is advanced by one draw: the next call differs.
        drawn = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        return drawn if start is None else start
