"""The whole project on built-in data, on a CPU, in one command: data pipeline -> two-stage training -> sampling
-> a report that measures whether the samples show what their prompts say.

    bash scripts/demo.sh                       # = bash scripts/setup.sh && .venv/bin/python tools/demo.py --out demo_out
    python tools/demo.py --out demo_out        # re-run (or after Ctrl-C): finished work is reused
    python tools/demo.py --out /tmp/q --quick  # a tiny version of the same steps (the end-to-end test)

Steps (each reuses what an earlier run finished):

1. data - generated shapes videos (``configs/demo/shapes.yaml``: several shots per video, hard cuts, one true
   caption per shot, held-out colour x shape x direction combinations) go through the real pipeline
   (``configs/demo/pipeline.yaml``: probe -> split with PySceneDetect -> filter -> caption from the sidecars);
2. train - ``train/train.py --config configs/demo/train.yaml`` as a subprocess (two stages, pixel space);
3. sample - ``tools/sample.py`` on the held-out prompts of ``configs/demo/sample_prompts.txt``;
4. report - OUT/report/: the mp4s, a grid of sampled frames with prompts and measurements, a loss curve per
   stage, the cost report, and summary.txt with the colour/direction check (opensora/eval/colour_motion.py).

See docs/demo.md for what to expect and why the autoencoder is the identity.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from opensora.config import ConfigError, load_config, to_yaml
from opensora.utils import atomic_write_path, slugify


def load_recipe(*args, **kwargs):
    """``opensora.training.load_recipe``, imported when first needed: the data pipeline's worker processes are
    spawned, and each re-imports this module; importing opensora.training (torch, the trainer) at the top made
    every pipeline stage wait ~8 s for its workers on a 2-core VM."""
    from opensora.training import load_recipe as load

    return load(*args, **kwargs)

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIGS = ROOT / "configs" / "demo"
# The check's pass marks (docs/demo.md): colour is easy to learn, direction needs the temporal layers.
COLOUR_TARGET, DIRECTION_TARGET = 0.8, 0.6
# Video extension (issue 16): the first half of each held-out clip is given; the generated half must keep the
# object's colour and continue its motion.
EXTENSION_COLOUR_TARGET, EXTENSION_DIRECTION_TARGET = 0.9, 0.9
# --quick: the same steps, tiny (tests/test_demo.py).
QUICK_SHAPES = ["shapes.num_videos=4", "shapes.shots_per_video=3"]
QUICK_TRAIN = ["stages.0.steps=4", "stages.1.steps=4", "validation.sample_steps=2"]
QUICK_PROMPTS = 2
QUICK_SAMPLE_STEPS = 4


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (re-use it to resume)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a few videos, a few steps (for tests)")
    p.add_argument("--workers", type=int, default=2, help="data-pipeline processes")
    p.add_argument("--split-mode", default="encode", choices=("encode", "reference"),
                   help="split.mode: encode H.264 clips, or reference rows that training reads from the raw videos")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for configs/demo/train.yaml (repeatable), e.g. stages.1.steps=2000")
    p.add_argument("--prompts", type=Path, default=DEMO_CONFIGS / "sample_prompts.txt", help="one prompt per line")
    p.add_argument("--sample-steps", type=int, default=50, help="sampling steps")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    return p.parse_args(argv)


def run(cmd: list[str], what: str) -> None:
    """Runs a step's subprocess from the repository root; a failure stops the demo with a re-run hint."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"demo: {what} failed (exit code {rc}); fix the cause and re-run: finished work is kept")


# ---------------------------------------------------------------------------------------------- 1. data


def make_data(out: Path, workers: int, quick: bool, split_mode: str = "encode") -> Path:
    """Generates the raw videos and runs the pipeline on them; returns the training manifest.

    Args:
        out: demo folder (data goes to OUT/data).
        workers: pipeline processes.
        quick: fewer, shorter videos.
        split_mode: ``split.mode``: encode (clip files) or reference (rows pointing into the raw videos).
    """
    from data_pipeline.config import PipelineConfig
    from data_pipeline.pipeline import run_pipeline
    from data_pipeline.sources import SourceFile

    data = out / "data"
    spec = load_config(SourceFile, DEMO_CONFIGS / "shapes.yaml",
                       [f"shapes.out_dir={data / 'raw'}"] + (QUICK_SHAPES if quick else []))
    spec_path = data / "shapes.yaml"
    with atomic_write_path(spec_path) as tmp:
        tmp.write_text(to_yaml(spec), encoding="utf-8")
    cfg = load_config(PipelineConfig, DEMO_CONFIGS / "pipeline.yaml",
                      [f"input={spec_path}", f"work_dir={data}", f"output={data / 'manifest.parquet'}",
                       f"runner.workers={workers}", f"split.mode={split_mode}"])
    run_pipeline(cfg)
    make_held_out(spec.shapes, data / "held_out")
    return Path(cfg.output)


def make_held_out(cfg, out: Path) -> Path:
    """One clip per held-out combination (never in the training data), rendered as the generator renders its shots
    (same length, path band and size; backgrounds in turn), with its caption: the validation manifest of the
    training recipe (held-out loss at fixed timesteps). Returns ``out/manifest.parquet``; reuses finished files.
    """
    import pandas as pd

    from data_pipeline.sources.shapes import render_shot
    from opensora.data.manifest import write_manifest
    from opensora.data.video_io import write_video
    from opensora.eval import ShapeCaption

    manifest = out / "manifest.parquet"
    if manifest.is_file():
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    cross = float(sum(map(float, cfg.cross_range)) / 2)
    for i, combo in enumerate(cfg.held_out):
        colour, shape, direction = combo.split()
        facts = ShapeCaption(colour, shape, direction, cfg.backgrounds[i % len(cfg.backgrounds)])
        frames = render_shot(facts, cfg.min_shot_frames, cross, cfg)
        path = write_video(out / f"{slugify(combo)}.mp4", frames, fps=cfg.fps, crf=0)
        rows.append(dict(id=f"held-out-{slugify(combo)}", path=path.name, text=facts.text, num_frames=len(frames),
                         height=cfg.size, width=cfg.size, fps=cfg.fps))
    return write_manifest(pd.DataFrame(rows), manifest)


def data_summary(manifest: Path, raw_dir: Path) -> list[str]:
    """Lines about the data: videos, shots, clips, and whether the split cut exactly at the generated shots."""
    from opensora.data.manifest import read_manifest

    clips = read_manifest(manifest)
    shots = []
    for sidecar in sorted(raw_dir.glob("shapes_*.json")):
        video = str(sidecar.with_suffix(".mp4"))
        shots += [(video, s["start_frame"], s["end_frame"]) for s in json.loads(sidecar.read_text())["shots"]]
    found = set(zip(clips["source_video"].astype(str), clips["start_frame"].astype(int), clips["end_frame"].astype(int)))
    split = json.loads((raw_dir / "split.json").read_text())
    return [
        f"raw videos: {len(list(raw_dir.glob('shapes_*.mp4')))}, generated shots: {len(shots)}",
        f"clips in the training manifest: {len(clips)}; clips cut exactly at a generated shot: "
        f"{sum(s in found for s in shots)}/{len(shots)} (PySceneDetect; the rest were filtered or missed)",
        f"training combinations (colour shape direction): {len(split['train'])}; held out: {len(split['held_out'])} "
        f"({', '.join(split['held_out'])})",
    ]


# --------------------------------------------------------------------------------------------- 2. train


def stage_names(train_dir: Path) -> list[str]:
    """Stage names, in order, from the resolved recipe the trainer wrote."""
    return [stage.name for stage in load_recipe(train_dir / "recipe.yaml").stages]


def train(out: Path, manifest: Path, overrides: list[str]) -> Path:
    """Runs the real training entry point (which skips finished stages and resumes the unfinished one)."""
    train_dir = out / "train"
    held_out = manifest.parent / "held_out" / "manifest.parquet"
    cmd = [sys.executable, str(ROOT / "train" / "train.py"), "--config", str(DEMO_CONFIGS / "train.yaml"),
           "--output-dir", str(train_dir), "--set", f"data.manifest={manifest}",
           "--set", f"validation.manifest={held_out}", "--set", f"validation.prompt_file={DEMO_CONFIGS / 'sample_prompts.txt'}"]
    for item in overrides:
        cmd += ["--set", item]
    run(cmd, "training")
    return train_dir


# -------------------------------------------------------------------------------------------- 3. sample


def sample_name(index: int, prompt: str) -> str:
    return f"{index:02d}_{slugify(prompt)}.mp4"


def sample(out: Path, train_dir: Path, prompts: list[str], steps: int, cfg_scale: float, seed: int,
           folder: str = "samples", per_prompt: list[list[str]] | None = None) -> Path:
    """Samples every prompt without an mp4 yet with the last stage's export; returns the samples folder.

    All missing prompts go to one ``tools/sample.py`` call (the model loads once) writing to a staging
    folder; each finished video is then moved to its final name, so an interrupted call loses nothing
    that was written (sample.py writes atomically, one video per prompt, each depending only on its
    prompt, its given frames and the seed).

    Args:
        folder: ``OUT/report/<folder>``.
        per_prompt: extra ``tools/sample.py`` arguments of each prompt (its given frames: ``--cond-video ...``,
            flags sample.py pairs with the prompts in order), or None.
    """
    from opensora.sampling import sample_filename

    last = load_recipe(train_dir / "recipe.yaml").stages[-1]
    export = train_dir / last.name / "export"
    samples = out / "report" / folder
    samples.mkdir(parents=True, exist_ok=True)
    missing = [(i, p) for i, p in enumerate(prompts) if not (samples / sample_name(i, p)).is_file()]
    if not missing:
        print(f"sample: all {len(prompts)} videos exist in {samples}")
        return samples
    staging = out / f"{folder}_staging"
    shutil.rmtree(staging, ignore_errors=True)
    height, width = last.image_size
    cmd = [sys.executable, str(ROOT / "tools" / "sample.py"), "--ckpt", str(export), "--out", str(staging),
           "--num-frames", str(last.num_frames), "--height", str(height), "--width", str(width),
           "--steps", str(steps), "--cfg-scale", str(cfg_scale), "--seed", str(seed), "--fps", "8"]
    for i, prompt in missing:
        cmd += ["--prompt", prompt]
    for i, _ in missing:
        cmd += per_prompt[i] if per_prompt else []
    try:
        run(cmd, "sampling")
    finally:
        for j, (i, prompt) in enumerate(missing):
            written = staging / sample_filename(j, prompt)  # the name tools/sample.py gave it
            if written.is_file():
                written.replace(samples / sample_name(i, prompt))
    shutil.rmtree(staging, ignore_errors=True)
    return samples


def extension_inputs(held_out: Path, num_frames: int) -> tuple[list[str], list[list[str]], int]:
    """(captions, per-prompt ``--cond-video`` arguments, K) of the extension check: each held-out clip's first
    half (K = num_frames // 2 frames) is given, and the model generates the rest under the clip's caption."""
    from opensora.data.manifest import read_manifest

    rows = read_manifest(held_out)
    k = num_frames // 2
    captions = [str(t) for t in rows["text"]]
    args = [["--cond-video", str(held_out.parent / str(p)), "--cond-frames", str(k), "--cond-from", "start"]
            for p in rows["path"]]
    return captions, args, k


# -------------------------------------------------------------------------------------------- 4. report


def read_metrics(path: Path) -> list[dict]:
    """The JSON lines of a metrics file (a torn last line of a killed run is skipped)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss(rows: list[dict], stage: str, path: Path) -> str:
    """Loss per step (and a running mean) of one stage as a PNG; returns a one-line summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "loss" in r and "step" in r]
    steps = np.array([r["step"] for r in rows], np.float64)
    loss = np.array([r["loss"] for r in rows], np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="logged loss")
    if len(loss) >= 5:
        k = max(2, len(loss) // 10)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.8, label=f"mean of {k}")
    ax.set(xlabel="step", ylabel="loss", title=f"training loss, stage {stage}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    if not len(loss):
        return f"stage {stage}: no loss logged"
    head, tail = loss[: max(1, len(loss) // 10)].mean(), loss[-max(1, len(loss) // 10) :].mean()
    return f"stage {stage}: {int(steps[-1])} steps, loss {head:.4f} (first 10% of logs) -> {tail:.4f} (last 10%)"


def validation_rows(train_dir: Path) -> list[tuple[int, str, dict]]:
    """(step over the whole recipe, stage, row) of every validation pass, stages one after the other."""
    rows, offset = [], 0
    for stage in load_recipe(train_dir / "recipe.yaml").stages:
        metrics = train_dir / stage.name / "metrics.jsonl"
        passes = {r["step"]: r for r in read_metrics(metrics) if "val_loss" in r} if metrics.is_file() else {}
        rows += [(offset + step, stage.name, passes[step]) for step in sorted(passes)]
        offset += stage.steps
    return rows


def plot_validation(train_dir: Path, path: Path) -> list[str]:
    """``validation.png`` (held-out loss; colour and direction shares of the held-out prompts' samples, over the
    recipe's steps) and summary lines: the table of passes and the first step at which direction reached its
    target and stayed there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = validation_rows(train_dir)
    if not rows:
        return ["no validation pass recorded"]
    steps = [s for s, _, _ in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5.5), dpi=100, sharex=True)
    stages = list(dict.fromkeys(name for _, name, _ in rows))
    series = (("val_colour", "colour matches prompt", "tab:orange"), ("val_direction", "direction matches prompt", "tab:green"))
    for j, stage in enumerate(stages):  # one line per stage: a stage's frame count changes what the loss measures
        part = [(s, r) for s, name, r in rows if name == stage]
        xs = [s for s, _ in part]
        top.plot(xs, [r["val_loss"] for _, r in part], marker="o", color="tab:blue",
                 label="held-out loss (mean of timesteps)" if j == 0 else None)
        for key, label, colour in series:
            bottom.plot(xs, [r.get(key, float("nan")) for _, r in part], marker="o", color=colour,
                        label=label if j == 0 else None)
    top.set(ylabel="loss", title="validation while training")
    bottom.axhline(DIRECTION_TARGET, color="gray", lw=0.8, ls="--")
    bottom.set(xlabel="step (stages one after the other)", ylabel="share of held-out prompts", ylim=(-0.05, 1.05))
    boundaries = [s for (s, name, _), (_, prev, _) in zip(rows[1:], rows[:-1]) if name != prev]
    for ax in (top, bottom):
        for b in boundaries:
            ax.axvline(b, color="black", lw=0.6, alpha=0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    lines = [f"{name} step {r['step']} (recipe step {s}): held-out loss {r['val_loss']:.4f}, colour "
             f"{r.get('val_colour', float('nan')):.0%}, direction {r.get('val_direction', float('nan')):.0%} "
             f"({r['val_time_s']:.1f} s)" for s, name, r in rows]
    reached = None
    for i, (s, _, r) in enumerate(rows):
        if all(x.get("val_direction", 0) >= DIRECTION_TARGET for _, _, x in rows[i:]):
            reached = s
            break
    lines.append(f"direction reaches {DIRECTION_TARGET:.0%} and stays there from recipe step {reached}"
                 if reached is not None else f"direction never stays at or above {DIRECTION_TARGET:.0%}")
    lines.append(f"validation time: {sum(r['val_time_s'] for _, _, r in rows):.1f} s in {len(rows)} passes")
    return lines


def extension_report(folder: Path, captions: list[str], given: int, grid: Path) -> list[str]:
    """The extension check: colour and direction of the object in the *generated* frames only (after the ``given``
    ones), against the held-out clip's caption (its true colour and direction); a grid of the whole videos."""
    from opensora.data.video_io import read_video
    from opensora.eval import check_videos
    from opensora.sampling import frame_grid

    videos = [read_video(folder / sample_name(i, c)) for i, c in enumerate(captions)]
    check = check_videos([v[given:] for v in videos], captions)
    labels = [f"{c}  | first {given} given -> generated: {a.colour or 'no colour'}, {a.direction or 'no motion'}"
              for c, a in zip(captions, check.analyses)]
    frame_grid(videos, labels, grid)
    verdict = lambda share, target: "PASS" if share >= target else "below target"  # noqa: E731
    return [
        f"each held-out clip's first {given} frames given (tools/sample.py --cond-video CLIP --cond-frames {given} "
        "--cond-from start); measured on the generated frames only:",
        *check.lines([sample_name(i, c) for i, c in enumerate(captions)]),
        f"extension colour target >= {EXTENSION_COLOUR_TARGET:.0%}: "
        f"{verdict(check.colour_share, EXTENSION_COLOUR_TARGET)}; extension direction target >= "
        f"{EXTENSION_DIRECTION_TARGET:.0%}: {verdict(check.direction_share, EXTENSION_DIRECTION_TARGET)}",
    ]


def write_report(out: Path, train_dir: Path, samples: Path, prompts: list[str], data_lines: list[str],
                 timings: dict[str, float], extension: tuple[Path, list[str], int] | None = None) -> tuple[float, float]:
    """Grid, loss curves, cost report and summary.txt in OUT/report; returns (colour share, direction share)."""
    from opensora.data.video_io import read_video
    from opensora.eval import check_videos
    from opensora.sampling import frame_grid

    report = out / "report"
    videos = [read_video(samples / sample_name(i, p)) for i, p in enumerate(prompts)]
    check = check_videos(videos, prompts)
    labels = [f"{p}  ->  {a.colour or 'no colour'}, {a.direction or 'no motion'}"
              for p, a in zip(prompts, check.analyses)]
    frame_grid(videos, labels, report / "samples_grid.png")

    loss_lines = []
    for stage in stage_names(train_dir):
        metrics = train_dir / stage / "metrics.jsonl"
        if metrics.is_file():
            loss_lines.append(plot_loss(read_metrics(metrics), stage, report / f"loss_{stage}.png"))
    val_lines = plot_validation(train_dir, report / "validation.png")
    cost = subprocess.run([sys.executable, str(ROOT / "tools" / "cost.py"), "report", str(train_dir)],
                          cwd=ROOT, capture_output=True, text=True)
    (report / "cost.txt").write_text(cost.stdout + cost.stderr, encoding="utf-8")

    verdict = lambda share, target: "PASS" if share >= target else "below target"  # noqa: E731
    lines = [
        "Open-Sora-lite demo on generated shapes videos",
        "",
        "== data ==", *data_lines,
        "",
        "== training ==", *loss_lines, "(curves: loss_<stage>.png; cost: cost.txt)",
        "",
        "== validation while training (held-out clips and prompts; EMA weights) ==", *val_lines,
        "(curves: validation.png)",
        "",
        "== held-out prompts: measured colour and direction of the moving object ==",
        *check.lines([sample_name(i, p) for i, p in enumerate(prompts)]),
        f"colour target >= {COLOUR_TARGET:.0%}: {verdict(check.colour_share, COLOUR_TARGET)}; "
        f"direction target >= {DIRECTION_TARGET:.0%}: {verdict(check.direction_share, DIRECTION_TARGET)}",
        "(chance is about 25% for each: 4 colours, 4 directions)",
        "",
        "== video extension (frame conditioning): held-out clips continued ==",
        *(extension_report(extension[0], extension[1], extension[2], report / "extension_grid.png")
          if extension else ["not run"]),
        "(grid: extension_grid.png)",
        "",
        "== wall time of this run (steps reused from an earlier run take ~0 s) ==",
        *[f"{name}: {seconds:.1f} s" for name, seconds in timings.items()],
    ]
    with atomic_write_path(report / "summary.txt") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return check.colour_share, check.direction_share


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from opensora.sampling import read_prompt_file

    prompts = read_prompt_file(args.prompts)
    if not prompts:
        raise SystemExit(f"demo: no prompts in {args.prompts}")
    prompts = prompts[:QUICK_PROMPTS] if args.quick else prompts
    sample_steps = QUICK_SAMPLE_STEPS if args.quick else args.sample_steps
    train_overrides = (QUICK_TRAIN if args.quick else []) + args.train_set
    try:  # train.py's loader and messages, before the data step spends minutes
        load_recipe(DEMO_CONFIGS / "train.yaml", train_overrides)
    except ConfigError as err:
        raise SystemExit(f"demo: --train-set: {err}") from err
    timings: dict[str, float] = {}
    start = time.perf_counter()

    t = time.perf_counter()
    manifest = make_data(out, args.workers, args.quick, args.split_mode)
    data_lines = data_summary(manifest, out / "data" / "raw")
    timings["data (generate + pipeline)"] = time.perf_counter() - t

    t = time.perf_counter()
    train_dir = train(out, manifest, train_overrides)
    timings["train (2 stages)"] = time.perf_counter() - t

    t = time.perf_counter()
    samples = sample(out, train_dir, prompts, sample_steps, args.cfg_scale, args.seed)
    timings["sample"] = time.perf_counter() - t

    t = time.perf_counter()
    last = load_recipe(train_dir / "recipe.yaml").stages[-1]
    captions, cond_args, given = extension_inputs(out / "data" / "held_out" / "manifest.parquet", last.num_frames)
    captions, cond_args = (captions[:QUICK_PROMPTS], cond_args[:QUICK_PROMPTS]) if args.quick else (captions, cond_args)
    extended = sample(out, train_dir, captions, sample_steps, args.cfg_scale, args.seed, folder="extension",
                      per_prompt=cond_args)
    timings["sample (video extension)"] = time.perf_counter() - t

    timings["total before the report"] = time.perf_counter() - start
    write_report(out, train_dir, samples, prompts, data_lines, timings, (extended, captions, given))
    total = time.perf_counter() - start
    print(f"\ndemo: report in {out / 'report'}; total wall time {total:.1f} s ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("\ndemo: interrupted; run the same command again to continue where it stopped", file=sys.stderr)
        raise SystemExit(130) from None
