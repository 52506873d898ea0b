"""The EVA-CLIP vision transformer of Emu2 (EVA-02-CLIP-E-plus), in plain PyTorch.

As released (EMU2_FACTS.md): conv patch embedding, a CLS token and a learned absolute position
embedding (no RoPE), **post-norm** blocks ``x = x + LN1(attn(x)); x = x + LN2(mlp(x))``, a
fused bias-free qkv projection with separate ``q_bias`` and ``v_bias`` (k has none), a GELU
MLP, no final norm and no head. The output is the last block's features with CLS dropped.
Parameter names match the released checkpoint under ``visual.``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu2_engine.models.block_linear import BlockLinear, block_linear
from emu2_engine.models.config import VisionConfig
from emu2_engine.ops import modality_attention
from emu2_engine.ops.backend import autocast_dtype


class PatchEmbed(nn.Module):
    """The released conv (kernel = stride = patch) computed as one matrix product: the patches
    are cut out by a view and a permute, then multiplied by the conv weight seen as
    (width, 3 * patch * patch). The parameter stays a Conv2d's, so checkpoints load unchanged.
    cuDNN ran this conv in bf16 as an implicit SGEMM at 1.4 ms for 24 images of 448 px on the
    H200 (benchmarks/results, train_step profile), against ~0.1 ms for the equivalent GEMM."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        N, C, H, W = pixels.shape
        p = self.patch
        patches = (pixels.view(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
                   .reshape(N, (H // p) * (W // p), C * p * p))  # (N, P, 3*p*p), conv weight order
        weight = self.proj.weight
        return F.linear(patches, weight.reshape(weight.shape[0], -1), self.proj.bias)  # (N, P, width)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv = BlockLinear(cfg.width, 3 * cfg.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = BlockLinear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, _ = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        # The head count comes from the weight: under tensor parallelism this rank holds the
        # q, k and v rows of its own heads only.
        qkv = block_linear(self.qkv, x, bias).view(N, T, 3, -1, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, T, D)
        out = modality_attention(q, k, v, None, None, causal=False)  # each image: one document, no mask
        return self.proj(out.transpose(1, 2).reshape(N, T, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = BlockLinear(cfg.width, cfg.mlp_hidden)
        self.act = nn.GELU()
        self.fc2 = BlockLinear(cfg.mlp_hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Post-norm: the norm sits after each sublayer, inside the residual."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attn = VisionAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = VisionMLP(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The norms' outputs take the residual stream's dtype: CUDA autocast runs layer_norm in
        # fp32, which would otherwise turn a bf16 stream into fp32 at the first add.
        x = x + self.norm1(self.attn(x)).to(x.dtype)
        return x + self.norm2(self.mlp(x)).to(x.dtype)


class EVAVisionTransformer(nn.Module):
    """pixels (N, 3, R, R), CLIP-normalised -> patch features (N, P, width), CLS dropped."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.n_patches + 1, cfg.width))
        self.blocks = nn.ModuleDict({str(i): VisionBlock(cfg) for i in range(cfg.depth)})
        self.fp32_residual = False
        """Under autocast, keep the residual stream in fp32 (`train.fp32_residual`). By default
        it runs in the autocast dtype: the embeddings come out fp32 (fp32 parameters) and every
        residual add would keep them fp32, doubling the bytes each add and norm moves; with
        FSDP's bf16 parameters, and in Megatron-LM by default, the stream is bf16."""
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # The patch embedding keeps PyTorch's default (fan-in scaled) init: with std 0.02 the
        # debug model took longer to start reading its images.
        self.patch_embed.proj.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, VisionAttention):
                nn.init.zeros_(m.q_bias)
                nn.init.zeros_(m.v_bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        R = self.cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, R, R):
            raise ValueError(f"images must have shape (N, 3, {R}, {R}) for this model, "
                             f"got {tuple(pixels.shape)}")
        dtype = self.pos_embed.dtype
        if torch.is_autocast_enabled(pixels.device.type):  # the patch GEMM would cast to it anyway
            dtype = torch.get_autocast_dtype(pixels.device.type)
        x = self.patch_embed(pixels.to(dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if (stream := autocast_dtype(x)) is not None and not self.fp32_residual:
            x = x.to(stream)
        for block in self.blocks.values():
            x = block(x)
        return x[:, 1:]
