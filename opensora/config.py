"""Typed configuration: dataclasses are the schema, YAML/TOML files are data, ``--set a.b=v`` overrides.

Merging, type checking and dotted overrides are OmegaConf structured configs; this module only adds
error messages that name the offending key *and* the file (or the ``--set`` argument) it came from.
YAML is read with OmegaConf (``yaml.SafeLoader``) and TOML with ``tomllib``: a config never runs code.
Every command line's ``--set`` goes through :func:`parse_overrides` and :func:`merge`, so all of them
take the same syntax, list entries by index included (``--set stages.1.steps=2000``).

Example::

    @dataclass
    class Optim:
        lr: float = 1e-4          # peak learning rate
    cfg = load_config(Optim, "configs/x.yaml", ["lr=2e-5"])
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit the schema. The message names the key and the source."""


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    # OmegaConf appends full_key / reference_type lines to the message; the key is named here already.
    msg = (getattr(err, "msg", None) or str(err)).partition("\n")[0]
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


@dataclass(frozen=True)
class Override:
    """One ``--set KEY=VALUE``: a dotted key (list entries by index: ``stages.1.steps``) and its value."""

    key: str
    value: Any


def _check_indices(cfg: DictConfig, key: str) -> None:
    """Raises ConfigError when ``key`` indexes past the end of a list (OmegaConf's own error blames the type), or
    reaches inside an optional block that is null (OmegaConf's says only that it is None)."""
    node: Any = cfg
    walked = []
    parts = key.split(".")
    for i, part in enumerate(parts):
        if walked and node is None:  # inside an unset optional block (e.g. a stage's own `conditioning`)
            block, rest = ".".join(walked), ".".join(parts[i:])
            raise ConfigError(f"key '{block}' is not set (null), so '{rest}' cannot be set inside it: give the whole "
                              f"block, e.g. --set '{block}={{{rest}: VALUE}}'")
        if isinstance(node, ListConfig):
            try:
                index = int(part)
            except ValueError:
                raise ConfigError(f"key '{'.'.join(walked)}' is a list: '{part}' is not an index") from None
            if not -len(node) <= index < len(node):
                raise ConfigError(f"key '{'.'.join(walked + [part])}': index {index} is out of range "
                                  f"(the list has {len(node)} entries)")
            node = node[index]
        elif isinstance(node, DictConfig) and part in node and not OmegaConf.is_missing(node, part):
            node = node[part]  # None for an unset optional block
        else:
            return
        walked.append(part)


def _apply(cfg: DictConfig, node: Any) -> DictConfig:
    if isinstance(node, Override):
        # update, not merge: a dotted key's path is walked in the existing config, so an index selects a
        # list entry (merging from_dotlist's {"stages": {"1": ...}} onto a list fails).
        _check_indices(cfg, node.key)
        OmegaConf.update(cfg, node.key, node.value, merge=True)
        return cfg
    return OmegaConf.merge(cfg, node)  # type: ignore[return-value]


def merge(schema: type[T] | T, sources: Sequence[tuple[str, Any]]) -> T:
    """Merges ``sources`` onto ``schema`` in order and returns the dataclass.

    Args:
        schema: a dataclass type, or an instance whose values are the defaults.
        sources: pairs of (name for errors, dict / DictConfig / :class:`Override`); a file's name is its
            path, an override's is its ``--set`` argument (see :func:`parse_overrides`).
    Returns:
        an instance of the schema's type (its ``__post_init__`` checks have run).
    """
    cfg = OmegaConf.structured(schema)
    for name, node in sources:
        try:
            cfg = _apply(cfg, node)
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from err
        except OmegaConfBaseException as err:
            raise ConfigError(f"{name}: {_describe(err)}") from err
        except (ValueError, TypeError) as err:  # e.g. a list index that is not a number
            raise ConfigError(f"{name}: {err}") from err
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{_describe(err)} (sources: {', '.join(n for n, _ in sources) or 'defaults'})") from err
    except (ValueError, TypeError) as err:  # raised by a dataclass __post_init__ check
        raise ConfigError(f"{err} (sources: {', '.join(n for n, _ in sources) or 'defaults'})") from err
    return obj  # type: ignore[return-value]


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Override]]:
    """Turns ``["a.b=1", "stages.0.steps=4", ...]`` into :func:`merge` sources, each named by its argument.

    Args:
        overrides: ``KEY=VALUE`` strings. KEY is dotted, with list entries by index; VALUE follows YAML
            (``2e-5`` is a float, ``[1, 2]`` a list, ``null`` None).
    """
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=2e-5")
        try:
            parsed = OmegaConf.from_dotlist([f"value={value}"]).value
        except OmegaConfBaseException as err:
            raise ConfigError(f"--set {item}: {_describe(err)}") from err
        out.append((f"--set {item}", Override(key, parsed)))
    return out


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Loads ``path`` (YAML/TOML) onto the dataclass ``schema`` and applies ``key=value`` overrides.

    Args:
        schema: a dataclass type whose fields (with defaults) are the whole config.
        path: optional YAML or TOML file; unknown or mistyped keys raise :class:`ConfigError` naming the file.
        overrides: ``KEY=VALUE`` strings (``--set`` on the command line), see :func:`parse_overrides`.
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
