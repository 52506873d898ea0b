"""Cast the blocks' matrix weights to the autocast dtype once per optimiser step.

Under autocast with fp32 parameters, every micro-batch casts each weight to bf16 where a
linear layer uses it, and the backward of that cast turns the bf16 weight gradient into a
fresh fp32 tensor, which autograd then adds into ``.grad``. Per micro-batch and parameter
that is 4 + 2 bytes read and written for the cast, 2 + 4 for the gradient's cast, and
4 + 4 + 4 for the accumulation: 24 bytes. At emu2-37b-slice's 2.4B block parameters that is
about 58 GB of memory traffic per micro-batch, about 12 ms of an H200's bandwidth.

`StepWeightCast` does what Megatron-LM does with bf16 parameters and fp32 main gradients,
without changing what the model, the optimiser or a checkpoint hold: for the length of a
step (`cast()`), each selected parameter's data is a bf16 copy of its fp32 value, so the
linear layers use it as it is, and a post-accumulate-grad hook adds each micro-batch's bf16
gradient into an fp32 accumulator (2 + 4 + 4 bytes). When the step's micro-batches are done
the fp32 values come back and the accumulators become their ``.grad``; the optimiser, the
clipping and the checkpoints see fp32 tensors as before.

The numbers do not change: autocast rounds a weight to bf16 the same way, the GEMMs see the
same operands, and the gradient sums are the same fp32 additions in the same order.

With ``fused`` layers (``train.grad_accumulation_fusion``) the weights of the blocks'
`BlockLinear` layers skip the hook: for the length of the step each layer's ``main_grad`` is
an fp32 accumulator (zeros, or the gradient the parameter already had), and the layer's
backward adds its weight gradient into it inside the GEMM (`models/block_linear.py`), so no
bf16 weight gradient is written, read back and added. The sum is then more exact than without
the fusion (no micro-batch's gradient is rounded to bf16 first), so it is no longer equal bit
for bit to ``weight_cast = op``. Biases keep the hook.

Only the weights and biases of the `nn.Linear` layers inside the ViT blocks and the LLaMA
layers are cast: these layers use them through `F.linear`, which autocast would cast anyway
(norm weights, embeddings and the heads, whose kernels read fp32 weights, are left alone).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
import torch.nn as nn

from emu2_engine.models.block_linear import BlockLinear, accumulated, forget


def block_linear_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable fp32 weights and biases of the `nn.Linear` layers inside the model's
    transformer blocks (the ViT's ``visual.blocks`` and the LLM's ``llm.layers``)."""
    params: list[nn.Parameter] = []
    for module in _block_linears(model):
        params.extend(p for p in module.parameters(recurse=False)
                      if p.requires_grad and p.dtype == torch.float32)
    return params


def fusable_block_linears(model: nn.Module) -> list[BlockLinear]:
    """The `BlockLinear` layers of the model's blocks whose weight `block_linear_parameters`
    selects (trainable, fp32): the layers a fused `StepWeightCast` hands an fp32 ``main_grad``."""
    return [m for m in _block_linears(model) if isinstance(m, BlockLinear)
            and m.weight.requires_grad and m.weight.dtype == torch.float32]


def _block_linears(model: nn.Module) -> list[nn.Linear]:
    holders = []
    visual = getattr(model, "visual", None)
    if visual is not None and getattr(visual, "blocks", None) is not None:
        holders.append(visual.blocks)
    llm = getattr(model, "llm", None)
    if llm is not None and getattr(llm, "layers", None) is not None:
        holders.append(llm.layers)
    return [m for holder in holders for m in holder.modules() if isinstance(m, nn.Linear)]


class StepWeightCast:
    """Swap `params` to `dtype` copies for the length of `cast()`, and accumulate their
    gradients in fp32 (see the module docstring). Hooks stay registered for the object's life;
    outside `cast()` they only turn a stray low-precision gradient into fp32.

    Inside `cast()` the gradients live in the accumulators, not in ``p.grad`` (which reads
    None): a `zero_grad()` there clears nothing, and the accumulated gradient comes back on
    leaving. Clear gradients before or after a step, as `Trainer.step` does."""

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype,
                 fused: list[BlockLinear] | tuple[BlockLinear, ...] = ()):
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"the weights are cast to a 16-bit autocast dtype, got {dtype}")
        bad = [tuple(p.shape) for p in params if p.dtype != torch.float32]
        if bad:
            raise ValueError(f"StepWeightCast needs fp32 parameters; these are not: {bad[:3]}")
        self.params = list(params)
        self.dtype = dtype
        ids = {id(p) for p in self.params}
        stray = [type(m).__name__ for m in fused if not isinstance(m, BlockLinear) or id(m.weight) not in ids]
        if stray:
            raise ValueError(f"fused layers must be BlockLinear layers whose weight is among the cast "
                             f"parameters; these are not: {stray[:3]}")
        self.fused = list(fused)
        self._masters: list[torch.Tensor] | None = None
        self._grads: dict[int, torch.Tensor] = {}
        # The hooks reach this object through a weak reference: a strong one would make a cycle
        # (parameter -> hook -> self -> parameter) that keeps a dropped trainer's GPU memory
        # until the garbage collector happens to run.
        me = weakref.ref(self)

        def hook(p: nn.Parameter) -> None:
            owner = me()
            if owner is not None:
                owner._accumulate(p)

        fused_ids = {id(m.weight) for m in self.fused}
        self._handles = [p.register_post_accumulate_grad_hook(hook) for p in self.params
                         if id(p) not in fused_ids]

    @property
    def active(self) -> bool:
        return self._masters is not None

    def _accumulate(self, p: nn.Parameter) -> None:
        g = p.grad
        if g is None or g.dtype == torch.float32:
            return
        p.grad = None
        if not self.active:  # a backward run after cast() ended: p holds fp32 data again
            p.grad = g.float()
            return
        acc = self._grads.get(id(p))
        if acc is None:
            self._grads[id(p)] = g.float()
        else:
            acc.add_(g)

    @contextlib.contextmanager
    def cast(self) -> Iterator[None]:
        """Run a step's forwards and backwards inside: the parameters hold `dtype` copies,
        and on leaving they hold their fp32 values with the step's fp32 gradients."""
        if self.active:
            raise RuntimeError("StepWeightCast.cast() is already active (it does not nest)")
        masters = []
        for p in self.params:
            if p.grad is not None:  # gradients from before the step keep accumulating
                self._grads[id(p)] = p.grad
                p.grad = None
            masters.append(p.data)
        self._masters = masters
        fresh = set()  # the fused weights that had no gradient when the step began
        try:
            with torch.no_grad():
                for p, master in zip(self.params, masters):
                    p.data = master.to(self.dtype)
                for m in self.fused:  # the layer adds its weight gradient into this itself
                    acc = self._grads.get(id(m.weight))
                    if acc is None:
                        acc = self._grads[id(m.weight)] = torch.zeros_like(m.weight, dtype=torch.float32)
                        fresh.add(id(m.weight))
                    forget(acc)
                    m.main_grad = acc
            yield
        finally:
            for m in self.fused:
                m.main_grad = None
                acc = self._grads.get(id(m.weight))
                if acc is None:
                    continue
                if id(m.weight) in fresh and not accumulated(acc):
                    # no backward reached the layer (a step with no images skips the ViT): its
                    # gradient stays None, as unfused, so AdamW leaves the weight alone
                    del self._grads[id(m.weight)]
                forget(acc)
            for p, master in zip(self.params, masters):
                stray = p.grad  # a gradient the hook did not see (none in a normal step)
                p.grad = None
                p.data = master
                acc = self._grads.pop(id(p), None)
                if stray is not None:
                    acc = stray.float() if acc is None else acc.add_(stray)
                p.grad = acc
            self._masters = None
            self._grads.clear()

    def remove(self) -> None:
        """Unregister the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
