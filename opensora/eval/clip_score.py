"""CLIP score of sampled videos against their prompts: how well the frames match the text, by a CLIP model.

Per video: the mean over its frames of ``100 * max(cos(image embedding, text embedding), 0)`` (the CLIP score
of Hessel et al. 2021 as torchmetrics computes it, averaged over frames as video papers report it). The model is
loaded with transformers from a local directory only (``openai/clip-vit-large-patch14`` saved by the user, or a
snapshot in their HF cache): nothing is downloaded. ``make_tiny_clip`` writes a random 2-layer CLIP with an
offline tokenizer for tests.

    scorer = ClipScorer("/models/clip-vit-large-patch14", device="cuda")
    scorer.scores([frames_uint8_THW3, ...], ["a red circle moving left", ...])   # -> [24.1, ...]
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch


class ClipScorer:
    """A frozen CLIP model and its processor (the validation metric ``clip_score``).

    Args:
        path: a local directory with ``config.json``, the weights, the tokenizer and the image processor.
        device: where the model runs.
        max_frames: frames per video scored (spread evenly over the video); the score averages over them.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", max_frames: int = 8):
        from transformers import AutoProcessor, CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"CLIP model not found: {path} has no config.json (give a local directory: "
                                    "a saved CLIPModel with its processor)")
        try:
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
            self.processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load a CLIP model and processor from {path}: {err}") from err
        self.device = torch.device(device)
        self.max_frames = max_frames

    @torch.no_grad()
    def scores(self, videos: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        """CLIP score (0-100) of each uint8 (T, H, W, 3) video against its prompt."""
        if len(videos) != len(prompts):
            raise ValueError(f"clip score: {len(videos)} videos but {len(prompts)} prompts")
        out = []
        for video, prompt in zip(videos, prompts):
            pick = np.linspace(0, len(video) - 1, min(self.max_frames, len(video))).round().astype(int)
            inputs = self.processor(text=[prompt], images=list(video[pick]), return_tensors="pt", padding=True,
                                    truncation=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            image = _embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
            text = _embedding(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                            attention_mask=inputs.get("attention_mask")))
            image = torch.nn.functional.normalize(image.float(), dim=-1)
            text = torch.nn.functional.normalize(text.float(), dim=-1)
            out.append(float((100 * (image @ text.T).clamp(min=0)).mean()))
        return out

    def __call__(self, videos: Sequence[np.ndarray], prompts: Sequence[str]) -> dict:
        """The validation scorer: ``val_clip_score`` (mean over the videos) and a label per video."""
        scores = self.scores(videos, prompts)
        return {"val_clip_score": float(np.mean(scores)), "_labels": [f"CLIP {s:.1f}" for s in scores]}


def _embedding(out) -> torch.Tensor:
    """The projected embedding: a tensor (older transformers) or the pooled output of a model-output object."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def make_tiny_clip(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Writes a random 2-layer CLIP (text and vision), its tokenizer (byte-level vocabulary, no merges) and image
    processor to ``out_dir``, loadable by :class:`ClipScorer`. For tests: the scores mean nothing."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from tokenizers.pre_tokenizers import ByteLevel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    torch.manual_seed(seed)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **small),
        vision_config=dict(image_size=image_size, patch_size=8, **small),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out
