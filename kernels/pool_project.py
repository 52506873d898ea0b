"""`pool_project`: average pooling of a square patch grid (Triton), then the projection GEMM
(cuBLAS through torch).

What it computes (`reference` below; the op is `emu2_engine.ops.pool_project`):
x (N, P, C) patch features, P = grid^2, viewed as an image of grid x grid; windows of
k x k patches (k = grid / side, n_query = side^2), averaged -> pooled (N, n_query, C), then
out = pooled @ weight.T (N, n_query, H).

Why two steps and not one fused GEMM. The first version formed the pooled rows in the
prologue of a Triton GEMM. Every column of output tiles then re-read x: at Emu2's size
(256 images x 1024 patches x 1792 -> 64 x 6656) that is 26-52 passes over 0.94 GB, and on an
H200 it ran 11x slower than eager PyTorch (15.6 ms against 1.41 ms, gpu-quick, 2026-11-27).
Pooling is bandwidth-bound and shrinks x k^2-fold; the GEMM after it is small and cuBLAS runs
it near peak. So:

- forward: `_pool_kernel` reads x once and writes pooled (1/k^2 of x); out = pooled @ W.T
  (cuBLAS). pooled is the one activation saved for backward and the image-regression target
  the model needs, so it comes back too.
- backward: dpooled = dout @ W and dW = dout.T @ pooled (cuBLAS); `_unpool_kernel` writes
  dpooled / k^2 to each of the k^2 patch rows of its window (the windows tile the grid, so
  every element of dx is written exactly once).

Floor at Emu2's size on an H100 (bf16): reading x (0.94 GB) at 3.35 TB/s is 0.28 ms, the GEMM
(0.39 TFLOP) at 989 TFLOP/s is 0.40 ms; see docs/kernels/pool_project.md for the measurements.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes the kernels take."""

# Channels per program: 512 bf16 channels are 1 KB per patch row, k^2 = 16 rows per window
# in flight per program. The interpreter gets a narrow block so awkward widths are masked.
BLOCK_C = 32 if _INTERPRET else 512
NUM_WARPS = 4


def reference(x: torch.Tensor, weight: torch.Tensor, n_query: int):
    """(out, pooled) by PyTorch: the definition the kernels are tested against."""
    from emu2_engine.ops.pool_project import pool_patches

    pooled = pool_patches(x, n_query)
    return torch.nn.functional.linear(pooled, weight), pooled


# -- kernels -----------------------------------------------------------------------------------
@triton.jit
def _window_start(row, n_query, GRID, SIDE, WINDOW):
    """The flat patch row (image * P + patch) of the top-left patch of pooled row `row`."""
    q = row % n_query
    return ((row // n_query) * (GRID * GRID) + (q // SIDE) * (WINDOW * GRID)
            + (q % SIDE) * WINDOW).to(tl.int64)


@triton.jit
def _pool_kernel(x_ptr, pooled_ptr, C, GRID, SIDE, WINDOW, n_query, inv_area,
                 BLOCK_C: tl.constexpr):
    # one program: one pooled row (image, query) x BLOCK_C channels
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = c < C
    first = _window_start(row, n_query, GRID, SIDE, WINDOW)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j in range(0, WINDOW * WINDOW):
        patch = first + (j // WINDOW) * GRID + j % WINDOW
        acc += tl.load(x_ptr + patch * C + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(pooled_ptr + row.to(tl.int64) * C + c, (acc * inv_area).to(pooled_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _unpool_kernel(dpooled_ptr, dx_ptr, C, GRID, SIDE, WINDOW, n_query, inv_area,
                   BLOCK_C: tl.constexpr):
    # one program: spreads one pooled row's gradient / k^2 over the k^2 patches of its window
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = c < C
    g = tl.load(dpooled_ptr + row.to(tl.int64) * C + c, mask=ok, other=0.0).to(tl.float32)
    g = (g * inv_area).to(dx_ptr.dtype.element_ty)
    first = _window_start(row, n_query, GRID, SIDE, WINDOW)
    for j in range(0, WINDOW * WINDOW):
        patch = first + (j // WINDOW) * GRID + j % WINDOW
        tl.store(dx_ptr + patch * C + c, g, mask=ok)


# -- launchers ---------------------------------------------------------------------------------
def _sizes(P: int, n_query: int) -> tuple[int, int, int]:
    grid = int(round(P ** 0.5))
    side = int(round(n_query ** 0.5))
    return grid, side, grid // side


def _launch(kernel, src: torch.Tensor, n_query: int, n_patches: int, rows_out: int) -> torch.Tensor:
    """Run `kernel` (one program per pooled row and BLOCK_C channels) from `src` into a new
    (N, rows_out, C) tensor: the pool (rows_out = n_query) or the unpool (rows_out = P)."""
    N, C = src.shape[0], src.shape[2]
    grid, side, window = _sizes(n_patches, n_query)
    out = src.new_empty(N, rows_out, C)
    if N * n_query and C:
        kernel[(N * n_query, triton.cdiv(C, BLOCK_C))](
            src, out, C, grid, side, window, n_query, 1.0 / window ** 2,
            BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    return out


@torch.library.custom_op("emu2::pool_patches_fwd", mutates_args=())
def _pool_patches_fwd(x: torch.Tensor, n_query: int) -> torch.Tensor:
    """x (N, P, C) contiguous -> pooled (N, n_query, C), window means in fp32, stored in x's dtype."""
    return _launch(_pool_kernel, x, n_query, x.shape[1], n_query)


@_pool_patches_fwd.register_fake
def _(x, n_query):
    return x.new_empty(x.shape[0], n_query, x.shape[2])


@torch.library.custom_op("emu2::pool_patches_bwd", mutates_args=())
def _pool_patches_bwd(dpooled: torch.Tensor, n_patches: int) -> torch.Tensor:
    """dpooled (N, n_query, C) contiguous -> dx (N, n_patches, C)."""
    return _launch(_unpool_kernel, dpooled, dpooled.shape[1], n_patches, n_patches)


@_pool_patches_bwd.register_fake
def _(dpooled, n_patches):
    return dpooled.new_empty(dpooled.shape[0], n_patches, dpooled.shape[2])


class PoolProject(torch.autograd.Function):
    """(out, pooled); pooled (the saved activation) is returned without gradient.

    The GEMMs are torch matrix products, so FlopCounterMode counts them itself; the pooling
    adds are not counted (see `models/flops.projector_flops_per_image`)."""

    @staticmethod
    def forward(ctx, x, weight, n_query):
        pooled = torch.ops.emu2.pool_patches_fwd(x, n_query)
        out = torch.matmul(pooled, weight.t())
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
            dpooled = torch.matmul(grad_out, weight)
            dx = torch.ops.emu2.pool_patches_bwd(dpooled, ctx.n_patches)
        if ctx.needs_input_grad[1]:
            dw = torch.mm(grad_out.reshape(-1, grad_out.shape[-1]).t(),
                          pooled.reshape(-1, pooled.shape[-1]))
        return dx, dw, None
