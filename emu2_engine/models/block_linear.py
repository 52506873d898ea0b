"""`BlockLinear`: the transformer blocks' linear layer, able to add its weight gradient straight
into an fp32 accumulator (Megatron-LM's gradient-accumulation fusion).

A `BlockLinear` is an `nn.Linear` (same parameters, same state-dict keys, same tensor-parallel
plans) with one more attribute, ``main_grad``: None (the default) or an fp32 tensor of the
weight's shape. With None it is exactly `nn.Linear`. With a tensor, the forward is the same
product, but the backward does not hand the weight gradient to autograd: it adds ``dy^T x``
into ``main_grad`` in fp32 (`wgrad_accumulate_`), and the weight's ``.grad`` stays None. The
bias gradient and the input gradient go to autograd as usual.

`train.weight_cast.StepWeightCast` with ``fused`` layers (``train.grad_accumulation_fusion``)
sets ``main_grad`` for the length of a step. Without the fusion, each micro-batch's weight
gradient is written in bf16 by the GEMM, read back and added into an fp32 accumulator by a
separate kernel: per block parameter and micro-batch 2 bytes written, then 2 + 4 read and 4
written. Fused, the GEMM reads and writes the fp32 accumulator in its epilogue (cuBLAS with
beta = 1 and an fp32 C, `aten::addmm.dtype_out`), so the bf16 gradient never exists. The sum
is also more exact: the micro-batches' gradients are not rounded to bf16 before they are added.

A CUDA build whose addmm refuses an fp32 accumulator next to bf16 operands adds the bf16
product in a second kernel, as the unfused step does (`accumulation_path` says which path runs;
the trainer warns). The CPU upcasts the operands.

Inside a cast step every backward through the layer adds into ``main_grad``, also one that asks
only for other gradients (``torch.autograd.grad(loss, x)``), as Megatron-LM's fusion does.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from emu2_engine.ops.backend import autocast_dtype


@functools.cache
def accumulation_path(device: torch.device, dtype: torch.dtype) -> str:
    """How `wgrad_accumulate_` adds a `dtype` (bf16/fp16) gradient into an fp32 accumulator on
    `device` (probed once, on small integer-valued tensors laid out as the backward passes them):

    - "addmm-fp32-epilogue": one GEMM, ``addmm(acc, dy^T, x, out_dtype=float32, out=acc)``, that
      reads and writes the fp32 accumulator (CUDA builds whose addmm takes an fp32 ``self`` next
      to 16-bit operands);
    - "product-then-add": a CUDA build without it gets the 16-bit product added in a second
      kernel, which is what the unfused step does (same traffic, same rounding: no gain, no loss);
    - "fp32-product-then-add": the CPU upcasts the operands (speed does not matter there; the
      sum is the fused GEMM's up to the order of additions).
    """
    if device.type != "cuda":
        return "fp32-product-then-add"
    acc = torch.arange(12, dtype=torch.float32, device=device).view(3, 4)
    dy = torch.tensor([[1, 2, 0], [0, 1, 3], [2, 0, 1], [1, 1, 1], [3, 0, 2]], device=device, dtype=dtype)
    x = torch.tensor([[1, 0, 2, 1], [0, 3, 1, 0], [2, 1, 0, 1], [1, 1, 1, 0], [0, 2, 0, 3]],
                     device=device, dtype=dtype)
    want = acc + dy.t().float() @ x.float()
    try:
        torch.addmm(acc, dy.t(), x, out_dtype=torch.float32, out=acc)
        if torch.equal(acc, want):
            return "addmm-fp32-epilogue"
    except (RuntimeError, TypeError, NotImplementedError):
        pass
    return "product-then-add"


_WRITTEN: set[int] = set()
"""The ids of the accumulators `wgrad_accumulate_` has added into. Their owner clears an entry
when it hands the accumulator out (`forget`) and reads it back while the accumulator is still
alive (`accumulated`), so a reused id cannot mislead it. The op's body runs at run time, in
eager and in compiled code alike."""


def accumulated(acc: torch.Tensor) -> bool:
    """Whether any backward added into `acc` since `forget(acc)`."""
    return id(acc) in _WRITTEN


def forget(acc: torch.Tensor) -> None:
    _WRITTEN.discard(id(acc))


@torch.library.custom_op("emu2::wgrad_accumulate_", mutates_args=("acc",))
def wgrad_accumulate_(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += dy^T @ x`` with fp32 accumulation; acc (out, in) fp32, dy (rows, out) and
    x (rows, in) in one dtype (`accumulation_path` says how, for 16-bit operands). Runs with
    autocast off: a step's backward runs inside the step's autocast, which would round the
    product to bf16."""
    _WRITTEN.add(id(acc))
    with torch.autocast(acc.device.type, enabled=False):
        if dy.dtype == torch.float32:
            acc.addmm_(dy.t(), x)
            return
        path = accumulation_path(acc.device, dy.dtype)
        if path == "addmm-fp32-epilogue":
            torch.addmm(acc, dy.t(), x, out_dtype=torch.float32, out=acc)
        elif path == "product-then-add":
            acc.add_(torch.mm(dy.t(), x))
        else:
            acc.add_(torch.mm(dy.t().float(), x.float()))


@wgrad_accumulate_.register_fake
def _(acc, dy, x) -> None:
    return None


class _AccumulatingLinear(torch.autograd.Function):
    """``F.linear(x, w, b)`` whose weight gradient is added into `acc` instead of going to
    autograd (the weight's gradient is None)."""

    @staticmethod
    def forward(ctx, x, weight, bias, acc):
        ctx.save_for_backward(x, weight)
        ctx.acc = acc
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[1]:
            wgrad_accumulate_(ctx.acc, dy2, x.reshape(-1, x.shape[-1]))
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, None, db, None


_OWN_BIAS = object()


def block_linear(module: nn.Linear, x: torch.Tensor, bias=_OWN_BIAS) -> torch.Tensor:
    """``F.linear(x, module.weight, bias)`` (`bias` defaults to the module's own), with the
    weight gradient added into ``module.main_grad`` when the module has one (see the module
    docstring). Under autocast the operands are cast as autocast would cast them."""
    b = module.bias if bias is _OWN_BIAS else bias
    acc = getattr(module, "main_grad", None)
    w = module.weight
    if acc is None or not torch.is_grad_enabled():
        return F.linear(x, w, b)
    if acc.dtype != torch.float32 or acc.shape != w.shape or acc.device != w.device:
        raise ValueError(f"main_grad must be an fp32 tensor of the weight's shape {tuple(w.shape)} on "
                         f"{w.device}, got {acc.dtype} {tuple(acc.shape)} on {acc.device}")
    dtype = autocast_dtype(x) or w.dtype
    x, w = x.to(dtype), w.to(dtype)
    b = None if b is None else b.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return _AccumulatingLinear.apply(x, w, b, acc)


class BlockLinear(nn.Linear):
    """`nn.Linear` with a ``main_grad`` slot (None: plain `nn.Linear`); see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.main_grad: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_linear(self, x)
