"""Training the visual decoders: image autoencoding (Emu2-Gen's decoder) and its video variant.

One step (the paper, section 2.2.3; EMU2_FACTS.md):
    images -> frozen visual encoder (EVA ViT + mean pooling) -> (B, n_query, width) embeddings
    images -> frozen VAE encoder -> latents x scaling_factor
    latents + noise at a random DDPM timestep (noise offset 0.1) -> UNet(embeddings, 10 % of
    them replaced by the null condition) -> epsilon prediction, MSE against the noise.
Only the UNet learns: AdamW, warm-up then linear decay, gradient clipping at 1.0.

The video decoder trains the inflated UNet (`models.unet3d`) on clips: every frame goes
through the encoder and the VAE, the clip is conditioned on all its frames' embeddings
(B, F, n_query, width), and the noise offset is shared by the frames of a clip.

On the CPU the data is generated in memory: shapes-world images (`data.shapes.ShapesWorld`)
and clips of moving shapes (`moving_shapes_clip`, below). Step s reads samples
[s * B, (s + 1) * B) of the global batch B = data.batch_size. Every random draw of a sample
(posterior sample, noise, noise offset, timestep, condition dropout) comes from its own
generator, seeded by (train.seed, s, its position in the global batch): a resumed run repeats
the uninterrupted run's losses exactly without saving any RNG state, and W ranks draw what one
process draws.

Under torchrun with WORLD_SIZE = W > 1 each rank builds the frozen encoder and VAE whole, the
UNet is sharded with FSDP2 (`shard_unet`), and rank r takes samples [r B/W, (r + 1) B/W) of
every step's global batch. The loss of a rank is the mean over its slice; FSDP's
reduce-scatter averages the gradients over the ranks, so with equal slices the update is the
one-process update of the whole batch, and the logged loss is the mean over the ranks.

Checkpoints (`train.save_every`, the last step, and a SIGTERM/SIGINT stop) go through
`checkpoint.dcp.Checkpointer`: run_dir/checkpoints/step-NNNNNN with the (sharded) UNet, the
AdamW state, the schedule and the step, written atomically, the newest `train.keep` kept.
With `train.resume` a run continues from the newest one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from emu2_engine.checkpoint.dcp import Checkpointer
from emu2_engine.data.sequences import to_pixels
from emu2_engine.data.shapes import BACKGROUNDS, COLOURS, KINDS, ShapesWorld
from emu2_engine.inference.decode import size_ids, zero_image_embedding
from emu2_engine.models.config import PRESETS, UNET_PRESETS, Emu2Config, UNetConfig
from emu2_engine.models.projector import Projector
from emu2_engine.models.unet import UNet, load_unet_weights
from emu2_engine.models.unet3d import inflate_unet
from emu2_engine.models.vit import EVAVisionTransformer
from emu2_engine.parallel.dims import ParallelDims
from emu2_engine.train.config import JobConfig
from emu2_engine.train.optim import build_scheduler
from emu2_engine.train.trainer import pick_device

_HELD_OUT_SEED_OFFSET = 7919  # held-out samples: the same generators under another seed


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
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
    """In-memory shapes-world images or moving-shape clips."""

    image_size: int = 64
    """Pixels per side of the decoder's images (the VAE's input; Emu2-Gen: 1024)."""
    batch_size: int = 8
    """Images (or clips) per step over all ranks (the global batch); each of the WORLD_SIZE
    ranks takes batch_size / WORLD_SIZE of them."""
    frames: int = 4
    """Frames per clip (video only)."""
    seed: int = 1234
    """Seed of the shapes world and of the clips."""


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


@dataclass
class DecoderJobConfig(JobConfig):
    """A decoder training run. Reads, overrides and writes TOML exactly as the pretraining
    config does (`JobConfig.load`, `--section.key=value`); only the sections differ."""

    model: DecoderModelSection = field(default_factory=DecoderModelSection)
    data: DecoderDataSection = field(default_factory=DecoderDataSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    optim: DecoderOptimSection = field(default_factory=DecoderOptimSection)
    train: DecoderTrainSection = field(default_factory=DecoderTrainSection)

    def validate(self, world_size: int | None = None) -> None:
        """One line for the first value that cannot work; with `world_size`, also a global batch
        that does not split evenly over the ranks."""
        m, d, z, o, t = self.model, self.data, self.diffusion, self.optim, self.train
        if world_size is not None and d.batch_size % world_size:
            raise ValueError(f"data.batch_size is the global batch and must divide by the number of "
                             f"ranks (WORLD_SIZE = {world_size}); got {d.batch_size}, which leaves "
                             f"{d.batch_size % world_size} over")
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
            (d.image_size >= 16, f"data.image_size must be >= 16, got {d.image_size}"),
            (d.batch_size > 0, f"data.batch_size must be positive, got {d.batch_size}"),
            (d.frames > 0, f"data.frames must be >= 1, got {d.frames}"),
            (z.train_timesteps > 1, f"diffusion.train_timesteps must be > 1, got {z.train_timesteps}"),
            (z.beta_schedule in ("linear", "scaled_linear"),
             f"diffusion.beta_schedule must be linear or scaled_linear, got {z.beta_schedule!r}"),
            (0.0 < z.beta_start < z.beta_end < 1.0,
             f"diffusion betas need 0 < beta_start < beta_end < 1, got {z.beta_start}, {z.beta_end}"),
            (0.0 <= z.cfg_drop <= 1.0, f"diffusion.cfg_drop must lie in [0, 1], got {z.cfg_drop}"),
            (z.noise_offset >= 0, f"diffusion.noise_offset must be >= 0, got {z.noise_offset}"),
            (z.null_condition in ("zero-image", "zeros"),
             f"diffusion.null_condition must be zero-image or zeros, got {z.null_condition!r}"),
            (o.lr > 0, f"optim.lr must be positive, got {o.lr}"),
            (o.schedule in ("linear", "cosine"),
             f"optim.schedule must be linear or cosine, got {o.schedule!r}"),
            (0 <= o.warmup_steps < t.steps,
             f"optim.warmup_steps ({o.warmup_steps}) must be in [0, train.steps = {t.steps})"),
            (0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must lie in [0, 1], got {o.min_lr_ratio}"),
            (o.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {o.grad_clip}"),
            (t.steps > 0, f"train.steps must be positive, got {t.steps}"),
            (t.seed >= 0, f"train.seed must be >= 0, got {t.seed}"),
            (t.log_every > 0, f"train.log_every must be positive, got {t.log_every}"),
            (t.save_every > 0, f"train.save_every must be positive, got {t.save_every}"),
            (t.keep > 0, f"train.keep must be positive, got {t.keep}"),
            (t.eval_batches >= 0, f"train.eval_batches must be >= 0, got {t.eval_batches}"),
            (t.device in ("auto", "cpu", "cuda"),
             f"train.device must be auto, cpu or cuda, got {t.device!r}"),
            (t.dtype in ("auto", "fp32", "bf16"), f"train.dtype must be auto, fp32 or bf16, got {t.dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ----------------------------------------------------------------------------------------------
# Data: shapes-world images and clips of moving shapes, in memory
# ----------------------------------------------------------------------------------------------
def moving_shapes_clip(seed: int, index: int, frames: int, size: int) -> list[Image.Image]:
    """Clip `index`: one or two shapes sliding in straight lines over a plain background, drawn
    at `frames` evenly spaced times. A pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index, 1])  # the trailing 1 keeps clips apart from images
    background = BACKGROUNDS[list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]]
    shapes = []
    for _ in range(int(rng.integers(1, 3))):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        colour = COLOURS[list(COLOURS)[int(rng.integers(len(COLOURS)))]]
        side = rng.uniform(0.2, 0.35)
        start, end = rng.uniform(side / 2, 1 - side / 2, size=(2, 2))
        shapes.append((kind, colour, side, start, end))
    clip = []
    for f in range(frames):
        progress = f / max(frames - 1, 1)
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        for kind, colour, side, start, end in shapes:
            cx, cy = (start + (end - start) * progress) * size
            half = side * size / 2
            box = (cx - half, cy - half, cx + half, cy + half)
            if kind == "circle":
                draw.ellipse(box, fill=colour)
            elif kind == "square":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
        clip.append(image)
    return clip


def vae_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) in [-1, 1], the VAE's input range (bicubic resize)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


@dataclass
class DecoderBatch:
    """One step's pixels. Images: (B, 3, R, R); clips: (B, F, 3, R, R)."""

    encoder_pixels: torch.Tensor
    """CLIP-normalised at the encoder's resolution."""
    vae_pixels: torch.Tensor
    """In [-1, 1] at the decoder's resolution."""


def make_batch(cfg: DecoderJobConfig, encoder_size: int, indices: Sequence[int], seed: int) -> DecoderBatch:
    """The shapes-world images (or clips) of the given sample indices under `seed`."""
    d = cfg.data
    if cfg.model.video:
        clips = [moving_shapes_clip(seed, i, d.frames, d.image_size) for i in indices]
        enc = torch.stack([torch.stack([to_pixels(f, encoder_size) for f in c]) for c in clips])
        vae = torch.stack([torch.stack([vae_pixels(f, d.image_size) for f in c]) for c in clips])
        return DecoderBatch(enc, vae)
    world = ShapesWorld(seed)
    images = [world.sample(i, d.image_size).image for i in indices]
    return DecoderBatch(torch.stack([to_pixels(im, encoder_size) for im in images]),
                        torch.stack([vae_pixels(im, d.image_size) for im in images]))


# ----------------------------------------------------------------------------------------------
# The frozen parts
# ----------------------------------------------------------------------------------------------
class FrozenEncoder(nn.Module):
    """The Emu2 visual encoder and its mean pooling: pixels (N, 3, R, R) -> (N, n_query, width),
    the embeddings Emu2 regresses and the decoder is conditioned on. Never trained."""

    def __init__(self, cfg: Emu2Config):
        super().__init__()
        self.cfg = cfg
        self.visual = EVAVisionTransformer(cfg.vision)
        self.requires_grad_(False)
        self.eval()

    def load_released(self, source: str) -> None:
        """The visual.* tensors of released Emu2 weights (any variant `load_released_weights`
        reads); every other key is skipped. Validated before anything is copied."""
        from emu2_engine.checkpoint.released import load_weights, to_engine_name

        def rename(name: str) -> str | None:
            engine = to_engine_name(name)
            return engine if engine is not None and engine.startswith("visual.") else None

        load_weights(self, source, rename=rename)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return Projector.pool(self.visual(pixels), self.cfg.n_query)


def build_vae(spec: str, image_size: int, seed: int):
    """The frozen VAE: a diffusers AutoencoderKL folder, or "tiny-random" (see the config field).
    The tiny VAE's posterior is made narrow and its scaling factor set so that its latents of
    shapes-world images have unit standard deviation, as 0.13025 does for the SDXL VAE on
    natural images."""
    from diffusers import AutoencoderKL

    if spec != "tiny-random":
        if not Path(spec).is_dir():
            raise FileNotFoundError(f"model.vae = {spec!r}: expected a diffusers AutoencoderKL folder "
                                    f"(config.json + weights) or tiny-random")
        vae = AutoencoderKL.from_pretrained(spec)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 3,
                                up_block_types=("UpDecoderBlock2D",) * 3,
                                block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                                sample_size=image_size)
            # A trained VAE's posterior is narrow (the SDXL VAE's std is ~1e-3 of its mean's);
            # a random one's log-variance is ~0, whose samples would drown the image in noise
            # the UNet cannot predict from the embeddings. Pin the log-variance to -20.
            with torch.no_grad():
                logvar = slice(vae.config.latent_channels, None)
                vae.quant_conv.weight[logvar] = 0.0
                vae.quant_conv.bias[logvar] = -20.0
        world = ShapesWorld(seed)
        probe = torch.stack([vae_pixels(world.sample(i, image_size).image, image_size) for i in range(16)])
        with torch.no_grad():
            std = vae.encode(probe).latent_dist.mean.std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
    vae.requires_grad_(False)
    return vae.eval()


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
def offset_noise(shape: torch.Size | tuple[int, ...], offset: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise plus `offset` x a Gaussian constant per (sample, channel), shared by every
    pixel (and frame): the noise offset that lets the model shift an image's mean brightness,
    which plain noise at the last timesteps leaves nearly untouched."""
    noise = torch.randn(shape, generator=generator)
    return noise + offset * torch.randn(tuple(shape[:2]) + (1,) * (len(shape) - 2), generator=generator)


def sample_generator(seed: int, step: int, position: int, held_out: bool = False) -> torch.Generator:
    """The generator of every random draw of one sample: the one at `position` in the global
    batch of `step` (of the held-out batches with `held_out`). A function of these alone, so
    any number of ranks draws the same numbers for a sample, and each rank draws only for its
    own samples: drawing the global batch on every rank and slicing it would cost each rank
    ~1.3 s of CPU per step at Emu2-Gen's batch of 2,048 1024-px images (two 4x128x128 normal
    draws per sample at ~210M numbers/s, one thread, measured on our 2-core CPU)."""
    state = np.random.SeedSequence([seed, step, position, int(held_out)]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def shard_unet(unet: UNet, mesh: DeviceMesh, param_dtype: torch.dtype) -> None:
    """FSDP2 over the 1-D `mesh`, in place: every resnet and every transformer of the down, mid
    and up blocks is one all-gather / reduce-scatter unit, then the UNet itself (the root: the
    input and output convs, the time embeddings, the down- and upsamplers). Per resnet and
    transformer rather than per down/up block: in Emu2-Gen's UNet (2.53B parameters) the first
    up block holds 1.19B, which would be gathered at once; the largest unit here is one
    ten-layer transformer (344M) and the root holds 31M. Parameters are gathered in
    `param_dtype`, gradients reduce-scattered in fp32 and averaged over the ranks."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in (*unet.down_blocks.values(), unet.mid_block, *unet.up_blocks.values()):
        for units in (block.resnets, block.attentions):
            for unit in (units.values() if units is not None else ()):
                fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(unet, mesh=mesh, mp_policy=policy)


@dataclass
class DecoderStep:
    """One optimiser step, as every rank sees it."""

    loss: float
    """The mean denoising loss of the global batch."""
    grad_norm: float
    """The global gradient norm before clipping."""
    samples: int
    """Images (or clips) of the global batch."""
    stop: bool
    """Some rank was signalled (SIGTERM/SIGINT) by the end of the step: every rank stops."""


class DecoderTrainer:
    """One rank of a decoder training run: builds the frozen encoder and VAE, the UNet (FSDP2
    under WORLD_SIZE > 1), AdamW, the schedule and the checkpointer; steps, evaluates, saves
    and resumes. Every rank of a torchrun job builds one."""

    def __init__(self, cfg: DecoderJobConfig):
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        cfg.validate(world_size=world)
        from diffusers import DDPMScheduler

        self.cfg = cfg
        self.device = pick_device(cfg.train.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dtype = cfg.train.dtype
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
        self.run_dir = Path(cfg.train.run_dir)
        self.world = world
        mesh = None
        if world > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            mesh = ParallelDims(dp_shard=world).build_mesh(self.device.type)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.local_batch = cfg.data.batch_size // world

        torch.manual_seed(cfg.train.seed)  # every rank builds the same frozen parts and UNet
        self.encoder_cfg = Emu2Config.from_preset(cfg.model.encoder)
        self.encoder = FrozenEncoder(self.encoder_cfg)
        if cfg.model.encoder_weights:
            self.encoder.load_released(cfg.model.encoder_weights)
        self.encoder.to(self.device)
        self.vae = build_vae(cfg.model.vae, cfg.data.image_size, cfg.train.seed).to(self.device)
        self.unet_cfg: UNetConfig = UNetConfig.from_preset(cfg.model.unet)
        if self.vae.config.latent_channels != self.unet_cfg.in_channels:
            raise ValueError(f"the VAE has {self.vae.config.latent_channels} latent channels but the "
                             f"{cfg.model.unet} UNet takes {self.unet_cfg.in_channels}")
        unet = UNet(self.unet_cfg)
        if cfg.model.unet_weights:
            load_unet_weights(unet, cfg.model.unet_weights)
        self.unet: UNet = (inflate_unet(unet) if cfg.model.video else unet).to(self.device)
        if mesh is not None:
            shard_unet(self.unet, mesh, self.autocast_dtype or torch.float32)
        self.noise = DDPMScheduler(**cfg.diffusion.schedule())
        self.null_embedding = self._null_embedding()

        decay = [p for p in self.unet.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.unet.parameters() if p.dim() < 2]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=o.betas, eps=o.eps, fused=(self.device.type == "cuda") or None)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.steps, o)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", self.unet, self.optimizer,
                                         scheduler=self.scheduler, keep=cfg.train.keep)
        self.step_count = 0
        self._stop_signal: str | None = None

    # -- pieces ---------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _null_embedding(self) -> torch.Tensor:
        """(n_query, width): what a dropped condition becomes (and sampling's negative)."""
        if self.cfg.diffusion.null_condition == "zeros":
            return torch.zeros(self.encoder_cfg.n_query, self.encoder_cfg.vision.width, device=self.device)
        with self.autocast():
            null = zero_image_embedding(self.encoder, self.encoder_cfg.vision.image_size, self.device)
        return null[0].float()

    def _positions(self) -> range:
        """Positions in the global batch of this rank's samples."""
        first = self.rank * self.local_batch
        return range(first, first + self.local_batch)

    def batch(self, step: int, held_out: bool = False, shift: int = 0) -> DecoderBatch:
        """This rank's slice of the global batch of `step`; with `shift`, the slice of that batch
        rolled by `shift` samples (position p holds sample p - shift, wrapping around)."""
        seed = self.cfg.data.seed + (_HELD_OUT_SEED_OFFSET if held_out else 0)
        size = self.cfg.data.batch_size
        indices = [step * size + (p - shift) % size for p in self._positions()]
        return make_batch(self.cfg, self.encoder_cfg.vision.image_size, indices, seed)

    def generators(self, step: int, held_out: bool = False) -> list[torch.Generator]:
        """One generator per sample of this rank's slice of `step` (`sample_generator`)."""
        return [sample_generator(self.cfg.train.seed, step, p, held_out) for p in self._positions()]

    @torch.no_grad()
    def conditions(self, batch: DecoderBatch,
                   generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents x scaling, embeddings) of a batch: images give (B, C, h, w) and (B, n, D);
        clips (B, C, F, h, w) and (B, F, n, D). Latents are sampled from the VAE's posterior,
        each sample's with the first draw of its generator."""
        enc = batch.encoder_pixels.to(self.device)
        pix = batch.vae_pixels.to(self.device)
        video = enc.dim() == 5
        if video:
            enc, pix = enc.flatten(0, 1), pix.flatten(0, 1)
        with self.autocast():
            cond = self.encoder(enc).float()
            posterior = self.vae.encode(pix).latent_dist
        B = batch.encoder_pixels.shape[0]
        per_sample = (posterior.mean.shape[0] // B,) + tuple(posterior.mean.shape[1:])  # (F or 1, C, h, w)
        eps = torch.cat([torch.randn(per_sample, generator=g) for g in generators]).to(self.device)
        latents = (posterior.mean.float() + posterior.std.float() * eps) * self.vae.config.scaling_factor
        if video:
            cond = cond.unflatten(0, (B, -1))
            latents = latents.unflatten(0, (B, -1)).transpose(1, 2)
        return latents, cond

    def loss(self, batch: DecoderBatch, generators: list[torch.Generator], drop: bool = True) -> torch.Tensor:
        """The denoising loss (MSE of the predicted noise) of one batch, averaged over its
        samples; every draw of sample i comes from generators[i]."""
        latents, cond = self.conditions(batch, generators)
        B = latents.shape[0]
        z = self.cfg.diffusion
        one = (1,) + tuple(latents.shape[1:])
        noise = torch.cat([offset_noise(one, z.noise_offset, g) for g in generators]).to(self.device)
        t = torch.cat([torch.randint(0, z.train_timesteps, (1,), generator=g) for g in generators]).to(self.device)
        dropped = None
        if drop:
            dropped = (torch.cat([torch.rand(1, generator=g) for g in generators]) < z.cfg_drop).to(self.device)
        noisy = self.noise.add_noise(latents, noise, t)
        if dropped is not None:  # (n, D) null broadcasts over the batch (and a clip's frames)
            cond = torch.where(dropped.view((B,) + (1,) * (cond.dim() - 1)), self.null_embedding, cond)
        time_ids = None
        if self.unet_cfg.text_time:
            R = self.cfg.data.image_size
            time_ids = size_ids(R, R, B, self.device)
        with self.autocast():
            pred = self.unet(noisy, t, cond, time_ids)
        return F.mse_loss(pred.float(), noise.float())

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (itself in one process), in one reduction."""
        if not dist.is_initialized():
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def clip_grad_norm(self) -> float:
        """The global gradient norm before clipping (FSDP's gradient shards reduced over the
        ranks); clips to optim.grad_clip (0: only measures)."""
        params = [p for p in self.unet.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optim.grad_clip, norm)
        return norm.item()

    def step(self) -> DecoderStep:
        """One optimiser step on this rank's slice of the current step's global batch. One
        reduction returns the global mean loss and whether any rank was signalled."""
        self.unet.train()
        loss = self.loss(self.batch(self.step_count), self.generators(self.step_count))
        loss.backward()
        grad_norm = self.clip_grad_norm()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step_count += 1
        loss_sum, signalled = self._sum_over_ranks([loss.item(), float(self._stop_signal is not None)])
        return DecoderStep(loss=loss_sum / self.world, grad_norm=grad_norm,
                           samples=self.cfg.data.batch_size, stop=signalled > 0)

    @torch.no_grad()
    def evaluate(self, n_batches: int) -> dict:
        """Denoising loss on held-out samples with fixed noise and timesteps (comparable across
        steps): with each sample's own embeddings, and with the previous sample's (of the
        global batch). A decoder that reads its condition does better with the right one.
        Each rank evaluates its slice; the means are of the global batches."""
        self.unet.eval()
        right = wrong = 0.0
        for i in range(n_batches):
            batch = self.batch(i, held_out=True)
            right += self.loss(batch, self.generators(i, held_out=True), drop=False).item()
            batch.encoder_pixels = self.batch(i, held_out=True, shift=1).encoder_pixels
            wrong += self.loss(batch, self.generators(i, held_out=True), drop=False).item()
        right, wrong = self._sum_over_ranks([right, wrong])
        self.unet.train()
        n = n_batches * self.world
        return {"heldout_loss": right / n, "heldout_loss_wrong_cond": wrong / n}

    # -- the loop -------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpointer.directory

    def _on_signal(self, signum: int, _frame) -> None:
        self._stop_signal = f"received {signal.Signals(signum).name}"

    def train(self, progress: bool = True, stop_at: int | None = None) -> list[dict]:
        """Run to `train.steps`, from the newest checkpoint when `train.resume`; return the
        metric records (rank 0 also appends them to run_dir/metrics.jsonl). `stop_at` ends the
        run after that step without a checkpoint, as a crash would (tests). SIGTERM or SIGINT
        ends it after the step under way, with a checkpoint of that step, on every rank."""
        from tqdm import tqdm

        cfg = self.cfg
        lead = self.rank == 0
        if lead:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.toml")
        records: list[dict] = []

        def log(record: dict) -> None:
            records.append(record)
            if lead:
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")

        if cfg.train.resume and (step := self.checkpointer.load()) is not None:
            self.step_count = step
            log({"resumed_from": step})
        end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
        if cfg.train.eval_batches and self.step_count == 0:
            log({"step": 0, **self.evaluate(cfg.train.eval_batches)})
        bar = tqdm(total=end, initial=self.step_count, disable=not (progress and lead), dynamic_ncols=True,
                   desc=f"decoder {cfg.model.unet}{' video' if cfg.model.video else ''}", mininterval=0.5)
        stopped = False
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.step_count < end:
                start = time.perf_counter()
                result = self.step()
                elapsed = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", refresh=False)
                if self.step_count % cfg.train.log_every == 0 or self.step_count == end:
                    log({"step": self.step_count, "loss": result.loss, "grad_norm": result.grad_norm,
                         "lr": self.scheduler.get_last_lr()[0], "samples_per_s": result.samples / elapsed})
                stopped = result.stop
                if stopped or self.step_count % cfg.train.save_every == 0 or self.step_count == cfg.train.steps:
                    self.checkpointer.save(self.step_count)
                if stopped:
                    if lead:
                        bar.close()
                        print(f"train_decoder: {self._stop_signal or 'a signal on another rank'}: "
                              f"checkpoint of step {self.step_count} saved in {self.checkpoint_dir}; "
                              f"run the same command to resume")
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            bar.close()
        if cfg.train.eval_batches and self.step_count == cfg.train.steps and not stopped:
            log({"step": self.step_count, **self.evaluate(cfg.train.eval_batches)})
        return records
