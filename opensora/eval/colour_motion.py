"""Does a video show what its caption says? Colour and direction of one moving object on a plain background.

The vocabulary of the synthetic "shapes" world (``data_pipeline.sources.shapes``) lives here, so the
generator that writes the captions and the check that reads them back cannot drift apart::

    "a red circle moving left on a gray background"

The check needs no model, only pixels, which is what makes it usable on the output of a tiny model
trained for minutes:

1. background = the per-channel median of the frame's border pixels (the object rarely covers the
   border, and never most of it);
2. object = pixels farther than ``bg_threshold`` (RGB distance) from that background;
3. colour = the palette colour most object pixels are near (within ``colour_radius``), if it has a
   clear majority (``min_colour_share``); blended edge pixels are near none and do not vote, and pure
   noise spreads its votes, so it names no colour;
4. direction = the sign of the larger component of the object centroid's motion, from a least-squares
   line through the per-frame centroids (image y grows downwards, so "up" is a negative slope).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# Object colours, far apart in RGB and each with a luma well away from every background's (the
# pipeline's blank-frame filter looks at luma contrast).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 50),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 40),
}
# Neutral backgrounds: never confused with an object colour. "black" is lifted off zero so that the
# pipeline's black-frame filter (mean luma < 16) does not take a dark shot for a fade.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (24, 24, 24),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Unit motion per direction in image coordinates (x right, y down).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

_CAPTION = re.compile(r"\ban? (\w+) (\w+) moving (\w+) on an? (\w+) background\b", re.IGNORECASE)


@dataclass(frozen=True)
class ShapeCaption:
    """The facts a shapes caption states."""

    colour: str
    shape: str
    direction: str
    background: str

    @property
    def text(self) -> str:
        """The caption sentence, e.g. ``a red circle moving left on a gray background``."""
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} background"

    @property
    def combo(self) -> str:
        """``colour shape direction``: the unit the held-out split is made of (background is free)."""
        return f"{self.colour} {self.shape} {self.direction}"


def parse_caption(text: str) -> ShapeCaption | None:
    """The facts of a shapes caption, or None when ``text`` is not one (unknown words included)."""
    match = _CAPTION.search(text)
    if match is None:
        return None
    colour, shape, direction, background = (w.lower() for w in match.groups())
    if colour not in COLOURS or shape not in SHAPES or direction not in DIRECTIONS or background not in BACKGROUNDS:
        return None
    return ShapeCaption(colour, shape, direction, background)


@dataclass
class CheckConfig:
    """Thresholds of the pixel check (RGB units 0..255, pixels)."""

    bg_threshold: float = 60.0  # a pixel this far from the background colour belongs to the object
    colour_radius: float = 90.0  # an object pixel votes for a palette colour only within this distance
    min_colour_share: float = 0.5  # the winning colour needs this share of the votes (noise spreads them)
    min_object_pixels: int = 3  # a frame with fewer object pixels has no centroid
    min_object_frames: float = 0.5  # a direction needs a centroid in at least this fraction of the frames
    min_displacement: float = 0.05  # total centroid motion below this fraction of the frame width = "none"


@dataclass
class VideoAnalysis:
    """What the pixels of one video show."""

    colour: str | None  # dominant palette colour of the object pixels (None: no clear winner, or no votes)
    colour_share: float  # fraction of the voting object pixels that voted for the most voted colour
    direction: str | None  # left/right/up/down of the centroid motion (None: object in too few frames, or no motion)
    displacement: tuple[float, float]  # (dx, dy) centroid motion over the whole video, pixels
    object_frames: int  # frames in which an object was found


def border_colour(frame: np.ndarray) -> np.ndarray:
    """(3,) float: per-channel median of the outermost rows and columns of an (H, W, 3) frame."""
    border = np.concatenate([frame[0], frame[-1], frame[1:-1, 0], frame[1:-1, -1]])  # (2W + 2H - 4, 3)
    return np.median(border.astype(np.float32), axis=0)


def analyze_video(frames: np.ndarray, cfg: CheckConfig | None = None) -> VideoAnalysis:
    """Colour and direction of the moving object.

    Args:
        frames: uint8 (T, H, W, 3) RGB.
        cfg: thresholds (default :class:`CheckConfig`).
    Returns:
        a :class:`VideoAnalysis`.
    """
    cfg = cfg or CheckConfig()
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"analyze_video: frames must be (T, H, W, 3), got shape {tuple(frames.shape)}")
    T, H, W, _ = frames.shape
    palette = np.array(list(COLOURS.values()), np.float32)  # (K, 3)
    votes = np.zeros(len(COLOURS), np.int64)
    times, centroids = [], []
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)  # (H, W) each
    for t in range(T):
        frame = frames[t].astype(np.float32)  # (H, W, 3)
        obj = np.linalg.norm(frame - border_colour(frames[t]), axis=-1) > cfg.bg_threshold  # (H, W)
        if obj.sum() < cfg.min_object_pixels:
            continue
        dist = np.linalg.norm(frame[obj][:, None, :] - palette[None], axis=-1)  # (N, K)
        near = dist.min(axis=1) <= cfg.colour_radius
        votes += np.bincount(dist.argmin(axis=1)[near], minlength=len(COLOURS))
        times.append(t)
        centroids.append((xs[obj].mean(), ys[obj].mean()))
    colour, share = None, 0.0
    if votes.sum():
        share = float(votes.max() / votes.sum())
        colour = list(COLOURS)[int(votes.argmax())] if share >= cfg.min_colour_share else None
    direction, disp = None, (0.0, 0.0)
    if len(times) >= max(2, cfg.min_object_frames * T):
        t_arr = np.array(times, np.float32)
        c_arr = np.array(centroids, np.float32)  # (N, 2) as (x, y)
        slope = np.polyfit(t_arr, c_arr, 1)[0]  # (2,) pixels per frame
        dx, dy = (slope * (t_arr[-1] - t_arr[0])).tolist()
        disp = (float(dx), float(dy))
        if max(abs(dx), abs(dy)) >= cfg.min_displacement * W:
            direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    return VideoAnalysis(colour, share, direction, disp, len(times))


@dataclass
class CheckReport:
    """Per-video analyses against their captions, and the shares that match."""

    captions: list[str]
    analyses: list[VideoAnalysis]
    colour_ok: list[bool] = field(default_factory=list)
    direction_ok: list[bool] = field(default_factory=list)

    @property
    def colour_share(self) -> float:
        """Fraction of videos whose dominant object colour is the caption's colour."""
        return float(np.mean(self.colour_ok)) if self.colour_ok else 0.0

    @property
    def direction_share(self) -> float:
        """Fraction of videos whose object moves in the caption's direction."""
        return float(np.mean(self.direction_ok)) if self.direction_ok else 0.0

    def lines(self, names: Sequence[str] | None = None) -> list[str]:
        """One human-readable line per video, then the two shares."""
        names = list(names) if names is not None else [f"video {i}" for i in range(len(self.captions))]
        out = []
        for name, text, a, c_ok, d_ok in zip(names, self.captions, self.analyses, self.colour_ok, self.direction_ok):
            out.append(
                f"{name}: prompt '{text}' -> colour {a.colour} ({a.colour_share:.0%} of object pixels) "
                f"[{'ok' if c_ok else 'MISS'}], direction {a.direction} (dx {a.displacement[0]:+.1f}, "
                f"dy {a.displacement[1]:+.1f} px over {a.object_frames} frames) [{'ok' if d_ok else 'MISS'}]"
            )
        out.append(f"colour matches prompt: {sum(self.colour_ok)}/{len(self.colour_ok)} = {self.colour_share:.0%}")
        out.append(
            f"direction matches prompt: {sum(self.direction_ok)}/{len(self.direction_ok)} = {self.direction_share:.0%}"
        )
        return out


def check_videos(videos: Sequence[np.ndarray], captions: Sequence[str], cfg: CheckConfig | None = None) -> CheckReport:
    """Scores videos against their shapes captions.

    Args:
        videos: uint8 (T, H, W, 3) arrays, one per caption.
        captions: shapes captions (see :func:`parse_caption`); a caption that is not one raises ValueError.
        cfg: thresholds (default :class:`CheckConfig`).
    Returns:
        a :class:`CheckReport` (``colour_share``, ``direction_share``, per-video lines).
    """
    if len(videos) != len(captions):
        raise ValueError(f"check_videos: {len(videos)} videos but {len(captions)} captions")
    report = CheckReport(captions=list(captions), analyses=[])
    for video, text in zip(videos, captions):
        facts = parse_caption(text)
        if facts is None:
            raise ValueError(f"not a shapes caption (colour, shape, direction, background): {text!r}")
        analysis = analyze_video(video, cfg)
        report.analyses.append(analysis)
        report.colour_ok.append(analysis.colour == facts.colour)
        report.direction_ok.append(analysis.direction == facts.direction)
    return report
