"""STDiT: the spatial-temporal diffusion transformer of Open-Sora 1.0.

Each block runs, in order: spatial self-attention over the S = H*W patches of every frame, temporal
self-attention over the T frames of every patch position, cross-attention to T5 text tokens, and an MLP.
The timestep enters through adaLN-single (PixArt-α): one global ``t_block`` produces 6 modulation vectors,
and each block adds its own learned ``scale_shift_table`` to them. The timestep may be one per sample (B,), as
Open-Sora 1.0 trains, or one per latent frame (B, T): frame conditioning (image-to-video, video extension,
``opensora/training/conditioning.py``) gives the known frames t = 0, so each frame is modulated with its own
vectors, broadcast over its S patches (the idea of Open-Sora 1.1/1.2's ``x_mask`` / ``t0``). No parameter is
added, so Open-Sora 1.0 checkpoints load unchanged.

Parameter names follow ``opensora/models/stdit/stdit.py`` at tag v1.0.0 of hpcaitech/Open-Sora, so its
checkpoints load with :func:`convert_opensora_v1_state_dict`. Two deliberate differences, neither of which
changes the function:

* position embeddings are computed for the input's own grid instead of being fixed buffers, so one model
  trains at 256 and 512 without rebuilding (Open-Sora deleted those buffers on load for the same reason);
* activations between blocks are kept as (B, T, S, C) rather than (B, T*S, C), so sequence parallelism
  can shard T from outside the model (see ``opensora/distributed``) and blocks read T and S off the shape.

Shapes: B batch, C channels, T frames, H/W height/width (latent), S = H*W/4 patches per frame,
N = T*S tokens, L text tokens, D hidden size.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


CAPTION_PROJ_INITS = ("pixart", "xavier")  # STDiTConfig.caption_proj_init


@dataclass
class STDiTConfig:
    """Architecture of an STDiT. Defaults are STDiT-XL/2 as Open-Sora 1.0 trained it."""

    depth: int = 28  # number of STDiT blocks
    hidden_size: int = 1152  # D
    num_heads: int = 16  # attention heads (spatial, temporal and cross)
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * D
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) of the 3D patch embedding
    in_channels: int = 4  # latent channels (4 for SD-VAE, 3 for pixel space)
    pred_sigma: bool = True  # learned sigma: output 2 * in_channels (eps/velocity, then variance)
    caption_channels: int = 4096  # text encoder width (T5-v1.1-XXL: 4096)
    model_max_length: int = 120  # text tokens L
    class_dropout_prob: float = 0.1  # caption dropout for classifier-free guidance
    space_scale: float = 1.0  # spatial pos-embed positions are divided by this (0.5 at 256px in Open-Sora 1.0)
    time_scale: float = 1.0  # temporal pos-embed positions are divided by this
    no_temporal_pos_emb: bool = False  # drop the temporal position embedding
    # Also add the temporal embedding to every token after the patch embedding (Latte style), so every
    # layer sees the frame index, not only block 0's temporal attention (Open-Sora 1.0: False). The CPU demo
    # needs it to learn caption-dependent motion within minutes (docs/demo.md).
    temporal_pos_on_tokens: bool = False
    # How the caption projection (y_embedder.y_proj) starts. "pixart": normal(std 0.02), as PixArt-alpha and
    # Open-Sora 1.0, sized for T5-XXL's 4096 large features. "xavier": the initialisation of every other Linear.
    # From a small text encoder (the CPU demo's 32-dim tiny T5) std 0.02 makes the caption tokens ~1 % of the
    # video tokens, and the words whose effect needs a learned interaction (the demo's direction) stay weak
    # for thousands of steps; xavier learns them about twice as fast (docs/demo.md).
    caption_proj_init: str = "pixart"

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)  # YAML lists arrive as lists
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2 or self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 for the 2D sin-cos embedding")
        if self.no_temporal_pos_emb and self.temporal_pos_on_tokens:
            raise ValueError("temporal_pos_on_tokens needs the temporal position embedding (no_temporal_pos_emb is set)")
        if self.caption_proj_init not in CAPTION_PROJ_INITS:
            raise ValueError(f"caption_proj_init must be one of {CAPTION_PROJ_INITS}, got {self.caption_proj_init!r}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels


# Named sizes (DiT style): a plain dict, so jump-to-definition works. XL/2 is Open-Sora 1.0's model.
STDiT_models: dict[str, STDiTConfig] = {
    "STDiT-XL/2": STDiTConfig(depth=28, hidden_size=1152, num_heads=16),
    "STDiT-L/2": STDiTConfig(depth=24, hidden_size=1024, num_heads=16),
    "STDiT-B/2": STDiTConfig(depth=12, hidden_size=768, num_heads=12),
    "STDiT-S/2": STDiTConfig(depth=12, hidden_size=384, num_heads=6),
    # Runs in seconds on a CPU; pairs with the tiny built-in VAE / T5 of tools/init_checkpoint.py.
    "STDiT-debug": STDiTConfig(
        depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16, patch_size=(1, 2, 2)
    ),
}


def stdit_config(name: str, **overrides) -> STDiTConfig:
    """The named size ``name`` with some fields replaced (e.g. ``in_channels=3``)."""
    if name not in STDiT_models:
        raise KeyError(f"unknown STDiT size {name!r}; known: {', '.join(STDiT_models)}")
    return dataclasses.replace(STDiT_models[name], **overrides)


# ----------------------------------------------------------------------------------------------------
# Position and timestep embeddings
# ----------------------------------------------------------------------------------------------------


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(P,) positions -> (P, dim) [sin | cos] embedding (MAE / PixArt convention), float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.to(torch.float64).reshape(-1, 1) * omega[None]  # (P, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def spatial_pos_embed(dim: int, grid_h: int, grid_w: int, scale: float = 1.0) -> torch.Tensor:
    """2D sin-cos embedding of a (grid_h, grid_w) patch grid -> (grid_h * grid_w, dim), row-major.

    As in PixArt-α / Open-Sora 1.0, the first half of the channels encodes the column (w) and the second
    half the row (h), and positions are divided by ``scale``.
    """
    h = torch.arange(grid_h, dtype=torch.float64) / scale
    w = torch.arange(grid_w, dtype=torch.float64) / scale
    hh, ww = torch.meshgrid(h, w, indexing="ij")  # (grid_h, grid_w)
    return torch.cat([sincos_1d(dim // 2, ww), sincos_1d(dim // 2, hh)], dim=1).float()


def temporal_pos_embed(dim: int, length: int, scale: float = 1.0) -> torch.Tensor:
    """1D sin-cos embedding of ``length`` frames -> (length, dim)."""
    return sincos_1d(dim, torch.arange(length, dtype=torch.float64) / scale).float()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) possibly fractional timesteps -> (B, dim) [cos | sin] features (GLIDE / DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------


class SDPA(nn.Module):
    """Core attention op on (B, heads, N, d) tensors. A module (without parameters) so that sequence
    parallelism can swap it for an all-to-all version from outside the model."""

    def forward(self, q, k, v, attn_mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention over the middle axis of (B, N, C)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.core = SDPA()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # (B, N, 3C)
        q, k, v = rearrange(qkv, "B N (K H d) -> K B H N d", K=3, H=self.num_heads)
        x = self.core(q, k, v)  # (B, H, N, d)
        return self.proj(rearrange(x, "B H N d -> B N (H d)"))


class CrossAttention(nn.Module):
    """Attention from video tokens (queries) to text tokens (keys/values), with a text padding mask."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.core = SDPA()

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, N, C) tokens; cond: (B, L, C) text; mask: (B, L) 1 for real tokens, or None."""
        q = rearrange(self.q_linear(x), "B N (H d) -> B H N d", H=self.num_heads)
        k, v = rearrange(self.kv_linear(cond), "B L (K H d) -> K B H L d", K=2, H=self.num_heads)
        attn_mask = None if mask is None else mask[:, None, None, :].bool()  # (B, 1, 1, L)
        x = self.core(q, k, v, attn_mask=attn_mask)  # (B, H, N, d)
        return self.proj(rearrange(x, "B H N d -> B N (H d)"))


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, T', H', W', D)."""
        return rearrange(self.proj(x), "B D T H W -> B T H W D")


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Projects text-encoder tokens to D; replaces whole captions by a learned null caption for CFG.

    The null caption lives in the text encoder's space (before the projection) and, as in PixArt-α and
    Open-Sora 1.0, is a buffer: saved in the state dict, never updated by the optimizer.
    """

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def forward(self, caption: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        """caption: (B, 1, L, Ct) -> (B, 1, L, D)."""
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
            else:
                drop = force_drop_ids.to(caption.device) == 1
            caption = torch.where(drop[:, None, None, None], self.y_embedding.to(caption.dtype), caption)
        return self.y_proj(caption)


class STDiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.attn_temp = Attention(hidden_size, num_heads)

    def forward(self, x, y, t0, mask=None, tpe=None):
        """
        Args:
            x: (B, T, S, D) video tokens.
            y: (B, L, D) projected text tokens.
            t0: (B, 6D) output of the global ``t_block``, or (B, T, 6D) per frame (frame conditioning: given
                frames are modulated with their own timestep, 0).
            mask: (B, L) text padding mask or None.
            tpe: (T, D) temporal position embedding, added before temporal attention (first block only).
        """
        B, T, S, D = x.shape
        if t0.dim() == 2:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                self.scale_shift_table[None] + t0.reshape(B, 6, -1)
            ).chunk(6, dim=1)  # each (B, 1, D)
            modulation = (m[:, None] for m in (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp))
        else:
            modulation = (self.scale_shift_table[None, None] + t0.reshape(B, T, 6, -1)).chunk(6, dim=2)
        # each (B, 1, 1, D) or (B, T, 1, D): broadcast over S (and T)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation

        # 1. Spatial self-attention within each frame, on the modulated tokens.
        x_m = t2i_modulate(self.norm1(x), shift_msa, scale_msa)
        x_s = self.attn(rearrange(x_m, "B T S D -> (B T) S D"))
        x = x + gate_msa * rearrange(x_s, "(B T) S D -> B T S D", B=B)

        # 2. Temporal self-attention across frames at each position. As in Open-Sora 1.0 it reads the
        #    residual stream unmodulated and reuses the spatial gate.
        x_t = rearrange(x, "B T S D -> (B S) T D")
        if tpe is not None:
            x_t = x_t + tpe
        x_t = self.attn_temp(x_t)
        x = x + gate_msa * rearrange(x_t, "(B S) T D -> B T S D", B=B)

        # 3. Cross-attention to the caption (no modulation, as PixArt-α).
        x = x + self.cross_attn(rearrange(x, "B T S D -> B (T S) D"), y, mask).view(B, T, S, D)

        # 4. MLP.
        x = x + gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class T2IFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, T, S, D), t: (B, D) or per frame (B, T, D) -> (B, T, S, patch * C_out)."""
        if t.dim() == 2:
            shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # each (B, 1, D)
            shift, scale = shift[:, None], scale[:, None]  # (B, 1, 1, D)
        else:
            shift, scale = (self.scale_shift_table[None, None] + t[:, :, None]).chunk(2, dim=2)  # each (B, T, 1, D)
        x = t2i_modulate(self.norm_final(x), shift, scale)
        return self.linear(x)


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


class STDiT(nn.Module):
    """Spatial-temporal DiT (Open-Sora 1.0).

    Example::

        model = STDiT(stdit_config("STDiT-debug"))
        out = model(x, t, y, mask)   # x (B, 4, T, H, W), t (B,), y (B, 1, L, 32), mask (B, L) -> (B, 8, T, H, W)
    """

    # What the model supports; parallelism itself is applied from outside (opensora/distributed).
    _supports_gradient_checkpointing = True
    _no_split_modules = ["STDiTBlock"]

    def __init__(self, config: STDiTConfig):
        super().__init__()
        self.config = config
        c = config
        self.in_channels = c.in_channels
        self.out_channels = c.out_channels
        self.patch_size = c.patch_size
        self.hidden_size = c.hidden_size
        self.gradient_checkpointing = False
        self.gradient_checkpointing_blocks = c.depth  # how many blocks (from the first) recompute in backward

        self.x_embedder = PatchEmbed3D(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden_size, 6 * c.hidden_size, bias=True))
        self.y_embedder = CaptionEmbedder(c.caption_channels, c.hidden_size, c.class_dropout_prob, c.model_max_length)
        self.blocks = nn.ModuleList([STDiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth)])
        self.final_layer = T2IFinalLayer(c.hidden_size, math.prod(c.patch_size), self.out_channels)
        self._pos_cache: dict = {}
        self.initialize_weights()

    # -- initialisation (as Open-Sora 1.0 / PixArt-α) ---------------------------------------------------
    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        if self.config.caption_proj_init == "pixart":  # "xavier": _basic_init's, as above
            nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
            nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for block in self.blocks:
            # Cross-attention and temporal attention start as identity maps, so an image-pretrained
            # (PixArt-α) spatial model keeps its function when the temporal layers are added.
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
            nn.init.zeros_(block.attn_temp.proj.weight)
            nn.init.zeros_(block.attn_temp.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- helpers -----------------------------------------------------------------------------------------
    def pos_embeds(self, grid: tuple[int, int, int], device, dtype):
        """(S, D) spatial and (T, D) temporal sin-cos embeddings for a (T, H, W) patch grid; cached."""
        key = (grid, device, dtype)
        if key not in self._pos_cache:
            t, h, w = grid
            c = self.config
            spatial = spatial_pos_embed(c.hidden_size, h, w, c.space_scale).to(device, dtype)
            temporal = temporal_pos_embed(c.hidden_size, t, c.time_scale).to(device, dtype)
            self._pos_cache[key] = (spatial, temporal)
        return self._pos_cache[key]

    def embed_timestep(self, timestep: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """adaLN-single inputs: ``t`` (final layer) and ``t0`` (blocks) of (B,) or per-frame (B, T) timesteps.

        Per-frame timesteps are embedded one frame at a time, each a (B,) batch: the matmuls then have the
        shapes of the (B,) path, so frames that share t get bit-identical modulation to it (a (B*T)-row matmul
        rounds differently, ~1e-6). T calls of two small Linears cost nothing next to the blocks.

        Returns:
            (B, D) and (B, 6D), or (B, T, D) and (B, T, 6D).
        """
        if timestep.dim() == 1:
            t = self.t_embedder(timestep)
            return t, self.t_block(t)
        if timestep.dim() != 2 or timestep.shape[1] != T * self.patch_size[0]:
            raise ValueError(f"timestep must be (B,) or (B, T={T * self.patch_size[0]}) per latent frame, "
                             f"got shape {tuple(timestep.shape)}")
        if self.patch_size[0] != 1:
            raise ValueError(f"per-frame timesteps need a temporal patch size of 1, the model has {self.patch_size}")
        t = torch.stack([self.t_embedder(timestep[:, i]) for i in range(T)], dim=1)  # (B, T, D)
        t0 = torch.stack([self.t_block(t[:, i]) for i in range(T)], dim=1)  # (B, T, 6D)
        return t, t0

    def check_input_size(self, size: tuple[int, int, int]) -> None:
        """Raises ValueError naming ``size`` (latent T, H, W) if the patch size does not divide it."""
        if any(s % p for s, p in zip(size, self.patch_size)):
            raise ValueError(f"latent size (T, H, W)={tuple(size)} is not divisible by patch size {self.patch_size}")

    def null_caption(self, n: int) -> torch.Tensor:
        """(n, 1, L, Ct) null caption in the text encoder's space, for classifier-free guidance."""
        return self.y_embedder.y_embedding[None, None].expand(n, 1, -1, -1)

    def forward(self, x, timestep, y, mask=None, force_drop_ids=None):
        """
        Args:
            x: (B, C, T, H, W) noisy latent.
            timestep: (B,) diffusion timestep (float or int, in [0, 1000)), or (B, T) one per latent frame
                (frame conditioning: given frames have timestep 0). Per-frame timesteps need a temporal patch
                size of 1; when all frames of a sample share t the output equals the (B,) path bit for bit.
            y: (B, 1, L, Ct) or (B, L, Ct) text-encoder tokens.
            mask: (B, L) text padding mask (1 = real token) or None. A mask with fewer rows than ``y``
                is repeated (classifier-free guidance passes [cond; uncond] captions with one mask).
            force_drop_ids: (B,) 1 where the caption is replaced by the null caption.
        Returns:
            (B, C_out, T, H, W) float32 prediction (noise or velocity, then the variance channels).
        """
        B = x.shape[0]
        self.check_input_size(x.shape[2:])
        x = x.to(self.x_embedder.proj.weight.dtype)

        # 1. Patchify and add position embeddings.
        x = self.x_embedder(x)  # (B, T, H', W', D)
        _, T, Hp, Wp, _ = x.shape
        pos_s, pos_t = self.pos_embeds((T, Hp, Wp), x.device, x.dtype)
        x = rearrange(x, "B T H W D -> B T (H W) D") + pos_s  # (B, T, S, D)
        if self.config.temporal_pos_on_tokens:
            x = x + pos_t[:, None]
        tpe = None if self.config.no_temporal_pos_emb else pos_t

        # 2. Timestep (adaLN-single) and caption.
        t, t0 = self.embed_timestep(timestep.to(x.device), T)  # (B, D), (B, 6D) or per frame (B, T, D), (B, T, 6D)
        if y.dim() == 3:
            y = y[:, None]
        y = self.y_embedder(y.to(x.dtype), self.training, force_drop_ids)[:, 0]  # (B, L, D)
        if mask is not None and mask.shape[0] != B:
            mask = mask.repeat(B // mask.shape[0], 1)

        # 3. Blocks. The temporal embedding is added in the first block only (Open-Sora 1.0).
        for i, block in enumerate(self.blocks):
            args = (x, y, t0, mask, tpe if i == 0 else None)
            if self.gradient_checkpointing and i < self.gradient_checkpointing_blocks and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)

        # 4. Final layer and unpatchify.
        x = self.final_layer(x, t)  # (B, T, S, pt*ph*pw*C_out)
        pt, ph, pw = self.patch_size
        x = rearrange(
            x,
            "B T (H W) (p q r C) -> B C (T p) (H q) (W r)",
            H=Hp, W=Wp, p=pt, q=ph, r=pw, C=self.out_channels,
        )
        return x.float()

    # -- activation checkpointing switch -----------------------------------------------------------------
    def enable_gradient_checkpointing(self, enabled: bool = True, num_blocks: int | None = None):
        """Switches activation checkpointing on or off.

        Args:
            enabled: recompute checkpointed blocks in the backward instead of keeping their activations.
            num_blocks: selective checkpointing: only the first ``num_blocks`` blocks recompute (None = all).
                Each checkpointed block trades ~1/3 more of its FLOPs for most of its activation memory, so
                checkpointing just enough blocks to fit a batch is faster than checkpointing all of them.
        """
        depth = len(self.blocks)
        if num_blocks is not None and not 0 <= num_blocks <= depth:
            raise ValueError(f"num_blocks must be in [0, {depth}] (the model's depth), got {num_blocks}")
        self.gradient_checkpointing = enabled
        self.gradient_checkpointing_blocks = depth if num_blocks is None else num_blocks
        return self

    # -- save / load -------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Writes ``config.json`` and ``model.safetensors`` (fp32 unless the model is in another dtype)."""
        from safetensors.torch import save_file

        from opensora.utils import atomic_write_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_write_path(directory / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_write_path(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "model": "STDiT"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, **config_overrides) -> "STDiT":
        """Loads a model written by :meth:`save_pretrained`; a missing file or a state dict that does not fit
        the config raises an error that names the file."""
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"STDiT checkpoint file missing: {p}")
        try:
            fields = json.loads(cfg_path.read_text())
            config = STDiTConfig(**{**fields, **config_overrides})
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{cfg_path}: not a valid STDiT config: {err}") from err
        model = cls(config)
        load_state_dict_checked(model, load_file(str(w_path)), source=str(w_path))
        return model


def load_state_dict_checked(model: nn.Module, state: dict, source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names ``source`` and lists what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        lines = [f"{source} does not fit the model:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------------
# Open-Sora 1.0 checkpoints
# ----------------------------------------------------------------------------------------------------

# Buffers Open-Sora 1.0 saved for one fixed input size; we compute them per input instead.
OPENSORA_V1_DERIVED_KEYS = ("pos_embed", "pos_embed_temporal")


def convert_opensora_v1_state_dict(state: dict) -> dict:
    """Maps an Open-Sora 1.0 STDiT state dict (tag v1.0.0) to ours.

    Parameter names are the same; this unwraps the containers its training saved ("ema", "model",
    "state_dict", "module."/"_orig_mod." prefixes) and drops the fixed-size position-embedding buffers.
    """
    for wrapper in ("ema", "model", "state_dict", "module"):
        if wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key in OPENSORA_V1_DERIVED_KEYS:
            continue
        out[key] = value
    return out


def read_weights_file(path: str | Path, what: str = "checkpoint") -> dict:
    """The state dict in a ``.safetensors`` file, or in a ``.pth`` read with ``torch.load(weights_only=True)``
    (on the CPU); a missing file raises FileNotFoundError naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_opensora_v1_checkpoint(model: STDiT, path: str | Path) -> None:
    """Loads an Open-Sora 1.0 ``.pth`` / ``.safetensors`` STDiT checkpoint into ``model`` (strict)."""
    state = read_weights_file(path)
    load_state_dict_checked(model, convert_opensora_v1_state_dict(state), source=str(path))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (buffers such as the null caption are not counted)."""
    return sum(p.numel() for p in model.parameters())
