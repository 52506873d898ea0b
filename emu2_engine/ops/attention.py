"""`modality_attention`: attention under Emu2's packed, interleaved-modality mask.

Mask rule (shared/DESIGN.md): query i may attend key j iff
``doc[i] == doc[j] and doc[i] >= 0`` and (``not causal`` or ``j <= i`` or
(``span[i] >= 0 and span[i] == span[j]``)). A query with no allowed key outputs zeros and
passes zero gradients.

Only the PyTorch reference exists so far (dense mask + SDPA); the block-sparse Triton kernel
is a separate piece of work and plugs in through `ops.backend`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from emu2_engine.ops.backend import use_triton


def modality_mask(doc_ids: torch.Tensor, span_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """The dense (B, S, S) boolean mask of the rule above (True = may attend)."""
    d = doc_ids
    allowed = (d[:, :, None] == d[:, None, :]) & (d[:, :, None] >= 0)
    if causal:
        S = d.shape[1]
        pos = torch.arange(S, device=d.device)
        lower = pos[:, None] >= pos[None, :]
        s = span_ids
        same_span = (s[:, :, None] >= 0) & (s[:, :, None] == s[:, None, :])
        allowed &= lower | same_span
    return allowed


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor,
           span_ids: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"modality_attention expects q (B, Hq, S, D) and k, v (B, Hkv, S, D) of equal "
                         f"shape, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Hq, S, D = q.shape
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D or Hq % k.shape[1]:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} "
                         f"(need same B, S, D and Hq a multiple of Hkv)")
    for name, t in (("doc_ids", doc_ids), ("span_ids", span_ids)):
        if tuple(t.shape) != (B, S):
            raise ValueError(f"{name} must have shape {(B, S)}, got {tuple(t.shape)}")


def modality_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 doc_ids: torch.Tensor, span_ids: torch.Tensor,
                                 causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Dense-mask SDPA; computes in the inputs' dtype (pass fp64 tensors for a test oracle)."""
    _check(q, k, v, doc_ids, span_ids)
    gqa = q.shape[1] != k.shape[1]
    mask = modality_mask(doc_ids, span_ids, causal)[:, None]  # (B, 1, S, S)
    has_key = mask.any(dim=-1, keepdim=True)  # (B, 1, S, 1)
    # Rows with no allowed key would give NaN in softmax: let them see everything, then zero
    # their output, which also zeroes every gradient that flows through them.
    safe = mask | ~has_key
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale, enable_gqa=gqa)
    return out * has_key.to(out.dtype)


def _single_document(doc_ids: torch.Tensor, span_ids: torch.Tensor) -> bool:
    """True when every row is one document with no padding and no bidirectional span."""
    return bool((doc_ids == doc_ids[:, :1]).all() and (doc_ids[:, 0] >= 0).all() and (span_ids < 0).all())


def modality_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor,
                       span_ids: torch.Tensor, causal: bool = True,
                       scale: float | None = None) -> torch.Tensor:
    """Attention under the interleaved-modality mask; q (B, Hq, S, D), k/v (B, Hkv, S, D)."""
    _check(q, k, v, doc_ids, span_ids)
    use_triton("modality_attention", q, has_kernel=False)
    if _single_document(doc_ids, span_ids):
        # The whole row is one document (the ViT, unpacked inference): no mask to build, and
        # SDPA picks its fused kernels.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    return modality_attention_reference(q, k, v, doc_ids, span_ids, causal, scale)
