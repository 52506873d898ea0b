"""`pool_project`: average-pool a square patch grid to n_query tokens, then project.

Emu2's projector views the 1024 patch features of an image (CLS dropped) as a 32x32 grid,
average-pools it with kernel = stride = 32 / sqrt(n_query), and applies `project_up`
(EMU2_FACTS.md). The pooled features (before the projection) are also the image-regression
targets: `pool_project(..., return_pooled=True)` returns them too, detached. The fused kernel
(`emu2_engine.kernels.pool_project`) saves exactly that tensor for its backward, so the model
gets its targets without pooling twice; the reference path returns the tensor autograd keeps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from emu2_engine.kernels import pool_project as _kernel
from emu2_engine.ops.backend import autocast_dtype, requested_backend, use_triton


def _window(P: int, n_query: int) -> int:
    """The pooling window side for P patches pooled to n_query tokens, checked."""
    grid, side = math.isqrt(P), math.isqrt(n_query)
    if grid * grid != P:
        raise ValueError(f"the number of patches ({P}) must be a square grid")
    if side * side != n_query or side == 0 or grid % side:
        raise ValueError(f"n_query ({n_query}) must be a square whose side divides the grid side ({grid})")
    return grid // side


def pool_patches(x: torch.Tensor, n_query: int) -> torch.Tensor:
    """(N, P, C) patch features, P a square -> (N, n_query, C) window means, row-major."""
    if x.dim() != 3:
        raise ValueError(f"pool_patches expects (N, P, C) patch features, got shape {tuple(x.shape)}")
    N, P, C = x.shape
    k = _window(P, n_query)
    if k == 1:
        return x
    grid = math.isqrt(P)
    img = x.transpose(1, 2).reshape(N, C, grid, grid)
    pooled = F.avg_pool2d(img, kernel_size=k, stride=k)
    return pooled.flatten(2).transpose(1, 2)


def pool_project_reference(x: torch.Tensor, weight: torch.Tensor, n_query: int) -> torch.Tensor:
    """Pool, then the bias-free linear map: (N, P, C), (H, C) -> (N, n_query, H)."""
    return F.linear(pool_patches(x, n_query), weight)


def pool_project(x: torch.Tensor, weight: torch.Tensor, n_query: int, *,
                 return_pooled: bool = False):
    """Average-pool the patch grid to n_query tokens and apply `weight` (H, C).

    Returns (N, n_query, H), or with return_pooled the pair (projected, pooled) where pooled
    (N, n_query, C) is detached."""
    dtype = autocast_dtype(x)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            return pool_project(x.to(dtype), weight.to(dtype), n_query, return_pooled=return_pooled)
    if x.dim() != 3:
        raise ValueError(f"pool_project expects (N, P, C) patch features, got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"pool_project weight must be (H, {x.shape[-1]}), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"pool_project weight is {weight.dtype} on {weight.device} but x is "
                         f"{x.dtype} on {x.device}")
    _window(x.shape[1], n_query)
    use_kernel = use_triton("pool_project", x, has_kernel=True)
    if use_kernel and x.dtype not in _kernel.DTYPES:
        if requested_backend("pool_project") == "triton":
            raise ValueError(f"the Triton pool_project runs in {_kernel.DTYPES}, got {x.dtype}")
        use_kernel = False  # auto: the reference handles any dtype
    if use_kernel:
        out, pooled = _kernel.PoolProject.apply(x.contiguous(), weight.contiguous(), n_query)
    else:
        pooled = pool_patches(x, n_query)
        out = F.linear(pooled, weight)
        pooled = pooled.detach()
    return (out, pooled) if return_pooled else out
