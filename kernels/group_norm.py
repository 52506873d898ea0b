"""`group_norm`: GroupNorm, optionally followed by SiLU, on channels-last activations (Triton),
forward and backward.

Why. The UNets keep their activations channels-last: cuDNN's convolutions run that way, and
the fused `spatiotemporal_conv` reads and writes it. PyTorch's CUDA GroupNorm only takes
NCHW-contiguous input (`native_group_norm` asks for `MemoryFormat::Contiguous` on every
device but the CPU), so each norm copied its input to NCHW, and the convolution after it
copied the result back, in the backward too. On an H200 (session 4, run1) emu2-video's step
spent 15.1 ms in layout copies with the engine's kernels against 5.4 ms on the reference
path. These kernels read the rows where they lie.

What it computes (`reference`): x is a contiguous (N, L, C) array, the (N, C, *spatial) tensor
in channels-last order with L the spatial size; the C channels form G groups of CG = C / G
consecutive channels. Per (sample, group), the mean and the biased variance of its L x CG
values, in fp32; y = (x - mean) * rstd * weight + bias, then y * sigmoid(y) if `silu`; stored
in x's dtype.

Forward, three launches:
1. `_stats_kernel`, one program per (sample, chunk of ROWS rows, BLOCK_C channels): each
   channel's mean and sum of squared deviations over the chunk, combining blocks of rows by
   Chan's formula (no E[x^2] - E[x]^2 cancellation).
2. `_finalize_stats_kernel`, one program per (sample, group): the group's mean and rstd from
   its chunks x channels (the mean first, then the deviations around it, a block of channels
   at a time), and each channel's affine map y = x * scale + shift.
3. `_apply_kernel`: y = act(x * scale + shift), elementwise.
Backward, with dz the gradient before SiLU (recomputed from x) and xhat = (x - mean) * rstd:
1. `_grad_partials_kernel`: per chunk and channel, sum(dz) and sum(dz * xhat).
2. `_finalize_grad_kernel`, per (sample, group): the per-channel sums (the weight and bias
   gradients are their sums over samples) and, with A = sum(w dz), B = sum(w dz xhat) over the
   group and M = L x CG, the coefficients of dx = scale * dz + beta * x + gamma, where
   beta = -rstd^2 B / M and gamma = rstd (mean rstd B - A) / M.
3. `_grad_input_kernel`: dx, elementwise.
Each elementwise pass reads x (and dy) once; the statistics are (N, C)-sized.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The activation dtypes the kernels take (weight and bias may be of any float dtype)."""

# Tiles. A (64 rows x 64 channels) tile is 8 KB in bf16, 32 values per thread at 4 warps: wide
# enough for 128-byte row segments, small enough that the (N x chunks x channel blocks) grid of
# the deep levels (8x8 latents: L = 64, 1280 channels) still has hundreds of programs. A chunk
# of ROWS rows per statistics program: 8 programs over a 64x64 latent, one over 8x8. The
# interpreter gets small tiles so that masks, several chunks and several row blocks per chunk
# are all exercised by small test shapes.
if _INTERPRET:
    BLOCK_R, BLOCK_C, ROWS = 8, 16, 16
else:
    BLOCK_R, BLOCK_C, ROWS = 64, 64, 512
MAX_CHUNKS = 64
"""A sample's rows are split into at most this many chunks (longer chunks past that)."""
GROUP_BLOCK = 4 if _INTERPRET else 64
"""Channels a per-group program takes at a time: its tiles are at most MAX_CHUNKS x GROUP_BLOCK
fp32 values whatever the group size (a whole group of 1,280 channels at once spilled
registers when compiled for sm_90)."""
NUM_WARPS = 4


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
              silu: bool) -> torch.Tensor:
    """The definition, by PyTorch: x (N, L, C) -> y (N, L, C)."""
    y = torch.nn.functional.group_norm(x.transpose(1, 2), groups, weight, bias, eps).transpose(1, 2)
    return torch.nn.functional.silu(y) if silu else y


# -- kernels -----------------------------------------------------------------------------------
@triton.jit
def _silu_grad(dy, z, SILU: tl.constexpr):
    """The gradient before the activation: dy * silu'(z), or dy without one."""
    if SILU:
        s = tl.sigmoid(z)
        return dy * s * (1.0 + z * (1.0 - s))
    return dy


@triton.jit
def _chunk_program(L, C, rows_per_chunk, n_chunks, BLOCK_C: tl.constexpr):
    """A per-chunk program's (sample, chunk, channels, channel mask, first row, end row)."""
    pid = tl.program_id(0)
    n, k = pid // n_chunks, pid % n_chunks
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    first = k * rows_per_chunk
    return n, k, c, c < C, first, tl.minimum(first + rows_per_chunk, L)


@triton.jit
def _group_tile(n, g, j0, C, CG, n_chunks, BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr):
    """Channels j0 .. j0 + BLOCK_CG of group g of sample n: (chunk indices, channels, channel
    mask, the offsets of their (chunk, channel) partials, that tile's mask)."""
    k = tl.arange(0, BLOCK_K)
    j = j0 + tl.arange(0, BLOCK_CG)
    c = g * CG + j
    j_ok = j < CG
    ok = (k < n_chunks)[:, None] & j_ok[None, :]
    at = (n * n_chunks + k).to(tl.int64)[:, None] * C + c[None, :]
    return k, c, j_ok, ok, at


@triton.jit
def _tile_program(L, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """An elementwise program's (sample, channels, channel mask, tile mask, tile offsets)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2).to(tl.int64)
    c_ok = c < C
    ok = (rows < L)[:, None] & c_ok[None, :]
    return n, c, c_ok, ok, n * L * C + rows[:, None].to(tl.int64) * C + c[None, :]


@triton.jit
def _stats_kernel(x_ptr, mean_ptr, m2_ptr, L, C, rows_per_chunk, n_chunks,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # one program: one chunk of one sample's rows x BLOCK_C channels
    n, k, c, c_ok, first, end = _chunk_program(L, C, rows_per_chunk, n_chunks, BLOCK_C)
    base = x_ptr + n.to(tl.int64) * L * C
    count = tl.sum(tl.zeros([BLOCK_R], dtype=tl.float32), axis=0)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r in range(first, end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        r_ok = rows < end
        ok = r_ok[:, None] & c_ok[None, :]
        x = tl.load(base + rows[:, None].to(tl.int64) * C + c[None, :], mask=ok, other=0.0)
        x = x.to(tl.float32)
        n_block = tl.sum(r_ok.to(tl.float32), axis=0)
        block_mean = tl.sum(x, axis=0) / n_block
        dev = tl.where(ok, x - block_mean[None, :], 0.0)
        total = count + n_block
        delta = block_mean - mean
        mean += delta * (n_block / total)
        m2 += tl.sum(dev * dev, axis=0) + delta * delta * (count * n_block / total)
        count = total
    out = (n * n_chunks + k).to(tl.int64) * C + c
    tl.store(mean_ptr + out, mean, mask=c_ok)
    tl.store(m2_ptr + out, m2, mask=c_ok)


@triton.jit
def _finalize_stats_kernel(mean_ptr, m2_ptr, w_ptr, b_ptr, gmean_ptr, grstd_ptr, scale_ptr, shift_ptr,
                           L, C, G, CG, rows_per_chunk, n_chunks, eps,
                           BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr):
    # one program: one (sample, group), its channels BLOCK_CG at a time: the mean, then the
    # sum of squared deviations around it, then each channel's affine map
    pid = tl.program_id(0)
    n, g = pid // G, pid % G
    total = (L * CG) * 1.0
    weighted = tl.sum(tl.zeros([BLOCK_CG], dtype=tl.float32), axis=0)
    for j0 in range(0, CG, BLOCK_CG):
        k, c, j_ok, ok, at = _group_tile(n, g, j0, C, CG, n_chunks, BLOCK_K, BLOCK_CG)
        counts = tl.minimum(tl.maximum(L - k * rows_per_chunk, 0), rows_per_chunk).to(tl.float32)
        means = tl.load(mean_ptr + at, mask=ok, other=0.0)
        weighted += tl.sum(tl.sum(means * counts[:, None], axis=1), axis=0)
    mean = weighted / total
    m2 = tl.sum(tl.zeros([BLOCK_CG], dtype=tl.float32), axis=0)
    for j0 in range(0, CG, BLOCK_CG):
        k, c, j_ok, ok, at = _group_tile(n, g, j0, C, CG, n_chunks, BLOCK_K, BLOCK_CG)
        counts = tl.minimum(tl.maximum(L - k * rows_per_chunk, 0), rows_per_chunk).to(tl.float32)
        dev = tl.load(mean_ptr + at, mask=ok, other=0.0) - mean
        m2s = tl.load(m2_ptr + at, mask=ok, other=0.0)
        m2 += tl.sum(tl.sum(tl.where(ok, m2s + counts[:, None] * dev * dev, 0.0), axis=1), axis=0)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)
    tl.store(gmean_ptr + pid, mean)
    tl.store(grstd_ptr + pid, rstd)
    for j0 in range(0, CG, BLOCK_CG):
        k, c, j_ok, ok, at = _group_tile(n, g, j0, C, CG, n_chunks, BLOCK_K, BLOCK_CG)
        w = tl.load(w_ptr + c, mask=j_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=j_ok, other=0.0).to(tl.float32)
        scale = rstd * w
        tl.store(scale_ptr + n.to(tl.int64) * C + c, scale, mask=j_ok)
        tl.store(shift_ptr + n.to(tl.int64) * C + c, b - mean * scale, mask=j_ok)


@triton.jit
def _apply_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, L, C, SILU: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # one program: BLOCK_R rows x BLOCK_C channels of one sample
    n, c, c_ok, ok, at = _tile_program(L, C, BLOCK_R, BLOCK_C)
    x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + n * C + c, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + n * C + c, mask=c_ok, other=0.0)
    z = x * scale[None, :] + shift[None, :]
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(y_ptr + at, z.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_partials_kernel(x_ptr, dy_ptr, scale_ptr, shift_ptr, gmean_ptr, grstd_ptr, p1_ptr, p2_ptr,
                          L, C, G, CG, rows_per_chunk, n_chunks, SILU: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # one program: one chunk of one sample's rows x BLOCK_C channels
    n, k, c, c_ok, first, end = _chunk_program(L, C, rows_per_chunk, n_chunks, BLOCK_C)
    base = n.to(tl.int64) * L * C
    scale = tl.load(scale_ptr + n.to(tl.int64) * C + c, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + n.to(tl.int64) * C + c, mask=c_ok, other=0.0)
    group = n * G + c // CG
    mean = tl.load(gmean_ptr + group, mask=c_ok, other=0.0)
    rstd = tl.load(grstd_ptr + group, mask=c_ok, other=0.0)
    s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r in range(first, end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        ok = (rows < end)[:, None] & c_ok[None, :]
        at = base + rows[:, None].to(tl.int64) * C + c[None, :]
        x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(tl.float32)
        dz = _silu_grad(dy, x * scale[None, :] + shift[None, :], SILU)  # 0 where masked (dy = 0)
        s1 += tl.sum(dz, axis=0)
        s2 += tl.sum(dz * ((x - mean[None, :]) * rstd[None, :]), axis=0)
    out = (n * n_chunks + k).to(tl.int64) * C + c
    tl.store(p1_ptr + out, s1, mask=c_ok)
    tl.store(p2_ptr + out, s2, mask=c_ok)


@triton.jit
def _finalize_grad_kernel(p1_ptr, p2_ptr, w_ptr, gmean_ptr, grstd_ptr, t1_ptr, t2_ptr, beta_ptr, gamma_ptr,
                          L, C, G, CG, n_chunks, BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr):
    # one program: one (sample, group), its channels BLOCK_CG at a time
    pid = tl.program_id(0)
    n, g = pid // G, pid % G
    a = tl.sum(tl.zeros([BLOCK_CG], dtype=tl.float32), axis=0)
    b = tl.sum(tl.zeros([BLOCK_CG], dtype=tl.float32), axis=0)
    for j0 in range(0, CG, BLOCK_CG):
        k, c, j_ok, ok, at = _group_tile(n, g, j0, C, CG, n_chunks, BLOCK_K, BLOCK_CG)
        t1 = tl.sum(tl.load(p1_ptr + at, mask=ok, other=0.0), axis=0)   # per channel: sum dz
        t2 = tl.sum(tl.load(p2_ptr + at, mask=ok, other=0.0), axis=0)   # sum dz * xhat
        tl.store(t1_ptr + n.to(tl.int64) * C + c, t1, mask=j_ok)
        tl.store(t2_ptr + n.to(tl.int64) * C + c, t2, mask=j_ok)
        w = tl.load(w_ptr + c, mask=j_ok, other=0.0).to(tl.float32)
        a += tl.sum(t1 * w, axis=0)
        b += tl.sum(t2 * w, axis=0)
    mean = tl.load(gmean_ptr + pid)
    rstd = tl.load(grstd_ptr + pid)
    inv_m = 1.0 / ((L * CG) * 1.0)
    tl.store(beta_ptr + pid, -rstd * rstd * b * inv_m)
    tl.store(gamma_ptr + pid, rstd * (mean * rstd * b - a) * inv_m)


@triton.jit
def _grad_input_kernel(x_ptr, dy_ptr, dx_ptr, scale_ptr, shift_ptr, beta_ptr, gamma_ptr, L, C, G, CG,
                       SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # one program: BLOCK_R rows x BLOCK_C channels of one sample
    n, c, c_ok, ok, at = _tile_program(L, C, BLOCK_R, BLOCK_C)
    x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + n * C + c, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + n * C + c, mask=c_ok, other=0.0)
    group = n * G + c // CG
    beta = tl.load(beta_ptr + group, mask=c_ok, other=0.0)
    gamma = tl.load(gamma_ptr + group, mask=c_ok, other=0.0)
    dz = _silu_grad(dy, x * scale[None, :] + shift[None, :], SILU)
    dx = dz * scale[None, :] + x * beta[None, :] + gamma[None, :]
    tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=ok)


# -- launchers ---------------------------------------------------------------------------------
def _chunking(L: int) -> tuple[int, int]:
    """(rows per statistics chunk, number of chunks) for L rows per sample."""
    rows = max(ROWS, triton.cdiv(triton.cdiv(L, MAX_CHUNKS), BLOCK_R) * BLOCK_R)
    return rows, triton.cdiv(L, rows)


def _small_blocks(n_chunks: int, cg: int) -> dict:
    return dict(BLOCK_K=triton.next_power_of_2(n_chunks),
                BLOCK_CG=min(GROUP_BLOCK, triton.next_power_of_2(cg)))


@torch.library.custom_op("emu2::group_norm_rows_fwd", mutates_args=())
def _group_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                    silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, L, C) contiguous -> (y like x, mean (N, G), rstd (N, G), scale (N, C), shift (N, C));
    the statistics and the per-channel affine maps in fp32."""
    N, L, C = x.shape
    cg = C // groups
    rows, n_chunks = _chunking(L)
    f32 = dict(dtype=torch.float32, device=x.device)
    part_mean = torch.empty(N, n_chunks, C, **f32)
    part_m2 = torch.empty(N, n_chunks, C, **f32)
    mean, rstd = torch.empty(N, groups, **f32), torch.empty(N, groups, **f32)
    scale, shift = torch.empty(N, C, **f32), torch.empty(N, C, **f32)
    y = torch.empty_like(x)
    _stats_kernel[(N * n_chunks, triton.cdiv(C, BLOCK_C))](
        x, part_mean, part_m2, L, C, rows, n_chunks, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
        num_warps=NUM_WARPS)
    _finalize_stats_kernel[(N * groups,)](
        part_mean, part_m2, weight, bias, mean, rstd, scale, shift, L, C, groups, cg, rows, n_chunks,
        eps, **_small_blocks(n_chunks, cg), num_warps=NUM_WARPS)
    _apply_kernel[(triton.cdiv(L, BLOCK_R), triton.cdiv(C, BLOCK_C), N)](
        x, y, scale, shift, L, C, SILU=silu, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    return y, mean, rstd, scale, shift


@_group_norm_fwd.register_fake
def _(x, weight, bias, groups, eps, silu):
    N, _, C = x.shape
    stat = dict(dtype=torch.float32, device=x.device)
    return (torch.empty_like(x), x.new_empty(N, groups, **stat), x.new_empty(N, groups, **stat),
            x.new_empty(N, C, **stat), x.new_empty(N, C, **stat))


@torch.library.custom_op("emu2::group_norm_rows_bwd", mutates_args=())
def _group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                    silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy, x (N, L, C) contiguous -> (dx like x, dweight, dbias like weight)."""
    N, L, C = x.shape
    groups = mean.shape[1]
    cg = C // groups
    rows, n_chunks = _chunking(L)
    f32 = dict(dtype=torch.float32, device=x.device)
    p1, p2 = torch.empty(N, n_chunks, C, **f32), torch.empty(N, n_chunks, C, **f32)
    sums = torch.empty(2, N, C, **f32)          # per sample and channel: sum dz, sum dz * xhat
    beta, gamma = torch.empty(N, groups, **f32), torch.empty(N, groups, **f32)
    dx = torch.empty_like(x)
    _grad_partials_kernel[(N * n_chunks, triton.cdiv(C, BLOCK_C))](
        x, dy, scale, shift, mean, rstd, p1, p2, L, C, groups, cg, rows, n_chunks, SILU=silu,
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    _finalize_grad_kernel[(N * groups,)](
        p1, p2, weight, mean, rstd, sums[0], sums[1], beta, gamma, L, C, groups, cg, n_chunks,
        **_small_blocks(n_chunks, cg), num_warps=NUM_WARPS)
    _grad_input_kernel[(triton.cdiv(L, BLOCK_R), triton.cdiv(C, BLOCK_C), N)](
        x, dy, dx, scale, shift, beta, gamma, L, C, groups, cg, SILU=silu, BLOCK_R=BLOCK_R,
        BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    dbias, dweight = (s.sum(0).to(weight.dtype) for s in sums)  # separate tensors: no aliasing
    return dx, dweight, dbias


@_group_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, scale, shift, silu):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


class GroupNormRows(torch.autograd.Function):
    """GroupNorm (+ SiLU) of contiguous (N, L, C) rows; the op (`ops.group_norm`) makes the
    views. Saves x and the (N, G)/(N, C) statistics; SiLU's input is recomputed in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, silu):
        y, mean, rstd, scale, shift = torch.ops.emu2.group_norm_rows_fwd(x, weight, bias, groups, eps, silu)
        ctx.save_for_backward(x, weight, mean, rstd, scale, shift)
        ctx.silu = silu
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd, scale, shift = ctx.saved_tensors
        dx, dweight, dbias = torch.ops.emu2.group_norm_rows_bwd(
            dy.contiguous(), x, weight, mean, rstd, scale, shift, ctx.silu)
        return dx, dweight, dbias, None, None, None
