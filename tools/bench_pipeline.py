"""Per-stage throughput of the data pipeline on synthetic 720p H.264, per CPU-second (one worker).

    OMP_NUM_THREADS=1 python tools/bench_pipeline.py --seconds 20 --videos 2 --json bench_pipeline.json

Makes ``--videos`` 1280x720 30 fps H.264 videos (x264 ``veryfast``: CABAC and B-frames, like typical web
video; ``--source-mbit`` 2 by default) with a textured, moving, grainy picture and a hard cut every 4 s,
then times, each in this process (``workers=0``, decoders and encoders on one thread): probe, decoding
alone (the floor under everything that reads every frame), shot detection alone, split (one decode: detection + cutting + H.264 clips) for each
``--presets`` x ``--sizes`` (with the clips' bit rate, and the luma PSNR of the first clip against its source
frames resized the same way, i.e. the encoder's loss), split in ``reference`` mode (rows pointing into the
source, nothing encoded; ``--modes``) for each size, and filter on the 360p clips and on the 360p reference rows.

The headline number is **x real time per CPU-second**: source-video seconds processed per CPU-second of
this process and its children (``resource.getrusage``), which is what a pool of N workers gets per core
on a machine shared with other jobs; wall-clock x real time is printed next to it (noisy when other jobs
share the cores). ``--repeat`` runs each stage that many times and keeps the run with the least CPU time.
``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import av
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_pipeline.config import FilterConfig, ProbeConfig, RunnerConfig, SplitConfig  # noqa: E402
from data_pipeline.pipeline import make_stage  # noqa: E402
from data_pipeline.runner import run_stage  # noqa: E402
from data_pipeline.split import detect_cuts  # noqa: E402
from data_pipeline.sources import resolve_input  # noqa: E402
from opensora.data.manifest import read_manifest  # noqa: E402
from opensora.data.video_io import resize_yuv420p  # noqa: E402


def make_source(path: Path, seconds: float, fps: int = 30, size=(1280, 720), shot_s: float = 4.0, seed: int = 0,
                mbit_s: float = 2.0) -> None:
    """A smooth colour field with blocky detail and film grain panning across the frame; a new field (a hard cut
    that ContentDetector finds) every ``shot_s`` seconds. Encoded at ``mbit_s`` (x264 ABR; 0 = crf 23): the
    bit rate sets much of the decoding cost, and 1.5-3 Mbit/s is typical of 720p30 H.264 on the web."""
    rng = np.random.default_rng(seed)
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", **({} if mbit_s else {"crf": "23"})}
        if mbit_s:
            stream.bit_rate = int(mbit_s * 1e6)
        texture = None
        for t in range(int(seconds * fps)):
            if t % int(shot_s * fps) == 0:
                coarse = rng.integers(0, 255, (height // 40, width // 20, 3), dtype=np.uint8)
                smooth = cv2.resize(coarse, (2 * width, height), interpolation=cv2.INTER_CUBIC)  # (H, 2W, 3)
                detail = rng.integers(0, 255, (height // 8, width // 4, 1), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
                texture = smooth.astype(np.int16) * 3 // 4 + detail // 4  # (H, 2W, 3)
            shift = (t * 5) % width
            grain = rng.integers(-4, 5, (height, width, 1), dtype=np.int16)
            frame = np.clip(texture[:, shift : shift + width] + grain, 0, 255).astype(np.uint8)  # (H, W, 3)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_all(path: str) -> int:
    """Decodes every frame on one thread (as split does) and returns the count."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"
        stream.codec_context.thread_count = 1
        return sum(1 for _ in container.decode(stream))


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its reaped children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(name: str, fn: Callable[[], int | None], source_s: float, repeat: int) -> dict:
    """Runs ``fn`` ``repeat`` times; keeps the run with the least CPU time.

    Args:
        name: the row label.
        fn: the work; may return a clip count.
        source_s: seconds of source video that one call processes.
        repeat: number of runs.
    """
    best = None
    for _ in range(repeat):
        c0, t0 = cpu_seconds(), time.perf_counter()
        out = fn()
        cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
        if best is None or cpu < best[0]:
            best = (cpu, wall, out)
    cpu, wall, out = best
    row = {"stage": name, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
           "x_realtime_per_cpu_s": round(source_s / max(cpu, 1e-6), 1),
           "x_realtime_wall": round(source_s / max(wall, 1e-6), 1)}
    if out is not None:
        row["clips"] = out
    return row


def clip_mbit_s(folder: Path, source_s: float) -> float:
    """Size of all clips in ``folder`` as a bit rate over the source duration."""
    return round(sum(p.stat().st_size for p in folder.glob("*.mp4")) * 8 / source_s / 1e6, 2)


def luma(frame: av.VideoFrame) -> np.ndarray:
    """(H, W) float64 Y plane of a yuv420p frame, as stored (no range conversion)."""
    plane = frame.planes[0]
    return np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[: frame.height, : frame.width].astype(np.float64)


def first_clip_psnr(manifest: Path) -> float:
    """Luma PSNR (dB) of the first clip in a split manifest against its source frames resized the same way,
    i.e. what the encoder lost (the resize is not counted)."""
    clip = read_manifest(manifest).iloc[0]
    with av.open(clip["source_video"]) as src, av.open(clip["path"]) as out:
        ref = itertools.islice(src.decode(video=0), int(clip["start_frame"]), int(clip["end_frame"]))
        errors = []
        for a, b in zip(ref, out.decode(video=0)):
            if (a.width, a.height) != (b.width, b.height):
                a = resize_yuv420p(a, b.width, b.height)
            errors.append(np.mean((luma(a) - luma(b)) ** 2))
    return round(float(10 * np.log10(255.0**2 / max(np.mean(errors), 1e-10))), 2)


def cpu_model() -> str:
    """The CPU model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return f"{platform.machine()} {platform.processor() or ''}".strip()


def main(argv=None) -> dict:
    """Runs the benchmark; returns the result dict (also printed / written as JSON)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each synthetic source video")
    parser.add_argument("--videos", type=int, default=2, help="number of source videos")
    parser.add_argument("--source-mbit", type=float, default=2.0, help="source bit rate (0 = x264 crf 23)")
    parser.add_argument("--presets", default="veryfast,superfast,ultrafast", help="x264 presets to time split with")
    parser.add_argument("--sizes", default="0,360", help="clip short sides to time split with (0 = keep 720p)")
    parser.add_argument("--modes", default="encode,reference", help="split.mode values to time (reference: no presets)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per stage; the least CPU time is kept")
    parser.add_argument("--json", default="", help="also write the numbers here")
    args = parser.parse_args(argv)

    runner = RunnerConfig(workers=0, progress=False)
    results: dict = {"cpu": cpu_model(), "logical_cpus": len(__import__("os").sched_getaffinity(0)),
                     "python": platform.python_version(), "av": av.__version__, "workers": 1,
                     "source": f"{args.videos} x {args.seconds:g}s 1280x720 30fps H.264 (x264 veryfast, "
                               + (f"{args.source_mbit:g} Mbit/s)" if args.source_mbit else "crf 23)"),
                     "stages": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        for i in range(args.videos):
            make_source(tmp / "src" / f"v{i}.mp4", args.seconds, seed=i, mbit_s=args.source_mbit)
        source_s = args.seconds * args.videos
        inputs = resolve_input(tmp / "src")
        stages = results["stages"]

        stages.append(measure("probe", lambda: run_stage(make_stage("probe", ProbeConfig(), tmp / "p.parquet"), inputs,
                                                         tmp / "p.parquet", runner) and None, source_s, args.repeat))
        stages.append(measure("decode only (PyAV, 1 thread)",
                              lambda: [decode_all(p) for p in inputs["path"]] and None, source_s, args.repeat))
        stages.append(measure("detect only (ContentDetector)",
                              lambda: [detect_cuts(p, SplitConfig()) for p in inputs["path"]] and None,
                              source_s, args.repeat))
        modes = args.modes.split(",")
        for short_side in (int(s) for s in args.sizes.split(",")):
            if "reference" in modes:
                out = tmp / f"r{short_side}"
                cfg = SplitConfig(out_dir=str(out / "clips"), short_side=short_side, mode="reference")

                def run_ref(cfg=cfg, out=out):
                    manifest = out / f"split{time.perf_counter_ns()}.parquet"
                    return run_stage(make_stage("split", cfg, manifest), tmp / "p.parquet", manifest, runner).rows_out

                stages.append(measure(f"split reference, {short_side or 720}p rows", run_ref, source_s, args.repeat))
            for preset in args.presets.split(",") if "encode" in modes else []:
                out = tmp / f"s{short_side}_{preset}"
                cfg = SplitConfig(out_dir=str(out / "clips"), short_side=short_side, preset=preset)
                label = f"split, {short_side or 720}p clips, {preset}"

                def run(cfg=cfg, out=out):
                    # A fresh manifest each run: a re-run would otherwise resume and skip every row.
                    manifest = out / f"split{time.perf_counter_ns()}.parquet"
                    return run_stage(make_stage("split", cfg, manifest), tmp / "p.parquet", manifest, runner).rows_out

                row = measure(label, run, source_s, args.repeat)
                row["clip_mbit_s"] = clip_mbit_s(out / "clips", source_s)
                row["clip_psnr_db"] = first_clip_psnr(next(out.glob("split*.parquet")))
                stages.append(row)
        clips360 = next(iter(sorted(tmp.glob("s360_*/split*.parquet"))), None)
        if clips360 is not None:
            stages.append(measure("filter (on the 360p clips)",
                                  lambda: run_stage(make_stage("filter", FilterConfig(), tmp / "f.parquet"), clips360,
                                                    tmp / f"f{time.perf_counter_ns()}.parquet", runner).rows_out,
                                  source_s, args.repeat))
        refs360 = next(iter(sorted(tmp.glob("r360/split*.parquet"))), None)
        if refs360 is not None:  # the same frames sought in the 720p source
            stages.append(measure("filter (on the 360p reference rows)",
                                  lambda: run_stage(make_stage("filter", FilterConfig(), tmp / "f.parquet"), refs360,
                                                    tmp / f"f{time.perf_counter_ns()}.parquet", runner).rows_out,
                                  source_s, args.repeat))

    print(f"\nsource: {results['source']}; one worker; cpu: {results['cpu']}")
    print(f"{'stage':36s} {'CPU s':>7s} {'x rt / CPU-s':>13s} {'wall s':>7s} {'x rt wall':>10s} {'clips Mbit/s':>13s} "
          f"{'PSNR dB':>8s}")
    for row in stages:
        print(f"{row['stage']:36s} {row['cpu_s']:7.2f} {row['x_realtime_per_cpu_s']:13.1f} {row['wall_s']:7.2f} "
              f"{row['x_realtime_wall']:10.1f} {row.get('clip_mbit_s', ''):>13} {row.get('clip_psnr_db', ''):>8}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
