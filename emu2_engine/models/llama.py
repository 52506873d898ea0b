"""The LLaMA decoder of Emu2, in plain PyTorch.

RMSNorm (computed in fp32), rotary embeddings in the Hugging Face layout (``rotate_half``,
which is how the released ``q_proj``/``k_proj`` weights are stored) driven by per-token
position ids that restart for every packed document, SwiGLU, and attention through
`modality_attention` so packed documents and visual spans get their mask. Blocks live in a
ModuleDict keyed by index strings; a pipeline stage deletes the ones it does not own and sets
``embed_tokens``/``norm`` to None, and forward skips what is missing.

`forward_cached` is the incremental path of inference (`emu2_engine.inference.generate`): one
document at positions 0, 1, ... continuing a key/value cache, attention by SDPA with a causal
mask offset by the cached length. The training path (`forward`) does not go through it.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu2_engine.models.block_linear import BlockLinear
from emu2_engine.models.config import LlamaConfig
from emu2_engine.ops import modality_attention
from emu2_engine.ops.backend import autocast_dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary per-token positions, computed in fp32.

    The frequencies are computed in each call rather than kept in a buffer: a buffer is cast
    by ``model.to(torch.bfloat16)`` (bf16 frequencies put the angles of the 37B model's
    positions off by up to 2.5 rad) and left uninitialised by ``to_empty()`` after a build on
    the meta device (no checkpoint carries it). They are head_dim / 2 numbers; under
    torch.compile they fold into a constant."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """theta ** (-2i / head_dim) for i < head_dim / 2, fp32."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta ** exponents)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float()[..., None] * self.inv_freq(position_ids.device)  # (B, S, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D); cos/sin (B, S, D)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class KVStore(Protocol):
    """What `LlamaDecoder.forward_cached` needs of a key/value cache (the implementation:
    `emu2_engine.inference.generate.KVCache`)."""

    length: int
    """Positions already cached (the next input sits at this position)."""

    def update(self, layer: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `layer`'s k/v (B, Hkv, n, D) at positions length .. length + n - 1 and return
        its keys and values of positions 0 .. length + n - 1."""

    def advance(self, n: int) -> None:
        """Count n more positions as cached (after every layer has stored them)."""


def causal_attention_after(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one document for queries q (B, Hq, n, D) at the last n of the L
    positions of k/v (B, Hkv, L, D): query i sees keys 0 .. L - n + i. What `modality_attention`
    computes for those rows with a single document and no spans."""
    n, L = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if n == 1:  # the newest position sees every key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if n == L:  # nothing cached before: the plain causal mask
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(L - n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = BlockLinear(cfg.hidden, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = BlockLinear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = BlockLinear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = BlockLinear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                doc_ids: torch.Tensor, span_ids: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = modality_attention(q, k, v, doc_ids, span_ids, causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))

    def forward_cached(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       cache: KVStore, layer: str) -> torch.Tensor:
        """`forward` for inputs continuing the positions `cache` holds (one document)."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        k, v = cache.update(layer, k, v)
        out = causal_attention_after(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = BlockLinear(cfg.hidden, cfg.ffn_hidden, bias=False)
        self.up_proj = BlockLinear(cfg.hidden, cfg.ffn_hidden, bias=False)
        self.down_proj = BlockLinear(cfg.ffn_hidden, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                doc_ids: torch.Tensor, span_ids: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, doc_ids, span_ids)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       cache: KVStore, layer: str) -> torch.Tensor:
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), rope, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """Token embedding, decoder blocks and the final norm (the heads live in `Emu2Model`)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleDict({str(i): LlamaBlock(cfg) for i in range(cfg.layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.fp32_residual = False
        """Under autocast, keep the residual stream in fp32 (`train.fp32_residual`); by default
        it runs in the autocast dtype (see `EVAVisionTransformer.fp32_residual`)."""
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def forward(self, h: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor,
                span_ids: torch.Tensor) -> torch.Tensor:
        """h: (B, S, hidden) input embeddings (visual rows already scattered in)."""
        rope = self.rotary(position_ids)
        if (stream := autocast_dtype(h)) is not None and not self.fp32_residual:
            h = h.to(stream)
        for layer in self.layers.values():
            h = layer(h, rope, doc_ids, span_ids)
        return self.norm(h) if self.norm is not None else h

    def forward_cached(self, h: torch.Tensor, cache: KVStore) -> torch.Tensor:
        """h: (B, S, hidden) input embeddings of the positions cache.length .. + S - 1 of one
        document (per row) -> their final hidden states; their keys and values join `cache`.
        The same numbers as `forward` with one document and no spans, up to rounding."""
        B, S, _ = h.shape
        position_ids = torch.arange(cache.length, cache.length + S, device=h.device).expand(B, S)
        rope = self.rotary(position_ids)
        if (stream := autocast_dtype(h)) is not None and not self.fp32_residual:
            h = h.to(stream)
        for name, layer in self.layers.items():
            h = layer.forward_cached(h, rope, cache, name)
        cache.advance(S)
        return self.norm(h) if self.norm is not None else h
