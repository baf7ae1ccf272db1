"""Step cache speed vs quality: samples the same prompts without and with ``--cache`` thresholds, one table.

    python tools/bench_sampling.py --ckpt runs/demo/train/frames8/export --num-frames 8 --height 16 --width 16 \\
        --steps 50 --thresholds 0.02 0.05 0.1 0.2

Per threshold: seconds per video, speed-up over no cache, the share of model calls skipped, PSNR of the cached
videos against the uncached ones (same seed), and, for shapes captions (the demo's), the colour / direction
check of opensora.eval.colour_motion on both. docs/benchmarks.md has the measured tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEMO_PROMPTS = ["a red square moving down on a gray background", "a green circle moving right on a white background",
                "a blue triangle moving up on a black background", "a yellow circle moving left on a gray background"]


def main(argv: list[str] | None = None) -> int:
    import torch

    from opensora.bundle import load_bundle
    from opensora.data.video_io import tensor_to_frames
    from opensora.eval.colour_motion import check_videos, parse_caption
    from opensora.sampling import StepCache

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, type=Path)
    p.add_argument("--prompt", action="append", default=None, help="default: 4 of the demo's held-out captions")
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--height", type=int, default=16)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timings: the fastest of this many runs (a shared machine)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    args = p.parse_args(argv)
    prompts = args.prompt or DEMO_PROMPTS
    bundle = load_bundle(args.ckpt, device="cpu")
    shapes = all(parse_caption(t) for t in prompts)

    def run(threshold):
        best = float("inf")
        for _ in range(args.repeats):
            cache = None if threshold is None else StepCache(threshold)
            t0 = time.perf_counter()
            videos = [bundle.generate([t], args.num_frames, args.height, args.width, steps=args.steps,
                                      cfg_scale=args.cfg_scale, seed=args.seed, progress=False, cache=cache)[0]
                      for t in prompts]
            best = min(best, (time.perf_counter() - t0) / len(prompts))
        return videos, best, cache

    def check(videos):
        if not shapes:
            return "-"
        r = check_videos([tensor_to_frames(v) for v in videos], prompts)
        return f"{r.colour_share:.0%} / {r.direction_share:.0%}"

    bundle.generate(prompts[:1], args.num_frames, args.height, args.width, steps=2, progress=False)  # warm-up
    ref, ref_s, _ = run(None)
    print(f"{len(prompts)} prompts, {args.num_frames}x{args.height}x{args.width}, {args.steps} steps, "
          f"cfg {args.cfg_scale}, {bundle.config.diffusion}; torch threads {torch.get_num_threads()}; "
          f"fastest of {args.repeats} runs")
    print("| cache threshold | s/video | speed-up | model calls skipped | PSNR vs uncached (dB) | colour / direction |")
    print("|---|---|---|---|---|---|")
    print(f"| off | {ref_s:.2f} | 1.00x | 0% | - | {check(ref)} |")
    for threshold in args.thresholds:
        videos, s, cache = run(threshold)
        mse = torch.stack([((a - b) / 2).pow(2).mean() for a, b in zip(videos, ref)]).mean()  # on [0, 1] pixels
        psnr = float("inf") if mse == 0 else float(10 * torch.log10(1 / mse))
        print(f"| {threshold:g} | {s:.2f} | {ref_s / s:.2f}x | {cache.skipped_share:.0%} | {psnr:.1f} | "
              f"{check(videos)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
