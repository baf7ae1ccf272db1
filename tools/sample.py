"""Text -> video: samples one H.264 mp4 per prompt from a pipeline bundle.

    python tools/sample.py --ckpt runs/demo/stage2/export --prompt "a red circle moving left on a blue background" \\
        --num-frames 8 --height 32 --width 32 --steps 50 --cfg-scale 4 --seed 0 --out samples/

A bundle on a causal 3D VAE takes t*k + 1 frames (Wan 2.1, 4x: ``--num-frames 17``, which decodes from 5 latent
frames); another count is refused before anything loads, naming the nearest valid ones.

Videos are named ``NNN_<prompt-slug>.mp4`` and listed with their full prompts in ``OUT/prompts.tsv``.
The same seed gives the same video for the same prompt batch (``--batch-size 1``, the default, makes each video
depend only on its prompt and the seed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from opensora.bundle import DIFFUSIONS, bundle_autoencoder_shape, load_bundle, load_bundle_config
from opensora.utils import atomic_write_path, slugify

DEFAULT_NUM_FRAMES = 16  # Open-Sora 1.0's; an autoencoder that does not take it gets the next count it takes


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, type=Path, help="pipeline bundle directory (init_checkpoint or a training export)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", type=Path, help="text file, one prompt per line (blank lines and # comments skipped)")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames per video; the bundle's autoencoder must take it (a 4x causal VAE: 4k+1, e.g. 17). "
                        "Default: 16, or the nearest larger count the autoencoder takes (17 at 4x causal)")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=100, help="sampling steps")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=DIFFUSIONS, default=None, help="default: the bundle's training objective")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate written into the mp4")
    p.add_argument("--crf", type=int, default=18,
                   help="H.264 quality, 0 (lossless) .. 51; 18 is visually lossless. The sampled frames depend only "
                        "on the seed, but libx264's lossy choices vary with machine load, so only 0 gives "
                        "bit-identical decoded frames for the same seed")
    p.add_argument("--batch-size", type=int, default=1, help="prompts sampled together")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def collect_prompts(args) -> list[str]:
    prompts = []
    for i, text in enumerate(args.prompt):
        if not text.strip():
            raise SystemExit(f"error: --prompt number {i + 1} is empty")
        prompts.append(text.strip())
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise SystemExit(f"error: prompt file not found: {args.prompt_file}")
        for line in args.prompt_file.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                prompts.append(line.strip())
    if not prompts:
        raise SystemExit("error: no prompt given (use --prompt TEXT or --prompt-file FILE)")
    return prompts


def main(argv: list[str] | None = None) -> int:
    from opensora.data.video_io import tensor_to_frames, write_video

    args = parse_args(argv)
    prompts = collect_prompts(args)
    for name in ("num_frames", "height", "width", "steps", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.crf <= 51:  # checked here, not by the writer after the first video was sampled
        raise SystemExit(f"error: --crf must be in [0, 51], got {args.crf}")
    try:
        # Cheap (config files only): a bad path, or a size the autoencoder cannot take, fails before anything
        # heavy loads, naming the nearest valid frame counts.
        vae_shape = bundle_autoencoder_shape(args.ckpt, load_bundle_config(args.ckpt))
        if args.num_frames is None:
            args.num_frames = max(vae_shape.nearest_valid_num_frames(DEFAULT_NUM_FRAMES))
        vae_shape.latent_size((args.num_frames, args.height, args.width))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    bundle = load_bundle(args.ckpt, device=device, dtype=dtype)
    try:
        bundle.latent_size(args.num_frames, args.height, args.width)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err

    args.out.mkdir(parents=True, exist_ok=True)
    written, t_start = [], time.perf_counter()
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        videos = bundle.generate(
            batch, args.num_frames, args.height, args.width, steps=args.steps, cfg_scale=args.cfg_scale,
            seed=args.seed, sampler=args.sampler, progress=not args.no_progress,
        )  # (B, 3, T, H, W)
        for j, (prompt, video) in enumerate(zip(batch, videos)):
            path = args.out / f"{start + j:03d}_{slugify(prompt)}.mp4"
            write_video(path, tensor_to_frames(video), fps=args.fps, crf=args.crf)
            written.append((path, prompt))
    elapsed = time.perf_counter() - t_start
    with atomic_write_path(args.out / "prompts.tsv") as tmp:
        tmp.write_text("file\tprompt\n" + "".join(f"{p.name}\t{t}\n" for p, t in written), encoding="utf-8")
    print(f"wrote {len(written)} video(s) to {args.out} in {elapsed:.1f} s "
          f"({elapsed / len(written):.2f} s/video; {args.num_frames}x{args.height}x{args.width}, "
          f"{args.steps} steps, {args.sampler or bundle.config.diffusion}, cfg {args.cfg_scale}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
