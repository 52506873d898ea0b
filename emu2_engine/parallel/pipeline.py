"""Pipeline parallelism: the model cut into stages, the stage forward, the schedules.

**Stages.** Stage 0 holds the ViT, the projector and the token embedding; every stage holds a
contiguous run of LLaMA blocks; the last one also holds the final norm, the LM head and
``project_down``. A stage is a copy of `Emu2Model` with the modules it does not own deleted
(``llm.layers`` is a dict keyed by index strings, so the names of what is left do not change
and checkpoints of a pipeline run load into an unsplit model). How many blocks each stage gets
balances the stages' forward FLOPs (`models/flops.py`, the ViT counted: for emu2-37b one
448-px image costs the ViT about as much as 146 LLM tokens cost the whole decoder, so stage 0
takes few or no blocks); `layers_per_stage` overrides it.

**Stage forward** (`Emu2Stage`). Every micro-batch is a dict of fixed-shape tensors
(`stage_inputs`): the `PackedBatch` fields, with the image list padded to a fixed count
(``image_mask``) and the regression targets given per image (``reg_mask``, ``reg_positions``)
instead of as a variable-length list. Stage 0 embeds and sends ``(hidden, pooled)``, the
hidden states and the pooled visual features (the regression targets, computed by the ViT on
stage 0 and needed by the loss on the last stage); middle stages pass them on; the last stage
returns ``[total, ce, mse]``. Without pipeline parallelism the one stage is the whole model
and this is the same computation as `Emu2Model.forward` (the tests check both against it).
Keyword inputs reach every stage (`torch.distributed.pipelining` hands a step's kwargs to all
stages), so no stage needs more than the activations from its neighbour.
The regressed images' indices and the labelled rows have data-dependent lengths, so they cannot
travel in those kwargs; the step hands them to the stages directly (`Emu2Stage.step_indices`)
and each micro-batch carries its index (``mb_index``, a CPU tensor), so the last stage's loss
reads nothing back from the GPU (no boolean-mask selection, no label scan in the head loss).
The count of real images, counted on the host too, lets stage 0 run its encoder on those alone.

**Schedules**: ``1f1b`` (one stage per rank), ``interleaved-1f1b`` and ``zero-bubble``
(`ScheduleInterleavedZeroBubble`, ZB1P: backward split into input and weight gradients, the
weight half filling the bubble), both with several stages per rank assigned round-robin, and
``zbv`` (`ScheduleZBVZeroBubble`, exactly two stages per rank in a V: rank r holds stages r
and 2 pp - 1 - r).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)

from emu2_engine.data.batch import PackedBatch
from emu2_engine.models.config import Emu2Config, LlamaConfig
from emu2_engine.models.emu2 import Emu2Model
from emu2_engine.models.flops import (head_flops, llm_flops, projector_flops_per_image,
                                      vit_flops_per_image)
from emu2_engine.ops import emu2_head_loss

SCHEDULES = {
    "1f1b": Schedule1F1B,
    "interleaved-1f1b": ScheduleInterleaved1F1B,
    "zero-bubble": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}
"""Pipeline schedule names and their `torch.distributed.pipelining` classes."""


# -- fixed-shape micro-batches ----------------------------------------------------------------
def stage_inputs(batch: PackedBatch, host_indices: bool = False) -> dict[str, torch.Tensor]:
    """The tensors every stage receives for one micro-batch, all of shapes fixed by
    (rows, seq_len, images per micro-batch, n_query). Regression targets become per-image:
    ``reg_mask`` (N,) marks the regressed images, ``reg_positions`` (N, n_query) holds their
    predicting positions (rows of other images are 0 and unused).

    `host_indices` (no pipeline schedule, which would need fixed shapes) adds ``reg_images``,
    the regressed images' indices, and the batch's ``text_rows`` when it has them: integer
    indices made on the host, so neither the regression selection (a boolean mask would read its
    count back) nor the head loss synchronises with the device."""
    N, n_query = batch.image_slots.shape
    reg_mask = torch.zeros(N, dtype=torch.bool, device=batch.image_slots.device)
    reg_mask[batch.reg_images] = True
    reg_positions = torch.zeros_like(batch.image_slots)
    reg_positions[batch.reg_images] = batch.reg_positions
    image_mask = batch.image_mask
    if image_mask is None:
        image_mask = torch.ones(N, dtype=torch.bool, device=batch.image_slots.device)
    inputs = {"input_ids": batch.input_ids, "labels": batch.labels, "doc_ids": batch.doc_ids,
              "span_ids": batch.span_ids, "position_ids": batch.position_ids, "images": batch.images,
              "image_slots": batch.image_slots, "image_mask": image_mask, "reg_mask": reg_mask,
              "reg_positions": reg_positions}
    if host_indices:
        inputs["reg_images"] = batch.reg_images
        if batch.text_rows is not None:
            inputs["text_rows"] = batch.text_rows
    return inputs


def concat_microbatches(inputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Micro-batches concatenated along dim 0, which is how a pipeline schedule's ``step`` takes
    them (it splits every kwarg tensor back into as many equal chunks). Flat indices stay valid:
    each micro-batch's ``image_slots``/``reg_positions`` index its own rows."""
    first = inputs[0]
    for i, mb in enumerate(inputs[1:], 1):
        for name, t in mb.items():
            if t.shape != first[name].shape:
                raise ValueError(
                    f"pipeline micro-batches need fixed shapes: micro-batch {i} has {name} of "
                    f"shape {tuple(t.shape)}, micro-batch 0 {tuple(first[name].shape)} "
                    f"(pad images to a fixed count with data.max_images)")
    return {name: torch.cat([mb[name] for mb in inputs]) for name in first}


# -- the stage module ------------------------------------------------------------------------
class Emu2Stage(nn.Module):
    """Runs the pieces of `model` it still has (see the module docstring): the whole model
    when nothing was deleted. `vocab_group` is the tensor-parallel group over which the LM
    head is split by vocabulary rows (set by `tensor_parallel.apply_tp`)."""

    def __init__(self, model: Emu2Model):
        super().__init__()
        self.model = model
        self.vocab_group: dist.ProcessGroup | None = None
        self.split_backward = False
        """Set for zero-bubble schedules: see `_loss`."""
        self.step_indices: list[dict[str, torch.Tensor]] | None = None
        """Under a pipeline schedule, for the step under way: each micro-batch's host-made
        ``reg_images`` and ``text_rows`` (variable lengths, so they cannot travel in the
        schedule's fixed-shape kwargs), found by the micro-batch's ``mb_index``. With them the
        loss reads nothing back from the device (`ParallelModel.forward_backward` sets them)."""

    @property
    def is_first(self) -> bool:
        return self.model.visual is not None

    @property
    def is_last(self) -> bool:
        return self.model.lm_head is not None

    def forward(self, *carry: torch.Tensor, **mb: torch.Tensor):
        model = self.model
        if self.vocab_group is not None:
            tp = dist.get_world_size(self.vocab_group)
            if mb["input_ids"].shape[1] % tp:
                raise ValueError(f"sequence parallelism needs the row length "
                                 f"({mb['input_ids'].shape[1]}) to be a multiple of tp ({tp})")
        if self.is_first:
            hidden, pooled = self._embed(mb)
        else:
            hidden, pooled = carry
        hidden = model.llm(hidden, mb["position_ids"], mb["doc_ids"], mb["span_ids"])
        if not self.is_last:
            # Zero-bubble schedules detach stage outputs in place, which a view does not allow.
            return tuple(t.clone() if t._base is not None else t for t in (hidden, pooled))
        return self._loss(hidden, pooled, mb)

    def _embed(self, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with the visual rows in, and the pooled features (N, n_query, C)."""
        model = self.model
        N, n_query = mb["image_slots"].shape
        if N == 0:
            pooled = mb["images"].new_zeros(0, n_query, model.cfg.vision.width)
            return model.embed(mb["input_ids"]), pooled
        images, slots, mask = mb["images"], mb["image_slots"], mb["image_mask"]
        real = self._host_indices(mb).get("real_images")
        if real is not None and real < N:
            # The padding images (after the real ones) stay in the schedule's fixed shapes but
            # need not go through the encoder (about 4 % of the slots on proxy-1b's data).
            # One image is kept: under FSDP every rank gathers the encoder's blocks each time.
            keep = max(real, 1)
            images, slots, mask = images[:keep], slots[:keep], mask[:keep]
        visual, pooled = model.visual_rows(model.visual(images), mb["input_ids"], slots)
        hidden = model.embed(mb["input_ids"], slots, visual, mask)
        if pooled.shape[0] < N:  # the next stages take (N, n_query, C): zeros for the padding
            pooled = F.pad(pooled, (0, 0, 0, 0, 0, N - pooled.shape[0]))
        return hidden, pooled

    def _host_indices(self, mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The micro-batch's host-made ``reg_images`` and ``text_rows`` (those it has): in `mb`
        without a schedule; under one, looked up by its ``mb_index`` (a CPU tensor: reading it
        is no device read) in `step_indices`."""
        if "mb_index" in mb and self.step_indices is not None:
            return self.step_indices[int(mb["mb_index"])]
        return {k: mb[k] for k in ("reg_images", "text_rows", "real_images") if k in mb}

    def _loss(self, hidden: torch.Tensor, pooled: torch.Tensor,
              mb: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[total, ce, mse]`` of the micro-batch (only ``total`` carries gradients)."""
        model = self.model
        host = self._host_indices(mb)
        reg = host.get("reg_images", mb["reg_mask"])  # integer indices when the host made them
        target = pooled[reg].reshape(-1, pooled.shape[-1])
        index = mb["reg_positions"][reg].reshape(-1)
        text_rows = host.get("text_rows")
        weights = (model.lm_head.weight, model.project_down.weight)
        if not self.split_backward:
            out = emu2_head_loss(hidden, *weights[:1], mb["labels"], weights[1], index, target,
                                 model.cfg.regression_weight, group=self.vocab_group,
                                 text_rows=text_rows)
            return torch.stack([out.total, out.ce.detach(), out.mse.detach()])
        # Zero-bubble schedules run the backward in two passes, one for the stage's inputs and
        # one for its weights, and the second re-runs every node where the two paths meet. The
        # fused head loss computes its gradients in the forward and hands them over once, so it
        # must not be such a node: run it on detached leaves, take its gradients now, and
        # attach them with one node per path.
        leaves = [t.detach().requires_grad_() for t in (hidden, *weights)]
        out = emu2_head_loss(leaves[0], leaves[1], mb["labels"], leaves[2], index, target,
                             model.cfg.regression_weight, group=self.vocab_group, text_rows=text_rows)
        grads = torch.autograd.grad(out.total, leaves, allow_unused=True)
        d_hidden = grads[0] if grads[0] is not None else torch.zeros_like(hidden)
        total = _Precomputed.apply(out.total.detach(), d_hidden, hidden)
        for weight, grad in zip(weights, grads[1:]):
            if grad is not None:
                total = total + _Precomputed.apply(out.total.new_zeros(()), grad, weight)
        return torch.stack([total, out.ce.detach(), out.mse.detach()])


class _Precomputed(torch.autograd.Function):
    """Forward: `value`. Backward: the incoming gradient times `grad`, the gradient of `value`
    with respect to `x` computed beforehand. Can run more than once (nothing is consumed)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return None, None, grad * grad_output


# -- splitting ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class MicroBatchShape:
    """The micro-batch the stage balance is computed for."""

    rows: int
    """Packed rows per micro-batch."""
    seq_len: int
    """Tokens per row (attention is counted as one causal document per row: an upper bound)."""
    images: int
    """Images per micro-batch (the padded count: an upper bound, stage 0 encodes the real ones)."""


def stage_costs(cfg: Emu2Config, shape: MicroBatchShape) -> tuple[int, int, int]:
    """Forward FLOPs per micro-batch of (what only stage 0 runs: ViT + projector, one LLaMA
    block, what only the last stage runs: the heads with every token labelled)."""
    first = shape.images * (vit_flops_per_image(cfg.vision) + projector_flops_per_image(cfg, cfg.n_query))
    one_layer = LlamaConfig(**{**cfg.llm.__dict__, "layers": 1})
    block = sum(llm_flops(one_layer, [shape.seq_len] * shape.rows).values())
    last = head_flops(cfg, shape.rows * shape.seq_len, 0)
    return first, block, last


def balance_layers(n_layers: int, n_stages: int, first: float, block: float, last: float) -> list[int]:
    """Blocks per stage, in stage order: the split whose most expensive stage is cheapest, and
    among those the most even one (least sum of squared stage costs). Stage 0 costs `first`
    more and the last stage `last` more; stage 0 may get no block (a ViT that outweighs a
    stage's share), every other stage gets at least one. Two O(stages x layers^2) dynamic
    programmes (min-max, then min sum of squares under that max): tiny for any real model."""
    if n_stages == 1:
        return [n_layers]
    if n_stages - 1 > n_layers:
        raise ValueError(f"{n_stages} pipeline stages need at least {n_stages - 1} LLM layers "
                         f"(stage 0 may hold only the ViT), the model has {n_layers}")

    def cost(stage: int, n: int) -> float:
        return n * block + (first if stage == 0 else 0.0) + (last if stage == n_stages - 1 else 0.0)

    def solve(combine, limit: float) -> tuple[float, list[int]]:
        # best[k]: objective of stages 0..s holding the first k blocks; choice[s][k]: stage s's count.
        best = [combine(0.0, cost(0, k)) if cost(0, k) <= limit else inf for k in range(n_layers + 1)]
        choice = [list(range(n_layers + 1))]
        for s in range(1, n_stages):
            new, pick = [inf] * (n_layers + 1), [0] * (n_layers + 1)
            for k in range(s, n_layers + 1):
                for n in range(1, k + 1):
                    c = cost(s, n)
                    if c <= limit and best[k - n] < inf and combine(best[k - n], c) < new[k]:
                        new[k], pick[k] = combine(best[k - n], c), n
            best = new
            choice.append(pick)
        counts, k = [], n_layers
        for s in range(n_stages - 1, -1, -1):
            counts.append(choice[s][k])
            k -= choice[s][k]
        return best[n_layers], counts[::-1]

    inf = float("inf")
    top, _ = solve(max, inf)
    return solve(lambda acc, c: acc + c * c, top * (1 + 1e-12))[1]


def check_layers_per_stage(counts: list[int], n_layers: int, n_stages: int) -> None:
    """A manual split: one count per stage, summing to the LLM's layers, every stage but the
    first holding at least one."""
    if len(counts) != n_stages:
        raise ValueError(f"layers_per_stage needs one entry per pipeline stage ({n_stages}), "
                         f"got {len(counts)}: {counts}")
    if sum(counts) != n_layers:
        raise ValueError(f"layers_per_stage must sum to the LLM's {n_layers} layers, got "
                         f"{sum(counts)}: {counts}")
    if counts[0] < 0 or min(counts[1:], default=1) < 1:
        raise ValueError(f"layers_per_stage: stage 0 needs >= 0 layers and every later stage "
                         f">= 1, got {counts}")


def stage_ids_of_rank(pp_rank: int, pp: int, stages_per_rank: int, style: str) -> list[int]:
    """The stages a pipeline rank holds: round-robin (``loop``: r, r + pp, ...) or V-shaped
    (``v``, two per rank: r and 2 pp - 1 - r)."""
    if style == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(stages_per_rank)]


def cut_stage(model: Emu2Model, layers: range, n_stages: int, stage: int) -> Emu2Model:
    """A copy of `model` keeping only what `stage` runs: the ViT, projector and embedding on
    stage 0, the LLaMA blocks `layers`, the norm and heads on the last stage. Deep-copies:
    build `model` on the meta device for real sizes, then materialise each stage."""
    part = copy.deepcopy(model)
    if stage != 0:
        part.visual = None
        part.projector = None
        part.llm.embed_tokens = None
    if stage != n_stages - 1:
        part.llm.norm = None
        part.lm_head = None
        part.project_down = None
    for name in list(part.llm.layers.keys()):
        if int(name) not in layers:
            del part.llm.layers[name]
    return part


def build_schedule(name: str, stages: list[Emu2Stage], stage_ids: list[int], n_stages: int,
                   n_microbatches: int, group: dist.ProcessGroup, device: torch.device):
    """The `torch.distributed.pipelining` schedule over this rank's stages. The last stage's
    output is ``[total, ce, mse]``; its ``total`` is the loss, and the schedule scales
    gradients by 1 / n_microbatches, so a step's gradient is that of the micro-batch mean."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    for stage in stages:
        stage.split_backward = name in ("zero-bubble", "zbv")
    pipeline_stages = [PipelineStage(stage, i, n_stages, device, group=group)
                       for stage, i in zip(stages, stage_ids)]
    cls = SCHEDULES[name]
    if name == "1f1b":
        return cls(pipeline_stages[0], n_microbatches, loss_fn=_total)
    return cls(pipeline_stages, n_microbatches, loss_fn=_total)


def _total(output: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
    """The schedule's loss function: the stage already computed the loss (a copy, not a view:
    zero-bubble schedules detach it in place)."""
    return output[0].clone()
