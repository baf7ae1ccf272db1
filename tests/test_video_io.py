"""Video I/O: PyAV H.264 writer and decord reader round trip, atomic writes, clear errors on broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from opensora.data.video_io import VideoReadError, VideoWriter, read_video, tensor_to_frames, video_info, write_video


def smooth_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Slowly varying colour gradients: H.264 keeps them within a few grey levels, unlike noise."""
    t = np.arange(num_frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    red = 128 + 60 * np.sin(x / 9 + t / 4) + 0 * y
    green = 128 + 60 * np.cos(y / 7 - t / 5) + 0 * x
    blue = 110 + 50 * np.sin((x + y) / 11) + 0 * t
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)  # (T, H, W, 3)


@pytest.mark.parametrize("height,width", [(32, 64), (16, 16)])  # 16 wide takes the PyAV fallback path
def test_round_trip(tmp_path: Path, height: int, width: int):
    frames = smooth_frames(10, height, width)
    path = write_video(tmp_path / "clip.mp4", frames, fps=24)
    assert path == tmp_path / "clip.mp4"
    out = read_video(path)
    assert out.shape == frames.shape and out.dtype == np.uint8
    err = np.abs(out.astype(np.int16) - frames.astype(np.int16))
    assert err.mean() < 3.0, err.mean()
    # Frames must come back in order: each decoded frame is closest to its own source frame.
    dist = np.abs(out[:, None].astype(np.int16) - frames[None].astype(np.int16)).mean(axis=(2, 3, 4))
    assert (dist.argmin(axis=1) == np.arange(len(frames))).all()


def test_frame_indices_any_order(tmp_path: Path):
    frames = smooth_frames(12, 32, 64)
    path = write_video(tmp_path / "clip.mp4", frames, fps=24)
    everything = read_video(path)
    picked = read_video(path, [11, 0, 5, 5])
    assert picked.shape == (4, 32, 64, 3)
    np.testing.assert_array_equal(picked, everything[[11, 0, 5, 5]])
    with pytest.raises(IndexError, match="clip.mp4"):
        read_video(path, [0, 12])


def test_video_info_and_fractional_fps(tmp_path: Path):
    path = write_video(tmp_path / "ntsc.mp4", smooth_frames(9, 32, 48), fps=30000 / 1001)
    info = video_info(path)
    assert info["num_frames"] == 9
    assert (info["height"], info["width"]) == (32, 48)
    assert info["fps"] == pytest.approx(29.97, abs=0.01)


def test_odd_size_is_padded_by_edge(tmp_path: Path):
    frames = smooth_frames(4, 33, 47)
    out = read_video(write_video(tmp_path / "odd.mp4", frames, fps=8))
    assert out.shape == (4, 34, 48, 3)
    err = np.abs(out[:, :33, :47].astype(np.int16) - frames.astype(np.int16))
    assert err.mean() < 3.0
    # The added row and column repeat the last real ones.
    assert np.abs(out[:, 33, :47].astype(np.int16) - frames[:, 32].astype(np.int16)).mean() < 4.0
    assert np.abs(out[:, :33, 47].astype(np.int16) - frames[:, :, 46].astype(np.int16)).mean() < 4.0


def test_torch_input_and_tensor_to_frames(tmp_path: Path):
    x = torch.linspace(-1.2, 1.2, 3 * 2 * 16 * 16).reshape(3, 2, 16, 16)  # (C, T, H, W), partly out of range
    frames = tensor_to_frames(x)
    assert frames.shape == (2, 16, 16, 3) and frames.dtype == np.uint8
    assert frames[0, 0, 0, 0] == 0 and frames[-1, -1, -1, -1] == 255  # clipped at both ends
    # 0.0 maps to mid grey, and channel c of the tensor lands in the last axis.
    assert tensor_to_frames(torch.zeros(3, 1, 2, 2)).max() == 128
    np.testing.assert_array_equal(frames[..., 1], tensor_to_frames(x[[1, 1, 1]])[..., 0])
    path = write_video(tmp_path / "t.mp4", torch.from_numpy(frames), fps=4)
    assert read_video(path).shape == (2, 16, 16, 3)


def test_atomic_write_leaves_no_temp_files(tmp_path: Path):
    frames = smooth_frames(3, 16, 32)
    write_video(tmp_path / "a.mp4", frames, fps=8)
    write_video(tmp_path / "a.mp4", frames[::-1].copy(), fps=8)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]
    # A failing write (bad shape is caught before any file; an unknown container fails inside FFmpeg)
    # must leave neither a target nor a temp file behind.
    with pytest.raises(ValueError):
        write_video(tmp_path / "b.mp4", frames[..., :2], fps=8)
    with pytest.raises(Exception):
        write_video(tmp_path / "c.notacontainer", frames, fps=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]


def test_video_writer_streams_scales_and_drops_aborted_files(tmp_path: Path):
    """The one encoder (write_video and the split stage): frames one at a time, scaled to the output size;
    an abort or an exception inside ``with`` leaves neither the file nor a temp file."""
    frames = smooth_frames(6, 32, 48)
    with VideoWriter(tmp_path / "s.mp4", 8, 24, 16) as writer:
        for frame in frames:
            writer.write(frame)
    assert read_video(tmp_path / "s.mp4").shape == (6, 16, 24, 3)
    with pytest.raises(RuntimeError, match="stop"):
        with VideoWriter(tmp_path / "t.mp4", 8, 48, 32) as writer:
            writer.write(frames[0])
            raise RuntimeError("stop")
    writer = VideoWriter(tmp_path / "u.mp4", 8, 48, 32)
    writer.write(frames[0])
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.mp4"]
    with pytest.raises(ValueError, match="even"):
        VideoWriter(tmp_path / "o.mp4", 8, 33, 32)


def test_truncated_and_missing_files_name_the_path(tmp_path: Path):
    good = write_video(tmp_path / "good.mp4", smooth_frames(8, 32, 64), fps=8)
    data = good.read_bytes()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoReadError, match="broken.mp4"):
        read_video(broken)
    with pytest.raises(VideoReadError, match="broken.mp4"):
        video_info(broken)
    with pytest.raises(FileNotFoundError, match="nothere.mp4"):
        read_video(tmp_path / "nothere.mp4")


def test_bad_frames_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 16, 16, 3), np.float32), fps=8)
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "f.mp4", np.zeros((0, 16, 16, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="crf"):
        write_video(tmp_path / "f.mp4", np.zeros((1, 16, 16, 3), np.uint8), fps=8, crf=60)
