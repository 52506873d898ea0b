"""The decoder trainer's run configuration: one dataclass per TOML section (`[model]`, `[data]`,
`[diffusion]`, `[optim]`, `[train]`), read, overridden and written as the pretraining config is
(`train.config.JobConfig`). `configs/decoder_debug.toml` equals the defaults.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from emu2_engine.models.config import PRESETS, UNET_PRESETS
from emu2_engine.train.config import JobConfig, _finite_at_least


@dataclass
class DecoderModelSection:
    """Which UNet to train, and the frozen parts around it."""

    unet: str = "debug"
    """A preset of `models.config.UNET_PRESETS` (emu2-gen, emu2-video, debug)."""
    video: bool = False
    """Train the inflated video UNet on clips (the 2D weights, if any, are inflated)."""
    unet_weights: str = ""
    """Initial UNet weights: the released Emu2-Gen checkpoint (its unet.* keys) or a diffusers
    UNet weights file/folder; "" = a fresh initialisation."""
    unet_base_weights: str = ""
    """Initial UNet weights from a UNet of the same shape trained on other conditioning (a
    diffusers weights file/folder: SDXL-base for emu2-gen, Stable Diffusion 2.1 for emu2-video,
    as the paper starts them): everything loads but the projections that read the condition
    (cross-attention keys/values, the added-condition embedding's first layer), which start
    fresh (`models.unet.load_base_unet_weights`). Exclusive with unet_weights."""
    encoder: str = "debug"
    """An Emu2 preset (`models.config.PRESETS`) whose vision tower and n_query make the embeddings."""
    encoder_weights: str = ""
    """Released Emu2 weights (their visual.* keys are used); "" = a random encoder seeded by
    train.seed (debug only: the embeddings are then random features of the image)."""
    vae: str = "tiny-random"
    """A diffusers AutoencoderKL folder (the SDXL VAE for Emu2-Gen), or tiny-random: a small
    randomly initialised VAE for the CPU (4 latent channels, 4x downsampling)."""


@dataclass
class DecoderDataSection:
    """What the decoder learns to reconstruct: WebDataset shards of images (or of video clips),
    or, with no paths, shapes-world images and moving-shape clips generated in memory."""

    paths: str = ""
    """Training shards in img2dataset's layout: images (.jpg/.png/.webp), or video clips
    (.webm/.mp4/...) when model.video is true. A directory (its *.tar), a glob, a brace pattern
    (/data/laion/{00000..01023}.tar) or one tar. "" = the in-memory generators."""
    heldout_paths: str = ""
    """Held-out shards of the same kind for the before/after evaluation (of train.eval_batches
    batches, which must then be >= 1); "" with data.paths set skips that evaluation (said once
    at the start)."""
    image_size: int = 64
    """Pixels per side of the decoder's images (the VAE's input; Emu2-Gen: 1024)."""
    batch_size: int = 8
    """Images (or clips) per step over all ranks (the global batch); each of the WORLD_SIZE
    ranks takes batch_size / WORLD_SIZE of them."""
    frames: int = 4
    """Frames per clip (video only); from shards, sampled uniformly over each clip."""
    seed: int = 1234
    """Seed of the in-memory images and clips, and of the shards' reading order."""
    prefetch: int = -1
    """Steps' batches built ahead in a background thread while the UNet trains; 0: each is
    built when its step starts; -1 (auto): 2 on a GPU, 0 on the CPU, where the thread would
    compete with the model for the cores (`data.prefetch.prefetch_depth`)."""


@dataclass
class DiffusionSection:
    """Noise schedule and conditioning dropout."""

    train_timesteps: int = 1000
    """DDPM timesteps."""
    beta_start: float = 0.00085
    """First beta (SDXL)."""
    beta_end: float = 0.012
    """Last beta (SDXL)."""
    beta_schedule: str = "scaled_linear"
    """linear or scaled_linear (SDXL)."""
    cfg_drop: float = 0.1
    """Probability that a sample's embeddings are replaced by the null condition (Emu2: 10 %)."""
    noise_offset: float = 0.1
    """Std of a per-sample, per-channel constant added to the noise (Emu2: 0.1)."""
    null_condition: str = "zero-image"
    """The dropped condition, which sampling uses as its negative: zero-image (the encoder's
    embeddings of an all-zero image, Emu2-Gen's autoencoding negative) or zeros."""

    def schedule(self) -> dict:
        """Keyword arguments of diffusers' schedulers for this noise schedule."""
        return dict(num_train_timesteps=self.train_timesteps, beta_start=self.beta_start,
                    beta_end=self.beta_end, beta_schedule=self.beta_schedule)


@dataclass
class DecoderOptimSection:
    """AdamW on the UNet, warm-up then decay."""

    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay of matrices and conv kernels (Emu2's decoder: 0.01)."""
    warmup_steps: int = 10
    """Linear warm-up from 0 to the peak."""
    schedule: str = "linear"
    """Decay after warm-up: linear (Emu2's decoder) or cosine."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off); Emu2's decoder: 1.0."""


@dataclass
class DecoderTrainSection:
    """The loop, checkpoints and outputs."""

    steps: int = 300
    """Optimiser steps."""
    seed: int = 0
    """Seed of the initialisation (UNet, random encoder, tiny VAE) and of the noise draws."""
    device: str = "auto"
    """auto (first GPU if any, else CPU), cpu or cuda."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 autocast on CUDA, fp32 on the CPU), fp32 or bf16."""
    log_every: int = 10
    """Steps between metric records."""
    max_nonfinite: int = 5
    """Stop the run after this many steps in a row whose gradient norm is not finite (each
    such step is skipped: no optimiser update), as the pretraining trainer does."""
    eval_batches: int = 2
    """Held-out batches for the before/after denoising loss (0 skips it)."""
    save_every: int = 100
    """Steps between checkpoints (the last step is always saved)."""
    keep: int = 2
    """Newest checkpoints kept."""
    resume: bool = True
    """Continue from the newest checkpoint in run_dir/checkpoints, if there is one."""
    run_dir: str = "runs/decoder_debug"
    """Where the resolved config, metrics and checkpoints go."""
    microbatches: int = 1
    """Micro-batches each rank's slice of the global batch runs as, one forward and backward
    after the other with the gradients accumulated (activations for one micro-batch at a time;
    the evaluation splits the same way). Under FSDP the gradients are reduced once, after the
    last; until then FSDP2 holds them unsharded in fp32 on every rank (4 bytes per UNet
    parameter: about 10 GB for emu2-gen's 2.5B). The slice must divide by it."""
    compile: bool = False
    """torch.compile every resnet and transformer of the UNet (`compile_unet_blocks`), before
    FSDP wraps them. Inside the compiled graphs the convolutions run the library path that
    `spatiotemporal_conv`'s size rule picks (nothing is timed while compiling) and the norms are
    Inductor's own, fused with the activations and adds around them; the attention stays SDPA.
    At batch 1 and 16 frames of 32x32 latents the video UNet's step was launch-bound on an H200
    (61 ms of kernels in a 180 ms step, session 6); compiled, unmeasured on a GPU."""


@dataclass
class DecoderJobConfig(JobConfig):
    """A decoder training run. Reads, overrides and writes TOML exactly as the pretraining
    config does (`JobConfig.load`, `--section.key=value`); only the sections differ."""

    model: DecoderModelSection = field(default_factory=DecoderModelSection)
    data: DecoderDataSection = field(default_factory=DecoderDataSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    optim: DecoderOptimSection = field(default_factory=DecoderOptimSection)
    train: DecoderTrainSection = field(default_factory=DecoderTrainSection)

    UNUSED_SECTIONS = {
        "parallel": "it shards the UNet with FSDP over every rank; train.microbatches accumulates",
        "checkpoint": "its checkpoints are set by train.save_every, train.keep and train.resume",
        "metrics": "it logs every train.log_every steps to run_dir/metrics.jsonl",
    }
    """The pretraining sections this config inherits but the decoder trainer does not read, and
    what it has instead: a value set in one is refused rather than silently ignored."""

    USER_PATHS = ("train.run_dir", "profiling.dir", "data.paths", "data.heldout_paths", "model.unet_weights",
                  "model.unet_base_weights", "model.encoder_weights", "model.vae")
    """The keys that name files or folders (`JobConfig.USER_PATHS`)."""

    def to_dict(self) -> dict:
        return {k: v for k, v in super().to_dict().items() if k not in self.UNUSED_SECTIONS}

    def validate(self, world_size: int | None = None) -> None:
        """One line for the first value that cannot work; with `world_size`, also a global batch
        that does not split evenly over the ranks. The optimiser's and the noise's numbers must also
        be finite: an infinity passes `x >= 0`, and a NaN or infinite learning rate, beta, weight
        decay, eps, clip norm or noise offset trains the UNet into NaN."""
        for name, instead in self.UNUSED_SECTIONS.items():
            section = getattr(self, name)
            if section != type(section)():  # the defaults are what earlier runs' config.toml wrote
                raise ValueError(f"train_decoder does not read [{name}]: {instead}; got "
                                 f"{name} = {dataclasses.asdict(section)}")
        m, d, z, o, t = self.model, self.data, self.diffusion, self.optim, self.train
        if world_size is not None and d.batch_size % world_size:
            raise ValueError(f"data.batch_size is the global batch and must divide by the number of "
                             f"ranks (WORLD_SIZE = {world_size}); got {d.batch_size}, which leaves "
                             f"{d.batch_size % world_size} over")
        if t.microbatches < 1:
            raise ValueError(f"train.microbatches must be >= 1, got {t.microbatches}")
        local = d.batch_size // (world_size or 1)
        if local % t.microbatches:
            raise ValueError(f"train.microbatches ({t.microbatches}) must divide each rank's "
                             f"{local} sample(s) (data.batch_size {d.batch_size} over "
                             f"{world_size or 1} rank(s))")
        if m.unet not in UNET_PRESETS:
            raise ValueError(f"model.unet must be one of {sorted(UNET_PRESETS)}, got {m.unet!r}")
        if m.encoder not in PRESETS:
            raise ValueError(f"model.encoder must be one of {sorted(PRESETS)}, got {m.encoder!r}")
        unet, enc = UNET_PRESETS[m.unet], PRESETS[m.encoder]
        checks = [
            (unet.cross_attention_dim == enc.vision.width,
             f"the {m.unet} UNet attends to embeddings of width {unet.cross_attention_dim}, but the "
             f"{m.encoder} encoder makes width {enc.vision.width}"),
            (unet.cond_tokens == enc.n_query,
             f"the {m.unet} UNet expects {unet.cond_tokens} embeddings per image, but the {m.encoder} "
             f"encoder makes {enc.n_query}"),
            (not (m.unet_weights and m.unet_base_weights),
             f"model.unet_weights ({m.unet_weights!r}) and model.unet_base_weights "
             f"({m.unet_base_weights!r}) both give the initial UNet: set one"),
            (t.steps > 0, f"train.steps must be positive, got {t.steps}"),
            (d.image_size >= 16, f"data.image_size must be >= 16, got {d.image_size}"),
            (0 <= d.seed < 2 ** 63, f"data.seed must lie in [0, 2**63), got {d.seed}"),
            (d.batch_size > 0, f"data.batch_size must be positive, got {d.batch_size}"),
            (d.frames > 0, f"data.frames must be >= 1, got {d.frames}"),
            (d.prefetch >= -1, f"data.prefetch must be >= -1 (-1 = auto, 0 = off), got {d.prefetch}"),
            (d.paths or not d.heldout_paths,
             f"data.heldout_paths ({d.heldout_paths!r}) needs data.paths: the in-memory data "
             f"(data.paths = \"\") has its own held-out samples"),
            (not d.heldout_paths or t.eval_batches > 0,
             f"data.heldout_paths ({d.heldout_paths!r}) is set but train.eval_batches = 0 skips the "
             f"held-out evaluation: set train.eval_batches >= 1, or leave data.heldout_paths empty"),
            (z.train_timesteps > 1, f"diffusion.train_timesteps must be > 1, got {z.train_timesteps}"),
            (z.beta_schedule in ("linear", "scaled_linear"),
             f"diffusion.beta_schedule must be linear or scaled_linear, got {z.beta_schedule!r}"),
            (0.0 < z.beta_start < z.beta_end < 1.0,
             f"diffusion betas need 0 < beta_start < beta_end < 1, got {z.beta_start}, {z.beta_end}"),
            (0.0 <= z.cfg_drop <= 1.0, f"diffusion.cfg_drop must lie in [0, 1], got {z.cfg_drop}"),
            (_finite_at_least(z.noise_offset, 0),
             f"diffusion.noise_offset must be a finite number >= 0, got {z.noise_offset}"),
            (z.null_condition in ("zero-image", "zeros"),
             f"diffusion.null_condition must be zero-image or zeros, got {z.null_condition!r}"),
            (math.isfinite(o.lr) and o.lr > 0, f"optim.lr must be a finite number > 0, got {o.lr}"),
            (all(math.isfinite(b) and 0.0 <= b < 1.0 for b in o.betas),
             f"optim.betas must each lie in [0, 1), got {list(o.betas)}"),
            (_finite_at_least(o.weight_decay, 0),
             f"optim.weight_decay must be a finite number >= 0, got {o.weight_decay}"),
            (math.isfinite(o.eps) and o.eps > 0, f"optim.eps must be a finite number > 0, got {o.eps}"),
            (o.schedule in ("linear", "cosine"),
             f"optim.schedule must be linear or cosine, got {o.schedule!r}"),
            (0 <= o.warmup_steps < t.steps,
             f"optim.warmup_steps ({o.warmup_steps}) must be in [0, train.steps = {t.steps})"),
            (0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must lie in [0, 1], got {o.min_lr_ratio}"),
            (_finite_at_least(o.grad_clip, 0),
             f"optim.grad_clip must be a finite number >= 0 (0 turns clipping off), got {o.grad_clip}"),
            (0 <= t.seed < 2 ** 63, f"train.seed must lie in [0, 2**63), got {t.seed}"),
            (t.log_every > 0, f"train.log_every must be positive, got {t.log_every}"),
            (t.max_nonfinite > 0, f"train.max_nonfinite must be positive, got {t.max_nonfinite}"),
            (t.save_every > 0, f"train.save_every must be positive, got {t.save_every}"),
            (t.keep > 0, f"train.keep must be positive, got {t.keep}"),
            (t.eval_batches >= 0, f"train.eval_batches must be >= 0, got {t.eval_batches}"),
            (t.run_dir.strip() != "",
             f"train.run_dir must name a folder (it gets the config, metrics and checkpoints), "
             f"got {t.run_dir!r}"),
            (t.device in ("auto", "cpu", "cuda"),
             f"train.device must be auto, cpu or cuda, got {t.device!r}"),
            (t.dtype in ("auto", "fp32", "bf16"), f"train.dtype must be auto, fp32 or bf16, got {t.dtype!r}"),
            (not self.profiling.problem(), self.profiling.problem()),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def check_files(self) -> None:
        """FileNotFoundError, in one line, for the first configured weights path that does not
        exist: the trainer calls it before building anything, so a typo costs no encoder build
        or multi-GB load first. Not part of `validate`: the recipes name placeholder paths
        (/path/to/Emu2) and must still load."""
        m = self.model
        files = [("model.encoder_weights", m.encoder_weights,
                  "released Emu2 weights: a file or a folder of shards"),
                 ("model.unet_weights", m.unet_weights, "a UNet weights file or folder"),
                 ("model.unet_base_weights", m.unet_base_weights, "a diffusers UNet weights file or folder")]
        for name, path, what in files:
            if path and not Path(path).exists():
                raise FileNotFoundError(f"{name} = {path!r}: no such file or folder (expected {what})")
        if m.vae != "tiny-random" and not (m.vae.strip() and (Path(m.vae) / "config.json").is_file()):
            problem = ("names nothing" if not m.vae.strip() else
                       "has no config.json" if Path(m.vae).is_dir() else
                       "is not a folder" if Path(m.vae).exists() else "no such folder")
            raise FileNotFoundError(f"model.vae = {m.vae!r}: {problem} (expected a diffusers AutoencoderKL "
                                    f"folder (config.json + weights) or tiny-random)")
