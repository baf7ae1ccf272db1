"""Text -> video, image -> video and video extension: samples one H.264 mp4 per prompt from a pipeline bundle.

    python tools/sample.py --ckpt runs/demo/stage2/export --prompt "a red circle moving left on a blue background" \\
        --num-frames 8 --height 32 --width 32 --steps 50 --cfg-scale 4 --seed 0 --out samples/

Frame conditioning (a model trained with a recipe's ``conditioning`` section, docs/training.md) keeps given
frames and generates the rest. Each flag is given once (shared by every prompt) or once per prompt, in order;
images and videos are resized to cover --height x --width and centre-cropped:

    --cond-image first.png                   image-to-video: the first frame is given
    --cond-end-image last.png                the last frame is given (with --cond-image: interpolation)
    --cond-video clip.mp4 [--cond-frames K] [--cond-from end|start]
                                             the video's last (default) or first K frames are the new
                                             video's first K frames: it continues from them
    --extend N                               N more chunks, each continuing the last K frames of the one
                                             before; one mp4 of num_frames + N * (num_frames - K) frames

K (--cond-frames) must fit the autoencoder: any count for a per-frame VAE; t*k + 1 for a causal 3D VAE of
factor t (1, 5, 9 at 4x: frame 0 is encoded alone); a multiple of t at the end. Default: the largest such count
up to half of --num-frames.

A bundle on a causal 3D VAE takes t*k + 1 frames (Wan 2.1, 4x: ``--num-frames 17``, which decodes from 5 latent
frames); another count is refused before anything loads, naming the nearest valid ones.

Videos are named ``NNN_<prompt-slug>.mp4`` and listed with their full prompts in ``OUT/prompts.tsv``.
The same seed gives the same video for the same prompt batch (``--batch-size 1``, the default, makes each video
depend only on its prompt and the seed).

Many prompts: ``--prompt-file`` (one per line). A re-run into the same ``--out`` skips every finished mp4 (files
are renamed into place when complete) and samples the rest; ``OUT/sampling.json`` records the settings and a
re-run with other ones is refused. A prompt the text encoder truncates is warned about with the tokens dropped;
the run ends with done / skipped / failed, s/video, GPU-s/video and $/video (the cost ledger's price for the GPU,
or ``--price``); a prompt that fails (e.g. out of memory) is reported and the list goes on (exit status 1).

Several GPUs (N = prompt groups x CFG split x SP degree; one output folder, each file written by its group's
first rank; the same seed gives the same video for any split):

    torchrun --standalone --nproc_per_node 8 tools/sample.py --ckpt BUNDLE --prompt-file prompts.txt \
        --num-frames 16 --height 512 --width 512 --sp-size 4 --cfg-parallel --out samples/   # 1 group of 8

``--sp-size K``: the training's Ulysses sequence parallelism over K ranks per pass (STDiT); ``--cfg-parallel``:
the conditional and unconditional passes on two ranks; the rest of N takes prompt batches round robin.
``--vae-micro-batch`` / ``--vae-tiling`` bound the decoder's memory; a per-frame VAE decodes a share of the frames
on each rank of the group. ``--cache THRESHOLD`` skips model calls on steps whose input barely changed
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from opensora.bundle import DIFFUSIONS, FrameCondition, bundle_autoencoder_shape, load_bundle, load_bundle_config
from opensora.sampling import read_prompt_file

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
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--price", type=float, default=None,
                   help="USD per GPU-hour for the summary's $/video; default: the cost ledger's price for the GPU")
    p.add_argument("--cache", type=float, default=None, metavar="THRESHOLD",
                   help="step cache: reuse the last prediction while the accumulated relative change of the model "
                        "input stays under THRESHOLD (TeaCache-like; docs/benchmarks.md measures speed vs quality)")
    par = p.add_argument_group("parallel sampling (under torchrun: N ranks = prompt groups x CFG split x SP degree)")
    par.add_argument("--sp-size", type=int, default=1, metavar="K",
                     help="ranks per video pass: Ulysses sequence parallelism over the latent frames, as in training "
                          "(STDiT; K must divide the heads and the latent frame count)")
    par.add_argument("--cfg-parallel", action="store_true",
                     help="the conditional and unconditional passes on two ranks instead of one batch")
    par.add_argument("--vae-micro-batch", type=int, default=None, metavar="N",
                     help="frames (per-frame VAE) or clips (3D VAE) per decoder call: bounds the decoder's memory; "
                          "default: the bundle's")
    par.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles (bounded memory at large sizes)")
    c = p.add_argument_group("frame conditioning (each flag once for all prompts, or once per prompt)")
    c.add_argument("--cond-image", action="append", default=[], type=Path, metavar="IMAGE",
                   help="image-to-video: this image is the first frame")
    c.add_argument("--cond-end-image", action="append", default=[], type=Path, metavar="IMAGE",
                   help="this image is the last frame")
    c.add_argument("--cond-video", action="append", default=[], type=Path, metavar="VIDEO",
                   help="continue this video: its K frames (--cond-frames, --cond-from) are the first K frames")
    c.add_argument("--cond-frames", type=int, default=None, metavar="K",
                   help="frames taken from --cond-video, and carried over between --extend chunks; default: the "
                        "largest count the autoencoder takes up to half of --num-frames")
    c.add_argument("--cond-from", choices=["end", "start"], default="end",
                   help="take the --cond-video's last K frames (continue it; default) or its first K")
    c.add_argument("--extend", type=int, default=0, metavar="N",
                   help="generate N more chunks, each conditioned on the last K frames of the one before (chunk i "
                        "samples with seed + i), and write each prompt's chunks as one continuous mp4 (the K "
                        "carried-over frames appear once)")
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
        prompts += read_prompt_file(args.prompt_file)
    if not prompts:
        raise SystemExit("error: no prompt given (use --prompt TEXT or --prompt-file FILE)")
    return prompts


def _per_prompt(values: list, flag: str, n: int) -> list:
    """One value per prompt from a flag given 0, 1 (shared) or ``n`` times."""
    if len(values) in (0, 1):
        return values * n
    if len(values) != n:
        raise SystemExit(f"error: {flag} is given {len(values)} times for {n} prompts: give it once (shared by "
                         "every prompt) or once per prompt")
    return list(values)


def _read_image(path: Path, flag: str, height: int, width: int) -> torch.Tensor:
    """(3, 1, H, W) in [-1, 1]: the image resized to cover the size and centre-cropped."""
    from PIL import UnidentifiedImageError

    from opensora.data.dataset import read_image, resize_center_crop

    if not path.is_file():
        raise SystemExit(f"error: {flag} {path}: file not found")
    try:
        frames = read_image(path)
    except (UnidentifiedImageError, OSError) as err:
        raise SystemExit(f"error: {flag} {path}: cannot read the image ({err})") from err
    return resize_center_crop(frames, (height, width))


def _read_video_frames(path: Path, k: int, take: str, height: int, width: int) -> torch.Tensor:
    """(3, K, H, W) in [-1, 1]: the first or last ``k`` frames of a video, resized and centre-cropped."""
    import numpy as np

    from opensora.data.dataset import resize_center_crop
    from opensora.data.video_io import VideoReadError, read_video, video_info

    try:
        n = video_info(path)["num_frames"]
        if k > n:
            raise SystemExit(f"error: --cond-video {path}: has {n} frames, fewer than the {k} given frames asked for "
                             "(--cond-frames)")
        indices = np.arange(k) if take == "start" else np.arange(n - k, n)
        frames = read_video(path, indices)
    except FileNotFoundError as err:
        raise SystemExit(f"error: --cond-video {path}: file not found") from err
    except (VideoReadError, IndexError) as err:
        raise SystemExit(f"error: --cond-video {path}: cannot read it ({err})") from err
    return resize_center_crop(frames, (height, width))


def read_conditions(args, n_prompts: int, vae_shape) -> tuple[list, list, int]:
    """The given start / end frames of every prompt ((3, K, H, W) or None each) and the --extend overlap K, read
    and checked against the autoencoder's frame rule before anything heavy loads (errors name the input)."""
    from opensora.diffusion.conditioning import default_start_frames, latent_frames_given

    t, causal = vae_shape.compression[0], vae_shape.causal
    if args.cond_image and args.cond_video:
        raise SystemExit("error: --cond-image and --cond-video both give the first frames: use one of them")
    if args.extend < 0:
        raise SystemExit(f"error: --extend must be >= 0, got {args.extend}")
    if args.extend and args.cond_end_image:
        raise SystemExit("error: --cond-end-image cannot be combined with --extend (every chunk would end on it)")
    if args.cond_frames is not None and args.cond_frames < 1:
        raise SystemExit(f"error: --cond-frames must be >= 1, got {args.cond_frames}")
    if args.cond_frames is not None and not (args.cond_video or args.extend):
        raise SystemExit("error: --cond-frames applies to --cond-video and --extend, and neither is given")
    k = args.cond_frames if args.cond_frames is not None else default_start_frames(args.num_frames, t, causal)
    n_start = 1 if args.cond_image else k if args.cond_video else 0
    n_end = 1 if args.cond_end_image else 0
    try:
        if n_start or n_end:
            latent_frames_given(args.num_frames, t, causal, n_start, n_end)
        if args.extend:
            latent_frames_given(args.num_frames, t, causal, k, 0)
    except ValueError as err:
        flags = [f for f, on in (("--cond-image", args.cond_image), ("--cond-video/--cond-frames", args.cond_video),
                                 ("--cond-end-image", args.cond_end_image), ("--extend/--cond-frames", args.extend))
                 if on]
        raise SystemExit(f"error: {', '.join(flags)}: {err}") from err
    H, W = args.height, args.width
    starts = [_read_image(p, "--cond-image", H, W) for p in _per_prompt(args.cond_image, "--cond-image", n_prompts)]
    if args.cond_video:
        starts = [_read_video_frames(p, k, args.cond_from, H, W)
                  for p in _per_prompt(args.cond_video, "--cond-video", n_prompts)]
    ends = [_read_image(p, "--cond-end-image", H, W)
            for p in _per_prompt(args.cond_end_image, "--cond-end-image", n_prompts)]
    return starts or [None] * n_prompts, ends or [None] * n_prompts, k


def _stack(frames: list) -> torch.Tensor | None:
    return None if frames[0] is None else torch.stack(frames)


SETTINGS_FILE = "sampling.json"  # what the videos in --out were sampled with; a resume must match it


def _settings(args, bundle, dtype_name: str, overlap: int) -> dict:
    """Everything that decides the videos' content (not how many ranks made them: any split gives the same)."""
    return dict(ckpt=str(args.ckpt.resolve()), num_frames=args.num_frames, height=args.height, width=args.width,
                steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
                sampler=args.sampler or bundle.config.diffusion, fps=args.fps, crf=args.crf,
                batch_size=args.batch_size, dtype=dtype_name, extend=args.extend,
                cond_frames=overlap if (args.cond_video or args.extend) else None, cond_from=args.cond_from,
                cond_image=[str(p) for p in args.cond_image], cond_end_image=[str(p) for p in args.cond_end_image],
                cond_video=[str(p) for p in args.cond_video], cache=args.cache)


def check_settings(out: Path, settings: dict) -> None:
    """Refuses to resume into a folder whose finished videos were sampled with other settings (they would be
    skipped as done and mixed with the new ones); the first run records them."""
    import json

    path = out / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
            raise SystemExit(f"error: {out} holds videos sampled with other settings ({what}); a re-run skips "
                             f"finished videos, so it must use the same ones: use another --out, or delete {path} "
                             "and the videos")


def warn_long_prompts(bundle, prompts: list[str], shown: int = 20) -> None:
    """One warning line per prompt the text encoder truncates (the first ``shown``), with the tokens dropped."""
    dropped = [(i, n) for i, n in enumerate(bundle.dropped_tokens(prompts)) if n]
    limit = bundle.text_encoder.max_length
    for i, n in dropped[:shown]:
        print(f"warning: prompt {i} is {limit + n} tokens, the text encoder keeps {limit}: {n} token(s) dropped "
              f"({prompts[i][:60]!r}...)", file=sys.stderr)
    if len(dropped) > shown:
        print(f"warning: {len(dropped) - shown} more prompt(s) are truncated", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import json
    import os

    import torch.distributed as dist
    from tqdm.auto import tqdm

    from opensora.accounting.gpu import default_price, detect_gpu_type
    from opensora.distributed import init_distributed
    from opensora.distributed.sequence_parallel import SamplingLayout, apply_sequence_parallel
    from opensora.sampling import (
        StepCache, finished_samples, remove_stale_temporaries, sample_filename, write_prompts_file, write_samples,
    )
    from opensora.utils import atomic_write_path

    args = parse_args(argv)
    prompts = collect_prompts(args)
    for name in ("num_frames", "height", "width", "steps", "batch_size", "sp_size", "vae_micro_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.crf <= 51:  # checked here, not by the writer after the first video was sampled
        raise SystemExit(f"error: --crf must be in [0, 51], got {args.crf}")
    if args.cfg_parallel and args.cfg_scale == 1.0:
        raise SystemExit("error: --cfg-parallel needs guidance (--cfg-scale != 1): there is no second pass")
    if args.cache is not None and args.cache < 0:
        raise SystemExit(f"error: --cache must be >= 0, got {args.cache}")
    launched = "WORLD_SIZE" in os.environ  # torchrun
    dist_info = init_distributed() if launched else None
    world, rank = (dist_info.world_size, dist_info.rank) if launched else (1, 0)
    try:
        layout = SamplingLayout.build(world, rank, args.sp_size, args.cfg_parallel)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    try:
        # Cheap (config files only): a bad path, or a size the autoencoder cannot take, fails before anything
        # heavy loads, naming the nearest valid frame counts.
        vae_shape = bundle_autoencoder_shape(args.ckpt, load_bundle_config(args.ckpt))
        if args.num_frames is None:
            args.num_frames = max(vae_shape.nearest_valid_num_frames(DEFAULT_NUM_FRAMES))
        latent = vae_shape.latent_size((args.num_frames, args.height, args.width))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    starts, ends, overlap = read_conditions(args, len(prompts), vae_shape)
    device = torch.device(args.device) if args.device else (
        dist_info.device if launched else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    bundle = load_bundle(args.ckpt, device=device, dtype=dtype, vae_micro_batch_size=args.vae_micro_batch,
                         vae_tiling=args.vae_tiling)
    try:
        bundle.latent_size(args.num_frames, args.height, args.width)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    groups = layout.new_groups() if launched else {"sp": None, "cfg": None, "video": None}
    if args.sp_size > 1:  # the training's Ulysses SP over the latent frames
        if not bundle.family.supports_sequence_parallel:
            raise SystemExit(f"error: --sp-size {args.sp_size}: the {bundle.config.family} family does not support "
                             "sequence parallelism; use --sp-size 1 (prompts and --cfg-parallel still split)")
        if latent[0] % args.sp_size:
            raise SystemExit(f"error: --sp-size {args.sp_size} must divide the latent frame count {latent[0]} "
                             f"(--num-frames {args.num_frames})")
        try:
            apply_sequence_parallel(bundle.model, groups["sp"])
        except ValueError as err:
            raise SystemExit(f"error: --sp-size {args.sp_size}: {err}") from err

    args.out.mkdir(parents=True, exist_ok=True)
    settings = _settings(args, bundle, dtype_name, overlap)
    check_settings(args.out, settings)  # every rank reads it before rank 0 may write it: all stop alike
    if rank == 0 and (stale := remove_stale_temporaries(args.out)):  # before the barrier: no writer runs yet
        print(f"removed {stale} half-written video(s) a killed run left in {args.out}", file=sys.stderr)
    finished = [finished_samples(args.out, prompts)]  # decided once, so every rank of a group skips alike
    if launched:
        dist.barrier()
        dist.broadcast_object_list(finished, src=0)
    finished = finished[0]
    if rank == 0:
        if not (args.out / SETTINGS_FILE).is_file():
            with atomic_write_path(args.out / SETTINGS_FILE) as tmp:
                tmp.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
        warn_long_prompts(bundle, prompts)

    # Batches are cut from the whole list, so a video's batch (and so its noise) does not depend on what a
    # previous run finished; video groups take them round robin.
    batches = list(range(0, len(prompts), args.batch_size))[layout.dp_rank::layout.dp_size]
    show = not args.no_progress and rank == 0
    bar = tqdm(total=sum(min(args.batch_size, len(prompts) - b) for b in batches), desc="prompts", unit="prompt",
               disable=not show, dynamic_ncols=True)
    cache = StepCache(args.cache) if args.cache is not None else None
    options = dict(steps=args.steps, cfg_scale=args.cfg_scale, sampler=args.sampler, progress=show,
                   cfg_group=groups["cfg"], decode_group=groups["video"], cache=cache)
    done, skipped, failed, t_start = 0, 0, [], time.perf_counter()
    for start in batches:
        batch = prompts[start : start + args.batch_size]
        todo = [j for j in range(len(batch)) if not finished[start + j]]
        skipped += len(batch) - len(todo)
        if todo:
            given = slice(start, start + len(batch))
            cond = FrameCondition(start=_stack(starts[given]), end=_stack(ends[given]))
            try:
                videos = bundle.generate(batch, args.num_frames, args.height, args.width, seed=args.seed,
                                         cond=cond if cond.counts != (0, 0) else None, **options)  # (B, 3, T, H, W)
                for chunk in range(1, args.extend + 1):  # each chunk continues the last `overlap` frames so far
                    more = bundle.generate(batch, args.num_frames, args.height, args.width, seed=args.seed + chunk,
                                           cond=FrameCondition(start=videos[:, :, -overlap:]), **options)
                    videos = torch.cat([videos, more[:, :, overlap:]], dim=2)  # the given frames are already there
                if layout.is_owner:  # finished videos of a partly done batch stay as they are
                    for j in todo:
                        write_samples(args.out, videos[j : j + 1], [batch[j]], fps=args.fps, crf=args.crf,
                                      start=start + j)
                done += len(todo)
            except (RuntimeError, ValueError, OSError) as err:  # e.g. out of memory: the rest of the list goes on
                failed += [(start + j, f"{type(err).__name__}: {err}") for j in todo]
                print(f"error: prompt(s) {[start + j for j in todo]} failed: {type(err).__name__}: {err}",
                      file=sys.stderr)
        bar.update(len(batch))
    bar.close()
    elapsed = time.perf_counter() - t_start

    mine = dict(done=done, skipped=skipped, failed=failed,
                calls=cache.calls if cache else 0, cached=cache.skipped if cache else 0) if layout.is_owner else None
    reports = [mine]
    if launched:
        reports = [None] * world
        dist.all_gather_object(reports, mine)  # also the barrier: every owner has written its files
    reports = [r for r in reports if r is not None]
    if rank == 0:
        write_prompts_file(args.out, [(args.out / sample_filename(i, p), p)
                                      for i, (p, ok) in enumerate(zip(prompts, finished_samples(args.out, prompts)))
                                      if ok])
        done, skipped = sum(r["done"] for r in reports), sum(r["skipped"] for r in reports)
        failed = [f for r in reports for f in r["failed"]]
        gpu_type = detect_gpu_type(device)
        price = args.price if args.price is not None else default_price(gpu_type)
        frames = args.num_frames + args.extend * (args.num_frames - overlap)
        print(f"wrote {done} video(s) to {args.out} in {elapsed:.2f} s; skipped {skipped} finished, failed "
              f"{len(failed)} ({frames}x{args.height}x{args.width}, {args.steps} steps, "
              f"{args.sampler or bundle.config.diffusion}, cfg {args.cfg_scale}, seed {args.seed}; {world} rank(s): "
              f"{layout.dp_size} prompt group(s) x cfg {layout.cfg_size} x sp {layout.sp_size})")
        if done:
            gpu_s = elapsed * world / done  # every rank is held for the whole job
            cost = (f"${gpu_s / 3600 * price:.4f}/video at ${price:.2f}/GPU-hour ({gpu_type})" if price is not None
                    else f"no price for {gpu_type!r}: give --price")
            print(f"{elapsed / done:.2f} s/video, {gpu_s:.2f} {'GPU' if device.type == 'cuda' else 'CPU'}-s/video, "
                  f"{cost}")
        if cache is not None:
            calls, cached = sum(r["calls"] for r in reports), sum(r["cached"] for r in reports)
            print(f"step cache (threshold {args.cache}): {cached} of {calls} model calls skipped "
                  f"({cached / max(calls, 1):.0%})")
        for i, why in failed:
            print(f"failed: prompt {i} ({prompts[i][:60]!r}): {why}", file=sys.stderr)
    if launched:
        failed_any = [bool(failed)]
        dist.broadcast_object_list(failed_any, src=0)
        return 1 if failed_any[0] else 0
    return 1 if failed else 0


if __name__ == "__main__":
    if "WORLD_SIZE" in __import__("os").environ:  # torchrun: leave without the interpreter's teardown
        from opensora.distributed import exit_process

        exit_process(main())
    raise SystemExit(main())
