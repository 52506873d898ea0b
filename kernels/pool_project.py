"""`pool_project`: average pooling of a square patch grid fused into the projection GEMM.

What it computes (`reference` below; the op is `emu2_engine.ops.pool_project`):
x (N, P, C) patch features, P = grid^2, viewed as an image of grid x grid; windows of
k x k patches (k = grid / side, n_query = side^2), averaged -> pooled (N, n_query, C), then
out = pooled @ weight.T (N, n_query, H).

Forward (`_pool_project_fwd_kernel`): a GEMM over M = N * n_query pooled rows whose A-operand
tile is formed in the prologue: for each BLOCK_K slice of channels the k^2 patch rows of every
pooled row are loaded and averaged in fp32, rounded to x's dtype (as the unfused pool would
store it), and fed to `tl.dot`. The programs of the first column of output tiles also store
that tile of pooled rows: the only activation saved for backward, and the image-regression
target the model needs, for one extra write of 1/k^2 of x.
Backward: dW = dout.T @ pooled (cuBLAS); dx (`_pool_project_bwd_input_kernel`): a GEMM
dpooled = dout @ W whose epilogue writes dpooled / k^2 to each of the k^2 patch rows of its
window (the windows tile the grid, so every element of dx is written exactly once).

Cost model (why this may or may not reach the HBM roofline; measured only on a GPU): every
column of output tiles re-forms its pooled rows, so x is read H / BLOCK_N times, from L2 if the
programs sharing a row of tiles run together (programs are ordered output-column fastest for
that reason). At Emu2's 256 x 1024 x 1792 -> 64 x 6656 that is 26-52 passes over a 0.94 GB input
through L2. `benchmarks/pool_project.py` times it against eager and against a pool-then-GEMM
baseline so a GPU session can tell.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes the kernels take (tl.dot has no fp64 path)."""


def reference(x: torch.Tensor, weight: torch.Tensor, n_query: int):
    """(out, pooled) by PyTorch: the definition the kernels are tested against."""
    from emu2_engine.ops.pool_project import pool_patches

    pooled = pool_patches(x, n_query)
    return torch.nn.functional.linear(pooled, weight), pooled


# -- tuning ---------------------------------------------------------------------------------------
def _config(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps,
                         num_stages=stages)


# H100 candidates: 128-row tiles keep the tensor cores busy; wide BLOCK_N cuts the number of
# times the window rows are re-formed (see the cost model above); BLOCK_K = 32-64 keeps the
# k^2 prologue loads of a stage in registers. The first is the untuned default (72 KB of
# shared memory at 16 bits, 64 accumulator registers per thread). The interpreter gets one.
_GPU_CONFIGS = [
    _config(128, 128, 32, 8, 3), _config(128, 256, 32, 8, 3), _config(64, 256, 32, 8, 3),
    _config(128, 128, 64, 8, 3), _config(64, 128, 32, 4, 4), _config(64, 64, 64, 4, 3),
]
_CONFIGS = [_config(32, 32, 32, 4, 1)] if _INTERPRET else _GPU_CONFIGS
# Autotune on a GPU (per shape: the first call of a shape pays ~6 compilations per kernel).
# Off: the first config the prune keeps (GPU tests and the gpu-quick benchmark).
AUTOTUNE = True


def _prune(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (a tile may exceed it by less than 2x)."""
    m = triton.next_power_of_2(named_args["M"])
    n = triton.next_power_of_2(named_args["N_OUT"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, m) and c.kwargs["BLOCK_N"] <= max(64, n)]
    return kept or configs[-1:]




# -- kernels -----------------------------------------------------------------------------------
@triton.jit
def _pool_project_fwd_kernel(x_ptr, w_ptr, out_ptr, pooled_ptr, M, N_OUT, K_IN, GRID, SIDE,
                             WINDOW, n_query, inv_area,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             IEEE: tl.constexpr):
    # M pooled rows, N_OUT = H output features, K_IN = C channels.
    pid = tl.program_id(0)
    tiles_n = (N_OUT + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // tiles_n  # output-column fastest: neighbours share the same patch rows
    pid_n = pid % tiles_n
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N_OUT
    # flat row (image * P + patch) of the top-left patch of each pooled row's window
    q = m % n_query
    first = ((m // n_query) * (GRID * GRID) + (q // SIDE) * (WINDOW * GRID)
             + (q % SIDE) * WINDOW).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K_IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = m_ok[:, None] & (k[None, :] < K_IN)
        a = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for j in range(0, WINDOW * WINDOW):
            row = first + (j // WINDOW) * GRID + j % WINDOW
            a += tl.load(x_ptr + row[:, None] * K_IN + k[None, :], mask=mk, other=0.0).to(tl.float32)
        a = (a * inv_area).to(x_ptr.dtype.element_ty)
        if pid_n == 0:
            tl.store(pooled_ptr + m.to(tl.int64)[:, None] * K_IN + k[None, :], a, mask=mk)
        b = tl.load(w_ptr + n.to(tl.int64)[None, :] * K_IN + k[:, None],
                    mask=(k[:, None] < K_IN) & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    tl.store(out_ptr + m.to(tl.int64)[:, None] * N_OUT + n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _pool_project_bwd_input_kernel(dout_ptr, w_ptr, dx_ptr, M, N_OUT, K_IN, GRID, SIDE, WINDOW,
                                   n_query, inv_area,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    # dpooled (M x N_OUT = C) = dout (M x K_IN = H) @ W (H x C), spread over each window.
    pid = tl.program_id(0)
    tiles_n = (N_OUT + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    c_ok = c < N_OUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K_IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(dout_ptr + m.to(tl.int64)[:, None] * K_IN + k[None, :],
                    mask=m_ok[:, None] & (k[None, :] < K_IN), other=0.0)
        b = tl.load(w_ptr + k.to(tl.int64)[:, None] * N_OUT + c[None, :],
                    mask=(k[:, None] < K_IN) & c_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    g = (acc * inv_area).to(dx_ptr.dtype.element_ty)
    q = m % n_query  # the window's top-left patch, as in the forward kernel
    first = ((m // n_query) * (GRID * GRID) + (q // SIDE) * (WINDOW * GRID)
             + (q % SIDE) * WINDOW).to(tl.int64)
    mc = m_ok[:, None] & c_ok[None, :]
    for j in range(0, WINDOW * WINDOW):
        row = first + (j // WINDOW) * GRID + j % WINDOW
        tl.store(dx_ptr + row[:, None] * N_OUT + c[None, :], g, mask=mc)


# -- launchers ---------------------------------------------------------------------------------
def _tuned(kernel):
    return triton.autotune(_CONFIGS, key=["M", "N_OUT", "K_IN", "WINDOW"],
                           prune_configs_by={"early_config_prune": _prune})(kernel)


_KERNELS = {"fwd": (_pool_project_fwd_kernel, _tuned(_pool_project_fwd_kernel)),
            "bwd_input": (_pool_project_bwd_input_kernel, _tuned(_pool_project_bwd_input_kernel))}


def _launch(kind: str, M: int, N_OUT: int, *args, **consts):
    """Launch `kind` autotuned, or with the first config the prune keeps."""
    kernel, tuned = _KERNELS[kind]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N_OUT, meta["BLOCK_N"]),)  # noqa: E731
    if AUTOTUNE and not _INTERPRET:
        tuned[grid](*args, **consts)
        return
    config = _prune(_CONFIGS, {"M": M, "N_OUT": N_OUT})[0]
    kernel[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps,
                 num_stages=config.num_stages)


def _sizes(P: int, n_query: int) -> tuple[int, int, int]:
    grid = int(round(P ** 0.5))
    side = int(round(n_query ** 0.5))
    return grid, side, grid // side


@torch.library.custom_op("emu2::pool_project_fwd", mutates_args=())
def _pool_project_fwd(x: torch.Tensor, weight: torch.Tensor,
                      n_query: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, P, C), weight (H, C), both contiguous -> (out (N, n_query, H), pooled (N, n_query, C))."""
    N, P, C = x.shape
    H = weight.shape[0]
    grid, side, window = _sizes(P, n_query)
    M = N * n_query
    out = x.new_empty(N, n_query, H)
    pooled = x.new_empty(N, n_query, C)
    if M:
        _launch("fwd", M, H, x, weight, out, pooled, M, H, C, grid, side, window, n_query,
                1.0 / window ** 2, IEEE=x.dtype == torch.float32)
    return out, pooled


@_pool_project_fwd.register_fake
def _(x, weight, n_query):
    return x.new_empty(x.shape[0], n_query, weight.shape[0]), x.new_empty(x.shape[0], n_query, x.shape[2])


@torch.library.custom_op("emu2::pool_project_bwd_input", mutates_args=())
def _pool_project_bwd_input(grad_out: torch.Tensor, weight: torch.Tensor,
                            n_patches: int) -> torch.Tensor:
    """grad_out (N, n_query, H) contiguous, weight (H, C) -> dx (N, n_patches, C)."""
    N, n_query, H = grad_out.shape
    C = weight.shape[1]
    grid, side, window = _sizes(n_patches, n_query)
    M = N * n_query
    dx = grad_out.new_empty(N, n_patches, C)
    if M:
        _launch("bwd_input", M, C, grad_out, weight, dx, M, C, H, grid, side, window, n_query,
                1.0 / window ** 2, IEEE=grad_out.dtype == torch.float32)
    return dx


@_pool_project_bwd_input.register_fake
def _(grad_out, weight, n_patches):
    return grad_out.new_empty(grad_out.shape[0], n_patches, weight.shape[1])


# The pooling adds are not counted (see `models/flops.projector_flops_per_image`).
@register_flop_formula(torch.ops.emu2.pool_project_fwd)
def _fwd_flops(x_shape, w_shape, n_query, *args, out_shape=None, **kwargs):
    return 2 * x_shape[0] * n_query * w_shape[0] * w_shape[1]


@register_flop_formula(torch.ops.emu2.pool_project_bwd_input)
def _bwd_input_flops(grad_shape, w_shape, n_patches, *args, out_shape=None, **kwargs):
    return 2 * grad_shape[0] * grad_shape[1] * w_shape[0] * w_shape[1]


class PoolProject(torch.autograd.Function):
    """(out, pooled); pooled (the saved activation) is returned without gradient."""

    @staticmethod
    def forward(ctx, x, weight, n_query):
        out, pooled = torch.ops.emu2.pool_project_fwd(x, weight, n_query)
        ctx.save_for_backward(pooled, weight)
        ctx.n_patches = x.shape[1]
        ctx.mark_non_differentiable(pooled)
        return out, pooled

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _):
        pooled, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.emu2.pool_project_bwd_input(grad_out, weight, ctx.n_patches)
        if ctx.needs_input_grad[1]:
            dw = torch.mm(grad_out.reshape(-1, grad_out.shape[-1]).t(),
                          pooled.reshape(-1, pooled.shape[-1]))
        return dx, dw, None
