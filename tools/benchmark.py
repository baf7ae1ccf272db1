"""Training-step throughput and MFU of a video transformer (STDiT, Wan, LTX-Video; full or LoRA): samples/s,
tokens/s, TFLOP/s, MFU, peak memory, time shares.

Times the trainer's own step — ``opensora.training.step.TrainStep`` (seeded noise and timesteps, the engine's
gradient sync and autocast, diffusion loss, backward, clip + AdamW through the engine), then the fp32 EMA
update — on synthetic inputs of the requested shape, and writes one JSON record::

    python tools/benchmark.py --model STDiT-XL/2 --frames 16 --height 256 --width 256 --batch 8 \
        --engine fsdp --compile --cached-latents --steps 20 --out runs/bench/xl2-256.json
    torchrun --nproc_per_node 8 tools/benchmark.py ... --engine fsdp     # per-GPU figures, N ranks
    python tools/benchmark.py --model STDiT-debug --frames 4 --height 32 --width 32 --batch 2 --engine ddp \
        --steps 3 --out bench.json                                         # CPU smoke run
    python tools/benchmark.py --model STDiT-XL/2 --frames 17 --height 256 --width 256 --cached-latents \
        --vae-compression 4x8x8 --latent-channels 16 ...                   # on Wan 2.1's latents (5x32x32x16)
    python tools/benchmark.py --model Wan2.1-T2V-1.3B --frames 81 --height 480 --width 832 --batch 1 \
        --cached-latents --vae-compression 4x8x8 --grad-ckpt --lora 32 ...  # any family's size; LoRA of rank 32

Other families (``opensora.models.families``: ``tiny-wan2.1``, ``Wan2.1-T2V-1.3B``, ``tiny-ltx``, ...) take cached
latents (their text states are padded to the family's length: 512 for Wan, 128 for LTX) and their own FLOP count;
``--lora RANK`` trains only adapters on the family's LoRA targets (alpha = rank), as a stage's ``lora:`` does.

Without torchrun the engine runs on a world of one (DDP of one process is the closest to a bare model).

How it measures (so the numbers compare with Open-Sora's and torchtitan's):
- Model FLOPs per sample = 3 × forward FLOPs (``opensora.accounting.flops``; recomputation from activation
  checkpointing is not counted, so checkpointing lowers MFU honestly). MFU = achieved model FLOP/s per device
  over the dense bf16 datasheet peak of the detected GPU (``opensora.accounting.gpu``); also reported against a
  matmul peak measured on the spot.
- Time: after ``--warmup`` steps, ``--steps`` steps are timed with CUDA events on a GPU (wall clock on a CPU).
  The step has no host sync: the loss is read once after the timed region.
- ``--cached-latents``: the step sees latents and text embeddings (what ``opensora.data.latent_cache`` feeds).
  Without it the step also runs the VAE encoder on a video and the T5 encoder on token ids, as Open-Sora 1.0 did;
  their share of the step is timed separately (events around each phase, measured in a separate pass so the
  main timing stays sync-free). Encoders: ``--vae`` / ``--text-encoder`` local paths, else models of the real
  architecture (SD-VAE, T5-v1.1-XXL) with random weights — same FLOPs, nothing downloaded.
- The attention kernel that actually ran is read from a one-step profiler trace on CUDA (flash / cuDNN /
  memory-efficient / math).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opensora.accounting.gpu import detect_gpu_type, measure_matmul_tflops, peak_tflops  # noqa: E402
from opensora.config import ConfigError, merge, parse_overrides  # noqa: E402
from opensora.diffusion import build_scheduler  # noqa: E402
from opensora.distributed import exit_process  # noqa: E402
from opensora.models.autoencoders import AutoencoderShape  # noqa: E402
from opensora.models.families import FAMILIES, ModelFamily, family_of_size  # noqa: E402
from opensora.models.stdit import STDiT, stdit_config  # noqa: E402
from opensora.training.metrics import peak_memory_gb  # noqa: E402
from opensora.utils import atomic_write_path  # noqa: E402

# Open-Sora 1.0's reported training throughput (docs/acceleration.md of hpcaitech/Open-Sora, v1.0.0), H800,
# STDiT-XL/2, T5 and VAE inside the step. Printed beside our figures.
OPENSORA_V1_SAMPLES_PER_S = {(16, 256, 256): 7.0, (16, 512, 512): 1.45}

# Architecture of the encoders Open-Sora 1.0 used, for benchmarking without their weights.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=256,
                     down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                     block_out_channels=[128, 256, 512, 512], layers_per_block=2)
T5_XXL_CONFIG = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                     feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="STDiT-XL/2",
                   help=f"a named size of any family: {', '.join(s for f in FAMILIES.values() for s in f.sizes)}")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="samples per device per step")
    p.add_argument("--engine", default="fsdp", choices=["fsdp", "ddp", "colossalai"],
                   help="parallel engine, as in training (world of one without torchrun)")
    p.add_argument("--diffusion", default=None, choices=["iddpm", "rflow"],
                   help="training objective (default: the family's: iddpm for STDiT, rflow for Wan / LTX)")
    p.add_argument("--lora", type=int, default=None, metavar="RANK",
                   help="train LoRA adapters of this rank (alpha = rank) on the family's targets, the base frozen")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, inputs and the step's noise")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--grad-ckpt-blocks", type=int, default=None, metavar="N",
                   help="selective checkpointing: only the first N blocks (implies --grad-ckpt)")
    p.add_argument("--cached-latents", action="store_true", help="feed latents + text embeddings (no VAE / T5)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--vae", default=None,
                   help="local autoencoder dir for inline encoding (any class load_autoencoder reads; the latent "
                        "shape and the model's in_channels follow it; default: random SD-VAE)")
    p.add_argument("--text-encoder", default=None, help="local T5 dir for inline encoding (default: random T5-XXL)")
    p.add_argument("--vae-downsample", type=int, default=None, choices=[1, 8],
                   help="spatial factor of a per-frame VAE: 8 = SD-VAE (default), 1 = pixel space (identity)")
    p.add_argument("--vae-compression", metavar="TxHxW", default=None,
                   help="latent shape of a 3D VAE for --cached-latents, e.g. 4x8x8 (Wan 2.1; causal when T > 1: "
                        "4k+1 frames, 17 -> 5 latent frames); instead of --vae-downsample")
    p.add_argument("--latent-channels", type=int, default=None,
                   help="latent channels = the model's in_channels (e.g. 16 for Wan 2.1; default: the model's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, autotune, allocator)")
    p.add_argument("--no-matmul-peak", action="store_true", help="skip the measured matmul peak")
    p.add_argument("--out", default=None, help="JSON file for the result")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field, e.g. --set depth=4")
    args = p.parse_args(argv)
    args.grad_ckpt = args.grad_ckpt or args.grad_ckpt_blocks is not None
    given = [name for name, v in (("--vae", args.vae), ("--vae-downsample", args.vae_downsample),
                                  ("--vae-compression", args.vae_compression)) if v is not None]
    if len(given) > 1:
        p.error(f"give one of --vae, --vae-downsample, --vae-compression (got {' and '.join(given)})")
    if args.vae_compression is not None and not args.cached_latents:
        p.error("--vae-compression gives the latent shape of --cached-latents; to encode inline, give --vae DIR")
    if args.latent_channels is not None and args.latent_channels < 1:
        p.error(f"--latent-channels must be >= 1, got {args.latent_channels}")
    if args.lora is not None and args.lora < 1:
        p.error(f"--lora must be >= 1, got {args.lora}")
    return args


def autoencoder_of(args) -> AutoencoderShape:
    """The latent shape the step sees: ``--vae`` DIR's (read from its config.json), ``--vae-compression``'s, or a
    per-frame VAE's (``--vae-downsample``, 8 by default); channels from ``--latent-channels`` where given."""
    from opensora.models.vae import VAEConfig, autoencoder_shape

    try:
        if args.vae:
            shape = autoencoder_shape(VAEConfig(path=args.vae))
        elif args.vae_compression:
            shape = AutoencoderShape.parse(args.vae_compression)
        else:
            shape = AutoencoderShape.per_frame(args.vae_downsample or 8)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    if args.latent_channels is not None:
        shape = dataclasses.replace(shape, latent_channels=args.latent_channels)
    return shape


def _build_encoders(args, device, dtype, cfg):
    """Inline VAE + text encoder for the non-cached mode: local weights if given, else random real-size ones.

    ``--vae DIR`` loads that autoencoder (its class from config.json); without it, ``--vae-downsample 1`` means
    the pixel-space identity autoencoder (3 channels), 8 (the default) an SD-VAE (4 channels): the model's
    ``in_channels`` must match (checked by the caller).
    """
    from transformers import T5Config, T5EncoderModel

    from opensora.models.text_encoder import T5TextEncoder, tiny_t5_tokenizer
    from opensora.models.vae import IdentityAutoencoder, VAEConfig, VideoAutoencoderKL, build_vae

    if args.vae:
        vae = build_vae(VAEConfig(type="auto", path=args.vae))
    elif args.vae_downsample == 1:
        vae = IdentityAutoencoder()
    else:
        from diffusers import AutoencoderKL

        vae = VideoAutoencoderKL(AutoencoderKL(**SD_VAE_CONFIG))
    L = cfg.model_max_length
    if args.text_encoder:
        text_encoder = T5TextEncoder.from_pretrained(args.text_encoder, max_length=L)
    else:
        # Captions are padded to L tokens, so the offline tokenizer costs what T5's own would.
        tokenizer = tiny_t5_tokenizer()
        if cfg.caption_channels >= 1024:
            t5 = T5EncoderModel(T5Config(**{**T5_XXL_CONFIG, "d_model": cfg.caption_channels}))
        else:  # debug sizes: a tiny T5 of the model's text width
            d = cfg.caption_channels
            t5 = T5EncoderModel(T5Config(d_model=d, d_ff=2 * d, d_kv=d // 4, num_heads=4, num_layers=2,
                                         vocab_size=len(tokenizer)))
        text_encoder = T5TextEncoder(t5, tokenizer, max_length=L)
    return vae.to(device, dtype).eval(), text_encoder.to(device, dtype).eval()


def attention_kernels(step_fn, device: torch.device) -> dict[str, int]:
    """Every attention kernel one call of ``step_fn`` ran, with its count, from a profiler trace.

    The SDPA aten ops (which backend PyTorch dispatched to: flash, efficient, cudnn, math, the CPU flash) and,
    on CUDA, the device kernels whose names say attention (flash / fmha / cudnn / memory-efficient).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    keys = ("scaled_dot_product", "flash", "fmha", "attention", "mem_eff", "cudnn_sdpa")
    return {e.key: e.count for e in prof.key_averages() if any(k in e.key.lower() for k in keys)}


def _attention_backend(step_fn, device: torch.device) -> str:
    """Which SDPA backends the step ran (all of them: spatial, temporal and cross-attention may differ)."""
    names = " ".join(attention_kernels(step_fn, device)).lower()
    found = [label for key, label in (("flash", "flash"), ("cudnn", "cudnn"), ("fmha", "cudnn/fmha"),
                                      ("efficient_attention", "memory-efficient"), ("mem_eff", "memory-efficient"),
                                      ("attention_math", "math"))
             if key in names]
    return " + ".join(dict.fromkeys(found)) or "none found"


def _family_fields(args) -> dict:
    """Config fields of a diffusers family's named size that the command line sets: the latent channels."""
    c = args.latent_channels
    return {} if c is None else {"in_channels": c, "out_channels": c}


def text_length(family: ModelFamily, cfg) -> int:
    """Text tokens L the model is given: STDiT's ``model_max_length``, the family's padded length otherwise."""
    return cfg.model_max_length if family.name == "stdit" else family.text.max_length


def build_step(args, info, cfg, dtype, model: STDiT | None = None):
    """The trainer's step for the benchmark's model and engine, and one synthetic batch.

    Args:
        args: the parsed command line (engine, compile, checkpointing, diffusion, seed, sizes, encoders).
        info: from ``init_distributed``.
        cfg: the model's config (``STDiTConfig``, or the diffusers model's config for another family).
        dtype: compute dtype (bf16 on CUDA unless ``--dtype fp32``).
        model: the model to train (default: a new one of ``--model`` with random weights, seeded by ``--seed`` and
            the rank; with ``--lora``, adapters injected and the base frozen).
    Returns:
        ``(TrainStep, EMA, batch)``; the batch is what the trainer's loader gives: ``latent`` + ``y`` + ``mask``
        (``--cached-latents``) or ``video`` + ``text``.
    """
    from opensora.distributed import ParallelConfig, build_engine
    from opensora.models.lora import LoraSettings, apply_lora
    from opensora.training import EMA, EMAConfig, OptimConfig, build_optimizer
    from opensora.training.step import TrainStep, training_model_fn

    device = info.device
    family = family_of_size(args.model)
    if model is None:
        torch.manual_seed(args.seed + info.rank)
        model = STDiT(cfg) if family.name == "stdit" else family.build(args.model, **_family_fields(args))
        if args.lora is not None:  # before parallelize and the optimizer, as the trainer does
            apply_lora(model, family, LoraSettings(rank=args.lora, alpha=float(args.lora)))
    model.to(device).train()
    # Parameters stay fp32 (master weights, optimizer state, adaLN tables); the engine decides how bf16 is
    # computed (FSDP2: its param policy; DDP: autocast; ZeRO: bf16 working copies), as in training.
    pcfg = ParallelConfig(engine=args.engine, grad_ckpt=args.grad_ckpt, grad_ckpt_blocks=args.grad_ckpt_blocks,
                          compile=args.compile, param_dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    engine = build_engine(pcfg, info)
    lora = any(not p.requires_grad for p in model.parameters())
    engine.trainable_only = lora
    engine.prepare(model, build_optimizer(model, OptimConfig(), 1e-4, device), family=family)
    ema_cfg = EMAConfig()
    ema = EMA(engine.unwrap(), ema_cfg.decay, ema_cfg.warmup, masters=engine.master_shards(), trainable_only=lora)

    B, L = args.batch, text_length(family, cfg)
    latent = autoencoder_of(args).latent_size((args.frames, args.height, args.width))
    gen = torch.Generator(device=device).manual_seed(args.seed + info.rank)
    vae = text_encoder = None
    if args.cached_latents:
        batch = dict(latent=torch.randn(B, family.in_channels(cfg), *latent, device=device, generator=gen),
                     y=torch.randn(B, 1, L, family.text_dim(cfg), device=device, generator=gen),
                     mask=torch.ones(B, L, dtype=torch.long, device=device))
    else:
        video = torch.rand(B, 3, args.frames, args.height, args.width, device=device, generator=gen) * 2 - 1
        batch = dict(video=video, text=["a red circle moving left on a blue background"] * B)
        vae, text_encoder = _build_encoders(args, device, dtype, cfg)
        if vae.out_channels != cfg.in_channels:
            raise SystemExit(f"error: the VAE makes {vae.out_channels}-channel latents, the model takes "
                             f"{cfg.in_channels} (use --set in_channels=...)")
    steps = TrainStep(engine, build_scheduler(args.diffusion or family.objective.name), vae=vae,
                      text_encoder=text_encoder, accum=1, seed=args.seed, dp_rank=info.rank,
                      grad_clip=OptimConfig().grad_clip, model_fn=training_model_fn(family, engine))
    return steps, ema, batch


def run(args) -> dict:
    from opensora.distributed import destroy_distributed, init_distributed

    info = init_distributed()
    try:
        return _run(args, info)
    finally:
        destroy_distributed()


def _run(args, info) -> dict:
    rank, world, device = info.rank, info.world_size, info.device
    on_cuda = device.type == "cuda"
    dtype = {"auto": torch.bfloat16 if on_cuda else torch.float32, "bf16": torch.bfloat16,
             "fp32": torch.float32}[args.dtype]
    overrides = list(args.overrides)
    vae = autoencoder_of(args)
    try:
        family = family_of_size(args.model)
    except KeyError as err:
        raise SystemExit(f"error: --model: {err.args[0]}") from None
    if family.name == "stdit":
        # The model takes the latent channels; first, so that a --set in_channels=... wins.
        if args.latent_channels is not None or args.vae:
            overrides.insert(0, f"in_channels={vae.latent_channels}")
        elif args.vae_downsample == 1 and not args.cached_latents:
            overrides.insert(0, "in_channels=3")  # pixel space: the identity autoencoder passes RGB through
        try:
            cfg = merge(stdit_config(args.model), parse_overrides(overrides))
        except (KeyError, ConfigError) as err:
            raise SystemExit(f"error: --model/--set: {err}") from err
    else:
        if overrides or not args.cached_latents:
            raise SystemExit(f"error: --model {args.model}: a {family.name} model is benchmarked on --cached-latents "
                             "(inline encoders are STDiT's) and takes no --set (named sizes; --latent-channels)")
        with torch.device("meta"):  # the config only
            cfg = family.config_of(family.build(args.model, **_family_fields(args)))
    try:  # the autoencoder's frame rule and factors, then the patch size, must fit the video
        latent = vae.latent_size((args.frames, args.height, args.width))
        tokens = family.video_tokens(cfg, latent)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    steps, ema, batch = build_step(args, info, cfg, dtype)
    B, L = args.batch, text_length(family, cfg)
    model = steps.engine.unwrap()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step(i: int) -> torch.Tensor:  # what Trainer.train_step does for one micro-batch, minus the bookkeeping
        loss = steps.forward_backward(batch, i, 0)
        steps.optimizer_step()
        ema.update(i + 1)
        return loss

    def sync():
        if on_cuda:
            torch.cuda.synchronize(device)
        if world > 1:
            torch.distributed.barrier()

    for i in range(args.warmup):
        step(i)
    sync()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    if on_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        losses.append(step(i))
    if on_cuda:
        end.record()
    sync()
    seconds = start.elapsed_time(end) / 1e3 if on_cuda else time.perf_counter() - t0
    step_s = seconds / args.steps
    last_loss = float(torch.stack(losses).float().mean())  # the one host sync, after the timed region

    # Shares of the encoders, measured in a separate pass with a sync around each phase.
    shares = {}
    if "video" in batch:
        enc_s = dit_s = 0.0
        gen = torch.Generator(device).manual_seed(args.seed)
        for i in range(max(2, args.steps // 2)):
            sync()
            t = time.perf_counter()
            x, y, mask = steps.encode(batch, gen)
            sync()
            enc_s += time.perf_counter() - t
            t = time.perf_counter()
            steps.forward_backward(dict(latent=x, y=y, mask=mask), i, 0)
            steps.optimizer_step()
            ema.update(i + 1)
            sync()
            dit_s += time.perf_counter() - t
        shares = {"encoders (VAE + T5)": enc_s / (enc_s + dit_s), "dit step": dit_s / (enc_s + dit_s)}

    samples_per_s = B / step_s
    depth = len(family.blocks(model))
    flops = family.train_flops_per_sample(cfg, latent, L)
    achieved = flops * samples_per_s
    gpu = detect_gpu_type(device)
    peak = peak_tflops(gpu)
    matmul_peak = None
    if not args.no_matmul_peak:
        matmul_peak = measure_matmul_tflops(device, dtype=dtype, size=8192 if on_cuda else 1024,
                                            iters=20 if on_cuda else 5)
    memory_gib = peak_memory_gb(device)  # on a CPU: the whole process's peak RSS, the closest analogue
    result = dict(
        model=args.model, frames=args.frames, height=args.height, width=args.width, latent=list(latent),
        vae_compression=list(vae.compression), vae_causal=vae.causal, latent_channels=family.in_channels(cfg),
        family=family.name, text_len=L, lora_rank=args.lora, params=params, trainable_params=trainable,
        batch_per_device=B, world_size=world, engine=args.engine, compile=args.compile, grad_ckpt=args.grad_ckpt,
        depth=depth,
        grad_ckpt_blocks=(depth if args.grad_ckpt_blocks is None else args.grad_ckpt_blocks) if args.grad_ckpt else 0,
        cached_latents=args.cached_latents, dtype=str(dtype).replace("torch.", ""), device=gpu,
        device_name=torch.cuda.get_device_name(device) if on_cuda else "cpu", torch=torch.__version__,
        step_s=step_s, samples_per_s_per_device=samples_per_s, tokens_per_s_per_device=samples_per_s * tokens, train_tflop_per_sample=flops / 1e12, achieved_tflops_per_device=achieved / 1e12,
        peak_tflops_datasheet=peak, mfu=achieved / (peak * 1e12) if peak else None,
        matmul_peak_tflops=matmul_peak, mfu_vs_matmul_peak=achieved / (matmul_peak * 1e12) if matmul_peak else None,
        peak_memory_gib=memory_gib, time_shares=shares, mean_loss=last_loss,
        attention_backend=_attention_backend(lambda: step(args.warmup + args.steps), device),
        opensora_v1_h800_samples_per_s=OPENSORA_V1_SAMPLES_PER_S.get((args.frames, args.height, args.width))
        if args.model == "STDiT-XL/2" else None,
        warmup=args.warmup, steps=args.steps, time=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    if rank == 0:
        print(format_table(result))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with atomic_write_path(Path(args.out)) as tmp:
                tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(r: dict) -> str:
    """A two-column table of the headline figures."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    rows = [
        ("config", f"{r['model']} {r['frames']}x{r['height']}x{r['width']} (latent "
                   f"{'x'.join(map(str, r['latent']))}x{r['latent_channels']}ch) batch {r['batch_per_device']}/device "
                   f"x {r['world_size']}, {r['engine']}, {r['dtype']}"
                   + (", compile" if r["compile"] else "")
                   + (f", grad-ckpt {r['grad_ckpt_blocks']}/{r['depth']} blocks" if r["grad_ckpt"] else "")
                   + (", cached latents" if r["cached_latents"] else ", inline VAE+T5")
                   + (f", LoRA rank {r['lora_rank']}" if r["lora_rank"] else "")),
        ("parameters (trainable)", f"{r['params'] / 1e6:.4g}M ({r['trainable_params'] / 1e6:.4g}M)"),
        ("device", f"{r['device_name']} ({r['device']})"),
        ("step time (s)", fmt(r["step_s"])),
        ("samples/s/device", fmt(r["samples_per_s_per_device"])),
        ("tokens/s/device", fmt(r["tokens_per_s_per_device"])),
        ("model TFLOP/sample (3x fwd)", fmt(r["train_tflop_per_sample"])),
        ("achieved TFLOP/s/device", fmt(r["achieved_tflops_per_device"])),
        ("MFU (datasheet peak)", "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}% of {r['peak_tflops_datasheet']}"),
        ("MFU (measured matmul peak)", "-" if r["mfu_vs_matmul_peak"] is None else
         f"{100 * r['mfu_vs_matmul_peak']:.1f}% of {r['matmul_peak_tflops']:.4g}"),
        ("peak memory (GiB)", fmt(r["peak_memory_gib"])),
        ("attention kernel", r["attention_backend"]),
    ]
    rows += [(f"share: {k}", f"{100 * v:.1f}%") for k, v in r["time_shares"].items()]
    if r["opensora_v1_h800_samples_per_s"]:
        rows.append(("Open-Sora 1.0 (H800, reported)", f"{r['opensora_v1_h800_samples_per_s']} samples/s/GPU"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("frames", "height", "width", "batch", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(args)
    return 0


if __name__ == "__main__":
    exit_process(main())  # not a plain exit: see exit_process (a rare abort in torch's teardown at exit)
