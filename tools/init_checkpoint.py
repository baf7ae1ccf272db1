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
tiny random one of that class into the bundle; ``--set key=value`` overrides model fields (STDiT sizes).

Other model families (``opensora.models.families``): a tiny random Wan 2.1 or LTX-Video transformer with its tiny
VAE and a tiny UMT5 / T5 (the defaults for ``tiny-*`` sizes), or a bundle that references a pretrained diffusers
pipeline folder (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``) by path, nothing copied::

    python tools/init_checkpoint.py --model tiny-wan2.1 --out runs/tiny-wan
    python tools/init_checkpoint.py --model tiny-ltx --out runs/tiny-ltx
    python tools/init_checkpoint.py --model /models/Wan2.1-T2V-1.3B-Diffusers --out runs/wan13b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opensora.bundle import BUNDLE_FILE, DIFFUSIONS
from opensora.config import ConfigError, parse_overrides
from opensora.models import count_parameters
from opensora.models.families import FAMILIES, family_of_size
from opensora.models.vae import TINY_VAE_CONFIGS
from opensora.training.init import TINY, write_pretrained_bundle, write_random_bundle

# Sizes whose encoders default to tiny random ones written into the bundle (size -> --vae default).
TINY_DEFAULTS = {"STDiT-debug": TINY, "tiny-wan2.1": "tiny-wan2.1", "tiny-ltx": "tiny-ltx"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = ", ".join(s for f in FAMILIES.values() for s in f.sizes)
    p.add_argument("--model", required=True,
                   help=f"a named size of a model family ({sizes}), or a local diffusers pipeline folder to reference")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    p.add_argument("--vae", default=None,
                   help="local autoencoder dir (SD-VAE, Wan, HunyuanVideo, CogVideoX, LTX: the class comes from "
                        "its config.json), 'identity' (pixel space), 'tiny' (random per-frame, built in) or "
                        f"'tiny-KIND' (KIND one of {', '.join(TINY_VAE_CONFIGS)}); default: tiny for STDiT-debug, "
                        "tiny-wan2.1 / tiny-ltx for those sizes, required otherwise")
    p.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' inside a diffusers pipeline repo")
    p.add_argument("--text-encoder", default=None,
                   help="local T5 (UMT5 for Wan) encoder dir (with tokenizer) or 'tiny'; default: tiny for "
                        "STDiT-debug and the tiny-* sizes")
    p.add_argument("--diffusion", default=None, choices=DIFFUSIONS,
                   help="training objective / default sampler; default: the family's (STDiT: iddpm, Wan/LTX: rflow)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model field, e.g. --set hidden_size=128 (repeatable)")
    p.add_argument("--force", action="store_true", help="overwrite an existing bundle")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (args.out / BUNDLE_FILE).exists() and not args.force:
        raise SystemExit(f"error: {args.out} already holds a bundle (pass --force to overwrite)")
    try:
        family_of_size(args.model)
    except KeyError as err:
        if not Path(args.model).expanduser().is_dir():
            raise SystemExit(f"error: --model {args.model}: neither a local diffusers folder nor a named size "
                             f"({err.args[0]})") from None
        return _reference_pretrained(args)
    vae_arg = args.vae or TINY_DEFAULTS.get(args.model)
    te_arg = args.text_encoder or (TINY if args.model in TINY_DEFAULTS else None)
    if vae_arg is None or te_arg is None:
        raise SystemExit(
            f"error: {args.model} needs --vae (a local autoencoder directory or 'identity') and --text-encoder "
            "(a local T5 directory); nothing is downloaded. Use 'tiny' for random built-in ones."
        )
    try:
        model = write_random_bundle(args.out, args.model, vae_arg, te_arg, args.diffusion,
                                    vae_subfolder=args.vae_subfolder, seed=args.seed,
                                    overrides=parse_overrides(args.overrides), names=("--vae", "--text-encoder"))
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from err
    print(f"wrote {args.out}: {args.model} ({count_parameters(model) / 1e6:.2f}M parameters), "
          f"VAE {vae_arg}, text encoder {te_arg}, diffusion {args.diffusion or family_of_size(args.model).objective.name}")
    return 0


def _reference_pretrained(args) -> int:
    """``--model DIR``: a bundle that points at a pretrained diffusers pipeline folder (nothing is copied)."""
    given = [flag for flag, value in (("--vae", args.vae), ("--text-encoder", args.text_encoder),
                                      ("--diffusion", args.diffusion), ("--set", args.overrides)) if value]
    if given:
        raise SystemExit(f"error: --model DIR takes the folder's own parts; {', '.join(given)} do not apply")
    try:
        config = write_pretrained_bundle(args.out, args.model)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from err
    print(f"wrote {args.out}: references the {config.family} model in {config.model_dir} (nothing copied), "
          f"diffusion {config.diffusion}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
