"""Synthetic videos for the data-pipeline tests (PyAV, tiny, made inside the test)."""

from __future__ import annotations

import contextlib
import threading
from http.server import ThreadingHTTPServer

from pathlib import Path

import av
import numpy as np

# Distinct hues so that every hard cut is an obvious HSV jump for ContentDetector.
PALETTE = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 60, 200), (40, 210, 210)]


def shot_frames(n: int, size: tuple[int, int], shot: int, moving: bool = True) -> np.ndarray:
    """(n, H, W, 3) uint8: a flat colour per shot with a bright square sliding across (some motion)."""
    width, height = size
    base = np.array(PALETTE[shot % len(PALETTE)], dtype=np.uint8)
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    frames[:] = base
    side = max(4, height // 4)
    for t in range(n):
        x = (t * 2) % max(1, width - side) if moving else width // 3
        frames[t, height // 3 : height // 3 + side, x : x + side] = 255 - base
    return frames


def make_video(path: str | Path, shot_lengths: list[int], fps: int = 24, size: tuple[int, int] = (64, 48),
               moving: bool = True, gop: int = 250) -> list[int]:
    """Writes an H.264 mp4 with hard cuts between shots of the given lengths.

    Returns:
        the cut frames (the first frame of every shot after the first).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        # A long GOP puts the cuts between keyframes, so only a frame-accurate cutter gets them right.
        stream.options = {"preset": "ultrafast", "crf": "20", "g": str(gop), "sc_threshold": "0"}
        for shot, n in enumerate(shot_lengths):
            for img in shot_frames(n, size, shot, moving):
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return [int(c) for c in np.cumsum(shot_lengths)[:-1]]


def make_black_video(path: str | Path, n: int = 48, fps: int = 24, size: tuple[int, int] = (64, 48)) -> None:
    """An all-black H.264 mp4 (for the black/static filters)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for _ in range(n):
            frame = av.VideoFrame.from_ndarray(np.zeros((size[1], size[0], 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def truncate(src: str | Path, dst: str | Path, fraction: float = 0.5) -> None:
    """Copies the first ``fraction`` of a file's bytes (a download cut off half-way)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])


def flaky_stage(row: dict, cfg: dict) -> list[dict]:
    """A test stage: fails rows whose id is in ``cfg['fail']``, kills its process for ``cfg['crash']``, never
    returns for ``cfg['hang']`` (a hung decoder), sleeps ``cfg['sleep']`` seconds, and otherwise returns the row
    with ``seen=1``."""
    import os
    import time

    if row["id"] in cfg.get("crash", ()):
        os._exit(3)
    if row["id"] in cfg.get("hang", ()):
        while True:
            time.sleep(3600)
    time.sleep(cfg.get("sleep", 0.0))
    if row["id"] in cfg.get("fail", ()):
        raise ValueError(f"bad row {row['id']}")
    return [{**row, "seen": 1}]


def first_frame_rgb(path: str | Path, index: int) -> np.ndarray:
    """Mean RGB of frame ``index`` of a video (PyAV), as float (3,)."""
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == index:
                return frame.to_ndarray(format="rgb24").reshape(-1, 3).mean(axis=0)
    raise IndexError(f"{path} has no frame {index}")


def damage(src: str | Path, dst: str | Path, frames: range, seed: int = 0) -> None:
    """Copies a video with the bytes of the packets of ``frames`` (decode order) overwritten by noise, as an
    interrupted copy leaves them. PyAV writes mp4 without faststart (moov after mdat), so the index stays
    intact and only those packets are hit."""
    data = bytearray(Path(src).read_bytes())
    with av.open(str(src)) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    start, end = packets[frames.start][0], sum(packets[frames.stop - 1])
    assert end <= data.find(b"moov"), "the damage would hit the index"
    data[start:end] = np.random.default_rng(seed).integers(0, 256, end - start, dtype=np.uint8).tobytes()
    Path(dst).write_bytes(bytes(data))


@contextlib.contextmanager
def local_http_server(handler):
    """Serves ``handler`` (a BaseHTTPRequestHandler class) on 127.0.0.1 in a thread; yields its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


IMAGENET_CLASSES = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus"}


def make_imagenet(root: str | Path, per_class: int = 2, size: tuple[int, int] = (48, 40)) -> Path:
    """ILSVRC's layout in little: ``LOC_synset_mapping.txt``, ``train/<wnid>/<wnid>_N.JPEG`` (noise JPEGs of
    ``size`` (w, h)), and one validation image in ``val/`` with its ``LOC_val_solution.csv`` line."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(0)
    (root / "val").mkdir(parents=True, exist_ok=True)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in IMAGENET_CLASSES.items()))
    for wnid in IMAGENET_CLASSES:
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(1, per_class + 1):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / wnid / f"{wnid}_{i}.JPEG", format="JPEG")
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        root / "val" / "ILSVRC2012_val_00000001.JPEG", format="JPEG")
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n"
                                               "ILSVRC2012_val_00000001,n01443537 3 4 40 30 n01443537 1 1 9 9 \n")
    return root
