"""split: shot detection with PySceneDetect and frame-accurate H.264 clips cut at the detected frames.

One decode of the source, no seeking, frames counted from 0 in presentation order. Each frame is

1. shrunk to ~``detect_width`` pixels straight from its YUV planes (strided sampling, far cheaper than
   swscale at 720p) and fed to ``ContentDetector`` / ``AdaptiveDetector.process_frame``; a cut at frame k
   means a new shot starts at frame k;
2. held back for the detector's lag (a few frames), then re-encoded into its clip, so a clip starts and ends
   exactly on the detected frames (stream copy would round to keyframes; Open-Sora 1.0's clips were off
   by up to 0.5 s).

``detect_cuts`` + ``plan_clips`` are the same decisions as a separate detection pass (the definition
``split_video`` is tested against, and the bench's detection-only number).

Clip files are named ``<row id>_<k>.mp4`` and written through a temp file, so a redone video
overwrites its own clips. Each clip's row records the sha256 of its bytes (``sha256``, read back right
after the write, while the file is still in the page cache): the latent cache keys on it, so training
from the cache never has to open a clip to learn what it is.

``split.mode: reference`` runs the same decode and the same decisions but encodes nothing: each clip is a row
whose ``path`` is the source video, with its span (``start_frame``/``end_frame``, ``source_fps`` -> ``fps``,
``split_mode=reference``; ``opensora.data.manifest.source_span``) and the size it would have been resized to;
its ``sha256`` is the source's. Training, the latent cache, filter and caption seek into the source for
exactly the frames the encoded clip would hold.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import av
import cv2
import numpy as np
from scenedetect import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ContentDetector

from data_pipeline.config import SplitConfig
from data_pipeline.media import even_size, safe_name
from data_pipeline.rows import Reject, Row, is_missing
from opensora.data.manifest import CONTENT_HASH_COLUMN, SOURCE_FPS_COLUMN, SPLIT_MODE_COLUMN
from opensora.data.video_io import VideoWriter, plane_view
from opensora.utils import file_sha256


def _small_bgr(frame: av.VideoFrame, step: int) -> np.ndarray:
    """A (H/step, W/step, 3) BGR thumbnail; planar YUV 4:2:0 is sampled directly (no full-size convert)."""
    if frame.format.name in ("yuv420p", "yuvj420p") and step % 2 == 0:
        h, w = frame.height, frame.width
        y = plane_view(frame, 0, h, w)[::step, ::step]
        half = step // 2
        u = plane_view(frame, 1, h // 2, w // 2)[::half, ::half]
        v = plane_view(frame, 2, h // 2, w // 2)[::half, ::half]
        hh, ww = min(y.shape[0], u.shape[0]), min(y.shape[1], u.shape[1])
        yuv = np.ascontiguousarray(np.dstack([y[:hh, :ww], u[:hh, :ww], v[:hh, :ww]]))  # (h, w, 3)
        return cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)
    return frame.to_ndarray(width=max(2, frame.width // step), height=max(2, frame.height // step),
                            format="bgr24", interpolation="AREA")


def _detector(cfg: SplitConfig):
    if cfg.detector == "adaptive":
        return AdaptiveDetector(adaptive_threshold=cfg.adaptive_threshold, min_scene_len=cfg.min_scene_len,
                                min_content_val=cfg.min_content_val)
    return ContentDetector(threshold=cfg.threshold, min_scene_len=cfg.min_scene_len)


def _open(path: str) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    container = av.open(path)
    if not container.streams.video:
        container.close()
        raise RuntimeError(f"{path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "NONE"  # one core per video; parallelism is across videos
    stream.codec_context.thread_count = 1
    return container, stream


@dataclass
class Damage:
    """What ``_decode`` skipped: packets the decoder rejected and frame slots unusable because of them."""

    packets: int = 0
    frames: int = 0
    at: list[int] = field(default_factory=list)  # frame slot of each damaged packet


def _decode(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
            damage: Damage) -> Iterator[tuple[int, av.VideoFrame | None]]:
    """Frames numbered from 0 in output order, decoding past damaged packets (as FFmpeg and PySceneDetect do)
    instead of losing the whole video to one ``InvalidDataError``.

    Yields (index, frame), frame None for an unusable slot: a packet the decoder rejected or silently dropped
    (after a lost keyframe it outputs nothing until the next one), placed by its time stamp so that later
    frames keep their number and time; and every frame after such a loss until the next clean keyframe,
    because those are predicted from the lost picture: FFmpeg conceals the error and returns them without a
    word, smeared. A frame the decoder itself flags corrupt starts such a run too.
    """
    n = 0
    clean = True
    pending: list[int] = []  # time stamps of packets sent whose frame has not come out yet, ascending
    damaged: set[int] = set()  # ... of those, the ones the decoder rejected
    for packet in container.demux(stream):
        stamped = packet.size and packet.pts is not None and not packet.is_discard
        if stamped:
            bisect.insort(pending, packet.pts)
        try:
            frames = stream.decode(packet)
        except av.error.InvalidDataError:
            damage.packets += 1
            if stamped:
                damaged.add(packet.pts)
                continue
            damage.frames += 1  # no time stamp to place it by: lost where it happened
            damage.at.append(n)
            clean = False
            yield n, None
            n += 1
            continue
        for frame in frames:
            while pending and frame.pts is not None and pending[0] <= frame.pts:
                pts = pending.pop(0)
                if pts == frame.pts:
                    break
                damage.frames += 1  # presented before this frame, never came out: lost
                if pts in damaged:
                    damage.at.append(n)
                clean = False
                yield n, None
                n += 1
            if frame.is_corrupt:
                clean = False
            elif frame.key_frame:
                clean = True
            if not clean:
                damage.frames += 1
            yield n, frame if clean else None
            n += 1
    for pts in pending:  # the decoder never gave these back (damage at the very end)
        damage.frames += 1
        if pts in damaged:
            damage.at.append(n)
        yield n, None
        n += 1


def detect_cuts(path: str, cfg: SplitConfig) -> tuple[list[int], int, Fraction]:
    """Finds shot boundaries.

    Args:
        path: the video.
        cfg: detector kind, thresholds, ``min_scene_len`` (frames) and ``detect_width``.
    Returns:
        (cut frames: each the first frame of a new shot, sorted; total decoded frames, damaged ones included;
        fps). Damaged stretches (see ``_decode``) are not cuts; the clean stretches around them are detected
        separately.
    """
    container, stream = _open(path)
    with container:
        fps = Fraction(stream.average_rate or stream.guessed_rate)
        detector = _detector(cfg)
        step = max(1, stream.codec_context.width // max(cfg.detect_width, 1))
        step += step % 2 if step > 1 else 0  # even steps sample the half-size chroma planes exactly
        cuts: list[int] = []
        total, last = 0, -1  # frames seen; the last frame the detector took
        for n, frame in _decode(container, stream, Damage()):
            total = n + 1
            if frame is None:
                if last == n - 1 >= 0:  # damage ends the stretch: its pending cuts, then a fresh detector
                    cuts += [c.frame_num for c in detector.post_process(FrameTimecode(last, fps=fps))]
                    detector = _detector(cfg)
                continue
            cuts += [c.frame_num for c in detector.process_frame(FrameTimecode(n, fps=fps), _small_bgr(frame, step))]
            last = n
        if last == total - 1 >= 0:
            cuts += [c.frame_num for c in detector.post_process(FrameTimecode(last, fps=fps))]
    return sorted({c for c in cuts if 0 < c < total}), total, fps


def plan_clips(cuts: list[int], num_frames: int, fps: float, cfg: SplitConfig) -> list[tuple[int, int]]:
    """Turns cuts into clip spans [start, end) (source frames): edges trimmed, short shots dropped,
    long shots cut into consecutive pieces of ``max_clip_s`` (a remainder shorter than ``min_clip_s`` is dropped)."""
    bounds = [0, *cuts, num_frames]
    min_len = max(1, math.ceil(cfg.min_clip_s * fps - 1e-6))
    max_len = math.floor(cfg.max_clip_s * fps + 1e-6) if cfg.max_clip_s else 0
    spans = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        start, end = start + cfg.drop_edge_frames, end - cfg.drop_edge_frames
        piece = max_len or (end - start)
        for s in range(start, end, max(piece, 1)):
            e = min(s + piece, end)
            if e - s >= min_len:
                spans.append((s, e))
    return spans[: cfg.max_clips] if cfg.max_clips else spans


def _keep(offset: int, src_fps: Fraction, out_fps: Fraction) -> bool:
    """Frame-dropping re-timing: keep a frame when the output frame index advances."""
    if out_fps >= src_fps:
        return True
    return offset == 0 or math.floor(offset * out_fps / src_fps) != math.floor((offset - 1) * out_fps / src_fps)


@dataclass
class SplitResult:
    """What ``split_video`` wrote: one entry per clip in ``spans``/``counts``/``paths``."""

    spans: list[tuple[int, int]]  # [start, end) source frames, as plan_clips(cuts, num_frames) gives them
    counts: list[int]  # frames written per clip (fewer than end - start when re-timed)
    paths: list[Path | None]  # None in reference mode (nothing written)
    cuts: list[int]  # first frames of new shots
    num_frames: int  # frames decoded (all of them, unless max_clips stopped the decode early)
    fps: Fraction  # source
    out_fps: Fraction
    width: int  # clip size
    height: int
    damage: Damage = field(default_factory=Damage)  # damaged packets decoded past (none of them is in a clip)


class _ClipCutter:
    """Takes the source frames in order, each once the cuts that decide its fate are known, and encodes the
    spans of ``plan_clips`` as they go by: edges trimmed, long shots cut every ``max_clip_s``, and a span that
    ends shorter than ``min_clip_s`` aborted (its few frames of encoding are the price of not buffering it)."""

    def __init__(self, cfg: SplitConfig, fps: Fraction, out_fps: Fraction, size: tuple[int, int],
                 out_path: Callable[[int], Path]):
        self.cfg, self.fps, self.out_fps, self.size, self.out_path = cfg, fps, out_fps, size, out_path
        self.min_len = max(1, math.ceil(cfg.min_clip_s * fps - 1e-6))
        self.max_len = math.floor(cfg.max_clip_s * fps + 1e-6) if cfg.max_clip_s else 0
        self.ahead: list[int] = []  # known cuts after the last committed frame, ascending
        self.cuts: list[int] = []
        self.shot_start = 0
        self.committed = -1  # the last frame handed to commit()
        self.span: list[int] | None = None  # [start, end) of the span being written
        self.writer: VideoWriter | None = None
        self.count = 0
        self.result = SplitResult([], [], [], self.cuts, 0, fps, out_fps, *size)

    @property
    def full(self) -> bool:
        return bool(self.cfg.max_clips) and len(self.result.spans) >= self.cfg.max_clips

    def add_cut(self, cut: int, is_end: bool = False) -> None:
        """Registers a cut (or, with ``is_end``, the end of the video) reported by the detector."""
        if cut <= 0 or cut in self.ahead or cut in self.cuts:
            return
        if cut - self.cfg.drop_edge_frames <= self.committed:
            # Cannot happen with scenedetect 0.7's detectors (their lag is event_buffer_length, which the
            # caller waits for); failing beats writing a clip that straddles a cut.
            raise RuntimeError(f"the detector reported a cut at frame {cut} after frame {self.committed} was "
                               "already encoded (its lag exceeds event_buffer_length)")
        bisect.insort(self.ahead, cut)
        if not is_end:
            bisect.insort(self.cuts, cut)

    def commit(self, index: int, frame: av.VideoFrame) -> None:
        """Hands over source frame ``index``: no cut at or before ``index + drop_edge_frames`` is still unknown."""
        self.committed = index
        if self.full:
            return
        while self.ahead and self.ahead[0] <= index:
            self.shot_start = self.ahead.pop(0)
        if frame is None:  # damaged (see _decode): no span crosses it; cuts at both ends of the damage restart
            self.close_span()
            return
        start = self.shot_start + self.cfg.drop_edge_frames
        if index < start or (self.ahead and index >= self.ahead[0] - self.cfg.drop_edge_frames):
            self.close_span()  # an edge frame of a shot
            return
        piece_start = start + (index - start) // self.max_len * self.max_len if self.max_len else start
        if self.span is None or self.span[0] != piece_start:
            self.close_span()
            self.span = [piece_start, piece_start]
        self.span[1] = index + 1
        if _keep(index - piece_start, self.fps, self.out_fps):
            if self.cfg.mode == "reference":  # the row points into the source: count, write nothing
                self.count += 1
                return
            if self.writer is None:
                # One encoder thread: parallelism comes from running many videos at once.
                self.writer = VideoWriter(self.out_path(len(self.result.spans)), self.out_fps, *self.size,
                                          self.cfg.codec, self.cfg.crf, self.cfg.preset, threads=1)
            self.writer.write(frame)
            self.count += 1

    def close_span(self) -> None:
        """Publishes the span being written if it is long enough, else drops it."""
        if self.span is None:
            return
        writer, (start, end), count = self.writer, self.span, self.count
        self.span, self.writer, self.count = None, None, 0
        if end - start < self.min_len or self.full:
            if writer is not None:
                writer.abort()
            return
        self.result.spans.append((start, end))
        self.result.counts.append(count)
        self.result.paths.append(writer.close() if writer is not None else None)

    def abort(self) -> None:
        """Drops the span being written (on an error)."""
        if self.writer is not None:
            self.writer.abort()
        self.span, self.writer = None, None


def split_video(path: str, cfg: SplitConfig, out_path: Callable[[int], Path]) -> SplitResult:
    """Detects shots and writes frame-accurate clips in ONE decode of ``path``.

    Each decoded frame goes to the detector (as a small thumbnail) and waits in a short queue until no cut can
    still change where it belongs: PySceneDetect reports a cut at most ``event_buffer_length`` frames late
    (ContentDetector's merge filter: ``min_scene_len``; AdaptiveDetector: ``window_width``), and trimming
    ``drop_edge_frames`` before a cut needs that many more. Then it is encoded into the current clip. The clips
    are exactly ``plan_clips(*detect_cuts(path))``, at half the decoding of detecting first and cutting after.

    Damaged packets are decoded past (``_decode``): a damaged stretch ends the shot it falls in like a cut, no
    clip holds a damaged frame, and the clean frames after it start a new shot with a fresh detector (so the
    garbage never reaches its statistics). With damage, the clips are ``plan_clips`` of the cuts plus both ends
    of every damaged stretch, without the damaged pieces.

    Args:
        path: the source video.
        cfg: detector, clip length rules, fps/size and encoder settings.
        out_path: clip number (0, 1, ... in time order) -> the file to write it to.
    Returns:
        the clips written and the cuts found.
    """
    container, stream = _open(path)
    with container:
        fps = Fraction(stream.average_rate or stream.guessed_rate)
        out_fps = min(fps, Fraction(cfg.target_fps).limit_denominator(1001)) if cfg.target_fps else fps
        width, height = stream.codec_context.width, stream.codec_context.height
        if cfg.min_short_side and min(width, height) < cfg.min_short_side:
            # Unwanted, not broken: rejected before any decode, and never upscaled to fit.
            raise Reject(f"short side {min(width, height)} px < min_short_side {cfg.min_short_side} ({width}x{height})")
        size = even_size(width, height, cfg.short_side)
        detector = _detector(cfg)
        step = max(1, stream.codec_context.width // max(cfg.detect_width, 1))
        step += step % 2 if step > 1 else 0  # even steps sample the half-size chroma planes exactly
        delay = detector.event_buffer_length + cfg.drop_edge_frames
        cutter = _ClipCutter(cfg, fps, out_fps, size, out_path)
        queue: deque[tuple[int, av.VideoFrame | None]] = deque()  # not yet committed; at most `delay` frames
        damage = cutter.result.damage
        n, last = 0, -1  # frames seen; the last frame the detector took
        try:
            for index, frame in _decode(container, stream, damage):
                if frame is None:
                    if last == index - 1:  # the first damaged frame: it ends the shot like a cut
                        if last >= 0:
                            for cut in sorted(c.frame_num for c in detector.post_process(FrameTimecode(last, fps=fps))):
                                if 0 < cut < index:
                                    cutter.add_cut(cut)
                        cutter.add_cut(index, is_end=True)
                        detector = _detector(cfg)
                else:
                    if last < index - 1:  # the first clean frame after damage starts a new shot
                        cutter.add_cut(index, is_end=True)
                    for cut in detector.process_frame(FrameTimecode(index, fps=fps), _small_bgr(frame, step)):
                        cutter.add_cut(cut.frame_num)
                    last = index
                queue.append((index, frame))
                n = index + 1
                while len(queue) > delay:
                    cutter.commit(*queue.popleft())
                if cutter.full:
                    cutter.abort()
                    break
            else:
                if last == n - 1 >= 0:
                    for cut in sorted(c.frame_num for c in detector.post_process(FrameTimecode(last, fps=fps))):
                        if 0 < cut < n:
                            cutter.add_cut(cut)
                cutter.add_cut(n, is_end=True)
                while queue:
                    cutter.commit(*queue.popleft())
                cutter.close_span()
        except BaseException:
            cutter.abort()
            raise
    cutter.result.num_frames = n
    return cutter.result


def split(row: Row, cfg: SplitConfig) -> list[Row]:
    """Stage function: one video row -> one row per clip (lineage: source video, start/end time and frame)."""
    if is_missing(row.get("path")):
        raise RuntimeError("row has no path")
    stem = safe_name(str(row["id"]))
    reference = cfg.mode == "reference"
    res = split_video(row["path"], cfg, lambda k: Path(cfg.out_dir) / f"{stem}_{k:04d}.mp4")
    if res.num_frames == 0:
        raise RuntimeError("no decodable frames")
    damage = res.damage
    damaged = f", {damage.packets} damaged packets" if damage.packets else ""
    if damage.frames > cfg.max_damaged_share * res.num_frames:
        for clip in res.paths:  # scraps between damage: not worth keeping, so not left behind either
            if clip is not None:
                Path(clip).unlink(missing_ok=True)
        raise Reject(f"mostly damaged: {damage.frames} of {res.num_frames} frames unusable{damaged}",
                     {"split_damaged_packets": damage.packets})
    if reference and damage.packets:
        # A reader seeking into a damaged file need not number its frames as split did (lost frames keep their
        # number here), so a reference row could silently give other frames: only encoded clips are safe.
        raise Reject(f"damaged source ({damage.packets} damaged packets): split.mode=reference needs an intact "
                     "source; split it with mode=encode", {"split_damaged_packets": damage.packets})
    if not res.spans:
        raise Reject(f"no shot of at least {cfg.min_clip_s}s ({len(res.cuts) + 1} shots, {res.num_frames} frames"
                     f"{damaged})", {"split_cuts": res.cuts, "split_damaged_packets": damage.packets})
    fps, out_fps, width, height = res.fps, res.out_fps, res.width, res.height
    source = row.get("source") if not is_missing(row.get("source")) else (row.get("url") or row["path"])
    # Reference rows share their source's hash; the latent cache adds each row's span to it (source_span).
    source_sha = file_sha256(row["path"]) if reference else None
    clips = []
    for k, ((start, end), count, path) in enumerate(zip(res.spans, res.counts, res.paths)):
        parent = {key: value for key, value in row.items() if key not in ("codec", "pix_fmt")}
        clips.append({
            **parent,
            "id": f"{row['id']}_{k:04d}",
            "path": str(row["path"] if reference else path),
            "text": None,
            "num_frames": count,
            "fps": float(out_fps),
            "height": height,
            "width": width,
            "aspect_ratio": height / width,
            "resolution": height * width,
            "duration": float(count / out_fps),
            "url": row.get("url"),
            "source": source,
            "source_video": row["path"],
            "start_time": float(start / fps),
            "end_time": float(end / fps),
            "start_frame": start,
            "end_frame": end,
            # Of the source, and of this clip (0 unless a bug let damage in: the test and anyone can check).
            "split_damaged_packets": damage.packets,
            "damaged_packets": sum(start <= at < end for at in damage.at),
            SPLIT_MODE_COLUMN: cfg.mode,
            SOURCE_FPS_COLUMN: float(fps),
            # Of this clip, not inherited from the parent row: the cache's content key (see the docstring).
            CONTENT_HASH_COLUMN: source_sha if reference else file_sha256(path),
        })
    return clips
