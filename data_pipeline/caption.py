"""caption: captions from a vision-language model (LLaVA, LLaVA-OneVision / LLaVA-Video, Qwen2-VL / Qwen2.5-VL /
Qwen3-VL: :mod:`data_pipeline.captioners`), or the captions a data set carries.

Order of preference for a row: a non-empty ``text`` column; a sidecar ``<video>.txt`` or ``<video>.json``
next to the clip (or, with ``sidecar_from_source``, next to the video it was cut from - a JSON sidecar
may list ``shots`` with ``start_frame``/``end_frame``/``text`` and the shot overlapping the clip most is
taken); otherwise the model. Generation is batched (greedy), frames are read with decord - at
``frame_positions`` of the clip for an image family, ``video_frames`` frames spread over it as one video for a
video family - for the next batches in background threads while one batch generates, so the GPU does not wait
for decoding, and prompts go through the family's chat template (``backend``: transformers or vLLM). A caption that
comes back empty (fewer than ``min_words`` after removing boiler-plate openings) or truncated (no end
of sequence within the budget) or repetitive (a run of ``repeat_ngram`` words occurring ``max_repeats`` times: a
model caught in a loop) is generated again with twice the budget; after ``retries`` an empty or repetitive
one fails the row and a truncated one is cut to its last full sentence and flagged
``caption_flag=truncated``. ``caption_tokens`` counts the tokens generated for a row (all tries); the stage's
summary line ends with videos/s and output tokens/s (per process, i.e. per GPU under torchrun).

Multi-GPU: one process per GPU under torchrun; :func:`data_pipeline.pipeline.run_one` shards the rows
by rank and rank 0 merges. The model is loaded once per process (cached).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import errno
import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipeline.captioners import (
    Generated, Video, family_of, generate_transformers, generate_vllm, load_model, video_positions,
)
from data_pipeline.config import CaptionConfig
from data_pipeline.rows import Row, is_missing
from opensora.data.manifest import SourceSpan, is_image, source_span


def clean_caption(text: str, openings: list[str]) -> str:
    """Removes boiler-plate openings ("The video shows ...") and surrounding space; capitalises the start."""
    text = " ".join(text.split())
    changed = True
    while changed and text:
        changed = False
        for pattern in openings:
            new = re.sub(pattern, "", text, count=1, flags=re.IGNORECASE).lstrip(" ,:;-")
            if new != text:
                text, changed = new, True
    return text[:1].upper() + text[1:] if text else text


def last_sentence_end(text: str) -> str:
    """``text`` up to its last full stop / ! / ? (all of it if there is none)."""
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    if text.rstrip().endswith((".", "!", "?")):
        return text.rstrip()
    return text[: cut + 1] if cut > 0 else text


def repeated_ngram(text: str, n: int, times: int) -> str | None:
    """The first run of ``n`` words (lower case, punctuation ignored) that occurs ``times`` times or more in
    ``text``, or None."""
    words = re.findall(r"[\w']+", text.lower())
    counts: collections.Counter = collections.Counter()
    for k in range(len(words) - n + 1):
        gram = tuple(words[k : k + n])
        counts[gram] += 1
        if counts[gram] >= times:
            return " ".join(gram)
    return None


def _is_file(path: Path) -> bool:
    """``path.is_file()``, except that a name longer than the file system takes is no file rather than an error:
    the ``.json`` sidecar of a video whose name already has 252-255 bytes cannot exist, and asking for it raised
    ``OSError: [Errno 36] File name too long``, failing the caption of a good video."""
    try:
        return path.is_file()
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            return False
        raise


def _read_sidecar(video: str, clip: Row) -> str | None:
    stem = Path(video).with_suffix("")
    txt, js = Path(f"{stem}.txt"), Path(f"{stem}.json")
    if _is_file(txt):
        text = txt.read_text(encoding="utf-8").strip()
        return text or None
    if not _is_file(js):
        return None
    data = json.loads(js.read_text(encoding="utf-8"))
    for key in ("text", "caption"):
        if isinstance(data.get(key), str) and data[key].strip():
            return data[key].strip()
    shots = data.get("shots")
    if isinstance(shots, list) and shots:
        start = clip.get("start_frame") if not is_missing(clip.get("start_frame")) else 0
        end = clip.get("end_frame") if not is_missing(clip.get("end_frame")) else start + 1
        overlap = [max(0, min(end, s["end_frame"]) - max(start, s["start_frame"])) for s in shots]
        best = int(np.argmax(overlap))
        return (shots[best]["text"].strip() or None) if overlap[best] > 0 else None
    return None


def existing_caption(row: Row, cfg: CaptionConfig) -> tuple[str, str] | None:
    """(caption, where it came from) if the data carries one, else None."""
    if not is_missing(row.get("text")):
        return str(row["text"]).strip(), "column"
    # A reference row's path is its source video: its sidecar is the source's, taken only with sidecar_from_source.
    candidates = [] if source_span(row) is not None else [row.get("path")]
    if cfg.sidecar_from_source:
        candidates.append(row.get("source_video"))
    for video in candidates:
        if not is_missing(video):
            text = _read_sidecar(str(video), row)
            if text:
                return text, "sidecar"
    return None


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is there, else ``cpu``."""
    import torch

    if device != "auto":
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def _read_clip(path: str, positions: list[float], span: SourceSpan | None, num_frames: int,
               size: tuple[int, int] | None) -> tuple[np.ndarray, list[int], int, float]:
    """(frames (T, H, W, 3) uint8, their indices in the clip, the clip's frame count, its fps) at ``positions``."""
    import decord

    if not Path(path).is_file():  # decord says only "Error reading PATH..." for a missing and a corrupt file alike
        raise FileNotFoundError(f"clip not found: {path}")
    kw = {} if span is None or size is None else dict(height=int(size[0]), width=int(size[1]))
    reader = decord.VideoReader(path, num_threads=1, **kw)
    n = len(reader) if span is None else num_frames
    if n == 0:
        raise RuntimeError(f"{path}: no frames")
    indices = [min(n - 1, max(0, int(p * n))) for p in positions]
    source = indices if span is None else span.source_indices(indices).tolist()
    return reader.get_batch(source).asnumpy(), indices, n, float(reader.get_avg_fps())


def read_frames(path: str, positions: list[float], layout: str, span: SourceSpan | None = None,
                num_frames: int = 0, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Frames at relative ``positions`` of the clip, (H, W, 3) uint8 each; ``grid`` joins them side by side.

    For a reference row (``span``: ``path`` is its source video) the positions are within its ``num_frames``
    clip frames, sought in the source and decoded at the clip's ``size`` (height, width), as the clip would be.
    """
    frames = list(_read_clip(path, positions, span, num_frames, size)[0])
    return [np.concatenate(frames, axis=1)] if layout == "grid" else frames


def read_video(path: str, count: int, span: SourceSpan | None = None, num_frames: int = 0,
               size: tuple[int, int] | None = None) -> Video:
    """``count`` frames spread evenly over the clip, as one :class:`Video` (a video family's input); a reference
    row as in :func:`read_frames`."""
    frames, indices, total, fps = _read_clip(path, video_positions(count), span, num_frames, size)
    return Video(frames, indices, total, fps)


def generate(visuals: list, cfg: CaptionConfig, max_new_tokens: int) -> list[Generated]:
    """One generate call of ``cfg.backend`` over the clips' frames (a list of images each, or a :class:`Video`)."""
    if cfg.backend == "vllm":
        return generate_vllm(visuals, cfg, max_new_tokens)
    return generate_transformers(visuals, cfg, max_new_tokens, resolve_device(cfg.device))


def read_row_frames(row: Row, cfg: CaptionConfig, video: bool = False) -> list[np.ndarray] | Video:
    """The caption frames of a manifest row (a clip file, or a reference row's span of its source): images at
    ``frame_positions``, or with ``video`` one :class:`Video` of ``video_frames`` frames."""
    span = source_span(row)
    size = None if is_missing(row.get("height")) or is_missing(row.get("width")) else (row["height"], row["width"])
    num_frames = 0 if span is None else int(row["num_frames"])
    if video:
        return read_video(row["path"], cfg.video_frames, span, num_frames, size)
    if span is None:
        return read_frames(row["path"], list(cfg.frame_positions), cfg.layout)
    return read_frames(row["path"], list(cfg.frame_positions), cfg.layout, span, num_frames, size)


def _decode(row: Row, cfg: CaptionConfig, video: bool) -> list[np.ndarray] | Video | Exception:
    """A row's frames, or the exception that fails that row alone (a broken clip)."""
    try:
        return read_row_frames(row, cfg, video)
    except Exception as err:
        return err


def decoded_frames(
    rows: list[Row], indices: list[int], cfg: CaptionConfig, video: bool = False
) -> Iterator[tuple[int, list[np.ndarray] | Video | Exception]]:
    """``(i, frames of rows[i] or the exception that failed it)`` for ``indices``, in that order.

    With ``prefetch_batches`` > 0 the frames of the next ``prefetch_batches * batch_size`` rows are being
    decoded by ``decode_workers`` threads whenever this yields, i.e. while the caller generates (decord
    releases the GIL while it decodes). Close the generator (``contextlib.closing``) to cancel what is queued.
    """
    if cfg.prefetch_batches == 0:
        for i in indices:
            yield i, _decode(rows[i], cfg, video)
        return
    ahead = cfg.prefetch_batches * cfg.batch_size
    pool = cf.ThreadPoolExecutor(cfg.decode_workers, thread_name_prefix="caption-decode")
    try:
        queue: collections.deque[tuple[int, cf.Future]] = collections.deque()
        for i in indices:
            queue.append((i, pool.submit(_decode, rows[i], cfg, video)))
            if len(queue) > ahead:
                j, future = queue.popleft()
                yield j, future.result()
        while queue:
            j, future = queue.popleft()
            yield j, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _caption_chunk(rows: list[Row], chunk: dict[int, list[np.ndarray] | Video], cfg: CaptionConfig, budget: int,
                   last_try: bool, results: list, tokens: collections.Counter) -> dict[int, list[np.ndarray] | Video]:
    """One ``generate`` call for ``chunk`` (row index -> frames): fills ``results`` and ``tokens`` (generated per
    row, all tries), returns the rows to try again."""
    retry: dict[int, list[np.ndarray] | Video] = {}
    for i, (raw, truncated, n_tokens) in zip(chunk, generate(list(chunk.values()), cfg, budget)):
        tokens[i] += n_tokens
        text = clean_caption(raw, list(cfg.strip_openings))
        empty = len(text.split()) < cfg.min_words
        loop = repeated_ngram(text, cfg.repeat_ngram, cfg.max_repeats) if cfg.max_repeats else None
        if (empty or truncated or loop) and not last_try:
            retry[i] = chunk[i]
        elif empty:
            results[i] = RuntimeError(f"empty caption after {cfg.retries + 1} tries: {raw[:80]!r}")
        elif loop:
            results[i] = RuntimeError(f"repetitive caption after {cfg.retries + 1} tries ({loop!r} "
                                      f"{cfg.max_repeats}+ times): {raw[:80]!r}")
        else:
            if truncated:
                text = last_sentence_end(text)
            results[i] = [{**rows[i], "text": text, "caption_source": "model",
                           "caption_flag": "truncated" if truncated else None, "caption_tokens": tokens[i]}]
    return retry


def caption_batch(rows: list[Row], cfg: CaptionConfig) -> list[list[Row] | Exception]:
    """Batch stage function: one entry per row (its output rows, or the exception that failed it).

    Rows the model captions go through ``generate`` ``batch_size`` at a time, in input order (a row whose
    frames cannot be read fails alone and is left out of its batch); the frames of the next batches are
    decoded in the background meanwhile (:func:`decoded_frames`). Rows to try again (empty, truncated, repetitive)
    keep their frames and are generated together after the first pass, with twice the budget each time.
    """
    results: list[list[Row] | Exception | None] = [None] * len(rows)
    need_model: list[int] = []
    for i, row in enumerate(rows):
        found = existing_caption(row, cfg) if cfg.use_existing else None
        if found:
            results[i] = [{**row, "text": found[0], "caption_source": found[1], "caption_flag": None}]
        elif not cfg.model:
            results[i] = RuntimeError("no caption in the data (column or sidecar) and no caption model configured")
        elif is_image(row.get("path") or ""):  # the captioners are given video frames (decord), which a still is not
            results[i] = RuntimeError("an image without a caption: the caption models here read videos; an image "
                                      "dataset's caption is kept (caption.use_existing: true)")
        else:
            need_model.append(i)
    if not need_model:
        return results  # type: ignore[return-value]
    # The family decides how frames are read; a folder that is no model of a known family stops the stage here.
    video = family_of(cfg.model).video
    tokens: collections.Counter = collections.Counter()
    # 1. First pass, streaming: batch k generates while the frames of batches k+1... are decoded.
    retry: dict[int, list[np.ndarray] | Video] = {}
    chunk: dict[int, list[np.ndarray] | Video] = {}
    with contextlib.closing(decoded_frames(rows, need_model, cfg, video)) as stream:
        for i, frames in stream:
            if isinstance(frames, Exception):
                results[i] = frames
                continue
            chunk[i] = frames
            if len(chunk) == cfg.batch_size:
                retry |= _caption_chunk(rows, chunk, cfg, cfg.max_new_tokens, cfg.retries == 0, results, tokens)
                chunk = {}
    if chunk:
        retry |= _caption_chunk(rows, chunk, cfg, cfg.max_new_tokens, cfg.retries == 0, results, tokens)
    # 2. Retries, frames already in memory: twice the budget each time.
    for attempt in range(1, cfg.retries + 1):
        todo, retry = retry, {}
        keys = list(todo)
        for start in range(0, len(keys), cfg.batch_size):
            chunk = {i: todo[i] for i in keys[start : start + cfg.batch_size]}
            retry |= _caption_chunk(rows, chunk, cfg, cfg.max_new_tokens * 2**attempt, attempt == cfg.retries,
                                    results, tokens)
    return results  # type: ignore[return-value]


def throughput(rows: list[Row], seconds: float) -> str:
    """The summary's throughput part over the output ``rows`` a run finished in ``seconds`` (its wall time, model
    loading and decoding included): clips the model captioned per second and tokens it generated per second."""
    model = [r for r in rows if r.get("caption_source") == "model"]
    n_tokens = sum(int(r["caption_tokens"]) for r in model)
    per_s = 1 / seconds if seconds > 0 else 0.0
    return f"model captioned {len(model)} clips: {len(model) * per_s:.3f} videos/s, {n_tokens * per_s:.1f} tokens/s"


def caption_row(row: Row, cfg: CaptionConfig) -> list[Row]:
    """Row stage function (the runner uses :func:`caption_batch`; this is for one-off use)."""
    [result] = caption_batch([row], cfg)
    if isinstance(result, Exception):
        raise result
    return result


def make_tiny_llava(out_dir: str | Path, seed: int = 0) -> Path:
    """Saves a random 2-layer LLaVA (tiny CLIP vision tower + tiny Llama) and its processor to ``out_dir``.

    Same layout and loading path as a real LLaVA-1.5 folder (``LlavaForConditionalGeneration`` + ``LlavaProcessor``
    with a chat template), with an offline word-level tokenizer: for tests and the GPU smoke check of the
    caption stage, where no pretrained model can be downloaded. Its captions are random words.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
        LlavaProcessor, PreTrainedTokenizerFast,
    )

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    words = "a the cat dog runs sits on red blue green car beach street man woman walks camera pans . , and".split()
    words += ["USER:", "ASSISTANT:", "describe", "this", "video", "in", "one", "detailed", "paragraph:"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=16,
                               vision_feature_select_strategy="default", chat_template=template,
                               num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=16, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                bos_token_id=1, eos_token_id=2, pad_token_id=3),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    return Path(out_dir)
