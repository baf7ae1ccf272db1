"""What a set of sampled videos is written as, for every sampler of the project (``tools/sample.py``, validation
while training, the demo's report): ``NNN_<prompt-slug>.mp4`` files through the one H.264 writer, their prompts in
``prompts.tsv``, and a PNG grid of their frames.

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
