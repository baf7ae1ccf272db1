"""A built-in data source: procedurally generated "long" videos of coloured shapes, with true captions.

Each raw video is several shots joined by hard cuts; each shot is one shape (circle, square, triangle)
of one colour crossing a plain background in one direction, e.g. "a red circle moving left on a gray
background". Nothing is downloaded and no bytes ship with the repository: the videos are drawn here and
written with :func:`opensora.data.video_io.write_video`. Next to every ``<name>.mp4`` a sidecar
``<name>.json`` lists the shots (``start_frame``, ``end_frame`` exclusive, ``text`` and the facts), the
format the caption stage already reads for data sets that carry captions per shot; the split stage must
still find the cuts itself (PySceneDetect), which is what makes this a real test of the pipeline.

Held-out split: the ``colour shape direction`` combinations listed in ``held_out`` never appear in any
shot (every colour, shape and direction still does, in other combinations), so prompts made of them
test whether a model composes what it saw. ``OUT_DIR/split.json`` lists both sides.

Use it from a pipeline config by giving a *source file* as the input (see
:func:`data_pipeline.sources.resolve_input`)::

    # configs/demo/shapes.yaml
    shapes:
      out_dir: demo_out/data/raw
      num_videos: 40

    python -m data_pipeline run --config configs/demo/pipeline.yaml --set input=configs/demo/shapes.yaml

Generation resumes: a video whose mp4 and sidecar both exist is kept (they are written atomically and
every video depends only on the config and its index), and a folder made with a different config is
refused rather than mixed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import MISSING

from opensora.config import load_config, to_dict, to_yaml
from opensora.data.video_io import write_video
from opensora.eval.colour_motion import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, ShapeCaption
from opensora.utils import atomic_write_path

CONFIG_FILE = "shapes.yaml"
SPLIT_FILE = "split.json"
SUPERSAMPLE = 4  # sub-pixels per pixel side: anti-aliased edges, so motion is smooth at sub-pixel speeds


@dataclass
class ShapesConfig:
    """Options of the shapes generator (every video is a function of these and its index)."""

    out_dir: str = MISSING  # folder for <name>.mp4 + <name>.json sidecars, shapes.yaml and split.json
    num_videos: int = 40  # raw videos
    shots_per_video: int = 4  # hard cuts per video = shots_per_video - 1
    min_shot_frames: int = 12  # shot lengths are drawn from [min, max] frames
    max_shot_frames: int = 20
    fps: float = 8.0  # frame rate of the raw videos
    size: int = 64  # frames are size x size pixels
    object_size: float = 0.38  # shape diameter as a fraction of the frame side
    margin: float = 0.06  # the shape stays this fraction of the side away from the border
    # Where a shot's path lies across its direction of motion, as [lo, hi] fractions of the free range
    # (drawn uniformly per shot). [0, 1]: anywhere; a narrow band near 0.5 keeps every path near the middle.
    cross_range: list = field(default_factory=lambda: [0.0, 1.0])
    colours: list = field(default_factory=lambda: list(COLOURS))  # object colours used (names from COLOURS)
    shapes: list = field(default_factory=lambda: list(SHAPES))
    directions: list = field(default_factory=lambda: list(DIRECTIONS))
    backgrounds: list = field(default_factory=lambda: list(BACKGROUNDS))
    # "colour shape direction" combinations that never appear in any shot (sampling prompts use them).
    held_out: list = field(default_factory=lambda: [
        "red square down", "red triangle left", "green circle right", "green square up",
        "blue triangle up", "blue circle down", "yellow circle left", "yellow triangle right",
    ])
    crf: int = 12  # x264 quality of the raw videos (low = truer colours)
    seed: int = 0

    def __post_init__(self):
        for name, values, known in (("colours", self.colours, COLOURS), ("shapes", self.shapes, SHAPES),
                                    ("directions", self.directions, DIRECTIONS),
                                    ("backgrounds", self.backgrounds, BACKGROUNDS)):
            unknown = [v for v in values if v not in known]
            if unknown or not values:
                raise ValueError(f"shapes.{name}: {unknown or 'empty'} (known: {', '.join(known)})")
        if len(self.backgrounds) < 2 and self.shots_per_video > 1:
            raise ValueError("shapes.backgrounds: at least two are needed so that every cut changes the background")
        if not 2 <= self.min_shot_frames <= self.max_shot_frames:
            raise ValueError("shapes: need 2 <= min_shot_frames <= max_shot_frames")
        if self.num_videos < 1 or self.shots_per_video < 1 or self.size < 8:
            raise ValueError("shapes: num_videos and shots_per_video must be >= 1, size >= 8")
        if len(self.cross_range) != 2 or not 0.0 <= float(self.cross_range[0]) <= float(self.cross_range[1]) <= 1.0:
            raise ValueError(f"shapes.cross_range must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(self.cross_range)}")
        if not 0 < self.object_size < 1 - 2 * self.margin:
            raise ValueError("shapes.object_size must be in (0, 1 - 2 * margin)")
        for combo in self.held_out:
            parts = str(combo).split()
            if len(parts) != 3 or parts[0] not in self.colours or parts[1] not in self.shapes \
                    or parts[2] not in self.directions:
                raise ValueError(f"shapes.held_out: {combo!r} is not 'colour shape direction' from the lists")
        train = train_combos(self)
        for i, (name, values) in enumerate((("colour", self.colours), ("shape", self.shapes),
                                            ("direction", self.directions))):
            missing = sorted(set(values) - {c.split()[i] for c in train})
            if missing:
                raise ValueError(f"shapes.held_out removes every training shot with {name} {missing}")


def train_combos(cfg: ShapesConfig) -> list[str]:
    """Every ``colour shape direction`` combination not held out, in a fixed order."""
    held = set(cfg.held_out)
    return [f"{c} {s} {d}" for c in cfg.colours for s in cfg.shapes for d in cfg.directions
            if f"{c} {s} {d}" not in held]


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """(size, size) float coverage in [0, 1] of a shape centred at (cx, cy) pixels, anti-aliased.

    Args:
        shape: circle, square or triangle (pointing up).
        cx, cy: centre in pixel coordinates (pixel i covers [i, i + 1)).
        radius: half the shape's width.
        size: frame side.
    """
    n = size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE  # sub-pixel centres, in pixels
    x, y = coords[None, :] - cx, coords[:, None] - cy  # (1, n), (n, 1)
    if shape == "circle":
        inside = x**2 + y**2 <= radius**2
    elif shape == "square":
        half = radius * 0.88  # about the circle's area, so no shape is easier to see
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif shape == "triangle":
        top, base = -radius, radius * 0.8  # apex up; the base half-width is ``radius``
        inside = (y >= top) & (y <= base) & (np.abs(x) <= radius * (y - top) / (base - top))
    else:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    inside = np.broadcast_to(inside, (n, n)).astype(np.float32)
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))  # (size, size)


def render_shot(facts: ShapeCaption, num_frames: int, cross: float, cfg: ShapesConfig) -> np.ndarray:
    """(T, H, W, 3) uint8: the shape crossing the frame from one margin to the other in ``num_frames``.

    Args:
        facts: colour, shape, direction and background.
        num_frames: shot length.
        cross: position across the direction of motion, 0..1 of the free range.
        cfg: sizes.
    """
    size = cfg.size
    radius = cfg.object_size * size / 2
    lo, hi = cfg.margin * size + radius, size - cfg.margin * size - radius  # centre range
    dx, dy = DIRECTIONS[facts.direction]
    progress = np.linspace(0.0, 1.0, num_frames)
    along = lo + (hi - lo) * (progress if dx + dy > 0 else 1.0 - progress)  # moves towards +x/+y or -x/-y
    across = lo + (hi - lo) * cross
    bg = np.array(BACKGROUNDS[facts.background], np.float32)
    fg = np.array(COLOURS[facts.colour], np.float32)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        cx, cy = (along[t], across) if dx else (across, along[t])
        alpha = shape_mask(facts.shape, cx, cy, radius, size)[..., None]  # (H, W, 1)
        frames[t] = np.round(bg * (1 - alpha) + fg * alpha).astype(np.uint8)
    return frames


def plan_video(index: int, cfg: ShapesConfig) -> list[dict]:
    """The shots of video ``index``: facts, frame span and position, from the config alone.

    Shots walk through the training combinations in a seeded order, so every one appears once before
    any repeats; consecutive shots never share a background, so every cut is a visible jump.
    """
    combos = train_combos(cfg)
    order = np.random.default_rng(cfg.seed).permutation(len(combos))
    rng = np.random.default_rng([cfg.seed, index])
    shots, start, prev_bg = [], 0, None
    for j in range(cfg.shots_per_video):
        colour, shape, direction = combos[order[(index * cfg.shots_per_video + j) % len(combos)]].split()
        background = str(rng.choice([b for b in cfg.backgrounds if b != prev_bg]))
        facts = ShapeCaption(colour, shape, direction, background)
        length = int(rng.integers(cfg.min_shot_frames, cfg.max_shot_frames + 1))
        shots.append({"start_frame": start, "end_frame": start + length, "text": facts.text, "colour": colour,
                      "shape": shape, "direction": direction, "background": background,
                      "cross": float(rng.uniform(*map(float, cfg.cross_range)))})
        start += length
        prev_bg = background
    return shots


def _identity(cfg: ShapesConfig) -> str:
    """The options that decide what a video looks like (not where it goes, nor how many there are)."""
    return json.dumps({k: v for k, v in to_dict(cfg).items() if k not in ("out_dir", "num_videos")}, sort_keys=True)


def _check_folder(out: Path, cfg: ShapesConfig) -> None:
    """Records the config in a new folder; refuses one generated with a different config."""
    path = out / CONFIG_FILE
    if path.is_file():
        recorded = load_config(ShapesConfig, path)
        if _identity(recorded) != _identity(cfg):
            raise ValueError(
                f"{out} holds shapes videos generated with a different config ({path}); "
                "delete the folder or choose another shapes.out_dir"
            )
    with atomic_write_path(path) as tmp:
        tmp.write_text(to_yaml(cfg), encoding="utf-8")


def generate_shapes(cfg: ShapesConfig, progress: bool = True) -> pd.DataFrame:
    """Writes the raw videos, their shot sidecars and the split; skips videos already written.

    Args:
        cfg: generator options (``out_dir`` is created).
        progress: show a tqdm bar.
    Returns:
        a DataFrame with ``path`` (absolute mp4 path) and ``source`` columns, one row per video, in order.
    """
    from tqdm import tqdm

    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _check_folder(out, cfg)
    with atomic_write_path(out / SPLIT_FILE) as tmp:
        tmp.write_text(json.dumps({"train": train_combos(cfg), "held_out": list(cfg.held_out)}, indent=1))
    paths = []
    for i in tqdm(range(cfg.num_videos), desc="shapes", disable=not progress):
        video, sidecar = out / f"shapes_{i:04d}.mp4", out / f"shapes_{i:04d}.json"
        paths.append(str(video))
        if video.is_file() and sidecar.is_file():
            continue
        shots = plan_video(i, cfg)
        frames = np.concatenate([
            render_shot(ShapeCaption(s["colour"], s["shape"], s["direction"], s["background"]),
                        s["end_frame"] - s["start_frame"], s["cross"], cfg)
            for s in shots
        ])  # (T, H, W, 3)
        write_video(video, frames, fps=cfg.fps, crf=cfg.crf)
        with atomic_write_path(sidecar) as tmp:  # written last: both files present = video finished
            tmp.write_text(json.dumps({"generator": "data_pipeline.sources.shapes", "config": to_dict(cfg),
                                       "index": i, "shots": shots}, indent=1), encoding="utf-8")
    return pd.DataFrame({"path": paths, "source": paths})
