"""The training loop: build (parallel layout, optimiser, loader, checkpoints), then step, with a
progress bar, a metrics file, checkpoints and fault handling.

One process (WORLD_SIZE 1) trains the plain model. Under torchrun with WORLD_SIZE > 1 the
trainer initialises the process group (NCCL on CUDA, gloo on the CPU), builds `ParallelDims`
and its mesh from the [parallel] section and lays the model out with `parallelize` (TP/SP,
activation checkpointing, compile, FSDP, pipeline). Each data-parallel rank reads its own
share of the data; the ranks of one TP group or pipeline read the same batches. The loader
runs `data.prefetch` micro-batches ahead in a background thread (`data.prefetch.Prefetcher`);
the checkpoints save its position after the last micro-batch trained on.

Faults: SIGTERM or SIGINT ends the run after the current step with a checkpoint; a step whose
loss or gradient norm is not finite is skipped (no optimiser update, counted in the metrics)
and `train.max_nonfinite` of them in a row stop the run (`NonFiniteError`). A rank restarted by
`torchrun --max-restarts` resumes from the newest complete checkpoint (checkpoint.resume = auto).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import signal
import time
import warnings
import weakref
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from emu2_engine.checkpoint.dcp import RESUMED_FROM, CheckpointError, Checkpointer, latest
from emu2_engine.data.batch import PackedBatch
from emu2_engine.data.loader import build_loader, heldout_caption_loader
from emu2_engine.data.prefetch import Prefetcher, prefetch_depth
from emu2_engine.data.shards import check_shard_spec
from emu2_engine.data.tokenizer import Emu2Tokenizer
from emu2_engine.models import Emu2Config, Emu2Model
from emu2_engine.models.block_linear import accumulation_path
from emu2_engine.models.flops import batch_flops, training_flops
from emu2_engine.ops.backend import check_triton_can_run
from emu2_engine.train.config import JobConfig
from emu2_engine.train.metrics import MetricsWriter, ThroughputMeter, peak_memory_gib
from emu2_engine.train.optim import build_optimizer, build_scheduler
from emu2_engine.train.paths import check_folders, hold_run_folders
from emu2_engine.train.timeline import StepTimeline
from emu2_engine.train.weight_cast import StepWeightCast, block_linear_parameters, fusable_block_linears

STOPPED_FILE = "stopped.json"
"""Written into the run folder by rank 0 when a signal stopped the run and its checkpoint is
complete (`mark_stopped`); removed when a run starts."""
VOCAB_EMBEDDING, VOCAB_HEAD = "llm.embed_tokens.weight", "lm_head.weight"
"""The model's two tensors with a row per vocabulary token."""


def mark_stopped(run_dir: Path, step: int, reason: str, checkpoint_dir: Path) -> None:
    """Write run_dir/stopped.json (atomically) once a signalled stop's checkpoint is complete:
    torchrun exits non-zero after forwarding a signal even when every worker saved and exited
    cleanly, so a job script tells a clean stop from a failure by this file. Both trainers
    (pretraining and the decoders) call it."""
    record = {"step": step, "reason": reason, "checkpoint": str(checkpoint_dir)}
    tmp = run_dir / f".{STOPPED_FILE}.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, run_dir / STOPPED_FILE)


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm."""

    @classmethod
    def after(cls, in_a_row: int, step: int, what: str, loss: float,
              grad_norm: float) -> "NonFiniteError":
        """The error that stops a run (both trainers): `what` names the quantity that was not
        finite ("loss or gradient norm", "gradient norm")."""
        return cls(f"{in_a_row} steps in a row (up to step {step}) had a non-finite {what} (last: "
                   f"loss {loss}, grad norm {grad_norm}); their updates were skipped. Stopping: "
                   f"lower optim.lr, check the data, or resume from the last checkpoint")


class NonFiniteCounts:
    """A trainer's counts of skipped non-finite steps, as a checkpoint entry: a resumed run (a
    restart under ``torchrun --max-restarts`` too) goes on counting, so `train.max_nonfinite`
    steps in a row still stop it. Holds the trainer weakly (the trainer holds its checkpointer,
    which holds this)."""

    def __init__(self, trainer):
        self._trainer = weakref.ref(trainer)

    def state_dict(self) -> dict[str, int]:
        t = self._trainer()
        return {"in_a_row": t.nonfinite_in_a_row, "total": t.nonfinite_total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        t = self._trainer()
        t.nonfinite_in_a_row, t.nonfinite_total = int(state["in_a_row"]), int(state["total"])


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream micro-batches are copied on: one per GPU for the process, so that the
    caching allocator keeps one pool of batch buffers (it caches memory per stream)."""
    index = torch.cuda.current_device() if device.index is None else device.index
    return _copy_stream(index)


def _no_mark(_name: str) -> None:
    """A step without a timeline marks nothing."""


@functools.cache
def _copy_stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(torch.device("cuda", index))


class MicroBatches:
    """The micro-batches of one step, taken from `source` one at a time as the step uses them.

    Iterating validates each batch (through `flops_of`), counts its FLOPs, tokens and images (on
    its CPU tensors), and yields it moved to `device`. Without pipelining the step runs each
    micro-batch's forward and backward before it takes the next, so one micro-batch at a time is
    on the GPU and the prefetcher builds the next ones while the model computes; a pipeline
    schedule needs them all at once and makes a list. `len()` is the count before any is taken. Read once.

    With `image_dtype` (the autocast dtype) the images are cast to it on the device: the patch
    embedding under autocast rounds them to that dtype anyway, so the step computes the same
    numbers, and a pipeline's stage 0 holds half the bytes of its micro-batches' images.

    With `drop_padding_images` (no pipeline schedule: shapes may change between micro-batches)
    the loader's padding images are dropped before the move (`PackedBatch.without_padding_images`),
    so the encoder computes real images only; the counts are taken before. With `add_text_rows`
    each batch gets its ``text_rows``, which let the head loss skip its range checks: only for a
    `flops_of` that validates (`Trainer.batch_flops` does).

    On CUDA the copy (and the image cast) runs on a side stream, and the compute stream waits
    for it only where the micro-batch's own kernels begin: a micro-batch is taken after the
    previous one's backward has been queued, so its copy overlaps that backward instead of
    stalling the compute stream (proxy-1b's 44 images of 448 px are 106 MB in fp32 per
    micro-batch). Its tensors are marked as used by the compute stream, so the allocator does not
    hand their memory to the next copy while the step still reads them."""

    def __init__(self, source, n: int, device: torch.device, flops_of,
                 image_dtype: torch.dtype | None = None, drop_padding_images: bool = False,
                 add_text_rows: bool = False):
        self.source, self.n, self.device, self.flops_of = iter(source), n, device, flops_of
        self.image_dtype = image_dtype
        self.drop_padding_images = drop_padding_images
        self.add_text_rows = add_text_rows
        self.tokens = self.images = 0
        self.flops = 0
        self.data_seconds = 0.0
        self._read = False
        self._copy_stream = copy_stream(device) if device.type == "cuda" else None

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if self._read:
            raise RuntimeError("the micro-batches of a step can be read once")
        self._read = True
        for i in range(self.n):
            start = time.perf_counter()
            try:
                batch = next(self.source)
            except StopIteration:  # inside a generator it would become an opaque RuntimeError
                raise RuntimeError(f"the data loader ended after {i} of the step's {self.n} "
                                   f"micro-batches") from None
            self.data_seconds += time.perf_counter() - start
            self.flops += self.flops_of(batch)
            self.tokens += batch.n_tokens
            self.images += batch.n_images
            if self.drop_padding_images:
                batch = batch.without_padding_images()
            else:  # a pipeline's stage 0 encodes the real images only (counted here, on the CPU)
                batch = batch.with_real_images()
            if self.add_text_rows:  # validated above (flops_of): no sync in the head loss
                batch = batch.with_text_rows()
            yield self._to_device(batch)

    def _to_device(self, batch: PackedBatch) -> PackedBatch:
        """`batch` on the device, images in `image_dtype` (on CUDA: copied on the side stream)."""
        if self._copy_stream is None or batch.input_ids.device.type != "cpu":
            return self._move(batch)  # (a batch made on the GPU is written on the compute stream)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            moved = self._move(batch)
        compute.wait_stream(self._copy_stream)
        for f in fields(moved):
            t = getattr(moved, f.name)
            if isinstance(t, torch.Tensor):
                t.record_stream(compute)
        return moved

    def _move(self, batch: PackedBatch) -> PackedBatch:
        batch = batch.to(self.device, non_blocking=True)
        if self.image_dtype is not None:
            batch.images = batch.images.to(self.image_dtype)
        return batch


@dataclass
class StepResult:
    loss: float
    ce: float
    mse: float
    grad_norm: float
    tokens: int
    images: int
    skipped: bool
    """The loss or the gradient norm was not finite: no optimiser update."""
    lr: float
    """The learning rate of this step's update (the first group's)."""


def pick_device(name: str) -> torch.device:
    """auto: the first GPU if there is one, else the CPU; cuda without a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = cuda, but no CUDA device is visible")
    return torch.device(name)


ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def prefer_expandable_segments() -> bool:
    """Have PyTorch's CUDA caching allocator grow expandable segments, unless the user set
    its configuration (`ALLOC_CONF_VARS`); returns whether it did. torchtitan's launcher does
    the same. A step's tensors change size from micro-batch to micro-batch (the image count
    does), which fragments fixed-size segments, and a fragmented pool makes the allocator call
    cudaFree and cudaMalloc in the middle of a step; cudaFree waits for the GPU. Segments
    allocated before the call keep their kind."""
    if any(os.environ.get(var) for var in ALLOC_CONF_VARS):
        return False
    settle = allocator_settings_call()
    if settle is None:
        return False
    settle("expandable_segments:True")
    return True


def allocator_settings_call():
    """The call that changes the caching allocator's settings at run time ("key:value"), or
    None: the accelerator-generic one where the build has it (torch.cuda.memory's warns there)."""
    return (getattr(torch._C, "_accelerator_setAllocatorSettings", None)
            or getattr(torch.cuda.memory, "_set_allocator_settings", None))


def rank_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype | None]:
    """This rank's device (`pick_device`; on CUDA the GPU of LOCAL_RANK, made current, with
    `prefer_expandable_segments`) and the autocast dtype of `train.dtype` (auto: bf16 on CUDA,
    none on the CPU)."""
    picked = pick_device(device)
    if picked.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        prefer_expandable_segments()
    if dtype == "auto":
        dtype = "bf16" if picked.type == "cuda" else "fp32"
    return picked, (torch.bfloat16 if dtype == "bf16" else None)


def init_stage_weights(models: list[nn.Module], seed: int, device: torch.device) -> None:
    """Materialise pipeline-stage models built on the meta device and initialise each from
    its own random stream, keyed by the first LLaMA block it holds.

    One stream per rank would give every stage after the first (none holds the ViT) the same
    draws, so their k-th blocks would start identical. The values still differ from a model
    initialised whole, and on a CPU mesh DTensor's random ops draw the same values for every
    shard (DTensor's RNG tracker runs on CUDA only): meta initialisation is for GPU runs of
    models too large to build whole (docs/training.md)."""
    for model in models:
        model.to_empty(device=device)
        first = min((int(k) for k in model.llm.layers), default=-1)
        torch.manual_seed(seed * 1_000_003 + first + 1)
        model.init_weights()


def merge_stages(models: list[nn.Module | None]) -> nn.Module | None:
    """This rank's pipeline stages (pruned copies of one `Emu2Model`) as one module whose
    parameters keep the whole model's names, for the optimiser groups and the checkpoints:
    a submodule held by one stage is taken as it is; one that several stages hold (the LLM,
    its ``layers`` dict) holds no parameters of its own and is rebuilt from the union of their
    children. One stage is returned unchanged."""
    present = [m for m in models if m is not None]
    if len(present) <= 1:
        return present[0] if present else None
    if any(True for m in present for _ in m.parameters(recurse=False)):
        raise ValueError(f"{type(present[0]).__name__} holds parameters of its own in "
                         f"{len(present)} pipeline stages; they cannot be merged")
    merged = nn.ModuleDict() if isinstance(present[0], nn.ModuleDict) else nn.Module()
    names = list(dict.fromkeys(name for m in present for name in m._modules))
    for name in names:
        child = merge_stages([m._modules.get(name) for m in present])
        if child is not None:
            merged.add_module(name, child)
    return merged


def world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(value)
    except ValueError:
        world = 0
    if world < 1:
        raise ValueError(f"the environment's WORLD_SIZE must be a positive integer (torchrun sets it), "
                         f"got {value!r}")
    return world


def run_folders(cfg: JobConfig) -> dict[str, Path]:
    """The folders a run writes into, by config key: the run folder, its checkpoints and (when
    profiling) its profiles."""
    run_dir = Path(cfg.train.run_dir)
    folders = {"train.run_dir": run_dir, "checkpoint.dir": Path(cfg.checkpoint.dir or run_dir / "checkpoints")}
    if cfg.profiling.enable:
        folders["profiling.dir"] = Path(cfg.profiling.dir or run_dir / "profile")
    return folders


def data_specs(data) -> dict[str, str]:
    """The shard specs a run reads (the datasets' data.paths entries that are set, and
    data.heldout_path), by config key."""
    specs = {f"data.paths[{i}] ({kind})": spec for i, (kind, spec) in enumerate(zip(data.datasets, data.paths))
             if spec}
    if data.heldout_path:
        specs["data.heldout_path"] = data.heldout_path
    return specs


class Trainer:
    """One rank of a training run: `train()` runs it (resume, steps, checkpoints, metrics),
    `step()` is one optimiser step. Every rank of a torchrun job builds one."""

    def __init__(self, cfg: JobConfig):
        world = world_size()
        cfg.validate(world_size=world)
        check_folders(run_folders(cfg))
        for key, spec in data_specs(cfg.data).items():
            check_shard_spec(spec, key)
        self.cfg = cfg
        self.device, self.autocast_dtype = rank_device(cfg.train.device, cfg.train.dtype)
        check_triton_can_run(self.device)

        self.model_cfg: Emu2Config = cfg.model.build_config()
        self.world = world
        self.dims = self.parallel = None
        if world > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.dims = cfg.parallel.dims()
            self.dims.build_mesh(self.device.type)
        torch.manual_seed(cfg.train.seed)  # every rank builds the same initial model
        meta = self.dims is not None and cfg.parallel.meta_init
        with torch.device("meta" if meta else self.device):
            model = Emu2Model(self.model_cfg)
        for part in (model.visual, model.llm):  # pipeline stages copy the setting
            part.fp32_residual = cfg.train.fp32_residual
        if self.dims is not None:
            from emu2_engine.parallel import MicroBatchShape, parallelize

            shape = MicroBatchShape(rows=cfg.data.rows, seq_len=cfg.data.seq_len,
                                    images=cfg.data.max_images)
            self.parallel = parallelize(model, self.dims, self.dims.mesh,
                                        cfg.parallel.parallel_config(), shape)
            if meta:  # materialise this rank's shards; DTensor initialisers draw per shard
                init_stage_weights(self.parallel.models, cfg.train.seed, self.device)
            model = merge_stages(self.parallel.models)
        else:  # one process: no mesh, but checkpointing and compile apply all the same
            from emu2_engine.parallel.fsdp import apply_ac, apply_compile

            apply_ac(model, cfg.parallel.activation_checkpoint)
            if cfg.parallel.compile:
                apply_compile(model)
        self.model = model
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # (freezes groups whose lr is 0, and the LM head when nothing is a text target)
        self.optimizer = build_optimizer(self.model, cfg.optim, frozen=() if cfg.data.text_loss else (VOCAB_HEAD,))
        # One process under 16-bit autocast: the blocks' linear weights are cast once per step
        # (train.weight_cast = step). FSDP casts its own way (MixedPrecisionPolicy).
        self.weight_cast: StepWeightCast | None = None
        if self.parallel is None and self.autocast_dtype is not None and cfg.train.weight_cast == "step":
            params = block_linear_parameters(self.model)
            fused = fusable_block_linears(self.model) if cfg.train.grad_accumulation_fusion else []
            if params:
                self.weight_cast = StepWeightCast(params, self.autocast_dtype, fused)
        if cfg.train.grad_accumulation_fusion and (self.weight_cast is None or not self.weight_cast.fused):
            why = ("it runs under torchrun with parallelism (FSDP and TP hold their own gradients)"
                   if self.parallel is not None else
                   "it computes in fp32 (no 16-bit autocast)" if self.autocast_dtype is None else
                   "its blocks have no trainable linear weights")
            raise ValueError(f"train.grad_accumulation_fusion applies to one process under bf16/fp16 "
                             f"autocast with weight_cast = 'step'; this run cannot use it: {why}")
        if cfg.train.grad_accumulation_fusion and self.device.type == "cuda":
            path = accumulation_path(self.device, self.autocast_dtype)
            if path != "addmm-fp32-epilogue":
                warnings.warn(f"train.grad_accumulation_fusion: this PyTorch build's addmm does not add "
                              f"a 16-bit product into an fp32 output, so the weight gradients are "
                              f"accumulated as {path!r}, as without the fusion (no gain)", stacklevel=2)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.steps, cfg.optim)
        self.tokenizer = Emu2Tokenizer(chat=self.model_cfg.chat)
        dp_rank, dp = (self.dims.dp_rank, self.dims.dp) if self.dims else (0, 1)
        loader = build_loader(cfg.data, self.tokenizer, self.model_cfg, rank=dp_rank, world_size=dp)
        # The checkpoints save the loader's state through this object: a prefetcher gives the
        # position after the last batch trained on, not that of the batches built ahead.
        depth = prefetch_depth(cfg.data.prefetch, self.device)
        self.loader = Prefetcher(loader, depth=depth, device=self.device) if depth else loader
        self.step_count = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.run_dir = Path(cfg.train.run_dir)
        self.checkpointer = Checkpointer(
            cfg.checkpoint.dir or self.run_dir / "checkpoints", self.model, self.optimizer,
            scheduler=self.scheduler, dataloader=self.loader, keep=cfg.checkpoint.keep,
            async_save=cfg.checkpoint.async_save, data_rank=(dp_rank, dp),
            extra={"nonfinite": NonFiniteCounts(self)})
        self._stop_signal: str | None = None

    # -- one step ---------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def compute(self):
        """Autocast, and (`train.weight_cast = step`) the blocks' linear weights held in the
        autocast dtype: run a step's forwards *and* backwards inside one of these. On leaving,
        the parameters hold their fp32 values and the step's fp32 gradients."""
        with contextlib.ExitStack() as stack:
            if self.weight_cast is not None:
                stack.enter_context(self.weight_cast.cast())
            stack.enter_context(self.autocast())
            yield

    def forward_backward(self, batches: MicroBatches, timeline: StepTimeline | None = None) -> torch.Tensor:
        """Forward and backward over one step's micro-batches; gradients of their mean loss.
        Returns that mean as ``[total, ce, mse]`` (the same on every rank). `timeline` (if
        given) marks the weights' cast, each micro-batch (or, pipelined, the whole schedule)
        and the return of the fp32 weights and gradients."""
        n = len(batches)
        mark = timeline.mark if timeline is not None else _no_mark
        with self.compute():
            mark("weight cast")
            if self.parallel is not None:
                losses = self.parallel.forward_backward(batches)
                mark("forward + backward")
            else:
                losses = torch.zeros(3, device=self.device)
                for i, batch in enumerate(batches, 1):
                    out = self.model(batch)
                    (out.total / n).backward()
                    losses += torch.stack([out.total, out.ce, out.mse]).detach().float() / n
                    if timeline is not None:
                        timeline.mark(f"micro-batch {i}")
        mark("fp32 weights back")
        return losses

    def micro_batches(self, source, n: int) -> MicroBatches:
        """`n` micro-batches from `source` for one step on this rank: validated, counted, given
        their text rows, moved to the device; padding images are dropped unless a pipeline
        schedule needs fixed shapes."""
        pipelined = self.parallel is not None and self.parallel.schedule is not None
        return MicroBatches(source, n, self.device, self.batch_flops, self.autocast_dtype,
                            drop_padding_images=not pipelined, add_text_rows=True)

    def batch_flops(self, batch: PackedBatch) -> int:
        """Validate a micro-batch (still on the CPU) and return its training FLOPs."""
        cfg = self.model_cfg
        batch.validate(cfg.llm.vocab_size, cfg.n_query, cfg.vision.image_size,
                       frame_n_query=cfg.frame_queries, frame_slot=cfg.special_ids.gen_img)
        optim = self.cfg.optim
        return training_flops(batch_flops(cfg, batch), optim.lr_vision > 0, optim.lr_projector > 0, optim.lr > 0)

    def clip_grad_norm(self) -> torch.Tensor:
        """The global gradient norm before clipping; clips to optim.grad_clip (0: no clipping)."""
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        if self.parallel is not None:
            return self.parallel.clip_grad_norm_(clip)
        params = [p for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, clip)

    def step(self, batches: list[PackedBatch] | MicroBatches,
             timeline: StepTimeline | None = None) -> StepResult:
        """One optimiser step on this rank's micro-batches (`parallel.microbatches` of them): a
        list, or a `MicroBatches` that takes them from the loader as the step goes.
        A non-finite loss or gradient norm skips the update; the schedule advances anyway, so
        the learning rate stays a function of the step. `timeline` (a fresh `StepTimeline`)
        records where the step's time goes."""
        self.model.train()
        mark = timeline.mark if timeline is not None else _no_mark
        if not isinstance(batches, MicroBatches):
            batches = self.micro_batches(batches, len(batches))
        losses = self.forward_backward(batches, timeline)
        lr = self.scheduler.get_last_lr()[0]   # this update's, before the schedule moves on
        norm = self.clip_grad_norm()
        mark("clip")
        loss, ce, mse = losses.tolist()
        grad_norm = float(norm)
        mark("read-back")
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
        else:
            self.nonfinite_in_a_row = 0
            self.optimizer.step()
        mark("optimizer")
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step: the schedule still advances
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        mark("zero_grad + schedule")
        self.step_count += 1
        return StepResult(loss=loss, ce=ce, mse=mse, grad_norm=grad_norm, tokens=batches.tokens,
                          images=batches.images, skipped=skipped, lr=lr)

    # -- the run ----------------------------------------------------------------------------
    def resume(self) -> int | None:
        """Restore the newest checkpoint (checkpoint.resume = auto) or the named one; returns
        its step, or None for a fresh start."""
        how = self.cfg.checkpoint.resume
        if how not in ("auto", "none") and (own := self.checkpointer.continues(how)) is not None:
            # the same command again (a torchrun restart, a requeue, after a SIGTERM stop): the
            # named checkpoint started this run, which has saved its own since
            if self.rank == 0:
                print(f"checkpoint.resume = {how} started this run, which has saved since: resuming "
                      f"from its newest checkpoint {own} (to start over from {how}, delete "
                      f"{self.checkpointer.directory / RESUMED_FROM})")
            how = "auto"
        step = None if how == "none" else self.checkpointer.load(None if how == "auto" else how)
        if step is not None:
            self.step_count = step
            if self.rank == 0:
                source = latest(self.checkpointer.directory) if how == "auto" else how
                print(f"resumed from step {step} ({source})")
        elif self.cfg.checkpoint.init_from:
            what = self.init_weights(self.cfg.checkpoint.init_from)
            if self.rank == 0:
                print(f"weights from {self.cfg.checkpoint.init_from} ({what}); step, optimiser, "
                      f"schedule and data start fresh")
        return step

    def init_weights(self, source: str) -> str:
        """Load the model's weights (only) from `source` at the start of a new run
        (`checkpoint.init_from`), and say what it was: an engine checkpoint folder (DCP; any
        layout loads into any other), or, in a one-process run, a weights file or folder: the
        engine's own state dict (`python -m emu2_engine.convert` writes one) or released Emu2
        weights. Nothing is loaded unless every tensor matches."""
        from emu2_engine.checkpoint.dcp import checkpoint_shapes, is_checkpoint_folder, load_model_weights
        from emu2_engine.checkpoint.released import holds_released_names, load_released_weights, load_weights

        path = Path(source).expanduser()
        if not path.exists():  # checked here, where it is read (a resumed run never reads it)
            raise FileNotFoundError(f"checkpoint.init_from = {source!r} does not exist: expected an engine "
                                    f"checkpoint folder or a weights file or folder")
        grow = self._chat_vocabulary_growth()
        if is_checkpoint_folder(path):
            load_model_weights(path, self.model, strict=not (self.parallel and self.parallel.schedule), grow=grow)
            shapes = checkpoint_shapes(path)
            grown = any(shapes.get(name, (None,))[0] == rows for name, rows in grow.items())
            return "an engine checkpoint" + self._grown_note(grown)
        if self.parallel is not None:
            raise ValueError(f"checkpoint.init_from = {source!r} is not an engine checkpoint folder: "
                             f"a parallel layout loads weights from one (write it with `python -m "
                             f"emu2_engine.convert --preset {self.cfg.model.preset} --from {source} "
                             f"--to <folder>`)")
        if holds_released_names(path):
            report = load_released_weights(self.model, path, grow=grow)
            return "released Emu2 weights" + self._grown_note(bool(report.grown_keys))
        report = load_weights(self.model, path, grow=grow)
        return "engine weights" + self._grown_note(bool(report.grown_keys))

    def _chat_vocabulary_growth(self) -> dict[str, int]:
        """For a chat model, the rows its vocabulary tensors may be loaded from: Emu2's
        vocabulary without [USER] and [ASSISTANT] (32,272 of the chat model's 32,274 tokens), as
        Emu2-Chat is tuned from Emu2. The two new rows start at the mean of the others."""
        from emu2_engine.data.tokens import added_tokens

        cfg = self.model_cfg
        if not cfg.chat:
            return {}
        rows = cfg.base_vocab_size + len(added_tokens(chat=False))
        return {VOCAB_EMBEDDING: rows, VOCAB_HEAD: rows}

    def _grown_note(self, grown: bool) -> str:
        if not grown:
            return ""
        from emu2_engine.data.tokens import CHAT_SPECIAL_TOKENS

        vocab = self.model_cfg.llm.vocab_size
        return (f"; vocabulary grown from {vocab - len(CHAT_SPECIAL_TOKENS)} to {vocab} tokens: "
                f"{' and '.join(CHAT_SPECIAL_TOKENS)} start at the mean of the other rows")

    def train(self, progress: bool = True, stop_at: int | None = None) -> list[dict]:
        """Run to `train.steps` (from the checkpoint that `checkpoint.resume` picks); return
        the metric records (also in run_dir/metrics.jsonl). `stop_at`: end after that step
        with a checkpoint, as SIGTERM would (the learning-rate schedule still spans
        train.steps)."""
        with hold_run_folders(run_folders(self.cfg), lead=self.rank == 0):
            return self._train(progress, stop_at)

    def _train(self, progress: bool, stop_at: int | None) -> list[dict]:
        cfg = self.cfg
        lead = self.rank == 0
        resumed = self.resume()
        if lead:
            cfg.save(self.run_dir / "config.toml")
            (self.run_dir / STOPPED_FILE).unlink(missing_ok=True)  # this run has not stopped yet
        writer = MetricsWriter(self.run_dir, enabled=lead, tensorboard=cfg.metrics.tensorboard,
                               keep_until=resumed)
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        meter = ThroughputMeter(device_name, devices=self.world)
        model_share = self.dims.tp * self.dims.pp if self.dims else 1  # ranks that split one batch
        end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
        records: list[dict] = []
        bar = tqdm(initial=self.step_count, total=cfg.train.steps, disable=not (progress and lead),
                   dynamic_ncols=True, desc=f"{self.model_cfg.name} on {device_name or 'cpu'}",
                   mininterval=0.5)
        stop = False
        profiler = cfg.profiling.profiler(self.run_dir, self.rank, self.device, self.step_count)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        failed = True
        try:
            if profiler is not None:
                profiler.start()
            while self.step_count < end:
                start = time.perf_counter()
                batches = self.micro_batches(self.loader, cfg.parallel.microbatches)
                result = self.step(batches)
                data_seconds, flops = batches.data_seconds, batches.flops
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                # the job's totals (each rank counts its share of its batches) and whether any
                # rank was signalled, in one reduction, so every rank stops at the same step
                totals = torch.tensor([result.tokens, result.images, flops,
                                       float(self._stop_signal is not None)], dtype=torch.float64)
                totals[:3] /= model_share
                if dist.is_initialized():
                    totals = totals.to(self.device)
                    dist.all_reduce(totals)
                    totals = totals.cpu()
                stop = totals[3].item() > 0
                meter.update(tokens=totals[0].item(), images=totals[1].item(), flops=totals[2].item(),
                             seconds=elapsed, data_seconds=data_seconds)
                if profiler is not None:
                    profiler.step(self.step_count)
                bar.update(1)
                rates = meter.report()
                bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{rates['tokens_per_s']:,.0f}",
                                mfu="n/a" if rates["mfu"] is None else f"{rates['mfu']:.1%}",
                                refresh=False)
                if (self.step_count % cfg.metrics.log_interval == 0 or self.step_count == end
                        or result.skipped):
                    record = {"step": self.step_count, "loss": result.loss, "ce": result.ce,
                              "mse": result.mse, "grad_norm": result.grad_norm,
                              "lr": result.lr, "tokens": round(totals[0].item()), "images": round(totals[1].item()),
                              **rates,
                              "memory_gib": peak_memory_gib(self.device),
                              "nonfinite_steps": self.nonfinite_total}
                    records.append(record)
                    writer.write(record)
                    meter.reset()
                if self.nonfinite_in_a_row >= cfg.train.max_nonfinite:
                    raise NonFiniteError.after(self.nonfinite_in_a_row, self.step_count,
                                               "loss or gradient norm", result.loss, result.grad_norm)
                interval = cfg.checkpoint.interval
                reason = self._stop_signal or "a signal on another rank"
                if stop and lead:  # said before the save: a launcher may kill us during it
                    bar.close()
                    print(f"pretrain: {reason}: saving a checkpoint of step {self.step_count}",
                          flush=True)
                if stop or (interval and self.step_count % interval == 0) or self.step_count == end:
                    self.checkpointer.save(self.step_count)
                if stop:
                    self.checkpointer.wait()  # an async save must be complete before we say so
                    if lead:
                        mark_stopped(self.run_dir, self.step_count, reason, self.checkpointer.directory)
                        print(f"pretrain: {reason}: checkpoint of step {self.step_count} saved in "
                              f"{self.checkpointer.directory}; run the same command to resume",
                              flush=True)
                    break
            # the last asynchronous save completes while SIGTERM/SIGINT are still ours: a signal
            # now must not kill the process and lose that checkpoint
            self.checkpointer.wait()
            failed = False
        finally:
            if failed:  # an error is on its way out: this rank's own save completes, without
                try:    # waiting for ranks that may be stuck waiting for this one
                    self.checkpointer.wait(barrier=False)
                except CheckpointError as e:
                    warnings.warn(f"{e} (while stopping on an error)", stacklevel=2)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if profiler is not None:
                profiler.stop()
            if isinstance(self.loader, Prefetcher):
                self.loader.close()  # no thread outlives the run; the position is kept
            bar.close()
            writer.close()
        if stop or self.step_count < cfg.train.steps:
            return records
        data = {"step": self.step_count, "skipped": dict(self.loader.skip_counts()),
                "truncated": self.loader.truncated}
        records.append(data)
        writer.write(data)
        # The check reads image-caption pairs of the same world the model trained on: with real
        # data and no held-out shards of it, the shapes world would give a meaningless number.
        real_data = any(cfg.data.paths) and not cfg.data.heldout_path
        if cfg.train.eval_batches and real_data and self.rank == 0:
            print("end-of-run image check skipped: the datasets are real shards and "
                  "data.heldout_path names no held-out image-text shards of them")
        if cfg.train.eval_batches and self.parallel is None and not real_data:
            record = {"step": self.step_count, **self.evaluate_grounding(cfg.train.eval_batches)}
            records.append(record)
            writer.write(record)
        return records

    def _on_signal(self, signum: int, _frame) -> None:
        self._stop_signal = f"received {signal.Signals(signum).name}"

    @torch.no_grad()
    def evaluate_grounding(self, n_batches: int) -> dict:
        """Caption loss on held-out image-caption pairs (`heldout_caption_loader`), image
        first, with each sample's own image and with another sample's image. A model that
        reads its images does better with the right ones; a captioner that ignores them
        scores the same on both. At most `n_batches` micro-batches, each held-out sample read
        at most once (a small split ends the check early); the losses are means over all their
        caption tokens. Single process only (the parallel trainer skips it)."""
        loader = heldout_caption_loader(self.cfg.data, self.tokenizer, self.model_cfg)
        self.model.eval()
        right = wrong = 0.0
        tokens = batches = 0
        previous = None  # the last real image of the batch before (a one-image batch's other image)
        with self.compute():  # (the weights cast once for all the batches)
            for batch in itertools.islice(loader, n_batches):
                batch = batch.to(self.device)
                real = batch.image_mask.nonzero().squeeze(1)
                if len(real) == 0:
                    continue
                other = batch.images[real[-1]].clone()
                if len(real) == 1 and previous is None:
                    previous = other  # no other image to swap in yet: the two losses would be one
                    continue
                out = self.model(batch)
                n = int(out.n_text)
                right += out.ce.item() * n
                # every real image moves to another sample (padding images stay padding); a
                # batch of one takes the previous batch's last image
                if len(real) > 1:
                    batch.images[real] = batch.images[real.roll(1)]
                else:
                    batch.images[real] = previous
                previous = other
                wrong += self.model(batch).ce.item() * n
                tokens, batches = tokens + n, batches + 1
        self.model.train()
        if not tokens:
            print("end-of-run image check skipped: the held-out batches gave no caption to score "
                  "with two images")
            return {}
        return {"heldout_caption_ce": right / tokens, "heldout_caption_ce_wrong_images": wrong / tokens,
                "heldout_caption_tokens": tokens, "heldout_caption_batches": batches}
