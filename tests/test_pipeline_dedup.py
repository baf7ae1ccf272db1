"""dedup: perceptual hashes of sampled frames, grouped over the whole manifest without all-pairs comparison."""

import time

import av
import numpy as np
import pytest

from data_pipeline.config import DedupConfig, PipelineConfig, RunnerConfig
from data_pipeline.dedup import find_groups
from data_pipeline.pipeline import run_one
from opensora.data.manifest import read_manifest
from tools.bench_pipeline import make_transition_video

pytest.importorskip("imagehash")
SERIAL = RunnerConfig(workers=0, progress=False)


def reencode(src, dst, size=None, crf=30):
    """A copy of ``src`` decoded and encoded again (another crf; resized when ``size`` is given)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream_in = inp.streams.video[0]
        width, height = size or (stream_in.width, stream_in.height)
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "ultrafast"}
        for frame in inp.decode(stream_in):
            rgb = frame.to_ndarray(width=width, height=height, format="rgb24")
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_reencoded_and_resized_copies_are_grouped_and_one_kept(tmp_path):
    for seed, name in enumerate(["a", "b", "c"]):
        make_transition_video(tmp_path / f"{name}.mp4", "cut", [48], size=(320, 180), seed=seed)
    reencode(tmp_path / "a.mp4", tmp_path / "a_crf.mp4", crf=34)
    reencode(tmp_path / "a.mp4", tmp_path / "a_small.mp4", size=(160, 90))
    rows = [("a_small", 160 * 90), ("a_crf", 320 * 180), ("b", 320 * 180), ("a", 320 * 180), ("c", 320 * 180)]
    (tmp_path / "in.csv").write_text("id,path,duration,resolution\n" + "".join(
        f"{name},{tmp_path / (name + '.mp4')},2.0,{pixels}\n" for name, pixels in rows))
    summary = run_one("dedup", DedupConfig(), tmp_path / "in.csv", tmp_path / "d.parquet", SERIAL)
    assert summary.done == 5
    df = read_manifest(tmp_path / "d.parquet", usable_only=False).set_index("id")
    # The full-size copies tie on duration and size: the smaller id is kept; the half-size copy is a duplicate.
    assert df.loc["a", "dedup_status"] == "done" and df.loc[["b", "c"], "dedup_status"].eq("done").all()
    for dup in ("a_crf", "a_small"):
        assert df.loc[dup, "dedup_status"] == "rejected" and df.loc[dup, "dedup_error"] == "duplicate of a"
    assert df.loc[["a", "a_crf", "a_small"], "dedup_group"].eq("a").all()
    assert df.loc["b", "dedup_group"] == "b" and df.loc["c", "dedup_group"] == "c"
    assert len(read_manifest(tmp_path / "d.parquet")) == 3  # usable rows: one per group
    # A re-run takes the rows from the journal and groups again, with the same result.
    run_one("dedup", DedupConfig(), tmp_path / "in.csv", tmp_path / "d.parquet", SERIAL)
    again = read_manifest(tmp_path / "d.parquet", usable_only=False).set_index("id")
    assert again["dedup_status"].equals(df["dedup_status"])


def test_grouping_finds_every_pair_within_the_distance_without_all_pairs():
    rng = np.random.default_rng(0)
    n, bits = 50_000, 256
    sigs = rng.integers(0, 2, (n, bits), dtype=np.uint8)
    # Plant copies 10 bits away, the flips spread over different 16-bit bands (the hardest case for banding).
    planted = rng.choice(n, 200, replace=False)
    copies = sigs[planted].copy()
    for row in copies:
        flip = rng.choice(16, 10, replace=False) * 16 + rng.integers(0, 16, 10)
        row[flip] ^= 1
    allsigs = np.concatenate([sigs, copies])
    hexes = [bytes(np.packbits(s)).hex() for s in allsigs]
    start = time.perf_counter()
    groups = find_groups(hexes, max_distance=10)
    elapsed = time.perf_counter() - start
    assert all(groups[n + k] == groups[p] for k, p in enumerate(planted))
    assert len(set(groups)) == n  # random signatures are ~128 bits apart: nothing else is grouped
    assert elapsed < 60, elapsed  # all pairs would be 1.25e9 comparisons


def test_dedup_settings_are_checked():
    with pytest.raises(ValueError, match="max_distance"):
        DedupConfig(num_frames=2, max_distance=8)
    assert "dedup" in PipelineConfig(input="x", work_dir="w", stages=["probe", "split", "filter", "dedup"]).stages


def test_bench_times_text_filter_and_dedup_per_clip():
    pytest.importorskip("rapidocr_onnxruntime")
    from tools.bench_pipeline import main as bench

    out = bench(["--curation", "--clips", "2"])
    assert [r["clips"] for r in out["rows"]] == [2, 2, 2]
    assert all(r["cpu_s_per_clip"] > 0 for r in out["rows"])
