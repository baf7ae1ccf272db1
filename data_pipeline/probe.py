"""probe: duration, fps, frame count, size and codec of each video (PyAV).

A file that is missing, empty, not a video, truncated or without a decodable frame raises, and the
runner records the reason; nothing here can stop the run.
"""

from __future__ import annotations

import os
from fractions import Fraction

import av

from data_pipeline.config import ProbeConfig
from data_pipeline.rows import Row, is_missing
from opensora.data.manifest import is_image


class ProbeError(RuntimeError):
    """The file is not a usable video; the message says why."""


# Leading bytes of common files that are not videos, so the reason names what the file is. The `filetype`
# package would do this but is not a dependency here; these few cover what ends up in video folders by
# mistake (stills, documents, archives, an HTML error page saved under a video's name). Audio is left to the
# container probe: it opens and says "no video stream", which is already clear.
_NOT_VIDEO_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "PNG image data"),
    (0, b"\xff\xd8\xff", "JPEG image data"),
    (0, b"BM", "BMP image data"),
    (0, b"II*\x00", "TIFF image data"),
    (0, b"MM\x00*", "TIFF image data"),
    (8, b"WEBP", "WebP image data"),
    (0, b"%PDF-", "PDF document"),
    (0, b"PK\x03\x04", "Zip archive data"),
    (0, b"\x1f\x8b", "gzip compressed data"),
    (0, b"7z\xbc\xaf\x27\x1c", "7-zip archive data"),
    (0, b"Rar!", "RAR archive data"),
)
# Demuxers that read one still image (FFmpeg's image2 family): a file they open is a picture, whatever its name.
_IMAGE_DEMUXERS = ("image2", "image2pipe")
# A demuxer with this flag (FFmpeg's AVFMT_NOTIMESTAMPS: raw H.264/HEVC/MPEG video without a container) has no
# time stamps: the frame rate is a guess (25 when the stream does not say) and no reader can seek by time.
_AVFMT_NOTIMESTAMPS = 0x80


def video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The video stream a file is read by: FFmpeg's best one (``av_find_best_stream``, the one decord reads, so
    reference rows and the readers of clips agree on it), never a cover image (an audio file's attached picture).

    Raises ProbeError naming what the file holds instead when there is none.
    """
    best = container.streams.best("video")
    if best is None or best.disposition & av.stream.Disposition.attached_pic:
        moving = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if moving:
            return moving[0]
        if container.streams.video:
            raise ProbeError("no video stream (only a cover image: an audio file)")
        if not len(container.streams):  # FFmpeg lists no track without samples
            raise ProbeError("no video stream (no streams at all: an empty recording)")
        raise ProbeError("no video stream")
    return best


def sniff(path: str) -> str | None:
    """What the first bytes say the file is (``PNG image data``, ``HTML document``, ``text``...), or None
    when they look like no known non-video format."""
    with open(path, "rb") as f:
        head = f.read(512)
    for offset, magic, what in _NOT_VIDEO_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            if magic == b"BM" and len(head) < 26:  # two bytes alone are too common to name a BMP
                continue
            return what
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "HTML document"
    if head and all(b in b"\t\n\r" or 32 <= b < 127 or b >= 128 for b in head):
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as err:
            if err.start < len(head) - 3:  # a multi-byte character cut by the 512-byte window is still text
                return None
        return "text"
    return None


def _mp4_index_problem(path: str) -> str | None:
    """Why an MP4/MOV file that FFmpeg cannot open has no usable index, from its top-level boxes (size + type
    headers, ISO/IEC 14496-12), or None. Most files written without ``faststart`` keep the index (``moov``)
    after the media data, so a download or recording cut off early loses it, and FFmpeg says only 'Invalid
    data found when processing input'."""
    size = os.path.getsize(path)
    boxes, offset = [], 0
    with open(path, "rb") as f:
        while offset + 8 <= size:
            f.seek(offset)
            header = f.read(16)
            length, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if length == 1 and len(header) == 16:
                length = int.from_bytes(header[8:16], "big")
            elif length == 0:
                length = size - offset
            if length < 8 or not kind.isascii():
                break  # not a box: leave it to FFmpeg's message
            boxes.append((kind.decode("ascii", "replace"), offset + length > size))
            offset += length
    if not boxes or boxes[0][0] != "ftyp":
        return None
    last, cut = boxes[-1]
    if not any(kind == "moov" for kind, _ in boxes):
        ends = f", the file ends inside its '{last}' box" if cut else ""
        return f"truncated MP4: no index (moov box, written after the media data){ends}"
    if last == "moov" and cut:
        return "truncated MP4: the file ends inside its index (moov box)"
    return None


def _av_reason(err: Exception) -> str:
    """PyAV raises FFmpeg's error codes as OSError subclasses (seeking an unseekable stream gives
    ``PermissionError: [Errno 1] Operation not permitted``); the class name is noise, the message is not."""
    return str(getattr(err, "strerror", None) or err)


def _first_frame(container: av.container.InputContainer, stream: av.video.stream.VideoStream
                 ) -> tuple[av.VideoFrame | None, int]:
    """The first frame that decodes, and how many damaged packets came before it: a damaged first keyframe
    costs its GOP, not the video (split decodes past damage the same way)."""
    damaged = 0
    for packet in container.demux(stream):
        try:
            for frame in stream.decode(packet):
                return frame, damaged
        except av.error.InvalidDataError:
            damaged += 1
    return None, damaged


def _decode_first(path: str) -> tuple[av.VideoFrame | None, int]:
    """``_first_frame`` of a fresh open: seeking back is not possible in every input (FFmpeg says
    'Operation not permitted' for a pipe-like one), reading from the start again is."""
    try:
        with av.open(path) as container:
            return _first_frame(container, video_stream(container))
    except av.error.FFmpegError as err:
        raise ProbeError(f"first frame does not decode: {_av_reason(err)}") from err


def check_file(path: str) -> None:
    """Raises :class:`ProbeError` for a path that is no file or an empty one (before any decoder sees it)."""
    if not os.path.isfile(path):
        raise ProbeError(f"no such file: {path}")
    if os.path.getsize(path) == 0:
        raise ProbeError("empty file (0 bytes)")


def probe_video(path: str, cfg: ProbeConfig) -> dict:
    """Reads a video's properties.

    Args:
        path: the video file.
        cfg: whether to count frames by demuxing and to decode the first frame.
    Returns:
        ``num_frames, fps, height, width, aspect_ratio, resolution, duration, codec, pix_fmt, rotation``
        (degrees counter-clockwise that the file's display matrix turns the picture; the size is the size as
        shown, so a phone video held upright is taller than wide).
    """
    check_file(path)
    what = sniff(path)
    if what is not None and what != "text":
        raise ProbeError(f"not a video container ({what})")
    try:
        container = av.open(path)
    except av.error.FFmpegError as err:
        if what is not None:
            raise ProbeError(f"not a video container ({what})") from err
        missing = _mp4_index_problem(path)
        if missing is not None:
            raise ProbeError(missing) from err
        raise ProbeError(f"not a readable container: {_av_reason(err)}") from err
    with container:
        demuxer = container.format.name
        if demuxer in _IMAGE_DEMUXERS or demuxer.endswith("_pipe"):
            codec = demuxer[: -len("_pipe")] if demuxer.endswith("_pipe") else container.streams.video[0].codec_context.name
            raise ProbeError(f"not a video container ({codec.upper()} image data)")
        if container.format.flags & _AVFMT_NOTIMESTAMPS and container.streams.video:
            raise ProbeError(f"raw {container.streams.video[0].codec_context.name} stream without a container (no time "
                             "stamps, the frame rate unknown): remux it, e.g. ffmpeg -i IN -c copy OUT.mp4")
        stream = video_stream(container)
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0:
            raise ProbeError("unknown frame rate")
        fps = Fraction(rate)
        declared = int(stream.frames or 0)
        counted = 0
        if cfg.count_frames:
            try:
                for packet in container.demux(stream):
                    if packet.size:  # the final flush packet is empty
                        counted += 1
            except av.error.FFmpegError as err:
                raise ProbeError(f"truncated or corrupt after {counted} packets: {_av_reason(err)}") from err
            if declared and counted < declared:
                raise ProbeError(f"truncated: header says {declared} frames, {counted} readable")
        num_frames = counted or declared
        if num_frames < max(cfg.min_frames, 1):
            raise ProbeError(f"{num_frames} frames (need >= {max(cfg.min_frames, 1)})")
        width, height = ctx.width, ctx.height
        rotation = 0
        if cfg.decode_check:
            frame, damaged = _decode_first(path)
            if frame is None:
                raise ProbeError(f"no decodable frame ({damaged} damaged packets)" if damaged else "no decodable frame")
            width, height, rotation = frame.width, frame.height, frame.rotation
        if not width or not height:
            raise ProbeError("unknown frame size")
        if rotation % 180:  # shown on its side (a phone held upright): the size as shown, as split's clips have it
            width, height = height, width
        return {
            "num_frames": num_frames,
            "fps": float(fps),
            "height": height,
            "width": width,
            "aspect_ratio": height / width,
            "resolution": height * width,
            "duration": float(num_frames / fps),
            "codec": ctx.name,
            "pix_fmt": ctx.pix_fmt,
            "rotation": rotation,
        }


def probe_image(path: str, cfg: ProbeConfig) -> dict:
    """An image's properties as the trainer reads it (PIL, one frame, its stored size): the keys of
    :func:`probe_video`, with ``num_frames`` 1 and no frame rate or duration. ``cfg.decode_check`` decodes it."""
    from PIL import Image, UnidentifiedImageError

    check_file(path)
    try:
        with Image.open(path) as img:
            width, height, kind, mode = img.width, img.height, img.format, img.mode
            if cfg.decode_check:
                img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:  # PIL's decoders raise all of these
        raise ProbeError(f"not a readable image: {err}") from err
    return {"num_frames": 1, "fps": None, "height": height, "width": width, "aspect_ratio": height / width,
            "resolution": height * width, "duration": None, "codec": (kind or "").lower(), "pix_fmt": mode,
            "rotation": 0}


def probe(row: Row, cfg: ProbeConfig) -> list[Row]:
    """Stage function: adds the video's properties to the row (``path`` must be set). A path with an image's
    extension (the trainer's rule, ``opensora.data.manifest.is_image``) is probed as an image (:func:`probe_image`);
    a still under a video's name stays a failure (``not a video container (PNG image data)``)."""
    if is_missing(row.get("path")):
        raise ProbeError("row has no path (run download first?)")
    info = probe_image(row["path"], cfg) if is_image(row["path"]) else probe_video(row["path"], cfg)
    out = {**row, **info}
    if is_missing(out.get("source")):
        out["source"] = row.get("url") or row["path"]
    return [out]
