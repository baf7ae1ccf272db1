"""The caption quality check: a caption caught in a loop (a repeated n-gram) is generated again, then failed."""

from data_helpers import make_video
import pytest

from data_pipeline import caption as cap
from data_pipeline.captioners import FAMILIES
from data_pipeline.config import CaptionConfig


@pytest.fixture(autouse=True)
def stand_in_model_is_an_image_family(monkeypatch):
    """The stand-in model "m" (generate is replaced) is a LLaVA folder to caption_batch."""
    monkeypatch.setattr(cap, "family_of", lambda model: FAMILIES["llava"])


def test_repeated_ngram_is_found():
    assert cap.repeated_ngram("a man walks a dog in a park with trees and a lake", 3, 3) is None
    loop = "A man is walking a man is walking a man is walking a man is walking"
    assert cap.repeated_ngram(loop, 3, 3) == "a man is"
    assert cap.repeated_ngram("the the the the", 1, 3) == "the"


def test_repetitive_and_empty_captions_are_retried_once_then_fail(tmp_path, monkeypatch):
    make_video(tmp_path / "a.mp4", [20])
    calls = []
    answers = {16: ["A red car drives down a road, then a red car drives down a road, then a red car drives "
                    "down a road.", "", "A dog runs across a sunny field."],
               32: ["A red car drives down a wet road at night under street lights.", "The video shows"]}

    def fake_generate(images, cfg, max_new_tokens):
        calls.append((len(images), max_new_tokens))
        return [(text, False, len(text.split())) for text in answers[max_new_tokens][: len(images)]]

    monkeypatch.setattr(cap, "generate", fake_generate)
    monkeypatch.setattr(cap, "read_frames", lambda path, positions, layout: [None])
    rows = [{"id": str(i), "path": str(tmp_path / "a.mp4")} for i in range(3)]
    out = cap.caption_batch(rows, CaptionConfig(model="m", retries=1, max_new_tokens=16, batch_size=3))
    assert calls == [(3, 16), (2, 32)]  # the looping and the empty caption are generated again, the good one not
    assert out[0][0]["text"].startswith("A red car drives down a wet road") and out[0][0]["caption_flag"] is None
    assert isinstance(out[1], RuntimeError) and "empty caption" in str(out[1])
    assert out[2][0]["text"] == "A dog runs across a sunny field."


def test_a_caption_still_looping_after_the_retries_fails_the_row(tmp_path, monkeypatch):
    make_video(tmp_path / "a.mp4", [20])
    loop = "Waves roll in, waves roll in, waves roll in, waves roll in."
    monkeypatch.setattr(cap, "generate", lambda images, cfg, budget: [(loop, False, len(loop.split()))] * len(images))
    monkeypatch.setattr(cap, "read_frames", lambda path, positions, layout: [None])
    (out,) = cap.caption_batch([{"id": "0", "path": str(tmp_path / "a.mp4")}], CaptionConfig(model="m", retries=1))
    assert isinstance(out, RuntimeError) and "repetitive caption" in str(out) and "waves roll in" in str(out)
