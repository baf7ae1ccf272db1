"""Writes a randomly initialised pipeline bundle (model + config, and the VAE / text encoder it uses) that
``tools/sample.py`` and training can start from.

Debug size (tiny built-in VAE and T5 are generated into the bundle, nothing is downloaded)::

    python tools/init_checkpoint.py --model STDiT-debug --out runs/debug-init

Real size, with pretrained parts from local directories (e.g. snapshots in your Hugging Face cache)::

    python tools/init_checkpoint.py --model STDiT-XL/2 --out runs/xl-init \\
        --vae /models/sd-vae-ft-ema --text-encoder /models/t5-v1_1-xxl --set space_scale=0.5

A 3D causal VAE (Wan 2.1 here; any autoencoder ``load_autoencoder`` reads, the class comes from its config.json);
the model's ``in_channels`` become the VAE's latent channels (16)::

    python tools/init_checkpoint.py --model STDiT-XL/2 --out runs/xl-wan-init \
        --vae /models/Wan2.1-T2V-1.3B-Diffusers --vae-subfolder vae --text-encoder /models/t5-v1_1-xxl

``--vae identity`` trains in pixel space (3 channels); ``--vae tiny-wan2.1`` (or ``tiny-hunyuan``, ...) writes a
tiny random one of that class into the bundle; ``--set key=value`` overrides model fields.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opensora.bundle import BUNDLE_FILE, DIFFUSIONS
from opensora.config import ConfigError, parse_overrides
from opensora.models import STDiT_models, count_parameters
from opensora.models.vae import TINY_VAE_CONFIGS
from opensora.training.init import TINY, write_random_bundle


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(STDiT_models), help="named STDiT size")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    p.add_argument("--vae", default=None,
                   help="local autoencoder dir (SD-VAE, Wan, HunyuanVideo, CogVideoX, LTX: the class comes from "
                        "its config.json), 'identity' (pixel space), 'tiny' (random per-frame, built in) or "
                        f"'tiny-KIND' (KIND one of {', '.join(TINY_VAE_CONFIGS)}); default: tiny for STDiT-debug, "
                        "required otherwise")
    p.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' inside a diffusers pipeline repo")
    p.add_argument("--text-encoder", default=None,
                   help="local T5 encoder dir (with tokenizer) or 'tiny'; default: tiny for STDiT-debug")
    p.add_argument("--diffusion", default="iddpm", choices=DIFFUSIONS, help="training objective / default sampler")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model field, e.g. --set hidden_size=128 (repeatable)")
    p.add_argument("--force", action="store_true", help="overwrite an existing bundle")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    debug = args.model == "STDiT-debug"
    vae_arg = args.vae or (TINY if debug else None)
    te_arg = args.text_encoder or (TINY if debug else None)
    if vae_arg is None or te_arg is None:
        raise SystemExit(
            f"error: {args.model} needs --vae (a local autoencoder directory or 'identity') and --text-encoder "
            "(a local T5 directory); nothing is downloaded. Use 'tiny' for random built-in ones."
        )
    if (args.out / BUNDLE_FILE).exists() and not args.force:
        raise SystemExit(f"error: {args.out} already holds a bundle (pass --force to overwrite)")
    try:
        model = write_random_bundle(args.out, args.model, vae_arg, te_arg, args.diffusion,
                                    vae_subfolder=args.vae_subfolder, seed=args.seed,
                                    overrides=parse_overrides(args.overrides), names=("--vae", "--text-encoder"))
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from err
    print(f"wrote {args.out}: {args.model} ({count_parameters(model) / 1e6:.2f}M parameters), "
          f"VAE {vae_arg}, text encoder {te_arg}, diffusion {args.diffusion}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
