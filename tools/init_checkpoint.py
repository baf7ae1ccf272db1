"""Writes a randomly initialised pipeline bundle (model + config, and the VAE / text encoder it uses) that
``tools/sample.py`` and training can start from.

Debug size (tiny built-in VAE and T5 are generated into the bundle, nothing is downloaded)::

    python tools/init_checkpoint.py --model STDiT-debug --out runs/debug-init

Real size, with pretrained parts from local directories (e.g. snapshots in your Hugging Face cache)::

    python tools/init_checkpoint.py --model STDiT-XL/2 --out runs/xl-init \\
        --vae /models/sd-vae-ft-ema --text-encoder /models/t5-v1_1-xxl --set space_scale=0.5

``--vae identity`` trains in pixel space (3 channels); ``--set key=value`` overrides model fields.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoConfig

from opensora.config import ConfigError, merge, parse_overrides
from opensora.models import STDiT, STDiT_models, count_parameters
from opensora.models.text_encoder import TextEncoderConfig, make_tiny_t5
from opensora.models.vae import VAEConfig, build_vae, make_tiny_vae
from opensora.pipeline import BUNDLE_FILE, DIFFUSIONS, BundleConfig, write_bundle

TINY = "tiny"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(STDiT_models), help="named STDiT size")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    p.add_argument("--vae", default=None,
                   help="local AutoencoderKL dir, 'identity' (pixel space) or 'tiny' (random, built in); "
                        "default: tiny for STDiT-debug, required otherwise")
    p.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' inside a Stable Diffusion repo")
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
            f"error: {args.model} needs --vae (a local AutoencoderKL directory or 'identity') and --text-encoder "
            "(a local T5 directory); nothing is downloaded. Use 'tiny' for random built-in ones."
        )
    if (args.out / BUNDLE_FILE).exists() and not args.force:
        raise SystemExit(f"error: {args.out} already holds a bundle (pass --force to overwrite)")
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. The parts the model depends on: the latent space and the text width.
    if vae_arg == TINY:
        make_tiny_vae(args.out / "vae", seed=args.seed)
        vae_cfg = VAEConfig(type="kl", path="vae")
    elif vae_arg == "identity":
        vae_cfg = VAEConfig(type="identity")
    else:
        vae_cfg = VAEConfig(type="kl", path=str(Path(vae_arg).expanduser().resolve()), subfolder=args.vae_subfolder)
    if te_arg == TINY:
        make_tiny_t5(args.out / "text_encoder", seed=args.seed)
        te_path = "text_encoder"
    else:
        te_path = str(Path(te_arg).expanduser().resolve())
    in_bundle = lambda path, tiny: str(args.out / path) if tiny else path  # noqa: E731
    vae = build_vae(VAEConfig(**{**vae_cfg.__dict__, "path": in_bundle(vae_cfg.path, vae_arg == TINY)}))
    base = STDiT_models[args.model]
    # The width is read from the T5 config: no need to load billions of weights to write a random init.
    te_width = AutoConfig.from_pretrained(in_bundle(te_path, te_arg == TINY), local_files_only=True).d_model

    # 2. The model: the named size fitted to the encoders' widths, then the user's overrides.
    fitted = [f"in_channels={vae.out_channels}", f"caption_channels={te_width}"]
    try:
        model_cfg = merge(base, parse_overrides(fitted + args.overrides))
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from err
    te_cfg = TextEncoderConfig(path=te_path, max_length=model_cfg.model_max_length)
    torch.manual_seed(args.seed)
    model = STDiT(model_cfg)

    # 3. Write it; bundle.yaml last.
    write_bundle(args.out, model, BundleConfig(vae=vae_cfg, text_encoder=te_cfg, diffusion=args.diffusion))
    print(f"wrote {args.out}: {args.model} ({count_parameters(model) / 1e6:.2f}M parameters), "
          f"VAE {vae_arg}, text encoder {te_arg}, diffusion {args.diffusion}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
