"""split on sources with damaged bytes (an interrupted copy): good shots survive, no clip holds damage."""

import av
import numpy as np
import pytest

from data_helpers import damage, make_video
from data_pipeline.config import SplitConfig
from data_pipeline.rows import Reject
from data_pipeline.split import split
from opensora.config import ConfigError, load_config


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32)


def test_damaged_middle_keeps_the_good_shots(tmp_path):
    # Shots [0, 48) [48, 108) [108, 156); a keyframe every 12 frames; packets 62-63 overwritten, so frames
    # 62..71 are lost or predicted from lost ones and the clean picture is back at the keyframe 72.
    cuts = make_video(tmp_path / "v.mp4", [48, 60, 48], fps=24, size=(96, 64), gop=12)
    damage(tmp_path / "v.mp4", tmp_path / "d.mp4", range(62, 64))
    cfg = SplitConfig(out_dir=str(tmp_path / "clips"), min_clip_s=0.5, max_clip_s=0)
    clips = split({"id": "d", "path": str(tmp_path / "d.mp4")}, cfg)

    spans = [(c["start_frame"], c["end_frame"]) for c in clips]
    assert cuts == [48, 108]
    assert spans == [(0, 48), (48, 62), (72, 108), (108, 156)], spans  # the damaged shot is cut at the damage
    assert all(c["split_damaged_packets"] == 2 and c["damaged_packets"] == 0 for c in clips)
    # Every clip frame is the clean source frame (the x264 re-encode aside), none of the concealed smear.
    original = _frames(tmp_path / "v.mp4")
    for clip in clips:
        frames = _frames(clip["path"])
        assert len(frames) == clip["num_frames"] == clip["end_frame"] - clip["start_frame"]
        err = np.abs(frames - original[clip["start_frame"]:clip["end_frame"]]).mean(axis=(1, 2, 3))
        assert err.max() < 3, (clip["start_frame"], err.round(1))


def test_damage_at_the_start_and_mostly_damaged(tmp_path):
    make_video(tmp_path / "v.mp4", [48, 60, 48], fps=24, size=(96, 64), gop=12)
    # The first keyframe lost: nothing is clean before the next keyframe at 12.
    damage(tmp_path / "v.mp4", tmp_path / "head.mp4", range(0, 1))
    cfg = SplitConfig(out_dir=str(tmp_path / "clips"), min_clip_s=0.5, max_clip_s=0)
    clips = split({"id": "head", "path": str(tmp_path / "head.mp4")}, cfg)
    assert [(c["start_frame"], c["end_frame"]) for c in clips] == [(12, 48), (48, 108), (108, 156)]
    # Most packets overwritten: rejected with the reason, and no clip left behind.
    damage(tmp_path / "v.mp4", tmp_path / "most.mp4", range(10, 140))
    with pytest.raises(Reject, match=r"mostly damaged: \d+ of \d+ frames unusable, \d+ damaged packets") as err:
        split({"id": "most", "path": str(tmp_path / "most.mp4")}, cfg)
    assert err.value.updates["split_damaged_packets"] > 0
    assert not list((tmp_path / "clips").glob("most_*"))


def test_max_damaged_share_is_a_setting(tmp_path):
    make_video(tmp_path / "v.mp4", [48, 60, 48], fps=24, size=(96, 64), gop=12)
    damage(tmp_path / "v.mp4", tmp_path / "most.mp4", range(10, 140))
    # 130 of 156 frames unusable: rejected at the default 0.5, kept (the clean scraps) when the user allows 0.9
    cfg = SplitConfig(out_dir=str(tmp_path / "clips"), min_clip_s=0.5, max_clip_s=0, max_damaged_share=0.9)
    clips = split({"id": "most", "path": str(tmp_path / "most.mp4")}, cfg)
    assert clips and all(c["damaged_packets"] == 0 and c["split_damaged_packets"] > 0 for c in clips)
    assert load_config(SplitConfig, overrides=["max_damaged_share=0.25"]).max_damaged_share == 0.25
    with pytest.raises(ValueError, match="max_damaged_share must be in"):
        SplitConfig(max_damaged_share=1.5)
    with pytest.raises(ConfigError, match="max_damaged_shares"):  # a misspelt key is still refused
        load_config(SplitConfig, overrides=["max_damaged_shares=0.25"])
