"""Per-stage throughput of the data pipeline on synthetic 720p H.264 (one worker, one core).

    OMP_NUM_THREADS=1 python tools/bench_pipeline.py --seconds 20 --videos 2 --json bench_pipeline.json

Makes ``--videos`` 1280x720 30 fps H.264 videos (x264 ``veryfast``: CABAC and B-frames, like typical web
video) with a textured, moving picture and a hard cut every 4 s, then times probe, shot detection alone,
split (detection + cutting + H.264 clips, at full size and with the shorter side resized to 360) and
filter, each run in this process (``workers=0``) so the numbers are per core. Prints a table; ``--json``
also writes the numbers. "x real time" is source-video seconds processed per wall second.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_pipeline.config import FilterConfig, ProbeConfig, RunnerConfig, SplitConfig  # noqa: E402
from data_pipeline.pipeline import make_stage  # noqa: E402
from data_pipeline.runner import run_stage  # noqa: E402
from data_pipeline.split import detect_cuts  # noqa: E402
from data_pipeline.sources import resolve_input  # noqa: E402


def make_source(path: Path, seconds: float, fps: int = 30, size=(1280, 720), shot_s: float = 4.0, seed: int = 0) -> None:
    """A textured picture panning across the frame, a new texture (hard cut) every ``shot_s`` seconds."""
    rng = np.random.default_rng(seed)
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        texture = None
        for t in range(int(seconds * fps)):
            if t % int(shot_s * fps) == 0:
                small = rng.integers(0, 255, (height // 16, width // 16 * 2, 3), dtype=np.uint8)
                texture = small.repeat(16, 0).repeat(16, 1)  # (H, 2W, 3) blocky texture, cheap to make
            shift = (t * 6) % width
            frame = np.ascontiguousarray(texture[:, shift : shift + width])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main(argv=None) -> dict:
    """Runs the benchmark; returns the result dict (also printed / written as JSON)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each synthetic source video")
    parser.add_argument("--videos", type=int, default=2, help="number of source videos")
    parser.add_argument("--json", default="", help="also write the numbers here")
    args = parser.parse_args(argv)

    runner = RunnerConfig(workers=0, progress=False)
    results: dict = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                     "python": platform.python_version(), "workers": 1, "stages": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        for i in range(args.videos):
            make_source(tmp / "src" / f"v{i}.mp4", args.seconds, seed=i)
        source_s = args.seconds * args.videos
        inputs = resolve_input(tmp / "src")

        def timed(name, fn):
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            row = {"stage": name, "wall_s": round(dt, 3), "x_realtime": round(source_s / dt, 1)}
            if out is not None:
                row["clips"] = out
                row["clips_per_s"] = round(out / dt, 2)
            results["stages"].append(row)
            return out

        timed("probe", lambda: run_stage(make_stage("probe", ProbeConfig(), tmp / "p.parquet"), inputs,
                                         tmp / "p.parquet", runner) and None)
        timed("detect only (ContentDetector)",
              lambda: [detect_cuts(p, SplitConfig()) for p in inputs["path"]] and None)
        for label, cfg in (("split, clips at 720p", SplitConfig()), ("split, clips at 360p", SplitConfig(short_side=360))):
            out = tmp / f"s{cfg.short_side}.parquet"
            timed(label, lambda cfg=cfg, out=out: run_stage(make_stage("split", cfg, out), tmp / "p.parquet", out,
                                                            runner).rows_out)
        timed("filter (on the 360p clips)", lambda: run_stage(make_stage("filter", FilterConfig(), tmp / "f.parquet"),
                                                              tmp / "s360.parquet", tmp / "f.parquet", runner).rows_out)

    print(f"\nsource: {args.videos} x {args.seconds:.0f}s 1280x720 30fps H.264; one worker (per core)")
    print(f"{'stage':34s} {'wall s':>8s} {'x real time':>12s} {'clips/s':>9s}")
    for row in results["stages"]:
        print(f"{row['stage']:34s} {row['wall_s']:8.2f} {row['x_realtime']:12.1f} {row.get('clips_per_s', ''):>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
