"""Typed configuration: dataclasses are the schema, YAML/TOML files are data, ``--set a.b=v`` overrides.

Merging, type checking and dotted overrides are OmegaConf structured configs; this module only adds
error messages that name the offending key *and* the file (or the ``--set`` argument) it came from.
YAML is read with OmegaConf (``yaml.SafeLoader``) and TOML with ``tomllib``: a config never runs code.

Example::

    @dataclass
    class Optim:
        lr: float = 1e-4          # peak learning rate
    cfg = load_config(Optim, "configs/x.yaml", ["lr=2e-5"])
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit the schema. The message names the key and the source."""


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = getattr(err, "msg", None) or str(err).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def read_file(path: str | Path) -> DictConfig:
    """Reads a YAML or TOML file into an (untyped) OmegaConf node."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            with open(path, "rb") as f:
                data = tomllib.load(f)
            node = OmegaConf.create(data)
        elif path.suffix in (".yaml", ".yml"):
            node = OmegaConf.load(path)
        else:
            raise ConfigError(f"{path}: unknown config format '{path.suffix}' (use .yaml, .yml or .toml)")
    except (OmegaConfBaseException, tomllib.TOMLDecodeError, Exception) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{path}: cannot parse: {err}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(node).__name__}")
    return node


def merge(schema: type[T] | T, sources: Sequence[tuple[str, Any]]) -> T:
    """Merges ``sources`` (pairs of (name for errors, dict/DictConfig)) onto ``schema`` and returns a dataclass."""
    cfg = OmegaConf.structured(schema)
    for name, node in sources:
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{name}: {_describe(err)}") from err
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{_describe(err)} (sources: {', '.join(n for n, _ in sources) or 'defaults'})") from err
    except (ValueError, TypeError) as err:  # raised by a dataclass __post_init__ check
        raise ConfigError(f"{err} (sources: {', '.join(n for n, _ in sources) or 'defaults'})") from err
    return obj  # type: ignore[return-value]


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, DictConfig]]:
    """Turns ``["a.b=1", ...]`` into merge sources, each named by its own argument."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=2e-5")
        try:
            out.append((f"--set {item}", OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as err:
            raise ConfigError(f"--set {item}: {_describe(err)}") from err
    return out


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Loads ``path`` (YAML/TOML) onto the dataclass ``schema`` and applies ``key=value`` overrides.

    Args:
        schema: a dataclass type whose fields (with defaults) are the whole config.
        path: optional YAML or TOML file; unknown or mistyped keys raise :class:`ConfigError` naming the file.
        overrides: dotted ``key=value`` strings (``--set`` on the command line).
    Returns:
        an instance of ``schema`` (its ``__post_init__`` checks have run).
    """
    sources: list[tuple[str, Any]] = []
    if path is not None:
        sources.append((str(path), read_file(path)))
    sources += parse_overrides(overrides)
    return merge(schema, sources)


def to_yaml(cfg: Any) -> str:
    """Serialises a config dataclass to YAML (round-trips through :func:`load_config`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    """A plain dict of a config dataclass (for JSON files and logs)."""
    if dataclasses.is_dataclass(cfg):
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
    return dict(cfg)
