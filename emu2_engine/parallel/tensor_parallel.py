"""Tensor and sequence parallelism as DTensor plans, one small dict per block type.

Layout (Megatron's, in PyTorch's DTensor styles):

- **LLaMA blocks**, tensor + sequence parallel: the residual stream between blocks is this
  rank's shard of the sequence (a plain tensor, ``Shard(1)`` of the full one); the RMSNorms run
  on that shard
  (`SequenceParallel`); attention and the MLP all-gather it (`PrepareModuleInput`), run
  column-parallel ``q/k/v/gate/up`` projections so every rank holds ``heads / tp`` query heads
  and ``kv_heads / tp`` kv heads, and reduce-scatter after the row-parallel ``o/down``. Attention
  itself (`modality_attention`) runs on plain local tensors: `LlamaAttention` reads its head
  count from the projection's output width.
- **ViT blocks**, tensor parallel only: the stream stays a full, replicated plain tensor (a ViT
  row of 1025 tokens does not split evenly, and the ViT is a small share of the step).
  The fused ``qkv`` weight is split by heads with `_StridedShard(0, split_factor=3)`, so rank r
  holds the q, k and v rows of its heads (``[q_r; k_r; v_r]``), and ``q_bias``/``v_bias`` with
  them; ``proj`` and ``fc2`` are row-parallel with an all-reduce, ``fc1`` column-parallel.
- **Embeddings**: the token embedding is vocabulary-parallel (row-parallel over vocabulary
  rows, all-reduced), so the visual rows can be scattered into a full replicated tensor; the
  decoder entry then keeps this rank's sequence shard.
- **Heads**: the LM head is split by vocabulary rows and the loss is `emu2_head_loss(...,
  group=tp)` on the local rows (`pipeline.Emu2Stage` passes the group); ``project_down``, the
  projector and the ViT's patch embedding, CLS and position embedding are replicated.

Every parameter ends up a DTensor on the TP mesh (the optimiser's foreach kernels, gradient
clipping and FSDP need one kind of tensor). Replicated parameters that model code uses on plain
tensors are made visible to their module's forward as local tensors by `LocalShards`, which
also serves the fused ``qkv``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                               PrepareModuleInputOutput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import _StridedShard

from emu2_engine.parallel.pipeline import Emu2Stage


class LocalShards(ParallelStyle):
    """Distribute the named parameters of a module (names relative to it, possibly of its
    children) with the given placements, and let the module's forward see each as its local
    shard, a plain tensor.

    The swap happens in a forward pre-hook and is undone in a forward hook, so the module keeps
    its DTensor parameters for the optimiser, FSDP and checkpoints, and model code that uses a
    parameter directly (``F.linear(x, self.qkv.weight, bias)``, ``self.pos_embed``) runs
    unchanged on local tensors. ``to_local`` is differentiable: gradients arrive on the DTensor
    parameters with their placements. For a replicated parameter this is right only when every
    rank computes the same thing with it, which is the case for all uses in this module's plans
    (their inputs are replicated).

    With `partial_input_grad`, the module's first input is full and replicated but the module
    uses only this rank's shard of the weights on it (the ViT's fused qkv): each rank's
    gradient for that input is a partial sum, all-reduced in the backward (Megatron's "f").
    """

    def __init__(self, placements: Mapping[str, Placement], partial_input_grad: bool = False):
        super().__init__()
        self.placements = dict(placements)
        self.partial_input_grad = partial_input_grad

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        owners = []
        for name, placement in self.placements.items():
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            param = owner._parameters.get(attr)
            if param is None:
                raise ValueError(f"{type(module).__name__} has no parameter {name!r} to distribute")
            if not isinstance(param, DTensor):
                param = nn.Parameter(distribute_tensor(param.data, device_mesh, [placement]),
                                     requires_grad=param.requires_grad)
                owner.register_parameter(attr, param)
            owners.append((owner, attr))
        saved: list[nn.Parameter] = []
        placements = list(self.placements.values())

        def to_local(_module, args):
            if saved:  # a forward that raised left the local tensors in: put the parameters back
                restore(None, None, None)
            # Read the registered parameter now: FSDP may have swapped in its unsharded one.
            saved[:] = [owner._parameters[attr] for owner, attr in owners]
            for (owner, attr), param, placement in zip(owners, saved, placements):
                local = param.to_local()
                # A replicated parameter's gradient must be its own tensor (see _OwnGradient).
                owner._parameters[attr] = _OwnGradient.apply(local) if placement.is_replicate() else local
            if self.partial_input_grad:
                x = args[0]
                if not isinstance(x, DTensor):
                    x = DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
                return (x.to_local(grad_placements=[Partial()]), *args[1:])
            return None

        def restore(_module, _args, _output):
            for (owner, attr), param in zip(owners, saved):
                owner._parameters[attr] = param
            saved.clear()

        # always_call: activation checkpointing stops a recomputation early with an exception,
        # which must not leave the local tensors in (the clipping would read them). Dynamo
        # guards on this hook's identity, so under compile each such block compiles its own
        # code (`fsdp.apply_compile` raises the recompile limit for it). A forward that raised
        # anyway is undone by the next one.
        module.register_forward_pre_hook(to_local)
        module.register_forward_hook(restore, always_call=True)
        return module


class _OwnGradient(torch.autograd.Function):
    """Identity whose backward hands over a copy of the gradient.

    `DTensor.to_local`'s backward wraps the incoming gradient as is, and the parameter's
    gradient accumulator keeps that tensor as `.grad` without copying it. The gradient may be a
    view of another one: the ViT's stem `cat([cls_token.expand(N), patches]) + pos_embed` with
    N = 1 gives cls_token the first row of pos_embed's gradient, the same storage, so the next
    micro-batch's accumulation (and the clipping's scaling) went into both. The replicated
    parameters are norms, the ViT's stem and the projector's two matrices: for emu2-37b 27M
    elements, about 54 MB of copies per micro-batch in bf16, nothing that matters."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clone()


# -- plans, one per block type ------------------------------------------------------------------
def llama_block_plan() -> dict[str, ParallelStyle]:
    """TP + SP for one `LlamaBlock`: its input and output are this rank's sequence shard."""
    return {
        "input_layernorm": SequenceParallel(),
        "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                        desired_input_layouts=(Replicate(), None, None, None)),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "post_attention_layernorm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
    }


def vit_block_plan() -> dict[str, ParallelStyle]:
    """TP for one `VisionBlock` (post-norm); input and output are full plain tensors."""
    return {
        # [q; k; v] rows, each split by heads: rank r holds [q_r; k_r; v_r].
        "attn": LocalShards({"qkv.weight": _StridedShard(0, split_factor=3),
                             "q_bias": Shard(0), "v_bias": Shard(0)}, partial_input_grad=True),
        "attn.proj": RowwiseParallel(),
        "norm1": LocalShards({"weight": Replicate(), "bias": Replicate()}),
        "mlp.fc1": ColwiseParallel(),
        "mlp.fc2": RowwiseParallel(),
        "norm2": LocalShards({"weight": Replicate(), "bias": Replicate()}),
    }


def apply_tp(stage: Emu2Stage, tp_mesh: DeviceMesh) -> None:
    """Apply the plans to the model of `stage` (one pipeline stage, all of the model without
    PP), in place. The projector, ``project_down`` and the LM head are used by the stage's
    forward (`Emu2Stage`), so the stage holds their local views, and passes the TP group to the
    vocabulary-parallel head loss.

    The decoder's input is this rank's sequence shard: on the stage that embeds the tokens it
    arrives full (the embedding output with the visual rows in it), on later stages it arrives
    as the shard the previous stage sent. Its output leaves as that shard, or full on the stage
    with the final norm, for the head loss."""
    model, llm = stage.model, stage.model.llm
    for block in (model.visual.blocks.values() if model.visual is not None else ()):
        parallelize_module(block, tp_mesh, vit_block_plan())
    for block in llm.layers.values():
        parallelize_module(block, tp_mesh, llama_block_plan())
    plan: dict[str, ParallelStyle] = {}
    if model.visual is not None:
        plan["visual"] = LocalShards({n: Replicate() for n in (
            "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")})
    if llm.embed_tokens is not None:
        plan["llm.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if llm.norm is not None:
        plan["llm.norm"] = SequenceParallel()
    plan["llm"] = PrepareModuleInputOutput(
        input_layouts=(Replicate() if llm.embed_tokens is not None else Shard(1), None, None, None),
        desired_input_layouts=(Shard(1), None, None, None),
        use_local_input=True,
        output_layouts=Shard(1),
        desired_output_layouts=Replicate() if model.lm_head is not None else Shard(1),
        use_local_output=True)
    parallelize_module(model, tp_mesh, plan)
    heads: dict[str, Placement] = {}
    if model.projector is not None:
        heads["model.projector.project_up.weight"] = Replicate()
    if model.lm_head is not None:
        heads["model.lm_head.weight"] = Shard(0)  # vocabulary-parallel
        heads["model.project_down.weight"] = Replicate()
    if heads:
        LocalShards(heads)._apply(stage, tp_mesh)
    stage.vocab_group = tp_mesh.get_group()
    leftover = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if leftover:
        raise RuntimeError(f"the TP plans leave parameters that are not DTensors (a new module "
                           f"needs a plan entry): {leftover[:4]}")
