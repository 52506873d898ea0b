"""`pool_project`: average-pool a square patch grid to n_query tokens, then project.

Emu2's projector views the 1024 patch features of an image (CLS dropped) as a 32x32 grid,
average-pools it with kernel = stride = 32 / sqrt(n_query), and applies `project_up`
(EMU2_FACTS.md). The pooled features (before the projection) are also the image-regression
targets, so the model asks for them separately through `pool_patches`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from emu2_engine.ops.backend import use_triton


def pool_patches(x: torch.Tensor, n_query: int) -> torch.Tensor:
    """(N, P, C) patch features, P a square -> (N, n_query, C) window means, row-major."""
    if x.dim() != 3:
        raise ValueError(f"pool_patches expects (N, P, C) patch features, got shape {tuple(x.shape)}")
    N, P, C = x.shape
    grid, side = math.isqrt(P), math.isqrt(n_query)
    if grid * grid != P:
        raise ValueError(f"the number of patches ({P}) must be a square grid")
    if side * side != n_query or side == 0 or grid % side:
        raise ValueError(f"n_query ({n_query}) must be a square whose side divides the grid side ({grid})")
    k = grid // side
    if k == 1:
        return x
    img = x.transpose(1, 2).reshape(N, C, grid, grid)
    pooled = F.avg_pool2d(img, kernel_size=k, stride=k)
    return pooled.flatten(2).transpose(1, 2)


def pool_project_reference(x: torch.Tensor, weight: torch.Tensor, n_query: int) -> torch.Tensor:
    """Pool, then the bias-free linear map: (N, P, C), (H, C) -> (N, n_query, H)."""
    return F.linear(pool_patches(x, n_query), weight)


def pool_project(x: torch.Tensor, weight: torch.Tensor, n_query: int) -> torch.Tensor:
    """Average-pool the patch grid to n_query tokens and apply `weight` (H, C)."""
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"pool_project weight must be (H, {x.shape[-1]}), got {tuple(weight.shape)}")
    use_triton("pool_project", x, has_kernel=False)
    return pool_project_reference(x, weight, n_query)
