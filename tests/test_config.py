"""The config loader every command shares: files, ``--set`` overrides (list entries by index), error messages."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from data_pipeline.__main__ import main as pipeline_main
from data_pipeline.config import PipelineConfig
from opensora.config import ConfigError, load_config, merge, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Item:
    name: str = "a"
    size: int = 1


@dataclass
class Doc:
    items: list[Item] = field(default_factory=lambda: [Item("a"), Item("b")])
    tags: list[str] = field(default_factory=lambda: ["x", "y"])
    lr: float = 1e-4
    extra: Item | None = None  # an optional block, unset (as a stage's own `conditioning`)


def test_indexed_overrides_reach_list_entries(tmp_path):
    path = tmp_path / "doc.yaml"
    path.write_text("items: [{name: p}, {name: q, size: 3}, {name: r}]\n")
    cfg = load_config(Doc, path, ["items.1.size=7", "items.-1.name=s", "tags.0=z", "lr=2e-5"])
    assert [(i.name, i.size) for i in cfg.items] == [("p", 1), ("q", 7), ("s", 1)]
    assert cfg.tags == ["z", "y"] and cfg.lr == 2e-5
    # A whole entry or list as YAML; later overrides win.
    cfg = merge(Doc, parse_overrides(["items=[{name: k}]", "items.0.size=5"]))
    assert [(i.name, i.size) for i in cfg.items] == [("k", 5)]


@pytest.mark.parametrize("override, message", [
    ("items.2.size=1", r"--set items\.2\.size=1: key 'items\.2': index 2 is out of range \(the list has 2 entries\)"),
    ("items.x.size=1", r"--set items\.x\.size=1: key 'items' is a list: 'x' is not an index"),
    ("items.0.sise=1", r"--set items\.0\.sise=1: key 'items\[0\]\.sise'.*not in 'Item'"),
    ("items.0.size=big", r"--set items\.0\.size=big: key 'items\[0\]\.size'.*could not be converted"),
    ("lr", r"--set 'lr': expected KEY=VALUE"),
    ("=1", r"--set '=1': expected KEY=VALUE"),
    ("extra.size=2", r"--set extra\.size=2: key 'extra' is not set \(null\), so 'size' cannot be set inside it: "
                     r"give the whole block, e.g\. --set 'extra=\{size: VALUE\}'"),
])
def test_override_errors_name_the_key_and_the_argument(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Doc, overrides=[override])


def test_an_optional_block_is_set_whole():
    assert load_config(Doc, overrides=["extra={size: 2}"]).extra == Item("a", 2)
    assert load_config(Doc, overrides=["extra={size: 2}", "extra.size=3"]).extra.size == 3


def test_toml_is_data_too(tmp_path):
    path = tmp_path / "doc.toml"
    path.write_text('lr = 2e-5\n[[items]]\nname = "t"\nsize = 4\n')
    cfg = load_config(Doc, path, ["items.0.size=5"])
    assert cfg.lr == 2e-5 and [(i.name, i.size) for i in cfg.items] == [("t", 5)]


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "doc.yaml"
    path.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match=r"doc\.yaml: key 'lr'.*could not be converted"):
        load_config(Doc, path)


def test_data_pipeline_takes_the_same_overrides(tmp_path, capsys):
    cfg = load_config(PipelineConfig, ROOT / "configs/demo/pipeline.yaml", ["stages.0=probe", "split.crf=20"])
    assert cfg.stages[0] == "probe" and cfg.split.crf == 20
    # A stage's command line: the same parser and messages (exit code 1, nothing run).
    assert pipeline_main(["probe", "--input", str(tmp_path), "--output", str(tmp_path / "o.parquet"),
                          "--set", "probe_timeout=1"]) == 1
    assert "--set probe_timeout=1: key 'probe_timeout'" in capsys.readouterr().err
