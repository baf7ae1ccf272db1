"""split: shot detection with PySceneDetect, then frame-accurate H.264 clips cut at the detected frames.

Two sequential decodes of the source, no seeking, frames counted from 0 in presentation order:

1. detection - each decoded frame is shrunk to ~``detect_width`` pixels straight from its YUV planes
   (strided sampling, far cheaper than swscale at 720p) and fed to ``ContentDetector`` /
   ``AdaptiveDetector.process_frame``; a cut at frame k means a new shot starts at frame k;
2. cutting - the frames of each clip span are re-encoded, so a clip starts and ends exactly on the
   detected frames (stream copy would round to keyframes; Open-Sora 1.0's clips were off by up to 0.5 s).

Clip files are named ``<row id>_<k>.mp4`` and written through a temp file, so a redone video
overwrites its own clips.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from scenedetect import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ContentDetector

from data_pipeline.config import SplitConfig
from data_pipeline.media import ClipWriter, even_size, safe_name
from data_pipeline.rows import Reject, Row, is_missing


def _small_bgr(frame: av.VideoFrame, step: int) -> np.ndarray:
    """A (H/step, W/step, 3) BGR thumbnail; planar YUV 4:2:0 is sampled directly (no full-size convert)."""
    if frame.format.name in ("yuv420p", "yuvj420p") and step % 2 == 0:
        h, w = frame.height, frame.width
        y = np.frombuffer(frame.planes[0], np.uint8).reshape(-1, frame.planes[0].line_size)[:h, :w][::step, ::step]
        half = step // 2
        u = np.frombuffer(frame.planes[1], np.uint8).reshape(-1, frame.planes[1].line_size)[: h // 2, : w // 2]
        v = np.frombuffer(frame.planes[2], np.uint8).reshape(-1, frame.planes[2].line_size)[: h // 2, : w // 2]
        u, v = u[::half, ::half], v[::half, ::half]
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


def detect_cuts(path: str, cfg: SplitConfig) -> tuple[list[int], int, Fraction]:
    """Finds shot boundaries.

    Args:
        path: the video.
        cfg: detector kind, thresholds, ``min_scene_len`` (frames) and ``detect_width``.
    Returns:
        (cut frames: each the first frame of a new shot, sorted; total decoded frames; fps).
    """
    container, stream = _open(path)
    with container:
        fps = Fraction(stream.average_rate or stream.guessed_rate)
        detector = _detector(cfg)
        step = max(1, stream.codec_context.width // max(cfg.detect_width, 1))
        step += step % 2 if step > 1 else 0  # even steps sample the half-size chroma planes exactly
        cuts: list[int] = []
        n = 0
        for frame in container.decode(stream):
            cuts += [c.frame_num for c in detector.process_frame(FrameTimecode(n, fps=fps), _small_bgr(frame, step))]
            n += 1
        if n:
            cuts += [c.frame_num for c in detector.post_process(FrameTimecode(n - 1, fps=fps))]
    return sorted({c for c in cuts if 0 < c < n}), n, fps


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


def cut_clips(path: str, spans: list[tuple[int, int]], out_paths: list[Path], cfg: SplitConfig,
              expected_frames: int) -> tuple[list[int], Fraction, int, int]:
    """Decodes ``path`` once and encodes each span [start, end) to its clip.

    Returns:
        (frames written per clip, clip fps, clip width, clip height).
    """
    container, stream = _open(path)
    writers: dict[int, ClipWriter] = {}
    counts = [0] * len(spans)
    try:
        with container:
            src_fps = Fraction(stream.average_rate or stream.guessed_rate)
            out_fps = min(src_fps, Fraction(cfg.target_fps).limit_denominator(1001)) if cfg.target_fps else src_fps
            width, height = even_size(stream.codec_context.width, stream.codec_context.height, cfg.short_side)
            k = 0  # the first span that may still receive frames (spans are sorted, non-overlapping)
            n = 0
            for frame in container.decode(stream):
                while k < len(spans) and n >= spans[k][1]:
                    if k in writers:
                        writers.pop(k).close()
                    k += 1
                if k == len(spans):
                    break
                start, end = spans[k]
                if start <= n < end and _keep(n - start, src_fps, out_fps):
                    if k not in writers:
                        writers[k] = ClipWriter(out_paths[k], out_fps, width, height, cfg.codec, cfg.crf, cfg.preset)
                    writers[k].write(frame)
                    counts[k] += 1
                n += 1
            for i in sorted(writers):
                if n < spans[i][1]:
                    raise RuntimeError(f"decoded {n} frames, fewer than the {expected_frames} seen while detecting")
                writers.pop(i).close()
    finally:
        for writer in writers.values():
            writer.abort()
    return counts, out_fps, width, height


def split(row: Row, cfg: SplitConfig) -> list[Row]:
    """Stage function: one video row -> one row per clip (lineage: source video, start/end time and frame)."""
    if is_missing(row.get("path")):
        raise RuntimeError("row has no path")
    cuts, num_frames, fps = detect_cuts(row["path"], cfg)
    if num_frames == 0:
        raise RuntimeError("no decodable frames")
    spans = plan_clips(cuts, num_frames, float(fps), cfg)
    if not spans:
        raise Reject(f"no shot of at least {cfg.min_clip_s}s ({len(cuts) + 1} shots, {num_frames} frames)",
                     {"split_cuts": cuts})
    stem = safe_name(str(row["id"]))
    out_paths = [Path(cfg.out_dir) / f"{stem}_{k:04d}.mp4" for k in range(len(spans))]
    counts, out_fps, width, height = cut_clips(row["path"], spans, out_paths, cfg, num_frames)
    source = row.get("source") if not is_missing(row.get("source")) else (row.get("url") or row["path"])
    clips = []
    for k, ((start, end), count, path) in enumerate(zip(spans, counts, out_paths)):
        parent = {key: value for key, value in row.items() if key not in ("codec", "pix_fmt")}
        clips.append({
            **parent,
            "id": f"{row['id']}_{k:04d}",
            "path": str(path),
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
        })
    return clips
