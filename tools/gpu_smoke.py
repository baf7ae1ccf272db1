"""The first-GPU smoke check: does what only a GPU can show work, in minutes, with one PASS / FAIL table.

    bash scripts/gpu_smoke.sh OUT            # on one H100/H200: about 5-8 minutes
    bash scripts/gpu_smoke.sh OUT --cpu      # the reduced CPU mode (what the test suite runs)

Each check runs in its own process under a time limit (a hang fails that check, not the run) and writes
``OUT/<check>.json``; the table is printed at the end and everything is written to ``OUT/smoke.json``. The exit
status is 1 if any check failed. The checks:

- ``gpu-tests``: the tests marked ``gpu`` (``pytest -m gpu``): a bf16 step and checkpoint round trip per engine;
  two bf16 steps straight vs one, save, resume, one more (FSDP2, DDP, ColossalAI ZeRO-1 and ZeRO-2), comparing
  optimizer state, fp32 master weights and the loss; the trainer's step under ``set_sync_debug_mode("error")``;
  validation while training in bf16 leaving the trained weights bit-identical (per engine).
  On a CPU they are skipped, and reported as such.
- ``compile``: a few training steps of STDiT compiled per block vs eager: loss difference, graphs, graph breaks,
  recompiles (``opensora.distributed.compile_check``).
- ``attention``: every attention kernel that one training step ran, from a profiler trace (GPU: CUDA kernels and
  the SDPA aten ops; FAIL if the math fallback ran, which means no fused kernel took the inputs).
- ``benchmark``: one row of ``tools/benchmark.py`` (GPU: STDiT-XL/2 16x256x256, cached latents, bf16, FSDP2).
- ``caption``: the caption stage on a tiny random LLaVA on the device: captions/s at batch 1 and 8 (not a 7B
  figure: the layout of LLaVA, with random weights).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Seconds each check may take on a GPU (the whole run stays under about 8 minutes) and in the CPU mode.
LIMITS = {"gpu-tests": (300, 120), "compile": (150, 240), "attention": (60, 60), "benchmark": (120, 90),
          "caption": (90, 90)}


def row(check: str, name: str, status: str, **figures) -> dict:
    """One line of the table: ``status`` is PASS, FAIL or SKIP; ``figures`` are what was measured."""
    return dict(check=check, name=name, status=status, figures=figures)


# -- the checks (each runs in its own process) ------------------------------------------------------------------
def check_gpu_tests(out: Path, cpu: bool) -> list[dict]:
    """The tests marked gpu, one row each (from pytest's JUnit XML)."""
    xml = out / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}",
           str(ROOT / "tests")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if not xml.is_file():
        return [row("gpu-tests", "pytest -m gpu", "FAIL", error=(proc.stdout + proc.stderr)[-2000:])]
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name", "?")
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if failed is not None:
            rows.append(row("gpu-tests", name, "FAIL", error=(failed.get("message") or "")[:500]))
        elif skipped is not None:
            rows.append(row("gpu-tests", name, "SKIP", reason=(skipped.get("message") or "")[:200]))
        else:
            rows.append(row("gpu-tests", name, "PASS", seconds=round(float(case.get("time", 0)), 1)))
    if not rows:
        rows.append(row("gpu-tests", "pytest -m gpu", "FAIL", error="no test collected"))
    return rows


def check_attention(out: Path, cpu: bool) -> list[dict]:
    """Every attention kernel / SDPA op of one training step of the trainer's own step (as the benchmark builds it)."""
    import torch

    from opensora.distributed import destroy_distributed, init_distributed
    from opensora.models.stdit import stdit_config
    from tools import benchmark

    argv = (["--model", "STDiT-debug", "--frames", "4", "--height", "32", "--width", "32", "--batch", "2"] if cpu else
            ["--model", "STDiT-S/2", "--frames", "16", "--height", "256", "--width", "256", "--batch", "2"])
    args = benchmark.parse_args(argv + ["--engine", "fsdp", "--cached-latents", "--steps", "1", "--warmup", "1"])
    info = init_distributed()
    try:
        dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
        steps, ema, batch = benchmark.build_step(args, info, stdit_config(args.model), dtype)

        def step(i: int) -> None:
            steps.forward_backward(batch, i, 0)
            steps.optimizer_step()

        step(0)  # warm-up outside the trace
        kernels = benchmark.attention_kernels(lambda: step(1), info.device)
    finally:
        destroy_distributed()
    math = {k: v for k, v in kernels.items() if "math" in k}
    status = "FAIL" if math and info.device.type == "cuda" else "PASS"
    return [row("attention", f"{args.model} {args.frames}x{args.height}x{args.width} {str(dtype)[6:]}", status,
                kernels=kernels, **({"math_fallback": math} if math else {}))]


def check_compile(out: Path, cpu: bool) -> list[dict]:
    """Training steps compiled per block vs eager (batch sizes 2, 1, 3: a batch that shrinks after a broken clip
    must not recompile per size): loss difference, graphs, graph breaks, recompiles."""
    from opensora.distributed import ParallelConfig, destroy_distributed, init_distributed
    from opensora.distributed.compile_check import compile_check

    info = init_distributed()
    try:
        on_cuda = info.device.type == "cuda"
        # The CPU mode traces with aot_eager (the same graphs and guards, no code generation): inductor on this
        # CPU is what tests/test_compile.py runs, at 35-60 s a graph.
        pcfg = ParallelConfig(engine="fsdp", compile_backend="inductor" if on_cuda else "aot_eager")
        size = dict(model="STDiT-S/2", num_frames=16, latent_size=32) if on_cuda else {}
        r = compile_check(pcfg, info, batch_sizes=(2, 1, 3), **size)
    finally:
        destroy_distributed()
    tolerance = 2e-2 if on_cuda else 1e-4  # bf16 kernels differ in rounding from eager's; fp32 agrees closely
    ok = (r["graph_breaks"] == 0 and r["recompiles"] <= 1 and r["graphs"] <= 2
          and r["max_loss_rel_diff"] <= tolerance)
    keep = ("loss_eager", "loss_compiled", "max_loss_rel_diff", "max_grad_rel_diff", "graphs", "graph_breaks",
            "recompiles", "recompile_reasons", "seconds_compiled")
    return [row("compile", f"{size.get('model', 'STDiT-debug')} fsdp {pcfg.compile_backend} batches 2,1,3",
                "PASS" if ok else "FAIL", **{k: r[k] for k in keep if k in r})]


def check_benchmark(out: Path, cpu: bool) -> list[dict]:
    """One benchmark row (the trainer's step, timed)."""
    from tools import benchmark

    argv = (["--model", "STDiT-debug", "--frames", "4", "--height", "32", "--width", "32", "--batch", "2",
             "--engine", "ddp", "--steps", "2", "--warmup", "1", "--no-matmul-peak"] if cpu else
            ["--model", "STDiT-XL/2", "--frames", "16", "--height", "256", "--width", "256", "--batch", "8",
             "--engine", "fsdp", "--steps", "10", "--warmup", "3"])
    args = benchmark.parse_args(argv + ["--cached-latents", "--out", str(out / "benchmark-row.json")])
    r = benchmark.run(args)
    ok = r["samples_per_s_per_device"] > 0 and r["mean_loss"] == r["mean_loss"]  # NaN != NaN
    return [row("benchmark", f"{r['model']} {r['frames']}x{r['height']}x{r['width']} b{r['batch_per_device']} "
                             f"{r['engine']} {r['dtype']}", "PASS" if ok else "FAIL",
                samples_per_s=round(r["samples_per_s_per_device"], 3),
                mfu=None if r["mfu"] is None else round(r["mfu"], 4), step_s=round(r["step_s"], 4),
                peak_memory_gib=round(r["peak_memory_gib"], 2), loss=r["mean_loss"])]


def check_caption(out: Path, cpu: bool) -> list[dict]:
    """The caption stage's batch function on a tiny random LLaVA on the device: clips/s at batch 1 and 8.

    Not a 7B figure: the same layout and code path (frame decoding and its prefetch, the processor, generate),
    with random weights, so it shows the stage's own overheads and that it runs on the device.
    """
    import numpy as np
    import pandas as pd
    import torch

    from data_pipeline import caption as cap
    from data_pipeline.config import CaptionConfig
    from opensora.data.manifest import normalize
    from opensora.data.video_io import write_video

    model = cap.make_tiny_llava(out / "tiny-llava")
    rng = np.random.default_rng(0)
    paths = [str(write_video(out / "caption-clips" / f"c{i}.mp4", rng.integers(0, 255, (24, 64, 96, 3), np.uint8),
                             fps=8)) for i in range(16)]
    rows = normalize(pd.DataFrame({"path": paths})).to_dict("records")
    result = []
    for batch in (1, 8):
        # Random weights babble: the repetition check (a quality check of real captions) is off for a throughput
        # figure, else looping captions fail rows as designed and the check reads as a failure of the stage.
        cfg = CaptionConfig(model=str(model), batch_size=batch, max_new_tokens=16, min_words=1, retries=0,
                            max_repeats=0)
        cap.caption_batch(rows[:batch], cfg)  # loads the model (cached) and warms the kernels up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outputs = cap.caption_batch(rows, cfg)
        seconds = time.perf_counter() - t0
        captioned = sum(isinstance(o, list) for o in outputs)
        # Random weights may stop at once: an "empty caption" row is the stage working as designed.
        errors = [repr(o) for o in outputs if isinstance(o, Exception) and "empty caption" not in str(o)]
        device = cap.resolve_device(cfg.device)
        result.append(row("caption", f"tiny LLaVA batch {batch} on {device}", "FAIL" if errors else "PASS",
                          clips_per_s=round(len(rows) / seconds, 2), captioned=captioned, clips=len(rows),
                          **({"errors": errors[:3]} if errors else {})))
    return result


CHECKS = {"gpu-tests": check_gpu_tests, "compile": check_compile, "attention": check_attention,
          "benchmark": check_benchmark, "caption": check_caption}


# -- the driver ------------------------------------------------------------------------------------------------
def run_check(name: str, out: Path, cpu: bool) -> None:
    """In the child process: runs one check and writes ``OUT/<name>.json`` (a crash becomes a FAIL row)."""
    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    try:
        rows = CHECKS[name](out, cpu)
    except Exception as err:  # a check that crashes is a FAIL with its traceback, and the others still run
        rows = [row(name, name, "FAIL", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])]
    for r in rows:
        r["figures"].setdefault("check_seconds", round(time.perf_counter() - t0, 1))
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")


def run_all(out: Path, cpu: bool, only: list[str]) -> list[dict]:
    """Runs each check in a child process under its time limit; returns all rows."""
    rows = []
    for name in only:
        limit = LIMITS[name][1 if cpu else 0]
        result = out / f"{name}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--run-check", name]
        cmd += ["--cpu"] if cpu else []
        print(f"[smoke] {name} (limit {limit} s) ...", flush=True)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
            (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
        except subprocess.TimeoutExpired as err:
            (out / f"{name}.log").write_text(f"{err.stdout or ''}{err.stderr or ''}")
            rows.append(row(name, name, "FAIL", error=f"timed out after {limit} s (a hang?) - see {name}.log"))
            continue
        if result.is_file():
            rows += json.loads(result.read_text())
        else:
            rows.append(row(name, name, "FAIL", error=f"exit {proc.returncode}, no result - see {name}.log",
                            tail=(proc.stderr or proc.stdout)[-1500:]))
    return rows


def environment() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return dict(torch=torch.__version__, cuda=torch.version.cuda, device=torch.cuda.get_device_name(0) if cuda else "cpu",
                date=time.strftime("%Y-%m-%d %H:%M:%S"))


def format_table(rows: list[dict]) -> str:
    """The PASS / FAIL table: check, name, status, the figures in one line."""
    def figures(r: dict) -> str:
        f = {k: v for k, v in r["figures"].items() if k not in ("traceback", "check_seconds")}
        return ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in f.items())[:400]

    lines = [f"{'check':<10} {'status':<6} {'name':<60} figures"]
    lines += [f"{r['check']:<10} {r['status']:<6} {r['name'][:60]:<60} {figures(r)}" for r in rows]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    lines.append(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for the JSON results and logs")
    p.add_argument("--cpu", action="store_true", help="reduced CPU mode (tiny sizes; GPU tests are skipped)")
    p.add_argument("--only", action="append", choices=list(CHECKS), help="run only these checks (repeatable)")
    p.add_argument("--run-check", choices=list(CHECKS), help=argparse.SUPPRESS)  # the child process
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.run_check:
        run_check(args.run_check, args.out, args.cpu)
        return 0
    import torch

    cpu = args.cpu or not torch.cuda.is_available()
    if not args.cpu and cpu:
        print("[smoke] no CUDA device: running the reduced CPU mode", flush=True)
    rows = run_all(args.out, cpu, args.only or list(CHECKS))
    report = dict(mode="cpu" if cpu else "gpu", environment=environment(), rows=rows)
    (args.out / "smoke.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(format_table(rows))
    print(f"[smoke] {report['environment']}; results in {args.out / 'smoke.json'}")
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    from opensora.distributed import exit_process

    exit_process(main())  # torch's own teardown at exit aborted 1 gloo run in 50 (see exit_process)
