"""What a set of sampled videos is written as, for every sampler of the project (``tools/sample.py``, validation
while training, the demo's report): ``NNN_<prompt-slug>.mp4`` files through the one H.264 writer, their prompts in
``prompts.tsv``, and a PNG grid of their frames; and :class:`StepCache`, the sampler's optional step cache.

    videos = bundle.generate(prompts, 8, 32, 32, steps=30, cfg_scale=4.0, seed=0)   # (B, 3, T, H, W)
    paths = write_samples(out_dir, videos, prompts, fps=8.0)
    frame_grid([tensor_to_frames(v) for v in videos], prompts, out_dir / "grid.png")
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from opensora.utils import atomic_write_path, slugify

PROMPTS_FILE = "prompts.tsv"


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a prompt file: one per line, stripped; blank lines and ``#`` comments skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def sample_filename(index: int, prompt: str) -> str:
    """``NNN_<slug>.mp4``: the index keeps prompts that slug alike apart and the listing in prompt order."""
    return f"{index:03d}_{slugify(prompt)}.mp4"


def write_samples(out_dir: str | Path, videos: torch.Tensor | Sequence[torch.Tensor], prompts: Sequence[str],
                  fps: float, crf: int = 18, start: int = 0) -> list[Path]:
    """Writes one mp4 per video (atomically) named by :func:`sample_filename` from ``start`` on.

    Args:
        out_dir: created if missing.
        videos: (B, 3, T, H, W) float in [-1, 1] (``Bundle.generate``'s output), or a sequence of (3, T, H, W).
        prompts: one per video.
        fps: frame rate written into the files.
        crf: H.264 quality (0 lossless .. 51).
        start: index of the first video (a caller sampling in batches passes its running count).
    Returns:
        the written paths, in order.
    """
    from opensora.data.video_io import tensor_to_frames, write_video

    if len(videos) != len(prompts):
        raise ValueError(f"write_samples: {len(videos)} videos but {len(prompts)} prompts")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, (prompt, video) in enumerate(zip(prompts, videos)):
        path = out_dir / sample_filename(start + j, prompt)
        write_video(path, tensor_to_frames(video), fps=fps, crf=crf)
        paths.append(path)
    return paths


def finished_samples(out_dir: str | Path, prompts: Sequence[str]) -> list[bool]:
    """Per prompt, whether its video ``NNN_<slug>.mp4`` is in ``out_dir`` (files are renamed into place when
    complete, so one that exists is finished; a changed prompt has another slug and is not taken for one)."""
    out_dir = Path(out_dir)
    return [(out_dir / sample_filename(i, p)).is_file() for i, p in enumerate(prompts)]


def remove_stale_temporaries(out_dir: str | Path) -> int:
    """Removes the half-written videos a killed run left in ``out_dir`` (``AtomicPath`` temporaries of
    ``NNN_<slug>.mp4``: hidden, never taken for finished ones, but junk); returns how many. Call it before any
    writer of this run starts."""
    stale = list(Path(out_dir).glob(".[0-9]*.mp4.*.tmp.mp4"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def write_prompts_file(out_dir: str | Path, written: Sequence[tuple[Path, str]]) -> Path:
    """``prompts.tsv``: ``file<TAB>prompt`` per written video (the full prompt; file names hold only a slug)."""
    path = Path(out_dir) / PROMPTS_FILE
    with atomic_write_path(path) as tmp:
        tmp.write_text("file\tprompt\n" + "".join(f"{p.name}\t{t}\n" for p, t in written), encoding="utf-8")
    return path


def frame_grid(videos: Sequence[np.ndarray], labels: Sequence[str], path: str | Path, scale: int = 4) -> Path:
    """A PNG with one row per video: its label above its frames, each enlarged ``scale`` times (nearest neighbour).

    Args:
        videos: uint8 (T, H, W, 3) arrays (``video_io.tensor_to_frames`` or ``read_video``).
        labels: one line of text per video.
        path: the PNG to write (atomically).
        scale: enlargement of each frame.
    """
    from PIL import Image, ImageDraw

    if not videos or len(videos) != len(labels):
        raise ValueError(f"frame_grid: need one label per video, got {len(videos)} videos and {len(labels)} labels")
    label_h, pad = 14, 4
    rows = []
    for video in videos:
        strip = np.concatenate([np.pad(f, ((0, 0), (0, pad), (0, 0)), constant_values=255) for f in video], axis=1)
        rows.append(np.kron(strip, np.ones((scale, scale, 1), np.uint8)))
    width = max(r.shape[1] for r in rows)
    height = sum(r.shape[0] + label_h + pad for r in rows)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for row, label in zip(rows, labels):
        draw.text((2, y + 1), label, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(row), (0, y + label_h))
        y += row.shape[0] + label_h + pad
    path = Path(path)
    with atomic_write_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


class StepCache:
    """Reuses the last model prediction on sampling steps whose model input barely changed.

    The idea and its signal are TeaCache's (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video
    Diffusion Model", CVPR 2025, arXiv:2411.19108): the relative L1 change of the transformer's input between
    consecutive steps, accumulated since the last computed step, predicts how much its output changes; while the
    sum stays under a threshold the cached output is used, and the first and last steps always run. Two
    differences, both to keep it outside the model so that it works for every family and under SP / CFG
    parallelism unchanged: the signal is the latent x_t the model is called with (TeaCache reads the
    timestep-modulated input of block 0, and rescales it with a polynomial fitted per model), and what is reused
    is the whole (guided) prediction (TeaCache reuses the blocks' residual and reruns the embedders and final
    layer). x_t is the same on every rank of a parallel group, so every rank skips the same steps.

    Args:
        threshold: the accumulated relative L1 change under which a step is skipped; 0 computes every step.
            TeaCache's published thresholds for its rescaled signal are 0.1 - 0.3; this signal is not rescaled,
            so measure (docs/benchmarks.md).
    """

    def __init__(self, threshold: float):
        if threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.calls = 0  # model evaluations asked for (all samplings through this cache)
        self.skipped = 0  # of which served from the cache

    @property
    def skipped_share(self) -> float:
        return self.skipped / self.calls if self.calls else 0.0

    def wrap(self, model_fn, steps: int):
        """``model_fn`` with the cache in front, for one sampling of ``steps`` steps (one call per step)."""
        state = {"step": 0, "prev_x": None, "out": None, "acc": 0.0}

        def cached(x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
            i, prev = state["step"], state["prev_x"]
            state["step"] += 1
            self.calls += 1
            if prev is not None:  # mean |dx| / mean |x| between consecutive steps, computed or not
                state["acc"] += float((x - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
            state["prev_x"] = x
            if state["out"] is not None and 0 < i < steps - 1 and state["acc"] < self.threshold:
                self.skipped += 1
                return state["out"]
            state["out"], state["acc"] = model_fn(x, t, **model_kwargs), 0.0
            return state["out"]

        return cached
