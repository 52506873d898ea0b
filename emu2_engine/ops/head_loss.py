"""`emu2_head_loss`: the text cross-entropy and the image regression, from the final hidden states.

- Text: cross-entropy of ``hidden @ lm_weight.T`` against ``labels`` (already shifted; -100 is
  ignored), averaged over the counted tokens.
- Image: MSE between ``hidden[reg_index] @ down_weight.T`` and ``reg_target`` (the detached
  pooled visual features), averaged over embedding elements.
- ``total = ce + reg_weight * mse``. A term with nothing to count is 0, never NaN.

The reference computes logits only for the rows that carry a label, in chunks of rows, so the
full (tokens x vocabulary) logits are never formed at once; the fused Triton kernel (and its
chunked backward) is a separate piece of work and plugs in through `ops.backend`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from emu2_engine.ops.backend import use_triton

# Rows of logits formed at once by the reference: 4096 x 32k fp32 logits are 0.5 GB.
_CE_CHUNK_ROWS = 4096


class HeadLoss(NamedTuple):
    total: torch.Tensor
    """ce + reg_weight * mse (scalar)."""
    ce: torch.Tensor
    """Mean text cross-entropy over counted tokens (scalar, 0 if none)."""
    mse: torch.Tensor
    """Mean squared error over regressed embedding elements (scalar, 0 if none)."""
    n_text: torch.Tensor
    """Tokens that counted in ce (int64 scalar)."""
    n_reg: torch.Tensor
    """Embeddings (vectors) that counted in mse (int64 scalar)."""


def emu2_head_loss_reference(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor,
                             down_weight: torch.Tensor, reg_index: torch.Tensor,
                             reg_target: torch.Tensor, reg_weight: float = 1.0) -> HeadLoss:
    """hidden (T, H) or (B, S, H); labels of the same leading shape; reg_index (R,) flat indices
    into the T rows; reg_target (R, C)."""
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    y = labels.reshape(-1)
    if y.shape[0] != h.shape[0]:
        raise ValueError(f"labels must have one entry per hidden row ({h.shape[0]}), got {y.shape[0]}")
    rows = (y != -100).nonzero().squeeze(1)
    n_text = rows.numel()
    ce_sum = h.new_zeros((), dtype=torch.float32)
    for start in range(0, n_text, _CE_CHUNK_ROWS):
        idx = rows[start:start + _CE_CHUNK_ROWS]
        logits = F.linear(h[idx], lm_weight).float()
        ce_sum = ce_sum + F.cross_entropy(logits, y[idx], reduction="sum")
    ce = ce_sum / max(n_text, 1)

    reg_index = reg_index.reshape(-1)
    n_reg = reg_index.numel()
    if reg_target.shape != (n_reg, down_weight.shape[0]):
        raise ValueError(f"reg_target must be ({n_reg}, {down_weight.shape[0]}), got {tuple(reg_target.shape)}")
    if n_reg:
        pred = F.linear(h[reg_index], down_weight).float()
        mse = F.mse_loss(pred, reg_target.float(), reduction="mean")
    else:
        mse = h.new_zeros((), dtype=torch.float32)
    total = ce + reg_weight * mse
    return HeadLoss(total, ce, mse, torch.tensor(n_text), torch.tensor(n_reg))


def emu2_head_loss(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor,
                   down_weight: torch.Tensor, reg_index: torch.Tensor, reg_target: torch.Tensor,
                   reg_weight: float = 1.0) -> HeadLoss:
    """Text cross-entropy plus weighted image-regression MSE; see the module docstring."""
    use_triton("emu2_head_loss", hidden, has_kernel=False)
    return emu2_head_loss_reference(hidden, lm_weight, labels, down_weight, reg_index,
                                    reg_target, reg_weight)
