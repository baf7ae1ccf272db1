"""split.mode=reference: rows that point into their source give the frames an encoded clip of the same shot holds.

One source with three shots (moving squares) is split twice with the same settings, re-timed (24 -> 12 fps) and
shrunk (short_side), once encoding clips and once writing reference rows. Through the training dataset and
through the latent cache (an identity autoencoder, so the cache holds the pixels) each reference row must give
the same frames as its clip: frame for frame the nearest of the clip's frames, and within H.264 tolerance.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from data_helpers import damage, make_video
from data_pipeline.config import CaptionConfig, FilterConfig, SplitConfig
from data_pipeline.caption import caption_row, read_row_frames
from data_pipeline.filter import filter_clip
from data_pipeline.rows import Reject
from data_pipeline.split import split
from opensora.data.dataset import DataConfig, VideoDataset, resize_center_crop
from opensora.data.latent_cache import CachedLatentDataset, encoder_identity, precompute
from opensora.data.manifest import SourceSpan, read_manifest, source_span, write_manifest
from opensora.data.video_io import read_video
from opensora.models.text_encoder import T5TextEncoder, make_tiny_t5
from opensora.models.vae import IdentityAutoencoder
from opensora.utils import file_sha256

# Mean |difference| in [-1, 1] units between a reference sample and the encoded clip's (crf 18, and the clip
# was resized twice: short_side, then the bucket). Measured 0.006-0.008; the clip's next frame is 0.022-0.026
# away, so an off-by-one frame fails.
TOLERANCE = 0.015


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    source = tmp / "v.mp4"
    make_video(source, [40, 52, 36], fps=24, size=(128, 96), gop=250)
    common = dict(min_clip_s=1.0, max_clip_s=0, target_fps=12, short_side=48)
    rows = {}
    for mode in ("encode", "reference"):
        cfg = SplitConfig(out_dir=str(tmp / mode), mode=mode, **common)
        rows[mode] = split({"id": "v", "path": str(source)}, cfg)
        write_manifest(pd.DataFrame(rows[mode]), tmp / f"{mode}.parquet")
    return tmp, source, rows


def _data_cfg(tmp, mode, **kw) -> DataConfig:
    return DataConfig(manifest=str(tmp / f"{mode}.parquet"), num_frames=4, frame_interval=2, image_size=(48, 64),
                      num_workers=0, **kw)


def test_split_reference_rows_describe_the_encoded_clips(both):
    tmp, source, rows = both
    enc, ref = rows["encode"], rows["reference"]
    assert len(enc) == len(ref) == 3 and not (tmp / "reference").exists()  # nothing written in reference mode
    for e, r in zip(enc, ref):
        for key in ("id", "num_frames", "fps", "height", "width", "start_frame", "end_frame", "start_time", "end_time"):
            assert e[key] == r[key], key
        assert r["path"] == str(source) and r["split_mode"] == "reference" and r["source_fps"] == 24
        assert r["sha256"] == file_sha256(source) and e["sha256"] == file_sha256(e["path"])
    # Read back from the manifest, a reference row has its span; an encoded one has none.
    df = read_manifest(tmp / "reference.parquet")
    spans = [source_span(row) for row in df.itertuples(index=False)]
    assert spans[0] == SourceSpan(0, 40, 24.0, 12.0)
    assert all(source_span(row) is None for row in read_manifest(tmp / "encode.parquet").itertuples(index=False))


def test_source_indices_follow_the_encoders_frame_dropping():
    assert SourceSpan(10, 20, 24.0, 24.0).source_indices([0, 3, 9]).tolist() == [10, 13, 19]
    assert SourceSpan(10, 20, 24.0, 12.0).source_indices([0, 1, 4]).tolist() == [10, 12, 18]
    # 30000/1001 -> 24: kept offsets are those where floor(o * 24 / 29.97) steps (split._keep)
    from fractions import Fraction

    from data_pipeline.split import _keep
    src, out = Fraction(30000, 1001), Fraction(24)
    kept = [o for o in range(300) if _keep(o, src, out)]
    assert SourceSpan(0, 300, float(src), 24.0).source_indices(range(len(kept))).tolist() == kept
    with pytest.raises(IndexError):
        SourceSpan(10, 20, 24.0, 24.0).source_indices([10])


@pytest.mark.parametrize("random_start", [False, True])
def test_dataset_reads_the_same_frames_from_a_reference_row(both, random_start):
    tmp, _, _ = both
    enc, ref = (VideoDataset(_data_cfg(tmp, m, random_start=random_start), seed=3) for m in ("encode", "reference"))
    assert enc.frame_counts == ref.frame_counts and enc.bucket_keys == ref.bucket_keys
    assert ref.spans[1] is not None and enc.spans[1] is None
    for i in range(len(enc)):
        indices = enc.frame_indices(i)
        assert ref.frame_indices(i).tolist() == indices.tolist()
        a, b = enc.load(i), ref.load(i)  # (3, T, H, W)
        assert a.shape == b.shape == (3, 4, 48, 64)
        assert (a - b).abs().mean() < TOLERANCE
        # Frame for frame, the reference sample's nearest frame of the whole clip is the one it should be.
        clip = resize_center_crop(read_video(enc.paths[i]), (48, 64))  # (3, N, H, W)
        dist = (b[:, :, None] - clip[:, None]).abs().mean(dim=(0, 3, 4))  # (T, N)
        assert dist.argmin(dim=1).tolist() == indices.tolist()


def test_latent_cache_keys_reference_spans_and_holds_the_same_frames(both, tmp_path):
    tmp, _, _ = both
    te = T5TextEncoder.from_pretrained(make_tiny_t5(tmp_path / "t5", seed=0), max_length=8)
    vae = IdentityAutoencoder()
    cache = tmp_path / "cache"
    cached = {}
    for mode in ("encode", "reference"):
        cfg = _data_cfg(tmp, mode, cache_dir=str(cache))
        report = precompute(cfg, vae, te, cache, progress=False)  # also checks each sha256 against its file
        assert (report.written, report.failed) == (3, [])
        cached[mode] = CachedLatentDataset(cfg, encoder_identity(vae, te))
    entries = sorted(p.name for p in cache.rglob("*.safetensors"))
    assert len(entries) == 6  # three shots of one source file: three keys, none shared with the clips
    ref_videos = VideoDataset(_data_cfg(tmp, "reference"))
    for i in range(3):
        a, b = cached["encode"][i]["latent"], cached["reference"][i]["latent"]
        assert (a - b).abs().mean() < TOLERANCE
        assert torch.equal(b, ref_videos.load(i, random_start=False))
    # Another span of the same source is another entry: a changed end_frame misses.
    df = read_manifest(tmp / "reference.parquet")
    df.loc[0, "end_frame"] = int(df.loc[0, "end_frame"]) - 2
    write_manifest(df, tmp_path / "moved.parquet")
    moved = CachedLatentDataset(replace(_data_cfg(tmp, "reference", cache_dir=str(cache)),
                                        manifest=str(tmp_path / "moved.parquet")),
                                encoder_identity(vae, te), max_leading_misses=0)
    assert moved[0] is None and moved[1] is not None


def test_filter_and_caption_read_reference_rows(both):
    tmp, _, rows = both
    fcfg = FilterConfig(num_samples=4, sample_width=64, max_bad_frac=1.0)  # flat backgrounds read as blank
    for e, r in zip(rows["encode"], rows["reference"]):
        fe, fr = filter_clip(dict(e), fcfg)[0], filter_clip(dict(r), fcfg)[0]
        assert fe["motion"] == pytest.approx(fr["motion"], rel=0.25)
        assert fe["black_frac"] == fr["black_frac"] and fe["blank_frac"] == fr["blank_frac"]
        ccfg = CaptionConfig(num_frames=3, frame_positions=[0.2, 0.5, 0.8])
        fe, fr = read_row_frames(e, ccfg), read_row_frames(r, ccfg)
        assert len(fe) == len(fr) == 3
        assert all(a.shape == b.shape for a, b in zip(fe, fr))
        # decord decodes the source at the clip's size with its own scaler: ~2/255 of colour shift (0.017)
        for a, b in zip(fe, fr):
            small = resize_center_crop(b[None], a.shape[:2])
            big = resize_center_crop(a[None], a.shape[:2])
            assert (small - big).abs().mean() < 2 * TOLERANCE
    captioned = caption_row(dict(rows["reference"][0], text="a square"), CaptionConfig())
    assert captioned[0]["text"] == "a square"


def test_a_damaged_source_is_not_referenced(tmp_path):
    make_video(tmp_path / "v.mp4", [60, 60, 36], fps=24, size=(64, 48), gop=24)
    damage(tmp_path / "v.mp4", tmp_path / "d.mp4", range(62, 64))
    with pytest.raises(Reject, match="damaged source .*mode=encode"):
        split({"id": "d", "path": str(tmp_path / "d.mp4")}, SplitConfig(out_dir=str(tmp_path), mode="reference"))


def test_bench_pipeline_times_split_in_reference_mode(tmp_path):
    from tools.bench_pipeline import main as bench

    out = bench(["--seconds", "1.2", "--videos", "1", "--modes", "reference", "--sizes", "360"])
    rows = {row["stage"]: row for row in out["stages"]}
    assert rows["split reference, 360p rows"]["x_realtime_per_cpu_s"] > 0
    assert "filter (on the 360p reference rows)" in rows
    assert not any(name.startswith("split, ") for name in rows)  # no encode run asked for
