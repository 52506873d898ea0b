"""Fused LM-head cross-entropy and `project_down` regression, computed without the full logits.

What it computes (the op-level reference is `emu2_engine.ops.head_loss.emu2_head_loss_reference`):

    text  = mean over rows with labels[t] != -100 of  lse_t - z[t, labels[t]] + z_loss * lse_t^2,
            z = hidden @ lm_weight.T,  lse_t = logsumexp(z[t])
    mse   = mean over elements of (hidden[reg_index] @ down_weight.T - reg_target)^2

together with the gradients of both terms for hidden, lm_weight and down_weight.

Algorithm (one pass over the labelled hidden rows, gradients produced in the same pass):
for each chunk of labelled rows (`chunk_rows`: the chunk's logits are about the size of the
hidden states, never all rows x vocabulary)
  1. z = h_c @ W.T                                  GEMM (cuBLAS / MKL)
  2. per row, over vocabulary blocks, an online max / sum-exp and the target logit
                                                    `_ce_stats_kernel`
     under tensor parallelism W is this rank's vocabulary shard: all-reduce MAX of the max,
     then SUM of the rescaled sum-exp and of the target logit (zero where the target lives
     on another shard)
  3. z <- (softmax(z) * (1 + 2 z_loss lse) - onehot) / n_text, in place    `_ce_grad_kernel`
  4. dh[rows] = z @ W ;  dW += z.T @ h_c             GEMMs (dh is summed over the TP group)
The chunk's logits buffer is reused for its own gradient, so the only large temporaries are
one chunk of logits and the gradients themselves (dh: T x H, dW: V x H). Nothing is saved
for backward but those gradients; backward only scales them by the incoming gradient.

The regression is one GEMM with the gather of the hidden rows in its prologue and the MSE in
its epilogue (`_regression_kernel`): it writes d mse / d pred and one partial sum of squares
per tile; two small GEMMs give the gradients of hidden and down_weight.

The GEMMs of the text term stay in cuBLAS, the same 3 x forward FLOPs eager runs (no
recomputation): what eager wastes is memory traffic on the full logits (fp32 upcast,
log-softmax, its gradient), which steps 2-3 replace with two reads and one write of each chunk.
GPU speed is unmeasured so far (docs/kernels/head_loss.md).

`ce_stats_reference`, `ce_grad_reference_` and `regression_reference` define the kernels in
PyTorch; they are also the CPU path (same chunks, same order), so CPU training never forms
the full logits either.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes the kernels take (tl.dot has no fp64 path)."""

# Process groups of vocabulary-parallel calls, by name: a custom op takes strings, not groups.
_GROUPS: dict[str, dist.ProcessGroup] = {}


def chunk_rows(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows of logits formed at once: about as many logits as there are hidden-state elements
    (at least 2^20), so the temporary is never larger than the activation it comes from
    (Liger-Kernel's rule). A power of two >= 16: 256 rows at 8192 x 1024 with vocabulary
    32,274; 1024 rows at 8192 x 4096."""
    rows = max(16, max(n_rows * hidden, 1 << 20) // vocab)
    return 1 << (rows.bit_length() - 1)


# -- references (also the CPU path) ----------------------------------------------------------
def ce_stats_reference(logits: torch.Tensor, target: torch.Tensor):
    """Per row of `logits` (n, V): the max, sum(exp(z - max)) and the logit at `target` (0 where
    target is outside [0, V), i.e. on another vocabulary shard), all fp32."""
    z = logits.float()
    m = z.amax(dim=1)
    s = torch.exp(z - m[:, None]).sum(dim=1)
    inside = (target >= 0) & (target < z.shape[1])
    zt = z.gather(1, target.clamp(0, z.shape[1] - 1)[:, None])[:, 0]
    return m, s, torch.where(inside, zt, torch.zeros_like(zt))


def ce_grad_reference_(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                       z_loss: float, scale: float) -> torch.Tensor:
    """Overwrite `logits` with d loss / d logits: (softmax * (1 + 2 z_loss lse) - onehot) * scale."""
    z = logits.float() if logits.dtype != torch.float32 else logits
    z.sub_(lse[:, None]).exp_().mul_((scale * (1 + 2 * z_loss * lse))[:, None])
    inside = (target >= 0) & (target < z.shape[1])  # else the target is on another shard
    # minus scale at each row's target, by a scatter (no data-dependent shape: no host read)
    minus = torch.where(inside, -scale, 0.0).to(z.dtype)[:, None]
    z.scatter_add_(1, target.clamp(0, z.shape[1] - 1)[:, None], minus)
    if z is not logits:
        logits.copy_(z)
    return logits


def regression_reference(hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                         target: torch.Tensor, scale: float):
    """Sum of squared errors of hidden[index] @ weight.T against target (fp32 scalar) and
    (pred - target) * scale in hidden's dtype."""
    pred = torch.mm(hidden.index_select(0, index), weight.t()).float()
    diff = pred - target.float()
    return diff.square().sum(), (diff * scale).to(hidden.dtype)


# -- Triton kernels ----------------------------------------------------------------------------
@triton.jit
def _ce_stats_kernel(logits_ptr, target_ptr, max_ptr, sumexp_ptr, target_logit_ptr,
                     n_rows, vocab, stride_row,
                     BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    # Rows past the end re-read the last row and are not stored, so no row is all -inf (no NaN).
    safe = tl.minimum(rows, n_rows - 1)
    target = tl.load(target_ptr + safe)
    row_ptr = logits_ptr + safe.to(tl.int64)[:, None] * stride_row
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_T], dtype=tl.float32)
    zt = tl.zeros([BLOCK_T], dtype=tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        in_vocab = cols[None, :] < vocab
        z = tl.load(row_ptr + cols[None, :], mask=in_vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        hit = in_vocab & (cols[None, :] == target[:, None])
        zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
        m = m_new
    ok = rows < n_rows
    tl.store(max_ptr + rows, m, mask=ok)
    tl.store(sumexp_ptr + rows, s, mask=ok)
    tl.store(target_logit_ptr + rows, zt, mask=ok)


@triton.jit
def _ce_grad_kernel(logits_ptr, target_ptr, lse_ptr, n_rows, vocab, stride_row, z_loss, scale,
                    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < n_rows
    safe = tl.minimum(rows, n_rows - 1)
    target = tl.load(target_ptr + safe)
    lse = tl.load(lse_ptr + safe)
    coef = scale * (1.0 + 2.0 * z_loss * lse)
    row_ptr = logits_ptr + safe.to(tl.int64)[:, None] * stride_row
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = ok[:, None] & (cols[None, :] < vocab)
        z = tl.load(row_ptr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(z - lse[:, None]) * coef[:, None]
        g = tl.where(cols[None, :] == target[:, None], g - scale, g)
        tl.store(row_ptr + cols[None, :], g.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _regression_kernel(h_ptr, index_ptr, w_ptr, target_ptr, grad_ptr, partial_ptr,
                       n_reg, out_dim, hidden_dim, stride_h, stride_w, stride_t, scale,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                       IEEE: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = r < n_reg
    c_ok = c < out_dim
    src = tl.load(index_ptr + r, mask=r_ok, other=0).to(tl.int64)  # the gather, in the prologue
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, hidden_dim, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < hidden_dim
        a = tl.load(h_ptr + src[:, None] * stride_h + k[None, :],
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + c.to(tl.int64)[None, :] * stride_w + k[:, None],
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    both = r_ok[:, None] & c_ok[None, :]
    t = tl.load(target_ptr + r.to(tl.int64)[:, None] * stride_t + c[None, :], mask=both, other=0.0)
    diff = tl.where(both, acc - t.to(tl.float32), 0.0)
    tl.store(grad_ptr + r.to(tl.int64)[:, None] * out_dim + c[None, :],
             (diff * scale).to(grad_ptr.dtype.element_ty), mask=both)
    tl.store(partial_ptr + pid_r * tl.num_programs(1) + pid_c, tl.sum(tl.sum(diff * diff, axis=1), axis=0))


# -- launchers and their tuning ----------------------------------------------------------------
def _ce_blocks(vocab: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_V, num_warps). On a GPU one row per program and 4096-wide vocabulary
    blocks: 8 warps hold 16 fp32 values per thread per block, and a chunk of >= 256 rows gives
    every SM several programs. The interpreter pays per program, so it takes 16 rows at once."""
    block_v = min(triton.next_power_of_2(vocab), 1024 if _INTERPRET else 4096)
    return (16, block_v, 4) if _INTERPRET else (1, block_v, 8)


def ce_stats(logits: torch.Tensor, target: torch.Tensor):
    """Triton version of `ce_stats_reference` (logits row-major)."""
    n, vocab = logits.shape
    out = torch.empty(3, n, dtype=torch.float32, device=logits.device)
    block_t, block_v, warps = _ce_blocks(vocab)
    _ce_stats_kernel[(triton.cdiv(n, block_t),)](
        logits, target, out[0], out[1], out[2], n, vocab, logits.stride(0),
        BLOCK_T=block_t, BLOCK_V=block_v, num_warps=warps)
    return out[0], out[1], out[2]


def ce_grad_(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, z_loss: float,
             scale: float) -> torch.Tensor:
    """Triton version of `ce_grad_reference_` (in place)."""
    n, vocab = logits.shape
    block_t, block_v, warps = _ce_blocks(vocab)
    _ce_grad_kernel[(triton.cdiv(n, block_t),)](
        logits, target, lse, n, vocab, logits.stride(0), float(z_loss), float(scale),
        BLOCK_T=block_t, BLOCK_V=block_v, num_warps=warps)
    return logits


def _regression_blocks(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_R, BLOCK_C, BLOCK_K, num_warps, num_stages). A small GEMM (R <= a few thousand
    rows): 64 x 128 tiles, 3 stages of (64 + 128) x BLOCK_K operands in shared memory (72 KB
    at 16 bits with BLOCK_K = 64; fp32 halves BLOCK_K to stay at 72 KB)."""
    if _INTERPRET:
        return 32, 64, 64, 4, 1
    return 64, 128, 32 if dtype == torch.float32 else 64, 8, 3


def regression(hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
               target: torch.Tensor, scale: float):
    """Triton version of `regression_reference`."""
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    n_reg, out_dim = target.shape
    block_r, block_c, block_k, warps, stages = _regression_blocks(hidden.dtype)
    grid = (triton.cdiv(n_reg, block_r), triton.cdiv(out_dim, block_c))
    grad = torch.empty(n_reg, out_dim, dtype=hidden.dtype, device=hidden.device)
    partial = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=hidden.device)
    _regression_kernel[grid](
        hidden, index, weight, target, grad, partial, n_reg, out_dim, hidden.shape[1],
        hidden.stride(0), weight.stride(0), target.stride(0), float(scale),
        BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_K=block_k, IEEE=hidden.dtype == torch.float32,
        num_warps=warps, num_stages=stages)
    return partial.sum(), grad


# -- the fused pass ----------------------------------------------------------------------------
def fused_forward(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor,
                  down_weight: torch.Tensor, reg_index: torch.Tensor, reg_target: torch.Tensor,
                  z_loss: float, with_grads: bool, use_kernel: bool,
                  group: dist.ProcessGroup | None = None, vocab_start: int = 0,
                  chunk_vocab: int = 0, text_rows: torch.Tensor | None = None):
    """The whole computation on checked inputs: hidden (T, H), lm_weight (V, H) (this rank's
    vocabulary rows [vocab_start, vocab_start + V) under `group`), labels (T,) int64,
    down_weight (C, H), reg_index (R,) int64, reg_target (R, C). Chunks are sized for
    `chunk_vocab` (default V): under `group` the largest shard, so that every rank cuts the same
    chunks and the all-reduces pair up. `text_rows`, when given, are the rows whose label is not
    -100, ascending (computed on the host beforehand): no host synchronisation to find them.

    Returns (text, mse, n_text, dh_text, d_lm, dh_reg, d_down); the last four are the
    gradients of `text` (dh_text: (T, H), summed over `group`; d_lm: (V, H)) and of `mse`
    (dh_reg: (R, H), rows of hidden[reg_index]; d_down: (C, H)), or None without with_grads."""
    stats, grad_ = (ce_stats, ce_grad_) if use_kernel else (ce_stats_reference, ce_grad_reference_)
    T, H = hidden.shape
    vocab = lm_weight.shape[0]
    rows = (labels != -100).nonzero().squeeze(1) if text_rows is None else text_rows
    n_text = rows.numel()
    scale = 1.0 / max(n_text, 1)
    text_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dh = torch.zeros_like(hidden) if with_grads else None
    d_lm = torch.zeros_like(lm_weight) if with_grads else None
    step = chunk_rows(n_text, H, chunk_vocab or vocab)
    for start in range(0, n_text, step):
        idx = rows[start:start + step]
        h_c = hidden.index_select(0, idx)
        target = labels.index_select(0, idx) - vocab_start
        logits = torch.mm(h_c, lm_weight.t())
        m, s, zt = stats(logits, target)
        if group is not None:
            m_all = m.clone()
            dist.all_reduce(m_all, dist.ReduceOp.MAX, group=group)
            s_zt = torch.stack([s * torch.exp(m - m_all), zt])
            dist.all_reduce(s_zt, dist.ReduceOp.SUM, group=group)
            m, s, zt = m_all, s_zt[0], s_zt[1]
        lse = m + torch.log(s)
        text_sum += (lse - zt + z_loss * lse.square()).sum()
        if with_grads:
            g = grad_(logits, target, lse, z_loss, scale)
            dh.index_copy_(0, idx, torch.mm(g, lm_weight))
            d_lm.addmm_(g.t(), h_c)
        del logits
    if with_grads and group is not None:
        dist.all_reduce(dh, dist.ReduceOp.SUM, group=group)

    n_reg, out_dim = reg_target.shape
    mse = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dh_reg = d_down = None
    if with_grads:
        dh_reg = hidden.new_zeros(n_reg, H)
        d_down = torch.zeros_like(down_weight)
    if n_reg:
        reg_scale = 2.0 / (n_reg * out_dim)
        fn = regression if use_kernel else regression_reference
        sq_sum, g_pred = fn(hidden, reg_index, down_weight, reg_target, reg_scale)
        mse = sq_sum / (n_reg * out_dim)
        if with_grads:
            dh_reg = torch.mm(g_pred, down_weight)
            d_down = torch.mm(g_pred.t(), hidden.index_select(0, reg_index))
    n_text_t = device_count(n_text, hidden.device)
    return text_sum * scale, mse, n_text_t, dh, d_lm, dh_reg, d_down


def device_count(n: int, device: torch.device) -> torch.Tensor:
    """`n` as an int64 scalar on `device`, filled there: ``torch.tensor(n, device=cuda)`` would
    copy it from pageable host memory, which PyTorch follows with a stream synchronisation (the
    host would wait for the GPU in the middle of every micro-batch)."""
    return torch.full((), n, dtype=torch.int64, device=device)


# -- custom ops: opaque to torch.compile and to FlopCounterMode --------------------------------
@torch.library.custom_op("emu2::head_loss_fused", mutates_args=())
def _head_loss_fused(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor,
                     down_weight: torch.Tensor, reg_index: torch.Tensor, reg_target: torch.Tensor,
                     z_loss: float, with_grads: bool, use_kernel: bool, group_name: str,
                     vocab_start: int, chunk_vocab: int, text_rows: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor, torch.Tensor]:
    out = fused_forward(hidden, lm_weight, labels, down_weight, reg_index, reg_target, z_loss,
                        with_grads, use_kernel, _GROUPS[group_name] if group_name else None,
                        vocab_start, chunk_vocab, text_rows)
    return tuple(hidden.new_empty(0) if t is None else t for t in out)


@_head_loss_fused.register_fake
def _(hidden, lm_weight, labels, down_weight, reg_index, reg_target, z_loss, with_grads,
      use_kernel, group_name, vocab_start, chunk_vocab, text_rows=None):
    scalar = hidden.new_empty((), dtype=torch.float32)
    n_text = hidden.new_empty((), dtype=torch.int64)
    if not with_grads:
        empty = hidden.new_empty(0)
        return scalar, scalar.clone(), n_text, empty, empty.clone(), empty.clone(), empty.clone()
    return (scalar, scalar.clone(), n_text, torch.empty_like(hidden), torch.empty_like(lm_weight),
            hidden.new_empty(reg_index.shape[0], hidden.shape[1]), torch.empty_like(down_weight))


@torch.library.custom_op("emu2::head_loss_backward",
                         mutates_args=("dh_text", "d_lm", "d_down"))
def _head_loss_backward(grad_text: torch.Tensor, grad_mse: torch.Tensor, dh_text: torch.Tensor,
                  d_lm: torch.Tensor, dh_reg: torch.Tensor, d_down: torch.Tensor,
                  reg_index: torch.Tensor, n_text: torch.Tensor) -> None:
    """Backward of the fused op: scale the gradients it produced by the incoming ones and add
    the regression rows into dh_text, in place (no copy of the V x H gradient)."""
    dh_text.mul_(grad_text)
    d_lm.mul_(grad_text)
    if dh_reg.numel():
        dh_text.index_add_(0, reg_index, dh_reg * grad_mse)
    d_down.mul_(grad_mse)


@_head_loss_backward.register_fake
def _(grad_text, grad_mse, dh_text, d_lm, dh_reg, d_down, reg_index, n_text):
    return None


def _model_flops(n_text: int, hidden: int, vocab: int, n_reg: int, out_dim: int) -> int:
    """Forward FLOPs of the two heads: logits of the counted rows and the regression GEMM."""
    return 2 * n_text * hidden * vocab + 2 * n_reg * hidden * out_dim


# FLOP accounting convention. The fused op runs all of the heads' GEMMs (logits, then the
# gradients of hidden and of the weights: 3x the forward FLOPs) inside its forward call when
# gradients are wanted. FlopCounterMode credits them as the unfused model runs them: the
# forward FLOPs to the forward op and 2x to the backward op that consumes the precomputed
# gradients. Totals are exact; per phase they match the unfused model, so MFU (training =
# 3x forward) and `tests/test_flops.py` see the same numbers as with eager heads.
@register_flop_formula(torch.ops.emu2.head_loss_fused, get_raw=True)
def _fused_flops(hidden, lm_weight, labels, down_weight, reg_index, *args, out_val=None, **kwargs):
    return _model_flops(int((labels != -100).sum()), hidden.shape[1], lm_weight.shape[0],
                        reg_index.shape[0], down_weight.shape[0])


@register_flop_formula(torch.ops.emu2.head_loss_backward, get_raw=True)
def _backward_flops(grad_text, grad_mse, dh_text, d_lm, dh_reg, d_down, reg_index, n_text,
                       out_val=None, **kwargs):
    return 2 * _model_flops(int(n_text), dh_text.shape[1], d_lm.shape[0], reg_index.shape[0],
                            d_down.shape[0])


class FusedHeadLoss(torch.autograd.Function):
    """(text, mse, n_text) with gradients computed in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, lm_weight, down_weight, labels, reg_index, reg_target, z_loss,
                use_kernel, group_name, vocab_start, chunk_vocab, text_rows):
        text, mse, n_text, dh, d_lm, dh_reg, d_down = torch.ops.emu2.head_loss_fused(
            hidden, lm_weight, labels, down_weight, reg_index, reg_target, z_loss, True,
            use_kernel, group_name, vocab_start, chunk_vocab, text_rows)
        # Held as attributes, not saved tensors, so backward can hand them to autograd as the
        # parameters' .grad without a copy.
        ctx.grads = (dh, d_lm, dh_reg, d_down)
        ctx.save_for_backward(reg_index, n_text)
        ctx.mark_non_differentiable(n_text)
        return text, mse, n_text

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_text, grad_mse, _):
        if ctx.grads is None:
            raise RuntimeError("the fused head loss computes its gradients in the forward pass and "
                               "hands them over in backward, which can therefore run only once")
        dh, d_lm, dh_reg, d_down = ctx.grads
        ctx.grads = None
        reg_index, n_text = ctx.saved_tensors
        torch.ops.emu2.head_loss_backward(grad_text, grad_mse, dh, d_lm, dh_reg, d_down,
                                              reg_index, n_text)
        return dh, d_lm, d_down, None, None, None, None, None, None, None, None, None


def fused_head_loss(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor,
                    down_weight: torch.Tensor, reg_index: torch.Tensor, reg_target: torch.Tensor,
                    z_loss: float, use_kernel: bool, group: dist.ProcessGroup | None = None,
                    vocab_start: int = 0, chunk_vocab: int = 0, text_rows: torch.Tensor | None = None):
    """(text, mse, n_text) on checked inputs (see `fused_forward`); differentiable when grad
    mode is on and hidden or a weight requires grad, otherwise only the loss is computed."""
    group_name = ""
    if group is not None:
        group_name = group.group_name
        _GROUPS[group_name] = group
    if torch.is_grad_enabled() and (hidden.requires_grad or lm_weight.requires_grad
                                    or down_weight.requires_grad):
        return FusedHeadLoss.apply(hidden, lm_weight, down_weight, labels, reg_index, reg_target,
                                   z_loss, use_kernel, group_name, vocab_start, chunk_vocab, text_rows)
    out = torch.ops.emu2.head_loss_fused(hidden, lm_weight, labels, down_weight, reg_index,
                                         reg_target, z_loss, False, use_kernel, group_name,
                                         vocab_start, chunk_vocab, text_rows)
    return out[:3]
