"""Model families behind one spec (``base.ModelFamily``): STDiT, Wan 2.1/2.2, LTX-Video.

``FAMILIES`` is the one place a family is named; :func:`family_of_size` finds the family of a named size
("STDiT-XL/2", "Wan2.1-T2V-1.3B", "tiny-ltx", ...). Adding a family is one module here and one entry below.
"""

from __future__ import annotations

from opensora.models.families.base import FlowShift, ModelFamily, SamplerDefaults, TextSpec, TrainingObjective
from opensora.models.families.ltx import LTXFamily
from opensora.models.families.stdit import STDiTFamily
from opensora.models.families.wan import WanFamily

FAMILIES: dict[str, ModelFamily] = {
    "stdit": STDiTFamily(),
    "wan": WanFamily(),
    "ltx": LTXFamily(),
}


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; KeyError naming the known ones."""
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_size(size: str) -> ModelFamily:
    """The family that has the named size ``size``; KeyError listing every known size."""
    for family in FAMILIES.values():
        if size in family.sizes:
            return family
    known = ", ".join(s for f in FAMILIES.values() for s in f.sizes)
    raise KeyError(f"unknown model size {size!r}; known: {known}")


__all__ = ["FAMILIES", "FlowShift", "ModelFamily", "SamplerDefaults", "TextSpec", "TrainingObjective",
           "family_of_size", "get_family"]
