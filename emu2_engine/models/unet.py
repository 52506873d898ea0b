"""The image decoder's UNet: a conditional denoiser in diffusers' `UNet2DConditionModel` layout.

Written here (not imported from diffusers) so that its attention runs through the engine's
ops, while its parameter names and shapes are exactly diffusers' for the same configuration:
the released Emu2-Gen UNet (``unet.*`` of the Emu2-Gen checkpoint, or a diffusers ``unet/``
folder) loads with `load_unet_weights` and no renaming. The test builds diffusers' model with a
small configuration of the same family and checks both the keys and the outputs.

Structure (UNetConfig, with diffusers' block names):

    conv_in -> down_blocks[i] (resnets, + transformers on cross-attention levels, + a stride-2
    conv except on the last level) -> mid_block (resnet, transformer, resnet) ->
    up_blocks[i] (one more resnet per block, each fed the matching skip, + transformers,
    + nearest x2 upsampling and a conv except on the last) -> GroupNorm, SiLU, conv_out

Conditioning: the timestep's sinusoidal embedding through `time_embedding`; with `text_time`
(SDXL, Emu2-Gen) `add_embedding` adds the pooled condition -- the mean of the visual embeddings,
as the Emu2-Gen pipeline computes it -- and the six size/crop ids; cross-attention reads the
(B, N, C) visual embeddings themselves.

Attention: self-attention runs through `modality_attention(causal=False)` with no ids (one
document per image -- or per clip in the video UNet, where the tokens of all frames of a clip
form one sequence: spatial-temporal attention), which runs SDPA's fused kernels unless
EMU2_KERNELS selects the Triton kernel (`ops.backend`, dense_attention). `modality_attention` needs queries and keys of one
length, so cross-attention (image tokens against the N conditioning embeddings) uses
`F.scaled_dot_product_attention`.

Frames: every block takes `frames`, the number of consecutive batch entries that are frames of
one clip (1 for images). Convolutions, norms and cross-attention treat frames independently; the
self-attention groups a clip's frames into one sequence, and resnets built with a temporal
kernel (the video UNet, `unet3d.py`) follow each 3x3 conv with a temporal conv through
`spatiotemporal_conv`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu2_engine.models.config import UNetConfig
from emu2_engine.ops import group_norm, modality_attention
from emu2_engine.ops.spatiotemporal_conv import spatiotemporal_conv

TIME_IDS = 6
"""SDXL's size/crop conditioning: original (h, w), crop (top, left), target (h, w), in pixels."""


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) values -> (N, dim) float32 sinusoids, cosines first: diffusers' `Timesteps` with
    flip_sin_to_cos=True and freq_shift=0, as SDXL's UNet uses it for timesteps and size ids."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (diffusers' `TimestepEmbedding`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


# ----------------------------------------------------------------------------------------------
# Resnets
# ----------------------------------------------------------------------------------------------
def apply_norm(layer: nn.GroupNorm, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """`layer` applied through the `group_norm` op (then SiLU when asked), which keeps
    channels-last activations channels-last."""
    return group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps, silu)


def frames_to_clips(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B*F, C, H, W) frame batch -> (B, C, F, H, W) view of the clips."""
    return x.unflatten(0, (-1, frames)).transpose(1, 2)


def clips_to_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W), frames of a clip consecutive."""
    return x.transpose(1, 2).flatten(0, 1)


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, conv, + timestep projection, GroupNorm, SiLU, conv, + shortcut
    (diffusers' `ResnetBlock2D`, default time-embedding norm, output scale 1).

    With `temporal_kernel` > 0 each conv is followed by a temporal conv over the frames of a
    clip, in the residual form ``s + temporal(s)`` (`spatiotemporal_conv`); its weights start at
    zero, so the block starts as the 2D block applied to every frame.
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, eps: float,
                 temporal_kernel: int = 0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None
        self.temporal_conv1 = self.temporal_conv2 = None
        if temporal_kernel:
            self.temporal_conv1 = nn.Conv1d(c_out, c_out, temporal_kernel, padding=temporal_kernel // 2)
            self.temporal_conv2 = nn.Conv1d(c_out, c_out, temporal_kernel, padding=temporal_kernel // 2)
            for conv in (self.temporal_conv1, self.temporal_conv2):
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    @staticmethod
    def _conv(x: torch.Tensor, spatial: nn.Conv2d, temporal: nn.Conv1d | None, frames: int) -> torch.Tensor:
        if temporal is None:
            return spatial(x)
        y = spatiotemporal_conv(frames_to_clips(x, frames), spatial.weight, spatial.bias,
                                temporal.weight, temporal.bias)
        return clips_to_frames(y)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, frames: int) -> torch.Tensor:
        """x (B*F, C, H, W); emb (B*F, emb_dim), one row per frame."""
        h = self._conv(apply_norm(self.norm1, x, silu=True), self.conv1, self.temporal_conv1, frames)
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self._conv(apply_norm(self.norm2, h, silu=True), self.conv2, self.temporal_conv2, frames)
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


# ----------------------------------------------------------------------------------------------
# Transformers
# ----------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v and a biased output (diffusers' `Attention`;
    `to_out.0` keeps its key name). Self-attention when `context` is None."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleDict({"0": nn.Linear(dim, dim)})

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, S, C = x.shape
        src = x if context is None else context
        q = self.to_q(x).view(B, S, self.heads, -1).transpose(1, 2)
        k = self.to_k(src).view(B, src.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(src).view(B, src.shape[1], self.heads, -1).transpose(1, 2)
        if context is None:  # one document per row: the image, or the clip's frames x positions
            out = modality_attention(q, k, v, None, None, causal=False)
        else:  # N conditioning keys against S queries: lengths differ, see the module docstring
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out["0"](out.transpose(1, 2).reshape(B, S, C))


class GEGLU(nn.Module):
    """Linear to twice the hidden width; the first half times GELU of the second (exact GELU)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4 x width, then back (`net.0` and `net.2`: diffusers keeps a dropout at `net.1`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleDict({"0": GEGLU(dim, 4 * dim), "2": nn.Linear(4 * dim, dim)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net["2"](self.net["0"](x))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward (`BasicTransformerBlock`)."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), cond)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """GroupNorm, linear in, transformer blocks over the tokens, linear out, + residual
    (`Transformer2DModel` with use_linear_projection=True)."""

    def __init__(self, dim: int, heads: int, layers: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleDict(
            {str(i): TransformerBlock(dim, heads, context_dim) for i in range(layers)})
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, frames: int) -> torch.Tensor:
        """x (B*F, C, H, W), cond (B, N, context_dim): the tokens of a clip's F frames form one
        sequence of F*H*W tokens (for images F = 1)."""
        BF, C, H, W = x.shape
        tokens = apply_norm(self.norm, x).permute(0, 2, 3, 1).reshape(BF // frames, frames * H * W, C)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks.values():
            tokens = block(tokens, cond)
        tokens = self.proj_out(tokens).reshape(BF, H, W, C).permute(0, 3, 1, 2)
        return tokens + x


# ----------------------------------------------------------------------------------------------
# Resolution levels
# ----------------------------------------------------------------------------------------------
class Downsample(nn.Module):
    """3x3 conv with stride 2 (`Downsample2D`, padding 1)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the next skip's size, then a 3x3 conv (`Upsample2D`; at
    even sizes this is x2, and at odd ones the size diffusers forwards)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownBlock(nn.Module):
    """Resnets (each followed by a transformer on cross-attention levels), then a downsampler.
    Returns the output and every intermediate state the up path takes as a skip."""

    def __init__(self, c_in: int, c_out: int, cfg: UNetConfig, level: int, temporal_kernel: int):
        super().__init__()
        n, last = cfg.layers_per_block, level == len(cfg.block_out_channels) - 1
        self.resnets = nn.ModuleDict({
            str(j): ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.time_embed_dim, cfg.norm_groups,
                                cfg.norm_eps, temporal_kernel) for j in range(n)})
        self.attentions = None
        if cfg.cross_attention[level]:
            self.attentions = nn.ModuleDict({
                str(j): Transformer2D(c_out, cfg.attention_heads[level], cfg.transformer_layers[level],
                                      cfg.cross_attention_dim, cfg.norm_groups) for j in range(n)})
        self.downsamplers = None if last else nn.ModuleDict({"0": Downsample(c_out)})

    def forward(self, x, emb, cond, frames) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for j, resnet in self.resnets.items():
            x = resnet(x, emb, frames)
            if self.attentions is not None:
                x = self.attentions[j](x, cond, frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers["0"](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """Resnet, transformer, resnet (`UNetMidBlock2DCrossAttn` with one layer)."""

    def __init__(self, c: int, cfg: UNetConfig, temporal_kernel: int):
        super().__init__()
        self.resnets = nn.ModuleDict({
            str(j): ResnetBlock(c, c, cfg.time_embed_dim, cfg.norm_groups, cfg.norm_eps, temporal_kernel)
            for j in range(2)})
        self.attentions = nn.ModuleDict({
            "0": Transformer2D(c, cfg.attention_heads[-1], cfg.transformer_layers[-1],
                               cfg.cross_attention_dim, cfg.norm_groups)})

    def forward(self, x, emb, cond, frames) -> torch.Tensor:
        x = self.resnets["0"](x, emb, frames)
        x = self.attentions["0"](x, cond, frames)
        return self.resnets["1"](x, emb, frames)


class UpBlock(nn.Module):
    """layers_per_block + 1 resnets, each on the concatenation of the running state and one skip
    (taken last first), each followed by a transformer on cross-attention levels; then an
    upsampler except on the last level. Channel bookkeeping as diffusers' `get_up_block`."""

    def __init__(self, c_prev: int, c_out: int, c_skip_last: int, cfg: UNetConfig, level: int,
                 temporal_kernel: int):
        super().__init__()
        n = cfg.layers_per_block + 1
        resnets = {}
        for j in range(n):
            c_skip = c_skip_last if j == n - 1 else c_out
            c_in = c_prev if j == 0 else c_out
            resnets[str(j)] = ResnetBlock(c_in + c_skip, c_out, cfg.time_embed_dim, cfg.norm_groups,
                                          cfg.norm_eps, temporal_kernel)
        self.resnets = nn.ModuleDict(resnets)
        self.attentions = None
        if cfg.cross_attention[level]:
            self.attentions = nn.ModuleDict({
                str(j): Transformer2D(c_out, cfg.attention_heads[level], cfg.transformer_layers[level],
                                      cfg.cross_attention_dim, cfg.norm_groups) for j in range(n)})
        self.upsamplers = None if level == 0 else nn.ModuleDict({"0": Upsample(c_out)})

    def forward(self, x, emb, cond, frames, skips: list[torch.Tensor]) -> torch.Tensor:
        """Consumes len(resnets) entries from the end of `skips`."""
        for j, resnet in self.resnets.items():
            x = resnet(torch.cat([x, skips.pop()], dim=1), emb, frames)
            if self.attentions is not None:
                x = self.attentions[j](x, cond, frames)
        if self.upsamplers is not None:
            x = self.upsamplers["0"](x, tuple(skips[-1].shape[-2:]))
        return x


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class UNet(nn.Module):
    """The image decoder's denoiser: noisy latents (B, C, H, W), timesteps (B,), visual
    embeddings (B, cond_tokens, cross_attention_dim) and, with `text_time`, size/crop ids (B, 6)
    -> the predicted noise (B, C, H, W).

    `down_blocks`/`up_blocks` are dicts keyed "0", "1", ... (diffusers' ModuleList indices), so
    the state dict has diffusers' names.
    """

    def __init__(self, cfg: UNetConfig, temporal_kernel: int = 0):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        widths = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], cfg.time_embed_dim)
        self.add_embedding = None
        if cfg.text_time:
            self.add_embedding = TimestepEmbedding(cfg.add_embed_in_dim, cfg.time_embed_dim)
        down, c = {}, widths[0]
        for i, width in enumerate(widths):
            down[str(i)] = DownBlock(c, width, cfg, i, temporal_kernel)
            c = width
        self.down_blocks = nn.ModuleDict(down)
        self.mid_block = MidBlock(widths[-1], cfg, temporal_kernel)
        up, c_prev = {}, widths[-1]
        for i in range(len(widths)):
            level = len(widths) - 1 - i  # up block i works at the resolution of down level `level`
            c_skip_last = widths[max(level - 1, 0)]
            up[str(i)] = UpBlock(c_prev, widths[level], c_skip_last, cfg, level, temporal_kernel)
            c_prev = widths[level]
        self.up_blocks = nn.ModuleDict(up)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, widths[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)
        self.channels_last: bool | None = None
        """Run the body channels-last: None (the default) means on CUDA. cuDNN's convolutions,
        `spatiotemporal_conv` and the `group_norm` kernel all work in that layout, so the
        activations are never copied between layouts; only the input and the output (a few
        channels) are. Parameters and results do not depend on it."""

    # -- checks ---------------------------------------------------------------------------------
    def check_inputs(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                     time_ids: torch.Tensor | None) -> None:
        """ValueError naming the first input whose shape does not fit this model. `latents` is
        (B, C, H, W) here and (B, C, F, H, W) for the video UNet; cond is (B, N, D) with N as
        `check_cond_count` requires."""
        cfg = self.cfg
        B, C = latents.shape[:2]
        if C != cfg.in_channels:
            raise ValueError(f"latents must have {cfg.in_channels} channels, got shape "
                             f"{tuple(latents.shape)}")
        if min(latents.shape[-2:]) < 1:
            raise ValueError(f"latents must have a non-empty spatial size, got shape {tuple(latents.shape)}")
        if cond.dim() != 3 or cond.shape[0] != B:
            raise ValueError(f"visual embeddings must be (B={B}, N, {cfg.cross_attention_dim}), "
                             f"got shape {tuple(cond.shape)}")
        if cond.shape[2] != cfg.cross_attention_dim:
            raise ValueError(f"visual embeddings must have width {cfg.cross_attention_dim} "
                             f"(cross_attention_dim), got {cond.shape[2]}")
        self.check_cond_count(cond)
        if timesteps.dim() > 1 or (timesteps.dim() == 1 and timesteps.shape[0] not in (1, B)):
            raise ValueError(f"timesteps must be a scalar, (1,) or (B={B},), got shape "
                             f"{tuple(timesteps.shape)}")
        if cfg.text_time:
            if time_ids is None or tuple(time_ids.shape) != (B, TIME_IDS):
                got = None if time_ids is None else tuple(time_ids.shape)
                raise ValueError(f"this UNet needs time_ids of shape ({B}, {TIME_IDS}) (original "
                                 f"h, w, crop top, left, target h, w), got {got}")
        elif time_ids is not None:
            raise ValueError("time_ids given, but this UNet has no text_time conditioning")

    def check_cond_count(self, cond: torch.Tensor) -> None:
        """The image UNet reads exactly cond_tokens embeddings per sample: one image's. More
        (Emu2-Chat's 256 per image, or two images' joined) would fail nowhere below: the
        cross-attention takes any number of keys and the pooled `text_time` condition is their
        mean, so they would run silently as a condition the decoder was never trained on. Only
        the video UNet joins several images' embeddings (`VideoUNet.check_cond_count`)."""
        n = self.cfg.cond_tokens
        if cond.shape[1] != n:
            raise ValueError(f"the image UNet is conditioned on exactly {n} visual embeddings per "
                             f"sample (one image's: (B, {n}, {self.cfg.cross_attention_dim})), got "
                             f"{cond.shape[1]} (embeddings of shape {tuple(cond.shape)})")

    # -- forward --------------------------------------------------------------------------------
    def embed_time(self, timesteps: torch.Tensor, cond: torch.Tensor, time_ids: torch.Tensor | None,
                   batch: int, dtype: torch.dtype) -> torch.Tensor:
        """(batch, time_embed_dim): timestep embedding, plus the pooled condition and the size ids."""
        t = timesteps.to(cond.device).reshape(-1).expand(batch)
        emb = self.time_embedding(timestep_embedding(t, self.cfg.block_out_channels[0]).to(dtype))
        if self.add_embedding is not None:
            ids = timestep_embedding(time_ids.reshape(-1), self.cfg.addition_time_embed_dim)
            ids = ids.reshape(batch, -1)
            pooled = cond.mean(dim=1)  # the Emu2-Gen pipeline's pooled "text" embedding
            emb = emb + self.add_embedding(torch.cat([pooled, ids.to(pooled.dtype)], dim=-1).to(emb.dtype))
        return emb

    def denoise(self, x: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor, frames: int) -> torch.Tensor:
        """The network body on (B*F, C, H, W) frames; emb (B*F, D) per frame, cond (B, N, D) per
        clip. Returns a contiguous (B*F, C, H, W) tensor whatever layout the body ran in."""
        channels_last = x.is_cuda if self.channels_last is None else self.channels_last
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks.values():
            x, block_skips = block(x, emb, cond, frames)
            skips += block_skips
        x = self.mid_block(x, emb, cond, frames)
        for block in self.up_blocks.values():
            x = block(x, emb, cond, frames, skips)
        return self.conv_out(apply_norm(self.conv_norm_out, x, silu=True)).contiguous()

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | float, cond: torch.Tensor,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """latents (B, C, H, W), timesteps scalar or (B,), cond (B, N, D), time_ids (B, 6) ->
        predicted noise (B, C, H, W)."""
        if latents.dim() != 4:
            raise ValueError(f"latents must be (B, C, H, W), got shape {tuple(latents.shape)}")
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        self.check_inputs(latents, timesteps, cond, time_ids)
        emb = self.embed_time(timesteps, cond, time_ids, latents.shape[0], latents.dtype)
        return self.denoise(latents, emb, cond.to(latents.dtype), frames=1)


# ----------------------------------------------------------------------------------------------
# Loading and the diffusers bridge
# ----------------------------------------------------------------------------------------------
def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str,
                     ignore: tuple[str, ...] = ()) -> None:
    """Raise one ValueError listing every missing, unexpected and wrongly shaped key of
    `state_dict` against `model` (keys of the model containing any of `ignore` are not required)."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not any(s in k for s in ignore)}
    missing = [f"{k} {want[k]}" for k in want if k not in state_dict]
    unexpected = [k for k in state_dict if k not in want]
    wrong = [f"{k}: given {tuple(v.shape)}, model {want[k]}" for k, v in state_dict.items()
             if k in want and tuple(v.shape) != want[k]]
    if missing or unexpected or wrong:
        parts = [_listing(title, items) for title, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
        raise ValueError(f"{what} does not match the UNet ({len(want)} tensors); nothing was loaded:"
                         + "".join(parts))


def _listing(title: str, items: list[str], shown: int = 8) -> str:
    more = " ..." if len(items) > shown else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:shown]) + more


def load_unet_state_dict(model: UNet, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Load a diffusers-layout state dict (keys optionally under `prefix`, e.g. "unet." in an
    Emu2-Gen checkpoint; other keys ignored). Everything is checked before anything is copied.
    A model on the meta device takes the given tensors as its parameters."""
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    check_state_dict(model, state_dict, "the state dict")
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state_dict, strict=True, assign=on_meta)


_EMU2_GEN_OTHER_PARTS = ("multimodal_encoder.", "vae.", "safety_checker.")


def _unet_name(name: str) -> str | None:
    """A checkpoint key's UNet name: Emu2-Gen's ``unet.*`` keys lose the prefix, its other parts
    are skipped, a diffusers UNet's keys stay as they are."""
    if name.startswith("unet."):
        return name[len("unet."):]
    return None if name.startswith(_EMU2_GEN_OTHER_PARTS) else name


def load_unet_weights(model: UNet, source: str) -> None:
    """Load a checkpoint file or sharded directory (safetensors or torch) into `model`: the
    released Emu2-Gen weights (their ``unet.*`` keys; the encoder, VAE and safety checker are
    skipped) or a diffusers UNet's own weights (no prefix). Validated whole before anything is
    copied (`checkpoint.released.load_weights`). A training checkpoint of the decoder trainer
    (a DCP folder) is refused with a pointer to `inference.decode.load_trained_decoder`."""
    from emu2_engine.checkpoint.dcp import is_checkpoint_folder
    from emu2_engine.checkpoint.released import load_weights

    if is_checkpoint_folder(source):  # the trainer's step-NNNNNN folder
        raise ValueError(f"{source} is a training checkpoint (torch.distributed.checkpoint, as "
                         f"train_decoder writes them), not a weights file: load it with "
                         f"emu2_engine.inference.decode.load_trained_decoder(path, unet)")
    load_weights(model, source, rename=_unet_name)


CONDITION_INPUTS = ("attn2.to_k.weight", "attn2.to_v.weight", "add_embedding.linear_1.weight")
"""The UNet tensors whose input width is the conditioning's: the cross-attention key and value
projections (they read the condition tokens) and, with `text_time`, the first layer of the
added-condition embedding (it reads the pooled condition and the six size ids)."""


def load_base_unet_weights(model: UNet, source: str) -> list[str]:
    """Initialise `model` from a UNet of the same architecture trained on other conditioning, as
    the paper starts its decoders: from SDXL-base (Emu2-Gen) and Stable Diffusion 2.1 (the video
    decoder), "adjusting the dimension of the projection layers in cross-attention modules" to
    the visual embeddings. Every tensor must match, except the `CONDITION_INPUTS` whose width
    differs (SDXL's cross-attention reads 2048-wide text states and its added condition 1280
    pooled text + 6 x 256 id features; SD 2.1's cross-attention 1024; Emu2's embeddings are
    1792 wide): those keep `model`'s fresh initialisation, except that the added-condition
    projection takes the base's size-id columns and zeroes its pooled ones
    (`_adopt_size_id_columns`). Returns their names. Validated whole before anything is copied,
    like `load_unet_weights`. Head counts are not in the weights' shapes: the preset must use
    the base's (`UNET_PRESETS` states them)."""
    from emu2_engine.checkpoint.released import load_weights, read_tensor

    report = load_weights(model, source, rename=_unet_name,
                          keep_fresh=lambda name: name.endswith(CONDITION_INPUTS))
    name = "add_embedding.linear_1.weight"
    if name in report.kept_keys:
        _adopt_size_id_columns(model, read_tensor(source, name, rename=_unet_name))
    return report.kept_keys


def _adopt_size_id_columns(model: UNet, base: torch.Tensor) -> None:
    """The added-condition projection reads [pooled condition | six size/crop ids x 256]. The
    base's size-id columns mean the same thing here, so they are copied; its pooled columns read
    another encoder's features, so ours start at zero: the base was trained with zeroed pooled
    text for classifier-free guidance (SDXL), a state it has seen. Leaves the layer as it is
    when the id widths differ."""
    weight = model.add_embedding.linear_1.weight
    ids = TIME_IDS * model.cfg.addition_time_embed_dim
    if base.shape[0] != weight.shape[0] or base.shape[1] <= ids:
        return
    with torch.no_grad():
        weight[:, -ids:].copy_(base[:, -ids:])
        weight[:, :-ids].zero_()


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """Keyword arguments of diffusers' `UNet2DConditionModel` with the same parameters as
    `UNet(cfg)`: the bridge for exporting to, and testing against, diffusers."""
    down = ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cfg.cross_attention]
    up = ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cfg.cross_attention)]
    kwargs = dict(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=tuple(down), up_block_types=tuple(up),
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        transformer_layers_per_block=tuple(cfg.transformer_layers),
        attention_head_dim=tuple(cfg.attention_heads), cross_attention_dim=cfg.cross_attention_dim,
        use_linear_projection=True, norm_num_groups=cfg.norm_groups, norm_eps=cfg.norm_eps,
        flip_sin_to_cos=True, freq_shift=0)
    if cfg.text_time:
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=cfg.addition_time_embed_dim,
                      projection_class_embeddings_input_dim=cfg.add_embed_in_dim)
    return kwargs
