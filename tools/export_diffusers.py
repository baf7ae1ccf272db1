"""Writes a pipeline bundle (Wan, LTX-Video) as the family's own diffusers pipeline folder.

    python tools/export_diffusers.py --bundle runs/wan-lora/wan/export --out exports/wan-lora-diffusers

The folder (``model_index.json``, ``transformer/``, ``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/`` with
the family's published scheduler) loads with diffusers alone::

    pipe = diffusers.DiffusionPipeline.from_pretrained("exports/wan-lora-diffusers")   # a WanPipeline
    video = pipe("a red square moving left", num_frames=81, height=480, width=832).frames[0]

A LoRA stage's export holds the adapters merged into the transformer, and the adapters alone in
``lora/pytorch_lora_weights.safetensors``, for the *base* model's pipeline (e.g. Wan2.1-T2V-1.3B-Diffusers)::

    base = diffusers.WanPipeline.from_pretrained("/models/Wan2.1-T2V-1.3B-Diffusers")
    base.load_lora_weights("exports/wan-lora-diffusers/lora")

Weights are saved as stored in the bundle (fp32 after training) unless ``--dtype bf16``. The text encoder and VAE are
written out in full (a bundle that references a pretrained folder is made self-contained).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from opensora.config import ConfigError
from opensora.diffusers_export import LORA_SUBFOLDER, export_diffusers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, type=Path, help="pipeline bundle (init_checkpoint or a stage's export)")
    p.add_argument("--out", required=True, type=Path, help="diffusers pipeline folder to write (must not exist)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="weight dtype (default: as stored)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        pipe = export_diffusers(args.bundle, args.out, dtype=DTYPES[args.dtype] if args.dtype else None)
    except (ConfigError, FileExistsError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from err
    lora = args.out / LORA_SUBFOLDER
    print(f"wrote {args.out}: {type(pipe).__name__} with {type(pipe.scheduler).__name__}"
          + (f"; the LoRA adapters for the base pipeline in {lora}" if lora.is_dir() else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
