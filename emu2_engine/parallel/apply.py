"""`parallelize`: split, shard and wrap an `Emu2Model` for the layout in `ParallelDims`, and the
training-step pieces that depend on the layout (forward + backward over a step's
micro-batches, gradient clipping).

Order, as torchtitan applies it: pipeline split first (each stage is a separate copy of the
model with the modules it does not own deleted), then per stage tensor parallelism,
activation checkpointing, torch.compile, and FSDP last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from emu2_engine.data.batch import PackedBatch
from emu2_engine.models.config import Emu2Config
from emu2_engine.models.emu2 import Emu2Model
from emu2_engine.parallel.dims import ParallelDims
from emu2_engine.parallel.fsdp import AC_MODES, apply_ac, apply_compile, apply_fsdp
from emu2_engine.parallel.pipeline import (SCHEDULES, Emu2Stage, MicroBatchShape, balance_layers,
                                           build_schedule, check_layers_per_stage,
                                           concat_microbatches, cut_stage, stage_costs,
                                           stage_ids_of_rank, stage_inputs)
from emu2_engine.parallel.tensor_parallel import apply_tp

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ParallelConfig:
    """How the model is wrapped for training, beyond the degrees in `ParallelDims`."""

    activation_checkpoint: str = "none"
    """none | selective | full (see `parallel.fsdp`)."""
    compile: bool = False
    """torch.compile each ViT and LLaMA block."""
    param_dtype: str = "bfloat16"
    """Dtype FSDP gathers parameters in for compute (float32 | bfloat16 | float16); the
    sharded master copy stays float32. Used only with data parallelism (dp > 1)."""
    reduce_dtype: str = "float32"
    """Dtype of FSDP's gradient reduce-scatter / all-reduce."""
    pp_schedule: str = "1f1b"
    """1f1b | interleaved-1f1b | zero-bubble | zbv (see `parallel.pipeline`)."""
    stages_per_rank: int = 1
    """Pipeline stages per rank: 1 for 1f1b, >= 2 for interleaved-1f1b and zero-bubble, 2 for zbv."""
    microbatches: int = 1
    """Micro-batches per optimiser step on each data-parallel rank (gradient accumulation;
    what a pipeline schedule splits the step into)."""
    layers_per_stage: list[int] = field(default_factory=list)
    """LLM blocks per pipeline stage, overriding the FLOP balance; empty: balanced."""

    def validate(self, dims: ParallelDims, model: Emu2Config | None = None) -> None:
        """Raise ValueError with one line naming the first inconsistent setting (with `model`,
        also more pipeline stages than the LLM has layers to give them)."""
        if self.activation_checkpoint not in AC_MODES:
            raise ValueError(f"parallel.activation_checkpoint must be one of {AC_MODES}, got "
                             f"{self.activation_checkpoint!r}")
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"parallel.{name} must be one of {sorted(_DTYPES)}, got "
                                 f"{getattr(self, name)!r}")
        if self.pp_schedule not in SCHEDULES:
            raise ValueError(f"parallel.pp_schedule must be one of {sorted(SCHEDULES)}, got "
                             f"{self.pp_schedule!r}")
        if self.microbatches < 1:
            raise ValueError(f"parallel.microbatches must be >= 1, got {self.microbatches}")
        if dims.pp == 1:
            if self.stages_per_rank != 1:
                raise ValueError(f"parallel.stages_per_rank = {self.stages_per_rank} needs "
                                 f"pipeline parallelism (pp > 1)")
            return
        allowed = {"1f1b": "exactly 1", "zbv": "exactly 2"}.get(self.pp_schedule, "at least 2")
        ok = {"1f1b": self.stages_per_rank == 1, "zbv": self.stages_per_rank == 2}
        if not ok.get(self.pp_schedule, self.stages_per_rank >= 2):
            raise ValueError(f"parallel.pp_schedule {self.pp_schedule!r} needs stages_per_rank "
                             f"{allowed}, got {self.stages_per_rank}")
        if self.pp_schedule in ("zero-bubble", "zbv") and self.activation_checkpoint == "selective":
            # the weight half of the split backward runs the graph a second time, after
            # selective checkpointing has released what it saved ("backward an extra time")
            raise ValueError(f"parallel.pp_schedule {self.pp_schedule!r} splits the backward in "
                             f"two passes, which selective activation checkpointing does not "
                             f"allow: use activation_checkpoint = none or full")
        if self.microbatches < dims.pp:
            raise ValueError(f"parallel.microbatches ({self.microbatches}) must be at least pp "
                             f"({dims.pp}) to fill the pipeline")
        rounds = self.microbatches // dims.pp
        if self.pp_schedule != "1f1b" and self.microbatches % rounds:
            raise ValueError(f"parallel.microbatches ({self.microbatches}) must be a multiple of "
                             f"microbatches // pp = {rounds} for {self.pp_schedule!r}")
        n_stages = dims.pp * self.stages_per_rank
        if model is not None and n_stages - 1 > model.llm.layers:
            raise ValueError(f"{n_stages} pipeline stages (pp x stages_per_rank) need at least "
                             f"{n_stages - 1} LLM layers (stage 0 may hold only the ViT), the "
                             f"model has {model.llm.layers}")
        if self.layers_per_stage:
            check_layers_per_stage(self.layers_per_stage, model.llm.layers if model else
                                   sum(self.layers_per_stage), n_stages)


class ParallelModel:
    """A model laid out over the mesh: `stages` are this rank's modules (one, the whole model,
    without pipeline parallelism), `models` the `Emu2Model` inside each (what checkpoints and
    optimiser groups read)."""

    def __init__(self, stages: list[Emu2Stage], dims: ParallelDims, cfg: ParallelConfig,
                 schedule=None):
        self.stages = stages
        self.models = [s.model for s in stages]
        self.dims = dims
        self.cfg = cfg
        self.schedule = schedule

    def parameters(self) -> list[nn.Parameter]:
        return [p for s in self.stages for p in s.parameters()]

    def forward_backward(self, batches: list[PackedBatch]) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches of one step (`cfg.microbatches`
        of them, the same on every rank of a TP group and of a pipeline); gradients are those of
        the mean loss over the micro-batches of all data-parallel ranks. Returns that mean as
        ``[total, ce, mse]`` (float32) on every rank."""
        n = len(batches)
        if n != self.cfg.microbatches:
            raise ValueError(f"expected {self.cfg.microbatches} micro-batches (parallel.microbatches), "
                             f"got {n}")
        if self.schedule is None:  # one micro-batch at a time: `batches` may take them lazily
            losses = self._accumulate((stage_inputs(b, host_indices=True) for b in batches), n)
        else:  # the schedule splits one merged batch: every micro-batch at once
            batches = list(batches)
            inputs = [{**stage_inputs(b), "mb_index": torch.tensor([i])} for i, b in enumerate(batches)]
            merged = concat_microbatches(inputs)
            dummy_target = torch.zeros(len(batches), device=merged["input_ids"].device)
            step_indices = [{"reg_images": b.reg_images,
                             **({"text_rows": b.text_rows} if b.text_rows is not None else {}),
                             **({"real_images": b.real_images} if b.real_images is not None else {})}
                            for b in batches]
            for stage in self.stages:
                stage.step_indices = step_indices
            try:
                out = self.schedule.step(target=dummy_target, **merged)
            finally:
                for stage in self.stages:
                    stage.step_indices = None
            losses = torch.zeros(3, device=dummy_target.device)
            if out is not None:  # the last stage's outputs, one [total, ce, mse] per micro-batch
                losses = out.detach().view(len(batches), 3).float().mean(0)
            dist.all_reduce(losses, group=self.dims.pp_mesh.get_group())  # only the last stage is non-zero
        dp_mesh = self.dims.fsdp_mesh
        if dp_mesh is not None:
            for group in ([dp_mesh.get_group()] if dp_mesh.ndim == 1 else dp_mesh.get_all_groups()):
                dist.all_reduce(losses, op=dist.ReduceOp.AVG, group=group)
        return losses

    def _accumulate(self, inputs, n: int) -> torch.Tensor:
        """Forward and backward of the `n` micro-batch inputs one after the other."""
        stage = self.stages[0]
        # FSDP reduce-scatters each micro-batch's gradients, so a rank only ever holds its
        # shard of them (skipping the sync would keep every parameter's unsharded fp32 gradient
        # between micro-batches: for emu2-37b at tp = 4, 34 GiB more per GPU than the plan
        # counts). Under HSDP the shards are all-reduced across the replicas once, after the
        # last micro-batch.
        replicated = self.dims.fsdp_mesh is not None and self.dims.fsdp_mesh.ndim == 2
        total = None
        for i, mb in enumerate(inputs):
            if replicated:
                stage.set_requires_all_reduce(i == n - 1)
            losses = stage(**mb)
            (losses[0] / n).backward()
            total = losses.detach().float() if total is None else total + losses.detach().float()
        return total / n

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale every gradient so their global 2-norm is at most `max_norm` (inf: only
        measure it); returns the norm before clipping, the same on every rank and equal to the
        norm of the unsharded model's gradients. DTensor gradients are reduced over the
        dimensions they are sharded on; pipeline stages add their squared norms."""
        params = [p for p in self.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.dims.pp_mesh is not None:
            square = norm.float() ** 2
            dist.all_reduce(square, group=self.dims.pp_mesh.get_group())
            norm = square.sqrt()
        if max_norm != float("inf"):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm


def parallelize(model: Emu2Model, dims: ParallelDims, mesh: DeviceMesh, cfg: ParallelConfig,
                shape: MicroBatchShape | None = None) -> ParallelModel:
    """Lay `model` out over `mesh` (built by `dims.build_mesh`): pipeline split, then per stage
    TP (+SP), activation checkpointing, compile, FSDP. `shape` is the micro-batch the pipeline
    split balances FLOPs for (needed with pp > 1 unless `cfg.layers_per_stage` is given).

    Every rank passes the same `model` (same initialisation: for real sizes build it on the
    meta device, then materialise the stages' parameters). Without pipeline parallelism the
    one stage wraps `model` itself; with it, each stage is a pruned copy."""
    if mesh is not dims.mesh:
        raise ValueError("parallelize needs the mesh that dims.build_mesh returned")
    cfg.validate(dims, model.cfg)
    dims.validate(mesh.size(), model.cfg)
    device = torch.device(mesh.device_type, torch.cuda.current_device()) \
        if mesh.device_type == "cuda" else torch.device(mesh.device_type)
    if dims.pp > 1:
        n_stages = dims.pp * cfg.stages_per_rank
        n_layers = model.cfg.llm.layers
        if cfg.layers_per_stage:
            counts = list(cfg.layers_per_stage)
        elif shape is None:
            raise ValueError("pipeline parallelism needs the micro-batch shape to balance the "
                             "stages, or parallel.layers_per_stage")
        else:
            counts = balance_layers(n_layers, n_stages, *stage_costs(model.cfg, shape))
        starts = [sum(counts[:i]) for i in range(n_stages + 1)]
        style = "v" if cfg.pp_schedule == "zbv" else "loop"
        pp_rank = dims.pp_mesh.get_local_rank()
        stage_ids = stage_ids_of_rank(pp_rank, dims.pp, cfg.stages_per_rank, style)
        stages = [Emu2Stage(cut_stage(model, range(starts[i], starts[i + 1]), n_stages, i))
                  for i in stage_ids]
    else:
        stages = [Emu2Stage(model)]
    for stage in stages:
        if dims.tp > 1:
            apply_tp(stage, dims.tp_mesh)
        apply_ac(stage.model, cfg.activation_checkpoint)
        if cfg.compile:
            apply_compile(stage.model)
        if dims.fsdp_mesh is not None:
            apply_fsdp(stage, stage.model, dims.fsdp_mesh, _DTYPES[cfg.param_dtype],
                       _DTYPES[cfg.reduce_dtype], reshard_after_forward=dims.pp == 1)
    schedule = None
    if dims.pp > 1:
        schedule = build_schedule(cfg.pp_schedule, stages, stage_ids, n_stages, cfg.microbatches,
                                  dims.pp_mesh.get_group(), device)
    return ParallelModel(stages, dims, cfg, schedule)
