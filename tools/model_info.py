"""Prints the size of a named STDiT: parameters in total and per part (built on the meta device, so
STDiT-XL/2 costs no memory).

    python tools/model_info.py --model STDiT-XL/2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python tools/x.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from opensora.models import STDiT, STDiT_models, count_parameters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="STDiT-XL/2", choices=sorted(STDiT_models), help="named model size")
    args = parser.parse_args(argv)
    with torch.device("meta"):
        model = STDiT(STDiT_models[args.model])
    total = count_parameters(model)
    print(f"{args.model}: {total:,} parameters ({total / 1e6:.2f}M)")
    parts = {}
    for name, p in model.named_parameters():
        key = "blocks" if name.startswith("blocks.") else name.split(".")[0]
        parts[key] = parts.get(key, 0) + p.numel()
    for key, n in parts.items():
        print(f"  {key:<14} {n:>14,}")
    buffers = sum(b.numel() for n, b in model.named_buffers())
    print(f"  (buffers, not counted: {buffers:,} — the null caption)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
