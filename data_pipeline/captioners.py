"""Caption model families and backends: how each family takes a clip's frames, and who runs ``generate``.

A model folder's ``config.json`` (its ``model_type``) picks the family in :data:`FAMILIES`. Image families
(LLaVA 1.5 / 1.6) see ``frame_positions`` frames as separate images (or one ``grid`` image); video families
(LLaVA-OneVision / LLaVA-Video, LLaVA-NeXT-Video, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) see ``video_frames`` frames
spread evenly over the clip as *one video*, their native multi-frame input: the chat message holds one
``{"type": "video"}`` entry, the family's chat template (the folder's own) places the family's video token, and
the processor turns the frames into the family's video tensors (Qwen: patches of 2 frames with temporal
positions; the frame times come from the clip's frame rate through ``video_metadata``).

Backends: ``transformers`` (``AutoModelForImageTextToText``, batched greedy ``generate``) and ``vllm`` (vLLM's
offline engine: all prompts of a call are handed to it at once and it batches them continuously; imported only
when chosen). Both return, per clip, the raw text, whether the budget ran out first, and the tokens generated.

The video processors of transformers need torchvision; a folder of a video family loads with a
:class:`SetupError` saying so where torchvision is missing.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data_pipeline.config import CaptionConfig
from data_pipeline.rows import SetupError


@dataclass(frozen=True)
class Family:
    """How a family of models takes a clip."""

    name: str
    video: bool  # the frames go in as one video (the model's own multi-frame input), else as images


# config.model_type -> family. LLaVA-Video's -hf conversions are llava_onevision folders.
FAMILIES: dict[str, Family] = {
    "llava": Family("LLaVA 1.5", video=False),
    "llava_next": Family("LLaVA-NeXT (1.6)", video=False),
    "llava_onevision": Family("LLaVA-OneVision / LLaVA-Video", video=True),
    "llava_next_video": Family("LLaVA-NeXT-Video", video=True),
    "qwen2_vl": Family("Qwen2-VL", video=True),
    "qwen2_5_vl": Family("Qwen2.5-VL", video=True),
    "qwen3_vl": Family("Qwen3-VL", video=True),
    "qwen3_vl_moe": Family("Qwen3-VL MoE", video=True),
}


class Video(NamedTuple):
    """A clip's frames as one video: ``frames`` (T, H, W, 3) uint8, taken at ``indices`` of its ``total`` frames."""

    frames: np.ndarray
    indices: list[int]
    total: int
    fps: float

    def metadata(self) -> dict:
        """transformers' ``VideoMetadata`` fields: the processors time the frames with them (Qwen2.5-VL's
        ``second_per_grid_ts``, Qwen3-VL's timestamps); without them they assume 24 fps sampling."""
        return {"total_num_frames": self.total, "fps": self.fps, "frames_indices": list(self.indices),
                "height": int(self.frames.shape[1]), "width": int(self.frames.shape[2])}


class Generated(NamedTuple):
    """One clip's generation: raw text, truncated (no stop token within the budget), tokens generated."""

    text: str
    truncated: bool
    tokens: int


@functools.lru_cache(maxsize=4)
def family_of(model_dir: str) -> Family:
    """The family of a local model folder, from its ``config.json``; a SetupError for a missing folder or one
    of another family (the stage stops instead of failing every row alike)."""
    config = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise SetupError(f"caption model folder not found: {model_dir}")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8"))["model_type"]
    except (OSError, ValueError, KeyError) as err:
        raise SetupError(f"caption model {model_dir}: no readable config.json with a model_type ({err})") from err
    if model_type not in FAMILIES:
        raise SetupError(f"caption model {model_dir} is a {model_type!r} model; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def video_positions(n: int) -> list[float]:
    """``n`` relative positions spread evenly over a clip (the middle of ``n`` equal parts)."""
    return [(k + 0.5) / n for k in range(n)]


def load_processor(model_dir: str):
    """The folder's processor (tokenizer, image / video processor, chat template)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir, local_files_only=True)


@functools.lru_cache(maxsize=1)
def load_model(model_dir: str, device: str, dtype: str):
    """(model, processor) of a supported family from a local folder, loaded straight onto ``device``."""
    import torch
    from transformers import AutoModelForImageTextToText

    family = family_of(model_dir)
    try:
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        # Straight onto the device: from_pretrained(...).to(device) first builds the whole model in host memory,
        # one copy per rank (8 ranks x 14 GB for a 7B model in bf16) before any of it reaches a GPU.
        # local_files_only: a typo'd path must not be taken for a model hub id.
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), device_map={"": device}, local_files_only=True).eval()
        processor = load_processor(model_dir)
    except Exception as err:
        hint = ""
        if family.video and importlib.util.find_spec("torchvision") is None:
            hint = " (transformers' video processors need torchvision: install the build that matches your torch)"
        raise SetupError(f"caption model {model_dir} could not be loaded: {type(err).__name__}: {err}{hint}") from err
    processor.tokenizer.padding_side = "left"  # decoder-only batched generation continues on the right
    return model, processor


def chat_prompt(processor, visual, prompt: str) -> str:
    """The family's own chat template over one user turn: one video entry, or one image entry per frame."""
    if isinstance(visual, Video):
        content = [{"type": "video"}]
    else:
        content = [{"type": "image"} for _ in visual]
    content.append({"type": "text", "text": prompt})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _stop_ids(model, tokenizer) -> tuple[list[int], dict]:
    """The model's own stop tokens (its generation config): a chat model ends a turn with its own token
    (Llama-3-based LLaVA: <|eot_id|>, Qwen: <|im_end|>), which the tokenizer's eos_token may not be; the
    tokenizer's is the fallback (also passed to generate) for a folder whose generation config names none."""
    stop = model.generation_config.eos_token_id
    stop_ids = sorted({stop} if isinstance(stop, int) else set(stop or ()))
    if stop_ids:
        return stop_ids, {}
    return [tokenizer.eos_token_id], {"eos_token_id": tokenizer.eos_token_id}


def generate_transformers(visuals: list, cfg: CaptionConfig, max_new_tokens: int, device: str) -> list[Generated]:
    """One batched greedy ``generate`` over the clips' images or videos."""
    import torch

    model, processor = load_model(cfg.model, device, cfg.dtype)
    prompts = [chat_prompt(processor, v, cfg.prompt) for v in visuals]
    if all(isinstance(v, Video) for v in visuals):
        inputs = processor(text=prompts, videos=[v.frames for v in visuals],
                           video_metadata=[v.metadata() for v in visuals], do_sample_frames=False,
                           padding=True, return_tensors="pt")
    else:
        inputs = processor(images=[frame for frames in visuals for frame in frames], text=prompts, padding=True,
                           return_tensors="pt")
    inputs = inputs.to(device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(model.dtype)
    tokenizer = processor.tokenizer
    stop_ids, extra = _stop_ids(model, tokenizer)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **extra)
    new = out[:, inputs["input_ids"].shape[1]:]  # (B, L_new)
    is_stop = torch.isin(new, torch.tensor(stop_ids, device=new.device))  # (B, L_new)
    truncated = (~is_stop.any(dim=1)).tolist()
    # tokens generated: up to and with the first stop token; after it generate only pads the finished rows
    tokens = torch.where(is_stop.any(dim=1), is_stop.int().argmax(dim=1) + 1, new.shape[1]).tolist()
    texts = processor.batch_decode(new, skip_special_tokens=True)
    return [Generated(t, bool(c), int(n)) for t, c, n in zip(texts, truncated, tokens)]


@functools.lru_cache(maxsize=1)
def load_vllm(model_dir: str, dtype: str, max_model_len: int, gpu_memory_utilization: float, max_frames: int):
    """(vLLM engine, processor for the chat template); the engine is vLLM's offline ``LLM``."""
    if importlib.util.find_spec("vllm") is None:
        raise SetupError("caption.backend: vllm, but vLLM is not installed (pip install vllm, on a CUDA machine; "
                         "each vLLM release pins its torch, so give it its own environment)")
    from vllm import LLM

    family = family_of(model_dir)
    limit = {"video": 1} if family.video else {"image": max_frames}
    try:
        llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len or None,
                  gpu_memory_utilization=gpu_memory_utilization, limit_mm_per_prompt=limit)
        processor = load_processor(model_dir)
    except Exception as err:
        raise SetupError(f"caption model {model_dir} could not be loaded by vLLM: {type(err).__name__}: {err}") from err
    return llm, processor


def generate_vllm(visuals: list, cfg: CaptionConfig, max_new_tokens: int) -> list[Generated]:
    """All clips of the call handed to vLLM at once: its scheduler batches them continuously (a finished
    caption's slot goes to the next request at once), so a call should hold many clips (``batch_size`` 64+)."""
    llm, processor = load_vllm(cfg.model, cfg.dtype, cfg.vllm_max_model_len, cfg.vllm_gpu_memory_utilization,
                               max(cfg.num_frames, 1))
    from vllm import SamplingParams  # after load_vllm, which says plainly when vLLM is missing

    requests = []
    for v in visuals:
        data = {"video": (v.frames, v.metadata())} if isinstance(v, Video) else {"image": list(v)}
        requests.append({"prompt": chat_prompt(processor, v, cfg.prompt), "multi_modal_data": data})
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    outputs = llm.generate(requests, params, use_tqdm=False)  # in the order of the requests
    return [Generated(o.outputs[0].text, o.outputs[0].finish_reason == "length", len(o.outputs[0].token_ids))
            for o in outputs]
