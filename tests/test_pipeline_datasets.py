"""Public datasets' metadata as pipeline input (issue 27): each format's published layout, written here in a few
rows, read into clips; ``auto`` detection and its refusals; the ``select`` filters and their counts."""

import json
import math

import pandas as pd
import pytest

from data_pipeline.config import PipelineConfig, SelectConfig
from data_pipeline.datasets import dataset_input, detect_format, group_sources, read_dataset, select_clips
from opensora.config import ConfigError


def write_panda(path, rows):
    """Panda-70M's CSV: one row per source, list cells written as Python lists (its published files)."""
    pd.DataFrame([{"videoID": vid, "url": url, "timestamp": str([list(s) for s in spans]), "caption": str(caps),
                   "matching_score": str(scores)} for vid, url, spans, caps, scores in rows]).to_csv(path, index=False)
    return path


def make_files(tmp_path):
    files = {}
    files["panda70m"] = write_panda(tmp_path / "panda.csv", [
        ("AAA", "https://www.youtube.com/watch?v=AAA", [("0:00:01.000", "0:00:03.500"), ("0:01:00.000", "0:01:20.000")],
         ["a dog runs", "a cat sleeps"], [0.5, 0.3]),
        ("BBB", "https://www.youtube.com/watch?v=BBB", [("0:00:00.000", "0:00:02.000")], ["a car drives"], [0.47]),
    ])
    files["hdvg"] = tmp_path / "hdvg.json"
    files["hdvg"].write_text(json.dumps({"CCC": {
        "CCC.1_0": {"scene_id": 0, "title": "t", "url": "https://www.youtube.com/watch?v=CCC",
                    "span": ["00:00:02.000", "00:00:04.500"], "caption": "waves on a beach"},
        "CCC.2_0": {"scene_id": 1, "title": "t", "url": "https://www.youtube.com/watch?v=CCC",
                    "span": ["00:00:05.000", "00:00:06.000"], "caption": "a boat"}}}))
    files["internvid"] = tmp_path / "internvid.jsonl"
    files["internvid"].write_text("\n".join(json.dumps(r) for r in [
        {"YoutubeID": "DDD", "Start_timestamp": "00:00:01.500", "End_timestamp": "00:00:03.000",
         "Caption": "a man cooks", "Aesthetic_Score": 5.1, "UMT_Score": 0.41},
        {"YoutubeID": "DDD", "Start_timestamp": "00:00:10.000", "End_timestamp": "00:00:12.000",
         "Caption": "a man eats", "Aesthetic_Score": 4.2, "UMT_Score": 0.38}]) + "\n")
    files["webvid"] = tmp_path / "webvid.csv"
    pd.DataFrame([{"videoid": 1001, "contentUrl": "https://example.org/1001.mp4", "duration": "PT00H00M11S",
                   "page_dir": "051_100", "name": "Aerial view of a forest"},
                  {"videoid": 1002, "contentUrl": "https://example.org/1002.mp4", "duration": "PT00H00M31S",
                   "page_dir": "051_100", "name": "Timelapse, clouds"}]).to_csv(files["webvid"], index=False)
    files["openvid"] = tmp_path / "openvid.csv"
    pd.DataFrame([{"video": "x_1.mp4", "caption": "a bird flies", "aesthetic score": 5.5, "motion score": 3.1,
                   "temporal consistency score": 0.99, "camera motion": "static", "frame": 100, "fps": 25,
                   "seconds": 4.0}]).to_csv(files["openvid"], index=False)
    files["ucf101"] = tmp_path / "trainlist01.txt"
    files["ucf101"].write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nYoYo/v_YoYo_g25_c05.avi 101\n")
    return files


def test_each_format_maps_its_columns(tmp_path):
    files = make_files(tmp_path)
    panda = read_dataset(files["panda70m"], "panda70m")
    assert list(panda["text"]) == ["a dog runs", "a cat sleeps", "a car drives"]
    assert list(panda["clip_start_s"]) == [1.0, 60.0, 0.0] and list(panda["clip_end_s"]) == [3.5, 80.0, 2.0]
    assert list(panda["score"]) == [0.5, 0.3, 0.47] and panda["url"].iloc[0].endswith("v=AAA")
    hdvg = read_dataset(files["hdvg"], "hdvg")
    assert list(hdvg["clip_id"]) == ["CCC.1_0", "CCC.2_0"] and list(hdvg["clip_end_s"]) == [4.5, 6.0]
    assert hdvg["score"].isna().all()
    iv = read_dataset(files["internvid"], "internvid")
    assert list(iv["url"].unique()) == ["https://www.youtube.com/watch?v=DDD"]
    assert list(iv["score"]) == [0.41, 0.38] and list(iv["clip_start_s"]) == [1.5, 10.0]
    wv = read_dataset(files["webvid"], "webvid")
    assert list(wv["duration_s"]) == [11.0, 31.0] and wv["clip_start_s"].isna().all()
    assert list(wv["text"]) == ["Aerial view of a forest", "Timelapse, clouds"]
    ov = read_dataset(files["openvid"], "openvid")
    assert ov["path"].iloc[0] == str(tmp_path.resolve() / "x_1.mp4") and ov["score"].iloc[0] == 5.5
    ucf = read_dataset(files["ucf101"], "ucf101", root=str(tmp_path / "UCF-101"))
    assert list(ucf["text"]) == ["apply eye makeup", "yo yo"]
    assert ucf["path"].iloc[1] == str(tmp_path / "UCF-101" / "YoYo" / "v_YoYo_g25_c05.avi")


def test_auto_detects_each_format_and_refuses_unknown_or_ambiguous(tmp_path):
    files = make_files(tmp_path)
    for name, path in files.items():
        assert detect_format(path) == name
    unknown = tmp_path / "other.csv"
    pd.DataFrame([{"file": "a.mp4", "label": 3}]).to_csv(unknown, index=False)
    with pytest.raises(ConfigError, match=r"matches no dataset format; found \['file', 'label'\]"):
        detect_format(unknown)
    both = tmp_path / "both.csv"  # a table with Panda-70M's and OpenVid's columns at once
    pd.DataFrame([{"videoID": 1, "url": "u", "timestamp": "[]", "caption": "[]", "video": "v",
                   "aesthetic score": 1}]).to_csv(both, index=False)
    with pytest.raises(ConfigError, match="matches panda70m, openvid"):
        detect_format(both)


def test_broken_metadata_names_the_format(tmp_path):
    bad = write_panda(tmp_path / "p.csv", [("AAA", "u", [("0:00:01", "0:00:02")], ["a", "b"], [0.5])])
    with pytest.raises(ConfigError, match="not panda70m metadata.*1 timestamps, 2 captions"):
        read_dataset(bad, "panda70m")
    with pytest.raises(ValueError, match="input_format: unknown 'kinetics'"):
        PipelineConfig(input="x", work_dir="w", input_format="kinetics")


def test_select_filters_count_what_they_remove(tmp_path, capsys):
    clips = read_dataset(make_files(tmp_path)["panda70m"], "panda70m")
    kept, removed = select_clips(clips, SelectConfig(min_score=0.45))
    assert list(kept["text"]) == ["a dog runs", "a car drives"] and removed == {"min_score": 1}
    kept, removed = select_clips(clips, SelectConfig(max_clip_s=5))
    assert list(kept["text"]) == ["a dog runs", "a car drives"] and removed == {"max_clip_s": 1}
    with pytest.raises(ConfigError, match="hdvg metadata carries no score"):
        select_clips(read_dataset(tmp_path / "hdvg.json", "hdvg"), SelectConfig(min_score=0.1))
    # whole videos: max_clip_s reads the published duration
    kept, removed = select_clips(read_dataset(tmp_path / "webvid.csv", "webvid"), SelectConfig(max_clip_s=20))
    assert list(kept["dataset_id"]) == ["1001"] and removed == {"max_clip_s": 1}


def test_max_rows_is_a_reproducible_random_subset():
    clips = pd.DataFrame({"url": [f"u{i}" for i in range(200)], "path": None, "clip_start_s": 0.0, "clip_end_s": 1.0,
                          "text": [f"c{i}" for i in range(200)], "score": math.nan, "dataset": "panda70m",
                          "dataset_id": "x", "clip_id": [str(i) for i in range(200)]})
    clips.attrs["format"] = "panda70m"
    a, removed = select_clips(clips, SelectConfig(max_rows=10, seed=3))
    b, _ = select_clips(clips, SelectConfig(max_rows=10, seed=3))
    c, _ = select_clips(clips, SelectConfig(max_rows=10, seed=4))
    assert removed == {"max_rows": 190} and list(a["clip_id"]) == list(b["clip_id"]) != list(c["clip_id"])
    assert list(a["clip_id"]) == sorted(a["clip_id"], key=int)  # file order kept
    assert list(a["clip_id"]) != [str(i) for i in range(10)]  # not simply the first rows


def test_sources_are_grouped_once_with_their_spans(tmp_path, capsys):
    files = make_files(tmp_path)
    sources = dataset_input(files["panda70m"], "auto", SelectConfig(min_score=0.4))
    assert "panda70m" in capsys.readouterr().err
    assert len(sources) == 2 and sources["id"].is_unique
    clips = json.loads(sources["dataset_clips"].iloc[0])
    assert [(c["start"], c["end"], c["text"]) for c in clips] == [(1.0, 3.5, "a dog runs")]
    assert sources.attrs["select"] == {"read": 3, "removed": {"min_score": 1}, "clips": 2, "sources": 2}
    whole = group_sources(read_dataset(files["webvid"], "webvid"))
    assert list(whole["text"]) == ["Aerial view of a forest", "Timelapse, clouds"]
    assert [json.loads(c) for c in whole["dataset_clips"]] == [  # one span to the end: not re-split
        [{"start": 0.0, "end": None, "text": t, "score": None, "clip_id": i}]
        for t, i in (("Aerial view of a forest", "1001"), ("Timelapse, clouds", "1002"))]


def test_imagenet_layouts(tmp_path):
    """ILSVRC's train layout (mapping file + ``train/<wnid>/``), a flat folder of class folders holding the mapping
    file, and the validation layout (``LOC_val_solution.csv``): each image a row, its caption the class's first
    name."""
    import shutil

    from data_helpers import make_imagenet

    root = make_imagenet(tmp_path / "ILSVRC")
    train = read_dataset(root / "LOC_synset_mapping.txt", "imagenet")
    assert list(train["text"]) == ["tench", "tench", "goldfish", "goldfish"]
    assert list(train["dataset_id"]) == ["n01440764", "n01440764", "n01443537", "n01443537"]
    assert list(train["clip_id"]) == ["n01440764_1", "n01440764_2", "n01443537_1", "n01443537_2"]
    assert train["path"].iloc[2] == str(root / "train" / "n01443537" / "n01443537_1.JPEG")
    assert train["url"].isna().all() and train["clip_start_s"].isna().all() and train["score"].isna().all()
    flat = tmp_path / "flat"
    shutil.copytree(root / "train", flat)
    shutil.copy(root / "LOC_synset_mapping.txt", flat)
    assert list(read_dataset(flat / "LOC_synset_mapping.txt", "imagenet")["clip_id"]) == list(train["clip_id"])
    assert list(read_dataset(root / "LOC_synset_mapping.txt", "imagenet", root=str(flat))["path"]) == [
        str(flat / wnid / f"{wnid}_{i}.JPEG") for wnid in ("n01440764", "n01443537") for i in (1, 2)]
    val = read_dataset(root / "LOC_val_solution.csv", "imagenet")
    assert list(val["text"]) == ["goldfish"] and val["path"].iloc[0] == str(root / "val" / "ILSVRC2012_val_00000001.JPEG")
    assert detect_format(root / "LOC_synset_mapping.txt") == detect_format(root / "LOC_val_solution.csv") == "imagenet"
    with pytest.raises(ConfigError, match="no images of the 2 classes of .* under"):
        read_dataset(root / "LOC_synset_mapping.txt", "imagenet", root=str(tmp_path / "empty"))
    (tmp_path / "nomap").mkdir()
    shutil.copy(root / "LOC_val_solution.csv", tmp_path / "nomap")
    with pytest.raises(ConfigError, match="LOC_synset_mapping.txt"):
        read_dataset(tmp_path / "nomap" / "LOC_val_solution.csv", "imagenet")
