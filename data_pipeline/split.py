"""split: shot detection (PySceneDetect or TransNetV2) and frame-accurate H.264 clips cut at the detected frames.

One decode of the source, no seeking, frames counted from 0 in presentation order. Each frame is

1. shrunk to ~``detect_width`` pixels straight from its YUV planes (strided sampling, far cheaper than
   swscale at 720p) and fed to the detector (``data_pipeline.shots``: ``ContentDetector``,
   ``AdaptiveDetector`` or TransNetV2); a cut at frame k means a new shot starts at frame k, and TransNetV2
   also marks gradual transitions (dissolves, fades) whose frames go into no clip;
2. held back for the detector's lag (a few frames; TransNetV2: 74 or more), then re-encoded into its clip, so a clip starts and ends
   exactly on the detected frames (stream copy would round to keyframes; Open-Sora 1.0's clips were off
   by up to 0.5 s).

``detect_cuts`` + ``plan_clips`` are the same decisions as a separate detection pass (the definition
``split_video`` is tested against, and the bench's detection-only number).

Clip files are named ``<row id>_<k>.mp4`` (an id that is not a safe, short file name is shortened and given
12 hex digits of its hash, ``media.unique_stem``) and written through a temp file, so a redone video
overwrites its own clips. A source whose display matrix turns its picture (a phone held upright) gives
upright clips; a change of picture size within a stream is a cut. Each clip's row records the sha256 of its bytes (``sha256``, read back right
after the write, while the file is still in the page cache): the latent cache keys on it, so training
from the cache never has to open a clip to learn what it is.

``split.mode: reference`` runs the same decode and the same decisions but encodes nothing: each clip is a row
whose ``path`` is the source video, with its span (``start_frame``/``end_frame``, ``source_fps`` -> ``fps``,
``split_mode=reference``; ``opensora.data.manifest.source_span``) and the size it would have been resized to;
its ``sha256`` is the source's. Training, the latent cache, filter and caption seek into the source for
exactly the frames the encoded clip would hold. Before writing such rows split checks that decord, their reader,
counts the frames as split did and gives the first frame of the first and the last clip as split decoded them
(``check_readback``), and refuses the source with the reason otherwise (damaged, rotated, MPEG-PS, GIF, ...).
"""

from __future__ import annotations

import bisect
import json
import math
import re
import sys
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import av
import cv2
import numpy as np

from data_pipeline.config import SplitConfig
from data_pipeline.media import even_size, unique_stem
from data_pipeline.probe import video_stream
from data_pipeline.shots import make_detector
from data_pipeline.rows import Reject, Row, is_missing
from opensora.data.manifest import CONTENT_HASH_COLUMN, SOURCE_FPS_COLUMN, SPLIT_MODE_COLUMN, is_image
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


def _open(path: str) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    container = av.open(path)
    try:
        stream = video_stream(container)  # the stream decord reads too, never a cover image
    except BaseException:
        container.close()
        raise
    stream.thread_type = "NONE"  # one core per video; parallelism is across videos
    stream.codec_context.thread_count = 1
    return container, stream


def _source_format(stream: av.video.stream.VideoStream, cfg: SplitConfig) -> tuple[Fraction, Fraction, int, int]:
    """(source fps, output fps, width, height) of a source; a short side below ``cfg.min_short_side`` is a Reject
    (unwanted, not broken: rejected before any decode, and never upscaled to fit)."""
    fps = Fraction(stream.average_rate or stream.guessed_rate)
    out_fps = min(fps, Fraction(cfg.target_fps).limit_denominator(1001)) if cfg.target_fps else fps
    width, height = stream.codec_context.width, stream.codec_context.height
    if cfg.min_short_side and min(width, height) < cfg.min_short_side:
        raise Reject(f"short side {min(width, height)} px < min_short_side {cfg.min_short_side} ({width}x{height})")
    return fps, out_fps, width, height


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


class Shots(NamedTuple):
    """What ``detect_cuts`` found in a video."""

    cuts: list[int]  # first frames of new shots, sorted
    num_frames: int  # decoded frames, damaged ones included
    fps: Fraction
    gaps: list[int]  # first frames of gradual transitions (transnetv2): up to the next cut, in no shot


def detect_cuts(path: str, cfg: SplitConfig) -> Shots:
    """Finds shot boundaries.

    Args:
        path: the video.
        cfg: detector kind and settings, ``min_scene_len`` (frames) and ``detect_width``.
    Returns:
        the cuts and gaps (see :class:`Shots`). Damaged stretches (see ``_decode``) are not cuts; the clean
        stretches around them are detected separately.
    """
    container, stream = _open(path)
    with container:
        fps = Fraction(stream.average_rate or stream.guessed_rate)
        detector = make_detector(cfg, fps)
        step = max(1, stream.codec_context.width // max(cfg.detect_width, 1))
        step += step % 2 if step > 1 else 0  # even steps sample the half-size chroma planes exactly
        found: list[tuple[int, bool]] = []
        total, last, shape = 0, -1, None  # frames seen; the last frame the detector took, and its size
        for n, frame in _decode(container, stream, Damage()):
            total = n + 1
            if frame is None:
                if last == n - 1 >= 0:  # damage ends the stretch: its pending cuts, then a fresh detector
                    found += detector.flush(last, n)
                    detector = make_detector(cfg, fps)
                continue
            if last == n - 1 >= 0 and (frame.width, frame.height) != shape:  # a new picture size: a cut (split_video)
                found += detector.flush(last, n) + [(n, False)]
                detector = make_detector(cfg, fps)
            found += detector.feed(n, _small_bgr(frame, step))
            last, shape = n, (frame.width, frame.height)
        if last == total - 1 >= 0:
            found += detector.flush(last, total)
    cuts = sorted({c for c, gap in found if not gap and 0 < c < total})
    return Shots(cuts, total, fps, sorted({c for c, gap in found if gap and 0 <= c < total}))


def plan_clips(cuts: list[int], num_frames: int, fps: float, cfg: SplitConfig,
               gaps: list[int] = ()) -> list[tuple[int, int]]:
    """Turns cuts into clip spans [start, end) (source frames): edges trimmed, short shots dropped,
    long shots cut into consecutive pieces of ``max_clip_s`` (a remainder shorter than ``min_clip_s`` is dropped).
    The frames from each of ``gaps`` to the next boundary (a gradual transition) are no shot."""
    bounds = sorted({0, *cuts, *gaps, num_frames})
    min_len = max(1, math.ceil(cfg.min_clip_s * fps - 1e-6))
    max_len = math.floor(cfg.max_clip_s * fps + 1e-6) if cfg.max_clip_s else 0
    spans = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if start in gaps:
            continue
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
    gaps: list[int]  # first frames of gradual transitions (transnetv2), which go into no clip
    num_frames: int  # frames decoded (all of them, unless max_clips stopped the decode early)
    fps: Fraction  # source
    out_fps: Fraction
    width: int  # clip size at the start (as shown: a source turned by its display matrix gives upright clips)
    height: int
    damage: Damage = field(default_factory=Damage)  # damaged packets decoded past (none of them is in a clip)
    rotation: int = 0  # degrees counter-clockwise the source's display matrix turns its pictures
    # reference mode: (clip number, its first frame as RGB) of the first and the last clip, for the read-back check
    check_frames: list[tuple[int, np.ndarray]] = field(default_factory=list)
    complete: bool = True  # False when max_clips stopped the decode before the end
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each clip: its pictures' own


class _ClipCutter:
    """Takes the source frames in order, each once the cuts that decide its fate are known, and encodes the
    spans of ``plan_clips`` as they go by: edges trimmed, long shots cut every ``max_clip_s``, and a span that
    ends shorter than ``min_clip_s`` aborted (its few frames of encoding are the price of not buffering it)."""

    def __init__(self, cfg: SplitConfig, fps: Fraction, out_fps: Fraction, size: tuple[int, int],
                 out_path: Callable[[int], Path]):
        self.cfg, self.fps, self.out_fps, self.size, self.out_path = cfg, fps, out_fps, size, out_path
        self.span_size = size  # of the span being written: its first frame's, shrunk (a stream may change size)
        self.min_len = max(1, math.ceil(cfg.min_clip_s * fps - 1e-6))
        self.max_len = math.floor(cfg.max_clip_s * fps + 1e-6) if cfg.max_clip_s else 0
        self.ahead: list[int] = []  # known cuts after the last committed frame, ascending
        self.cuts: list[int] = []
        self.shot_start = 0
        self.committed = -1  # the last frame handed to commit()
        self.span: list[int] | None = None  # [start, end) of the span being written
        self.writer: VideoWriter | None = None
        self.count = 0
        self.gaps: list[int] = []
        self.result = SplitResult([], [], [], self.cuts, self.gaps, 0, fps, out_fps, *size)
        self.rotation: int | None = None  # known from the first clean frame
        self.first: np.ndarray | None = None  # reference mode: the first frame of the span being counted

    @property
    def full(self) -> bool:
        return bool(self.cfg.max_clips) and len(self.result.spans) >= self.cfg.max_clips

    def add_cut(self, cut: int, is_end: bool = False, gap: bool = False) -> None:
        """Registers a cut (or, with ``is_end``, the end of the video; with ``gap``, the start of a gradual
        transition, whose frames up to the next cut go into no clip) reported by the detector."""
        if gap and cut not in self.gaps:
            if cut <= self.committed:
                raise RuntimeError(f"the detector reported a transition from frame {cut} after frame "
                                   f"{self.committed} was already encoded (its lag exceeds its declared lag)")
            bisect.insort(self.gaps, cut)
            if cut == 0:  # the video opens with a transition: shot_start is 0 already
                return
        if cut <= 0 or cut in self.ahead or cut in self.cuts:
            return
        if cut - self.cfg.drop_edge_frames <= self.committed:
            # Cannot happen with the detectors of data_pipeline.shots (they report within their lag, which the
            # caller waits for); failing beats writing a clip that straddles a cut.
            raise RuntimeError(f"the detector reported a cut at frame {cut} after frame {self.committed} was "
                               "already encoded (its lag exceeds its declared lag)")
        bisect.insort(self.ahead, cut)
        if not is_end and not gap:
            bisect.insort(self.cuts, cut)

    def commit(self, index: int, frame: av.VideoFrame) -> None:
        """Hands over source frame ``index``: no cut at or before ``index + drop_edge_frames`` is still unknown."""
        self.committed = index
        if self.full:
            return
        while self.ahead and self.ahead[0] <= index:
            self.shot_start = self.ahead.pop(0)
        if frame is None or self.shot_start in self.gaps:
            # Damaged (see _decode): no span crosses it; cuts at both ends of the damage restart. Or a frame of
            # a gradual transition, which belongs to neither shot.
            self.close_span()
            return
        if self.rotation is None:
            self._orient(frame.rotation)
        start = self.shot_start + self.cfg.drop_edge_frames
        if index < start or (self.ahead and index >= self.ahead[0] - self.cfg.drop_edge_frames):
            self.close_span()  # an edge frame of a shot
            return
        piece_start = start + (index - start) // self.max_len * self.max_len if self.max_len else start
        if self.span is None or self.span[0] != piece_start:
            self.close_span()
            self.span = [piece_start, piece_start]
            shown = (frame.height, frame.width) if self.rotation % 180 else (frame.width, frame.height)
            self.span_size = even_size(*shown, self.cfg.short_side)
            if self.cfg.mode == "reference":  # kept to check that the reader of reference rows sees the same
                self.first = frame.to_ndarray(format="rgb24")
        self.span[1] = index + 1
        if _keep(index - piece_start, self.fps, self.out_fps):
            if self.cfg.mode == "reference":  # the row points into the source: count, write nothing
                self.count += 1
                return
            if self.writer is None:
                # One encoder thread: parallelism comes from running many videos at once.
                self.writer = VideoWriter(self.out_path(len(self.result.spans)), self.out_fps, *self.span_size,
                                          self.cfg.codec, self.cfg.crf, self.cfg.preset, threads=1)
            # Turned upright as the source is shown: the clip has no display matrix, and decord ignores it.
            self.writer.write(np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), self.rotation // 90))
                              if self.rotation else frame)
            self.count += 1

    def _orient(self, rotation: int) -> None:
        """Takes the display rotation of the first clean frame: a quarter turn swaps the clips' sides."""
        rotation = int(rotation) % 360
        if rotation % 90:
            raise Reject(f"display matrix turns the picture by {rotation} degrees, not a multiple of 90")
        self.rotation = self.result.rotation = rotation
        if rotation % 180:
            self.size = self.size[::-1]
            self.result.width, self.result.height = self.size

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
        self.result.sizes.append(self.span_size)
        self.result.paths.append(writer.close() if writer is not None else None)
        if self.cfg.mode == "reference":  # the first clip's and the latest one's (two frames, however long the video)
            checks, entry = self.result.check_frames, (len(self.result.spans) - 1, self.first)
            if len(checks) < 2:
                checks.append(entry)
            else:
                checks[1] = entry

    def abort(self) -> None:
        """Drops the span being written (on an error)."""
        if self.writer is not None:
            self.writer.abort()
        self.span, self.writer = None, None


def split_video(path: str, cfg: SplitConfig, out_path: Callable[[int], Path]) -> SplitResult:
    """Detects shots and writes frame-accurate clips in ONE decode of ``path``.

    Each decoded frame goes to the detector (as a small thumbnail) and waits in a short queue until no cut can
    still change where it belongs: a detector reports a boundary at most its ``lag`` frames late (PySceneDetect's
    ``event_buffer_length``: ContentDetector's merge filter ``min_scene_len``, AdaptiveDetector's
    ``window_width``; TransNetV2: the rest of its 100-frame windows), and trimming ``drop_edge_frames`` before a
    cut needs that many more. Then it is encoded into the current clip. The clips are exactly
    ``plan_clips(cuts, num_frames, fps, cfg, gaps)`` of ``detect_cuts(path)``, at half the decoding of detecting
    first and cutting after.

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
        fps, out_fps, width, height = _source_format(stream, cfg)
        size = even_size(width, height, cfg.short_side)
        detector = make_detector(cfg, fps)
        step = max(1, stream.codec_context.width // max(cfg.detect_width, 1))
        step += step % 2 if step > 1 else 0  # even steps sample the half-size chroma planes exactly
        delay = detector.lag + cfg.drop_edge_frames
        cutter = _ClipCutter(cfg, fps, out_fps, size, out_path)
        queue: deque[tuple[int, av.VideoFrame | None]] = deque()  # not yet committed; at most `delay` frames
        damage = cutter.result.damage
        n, last, shape = 0, -1, None  # frames seen; the last frame the detector took, and its size
        try:
            for index, frame in _decode(container, stream, damage):
                if frame is None:
                    if last == index - 1:  # the first damaged frame: it ends the shot like a cut
                        for cut, gap in detector.flush(last, index) if last >= 0 else []:
                            cutter.add_cut(cut, gap=gap)
                        cutter.add_cut(index, is_end=True)
                        detector = make_detector(cfg, fps)
                else:
                    if last < index - 1:  # the first clean frame after damage starts a new shot
                        cutter.add_cut(index, is_end=True)
                    elif last >= 0 and (frame.width, frame.height) != shape:
                        # The picture size changes (files joined, a broadcast switching formats): a cut, and a
                        # fresh detector, which cannot compare pictures of two sizes (PySceneDetect asserts).
                        for cut, gap in detector.flush(last, index):
                            cutter.add_cut(cut, gap=gap)
                        cutter.add_cut(index)
                        detector = make_detector(cfg, fps)
                    for cut, gap in detector.feed(index, _small_bgr(frame, step)):
                        cutter.add_cut(cut, gap=gap)
                    last, shape = index, (frame.width, frame.height)
                queue.append((index, frame))
                n = index + 1
                while len(queue) > delay:
                    cutter.commit(*queue.popleft())
                if cutter.full:
                    cutter.abort()
                    cutter.result.complete = False
                    break
            else:
                if last == n - 1 >= 0:
                    for cut, gap in detector.flush(last, n):
                        cutter.add_cut(cut, gap=gap)
                cutter.add_cut(n, is_end=True)
                while queue:
                    cutter.commit(*queue.popleft())
                cutter.close_span()
        except BaseException:
            cutter.abort()
            raise
    cutter.result.num_frames = n
    return cutter.result


TO_END = -1  # the end frame of a span that runs to the end of its source (a dataset's whole video)


def span_frames(spans_s: list[dict], fps: Fraction, offset_s: float = 0.0) -> list[tuple[int, int]]:
    """A dataset's spans in seconds -> [start, end) frames: frame k is shown from k / fps, so a span starts on the
    frame nearest its start time and ends before the frame nearest its end time (within half a frame). An ``end``
    of None (a whole video) is :data:`TO_END`. ``offset_s``: the source time of the file's frame 0 (a section
    download, ``download_section_start_s``), subtracted from the spans."""
    return [(max(0, round((float(s["start"]) - offset_s) * fps)),
             TO_END if s["end"] is None else round((float(s["end"]) - offset_s) * fps)) for s in spans_s]


def cut_at_spans(path: str, spans: list[tuple[int, int]], cfg: SplitConfig,
                 out_path: Callable[[int], Path]) -> tuple[SplitResult, list[int], dict[int, str]]:
    """Cuts the given frame spans out of ``path`` in one decode, with no shot detection (a dataset's clips), frame
    accurately: encoded as ``split_video`` encodes a clip (``mode: encode``, re-timed and shrunk the same way), or
    only counted (``mode: reference``). Spans may overlap. A span that holds a damaged frame or reaches past the
    source's end is not cut.

    Returns:
        the result (its entries in span order), the index in ``spans`` of each entry, and why each other span was not cut.
    """
    whole = {k for k, (_, end) in enumerate(spans) if end == TO_END}
    spans = [(start, sys.maxsize if end == TO_END else end) for start, end in spans]
    container, stream = _open(path)
    reference = cfg.mode == "reference"
    with container:
        fps, out_fps, width, height = _source_format(stream, cfg)
        res = SplitResult([], [], [], [], [], 0, fps, out_fps, *even_size(width, height, cfg.short_side))
        writers: dict[int, VideoWriter] = {}
        counts, firsts, lost = [0] * len(spans), {}, {}
        last_end = max((e for _, e in spans), default=0)
        n = 0
        try:
            for index, frame in _decode(container, stream, res.damage):
                n = index + 1
                if frame is not None and index == 0:
                    res.rotation = int(frame.rotation) % 360
                for k, (start, end) in enumerate(spans):
                    if not start <= index < end or k in lost:
                        continue
                    if frame is None:
                        lost[k] = f"damaged frame {index}"
                        if k in writers:
                            writers.pop(k).abort()
                        continue
                    if index == start:
                        firsts[k] = frame.to_ndarray(format="rgb24") if reference else None
                    if not _keep(index - start, fps, out_fps):
                        continue
                    counts[k] += 1
                    if reference:
                        continue
                    turned = res.rotation % 180 != 0
                    if k not in writers:
                        shown = (frame.height, frame.width) if turned else (frame.width, frame.height)
                        writers[k] = VideoWriter(out_path(k), out_fps, *even_size(*shown, cfg.short_side), cfg.codec,
                                                 cfg.crf, cfg.preset, threads=1)
                    writers[k].write(np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"),
                                                                   res.rotation // 90)) if res.rotation else frame)
                if n >= last_end:  # nothing asked for lies further on
                    res.complete = n == stream.frames
                    break
            paths = {k: w.close() for k, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
    res.num_frames = n
    spans = [(start, n if k in whole else end) for k, (start, end) in enumerate(spans)]
    kept = []
    for k, (start, end) in enumerate(spans):
        if k not in lost and end > n:
            lost[k] = f"span ends at frame {end}, the source has {n}"
            if k in paths:
                Path(paths.pop(k)).unlink(missing_ok=True)
        elif k not in lost and end <= start:
            lost[k] = "empty span"
        if k in lost:
            continue
        kept.append(k)
        res.spans.append((start, end))
        res.counts.append(counts[k])
        res.paths.append(paths.get(k))
        turned = res.rotation % 180 != 0
        res.sizes.append(even_size(*((height, width) if turned else (width, height)), cfg.short_side))
    if reference and kept:
        res.check_frames = [(0, firsts[kept[0]])] + ([(len(kept) - 1, firsts[kept[-1]])] if len(kept) > 1 else [])
    return res, kept, lost


# Mean |difference| (0-255 RGB) allowed between a frame as split decoded it (PyAV) and as decord reads it: the
# same bitstream gives the same picture (measured 0.0 on 8-bit sources, 0.9-1.4 on 10-bit ones, which the two
# libraries bring down to 8 bits differently); a frame checked is the first of a clip, the frame after a cut
# or a damaged stretch, so a reader that is one frame off sees another shot and differs by tens.
READBACK_TOLERANCE = 4.0


def check_readback(path: str, res: SplitResult) -> None:
    """Rejects a source whose reference rows would not read back as split numbered its frames: decord (the
    dataset's, filter's and caption's reader) must open it, count the same frames, and give the first frame of
    the first and of the last clip as split decoded them (a seek that lands elsewhere, another stream, a
    format it cannot index, such as GIF, or a codec its FFmpeg lacks, such as AV1)."""
    import decord

    def refuse(why: str) -> Reject:
        return Reject(f"reference rows would not read back: {why}; split it with mode=encode")

    try:
        reader = decord.VideoReader(path, num_threads=1)
        count = len(reader)
        if count != res.num_frames and (res.complete or count < res.num_frames):
            raise refuse(f"decord counts {count} frames, split decoded {res.num_frames}")
        for k, expected in res.check_frames:
            start = res.spans[k][0]
            got = reader.get_batch([start]).asnumpy()[0]
            if got.shape != expected.shape:
                raise refuse(f"decord reads frame {start} as {got.shape[1]}x{got.shape[0]}, "
                             f"split decoded {expected.shape[1]}x{expected.shape[0]}")
            diff = float(np.abs(got.astype(np.float32) - expected).mean())
            if diff > READBACK_TOLERANCE:
                raise refuse(f"decord's frame {start} differs from split's by {diff:.1f} (mean, 0-255): "
                             "its seek lands elsewhere")
    except decord.DECORDError as err:
        # "[17:45:11] /github/workspace/src/video/video_reader.cc:270: [PATH] Failed to ...": the last part says it
        message = re.sub(r"^\[[^]]*\]\s*\S+:\d+:\s*", "", str(err).strip().splitlines()[-1])
        message = re.sub(r"^Check failed: .*?\) ", "", message)  # its assertion, with values of no meaning
        raise refuse(f"decord cannot read it: {message.replace(f'[{path}]', '').strip()[:200]}") from err


def image_clip(row: Row, cfg: SplitConfig) -> Row:
    """An image (an image dataset's row) is its own clip, passed through unchanged: its id, file and size (the
    trainer resizes it; ``short_side`` does not apply), its caption, and the clip columns of one frame
    (``split_mode=image``). ``min_short_side`` rejects it as it rejects a video."""
    width, height = row.get("width"), row.get("height")
    if cfg.min_short_side and not is_missing(width) and min(width, height) < cfg.min_short_side:
        raise Reject(f"short side {min(width, height)} px < min_short_side {cfg.min_short_side} ({width}x{height})")
    clip = {**row, "num_frames": 1, "source_video": row["path"], "start_frame": 0, "end_frame": 1,
            SPLIT_MODE_COLUMN: "image", CONTENT_HASH_COLUMN: file_sha256(row["path"])}
    if not is_missing(row.get("dataset_clips")):  # the dataset's one "clip" of it: its id and score go with it
        [span] = json.loads(row["dataset_clips"])
        clip.update({"text": span.get("text"), "dataset_clip_id": span.get("clip_id"),
                     "dataset_score": span.get("score"), "dataset_clips": None})
    return clip


def split(row: Row, cfg: SplitConfig) -> list[Row]:
    """Stage function: one video row -> one row per clip (lineage: source video, start/end time and frame); an
    image row -> itself (:func:`image_clip`)."""
    if is_missing(row.get("path")):
        raise RuntimeError("row has no path")
    if is_image(row["path"]):
        return [image_clip(row, cfg)]
    stem = unique_stem(str(row["id"]))
    reference = cfg.mode == "reference"
    clip_path = lambda k: Path(cfg.out_dir) / f"{stem}_{k:04d}.mp4"  # noqa: E731
    dataset_spans = None if is_missing(row.get("dataset_clips")) else json.loads(row["dataset_clips"])
    if dataset_spans is not None:  # a dataset's clips (data_pipeline.datasets): cut at its spans, no detection
        with av.open(row["path"]) as probe_container:
            stream = video_stream(probe_container)
            fps = Fraction(stream.average_rate or stream.guessed_rate)
        # A section download's file starts at the section (data_pipeline.download.dataset_section), not at 0.
        offset = 0.0 if is_missing(row.get("download_section_start_s")) else float(row["download_section_start_s"])
        res, kept, lost = cut_at_spans(row["path"], span_frames(dataset_spans, fps, offset), cfg, clip_path)
        if not kept:
            raise Reject("no dataset span could be cut: " + "; ".join(f"{dataset_spans[k].get('clip_id')}: {why}"
                                                                      for k, why in sorted(lost.items())))
    else:
        res = split_video(row["path"], cfg, clip_path)
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
    if reference and res.rotation:
        # decord, the reader of reference rows, ignores the display matrix (and fails on some such files):
        # its frames would lie on their side. Encoded clips are turned upright.
        raise Reject(f"rotated source (display matrix turns it {res.rotation} degrees): reference rows would be read "
                     "on their side; split it with mode=encode")
    if not res.spans:
        raise Reject(f"no shot of at least {cfg.min_clip_s}s ({len(res.cuts) + 1} shots, {res.num_frames} frames"
                     f"{damaged})", {"split_cuts": res.cuts, "split_damaged_packets": damage.packets})
    if reference:
        check_readback(row["path"], res)
    fps, out_fps = res.fps, res.out_fps
    source = row.get("source") if not is_missing(row.get("source")) else (row.get("url") or row["path"])
    # Reference rows share their source's hash; the latent cache adds each row's span to it (source_span).
    source_sha = file_sha256(row["path"]) if reference else None
    clips = []
    for k, ((start, end), count, path, (width, height)) in enumerate(zip(res.spans, res.counts, res.paths,
                                                                        res.sizes)):
        parent = {key: value for key, value in row.items() if key not in ("codec", "pix_fmt", "rotation")}
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
        if dataset_spans is not None:  # the dataset's caption and ids go with its clip; caption keeps the text
            span = dataset_spans[kept[k]]
            clips[-1].update({"id": f"{row['id']}_{kept[k]:04d}", "text": span.get("text"),
                              "dataset_clip_id": span.get("clip_id"), "dataset_score": span.get("score"),
                              "dataset_clips": None, "dataset_spans_lost": len(lost)})
    return clips
