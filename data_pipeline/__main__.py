"""Command line of the data pipeline.

    # the whole pipeline from a config (see configs/pipeline/)
    python -m data_pipeline run --config configs/pipeline/folder.yaml [--set split.max_clip_s=8]

    # one stage
    python -m data_pipeline split --input work/01_probe.parquet --output work/02_split.parquet --workers 2
    python -m data_pipeline probe --input videos/ --output work/probe.parquet        # a folder is an input
    python -m data_pipeline download --input urls.txt --output work/download.parquet  # so is a URL list

    # captions on 8 GPUs: one process per GPU, each takes a shard, rank 0 merges
    torchrun --nproc_per_node 8 -m data_pipeline caption --input clips.parquet --output captioned.parquet \
        --model /models/llava-v1.6-vicuna-7b-hf --workers 0

    # on a Ray cluster (files must be on storage every node sees)
    python -m data_pipeline run --config cfg.yaml --set runner.executor=ray --set runner.ray_address=auto
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from data_pipeline.config import PipelineConfig, RunnerConfig
from data_pipeline.pipeline import STAGES, run_one, run_pipeline
from data_pipeline.runner import FailureShareError, SystemicError, check_failure_share
from opensora.config import ConfigError, load_config, merge, parse_overrides, read_file


def _add_fields(parser: argparse.ArgumentParser, schema: type, prefix: str = "") -> None:
    """One ``--option`` per dataclass field, with the field's help line."""
    for f in dataclasses.fields(schema):
        flag = "--" + (prefix + f.name).replace("_", "-")
        helptext = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = {"dest": prefix + f.name, "default": argparse.SUPPRESS, "help": f"{helptext} (default: {default})"}
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.type in (list, "list"):
            parser.add_argument(flag, nargs="+", **kwargs)
        else:
            types = {"int": int, "float": float, "str": str}
            parser.add_argument(flag, type=types.get(f.type, f.type) if callable(f.type) else types[f.type], **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with the ``run`` command and one sub-command per stage."""
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the stages listed in a pipeline config")
    run.add_argument("--config", required=True, help="YAML/TOML file matching PipelineConfig")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. split.crf=20")
    for name, spec in STAGES.items():
        schema = spec.schema
        stage = sub.add_parser(name, help=f"run the {name} stage alone",
                               description=schema.__doc__)
        stage.add_argument("--input", required=True, help="manifest (.parquet/.csv), folder of videos or .txt URL list")
        stage.add_argument("--output", required=True, help="output manifest (.parquet or .csv); its journal sits next to it")
        stage.add_argument("--config", help=f"YAML/TOML file with {name} options")
        stage.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a stage option")
        group = stage.add_argument_group("execution")
        _add_fields(group, RunnerConfig, prefix="")
        _add_fields(stage.add_argument_group(f"{name} options"), schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code: 1 on a config error, 3 when a stage stopped on a systemic error
    (disk full, read-only or vanished output folder, a missing model folder, a broken CUDA context:
    :class:`~data_pipeline.runner.SystemicError`), 4 when a stage failed more than ``runner.max_failed_share``
    of its rows (:class:`~data_pipeline.runner.FailureShareError`), 0 otherwise (a row's own failure is a
    record in the manifest, not an error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            cfg = load_config(PipelineConfig, args.config, args.set)
            run_pipeline(cfg)
            return 0
        schema = STAGES[args.command].schema
        given = vars(args)
        runner_keys = {f.name for f in dataclasses.fields(RunnerConfig)}
        stage_keys = {f.name for f in dataclasses.fields(schema)}
        sources = [(args.config, read_file(args.config))] if args.config else []
        sources.append(("command line", {k: v for k, v in given.items() if k in stage_keys}))
        cfg = merge(schema, sources + parse_overrides(args.set))
        runner = merge(RunnerConfig, [("command line", {k: v for k, v in given.items() if k in runner_keys})])
        check_failure_share(run_one(args.command, cfg, args.input, args.output, runner), runner)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 1
    except SystemicError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except FailureShareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    from opensora.distributed import exit_process

    exit_process(main())  # under torchrun (caption), torch's teardown at exit aborted 1 gloo run in 50
