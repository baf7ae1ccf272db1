"""Text conditioning: a frozen T5 encoder (transformers) turning prompts into token embeddings.

Open-Sora 1.0 conditions STDiT on T5-v1.1-XXL encoder states (d_model 4096) of prompts padded or cut
to 120 tokens, shaped (B, 1, L, D) with a (B, L) mask; the singleton axis is kept here so that
checkpoints and the caption-embedding layer see the same shapes as upstream.

``make_tiny_t5`` writes a 2-layer random T5 with an offline word-piece tokenizer, so that tests and the
debug bundle run the real ``from_pretrained`` code paths without any download.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram
from torch import nn
from transformers import AutoTokenizer, T5Config, T5EncoderModel, T5TokenizerFast, UMT5Config, UMT5EncoderModel

# transformers 5 renamed from_pretrained's `torch_dtype` to `dtype` (4.56+ accept both).
_DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"

# text_encoder.type -> (encoder class, its config class). UMT5 is Wan 2.1/2.2's encoder (google/umt5-xxl): T5's
# layout with relative position biases in every layer; the tokenizer is loaded the same way for both.
ENCODER_CLASSES: dict[str, tuple[type, type]] = {
    "t5": (T5EncoderModel, T5Config),
    "umt5": (UMT5EncoderModel, UMT5Config),
}


@dataclass
class TextEncoderConfig:
    type: str = "t5"  # "t5" (Open-Sora 1.0: DeepFloyd/t5-v1_1-xxl; LTX-Video) or "umt5" (Wan 2.1/2.2)
    path: str | None = None  # local dir, or a Hugging Face repo id already in the local cache (never downloaded)
    subfolder: str | None = None  # model sub-directory, e.g. "text_encoder" in a diffusers pipeline repo
    tokenizer_subfolder: str | None = None  # tokenizer sub-directory (default: same as subfolder)
    max_length: int = 120  # prompts are padded / truncated to this many tokens

    def __post_init__(self):
        if self.type not in ENCODER_CLASSES:
            raise ValueError(f"text_encoder.type must be one of {', '.join(ENCODER_CLASSES)}, got {self.type!r}")
        if not self.path:
            raise ValueError("text_encoder.path is required (a local dir or a cached repo id)")
        if self.max_length < 1:
            raise ValueError(f"text_encoder.max_length must be >= 1, got {self.max_length}")


class T5TextEncoder(nn.Module):
    """A frozen T5 encoder and its tokenizer.

    Args:
        model: the encoder half of a T5.
        tokenizer: the matching tokenizer (any transformers tokenizer with a pad token).
        max_length: prompts are padded / truncated to this many tokens.
    """

    def __init__(self, model: T5EncoderModel, tokenizer, max_length: int = 120):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.output_dim: int = model.config.d_model

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        max_length: int = 120,
        torch_dtype: torch.dtype | None = None,
        encoder_type: str = "t5",
    ) -> "T5TextEncoder":
        """Loads encoder and tokenizer with transformers' own loaders, from local files only.

        Args:
            path: a directory written by ``save_pretrained``/:func:`make_tiny_t5`, or a repo id such as
                ``DeepFloyd/t5-v1_1-xxl`` already in the local Hugging Face cache.
            subfolder: sub-directory of the model weights, if any.
            tokenizer_subfolder: sub-directory of the tokenizer files (default: ``subfolder``).
            max_length: prompts are padded / truncated to this many tokens.
            torch_dtype: load the weights in this dtype (bf16 or fp32: T5 overflows in fp16).
            encoder_type: a key of :data:`ENCODER_CLASSES` ("t5" or "umt5").
        """
        encoder_class = ENCODER_CLASSES[encoder_type][0]
        tokenizer_subfolder = subfolder if tokenizer_subfolder is None else tokenizer_subfolder
        try:
            model = encoder_class.from_pretrained(
                str(path), subfolder=subfolder or "", local_files_only=True, **{_DTYPE_KWARG: torch_dtype}
            )
            tokenizer = AutoTokenizer.from_pretrained(
                str(path), subfolder=tokenizer_subfolder or "", local_files_only=True
            )
        except OSError as err:  # transformers raises OSError for a missing dir/repo/file
            raise FileNotFoundError(
                f"cannot load the T5 text encoder from {path} (subfolder {subfolder!r}, tokenizer subfolder "
                f"{tokenizer_subfolder!r}): give a local directory with config.json, weights and tokenizer "
                f"files, or a repo id already in the local Hugging Face cache (nothing is downloaded). "
                f"Loader said: {err}"
            ) from err
        return cls(model, tokenizer, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Embeds prompts.

        Args:
            prompts: B strings (at least one).
            device: where to return the tensors (default: the encoder's device).
        Returns:
            ``dict(y=(B, 1, L, D) float, mask=(B, L) long)`` with L = ``max_length`` and D = ``output_dim``;
            mask is 1 on real tokens (including the closing ``</s>``) and 0 on padding.
        """
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError(f"encode() needs a non-empty list of prompts, got {prompts!r}")
        tokens = self.tokenizer(
            list(prompts),
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        on_cuda = self.model.device.type == "cuda"  # pinned host memory: the copy does not block the host
        input_ids = _to_device(tokens["input_ids"], self.model.device, on_cuda)  # (B, L)
        mask = _to_device(tokens["attention_mask"], self.model.device, on_cuda)  # (B, L)
        y = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        device = self.model.device if device is None else device
        return dict(y=y[:, None].to(device), mask=mask.long().to(device))  # (B, 1, L, D), (B, L)


def _to_device(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    return t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)


def build_text_encoder(
    cfg: TextEncoderConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> T5TextEncoder:
    """Builds the frozen text encoder named by ``cfg``.

    Args:
        cfg: the text-encoder section of a config.
        device: move the weights there (default: CPU).
        dtype: weight dtype (default: as stored).
    """
    encoder = T5TextEncoder.from_pretrained(
        cfg.path,  # type: ignore[arg-type]  # __post_init__ guarantees a path
        subfolder=cfg.subfolder,
        tokenizer_subfolder=cfg.tokenizer_subfolder,
        max_length=cfg.max_length,
        torch_dtype=dtype,
        encoder_type=cfg.type,
    )
    if device is not None:
        encoder = encoder.to(device)
    return encoder


# Words a toy text-to-video prompt is made of: whole-word pieces keep such prompts short; anything
# else falls back to the suffix and single-character pieces, so no English text maps to <unk>.
_TINY_WORDS = """
a an the this that these those it its is are was be being has have with without and or but not no of in
on at to from into onto over under above below between behind beside near far through across around
along up down left right forward backward toward away top bottom front back middle center side inside
outside one two three four five many few some all each every other another same different more less very
red orange yellow green blue purple pink brown black white gray grey gold silver dark light bright pale
colorful colour color transparent shiny
circle square triangle rectangle ball cube sphere box star line dot ring disk block shape pattern stripe
stripes grid spiral wave waves point
move moves moving moved go goes going run runs running walk walks walking fly flies flying swim swims
swimming jump jumps jumping roll rolls rolling spin spins spinning rotate rotates rotating turn turns
turning slide slides sliding fall falls falling rise rises rising bounce bounces bouncing float floats
floating drift drifts drifting grow grows growing shrink shrinks shrinking zoom zooms zooming pan pans
panning shake shakes shaking sway sways swaying flow flows flowing follow follows following stop stops
sit sits sitting stand stands standing look looks looking play plays playing dance dances dancing open
close eat eats eating drive drives driving
slow slowly fast quickly quick still steady smooth smoothly gently suddenly camera shot view scene close-up
wide aerial time lapse timelapse motion
background foreground sky cloud clouds sun moon night day morning evening sunset sunrise city street road
building buildings house room window door wall floor table tree trees forest grass field flower flowers
garden park river lake sea ocean beach water sand mountain mountains hill snow rain fire smoke desert
bridge car cars train boat plane bird birds dog dogs cat cats horse fish person people man woman men women
child children boy girl hand hands face eye eyes hair head
big small large tiny little tall short long round flat soft hard happy old new young beautiful
""".split()
_TINY_SUFFIXES = "s es ed ing ly er est y ion tion ness ful less able ment al ous ive".split()


def _tiny_unigram_tokenizer() -> Tokenizer:
    """A T5-layout Unigram tokenizer built from fixed lists: no training, so it is identical on every run."""
    # T5 layout: <pad>=0, </s>=1, <unk>=2. Scores are log-probabilities; Viterbi picks the highest sum,
    # so a whole word (-2) beats suffix pieces (-3 each) which beat single characters (-6 each).
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    seen = {piece for piece, _ in vocab}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))

    for word in _TINY_WORDS:
        add("▁" + word, -2.0)
        add("▁" + word.capitalize(), -2.5)  # sentence-initial forms
    for suffix in _TINY_SUFFIXES:
        add(suffix, -3.0)
    for char in string.ascii_letters + string.digits + string.punctuation:
        add(char, -6.0)
        add("▁" + char, -7.0)
    tokenizer = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    # Same pre-tokenizer, decoder and post-processor as transformers' T5 tokenizer, so that loading the
    # saved files through the T5 tokenizer class (which rebuilds these parts) gives the same ids.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return tokenizer


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """The offline T5-layout tokenizer of :func:`make_tiny_t5` (also what benchmarks pad captions with)."""
    return T5TokenizerFast(
        tokenizer_object=_tiny_unigram_tokenizer(),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,  # no span-corruption sentinels: this tokenizer is never used for pre-training
    )


def make_tiny_t5(out_dir: str | Path, seed: int = 0, encoder_type: str = "t5") -> Path:
    """Saves a tiny random T5 encoder (d_model 32, 2 layers, 2 heads) and an offline tokenizer to ``out_dir``.

    The tokenizer knows a few hundred prompt words whole and spells anything else in suffix and
    character pieces. The weights are random: embeddings differ per prompt but mean nothing.

    Args:
        out_dir: directory to write config.json, model.safetensors and the tokenizer files into.
        seed: weight initialisation seed (same seed -> same weights).
        encoder_type: "t5" or "umt5" (Wan's encoder class, same sizes and tokenizer).
    Returns:
        ``out_dir`` as a Path, loadable with :meth:`T5TextEncoder.from_pretrained` / ``AutoTokenizer``.
    """
    out_dir = Path(out_dir)
    tokenizer = tiny_t5_tokenizer()
    encoder_class, config_class = ENCODER_CLASSES[encoder_type]
    config = config_class(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as used by Open-Sora
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG state untouched
        torch.manual_seed(seed)
        model = encoder_class(config)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
