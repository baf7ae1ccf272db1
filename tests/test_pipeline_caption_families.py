"""Caption model families (data_pipeline/captioners.py): a tiny random Qwen2-VL built from a config here captions
clips through the stage with its chat template and one multi-frame video per clip; the family comes from the
folder's config; the summary reports videos/s and tokens/s; the vLLM backend (GPU only).

transformers' video processors need torchvision, whose PyPI wheels need CUDA torch: on the CPU-only torch of
this project's machines it cannot be imported. There the processor is the real ``Qwen2VLProcessor`` (chat
template, video token expansion, tokenizer) with :class:`NumpyQwenVideoProcessor` standing in for its torch /
torchvision video processor; where torchvision imports (a GPU machine), the folder's real processor is loaded.
"""

import json
import re
import sys

import numpy as np
import pandas as pd
import pytest

from data_helpers import make_video
from data_pipeline import caption as cap, captioners
from data_pipeline.config import CaptionConfig, RunnerConfig
from data_pipeline.pipeline import run_one
from data_pipeline.rows import SetupError
from data_pipeline.runner import SystemicError
from opensora.data.manifest import normalize, read_manifest

SERIAL = RunnerConfig(workers=0, progress=False)
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
WORDS = "a the cat dog runs sits on red blue green car beach street man woman walks camera pans . , and".split()
# Qwen's ChatML layout; a video entry becomes the family's video placeholder, which the processor expands to
# one token per merged patch of the video.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
    "{% elif c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def torchvision_works() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


class NumpyQwenVideoProcessor:
    """What transformers' ``Qwen2VLVideoProcessor`` makes of a batch of videos (frames resized to multiples of
    28 by the image processor, rescaled and normalised, cut into 2-frame x 14 x 14 patches in 2 x 2 merge order),
    with numpy instead of torch / torchvision, for the machines where torchvision cannot be imported."""

    patch_size, merge_size, temporal_patch_size = 14, 2, 2
    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.calls: list[dict] = []

    def __call__(self, videos=None, **kwargs):
        from transformers import BatchFeature

        self.calls.append({"shapes": [np.asarray(v).shape for v in videos], **kwargs})
        ip, p, m, t = self.image_processor, self.patch_size, self.merge_size, self.temporal_patch_size
        pixels, grids = [], []
        for video in videos:
            frames = [ip.normalize(ip.rescale(ip.resize(np.transpose(f, (2, 0, 1)), size=ip.size,  # (C, H, W)
                                                        resample=ip.resample, factor=p * m), 1 / 255),
                                   ip.image_mean, ip.image_std) for f in video]
            x = np.stack(frames)  # (T, C, H, W)
            if len(x) % t:
                x = np.concatenate([x, x[-1:].repeat(t - len(x) % t, axis=0)])
            T, C, H, W = x.shape
            gt, gh, gw = T // t, H // p, W // p
            patches = x.reshape(gt, t, C, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
            pixels.append(patches.reshape(gt * gh * gw, C * t * p * p))
            grids.append([gt, gh, gw])
        return BatchFeature({"pixel_values_videos": np.concatenate(pixels), "video_grid_thw": np.array(grids)},
                            tensor_type=kwargs.get("return_tensors"))


def make_tiny_qwen2_vl(out_dir, seed: int = 0):
    """A random 2-layer Qwen2-VL (tiny vision tower, tiny Qwen2 text model with M-RoPE) and its tokenizer, chat
    template and processor, saved as a model folder; captions are random words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + ["user", "assistant", "describe", "this", "video"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<unk>",
                                        pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})  # so "<|video_pad|>"*N splits
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
                         bos_token_id=1, eos_token_id=vocab["<|im_end|>"], pad_token_id=1),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).eval().save_pretrained(str(out_dir))
    if torchvision_works():
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        pixels = dict(min_pixels=28 * 28, max_pixels=56 * 56)
        Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                         video_processor=Qwen2VLVideoProcessor(**pixels),
                         chat_template=CHAT_TEMPLATE).save_pretrained(str(out_dir))
    else:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


def numpy_qwen2_vl_processor(model_dir):
    """The real Qwen2VLProcessor over the folder's tokenizer, with the numpy video processor: built field by field,
    as its constructor insists on a torchvision video processor."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56)
    processor = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    processor.tokenizer, processor.image_processor, processor.chat_template = tokenizer, image_processor, CHAT_TEMPLATE
    processor.video_processor = NumpyQwenVideoProcessor(image_processor)
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    processor.video_token_id = tokenizer.convert_tokens_to_ids(processor.video_token)
    return processor


@pytest.fixture
def qwen2_vl(tmp_path, monkeypatch):
    """A tiny Qwen2-VL folder; the processors the stage loads, recorded (prompts and videos of each call)."""
    folder = make_tiny_qwen2_vl(tmp_path / "qwen2vl")
    calls: list[dict] = []
    real_load = captioners.load_processor

    def load(model_dir):
        processor = real_load(model_dir) if torchvision_works() else numpy_qwen2_vl_processor(model_dir)
        base = type(processor)

        def recording(self, *args, **kwargs):
            calls.append(kwargs)
            return base.__call__(self, *args, **kwargs)

        processor.__class__ = type("Recording" + base.__name__, (base,), {"__call__": recording})
        return processor

    monkeypatch.setattr(captioners, "load_processor", load)
    captioners.load_model.cache_clear()
    yield folder, calls
    captioners.load_model.cache_clear()


@pytest.mark.slow
def test_tiny_qwen2_vl_captions_clips_as_videos_through_the_stage(tmp_path, qwen2_vl, capsys):
    folder, calls = qwen2_vl
    paths = []
    for i in range(3):
        paths.append(tmp_path / "clips" / f"c{i}.mp4")
        make_video(paths[-1], [30], fps=15, size=(64 + 16 * i, 48))
    df = normalize(pd.DataFrame({"path": [str(p) for p in paths]}))
    cfg = CaptionConfig(model=str(folder), video_frames=6, batch_size=2, max_new_tokens=6, min_words=1, retries=0,
                        max_repeats=0, device="cpu")
    summary = run_one("caption", cfg, df, tmp_path / "cap.parquet", SERIAL)
    assert summary.done == 3, summary
    out = read_manifest(tmp_path / "cap.parquet")
    assert (out["caption_source"] == "model").all() and out["text"].str.len().gt(0).all()
    assert out["caption_tokens"].between(1, 6).all()
    # each clip went in as one video of 6 frames (not 6 images, not one glued image), through the chat template
    assert [len(c["text"]) for c in calls] == [2, 1] and all("images" not in c for c in calls)
    videos = [v for c in calls for v in c["videos"]]
    assert [v.shape for v in videos] == [(6, 48, 64, 3), (6, 48, 80, 3), (6, 48, 96, 3)]
    assert all(re.search(r"<\|im_start\|> user <\|vision_start\|><\|video_pad\|><\|vision_end\|> Describe this",
                         prompt) and prompt.endswith("<|im_start|> assistant ") for c in calls for prompt in c["text"])
    # the frames are timed: 6 of the clip's 30 frames at 15 fps, spread over it
    meta = [m for c in calls for m in c["video_metadata"]]
    assert meta[0]["frames_indices"] == [2, 7, 12, 17, 22, 27] and meta[0]["total_num_frames"] == 30
    assert meta[0]["fps"] == pytest.approx(15.0)
    # the model saw 3 temporal patches of 2 frames per video (native video input)
    model, processor = captioners.load_model(str(folder), "cpu", "auto")
    inputs = processor(text=calls[-1]["text"], videos=calls[-1]["videos"], return_tensors="pt")
    assert inputs["video_grid_thw"][:, 0].tolist() == [3]
    # the summary line: clips and tokens per second
    assert re.search(r"model captioned 3 clips: [\d.]+ videos/s, [\d.]+ tokens/s", capsys.readouterr().err)
    assert summary.report.startswith("model captioned 3 clips")


def test_the_family_comes_from_the_folders_config(tmp_path):
    def folder(name, model_type):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": model_type}))
        return str(tmp_path / name)

    captioners.family_of.cache_clear()
    assert captioners.family_of(folder("q25", "qwen2_5_vl")).video
    assert captioners.family_of(folder("ov", "llava_onevision")).video
    assert not captioners.family_of(folder("l16", "llava_next")).video
    with pytest.raises(SetupError, match=r"is a 'bert' model; supported: llava, llava_next"):
        captioners.family_of(folder("bert", "bert"))
    with pytest.raises(SetupError, match="caption model folder not found"):
        captioners.family_of(str(tmp_path / "missing"))
    with pytest.raises(SetupError, match="no readable config.json"):
        captioners.family_of(str(tmp_path))


def test_a_video_family_reads_frames_spread_over_the_clip_with_their_timing(tmp_path):
    make_video(tmp_path / "c.mp4", [40], fps=20, size=(64, 48))
    video = cap.read_row_frames({"path": str(tmp_path / "c.mp4")}, CaptionConfig(video_frames=4), video=True)
    assert video.frames.shape == (4, 48, 64, 3) and video.frames.dtype == np.uint8
    assert video.indices == [5, 15, 25, 35] and video.total == 40 and video.fps == pytest.approx(20.0)
    images = cap.read_row_frames({"path": str(tmp_path / "c.mp4")}, CaptionConfig())
    assert isinstance(images, list) and len(images) == 3  # an image family: frame_positions, one image each


def test_the_summary_reports_videos_and_tokens_per_second(tmp_path, monkeypatch):
    monkeypatch.setattr(cap, "family_of", lambda model: captioners.FAMILIES["qwen2_vl"])
    monkeypatch.setattr(cap, "read_video", lambda path, count, *a: captioners.Video(
        np.zeros((count, 4, 4, 3), np.uint8), list(range(count)), count, 24.0))
    # the first caption of clip 0 is empty: retried, so its tokens are those of both tries (4 + 10)
    answers = iter([[("", False, 4), ("a red car on a street", False, 7)], [("a dog runs on the beach", False, 10)]])
    monkeypatch.setattr(cap, "generate", lambda visuals, cfg, budget: next(answers))
    df = normalize(pd.DataFrame({"path": ["/v/0.mp4", "/v/1.mp4", "/v/2.mp4"],
                                 "text": [None, None, "a caption the data carries"]}))
    summary = run_one("caption", CaptionConfig(model="q", batch_size=2), df, tmp_path / "cap.parquet", SERIAL)
    out = read_manifest(tmp_path / "cap.parquet")
    assert out["caption_tokens"].tolist()[:2] == [14, 7]
    assert summary.done == 3 and summary.seconds > 0
    clips, videos_s, tokens_s = re.fullmatch(r"model captioned (\d+) clips: ([\d.]+) videos/s, ([\d.]+) tokens/s",
                                             summary.report).groups()
    assert int(clips) == 2  # the carried caption is no model work
    assert float(tokens_s) / float(videos_s) == pytest.approx(21 / 2, rel=0.02)
    assert summary.report in str(summary)


def test_vllm_backend_without_vllm_stops_the_stage_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed, also where it is: find_spec gives None
    make_video(tmp_path / "c.mp4", [12])
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    captioners.family_of.cache_clear()
    cfg = CaptionConfig(model=str(tmp_path / "m"), backend="vllm", video_frames=2)
    df = normalize(pd.DataFrame({"path": [str(tmp_path / "c.mp4")]}))
    with pytest.raises(SystemicError, match="set-up.*caption.backend: vllm, but vLLM is not installed"):
        run_one("caption", cfg, df, tmp_path / "cap.parquet", SERIAL)
    with pytest.raises(ValueError, match="caption.backend must be"):
        CaptionConfig(backend="sglang")


@pytest.mark.gpu
@pytest.mark.slow
def test_vllm_backend_captions_a_tiny_qwen2_vl_on_a_gpu(tmp_path):
    """Never run on the project's machines (no GPU, and vLLM pins a CUDA torch): the GPU check for the vLLM
    backend. The engine gets every clip of a call at once and batches them continuously."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("vllm")
    if not torchvision_works():
        pytest.skip("needs torchvision (the folder's processor)")
    folder = make_tiny_qwen2_vl(tmp_path / "qwen2vl")
    for i in range(4):
        make_video(tmp_path / "clips" / f"c{i}.mp4", [24])
    df = normalize(pd.DataFrame({"path": [str(tmp_path / "clips" / f"c{i}.mp4") for i in range(4)]}))
    cfg = CaptionConfig(model=str(folder), backend="vllm", video_frames=4, batch_size=4, max_new_tokens=6,
                        min_words=1, retries=0, max_repeats=0, vllm_max_model_len=1024,
                        vllm_gpu_memory_utilization=0.3)
    summary = run_one("caption", cfg, df, tmp_path / "cap.parquet", SERIAL)
    assert summary.done == 4, summary
    out = read_manifest(tmp_path / "cap.parquet")
    assert (out["caption_source"] == "model").all() and out["caption_tokens"].between(1, 6).all()
