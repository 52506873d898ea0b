"""Per-block transforms after tensor parallelism: activation checkpointing, torch.compile, FSDP2.

The order is torchtitan's: checkpointing wraps a block, compile compiles the (wrapped) block,
and `fully_shard` goes on last, per block and then on the stage root, so every block is one
all-gather / reduce-scatter group and the root group holds the rest (ViT stem, projector,
embeddings, final norm, heads).

Activation checkpointing modes:

- ``none``: every activation is kept for the backward.
- ``full``: each ViT and LLaMA block keeps only its input and recomputes its forward in the
  backward (about one more forward of the blocks: 4/3 of the step's FLOPs).
- ``selective``: each block keeps the outputs of its matrix products, attention and
  collectives and recomputes the cheap elementwise rest (norms, GELU/SiLU, RoPE, residuals,
  casts). Those elementwise outputs are most of the activation tensors of a block and a
  sliver of its FLOPs (`models/flops.py` ignores them: under 1 % for emu2-37b).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from emu2_engine.models.emu2 import Emu2Model

AC_MODES = ("none", "selective", "full")

# Ops whose outputs selective checkpointing keeps (schema names; the custom attention op of
# the Triton path included). Everything else inside a block is recomputed.
_SAVED_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::convolution",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math",
    "emu2::modality_attention_fwd",
    "_c10d_functional::all_reduce", "_c10d_functional::reduce_scatter_tensor",
    "_c10d_functional::all_gather_into_tensor", "_c10d_functional::wait_tensor",
})


def _selective_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    name = getattr(getattr(func, "_schema", None), "name", "")
    return CheckpointPolicy.MUST_SAVE if name in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def blocks_of(model: Emu2Model) -> list[tuple[nn.ModuleDict, str]]:
    """(container, key) of every ViT and LLaMA block this model (or pipeline part) holds."""
    out = []
    if model.visual is not None:
        out += [(model.visual.blocks, k) for k in model.visual.blocks]
    out += [(model.llm.layers, k) for k in model.llm.layers]
    return out


def apply_ac(model: Emu2Model, mode: str) -> None:
    """Wrap every block for activation checkpointing (`mode` in AC_MODES), in place. Parameter
    names gain ``_checkpoint_wrapped_module.``; state dicts do not (the wrapper strips it)."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing must be one of {AC_MODES}, got {mode!r}")
    if mode == "none":
        return
    for container, key in blocks_of(model):
        if mode == "full":
            container[key] = checkpoint_wrapper(container[key], preserve_rng_state=False)
        else:
            container[key] = checkpoint_wrapper(
                container[key], preserve_rng_state=False,
                context_fn=partial(create_selective_checkpoint_contexts, _selective_policy))


def apply_compile(model: Emu2Model) -> None:
    """torch.compile each block in place (``Module.compile`` keeps parameter names); blocks of
    one kind share their compiled code, except under tensor parallelism, where each ViT block
    compiles its own: Dynamo guards on the identity of `LocalShards`' always-call hook, which
    differs from block to block. The recompile limit is raised to cover every block (at its
    default of 8, the ViT's blocks past the eighth ran eager); the hook must stay always-call,
    since activation checkpointing stops its recomputation with an exception."""
    blocks = list(blocks_of(model))
    allow_recompiles(len(blocks))
    for container, key in blocks:
        container[key].compile()


def allow_recompiles(n_blocks: int) -> None:
    """Raise Dynamo's recompile limits (never lower them) so that `n_blocks` blocks of one code
    may each compile their own graph, twice (a size turning dynamic)."""
    limit = 2 * n_blocks + 8
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * limit)


def apply_fsdp(stage: nn.Module, model: Emu2Model, mesh: DeviceMesh, param_dtype: torch.dtype,
               reduce_dtype: torch.dtype, reshard_after_forward: bool) -> None:
    """`fully_shard` every block, then `stage` (the module whose forward the training step
    calls: it must be the FSDP root so its hooks gather the remaining parameters).

    `mesh` is 1-D for FSDP, 2-D (replicate, shard) for HSDP. Parameters are gathered in
    `param_dtype` and gradients reduced in `reduce_dtype`; `reshard_after_forward` False keeps
    gathered blocks until their backward (pipeline schedules run several micro-batches before
    a backward, which would otherwise gather each block again per micro-batch)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
              shard_placement_fn=_fsdp_placement)
    for container, key in blocks_of(model):
        fully_shard(container[key], **kw)
    fully_shard(stage, **kw)


def _fsdp_placement(param: nn.Parameter) -> Shard | None:
    """FSDP shards dim 0, except for a parameter that TP already splits with a strided layout
    on dim 0 (the ViT's fused qkv, `_StridedShard(0, 3)`): stacking FSDP's own strided split on
    top gives a DTensor whose global view is wrong (the training step is still right, but
    `full_tensor` and checkpoints are not), so FSDP takes dim 1 (the input width) instead.
    DCP still cannot describe the result's chunks: checkpoints gather it
    (`checkpoint.dcp._ModelAndOptimizer`)."""
    if isinstance(param, DTensor) and any(isinstance(p, _StridedShard) and p.dim == 0
                                          for p in param.placements):
        return Shard(1)
    return None
