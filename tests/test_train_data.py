"""Training data: dataset items, buckets, the resumable distributed sampler, and the latent cache.

Videos are tiny H.264 files written in each test; frame t of an "index video" is the flat grey 8 * t,
so the frames a sample was built from can be read back from its pixels.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from opensora.data import latent_cache
from opensora.data.buckets import nearest_size, parse_sizes
from opensora.data.dataset import DataConfig, VideoDataset, collate, resize_center_crop
from opensora.data.latent_cache import (
    CachedLatentDataset,
    CacheMismatchError,
    EncoderIdentity,
    cache_key,
    encoder_identity,
    entry_path,
    precompute,
)
from opensora.data.loader import build_dataloader
from opensora.data.manifest import write_manifest
from opensora.data.sampler import DistributedBucketSampler
from opensora.data.video_io import write_video
from opensora.models.text_encoder import T5TextEncoder, make_tiny_t5
from opensora.models.vae import IdentityAutoencoder, VideoAutoencoderKL, make_tiny_vae
from opensora.utils import file_sha256
from tests.data_helpers import truncate

GREY_STEP = 8  # grey level per frame index in index videos


def index_video(path: Path, num_frames: int, width: int = 32, height: int = 24, offset: int = 0) -> Path:
    """An H.264 file whose frame t is the flat grey GREY_STEP * t (+ offset)."""
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t] = GREY_STEP * t + offset
    return write_video(path, frames, fps=8, crf=0)


def frame_ids(video: torch.Tensor) -> list[int]:
    """Frame indices encoded in a (3, T, H, W) sample of index-video frames."""
    grey = ((video + 1) * 127.5).mean(dim=(0, 2, 3))  # (T,)
    return [int(round(v / GREY_STEP)) for v in grey.tolist()]


def row(path: Path | str, text: str = "a clip", num_frames: int | None = None, height: int | None = None,
        width: int | None = None) -> dict:
    return dict(path=str(path), text=text, num_frames=num_frames, height=height, width=width)


def manifest(tmp_path: Path, rows: list[dict], name: str = "manifest.parquet") -> str:
    return str(write_manifest(pd.DataFrame(rows), tmp_path / name))


def failures(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- items ---------------------------------------------------------------------------------------------------
def test_item_shape_range_and_frame_interval(tmp_path):
    clip = index_video(tmp_path / "a.mp4", 30, width=40, height=24)
    cfg = DataConfig(manifest=manifest(tmp_path, [row(clip, "grey", 30, 24, 40)]), num_frames=4, frame_interval=3,
                     image_size=(16, 16), num_workers=0)
    ds = VideoDataset(cfg, seed=0)
    assert len(ds) == 1 and ds.bucket_keys == [(4, 16, 16)]
    starts = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[0]
        video = item["video"]
        assert video.shape == (3, 4, 16, 16) and video.dtype == torch.float32
        assert video.min() >= -1 and video.max() <= 1
        assert item["text"] == "grey" and item["index"] == 0 and item["bucket"] == (4, 16, 16)
        ids = frame_ids(video)
        assert ids == ds.frame_indices(0).tolist()
        assert np.diff(ids).tolist() == [3, 3, 3]
        assert 0 <= ids[0] <= 30 - 10  # the window of 10 frames ends inside the clip
        starts.add(ids[0])
    assert len(starts) > 1, "random window start never moved across epochs"
    fixed = VideoDataset(replace(cfg, random_start=False))
    assert frame_ids(fixed[0]["video"]) == [0, 3, 6, 9]
    assert frame_ids(fixed[0]["video"]) == frame_ids(ds.load(0, random_start=False))
    assert fixed[0]["video"][:, 0].max() == -1  # frame 0 is black


def test_resize_covers_then_centre_crops():
    width = 40
    frames = np.broadcast_to(np.arange(width, dtype=np.uint8)[None, None, :, None] * 6, (1, 24, width, 3)).copy()
    out = resize_center_crop(frames, (16, 16))  # scale 16/24: 24x40 -> 16x27, crop columns 5..20 of 27
    assert out.shape == (3, 1, 16, 16)
    columns = ((out[0, 0] + 1) * 127.5).mean(dim=0)  # (16,) grey per output column
    assert torch.all(columns[1:] > columns[:-1])  # a horizontal ramp stays a ramp, not flipped or squashed
    centre_in = frames[0, 0, width // 2 - 1 : width // 2 + 1, 0].astype(float).mean()
    assert abs(columns[7:9].mean().item() - centre_in) < 6  # the centre of the crop is the centre of the frame
    assert columns[0] > frames[0, 0, 0, 0] + 20  # the left edge was cropped away


def test_images_and_single_frames(tmp_path):
    image = tmp_path / "still.png"
    Image.fromarray(np.full((20, 30, 3), (200, 100, 50), dtype=np.uint8)).save(image)
    clip = index_video(tmp_path / "v.mp4", 12)
    rows = [row(image, "a still"), row(clip, "a clip")]  # no size columns: probed at build time
    cfg = DataConfig(manifest=manifest(tmp_path, rows), num_frames=4, frame_interval=2, image_size=(16, 16))
    ds = VideoDataset(cfg)
    assert ds.bucket_keys == [(1, 16, 16), (4, 16, 16)]
    still = ds[0]["video"]
    assert still.shape == (3, 1, 16, 16)
    expected = torch.tensor([200, 100, 50]) / 127.5 - 1
    assert torch.allclose(still.mean(dim=(1, 2, 3)), expected, atol=1e-5)
    assert ds[1]["video"].shape == (3, 4, 16, 16)

    one = VideoDataset(replace(cfg, num_frames=1, random_start=False))
    assert one.bucket_keys == [(1, 16, 16), (1, 16, 16)]
    assert one[1]["video"].shape == (3, 1, 16, 16) and frame_ids(one[1]["video"]) == [0]


def test_broken_and_short_clips_are_recorded_not_fatal(tmp_path):
    good = [index_video(tmp_path / f"good{i}.mp4", 12, width=32, height=24) for i in range(4)]
    truncate(good[0], tmp_path / "truncated.mp4", 0.5)
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 50)
    short = index_video(tmp_path / "short.mp4", 3)
    rows = [row(p, "good", 12, 24, 32) for p in good]
    # Broken files claim a portrait size, so that they fill one bucket (one all-broken batch) of their own.
    rows += [row(tmp_path / name, "broken", 12, 48, 24) for name in ("truncated.mp4", "junk.mp4", "missing.mp4")]
    rows += [row(short, "short", 3, 24, 32)]
    cfg = DataConfig(manifest=manifest(tmp_path, rows), num_frames=4, frame_interval=2, image_size=(16, 16),
                     buckets=[[16, 16], [32, 16]], num_workers=2)
    log = tmp_path / "run" / "failures.jsonl"
    ds = VideoDataset(cfg, failures_path=log)
    assert len(ds) == 7  # the short clip is left out (short_clips="skip") ...
    assert [f["path"] for f in failures(log)] == [str(short)]  # ... and recorded
    assert "too short" in failures(log)[0]["error"]
    for index in (4, 5, 6):
        assert ds[index] is None
    assert {f["path"] for f in failures(log)[1:]} == {str(tmp_path / n) for n in ("truncated.mp4", "junk.mp4",
                                                                                   "missing.mp4")}
    assert all(f["error"] for f in failures(log))
    log.unlink()

    loader, sampler = build_dataloader(cfg, batch_size=2, seed=3, failures_path=log)
    assert len(loader) == 3  # 2 batches of good clips + 1 of broken ones
    batches = list(loader)  # worker processes decode; the broken batch yields nothing
    assert len(batches) == 2 and all(b["video"].shape == (2, 3, 4, 16, 16) for b in batches)
    assert sorted(i for b in batches for i in b["index"].tolist()) == [0, 1, 2, 3]
    assert sampler.epoch == 1 and sampler.samples_consumed() == 0  # the broken batch counted as consumed
    assert len(failures(log)) == 2 + 1  # two broken clips of the broken batch, written by workers; short at build

    padded = VideoDataset(replace(cfg, short_clips="pad", random_start=False))
    assert len(padded) == 8
    assert frame_ids(padded[7]["video"]) == [0, 2, 2, 2]  # 3 frames, interval 2: the last frame repeats


def test_all_broken_epoch_is_an_error_not_a_hang(tmp_path):
    rows = [row(tmp_path / f"missing{i}.mp4", "x", 12, 24, 32) for i in range(2)]
    # max_failed_share 1: the failed-load limit (tests/test_train_data_trust.py) would stop this first.
    cfg = DataConfig(manifest=manifest(tmp_path, rows), num_frames=2, image_size=(16, 16), num_workers=0,
                     max_failed_share=1.0)
    loader, _ = build_dataloader(cfg, batch_size=2)
    with pytest.raises(RuntimeError, match="every batch of epoch 0 was broken"):
        list(loader)


# -- buckets -------------------------------------------------------------------------------------------------
def test_nearest_size():
    sizes = parse_sizes([[256, 256], [192, 320], [320, 192]], default=(256, 256))
    assert nearest_size(720, 1280, sizes) == (192, 320)
    assert nearest_size(1280, 720, sizes) == (320, 192)
    assert nearest_size(500, 520, sizes) == (256, 256)
    ladder = parse_sizes([[64, 64], [128, 128], [256, 256]], default=(64, 64))
    assert nearest_size(200, 200, ladder) == (128, 128)  # largest size that needs no upscaling
    assert nearest_size(32, 32, ladder) == (64, 64)  # else the one that upscales least
    assert parse_sizes(None, default=(48, 64)) == [(48, 64)]
    with pytest.raises(ValueError, match="distinct"):
        parse_sizes([[16, 16], [16, 16]], default=(16, 16))


def test_every_batch_has_one_shape(tmp_path):
    rows = []
    for i in range(2):
        for kind, (w, h) in {"wide": (64, 32), "tall": (32, 64), "square": (48, 48)}.items():
            rows.append(row(index_video(tmp_path / f"{kind}{i}.mp4", 6, width=w, height=h), kind))
        still = tmp_path / f"still{i}.png"
        Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(still)
        rows.append(row(still, "still"))
    cfg = DataConfig(manifest=manifest(tmp_path, rows), num_frames=2, frame_interval=1, image_size=(16, 16),
                     buckets=[[16, 16], [16, 32], [32, 16]], num_workers=0)
    loader, sampler = build_dataloader(cfg, batch_size=2, seed=1)
    expected = {"wide": (2, 16, 32), "tall": (2, 32, 16), "square": (2, 16, 16), "still": (1, 16, 16)}
    seen = []
    for batch in loader:
        T, H, W = batch["bucket"]
        assert batch["video"].shape == (2, 3, T, H, W)
        assert {expected[text] for text in batch["text"]} == {(T, H, W)}
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(8))
    with pytest.raises(ValueError, match="mixes buckets"):
        collate([dict(video=torch.zeros(3, 1, 2, 2), bucket=(1, 2, 2)), dict(video=torch.zeros(3, 2, 2, 2),
                                                                          bucket=(2, 2, 2))])


# -- sampler -------------------------------------------------------------------------------------------------
class Keys:
    """The sampler needs only the bucket of each index."""

    def __init__(self, keys):
        self.bucket_keys = keys


KEYS = Keys([(4, 16, 16)] * 24 + [(4, 16, 32)] * 24 + [(1, 16, 16)] * 16)


def rank_batches(batch_size: int, world_size: int, seed: int = 0, state: dict | None = None) -> list[list[list[int]]]:
    """Per step, the batches of all ranks (rank order) for the rest of the epoch, from ``state``."""
    per_rank = []
    for rank in range(world_size):
        sampler = DistributedBucketSampler(KEYS, batch_size, rank, world_size, seed)
        if state is not None:
            sampler.load_state_dict(json.loads(json.dumps(state)))  # the state survives a JSON round trip
        per_rank.append(list(sampler))
    return [list(step) for step in zip(*per_rank)]


def test_sampler_is_deterministic_and_partitions_each_epoch():
    a, b = DistributedBucketSampler(KEYS, 2, 0, 2, seed=5), DistributedBucketSampler(KEYS, 2, 0, 2, seed=5)
    assert list(a) == list(b)
    assert list(a) != list(DistributedBucketSampler(KEYS, 2, 0, 2, seed=6))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    steps = rank_batches(batch_size=2, world_size=2, seed=5)
    assert len(steps) == 64 // 4
    flat = [i for step in steps for batch in step for i in batch]
    assert sorted(flat) == list(range(64))  # bucket sizes divide by 4: every sample exactly once
    for step in steps:  # one bucket per global batch, so every rank trains on the same shape
        assert len({KEYS.bucket_keys[i] for batch in step for i in batch}) == 1


def test_sampler_resume_gives_exactly_the_remaining_batches():
    world, size = 2, 2
    samplers = [DistributedBucketSampler(KEYS, size, r, world, seed=1) for r in range(world)]
    reference = [list(s) for s in samplers]
    for s in samplers:
        s.advance(5)
    state = samplers[0].state_dict()
    assert state["samples_consumed"] == 5 * world * size and state["epoch"] == 0
    resumed = [DistributedBucketSampler(KEYS, size, r, world, seed=1) for r in range(world)]
    for r, s in enumerate(resumed):
        s.load_state_dict(state)
        assert list(s) == reference[r][5:]
    # Through the epoch boundary: the next epoch is the one an uninterrupted run sees.
    uninterrupted = DistributedBucketSampler(KEYS, size, 0, world, seed=1)
    uninterrupted.set_epoch(1)
    resumed[0].advance(len(resumed[0]))
    assert resumed[0].epoch == 1 and list(resumed[0]) == list(uninterrupted)
    with pytest.raises(ValueError, match="seed"):
        DistributedBucketSampler(KEYS, size, 0, world, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot advance"):
        resumed[0].advance(len(resumed[0]) + 1)


def test_sampler_resume_on_another_world_size():
    state_sampler = DistributedBucketSampler(KEYS, 2, 0, 2, seed=3)  # G = 4
    reference = rank_batches(2, 2, seed=3)
    state_sampler.advance(5)
    state = state_sampler.state_dict()
    consumed = {i for step in reference[:5] for batch in step for i in batch}
    remaining = set(range(64)) - consumed

    # Same global batch (2 ranks x 2 -> 4 ranks x 1): the very same global batches, split differently.
    same_global = rank_batches(1, 4, seed=3, state=state)
    assert [sum(step, []) for step in same_global] == [sum(step, []) for step in reference[5:]]

    # Smaller global batch (2 ranks -> 1 rank, batch 2): the same remaining samples, each once.
    smaller = rank_batches(2, 1, seed=3, state=state)
    flat = [i for step in smaller for batch in step for i in batch]
    assert sorted(flat) == sorted(remaining)

    # Larger global batch (3 ranks x 2 = 6): only remaining samples, each at most once; per bucket fewer
    # than 6 are left over by drop_last. Then a second resume back on 2 ranks stays consistent.
    larger = DistributedBucketSampler(KEYS, 2, 0, 3, seed=3)
    larger.load_state_dict(state)
    steps = rank_batches(2, 3, seed=3, state=state)
    flat = [i for step in steps for batch in step for i in batch]
    assert len(flat) == len(set(flat)) and set(flat) <= remaining
    for key in set(KEYS.bucket_keys):
        left = {i for i in remaining if KEYS.bucket_keys[i] == key} - set(flat)
        assert len(left) < 6
    larger.advance(2)
    state2 = larger.state_dict()
    assert state2["samples_consumed"] == 5 * 4 + 2 * 6
    again = rank_batches(2, 2, seed=3, state=state2)
    taken = consumed | {i for step in steps[:2] for batch in step for i in batch}
    flat = [i for step in again for batch in step for i in batch]
    assert len(flat) == len(set(flat)) and not set(flat) & taken


def test_sampler_state_survives_distributed_checkpoint(tmp_path):
    import torch.distributed.checkpoint as dcp

    from opensora.checkpoint import FnState

    saved = DistributedBucketSampler(KEYS, 2, 0, 2, seed=4)
    saved.advance(3)
    regrouped = DistributedBucketSampler(KEYS, 3, 0, 2, seed=4)  # a second global batch size: two segments
    regrouped.load_state_dict(saved.state_dict())
    regrouped.advance(2)
    dcp.save({"data": FnState(regrouped.state_dict, regrouped.load_state_dict)}, checkpoint_id=str(tmp_path))
    fresh = DistributedBucketSampler(KEYS, 3, 0, 2, seed=4)  # its own state has one segment
    dcp.load({"data": FnState(fresh.state_dict, fresh.load_state_dict)}, checkpoint_id=str(tmp_path))
    assert fresh.state_dict() == regrouped.state_dict() and list(fresh) == list(regrouped)


def test_sampler_needs_one_full_batch():
    with pytest.raises(ValueError, match="no complete global batch"):
        DistributedBucketSampler(Keys([(1, 8, 8)] * 3), batch_size=2, rank=0, world_size=2)
    # drop_last=False fills the last global batch up with the bucket's first samples: all ranks get 2.
    ranks = [list(DistributedBucketSampler(Keys([(1, 8, 8)] * 3), 2, r, 2, drop_last=False)) for r in (0, 1)]
    assert [len(batches) for batches in ranks] == [1, 1] and [len(b[0]) for b in ranks] == [2, 2]
    assert set(ranks[0][0] + ranks[1][0]) == {0, 1, 2}


def test_loader_resume_with_prefetching_workers(tmp_path):
    rows = [row(index_video(tmp_path / f"c{i}.mp4", 12, offset=i), f"clip {i}", 12, 24, 32) for i in range(8)]
    cfg = DataConfig(manifest=manifest(tmp_path, rows), num_frames=2, frame_interval=3, image_size=(16, 16),
                     num_workers=2)
    loader, _ = build_dataloader(cfg, batch_size=2, seed=7)
    reference = list(loader) + list(loader)  # epochs 0 and 1
    assert len(reference) == 8

    loader, sampler = build_dataloader(cfg, batch_size=2, seed=7)
    for step, _ in enumerate(loader):
        if step == 1:
            break  # the workers have prefetched more batches than were consumed
    state = sampler.state_dict()
    assert state["samples_consumed"] == 4
    loader, sampler = build_dataloader(cfg, batch_size=2, seed=7)
    sampler.load_state_dict(state)
    resumed = list(loader) + list(loader)
    assert len(resumed) == 6
    for got, want in zip(resumed, reference[2:]):
        assert got["index"].tolist() == want["index"].tolist() and got["text"] == want["text"]
        assert torch.equal(got["video"], want["video"])  # same random windows too


def test_persistent_workers_follow_the_epoch(tmp_path):
    """The loader's workers live for the whole run, and each epoch's random windows still follow set_epoch."""
    rows = [row(index_video(tmp_path / f"c{i}.mp4", 30, offset=i), f"clip {i}", 30, 24, 32) for i in range(2)]
    cfg = DataConfig(manifest=manifest(tmp_path, rows), num_frames=2, frame_interval=2, image_size=(16, 16),
                     num_workers=1)
    loader, sampler = build_dataloader(cfg, batch_size=1, seed=3)
    in_process = VideoDataset(cfg, seed=3)
    workers, starts = set(), set()
    for epoch in range(4):
        assert sampler.epoch == epoch
        batches = list(loader)
        workers.add(tuple(w.pid for w in loader._iterator._workers))
        in_process.set_epoch(epoch)
        for batch in batches:
            index = int(batch["index"][0])
            assert torch.equal(batch["video"][0], in_process[index]["video"]), f"epoch {epoch}: stale window"
            starts.add((index, frame_ids(batch["video"][0])[0]))
    assert len(workers) == 1, "the workers were restarted between epochs"
    assert len(starts) > 2, "the random windows never moved"


# -- latent cache ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    vae = VideoAutoencoderKL.from_pretrained(make_tiny_vae(root / "vae", seed=0)).eval()
    te = T5TextEncoder.from_pretrained(make_tiny_t5(root / "t5", seed=0), max_length=8)
    other_te = T5TextEncoder.from_pretrained(make_tiny_t5(root / "t5b", seed=1), max_length=8)
    return vae, te, other_te, root


def test_cache_key_changes_with_every_part(encoders):
    vae, te, other_te, root = encoders
    ident = EncoderIdentity("v", "t")
    base = dict(content_sha256="c", text="t", identity=ident, bucket=(4, 16, 16), frame_interval=3, short_clips="skip")
    variants = [base, {**base, "content_sha256": "d"}, {**base, "text": "u"},
                {**base, "identity": EncoderIdentity("w", "t")}, {**base, "identity": EncoderIdentity("v", "u")},
                {**base, "bucket": (8, 16, 16)}, {**base, "bucket": (4, 16, 32)}, {**base, "bucket": (4, 32, 16)},
                {**base, "frame_interval": 2}, {**base, "short_clips": "pad"}]
    assert len({cache_key(**v) for v in variants}) == len(variants)

    ident = encoder_identity(vae, te)
    te.encode(["calling the tokenizer stores padding settings in it"])
    assert encoder_identity(vae, te) == ident  # using an encoder does not change its identity
    reloaded = VideoAutoencoderKL.from_pretrained(root / "vae")
    assert encoder_identity(reloaded, T5TextEncoder.from_pretrained(root / "t5", max_length=8)) == ident
    assert encoder_identity(vae, other_te).text_encoder != ident.text_encoder  # other weights
    assert encoder_identity(vae, T5TextEncoder(te.model, te.tokenizer, max_length=9)).text_encoder != ident.text_encoder
    with torch.no_grad():
        next(reloaded.parameters()).view(-1)[0] += 1e-3  # one weight changed
    assert encoder_identity(reloaded, te).vae != ident.vae
    reloaded.scaling_factor = 1.0
    assert len({encoder_identity(v, te).vae for v in (vae, reloaded, IdentityAutoencoder())}) == 3


def test_cached_dataset_matches_direct_encode_and_ignores_stale_entries(tmp_path, encoders):
    vae, te, other_te, _ = encoders
    clips = [index_video(tmp_path / f"c{i}.mp4", 8, width=32, height=32, offset=3 * i) for i in range(3)]
    texts = ["a red ball", "two blue cubes", "a dog running"]
    rows = [row(c, t, 8, 32, 32) for c, t in zip(clips, texts)]
    cache = tmp_path / "cache"
    cfg = DataConfig(manifest=manifest(tmp_path, rows), num_frames=2, frame_interval=2, image_size=(16, 16),
                     num_workers=0, cache_dir=str(cache))
    reports = [precompute(cfg, vae, te, cache, rank=r, world_size=2, batch_size=2, progress=False) for r in (0, 1)]
    assert [(r.total, r.written, r.existing) for r in reports] == [(2, 2, 0), (1, 1, 0)]  # ranks split the clips
    again = precompute(cfg, vae, te, cache, progress=False)
    assert (again.total, again.written, again.existing) == (3, 0, 3)  # resumable: nothing re-encoded
    assert not list(cache.rglob("*.tmp"))  # atomic writes leave no temporary files

    identity = encoder_identity(vae, te)
    log = tmp_path / "failures.jsonl"
    cached = CachedLatentDataset(cfg, identity, failures_path=log)
    videos = VideoDataset(cfg)
    for i in range(3):
        item = cached[i]
        with torch.no_grad():
            latent = vae.encode(videos.load(i, random_start=False)[None], sample_posterior=False)[0]
        text = te.encode([texts[i]])
        assert item["latent"].shape == (4, 2, 8, 8) and item["text"] == texts[i]
        assert torch.allclose(item["latent"], latent, atol=1e-5)
        assert torch.allclose(item["y"], text["y"][0], atol=1e-5) and torch.equal(item["mask"], text["mask"][0])
    loader, _ = build_dataloader(cfg, batch_size=3, encoder_identity=identity)
    (batch,) = list(loader)
    assert batch["latent"].shape == (3, 4, 2, 8, 8) and batch["y"].shape == (3, 1, 8, 32)
    assert batch["mask"].shape == (3, 8) and not log.exists()

    # Stale: other text-encoder weights -> no entry is found, nothing stale is returned, all recorded.
    stale = CachedLatentDataset(cfg, encoder_identity(vae, other_te), failures_path=log)
    assert [stale[i] for i in range(3)] == [None, None, None]
    assert len(failures(log)) == 3 and "stale" in failures(log)[0]["error"]
    # Stale: a clip's content changed under the same path, or its caption changed.
    index_video(clips[0], 8, width=32, height=32, offset=100)
    rows[1]["text"] = "two green cubes"
    cfg2 = replace(cfg, manifest=manifest(tmp_path, rows, "m2.parquet"))
    changed = CachedLatentDataset(cfg2, identity)
    assert changed[0] is None and changed[1] is None and changed[2] is not None
    assert precompute(cfg2, vae, te, cache, progress=False).written == 2  # only what changed is encoded
    assert CachedLatentDataset(cfg2, identity)[0] is not None


def test_identity_autoencoder_cache_holds_the_pixels(tmp_path, encoders):
    _, te, _, _ = encoders
    clip = index_video(tmp_path / "c.mp4", 6, width=32, height=24)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\0" * 1000)
    rows = [row(clip, "a clip", 6, 24, 32), row(junk, "broken", 6, 24, 32)]
    cfg = DataConfig(manifest=manifest(tmp_path, rows), num_frames=3, frame_interval=2, image_size=(16, 16),
                     cache_dir=str(tmp_path / "cache"), num_workers=2)
    vae = IdentityAutoencoder()
    log = tmp_path / "failures.jsonl"
    report = precompute(cfg, vae, te, cfg.cache_dir, failures_path=log, progress=False)  # decodes in 2 workers
    assert report.written == 1 and [f["path"] for f in report.failed] == [str(junk)]
    assert [f["path"] for f in failures(log)] == [str(junk)]
    item = CachedLatentDataset(cfg, encoder_identity(vae, te))[0]
    assert torch.equal(item["latent"], VideoDataset(cfg).load(0, random_start=False))
    assert frame_ids(item["latent"]) == [0, 2, 4]
    assert entry_path(cfg.cache_dir, "ab12").parent.name == "ab"


def test_identity_does_not_depend_on_the_compute_dtype(tmp_path, encoders):
    vae, te, other_te, root = encoders
    vae16 = VideoAutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.bfloat16).eval()
    te16 = T5TextEncoder.from_pretrained(root / "t5", max_length=8, torch_dtype=torch.bfloat16)
    assert next(vae16.parameters()).dtype == next(te16.model.parameters()).dtype == torch.bfloat16
    ident, ident16 = encoder_identity(vae, te), encoder_identity(vae16, te16)
    assert ident16 == ident, "the same checkpoint loaded in bf16 is the same encoder"
    assert (ident.vae_dtype, ident16.vae_dtype, ident16.text_encoder_dtype) == ("float32", "bfloat16", "bfloat16")
    other16 = T5TextEncoder.from_pretrained(root / "t5b", max_length=8, torch_dtype=torch.bfloat16)
    assert encoder_identity(vae16, other16).text_encoder != ident.text_encoder  # other weights, also in bf16

    # Filled in fp32, read by a bf16 run (the trainer on CUDA): every entry is found; nothing is re-encoded in bf16.
    clips = [index_video(tmp_path / f"c{i}.mp4", 6, width=32, height=32, offset=5 * i) for i in range(3)]
    cfg = DataConfig(manifest=manifest(tmp_path, [row(c, f"clip {i}", 6, 32, 32) for i, c in enumerate(clips)]),
                     num_frames=2, frame_interval=2, image_size=(16, 16), num_workers=0, cache_dir=str(tmp_path / "c"))
    assert precompute(cfg, vae, te, cfg.cache_dir, progress=False).written == 3
    assert all(item is not None for item in CachedLatentDataset(cfg, ident16, max_leading_misses=1))
    again = precompute(cfg, vae16, te16, cfg.cache_dir, progress=False)
    assert (again.written, again.existing) == (0, 3)
    (entry, *_) = sorted(Path(cfg.cache_dir).rglob("*.safetensors"))
    with safe_open(str(entry), "pt") as f:
        meta = f.metadata()
    assert (meta["vae_dtype"], meta["text_encoder_dtype"], meta["stored_dtype"]) == ("float32", "float32", "float32")
    assert meta["text_encoder"] == ident.text_encoder


def test_a_cache_made_for_other_encoders_or_shapes_stops_early_and_says_why(tmp_path, encoders, monkeypatch):
    vae, te, other_te, _ = encoders
    clips = [index_video(tmp_path / f"c{i}.mp4", 6, width=32, height=32, offset=5 * i) for i in range(5)]
    cache = tmp_path / "cache"
    cfg = DataConfig(manifest=manifest(tmp_path, [row(c, f"clip {i}", 6, 32, 32) for i, c in enumerate(clips)]),
                     num_frames=2, frame_interval=2, image_size=(16, 16), num_workers=0, cache_dir=str(cache))
    empty = CachedLatentDataset(cfg, encoder_identity(vae, te), max_leading_misses=1)
    with pytest.raises(CacheMismatchError, match="no record of a precompute run"):
        empty[0]
    precompute(cfg, vae, te, cache, progress=False)
    ident, other = encoder_identity(vae, te), encoder_identity(vae, other_te)

    stale = CachedLatentDataset(cfg, other, max_leading_misses=3)
    assert stale[0] is None and stale[1] is None
    with pytest.raises(CacheMismatchError) as err:
        stale[2]
    message = str(err.value)
    assert str(cache) in message and "first 3 samples" in message and "made with other encoders" in message
    assert f"cache:    vae {ident.vae[:12]} (float32), text_encoder {ident.text_encoder[:12]} (float32)" in message
    assert f"training: vae {ident.vae[:12]} (float32), text_encoder {other.text_encoder[:12]}" in message
    assert "The text encoder differs" in message and "tools/precompute.py" in message

    # Same encoders, another stage shape: the message shows the recorded shape against this one.
    shape = CachedLatentDataset(replace(cfg, frame_interval=1), ident, max_leading_misses=2)
    assert shape[0] is None
    with pytest.raises(CacheMismatchError, match="encoders match") as err:
        shape[1]
    assert "frame_interval=2" in str(err.value) and "frame_interval=1" in str(err.value)

    # A cache with holes is not a mismatch: once an entry was found, misses are only recorded.
    for entry in cache.rglob("*.safetensors"):
        with safe_open(str(entry), "pt") as f:
            first = f.metadata()["path"] == str(clips[0])
        if not first:
            entry.unlink()
    holes = CachedLatentDataset(cfg, ident, max_leading_misses=2)
    items = [holes[i] for i in range(5)]
    assert sum(item is not None for item in items) == 1

    # In a DataLoader worker it stops the loader (the default threshold, read when the dataset is built).
    monkeypatch.setattr(latent_cache, "MAX_LEADING_MISSES", 3)
    loader, _ = build_dataloader(replace(cfg, num_workers=1), batch_size=2, encoder_identity=other)
    with pytest.raises(CacheMismatchError, match="made with other encoders"):
        list(loader)


@pytest.mark.parametrize("hashed", [True, False], ids=["manifest-sha256", "recorded-sha256"])
def test_a_warm_cache_never_opens_a_clip(tmp_path, encoders, monkeypatch, hashed):
    vae, te, _, _ = encoders
    clips = [index_video(tmp_path / f"c{i}.mp4", 6, width=32, height=32, offset=5 * i) for i in range(3)]
    rows = [{**row(c, f"clip {i}", 6, 32, 32), **({"sha256": file_sha256(c)} if hashed else {})}
            for i, c in enumerate(clips)]
    cfg = DataConfig(manifest=manifest(tmp_path, rows), num_frames=2, frame_interval=2, image_size=(16, 16),
                     num_workers=0, cache_dir=str(tmp_path / "cache"))
    identity = encoder_identity(vae, te)
    assert precompute(cfg, vae, te, cfg.cache_dir, progress=False).written == 3
    # A second precompute hashes nothing: the hashes are in the manifest, or were recorded by the first.
    monkeypatch.setattr(latent_cache, "file_sha256", lambda path: pytest.fail(f"{path} was hashed again"))
    assert precompute(cfg, vae, te, cfg.cache_dir, progress=False).existing == 3
    expected = [CachedLatentDataset(cfg, identity)[i]["latent"] for i in range(3)]
    for clip in clips:
        clip.unlink()
    log = tmp_path / "failures.jsonl"
    cached = CachedLatentDataset(cfg, identity, failures_path=log)
    for i in range(3):
        assert torch.equal(cached[i]["latent"], expected[i])
    assert not log.exists()


def test_precompute_refuses_a_clip_that_is_not_what_the_manifest_hashed(tmp_path, encoders):
    vae, te, _, _ = encoders
    clips = [index_video(tmp_path / f"c{i}.mp4", 6, width=32, height=32, offset=5 * i) for i in range(2)]
    rows = [{**row(c, f"clip {i}", 6, 32, 32), "sha256": file_sha256(c)} for i, c in enumerate(clips)]
    index_video(clips[1], 6, width=32, height=32, offset=99)  # rewritten behind the manifest's back
    cfg = DataConfig(manifest=manifest(tmp_path, rows), num_frames=2, frame_interval=2, image_size=(16, 16),
                     num_workers=0, cache_dir=str(tmp_path / "cache"))
    report = precompute(cfg, vae, te, cfg.cache_dir, progress=False)
    assert report.written == 1 and [f["path"] for f in report.failed] == [str(clips[1])]
    assert "changed after the manifest was written" in report.failed[0]["error"]
