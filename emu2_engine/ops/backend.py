"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

`EMU2_KERNELS=auto|triton|reference` (default auto). auto runs Triton on CUDA tensors and the
reference elsewhere; triton forces the kernel (on the CPU that needs TRITON_INTERPRET=1);
reference forces PyTorch. An op whose kernel has not been written yet runs the reference
under auto and refuses `triton` with a clear error.
"""

from __future__ import annotations

import os

import torch

_CHOICES = ("auto", "triton", "reference")


def requested_backend() -> str:
    """The value of EMU2_KERNELS, checked."""
    value = os.environ.get("EMU2_KERNELS", "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"EMU2_KERNELS must be one of {_CHOICES}, got {value!r}")
    return value


def use_triton(op: str, x: torch.Tensor, has_kernel: bool) -> bool:
    """Whether `op` should run its Triton kernel on input `x`."""
    want = requested_backend()
    if want == "reference":
        return False
    if want == "triton":
        if not has_kernel:
            raise NotImplementedError(f"EMU2_KERNELS=triton, but {op} has no Triton kernel yet; "
                                      f"use EMU2_KERNELS=auto or reference")
        return True
    return has_kernel and x.is_cuda


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matrix products in on `x`'s device, or None when it is off.

    The fused ops are custom ops, which autocast does not cast: under autocast their wrappers
    cast the floating inputs to this dtype themselves and run with autocast off, as F.linear
    would have run (and so the Triton kernels get the bf16 inputs their tensor-core paths need).
    """
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None
