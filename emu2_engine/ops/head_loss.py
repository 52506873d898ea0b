"""`emu2_head_loss`: the text cross-entropy and the image regression, from the final hidden states.

- Text: cross-entropy of ``hidden @ lm_weight.T`` against ``labels`` (already shifted; -100 is
  ignored), averaged over the counted tokens; with ``z_loss > 0`` each counted token also adds
  ``z_loss * logsumexp(logits)^2`` (PaLM's z-loss), inside ``ce``.
- Image: MSE between ``hidden[reg_index] @ down_weight.T`` and ``reg_target`` (the detached
  pooled visual features), averaged over embedding elements.
- ``total = ce + reg_weight * mse``. A term with nothing to count is 0, never NaN.

Implementations (``ops.backend``): ``reference`` is the plain PyTorch definition below (logits
of 4096 labelled rows at a time, autograd keeps them all for backward). Otherwise the fused op
of `emu2_engine.kernels.head_loss` runs: on CUDA with its Triton kernels, on the CPU as the same
chunked algorithm in PyTorch. It never holds more than one chunk of logits and computes the
gradients during the forward pass.

Vocabulary parallelism: with ``group``, ``lm_weight`` is this rank's contiguous block of
vocabulary rows (blocks in rank order, any sizes), ``hidden`` is the same on every rank, and
the loss equals the unsharded one on every rank; ``hidden``'s gradient is summed over the group
(every rank gets the full gradient), ``lm_weight``'s is that of the local rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from emu2_engine.kernels import head_loss as _kernel
from emu2_engine.ops.backend import autocast_dtype, requested_backend, use_triton

# Rows of logits formed at once by the reference: 4096 x 32k fp32 logits are 0.5 GB.
_CE_CHUNK_ROWS = 4096


class HeadLoss(NamedTuple):
    total: torch.Tensor
    """ce + reg_weight * mse (scalar)."""
    ce: torch.Tensor
    """Mean text cross-entropy over counted tokens, plus the z-loss term when z_loss > 0
    (scalar, 0 if none)."""
    mse: torch.Tensor
    """Mean squared error over regressed embedding elements (scalar, 0 if none)."""
    n_text: torch.Tensor
    """Tokens that counted in ce (int64 scalar)."""
    n_reg: torch.Tensor
    """Embeddings (vectors) that counted in mse (int64 scalar)."""


def emu2_head_loss_reference(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor,
                             down_weight: torch.Tensor, reg_index: torch.Tensor,
                             reg_target: torch.Tensor, reg_weight: float = 1.0,
                             z_loss: float = 0.0) -> HeadLoss:
    """hidden (T, H) or (B, S, H); labels of the same leading shape; reg_index (R,) flat indices
    into the T rows; reg_target (R, C)."""
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    y = labels.reshape(-1).long()  # cross_entropy takes int64 targets; the fused path any integers
    if y.shape[0] != h.shape[0]:
        raise ValueError(f"labels must have one entry per hidden row ({h.shape[0]}), got {y.shape[0]}")
    rows = (y != -100).nonzero().squeeze(1)
    n_text = rows.numel()
    # zero terms made from the inputs, so that a micro-batch with nothing to count still
    # backpropagates (zero gradients), as the fused path does
    ce_sum = F.linear(h[:0], lm_weight).float().sum()
    for start in range(0, n_text, _CE_CHUNK_ROWS):
        idx = rows[start:start + _CE_CHUNK_ROWS]
        logits = F.linear(h[idx], lm_weight).float()
        ce_sum = ce_sum + F.cross_entropy(logits, y[idx], reduction="sum")
        if z_loss:
            ce_sum = ce_sum + z_loss * torch.logsumexp(logits, dim=1).square().sum()
    ce = ce_sum / max(n_text, 1)

    reg_index = reg_index.reshape(-1)
    n_reg = reg_index.numel()
    if reg_target.shape != (n_reg, down_weight.shape[0]):
        raise ValueError(f"reg_target must be ({n_reg}, {down_weight.shape[0]}), got {tuple(reg_target.shape)}")
    if n_reg:
        pred = F.linear(h[reg_index], down_weight).float()
        mse = F.mse_loss(pred, reg_target.detach().float(), reduction="mean")  # a target, as in the fused path
    else:
        mse = F.linear(h[:0], down_weight).float().sum()
    total = ce + reg_weight * mse
    return HeadLoss(total, ce, mse, torch.tensor(n_text), torch.tensor(n_reg))


_VOCAB_RANGES: dict[tuple[str, int, int, int], tuple[int, int, int]] = {}
"""`_vocab_range`'s answers by (group name, this rank in it, its size, local vocabulary rows):
gathered once per group, so later steps make no collective and read nothing back from the
device for it."""


def _vocab_range(local_vocab: int, group: dist.ProcessGroup | None, device: torch.device):
    """(first vocabulary id of this rank's rows, total vocabulary, largest shard) under `group`.
    Every rank of `group` calls it at the same points (the head loss runs on all of them), so
    they fill the cache together."""
    if group is None:
        return 0, local_vocab, local_vocab
    key = (group.group_name, dist.get_rank(group), dist.get_world_size(group), local_vocab)
    if key not in _VOCAB_RANGES:
        _VOCAB_RANGES[key] = _gather_vocab_range(local_vocab, group, device)
    return _VOCAB_RANGES[key]


def _gather_vocab_range(local_vocab: int, group: dist.ProcessGroup, device: torch.device):
    size = torch.tensor([local_vocab], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes), max(sizes)


def _check_inputs(hidden, lm_weight, labels, down_weight, reg_index, reg_target, reg_weight,
                  z_loss, group, text_rows=None):
    """Shapes, dtypes, devices and ranges, all before any work. Returns (h (T, H), labels (T,)
    int64, reg_index (R,) int64, vocab_start, largest vocabulary shard). With `text_rows` the
    values of labels and reg_index are not read (their ranges were checked on the host)."""
    if not hidden.is_floating_point() or hidden.dim() < 2:
        raise ValueError(f"hidden must be a floating (..., H) tensor, got {hidden.dtype} of shape "
                         f"{tuple(hidden.shape)}")
    H = hidden.shape[-1]
    for name, w in (("lm_weight", lm_weight), ("down_weight", down_weight)):
        if w.dim() != 2 or w.shape[1] != H:
            raise ValueError(f"{name} must be (rows, {H}) to match hidden, got {tuple(w.shape)}")
        if w.dtype != hidden.dtype:
            raise ValueError(f"{name} is {w.dtype} but hidden is {hidden.dtype}; the heads run in "
                             f"one dtype")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden without its "
                         f"last dim), got {tuple(labels.shape)}")
    for name, t in (("labels", labels), ("reg_index", reg_index)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    idx = reg_index.reshape(-1)
    C = down_weight.shape[0]
    if tuple(reg_target.shape) != (idx.numel(), C) or not reg_target.is_floating_point():
        raise ValueError(f"reg_target must be a floating ({idx.numel()}, {C}) tensor (one row of "
                         f"down_weight's width per reg_index), got {reg_target.dtype} "
                         f"{tuple(reg_target.shape)}")
    if text_rows is not None and (text_rows.dtype != torch.int64 or text_rows.dim() != 1
                                  or text_rows.numel() > labels.numel()):
        raise ValueError(f"text_rows must be a 1-D int64 tensor of at most {labels.numel()} row "
                         f"indices, got {text_rows.dtype} of shape {tuple(text_rows.shape)}")
    given = (hidden, lm_weight, labels, down_weight, reg_index, reg_target)
    devices = {t.device for t in given + (() if text_rows is None else (text_rows,))}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if not (math.isfinite(reg_weight) and math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"reg_weight must be finite and z_loss finite and >= 0, got "
                         f"{reg_weight}, {z_loss}")
    T = hidden.numel() // H
    y = labels.reshape(-1).long()
    vocab_start, vocab, largest = _vocab_range(lm_weight.shape[0], group, hidden.device)
    if text_rows is not None:  # ranges checked on the host: no synchronisation here
        return hidden.reshape(T, H), y, idx.long(), vocab_start, largest
    bad_label = (y != -100) & ((y < 0) | (y >= vocab))
    bad_index = (idx < 0) | (idx >= T)
    flags = torch.stack([bad_label.any(), bad_index.any()]).tolist()  # one sync
    if flags[0]:
        raise ValueError(f"labels must be -100 or in [0, {vocab}), got {int(y[bad_label][0])}")
    if flags[1]:
        raise ValueError(f"reg_index must index the {T} hidden rows, got {int(idx[bad_index][0])}")
    return hidden.reshape(T, H), y, idx.long(), vocab_start, largest


def emu2_head_loss(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor,
                   down_weight: torch.Tensor, reg_index: torch.Tensor, reg_target: torch.Tensor,
                   reg_weight: float = 1.0, *, z_loss: float = 0.0,
                   group: dist.ProcessGroup | None = None,
                   text_rows: torch.Tensor | None = None) -> HeadLoss:
    """Text cross-entropy plus weighted image-regression MSE; see the module docstring.

    `text_rows` (optional): the flat indices of the rows whose label is not -100, ascending,
    int64 on hidden's device, computed on the host where the labels and `reg_index` were
    range-checked (`PackedBatch.with_text_rows` after `PackedBatch.validate`). Given, the op
    reads no value back to the host: no synchronisation, so the CPU keeps queueing the backward
    while the GPU finishes the forward. The caller vouches for those ranges."""
    dtype = autocast_dtype(hidden)
    if dtype is not None:
        with torch.autocast(hidden.device.type, enabled=False):
            return emu2_head_loss(hidden.to(dtype), lm_weight.to(dtype), labels, down_weight.to(dtype),
                                  reg_index, reg_target, reg_weight, z_loss=z_loss, group=group,
                                  text_rows=text_rows)
    reference = requested_backend("emu2_head_loss") == "reference"
    if reference and group is not None:
        raise ValueError("the reference head loss is not vocabulary-parallel; "
                         "use EMU2_KERNELS=auto or triton with a process group")
    h, y, idx, vocab_start, largest = _check_inputs(
        hidden, lm_weight, labels, down_weight, reg_index, reg_target, reg_weight, z_loss, group,
        text_rows)
    if reference:
        return emu2_head_loss_reference(hidden, lm_weight, labels, down_weight, reg_index,
                                        reg_target, reg_weight, z_loss)
    use_kernel = use_triton("emu2_head_loss", hidden, has_kernel=True)
    if use_kernel and hidden.dtype not in _kernel.DTYPES:
        if requested_backend("emu2_head_loss") == "triton":
            raise ValueError(f"the Triton head loss runs in {_kernel.DTYPES}, got {hidden.dtype}")
        use_kernel = False  # auto: the chunked PyTorch path handles any dtype
    ce, mse, n_text = _kernel.fused_head_loss(
        h.contiguous(), lm_weight.contiguous(), y, down_weight.contiguous(), idx,
        reg_target.detach(), float(z_loss), use_kernel, group, vocab_start, largest, text_rows)
    return HeadLoss(ce + reg_weight * mse, ce, mse, n_text, torch.tensor(idx.numel()))
