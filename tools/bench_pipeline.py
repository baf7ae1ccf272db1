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

``--transitions`` benchmarks the shot detectors instead (``split.detector``: content, adaptive, transnetv2):

    OMP_NUM_THREADS=1 python tools/bench_pipeline.py --transitions --json bench_shots.json

One video per kind of transition (hard cuts, dissolves, fades through black; ``make_transition_video``), each
``--shots`` panning shots of 2-4 s joined by ``--transition-frames``-frame transitions, 640x360 24 fps. A
detection (a cut, with the gap before it for TransNetV2) is right when it overlaps a true transition widened by
``--tolerance`` frames each side; precision = right detections / detections, recall = transitions found /
transitions. CPU seconds per source second is ``detect_cuts`` on the video (decode included).

``--curation`` times the per-clip cost of the learned filters instead: filter with and without
``max_text_area`` (RapidOCR's text detector on ``text_frames`` frames) and dedup's per-clip signature, on
``--clips`` 2 s 640x360 clips (``make_transition_video``).
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


def _scene(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(H, 2W, 3) float32: a sky-to-ground colour gradient with a dozen filled ellipses and boxes, slightly
    blurred, wide enough to pan across. Learned detectors take random noise fields for transitions (TransNetV2
    scored the first frame of such a video 0.93); shapes on a gradient are close enough to filmed scenes."""
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    img = np.ascontiguousarray((top * (1 - ramp) + bottom * ramp) * np.ones((1, 2 * width, 1)), dtype=np.float32)
    scale = height / 180
    for _ in range(12):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, 2 * width)), int(rng.integers(0, height))
        a, b = int(scale * rng.integers(10, 70)), int(scale * rng.integers(10, 55))
        if rng.random() < 0.5:
            cv2.ellipse(img, (x, y), (a, b), float(rng.integers(0, 180)), 0, 360, colour, -1)
        else:
            cv2.rectangle(img, (x, y), (x + a, y + b), colour, -1)
    return cv2.GaussianBlur(img, (0, 0), 1.5 * scale)


TRANSITION_KINDS = ("cut", "dissolve", "fade")


def make_transition_video(path: Path, kind: str, shots: list[int], transition: int = 24, fps: int = 24,
                          size=(320, 180), seed: int = 0) -> list[tuple[int, int]]:
    """An H.264 video of panning textured shots joined by ``kind`` transitions: ``cut`` (hard cut),
    ``dissolve`` (a cross-fade over ``transition`` frames) or ``fade`` (to black over ``transition`` frames,
    then up from black over as many).

    Args:
        path: output mp4.
        kind: one of :data:`TRANSITION_KINDS`.
        shots: frames of each shot outside its transitions.
        transition: frames of a dissolve, or of each half of a fade.
    Returns:
        the true transitions as frame spans [first, end): the first frame that is not purely the old shot
        up to the first frame that is purely the new one (a hard cut at k: (k, k)).
    """
    rng = np.random.default_rng(seed)
    width, height = size
    scenes = [_scene(rng, width, height) for _ in shots]
    speeds = rng.integers(2, 7, len(shots))

    def frame(shot: int, t: int) -> np.ndarray:  # (H, W, 3) float: shot `shot` at its own time t
        shift = (int(t * speeds[shot]) % width) if shot % 2 else (width - int(t * speeds[shot]) % width) % width
        return scenes[shot][:, shift : shift + width]

    out, spans, t0 = [], [], [0] * len(shots)
    for i, n in enumerate(shots):
        out += [frame(i, t0[i] + t) for t in range(n)]
        t0[i] += n
        if i == len(shots) - 1:
            break
        start = len(out)
        if kind == "dissolve":
            for t in range(transition):
                w = (t + 1) / (transition + 1)
                out.append((1 - w) * frame(i, t0[i] + t) + w * frame(i + 1, t))
            t0[i + 1] = transition
        elif kind == "fade":
            out += [frame(i, t0[i] + t) * (1 - (t + 1) / transition) for t in range(transition)]
            out += [frame(i + 1, t) * (t / transition) for t in range(transition)]
            t0[i + 1] = transition
        spans.append((start, len(out)))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20"}
        for img in out:
            grain = rng.integers(-3, 4, img.shape, dtype=np.int16)
            rgb = np.clip(img + grain, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return spans


def detections(found) -> list[tuple[int, int]]:
    """``detect_cuts``'s result as detections: frame spans [first, last] (a cut alone, or a gap and its cut)."""
    spans, gaps = [], list(found.gaps)
    for cut in found.cuts:
        opened = [g for g in gaps if g < cut]
        spans.append((opened[0], cut) if opened else (cut, cut))
        gaps = [g for g in gaps if g > cut]
    spans += [(g, found.num_frames - 1) for g in gaps]  # a transition running to the end
    return spans


def score_transitions(found: list[tuple[int, int]], truth: list[tuple[int, int]], tolerance: int) -> dict:
    """Precision and recall of detections against true transitions (both frame spans)."""

    def hits(det, true):
        return det[0] <= max(true[1], true[0]) + tolerance and det[1] >= true[0] - tolerance

    right = sum(any(hits(d, t) for t in truth) for d in found)
    recalled = sum(any(hits(d, t) for d in found) for t in truth)
    return {"detections": len(found), "transitions": len(truth),
            "precision": round(right / len(found), 3) if found else None,
            "recall": round(recalled / len(truth), 3) if truth else None}


def bench_transitions(args) -> dict:
    """The shot detectors' precision / recall per kind of transition and CPU cost (``--transitions``)."""
    results: dict = {"cpu": cpu_model(), "logical_cpus": len(__import__("os").sched_getaffinity(0)),
                     "python": platform.python_version(), "torch_threads": 1, "rows": []}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        videos = {}
        for seed, kind in enumerate(TRANSITION_KINDS):
            shots = [int(n) for n in rng.integers(48, 97, args.shots)]
            path = Path(tmp) / f"{kind}.mp4"
            truth = make_transition_video(path, kind, shots, args.transition_frames, size=(640, 360), seed=seed)
            with av.open(str(path)) as c:
                stream = c.streams.video[0]
                seconds = float(stream.frames / stream.average_rate)
            videos[kind] = (path, truth, seconds)
        for detector in args.detectors.split(","):
            cfg = SplitConfig(detector=detector, device="cpu")
            for kind, (path, truth, seconds) in videos.items():
                if detector == "transnetv2":
                    detect_cuts(str(path), cfg) if kind == TRANSITION_KINDS[0] else None  # loads the model once
                c0, t0 = cpu_seconds(), time.perf_counter()
                found = detect_cuts(str(path), cfg)
                cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
                row = {"detector": detector, "kind": kind, "source_s": round(seconds, 1),
                       **score_transitions(detections(found), truth, args.tolerance),
                       "cpu_s_per_source_s": round(cpu / seconds, 4), "wall_s": round(wall, 2)}
                results["rows"].append(row)
                print(row, flush=True)
    print(f"\n{'detector':11s} {'kind':9s} {'precision':>9s} {'recall':>7s} {'det/true':>9s} {'CPU s / source s':>17s}")
    for r in results["rows"]:
        print(f"{r['detector']:11s} {r['kind']:9s} {r['precision']!s:>9s} {r['recall']!s:>7s} "
              f"{r['detections']:>4d}/{r['transitions']:<4d} {r['cpu_s_per_source_s']:17.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def bench_curation(args) -> dict:
    """CPU seconds per clip of the text filter and of dedup (``--curation``)."""
    from data_pipeline.config import DedupConfig

    results: dict = {"cpu": cpu_model(), "logical_cpus": len(__import__("os").sched_getaffinity(0)),
                     "clips": f"{args.clips} x 2 s 640x360 24 fps H.264", "rows": []}
    runner = RunnerConfig(workers=0, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "c").mkdir()
        for i in range(args.clips):
            make_transition_video(tmp / "c" / f"c{i}.mp4", "cut", [48], size=(640, 360), seed=i)
        inputs = resolve_input(tmp / "c")
        for label, name, cfg in [("filter (motion, black/blank)", "filter", FilterConfig()),
                                 ("filter + max_text_area (3 frames at 448 px)", "filter",
                                  FilterConfig(max_text_area=0.5)),
                                 ("dedup (4 perceptual hashes per clip, then grouping)", "dedup", DedupConfig())]:
            def run(name=name, cfg=cfg):
                out = tmp / f"{name}{time.perf_counter_ns()}.parquet"
                return run_stage(make_stage(name, cfg, out), inputs, out, runner).rows_out

            if name == "filter" and cfg.max_text_area:
                run()  # loads the detector once, as a worker does for its first clip
            row = measure(label, run, 2.0 * args.clips, args.repeat)
            row["cpu_s_per_clip"] = round(row["cpu_s"] / args.clips, 4)
            results["rows"].append(row)
            print(row, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


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
    parser.add_argument("--transitions", action="store_true", help="benchmark the shot detectors instead (above)")
    parser.add_argument("--detectors", default="content,adaptive,transnetv2", help="--transitions: detectors")
    parser.add_argument("--shots", type=int, default=12, help="--transitions: shots per video")
    parser.add_argument("--transition-frames", type=int, default=20, help="--transitions: frames of a dissolve, "
                        "or of each half of a fade")
    parser.add_argument("--tolerance", type=int, default=2, help="--transitions: frames a detection may miss by")
    parser.add_argument("--curation", action="store_true", help="time the text filter and dedup per clip (above)")
    parser.add_argument("--clips", type=int, default=20, help="--curation: clips")
    args = parser.parse_args(argv)
    if args.curation:
        return bench_curation(args)
    if args.transitions:
        import torch

        torch.set_num_threads(1)
        return bench_transitions(args)

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
