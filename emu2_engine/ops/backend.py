"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

``EMU2_KERNELS`` (default ``auto``) is a comma-separated list. Each entry is either a choice for
every op, ``auto``, ``triton`` or ``reference``, or a choice for one op, ``op=choice``; a per-op
entry wins over the global one, whatever the order. Examples::

    EMU2_KERNELS=reference                                  # PyTorch everywhere
    EMU2_KERNELS=auto,spatiotemporal_conv=reference         # A/B one op inside a whole model
    EMU2_KERNELS=dense_attention=triton                     # the Triton kernel for unmasked attention

``auto`` runs an op's Triton kernel on CUDA tensors and the reference elsewhere, except for the
ops in `_LIBRARY_FIRST`, whose reference calls a fused library kernel that auto prefers on
every device; ``triton`` forces the kernel (on the CPU that needs TRITON_INTERPRET=1);
``reference`` forces PyTorch. An op whose kernel has not been written yet runs the reference
under auto and refuses ``triton`` with a clear error.
"""

from __future__ import annotations

import os

import torch

_CHOICES = ("auto", "triton", "reference")

OPS = ("modality_attention", "dense_attention", "emu2_head_loss", "pool_project", "spatiotemporal_conv",
       "group_norm")
"""The op names an ``op=choice`` entry may name."""

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether Triton runs kernels in its interpreter: read at import, as the kernels' modules and
Triton itself do (setting it later changes nothing)."""

_LIBRARY_FIRST = frozenset({"dense_attention"})
"""Ops whose reference is itself a fused library kernel, which ``auto`` picks on CUDA too.
``dense_attention`` is attention with no mask but causality (the ViT, the UNets): its reference
is SDPA, which runs FlashAttention / cuDNN attention on the GPU; the Triton kernel's tile map
has nothing to skip there, and on the H200 the video UNet with it (and with the Triton conv:
the run changed both ops at once) ran at 0.61x the reference path (docs/decoders.md); the
attention benchmark's dense cases are the direct A/B, not yet run on a GPU.
``dense_attention=triton`` selects the kernel for comparison."""


def requested_backends() -> tuple[str, dict[str, str]]:
    """The global choice and the per-op choices in EMU2_KERNELS, checked."""
    raw = os.environ.get("EMU2_KERNELS", "auto").strip().lower()
    glob, per_op = "auto", {}
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        op, sep, choice = entry.partition("=")
        op, choice = op.strip(), choice.strip()
        if not sep:
            op, choice = "", op
        if choice not in _CHOICES:
            raise ValueError(f"EMU2_KERNELS must be one of {_CHOICES} or a comma-separated list of "
                             f"them and op=choice entries, got {raw!r} (bad choice {choice!r})")
        if not op:
            glob = choice
        elif op in OPS:
            per_op[op] = choice
        else:
            raise ValueError(f"EMU2_KERNELS names op {op!r}, which is not one of {OPS}")
    return glob, per_op


def requested_backend(op: str | None = None) -> str:
    """The choice that applies to `op` (the global one when `op` is None or not named)."""
    glob, per_op = requested_backends()
    return per_op.get(op, glob) if op is not None else glob


def use_triton(op: str, x: torch.Tensor, has_kernel: bool) -> bool:
    """Whether `op` should run its Triton kernel on input `x`."""
    want = requested_backend(op)
    if want == "reference":
        return False
    if want == "triton":
        if not has_kernel:
            raise NotImplementedError(f"EMU2_KERNELS asks for triton, but {op} has no Triton kernel yet; "
                                      f"use auto or reference for it")
        if not x.is_cuda and not _INTERPRET:
            raise RuntimeError(f"EMU2_KERNELS asks for triton for {op}, but its input is on the "
                               f"{x.device.type}: set TRITON_INTERPRET=1 before importing emu2_engine "
                               f"to run the Triton kernels in the interpreter, or use auto or reference")
        return True
    return has_kernel and x.is_cuda and op not in _LIBRARY_FIRST


def check_triton_can_run(device: torch.device) -> None:
    """Refuse, before a run builds anything, EMU2_KERNELS entries that force the Triton kernels
    on a device where they cannot run: the CPU without TRITON_INTERPRET=1 (`use_triton` would
    raise only at the first forward)."""
    if device.type == "cuda" or _INTERPRET:
        return
    glob, per_op = requested_backends()
    forced = [op for op in OPS if per_op.get(op, glob) == "triton"]
    if forced:
        raise ValueError(f"EMU2_KERNELS forces the Triton kernels of {', '.join(forced)}, but this run is on "
                         f"the {device.type}: set TRITON_INTERPRET=1 to run them in the interpreter, or use "
                         f"auto or reference")


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
