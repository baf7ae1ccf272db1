"""Public video datasets' metadata as pipeline input: their source URLs (or files), clip spans, captions, scores.

Each dataset publishes a table of clips; a reader maps its own columns to *clip rows* (:data:`CLIP_COLUMNS`),
:func:`select_clips` applies the ``select`` filters (before anything is downloaded) and :func:`group_sources`
turns the clips into one row per source video, its clips in ``dataset_clips`` (JSON), so a source is downloaded
once and split cuts it at those spans (``data_pipeline.split``), each clip keeping its caption.

Published layouts read here (each dataset's own repository / release files):

- ``panda70m``: CSV ``videoID, url, timestamp, caption, matching_score`` (+ ``desirable_filtering``,
  ``shot_boundary_detection`` in the full set), one row per source; ``timestamp`` is a list of
  ``['H:MM:SS.mmm', 'H:MM:SS.mmm']`` pairs, ``caption`` and ``matching_score`` lists of the same length.
- ``hdvg`` (HD-VG-130M): JSON ``{video_id: {clip_id: {scene_id, title, url, span: [start, end], caption}}}``.
- ``internvid`` (InternVid-10M(-FLT)): JSON lines ``YoutubeID, Start_timestamp, End_timestamp, Caption``,
  plus ``UMT_Score`` / ``Aesthetic_Score``.
- ``webvid`` (WebVid-10M): CSV ``videoid, contentUrl, duration (ISO 8601, PT00H00M11S), page_dir, name``,
  one whole video per row.
- ``openvid`` (OpenVid-1M): CSV ``video, caption, aesthetic score, motion score, temporal consistency score,
  camera motion, frame, fps, seconds``, one whole file per row (``video`` relative to ``dataset_root``).
- ``imagenet`` (ILSVRC-2012 as Kaggle's ImageNet Object Localization Challenge ships it): ``LOC_synset_mapping.txt``
  (``n01440764 tench, Tinca tinca``: a WordNet id, then the class's names) with the images in
  ``<root>/<wnid>/<wnid>_N.JPEG`` (``train/``, or any folder of class folders); or ``LOC_val_solution.csv``
  (``ImageId, PredictionString``: the wnid first, then its boxes) with ``<root>/<ImageId>.JPEG`` (``val/``) and the
  mapping file next to it. The caption is the class's first name (``tench``).
- ``ucf101``: a split list (``trainlist01.txt``: ``Class/v_Class_gNN_cNN.avi 1``, ``testlist01.txt`` without the
  label), files relative to ``dataset_root`` (the ``UCF-101`` folder); the caption is the class, words split.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from opensora.config import ConfigError
from opensora.data.manifest import IMAGE_EXTENSIONS, is_image, normalize

YOUTUBE = "https://www.youtube.com/watch?v="
# One clip of a dataset: where its source is (url, or path of a local file), its span in the source (seconds,
# NaN = the whole source), caption, score (the format's SCORE_COLUMN), the dataset's ids of source and clip.
CLIP_COLUMNS = ["url", "path", "clip_start_s", "clip_end_s", "text", "score", "dataset", "dataset_id", "clip_id"]
# Which published column becomes ``score`` (what select.min_score compares against); None: the format has none.
SCORE_COLUMN = {"panda70m": "matching_score", "hdvg": None, "internvid": "UMT_Score", "webvid": None,
                "openvid": "aesthetic score", "ucf101": None, "imagenet": None}
# The columns (or keys) that identify a format, for ``auto``.
SIGNATURES = {
    "panda70m": {"videoID", "url", "timestamp", "caption"},
    "webvid": {"videoid", "contentUrl", "name"},
    "openvid": {"video", "caption", "aesthetic score"},
    "internvid": {"YoutubeID", "Start_timestamp", "End_timestamp", "Caption"},
    "hdvg": {"span", "caption", "url"},  # the keys of each clip, two levels down
    "imagenet": {"ImageId", "PredictionString"},  # LOC_val_solution.csv (the mapping file: by its lines)
}
UCF_LINE = re.compile(r"^([A-Za-z]+)/v_\1_g\d+_c\d+\.avi(?:\s+\d+)?$")
SYNSET_LINE = re.compile(r"^(n\d{8})\s+(.+)$")  # LOC_synset_mapping.txt: ``n01440764 tench, Tinca tinca``
IMAGENET_MAPPING = "LOC_synset_mapping.txt"


def parse_time(value) -> float:
    """Seconds from ``H:MM:SS.mmm`` / ``MM:SS`` / a number."""
    if isinstance(value, (int, float)):
        return float(value)
    parts = str(value).strip().split(":")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + float(part)
    return seconds


def iso_duration(value) -> float:
    """Seconds from WebVid's ISO 8601 ``PT00H00M11S``; NaN when it is not one."""
    m = re.fullmatch(r"P(?:T)?(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?", str(value).strip())
    if not m or not any(m.groups()):
        return math.nan
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def _listish(value) -> list:
    """A list cell as Panda-70M's CSV writes it (``"[['0:00:00.000', ...]]"``), or a list already."""
    if isinstance(value, str):
        return list(ast.literal_eval(value))
    return list(value)


def _clip(dataset: str, source_id: str, clip_id: str, text, start=math.nan, end=math.nan, score=math.nan,
          url=None, path=None) -> dict:
    return {"url": url, "path": path, "clip_start_s": start, "clip_end_s": end, "text": text,
            "score": float(score) if score is not None and score == score else math.nan, "dataset": dataset,
            "dataset_id": str(source_id), "clip_id": str(clip_id)}


def read_panda70m(path: Path, root: Path) -> list[dict]:
    rows = []
    for rec in pd.read_csv(path, dtype=str).to_dict("records"):
        spans, captions = _listish(rec["timestamp"]), _listish(rec["caption"])
        scores = _listish(rec["matching_score"]) if isinstance(rec.get("matching_score"), str) else [math.nan] * len(spans)
        if not len(spans) == len(captions) == len(scores):
            raise ValueError(f"{path}: video {rec['videoID']}: {len(spans)} timestamps, {len(captions)} captions, "
                             f"{len(scores)} matching scores")
        for k, ((start, end), text, score) in enumerate(zip(spans, captions, scores)):
            rows.append(_clip("panda70m", rec["videoID"], f"{rec['videoID']}_{k}", text, parse_time(start),
                              parse_time(end), score, url=rec["url"]))
    return rows


def read_hdvg(path: Path, root: Path) -> list[dict]:
    rows = []
    for video_id, clips in json.loads(path.read_text(encoding="utf-8")).items():
        for clip_id, clip in clips.items():
            start, end = clip["span"]
            rows.append(_clip("hdvg", video_id, clip_id, clip["caption"], parse_time(start), parse_time(end),
                              url=clip["url"]))
    return rows


def read_internvid(path: Path, root: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        rec = json.loads(line)
        start, end = parse_time(rec["Start_timestamp"]), parse_time(rec["End_timestamp"])
        rows.append(_clip("internvid", rec["YoutubeID"], f"{rec['YoutubeID']}_{start:.3f}", rec["Caption"], start,
                          end, rec.get("UMT_Score"), url=YOUTUBE + rec["YoutubeID"]))
    return rows


def read_webvid(path: Path, root: Path) -> list[dict]:
    rows = []
    for rec in pd.read_csv(path, dtype=str).to_dict("records"):
        # Whole videos: the span is the published duration (used by select.max_clip_s), split cuts nothing.
        row = _clip("webvid", rec["videoid"], rec["videoid"], rec["name"], url=rec["contentUrl"])
        row["duration_s"] = iso_duration(rec.get("duration"))
        rows.append(row)
    return rows


def read_openvid(path: Path, root: Path) -> list[dict]:
    rows = []
    for rec in pd.read_csv(path).to_dict("records"):
        row = _clip("openvid", rec["video"], rec["video"], rec["caption"], score=rec.get("aesthetic score"),
                    path=str(root / rec["video"]))
        row["duration_s"] = float(rec.get("seconds", math.nan))
        rows.append(row)
    return rows


def read_ucf101(path: Path, root: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        m = UCF_LINE.match(line)
        if not m:
            raise ValueError(f"{path}: not a UCF-101 split line: {line!r}")
        file = line.split()[0]
        words = " ".join(re.findall(r"[A-Z][a-z]*|[a-z]+", m.group(1))).lower()
        rows.append(_clip("ucf101", Path(file).stem, Path(file).stem, words, path=str(root / file)))
    return rows


def _synsets(path: Path) -> dict[str, str]:
    """wnid -> the class's first name, from ``LOC_synset_mapping.txt``."""
    names = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        m = SYNSET_LINE.match(line.strip())
        if not m:
            raise ValueError(f"{path}: not a synset mapping line: {line!r}")
        names[m.group(1)] = m.group(2).split(",")[0].strip()
    return names


def _image_root(root: Path, path: Path, sub: str) -> Path:
    """Where imagenet's images are: ``dataset_root`` as given, else the metadata file's ``sub`` folder (ILSVRC's
    ``train/`` or ``val/``) when there is one, else the metadata file's folder (a flat folder of class folders)."""
    if root != path.resolve().parent:
        return root
    return root / sub if (root / sub).is_dir() else root


def read_imagenet(path: Path, root: Path) -> list[dict]:
    # The class's first name alone, no "a photo of" template: a fixed prefix on a million captions teaches the
    # text encoder nothing (docs/data_pipeline.md).
    rows = []
    if path.suffix.lower() == ".csv":  # LOC_val_solution.csv: the mapping file lies next to it
        mapping = path.resolve().parent / IMAGENET_MAPPING
        if not mapping.is_file():
            raise ValueError(f"{IMAGENET_MAPPING} (the class names) not found next to {path.name}: {mapping}")
        names, folder = _synsets(mapping), _image_root(root, path, "val")
        for rec in pd.read_csv(path, dtype=str).to_dict("records"):
            wnid = str(rec["PredictionString"]).split()[0]
            rows.append(_clip("imagenet", wnid, rec["ImageId"], names[wnid],
                              path=str(folder / f"{rec['ImageId']}.JPEG")))
        return rows
    names, folder = _synsets(path), _image_root(root, path, "train")
    for wnid, name in names.items():
        if not (folder / wnid).is_dir():
            continue  # a subset of the classes
        entries = [e for e in os.scandir(folder / wnid) if is_image(e.name)]
        for entry in sorted((e for e in entries if e.is_file()), key=lambda e: e.name):
            file = Path(entry.path)
            rows.append(_clip("imagenet", wnid, file.stem, name, path=str(file)))
    if not rows:
        raise ValueError(f"no images of the {len(names)} classes of {path.name} under {folder} (class folders "
                         f"<wnid>/ holding {', '.join(sorted(IMAGE_EXTENSIONS))} files; set dataset_root)")
    return rows


READERS = {"panda70m": read_panda70m, "hdvg": read_hdvg, "internvid": read_internvid, "webvid": read_webvid,
           "openvid": read_openvid, "ucf101": read_ucf101, "imagenet": read_imagenet}
FORMATS = tuple(READERS)


def _columns_found(path: Path) -> set[str]:
    """What ``auto`` looks at: a CSV's header, a JSON lines file's first record's keys, the clip keys of a
    nested JSON object, or ``ucf101-lines`` for a text file of UCF-101 split lines."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return set(pd.read_csv(path, nrows=0, sep="\t" if suffix == ".tsv" else ",").columns)
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "{}")
        return set(json.loads(first))
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data:
            clips = next(iter(data.values()))
            if isinstance(clips, dict) and clips and isinstance(next(iter(clips.values())), dict):
                return set(next(iter(clips.values())))
            return set(data)
        return set()
    if suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if lines and all(UCF_LINE.match(line) for line in lines[:20]):
            return {"ucf101-lines"}
        if lines and all(SYNSET_LINE.match(line) for line in lines[:20]):
            return {"imagenet-synsets"}
        return {f"text lines such as {lines[0][:60]!r}"} if lines else set()
    return set()


def detect_format(path: str | Path) -> str:
    """The format whose identifying columns the file has; an error listing what was found unless exactly one."""
    path = Path(path)
    found = _columns_found(path)
    if found == {"ucf101-lines"}:
        return "ucf101"
    if found == {"imagenet-synsets"}:
        return "imagenet"
    matches = [name for name, needed in SIGNATURES.items() if needed <= found]
    if len(matches) == 1:
        return matches[0]
    known = "; ".join(f"{name}: {', '.join(sorted(cols))}" for name, cols in SIGNATURES.items())
    what = f"matches {', '.join(matches)}" if matches else "matches no dataset format"
    raise ConfigError(f"input_format=auto: {path} {what}; found {sorted(found) or 'nothing readable'} "
                      f"(known formats and the columns they need: {known}; ucf101: a split list such as "
                      f"trainlist01.txt; imagenet: also {IMAGENET_MAPPING}); set input_format to one of " + ", ".join(FORMATS))


def read_dataset(path: str | Path, input_format: str, root: str = "") -> pd.DataFrame:
    """Clip rows (:data:`CLIP_COLUMNS`, plus ``duration_s`` for whole-video formats) of a dataset's metadata file.

    Args:
        path: the metadata file.
        input_format: one of :data:`FORMATS`, or ``auto``.
        root: folder that local files (openvid, ucf101) are relative to, or imagenet's images are in ('' = the
            metadata file's folder; imagenet: its ``train/`` or ``val/`` when there is one).
    """
    path = Path(path)
    name = detect_format(path) if input_format == "auto" else input_format
    if name not in READERS:
        raise ConfigError(f"input_format: unknown format {name!r} (known: auto, {', '.join(FORMATS)})")
    try:
        rows = READERS[name](path, Path(root) if root else path.resolve().parent)
    except (KeyError, ValueError, SyntaxError) as err:
        raise ConfigError(f"{path} is not {name} metadata as published ({type(err).__name__}: {err})") from err
    df = pd.DataFrame(rows, columns=CLIP_COLUMNS + (["duration_s"] if rows and "duration_s" in rows[0] else []))
    df.attrs["format"] = name
    return df


def clip_length(df: pd.DataFrame) -> pd.Series:
    """Each clip's length in seconds: its span, else the published duration of its whole source (NaN if unknown)."""
    length = df["clip_end_s"] - df["clip_start_s"]
    if "duration_s" in df.columns:
        length = length.fillna(df["duration_s"])
    return length


def select_clips(df: pd.DataFrame, select) -> tuple[pd.DataFrame, dict[str, int]]:
    """The ``select`` filters, in order: ``min_score``, ``max_clip_s``, then ``max_rows`` (a random subset drawn
    with ``seed``, kept in file order). Returns the kept clips and how many rows each filter removed."""
    name = df.attrs.get("format", "?")
    removed: dict[str, int] = {}
    if select.min_score:
        if SCORE_COLUMN.get(name) is None:
            raise ConfigError(f"select.min_score: {name} metadata carries no score")
        keep = df["score"] >= select.min_score  # a clip without a score is not known to pass
        removed["min_score"] = int((~keep).sum())
        df = df[keep]
    if select.max_clip_s:
        keep = ~(clip_length(df) > select.max_clip_s)  # unknown length: kept (split's max_clip_s still applies)
        removed["max_clip_s"] = int((~keep).sum())
        df = df[keep]
    if select.max_rows and len(df) > select.max_rows:
        picked = np.sort(np.random.default_rng(select.seed).choice(len(df), select.max_rows, replace=False))
        removed["max_rows"] = len(df) - select.max_rows
        df = df.iloc[picked]
    elif select.max_rows:
        removed["max_rows"] = 0
    out = df.reset_index(drop=True)
    out.attrs["format"] = name
    return out, removed


def group_sources(df: pd.DataFrame) -> pd.DataFrame:
    """One row per source (url or path), in order of first appearance: clips with spans go into its
    ``dataset_clips`` (JSON list of ``{start, end, text, score, clip_id}``, seconds, sorted by start); a
    whole-video clip stays a row of its own with its caption in ``text`` and one span to its end (``end`` None)."""
    out = []
    key = df["url"].fillna(df["path"])
    for source, clips in df.groupby(key, sort=False):
        first = clips.iloc[0]
        base = {"url": first["url"], "path": first["path"], "dataset": first["dataset"],
                "dataset_id": first["dataset_id"]}
        spanned = clips[clips["clip_start_s"].notna()]
        if len(spanned):
            spans = [{"start": float(r.clip_start_s), "end": float(r.clip_end_s), "text": r.text,
                      "score": None if math.isnan(r.score) else float(r.score), "clip_id": r.clip_id}
                     for r in spanned.sort_values("clip_start_s", kind="stable").itertuples()]
            out.append({**base, "dataset_clips": json.dumps(spans, ensure_ascii=False)})
        for r in clips[clips["clip_start_s"].isna()].itertuples():
            # A whole video is the dataset's clip as it is: one span to its end (``end`` None), not re-split.
            score = None if math.isnan(r.score) else float(r.score)
            whole = [{"start": 0.0, "end": None, "text": r.text, "score": score, "clip_id": r.clip_id}]
            out.append({**base, "text": r.text, "dataset_score": score, "dataset_id": r.dataset_id,
                        "dataset_clips": json.dumps(whole, ensure_ascii=False)})
    return pd.DataFrame(out)


def dataset_input(path: str | Path, input_format: str, select, root: str = "") -> pd.DataFrame:
    """Metadata file -> filtered clips -> source rows, with a summary line on stderr of what each filter removed."""
    clips = read_dataset(path, input_format, root)
    kept, removed = select_clips(clips, select)
    sources = normalize(group_sources(kept))
    counts = ", ".join(f"{k} removed {v}" for k, v in removed.items()) or "no filter"
    print(f"select: {clips.attrs['format']} {path}: {len(clips)} clips read; {counts} -> {len(kept)} clips "
          f"from {len(sources)} sources", file=sys.stderr, flush=True)
    sources.attrs["select"] = {"read": len(clips), "removed": removed, "clips": len(kept), "sources": len(sources)}
    return sources
