"""`group_norm`: GroupNorm, optionally fused with the SiLU after it, that keeps channels-last
activations channels-last.

    y = F.group_norm(x, groups, weight, bias, eps), then F.silu(y) when `silu`

x is (N, C, *spatial). The UNets run channels-last (the layout of cuDNN's convolutions and of
`spatiotemporal_conv`), and PyTorch's CUDA GroupNorm copies such input to NCHW and returns NCHW;
the Triton kernel (`emu2_engine.kernels.group_norm`) reads the (N, spatial, C) rows in place
and writes its output in the same layout. Under `auto` it runs on CUDA inputs that are
channels-last (NCHW input goes to PyTorch, which reads it without a copy); `triton` forces it
(other layouts are copied first); `reference` is PyTorch.

Dtypes. The statistics are fp32 on every path. Under autocast PyTorch runs group_norm in fp32
and returns fp32; the kernel takes x as it comes and returns x's dtype (the convolution or
linear layer after it casts to the autocast dtype either way), so under autocast the two paths
differ by that one rounding of y.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from emu2_engine.kernels import group_norm as _kernel
from emu2_engine.ops.backend import requested_backend, use_triton


def check_group_norm_args(x: torch.Tensor, groups: int, weight: torch.Tensor | None,
                          bias: torch.Tensor | None) -> None:
    """Raise ValueError naming what is wrong with the input's shape or the affine parameters."""
    if x.dim() < 3:
        raise ValueError(f"group_norm expects x of shape (N, C, *spatial), got {tuple(x.shape)}")
    C = x.shape[1]
    if groups <= 0 or C % groups:
        raise ValueError(f"group_norm needs the {C} channels to split into {groups} equal groups")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"group_norm's {name} must be ({C},), got {tuple(t.shape)}")
        if t is not None and t.device != x.device:
            raise ValueError(f"group_norm's {name} is on {t.device} but x is on {x.device}")
        if t is not None and not t.is_floating_point():
            raise ValueError(f"group_norm's {name} must be a floating tensor, got {t.dtype}")


def group_norm_reference(x: torch.Tensor, groups: int, weight: torch.Tensor | None,
                         bias: torch.Tensor | None, eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """PyTorch's group_norm, then SiLU when asked; in x's dtype.

    Weight and bias in another dtype than x (fp32 parameters with half-precision activations,
    which the kernel takes) run in fp32, which PyTorch's CPU group_norm otherwise refuses. On
    the CPU a channels-last x is made contiguous first: PyTorch 2.13's CPU backward crashes
    the process (SIGSEGV) for a channels-last x that needs no gradient under affine
    parameters that do, under autograd (that case alone: the layout changes PyTorch's rounding,
    and channels-last inference keeps its layout)."""
    check_group_norm_args(x, groups, weight, bias)
    out_dtype = x.dtype
    if any(t is not None and t.dtype != x.dtype for t in (weight, bias)):
        x, weight, bias = (None if t is None else t.float() for t in (x, weight, bias))
    if (x.device.type == "cpu" and not x.is_contiguous() and not x.requires_grad and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (weight, bias))):
        x = x.contiguous()
    y = F.group_norm(x, groups, weight, bias, eps)
    return (F.silu(y) if silu else y).to(out_dtype)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether x (N, C, *spatial) lies in memory as contiguous (N, *spatial, C) rows."""
    return x.movedim(1, -1).is_contiguous()


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """GroupNorm of x (N, C, *spatial) over `groups` groups of channels, then SiLU when `silu`.
    The kernel path returns a tensor in x's channels-last layout and dtype."""
    check_group_norm_args(x, groups, weight, bias)
    use_kernel = use_triton("group_norm", x, has_kernel=True)
    forced = requested_backend("group_norm") == "triton"
    if use_kernel and x.dtype not in _kernel.DTYPES:
        if forced:
            raise ValueError(f"the Triton group_norm runs in {_kernel.DTYPES}, got {x.dtype}")
        use_kernel = False  # auto: the reference handles any dtype
    if use_kernel and not forced and not is_channels_last(x):
        use_kernel = False  # PyTorch reads NCHW in place
    if use_kernel and not forced and torch.compiler.is_compiling():
        # Inside a compiled graph Inductor generates the norm itself, on channels-last rows and
        # fused with what surrounds it, and was faster than the kernel on an H200 (bf16, with
        # SiLU, forward + backward: 0.72 against 1.08 ms at 16 x 320 x 64x64, 0.99 against
        # 1.04 ms at 16 x 640 x 32x32; benchmarks/results/h200-gpu-quick-2026-11-27-s6/run2).
        use_kernel = False
    if not use_kernel or x.numel() == 0:
        return group_norm_reference(x, groups, weight, bias, eps, silu)
    C = x.shape[1]
    weight = torch.ones(C, dtype=x.dtype, device=x.device) if weight is None else weight
    bias = torch.zeros(C, dtype=x.dtype, device=x.device) if bias is None else bias
    rows = x.movedim(1, -1).contiguous()                                 # (N, *spatial, C)
    with torch.autocast(x.device.type, enabled=False):
        y = _kernel.GroupNormRows.apply(rows.view(x.shape[0], -1, C), weight, bias, groups, eps, silu)
    return y.view(rows.shape).movedim(-1, 1)
