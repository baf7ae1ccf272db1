"""filter: keep clips that are long and large enough, move, and are not black or blank.

Pixel checks and motion use ``num_samples`` frames decoded small by decord (the reader training uses):
motion is the mean Farneback optical-flow magnitude between each sampled frame and the frame after it,
as a percentage of the frame width per frame, so it does not depend on the sample resolution.
Model-based scores load only when configured: aesthetic from a local folder, the text area (``text_area``:
the share of the frame covered by text boxes of RapidOCR's PP-OCRv4 detector, whose ONNX weights ship in the
``rapidocr-onnxruntime`` wheel) from that package.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

from data_pipeline.config import FilterConfig
from data_pipeline.rows import Reject, Row, SetupError, is_missing
from opensora.data.manifest import SourceSpan, is_image, source_span


def sample_pairs(path: str, num_samples: int, width: int, span: SourceSpan | None = None,
                 num_frames: int = 0) -> np.ndarray:
    """(S, 2, h, w, 3) uint8: ``num_samples`` evenly spaced frames, each with the frame after it.

    For a reference row (``span``: ``path`` is its source video) the frames are those of its ``num_frames``
    clip frames, sought in the source; "the frame after" is the next *clip* frame, as in an encoded clip.
    """
    import decord

    reader = decord.VideoReader(path, num_threads=1)
    n = len(reader) if span is None else num_frames
    if n < 2:
        raise RuntimeError(f"{n} frames: too few to measure motion")
    h0, w0 = reader[0].shape[:2]
    height = max(2, round(h0 * width / w0))
    reader = decord.VideoReader(path, width=width, height=height, num_threads=1)
    starts = np.unique(np.linspace(0, n - 2, num_samples).round().astype(int))
    idx = np.stack([starts, starts + 1], axis=1).reshape(-1)
    if span is not None:
        idx = span.source_indices(idx)
    frames = reader.get_batch(list(idx)).asnumpy()  # (2S, h, w, 3)
    return frames.reshape(len(starts), 2, *frames.shape[1:])


def motion_score(pairs: np.ndarray) -> float:
    """Mean optical-flow magnitude (Farneback) over the pairs, in % of frame width per frame."""
    scores = []
    for a, b in pairs:
        ga, gb = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
        flow = cv2.calcOpticalFlowFarneback(ga, gb, None, 0.5, 3, 15, 3, 5, 1.2, 0)  # (h, w, 2)
        scores.append(float(np.linalg.norm(flow, axis=-1).mean()) / ga.shape[1] * 100.0)
    return float(np.mean(scores))


def bad_frame_fraction(frames: np.ndarray, cfg: FilterConfig) -> tuple[float, float]:
    """(fraction of black frames, fraction of blank frames) among ``frames`` (N, h, w, 3)."""
    luma = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # (N, h, w)
    means, stds = luma.mean(axis=(1, 2)), luma.std(axis=(1, 2))
    black = means < cfg.black_luma
    blank = (stds < cfg.blank_std) & ~black
    return float(black.mean()), float(blank.mean())


@functools.lru_cache(maxsize=2)
def load_aesthetic(model_dir: str, device: str):
    """A CLIP vision tower + MLP head (``aesthetic_head.safetensors``: ``layers.N.weight/bias``), cached per process.

    The head follows the LAION aesthetic predictor: Linear layers (with activations dropped at inference
    as in the original's linear-MSE model) mapping the normalised image embedding to one score.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    # As for the caption model: a missing or broken folder stops the stage (SetupError), and a typo'd path
    # is never looked up on a model hub (local_files_only).
    folder = Path(model_dir)
    if not folder.is_dir():
        raise SetupError(f"aesthetic model folder not found: {model_dir}")
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True).to(device).eval()
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        state = load_file(folder / "aesthetic_head.safetensors")
    except Exception as err:
        raise SetupError(f"aesthetic model {model_dir} could not be loaded: {type(err).__name__}: {err}") from err
    names = sorted({k.rsplit(".", 1)[0] for k in state}, key=lambda s: int(s.split(".")[1]))
    layers = []
    for name in names:
        weight, bias = state[f"{name}.weight"], state[f"{name}.bias"]
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": bias})
        layers.append(linear)
    head = torch.nn.Sequential(*layers).to(device).eval()
    return model, processor, head


def aesthetic_score(frames: np.ndarray, cfg: FilterConfig) -> float:
    """Mean aesthetic score of ``frames`` (N, h, w, 3) with the model in ``cfg.aesthetic_model``."""
    import torch

    model, processor, head = load_aesthetic(cfg.aesthetic_model, cfg.device)
    with torch.no_grad():
        inputs = processor(images=list(frames), return_tensors="pt").to(cfg.device)
        embeds = model(**inputs).image_embeds  # (N, D)
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return float(head(embeds).mean())


def sample_frames(path: str, count: int, width: int, span: SourceSpan | None = None, num_frames: int = 0) -> np.ndarray:
    """(N, h, w, 3) uint8 RGB: ``count`` evenly spaced frames (the clip's, for a reference row) at ``width``."""
    import decord

    reader = decord.VideoReader(path, num_threads=1)
    n = len(reader) if span is None else num_frames
    h0, w0 = reader[0].shape[:2]
    width = min(width, w0)  # never enlarged: an upscaled frame shows the detector nothing new
    reader = decord.VideoReader(path, width=width, height=max(2, round(h0 * width / w0)), num_threads=1)
    idx = np.unique(np.linspace(0, n - 1, count).round().astype(int))
    return reader.get_batch(list(idx if span is None else span.source_indices(idx))).asnumpy()


def read_image_at(path: str, width: int, enlarge: bool = True) -> np.ndarray:
    """(1, h, w, 3) uint8 RGB: an image at ``width`` (height keeps the aspect), as the video readers here give
    frames; ``enlarge=False`` never makes it wider than it is."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    h0, w0 = rgb.shape[:2]
    width = width if enlarge else min(width, w0)
    return cv2.resize(rgb, (width, max(2, round(h0 * width / w0))), interpolation=cv2.INTER_AREA)[None]


@functools.lru_cache(maxsize=2)
def load_text_detector(threads: int):
    """RapidOCR's text detector alone (PP-OCRv4 det, ONNX, from the wheel), cached per process: the recogniser
    and the orientation classifier are not needed to measure where text is."""
    try:
        from rapidocr_onnxruntime.ch_ppocr_det import TextDetector
        from rapidocr_onnxruntime.utils import read_yaml
        from rapidocr_onnxruntime.utils.parse_parameters import update_model_path
        import rapidocr_onnxruntime.main as rapid
    except ImportError as err:
        raise SetupError("filter.max_text_area needs the rapidocr-onnxruntime package (pip install "
                         "rapidocr-onnxruntime; scripts/setup.sh installs it)") from err
    det = update_model_path(read_yaml(rapid.DEFAULT_CFG_PATH))["Det"]
    # "max" never enlarges a frame (the package's "min" brings its short side up to 736 px, 10x the work at
    # text_width 448); the side is rounded to a multiple of 32 as the network needs.
    det.update(intra_op_num_threads=threads, inter_op_num_threads=1, limit_type="max", limit_side_len=4096)
    return TextDetector(det)


def text_area(frames: np.ndarray, threads: int = 1) -> float:
    """Mean share of the frame covered by detected text boxes (their union) over ``frames`` (N, h, w, 3) RGB."""
    detector = load_text_detector(threads)
    shares = []
    for rgb in frames:
        boxes, _ = detector(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # PP-OCR takes BGR, as cv2.imread gives it
        mask = np.zeros(rgb.shape[:2], np.uint8)
        if boxes is not None and len(boxes):
            cv2.fillPoly(mask, [np.round(b).astype(np.int32) for b in boxes], 1)  # overlapping boxes count once
        shares.append(float(mask.mean()))
    return float(np.mean(shares))


def filter_clip(row: Row, cfg: FilterConfig) -> list[Row]:
    """Stage function: scores the clip (``motion``, ``black_frac``, ``blank_frac``, ``text_area``, ``aesthetic``) and
    raises :class:`Reject` naming the first failed check. An image is scored as one frame, without duration and
    motion (``filter_skipped`` names the settings that were not measured)."""
    if is_missing(row.get("path")):
        raise RuntimeError("row has no path")
    scores: Row = {}
    duration = row.get("duration")
    if is_missing(duration) and not is_missing(row.get("num_frames")) and row.get("fps"):
        duration = row["num_frames"] / row["fps"]
    if cfg.min_duration_s and duration is not None and duration < cfg.min_duration_s:
        raise Reject(f"duration {duration:.2f}s < {cfg.min_duration_s}s")
    if cfg.max_duration_s and duration is not None and duration > cfg.max_duration_s:
        raise Reject(f"duration {duration:.2f}s > {cfg.max_duration_s}s")
    height, width = row.get("height"), row.get("width")
    if height is not None and height < cfg.min_height or width is not None and width < cfg.min_width:
        raise Reject(f"size {width}x{height} below {cfg.min_width}x{cfg.min_height}")
    image = is_image(row["path"])
    if image:
        # One still: the pixel checks, text and aesthetic apply to it; duration and motion do not, and an image
        # is not rejected for lacking them: the row says which settings were not measured.
        unmeasured = [name for name in ("min_duration_s", "max_duration_s", "min_motion", "max_motion")
                      if getattr(cfg, name)]
        scores["filter_skipped"] = f"an image: {', '.join(unmeasured)} not measured" if unmeasured else None
        firsts = read_image_at(row["path"], cfg.sample_width)
    else:
        span = source_span(row)
        pairs = sample_pairs(row["path"], cfg.num_samples, cfg.sample_width, span,
                             0 if span is None else int(row["num_frames"]))
        firsts = pairs[:, 0]
    black, blank = bad_frame_fraction(firsts, cfg)
    scores.update(black_frac=black, blank_frac=blank)
    if black + blank > cfg.max_bad_frac:
        raise Reject(f"{'black' if black >= blank else 'blank'} frames {black + blank:.0%} > {cfg.max_bad_frac:.0%}", scores)
    if not image:
        scores["motion"] = motion_score(pairs)
        if scores["motion"] < cfg.min_motion:
            raise Reject(f"static: motion {scores['motion']:.3f} < {cfg.min_motion}", scores)
        if cfg.max_motion and scores["motion"] > cfg.max_motion:
            raise Reject(f"motion {scores['motion']:.3f} > {cfg.max_motion}", scores)
    if cfg.max_text_area:
        frames = read_image_at(row["path"], cfg.text_width, enlarge=False) if image else sample_frames(
            row["path"], cfg.text_frames, cfg.text_width, span, 0 if span is None else int(row["num_frames"]))
        scores["text_area"] = text_area(frames, cfg.text_threads)
        if scores["text_area"] > cfg.max_text_area:
            raise Reject(f"text covers {scores['text_area']:.1%} of the frame > {cfg.max_text_area:.1%}", scores)
    if cfg.aesthetic_model:
        scores["aesthetic"] = aesthetic_score(firsts, cfg)
        if scores["aesthetic"] < cfg.min_aesthetic:
            raise Reject(f"aesthetic {scores['aesthetic']:.2f} < {cfg.min_aesthetic}", scores)
    return [{**row, **scores}]
