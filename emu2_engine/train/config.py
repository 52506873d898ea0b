"""The run configuration: one dataclass per section, one TOML file per run, dotted CLI overrides.

``pretrain --config configs/debug.toml --train.steps=50 --optim.lr=1e-3`` reads the file,
applies the overrides (values parsed as TOML literals, falling back to plain strings), checks
every key and type, and writes the resolved config into the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints


@dataclass
class ModelSection:
    """Which model to build."""

    preset: str = "debug"
    """A preset of `emu2_engine.models.config.PRESETS`."""
    regression_weight: float = 1.0
    """Weight of the image-regression MSE against the text cross-entropy."""
    llm_layers: int = 0
    """LLM blocks, overriding the preset's count (0 keeps it): a shallower or deeper proxy of
    a preset, e.g. the debug model deep enough for a 4-stage pipeline."""

    def build_config(self):
        """The `Emu2Config` of this section: the preset with its overrides."""
        from dataclasses import replace

        from emu2_engine.models.config import PRESETS

        cfg = replace(PRESETS[self.preset], regression_weight=self.regression_weight)
        if self.llm_layers:
            cfg = replace(cfg, llm=replace(cfg.llm, layers=self.llm_layers))
        cfg.validate()
        return cfg


DATASET_KINDS = ("image_text", "video_text", "interleaved", "grounded", "text", "vqa", "chat", "edit")
"""Sample types a dataset can hold (`emu2_engine.data.records`); each has its Emu2 layout."""
CHAT_TEMPLATE_KINDS = ("chat", "vqa", "image_text")
"""The kinds the chat template lays out (`data.sequences.SampleBuilder.build_chat_record`)."""


def _unregressed(d: "DataSection") -> list[str]:
    """The blended kinds none of whose samples has a regressed image: not listed in
    data.regress, a kind whose images never follow text (text, vqa, chat), or one laid out
    image first always (image_text with image_first_prob 1, grounded with grounded_image_first 1)."""
    never = {"text", "vqa", "chat"}
    if d.image_first_prob >= 1:
        never |= {"image_text", "video_text"}
    if d.grounded_image_first >= 1:
        never.add("grounded")
    return sorted({k for k in d.datasets if k not in d.regress or k in never})


@dataclass
class DataSection:
    """What the model reads: a weighted blend of WebDataset shard sets, laid out with the Emu2
    sequence layouts and packed into rows. Datasets with an empty path read the shapes world,
    generated on first use into `cache_dir`."""

    datasets: list[str] = field(default_factory=lambda: ["image_text", "grounded", "text"])
    """Kind of each blended dataset: image_text, video_text, interleaved, grounded, text, vqa,
    chat (LLaVA-style conversations, laid out with Emu2-Chat's template) or edit (InstructPix2Pix
    image edits, Emu2-Gen's layout) (`docs/data.md`)."""
    weights: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])
    """Relative share of records drawn from each dataset (Emu2 stage 2: 12800, 6400, 3200, 800);
    a long text record gives several samples (`docs/data.md`, Blending)."""
    paths: list[str] = field(default_factory=lambda: ["", "", ""])
    """Shard directory (or .tar file) of each dataset; "" reads the shapes world's split of that kind."""
    heldout_path: str = ""
    """Held-out image-text shards for the end-of-run check; "" reads the shapes world's held-out split."""
    cache_dir: str = "~/.cache/emu2_engine"
    """Where the shapes world is generated on first use (one folder per seed and scale)."""
    shapes_scale: int = 1
    """Size of the generated shapes world: 2,000 training image-caption pairs (and 300 of each
    other kind) times this."""
    seq_len: int = 256
    """Tokens per packed row."""
    rows: int = 4
    """Packed rows per micro-batch."""
    max_images: int = 24
    """Images (video frames count one each) per micro-batch; fewer are padded, so shapes are
    fixed. The debug blend averages 24 images in 4 rows of 256 when uncapped."""
    too_long: str = "truncate"
    """A sample longer than a row or with more than max_images images: truncate (at a boundary
    that splits no image) or drop."""
    image_first_prob: float = 0.5
    """Probability that an image (or video) precedes its text (Emu2: 0.5)."""
    phrase_first_prob: float = 0.7
    """Probability that a grounded phrase precedes its box (Emu2: 0.7)."""
    grounded_image_first: float = 1.0
    """Probability that a grounded caption's image precedes it (`[IMG]...[/IMG]<grounding>caption`,
    Kosmos-2's layout); otherwise it follows (`<grounding>caption[IMG]...[/IMG]`: grounded
    text-to-image, whose image has text before it to be regressed from; Emu2-Gen: 0)."""
    interleaved_images: int = 8
    """Images sampled from an interleaved document (Emu2: 8)."""
    interleaved_len: int = 256
    """Token budget of an interleaved sample (Emu2: 1024), at most seq_len."""
    text_len: int = 256
    """Tokens per language-only chunk (Emu2: 2048), at most seq_len."""
    video_frames: int = 4
    """Frames sampled uniformly from each video (Emu2: 8 in pretraining)."""
    regress: list[str] = field(default_factory=list)
    """Kinds whose images (those with text before them) are regression targets (stage 2)."""
    bidirectional: bool = False
    """Images that are not regression targets attend to themselves bidirectionally."""
    text_loss: bool = True
    """False: no token is a text target, so the step's loss is the image regression alone (Emu2-Gen
    tunes with the image loss only) and the LM head computes nothing. The end-of-run check still
    reads its held-out captions' text loss."""
    template: str = "pretrain"
    """How records become sequences: "pretrain" (Emu2's pretraining layouts; chat records still
    use the chat template) or "chat" (Emu2-Chat instruction tuning: every record a conversation,
    `<system> [USER]: <instruction> [ASSISTANT]: <answer>`, the loss on the answers only; VQA and
    image-caption records become academic-task conversations). Chat needs a chat preset."""
    seed: int = 1234
    """Seed of the shapes world, of the shard order and of the layout draws."""
    prefetch: int = -1
    """Micro-batches built ahead in a background thread while the model trains; 0: each is
    built when the step asks for it; -1 (auto): 2 on a GPU, 0 on the CPU, where the thread
    would compete with the model for the cores (`data.prefetch.prefetch_depth`)."""

@dataclass
class OptimSection:
    """AdamW with one peak learning rate per parameter group."""

    lr: float = 1e-3
    """Peak learning rate of the LLM (embeddings, blocks, heads)."""
    lr_vision: float = 1e-3
    """Peak learning rate of the vision encoder (0 freezes it)."""
    lr_projector: float = 1e-3
    """Peak learning rate of project_up and project_down."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices (norms, biases and position/CLS embeddings get none)."""
    warmup_steps: int = 20
    """Linear warm-up from 0 to the peak."""
    schedule: str = "cosine"
    """Decay after warm-up: cosine or linear."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    grad_clip: float = 5.0
    """Clip the global gradient norm to this (0 turns clipping off); the paper uses 5.0."""


@dataclass
class TrainSection:
    """The loop."""

    steps: int = 1000
    """Optimiser steps (the debug model starts reading its images after about 500)."""
    seed: int = 0
    """Seed of the model initialisation."""
    device: str = "auto"
    """auto (first GPU if any, else CPU), cpu or cuda."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 autocast on CUDA, fp32 on the CPU), fp32 or bf16."""
    fp32_residual: bool = False
    """Under bf16 autocast over fp32 parameters (no data parallelism), keep the ViT's and the
    LLM's residual streams in fp32 (Megatron-LM's --fp32-residual-connection). Off: they run in
    bf16, as with Megatron's default. Under FSDP (dp > 1) they are bf16 either way: FSDP2 casts
    every block's input to its bf16 parameters' dtype."""
    weight_cast: str = "step"
    """Under 16-bit autocast in one process: "step" casts the blocks' linear weights to the
    autocast dtype once per optimiser step and accumulates their gradients in fp32 over the
    micro-batches (`train/weight_cast.py`; the same numbers, less memory traffic, and 2 bytes
    per block parameter more memory); "op" lets autocast cast them at every use, each
    micro-batch. FSDP runs cast through their MixedPrecisionPolicy either way."""
    grad_accumulation_fusion: bool = False
    """With weight_cast = "step": the blocks' linear layers add their weight gradients into the
    fp32 accumulators inside the weight-gradient GEMM (Megatron-LM's
    --gradient-accumulation-fusion; `models/block_linear.py`), instead of writing a bf16
    gradient that a second kernel adds. Off by default until a GPU run measures it. The sum is
    slightly more exact, so it is not equal bit for bit to the unfused step. Needs one process
    under 16-bit autocast and weight_cast = "step"; refused elsewhere."""
    global_batch: int = 0
    """Packed rows per optimiser step over all data-parallel ranks, as the recipe intends it;
    a layout that does not give dp x parallel.microbatches x data.rows rows is refused, with
    the micro-batch count that would. 0: no check."""
    max_nonfinite: int = 5
    """Stop the run after this many steps in a row whose loss or gradient norm is not finite
    (each such step is skipped: no optimiser update)."""
    eval_batches: int = 8
    """Held-out batches for the end-of-run grounding check, at most (each held-out pair is
    read once; a smaller split gives fewer); 0 skips it."""
    run_dir: str = "runs/debug"
    """Where the resolved config, the metrics and (by default) the checkpoints are written."""


@dataclass
class ParallelSection:
    """How the ranks split the work (`emu2_engine.parallel`, docs/parallel.md). The product
    dp_replicate x dp_shard x tp x pp must be the torchrun world size."""

    dp_replicate: int = 1
    """HSDP replicas (needs dp_shard > 1)."""
    dp_shard: int = 1
    """FSDP degree: ranks that shard parameters, gradients and optimiser state."""
    tp: int = 1
    """Tensor + sequence parallel degree (ranks of one node)."""
    pp: int = 1
    """Pipeline degree."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: 1f1b, interleaved-1f1b, zero-bubble or zbv."""
    stages_per_rank: int = 1
    """Pipeline stages per rank: 1 for 1f1b, 2 for zbv, >= 2 for the others."""
    microbatches: int = 1
    """Micro-batches (of data.rows rows each) per optimiser step on each data-parallel rank."""
    activation_checkpoint: str = "none"
    """none, selective or full."""
    compile: bool = False
    """torch.compile each ViT and LLaMA block."""
    param_dtype: str = "bfloat16"
    """Dtype FSDP gathers parameters in for compute (float32, bfloat16, float16); dp > 1 only."""
    meta_init: bool = False
    """Build the model on the meta device and initialise only this rank's shards, in place
    (real sizes: the whole model fits no device). Off: every rank builds the whole model, so a
    run starts from the same weights as a one-process run."""

    def dims(self):
        """The `ParallelDims` of these degrees."""
        from emu2_engine.parallel import ParallelDims

        return ParallelDims(dp_replicate=self.dp_replicate, dp_shard=self.dp_shard, tp=self.tp,
                            pp=self.pp)

    def parallel_config(self):
        """The `ParallelConfig` that `parallelize` takes."""
        from emu2_engine.parallel import ParallelConfig

        return ParallelConfig(activation_checkpoint=self.activation_checkpoint,
                              compile=self.compile, param_dtype=self.param_dtype,
                              pp_schedule=self.pp_schedule, stages_per_rank=self.stages_per_rank,
                              microbatches=self.microbatches)


@dataclass
class CheckpointSection:
    """Distributed checkpoints (`emu2_engine.checkpoint.dcp`): model, optimiser, schedule,
    data-loader position, RNG and step, one folder per step."""

    dir: str = ""
    """Checkpoint directory; "" is run_dir/checkpoints."""
    interval: int = 500
    """Steps between checkpoints (0: none during the run); the last step, and a step
    interrupted by SIGTERM or SIGINT, are always saved."""
    keep: int = 2
    """Newest complete checkpoints kept."""
    async_save: bool = False
    """Write checkpoints in a background thread once the state is staged in host memory."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in dir if there is one (what a rank
    restarted by torchrun --max-restarts does); none: start afresh; else a checkpoint folder,
    which starts the run: once the run has saved its own checkpoints, the same command goes on
    from them (dir/resumed_from.json records it; delete that file to start over)."""
    init_from: str = ""
    """Start a new run from these model weights only: a checkpoint folder of this engine
    (step-NNNNNN, DCP) or a released/converted weights file or folder. The step, optimiser,
    schedule and data position start fresh. Ignored when the run resumes from its own
    checkpoint (resume = auto finding one in dir); cannot be combined with a resume path."""


@dataclass
class MetricsSection:
    """Per-step records: run_dir/metrics.jsonl and, if the package is installed, TensorBoard."""

    log_interval: int = 10
    """Steps between metric records (the progress bar updates every step)."""
    tensorboard: bool = True
    """Also write the records to run_dir/tensorboard (skipped, with one message, if the
    tensorboard package is missing)."""


@dataclass
class ProfilingSection:
    """PyTorch profiler traces of chosen steps and CUDA memory snapshots, per rank
    (`emu2_engine.train.profiling`)."""

    enable: bool = False
    """Record the last `active` steps of every `interval` steps."""
    interval: int = 100
    """Steps between recorded windows: steps interval, 2 x interval, ... are recorded."""
    active: int = 1
    """Steps recorded per window."""
    warmup: int = 1
    """Steps before each window with the profiler running but not recording."""
    memory_snapshot: bool = False
    """CUDA: also record the caching allocator's history and dump it with each window."""
    dir: str = ""
    """Where the windows go; "" is run_dir/profile."""

    def problem(self) -> str:
        """What makes these settings unusable ("" when nothing, or when profiling is off)."""
        if not self.enable or (self.interval >= 1 and self.active >= 1 and self.warmup >= 0
                               and self.warmup + self.active <= self.interval):
            return ""
        return (f"profiling needs interval >= 1, active >= 1, warmup >= 0 and warmup + active <= "
                f"interval, got interval {self.interval}, active {self.active}, warmup {self.warmup}")

    def profiler(self, run_dir: Path, rank: int, device, start_step: int):
        """The run's `StepProfiler` when enabled, else None."""
        if not self.enable:
            return None
        from emu2_engine.train.profiling import StepProfiler

        return StepProfiler(self.interval, self.active, self.warmup, self.dir or Path(run_dir) / "profile",
                            rank, device, start_step, memory_snapshot=self.memory_snapshot)


@dataclass
class JobConfig:
    """A whole run."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    profiling: ProfilingSection = field(default_factory=ProfilingSection)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "JobConfig":
        """Defaults, then the TOML file (if any), then `--section.key=value` overrides."""
        cfg = cls()
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} is a directory, not a TOML file" if path.is_dir()
                                        else f"config file {path} does not exist")
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"config file {path} is not valid TOML: {e}") from None
            cfg.update(data, where=str(path))
        for item in overrides:
            cfg.update(_parse_override(item), where=f"override {item!r}")
        cfg.expand_user_paths()
        cfg.validate()
        return cfg

    USER_PATHS = ("train.run_dir", "checkpoint.dir", "checkpoint.resume", "checkpoint.init_from",
                  "profiling.dir", "data.paths", "data.heldout_path")
    """The keys that name files or folders, whose leading ~ `load` expands to the home folder (a
    run_dir of "~/runs/x" is not a folder named "~" in the working directory). data.cache_dir
    keeps its ~ in the saved config and is expanded where it is used."""

    def expand_user_paths(self) -> None:
        """Expand a leading ~ in every `USER_PATHS` value (each entry of a list)."""
        for key in self.USER_PATHS:
            section_name, name = key.split(".")
            section = getattr(self, section_name)
            value = getattr(section, name)
            if isinstance(value, list):
                setattr(section, name, [os.path.expanduser(v) for v in value])
            else:
                setattr(section, name, os.path.expanduser(value))

    def update(self, data: dict, where: str) -> None:
        """Merge a nested dict of values, checking every section, key and type."""
        for section_name, values in data.items():
            section = getattr(self, section_name, None)
            if section is None or not dataclasses.is_dataclass(section):
                sections = [f.name for f in dataclasses.fields(self)]
                if not isinstance(values, dict):
                    raise ValueError(f"{where}: key {section_name!r} outside every section; keys "
                                     f"belong in one of the sections {sections}")
                raise ValueError(f"{where}: unknown config section [{section_name}]; expected one of {sections}")
            if not isinstance(values, dict):
                raise ValueError(f"{where}: [{section_name}] must be a table of keys")
            hints = get_type_hints(type(section))
            for key, value in values.items():
                if key not in hints:
                    raise ValueError(f"{where}: unknown key {section_name}.{key}; expected one of "
                                     f"{sorted(hints)}")
                setattr(section, key, _coerce(value, hints[key], f"{section_name}.{key}", where))

    def validate(self, world_size: int | None = None) -> None:
        """One line for the first value that cannot work. With `world_size`, also the parallel
        degrees against it (`pretrain` checks that once torchrun has set WORLD_SIZE)."""
        from emu2_engine.models.config import PRESETS

        if self.model.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {self.model.preset!r}")
        max_positions = PRESETS[self.model.preset].llm.max_positions
        if self.data.seq_len > max_positions:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds the {self.model.preset} "
                             f"model's max_positions ({max_positions})")
        d, o = self.data, self.optim
        n = len(d.datasets)
        unknown = sorted(set(d.datasets + d.regress) - set(DATASET_KINDS))
        checks = [
            (n > 0, "data.datasets must name at least one dataset"),
            (not unknown, f"data.datasets and data.regress take kinds among {list(DATASET_KINDS)}, "
                          f"got {unknown}"),
            ("text" not in d.regress, "data.regress lists text, whose samples hold no image to regress"),
            ("chat" not in d.regress,
             "data.regress lists chat: the chat template regresses nothing (Emu2-Chat tunes with the "
             "text loss on the answers only)"),
            (d.template in ("pretrain", "chat"), f"data.template must be pretrain or chat, got {d.template!r}"),
            (d.template != "chat" or set(d.datasets) <= set(CHAT_TEMPLATE_KINDS),
             f"data.template = chat lays out the kinds {list(CHAT_TEMPLATE_KINDS)} as conversations; "
             f"{sorted(set(d.datasets) - set(CHAT_TEMPLATE_KINDS))} have no chat form (use template = "
             f"pretrain for them)"),
            (d.text_loss or d.template != "chat",
             "data.text_loss = false with data.template = chat: the chat template's only loss is the "
             "text of the answers"),
            (d.text_loss or (d.regress and self.model.regression_weight > 0),
             f"data.text_loss = false leaves the image regression as the only loss, but "
             f"{'data.regress is empty' if not d.regress else 'model.regression_weight is 0'}: "
             f"nothing would be learned"),
            (d.text_loss or not _unregressed(d),
             f"data.text_loss = false leaves the image regression as the only loss, and the "
             f"datasets {_unregressed(d)} never give a regressed image (not in data.regress, a kind "
             f"without images after text, or laid out image first): every sample would be skipped"),
            (d.template != "chat" or not d.regress,
             f"data.template = chat regresses nothing (Emu2-Chat tunes with the text loss on the "
             f"answers only), but data.regress lists {d.regress}"),
            (len(d.weights) == n and len(d.paths) == n,
             f"data.weights and data.paths need one entry per dataset ({n}), got "
             f"{len(d.weights)} and {len(d.paths)}"),
            (all(_finite_at_least(w, 0) for w in d.weights) and 0 < sum(d.weights) < math.inf,
             f"data.weights must be finite, >= 0, not all 0 and of a finite sum, got {d.weights}"),
            (0 <= d.seed < 2 ** 63, f"data.seed must lie in [0, 2**63), got {d.seed}"),
            (0 <= self.train.seed < 2 ** 63, f"train.seed must lie in [0, 2**63), got {self.train.seed}"),
            (d.shapes_scale > 0, f"data.shapes_scale must be positive, got {d.shapes_scale}"),
            (d.seq_len > 0, f"data.seq_len must be positive, got {d.seq_len}"),
            (d.rows > 0, f"data.rows must be positive, got {d.rows}"),
            (d.rows * d.seq_len < 2 ** 31,
             f"a micro-batch of data.rows x data.seq_len tokens must stay under 2**31 (the kernels index "
             f"it with 32-bit integers), got {d.rows} x {d.seq_len}"),
            (d.max_images > 0, f"data.max_images must be positive, got {d.max_images}"),
            (d.too_long in ("truncate", "drop"), f"data.too_long must be truncate or drop, got {d.too_long!r}"),
            (0.0 <= d.image_first_prob <= 1.0,
             f"data.image_first_prob must lie in [0, 1], got {d.image_first_prob}"),
            (0.0 <= d.phrase_first_prob <= 1.0,
             f"data.phrase_first_prob must lie in [0, 1], got {d.phrase_first_prob}"),
            (0.0 <= d.grounded_image_first <= 1.0,
             f"data.grounded_image_first must lie in [0, 1], got {d.grounded_image_first}"),
            (d.interleaved_images > 0, f"data.interleaved_images must be positive, got {d.interleaved_images}"),
            (3 <= d.interleaved_len <= d.seq_len,
             f"data.interleaved_len ({d.interleaved_len}) must lie in [3, data.seq_len = {d.seq_len}]"),
            (3 <= d.text_len <= d.seq_len,
             f"data.text_len ({d.text_len}) must lie in [3, data.seq_len = {d.seq_len}]"),
            (d.video_frames > 0, f"data.video_frames must be positive, got {d.video_frames}"),
            (d.prefetch >= -1, f"data.prefetch must be >= -1 (-1 = auto, 0 = off), got {d.prefetch}"),
            (self.train.steps > 0, f"train.steps must be positive, got {self.train.steps}"),
            (self.train.weight_cast in ("step", "op"),
             f"train.weight_cast must be 'step' or 'op', got {self.train.weight_cast!r}"),
            (not self.train.grad_accumulation_fusion or self.train.weight_cast == "step",
             "train.grad_accumulation_fusion needs train.weight_cast = 'step' (the accumulators "
             f"it adds into), got weight_cast = {self.train.weight_cast!r}"),
            (self.model.llm_layers >= 0, f"model.llm_layers must be >= 0, got {self.model.llm_layers}"),
            (_finite_at_least(self.model.regression_weight, 0),
             f"model.regression_weight must be a finite number >= 0, got {self.model.regression_weight}"),
            (self.metrics.log_interval > 0,
             f"metrics.log_interval must be positive, got {self.metrics.log_interval}"),
            (not self.profiling.problem(), self.profiling.problem()),
            (self.train.max_nonfinite > 0,
             f"train.max_nonfinite must be positive, got {self.train.max_nonfinite}"),
            (self.checkpoint.interval >= 0,
             f"checkpoint.interval must be >= 0, got {self.checkpoint.interval}"),
            (self.checkpoint.keep > 0, f"checkpoint.keep must be positive, got {self.checkpoint.keep}"),
            (self.checkpoint.resume != "",
             'checkpoint.resume must be auto, none or a checkpoint folder, got ""'),
            (not self.checkpoint.init_from or self.checkpoint.resume in ("auto", "none"),
             f"checkpoint.init_from ({self.checkpoint.init_from!r}) starts a new run from weights "
             f"and checkpoint.resume ({self.checkpoint.resume!r}) continues a saved one: set one "
             f"(resume = auto or none with init_from)"),
            (self.train.run_dir.strip() != "",
             f"train.run_dir must name a folder (it gets the config, metrics and checkpoints), "
             f"got {self.train.run_dir!r}"),
            (self.train.eval_batches >= 0, f"train.eval_batches must be >= 0, got {self.train.eval_batches}"),
            (self.train.device in ("auto", "cpu", "cuda"),
             f"train.device must be auto, cpu or cuda, got {self.train.device!r}"),
            (self.train.dtype in ("auto", "fp32", "bf16"),
             f"train.dtype must be auto, fp32 or bf16, got {self.train.dtype!r}"),
            (self.optim.schedule in ("cosine", "linear"),
             f"optim.schedule must be cosine or linear, got {self.optim.schedule!r}"),
            (all(_finite_at_least(lr, 0) for lr in (o.lr, o.lr_vision, o.lr_projector)),
             f"optim.lr, optim.lr_vision and optim.lr_projector must be finite numbers >= 0, got "
             f"{o.lr}, {o.lr_vision} and {o.lr_projector}"),
            (all(math.isfinite(b) and 0.0 <= b < 1.0 for b in o.betas),
             f"optim.betas must each lie in [0, 1), got {list(o.betas)}"),
            (_finite_at_least(o.weight_decay, 0),
             f"optim.weight_decay must be a finite number >= 0, got {o.weight_decay}"),
            (math.isfinite(o.eps) and o.eps > 0, f"optim.eps must be a finite number > 0, got {o.eps}"),
            (0 <= self.optim.warmup_steps < self.train.steps,
             f"optim.warmup_steps ({self.optim.warmup_steps}) must be in [0, train.steps = {self.train.steps})"),
            (0.0 <= self.optim.min_lr_ratio <= 1.0,
             f"optim.min_lr_ratio must lie in [0, 1], got {self.optim.min_lr_ratio}"),
            (_finite_at_least(self.optim.grad_clip, 0),
             f"optim.grad_clip must be a finite number >= 0 (0 turns clipping off), got {self.optim.grad_clip}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        model_cfg = self.model.build_config()
        if (d.template == "chat" or "chat" in d.datasets) and not model_cfg.chat:
            why = "data.template = chat" if d.template == "chat" else "a chat dataset in data.datasets"
            raise ValueError(f"{why} needs the chat tokens [USER] and [ASSISTANT], which the "
                             f"{self.model.preset} model's vocabulary lacks: use a chat preset "
                             f"(emu2-chat-37b, debug-chat)")
        self._validate_visual_spans(model_cfg.n_query, model_cfg.frame_queries)
        self._validate_image_cap(model_cfg.n_query, model_cfg.frame_queries)
        self._validate_parallel(model_cfg, world_size)

    def _validate_visual_spans(self, n_query: int, frame_n_query: int) -> None:
        """A row must hold one whole image and, when videos are drawn, one whole video:
        truncation never cuts inside an image span nor a video, so a config that cannot fit
        them would silently drop every such sample (and the held-out check's images)."""
        d = self.data
        image_span = n_query + 4  # <s> [IMG] n_query slots [/IMG] </s>
        if d.seq_len < image_span:
            raise ValueError(f"data.seq_len ({d.seq_len}) cannot hold one image of the "
                             f"{self.model.preset} model ({n_query} visual tokens): needs >= "
                             f"{image_span} (<s> [IMG] slots [/IMG] </s>)")
        drawn = {kind for kind, w in zip(d.datasets, d.weights) if w > 0}
        if "interleaved" in drawn and d.interleaved_len < image_span:
            raise ValueError(f"data.interleaved_len ({d.interleaved_len}) cannot hold one image of the "
                             f"{self.model.preset} model ({n_query} visual tokens): needs >= "
                             f"{image_span} for the interleaved dataset")
        if "video_text" not in drawn:
            return
        if "video_text" in d.regress and frame_n_query != n_query:
            raise ValueError(f"data.regress lists video_text for the {self.model.preset} model, "
                             f"whose video frames take {frame_n_query} visual tokens and its images "
                             f"{n_query}: the regression head predicts an image's {n_query}; "
                             f"remove video_text from data.regress")
        if d.video_frames > d.max_images:
            raise ValueError(f"data.video_frames ({d.video_frames}) exceeds data.max_images "
                             f"({d.max_images}): every video of the video_text dataset would be "
                             f"dropped (a video is never cut)")
        video_span = 1 + d.video_frames * (frame_n_query + 2) + 2  # [VIDEO] frames, <s> and </s>
        if d.seq_len < video_span:
            raise ValueError(f"data.seq_len ({d.seq_len}) cannot hold one video of "
                             f"{d.video_frames} frames of the {self.model.preset} model "
                             f"({frame_n_query} visual tokens each): needs >= {video_span} "
                             f"(<s> [VIDEO] frames x [IMG] slots [/IMG] </s>); every video of the "
                             f"video_text dataset would be dropped (a video is never cut)")

    def _validate_image_cap(self, n_query: int, frame_n_query: int) -> None:
        """data.max_images no larger than the micro-batch's token count: the loader allocates its
        image tensor at that size, so a cap of a billion tried to allocate petabytes. (A cap
        between what a micro-batch can fill and its token count is allowed: it costs the padding
        images' memory only, and lowering seq_len should not force max_images down.)"""
        d = self.data
        tokens = d.rows * d.seq_len
        if d.max_images > tokens:
            smallest = min(n_query, frame_n_query) + 2  # [IMG] slots [/IMG]: no input takes fewer tokens
            raise ValueError(f"data.max_images ({d.max_images}) exceeds the {tokens} tokens of a micro-batch "
                             f"({d.rows} row(s) of {d.seq_len}); each visual input of the {self.model.preset} "
                             f"model takes at least {smallest} of them, so at most {tokens // smallest} fit")

    def _validate_parallel(self, model_cfg, world_size: int | None) -> None:
        """The engine's own checks (`ParallelDims.validate`, `ParallelConfig.validate`): degrees,
        world size, the model's divisibility, micro-batches against the schedule; and the
        shape rules of the parallel layer that the config alone decides (the row length
        against tp), so they fail here rather than in the first forward, after the model is
        built."""
        dims = self.parallel.dims()
        # the world-size check only once the world is known; the product stands in until then
        dims.validate(dims.world_size if world_size is None else world_size, model_cfg)
        self.parallel.parallel_config().validate(dims, model_cfg)
        if self.data.seq_len % dims.tp:  # the LLM's stream is split along the row (Shard(1))
            raise ValueError(f"sequence parallelism needs data.seq_len ({self.data.seq_len}) to be a "
                             f"multiple of parallel.tp ({dims.tp})")
        wanted, rows = self.train.global_batch, self.data.rows
        if wanted < 0:
            raise ValueError(f"train.global_batch must be >= 0, got {wanted}")
        got = dims.dp * self.parallel.microbatches * rows
        if wanted and wanted != got:
            per_rank = dims.dp * rows
            fix = (f"set parallel.microbatches = {wanted // per_rank}" if wanted % per_rank == 0 else
                   f"{wanted} rows do not split into micro-batches of {rows} rows on {dims.dp} "
                   f"data-parallel ranks")
            raise ValueError(f"train.global_batch ({wanted}) must be dp ({dims.dp}) x "
                             f"parallel.microbatches ({self.parallel.microbatches}) x data.rows "
                             f"({rows}) = {got}: {fix}")

    # -- output ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """TOML text that `load` reads back to an equal config (sections of scalars and lists)."""
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
            lines.append("")
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        """Write the resolved config (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_toml())
        tmp.replace(path)


def _finite_at_least(value: float, low: float) -> bool:
    """`value` is a finite number >= `low` (NaN and infinities fail)."""
    return math.isfinite(value) and value >= low


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def _parse_override(item: str) -> dict:
    """`--section.key=value` -> {"section": {"key": value}}."""
    body = item[2:] if item.startswith("--") else item
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise ValueError(f"override {item!r} must look like --section.key=value")
    dotted, raw = body.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as --model.preset=debug
    return {section: {key: _RawText(raw, value)}}


class _RawText:
    """A CLI value: its TOML reading, and its text for string fields (--train.run_dir=2024)."""

    def __init__(self, raw: str, value: Any):
        self.raw, self.value = raw, value


def _coerce(value: Any, hint: Any, name: str, where: str) -> Any:
    """Check a TOML value against the field's annotation, converting int -> float and list -> tuple."""
    if isinstance(value, _RawText):
        value = value.raw if hint is str and not isinstance(value.value, str) else value.value
    origin = getattr(hint, "__origin__", None)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: {name} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, hint.__args__[0], name, where) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(hint.__args__):
            raise ValueError(f"{where}: {name} must be a list of {len(hint.__args__)} numbers, got {value!r}")
        return tuple(_coerce(v, t, name, where) for v, t in zip(value, hint.__args__))
    if hint in (int, float, str, bool) and not (type(value) is hint):
        raise ValueError(f"{where}: {name} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def parse_run_args(argv: list[str] | None, job: type[JobConfig], prog: str, description: str,
                   configs: str) -> tuple[JobConfig, bool]:
    """The command line of a training entry point (`pretrain`, `train_decoder`): `--config FILE`
    (`configs` says which files), `--no-progress`, and `--section.key=value` overrides; returns
    the resolved `job` config and whether to show the progress bar."""
    from emu2_engine.cli import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help=f"a TOML run config ({configs}); defaults if absent")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides look like --section.key=value")
    from emu2_engine.ops.backend import requested_backends
    requested_backends()  # a bad EMU2_KERNELS is refused now, in one line, not at the first forward
    return job.load(args.config, overrides), not args.no_progress
