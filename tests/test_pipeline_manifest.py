"""The manifest schema shared by the pipeline and training."""

import pandas as pd
import pytest

from opensora.data.manifest import COLUMNS, import_opensora_csv, read_manifest, usable_mask, write_manifest


def test_minimal_csv_gets_columns_and_stable_ids(tmp_path):
    (tmp_path / "in.csv").write_text("url\nhttp://x/a.mp4\nhttp://x/b.mp4\nhttp://x/a.mp4\n")
    df1 = read_manifest(tmp_path / "in.csv")
    df2 = read_manifest(tmp_path / "in.csv")
    assert list(df1.columns[: len(COLUMNS)]) == COLUMNS
    assert df1["id"].tolist() == df2["id"].tolist()  # resume keys on these
    assert df1["id"].is_unique and df1["id"].iloc[2].endswith("#1")


@pytest.mark.parametrize("ext", [".parquet", ".csv"])
def test_roundtrip_keeps_values_and_text_like_na(tmp_path, ext):
    df = pd.DataFrame({"path": ["/v/a.mp4", "/v/b.mp4"], "text": ["NA", "a cat, sitting"],
                       "num_frames": [10, 20], "fps": [24.0, 30.0], "extra": [1.5, 2.5]})
    out = write_manifest(df, tmp_path / f"m{ext}")
    back = read_manifest(out)
    assert back["text"].tolist() == ["NA", "a cat, sitting"]
    assert back["num_frames"].tolist() == [10, 20] and back["extra"].tolist() == [1.5, 2.5]
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


def test_failed_and_rejected_rows_are_dropped_for_training(tmp_path):
    df = pd.DataFrame({"path": ["a", "b", "c", "d"], "probe_status": ["done", "failed", "done", "done"],
                       "filter_status": ["done", None, "rejected", None]})
    write_manifest(df, tmp_path / "m.parquet")
    assert read_manifest(tmp_path / "m.parquet")["path"].tolist() == ["a", "d"]
    assert len(read_manifest(tmp_path / "m.parquet", usable_only=False)) == 4
    assert usable_mask(df).tolist() == [True, False, False, True]


def test_opensora_csv_import_resolves_relative_paths(tmp_path):
    (tmp_path / "train.csv").write_text(
        "path,text,num_frames,fps,height,width,aspect_ratio,resolution\n"
        "clips/a.mp4,a dog runs,16,24,256,256,1.0,65536\n"
    )
    out = import_opensora_csv(tmp_path / "train.csv", tmp_path / "m.parquet")
    df = read_manifest(out)
    assert df["path"].iloc[0] == str(tmp_path / "clips" / "a.mp4")
    assert df["text"].iloc[0] == "a dog runs" and df["resolution"].iloc[0] == 65536


def test_bad_inputs_name_the_file(tmp_path):
    (tmp_path / "x.csv").write_text("name\nfoo\n")
    with pytest.raises(ValueError, match="x.csv.*'path' or 'url'"):
        read_manifest(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="unknown manifest format"):
        write_manifest(pd.DataFrame({"path": ["a"]}), tmp_path / "m.json")
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_manifest(tmp_path / "nope.parquet")
