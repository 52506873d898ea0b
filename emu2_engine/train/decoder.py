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
[s * batch, (s + 1) * batch) and draws its noise from a generator seeded with (seed, s), so a
resumed run repeats the uninterrupted run's losses exactly without saving any RNG state.

Checkpoints (`train.save_every`): run_dir/checkpoints/step_XXXXXXXX/state.pt with the UNet,
optimiser, schedule and step; written into a temporary folder renamed into place (atomic),
the newest `train.keep` kept. With `train.resume` a run continues from the newest one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from emu2_engine.data.sequences import to_pixels
from emu2_engine.data.shapes import BACKGROUNDS, COLOURS, KINDS, ShapesWorld
from emu2_engine.inference.decode import size_ids, zero_image_embedding
from emu2_engine.models.config import PRESETS, UNET_PRESETS, Emu2Config, UNetConfig
from emu2_engine.models.projector import Projector
from emu2_engine.models.unet import UNet, load_unet_weights
from emu2_engine.models.unet3d import VideoUNet, inflate_unet
from emu2_engine.train.trainer import pick_device
from emu2_engine.models.vit import EVAVisionTransformer
from emu2_engine.train.config import JobConfig
from emu2_engine.train.optim import build_scheduler

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
    """Images (or clips) per step."""
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

    def validate(self) -> None:
        """One line for the first value that cannot work."""
        m, d, z, o, t = self.model, self.data, self.diffusion, self.optim, self.train
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


def make_batch(cfg: DecoderJobConfig, encoder_size: int, first: int, seed: int) -> DecoderBatch:
    """Samples [first, first + batch_size) of the shapes world (or of the clips) under `seed`."""
    d = cfg.data
    indices = range(first, first + d.batch_size)
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


@dataclass
class DecoderStep:
    loss: float
    grad_norm: float
    samples: int


class DecoderTrainer:
    """Builds the frozen encoder and VAE, the UNet, AdamW and the schedule; steps, evaluates,
    saves and resumes."""

    def __init__(self, cfg: DecoderJobConfig):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != 1:
            raise ValueError(f"the decoder trainer runs one process (WORLD_SIZE={world}); FSDP "
                             f"sharding of the UNet is not implemented yet. Use --nproc_per_node=1")
        from diffusers import DDPMScheduler

        cfg.validate()
        self.cfg = cfg
        self.device = pick_device(cfg.train.device)
        dtype = cfg.train.dtype
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
        self.run_dir = Path(cfg.train.run_dir)

        torch.manual_seed(cfg.train.seed)
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
        self.noise = DDPMScheduler(**cfg.diffusion.schedule())
        self.null_embedding = self._null_embedding()

        decay = [p for p in self.unet.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.unet.parameters() if p.dim() < 2]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=o.betas, eps=o.eps, fused=(self.device.type == "cuda") or None)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.steps, o)
        self.step_count = 0

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

    def batch(self, step: int, held_out: bool = False) -> DecoderBatch:
        seed = self.cfg.data.seed + (_HELD_OUT_SEED_OFFSET if held_out else 0)
        return make_batch(self.cfg, self.encoder_cfg.vision.image_size, step * self.cfg.data.batch_size, seed)

    @torch.no_grad()
    def conditions(self, batch: DecoderBatch,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents x scaling, embeddings) of a batch: images give (B, C, h, w) and (B, n, D);
        clips (B, C, F, h, w) and (B, F, n, D). Latents are sampled from the VAE's posterior."""
        enc = batch.encoder_pixels.to(self.device)
        pix = batch.vae_pixels.to(self.device)
        video = enc.dim() == 5
        if video:
            enc, pix = enc.flatten(0, 1), pix.flatten(0, 1)
        with self.autocast():
            cond = self.encoder(enc).float()
            posterior = self.vae.encode(pix).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(self.device)
        latents = (posterior.mean.float() + posterior.std.float() * eps) * self.vae.config.scaling_factor
        if video:
            B = batch.encoder_pixels.shape[0]
            cond = cond.unflatten(0, (B, -1))
            latents = latents.unflatten(0, (B, -1)).transpose(1, 2)
        return latents, cond

    def loss(self, batch: DecoderBatch, generator: torch.Generator, drop: bool = True) -> torch.Tensor:
        """The denoising loss (MSE of the predicted noise) of one batch, all draws from `generator`."""
        latents, cond = self.conditions(batch, generator)
        B = latents.shape[0]
        z = self.cfg.diffusion
        noise = offset_noise(latents.shape, z.noise_offset, generator).to(self.device)
        t = torch.randint(0, z.train_timesteps, (B,), generator=generator).to(self.device)
        dropped = (torch.rand(B, generator=generator) < z.cfg_drop).to(self.device) if drop else None
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

    def _generator(self, step: int, held_out: bool = False) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + step * 2 + int(held_out))

    def step(self) -> DecoderStep:
        """One optimiser step on the batch of the current step."""
        self.unet.train()
        loss = self.loss(self.batch(self.step_count), self._generator(self.step_count))
        loss.backward()
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.unet.parameters(), clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step_count += 1
        return DecoderStep(loss=loss.item(), grad_norm=norm.item(), samples=self.cfg.data.batch_size)

    @torch.no_grad()
    def evaluate(self, n_batches: int) -> dict:
        """Denoising loss on held-out samples with fixed noise and timesteps (comparable across
        steps): with each sample's own embeddings, and with another sample's. A decoder that
        reads its condition does better with the right one."""
        self.unet.eval()
        right = wrong = 0.0
        for i in range(n_batches):
            batch = self.batch(i, held_out=True)
            right += self.loss(batch, self._generator(i, held_out=True), drop=False).item()
            batch.encoder_pixels = batch.encoder_pixels.roll(1, dims=0)  # every sample gets another's
            wrong += self.loss(batch, self._generator(i, held_out=True), drop=False).item()
        self.unet.train()
        return {"heldout_loss": right / n_batches, "heldout_loss_wrong_cond": wrong / n_batches}

    # -- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoint_dir.glob("step_*") if (p / "state.pt").is_file())

    def save(self) -> Path:
        """Write run_dir/checkpoints/step_XXXXXXXX atomically; keep the newest `train.keep`."""
        final = self.checkpoint_dir / f"step_{self.step_count:08d}"
        tmp = self.checkpoint_dir / f".tmp_step_{self.step_count:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {"step": self.step_count, "unet": self.unet.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "config": self.cfg.to_toml()}
        torch.save(state, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.checkpoints()[:-self.cfg.train.keep]:
            shutil.rmtree(old)
        return final

    def resume(self) -> int | None:
        """Load the newest checkpoint, if any; return its step."""
        found = self.checkpoints()
        if not found:
            return None
        state = torch.load(found[-1] / "state.pt", map_location=self.device, weights_only=True)
        self.unet.load_state_dict(state["unet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = int(state["step"])
        return self.step_count

    # -- the loop -------------------------------------------------------------------------------
    def train(self, progress: bool = True, stop_at: int | None = None) -> list[dict]:
        """Run to `train.steps` (or to `stop_at`, for tests that interrupt a run); return the
        metric records, also appended to run_dir/metrics.jsonl."""
        from tqdm import tqdm

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(self.run_dir / "config.toml")
        records: list[dict] = []
        if cfg.train.resume and (step := self.resume()) is not None:
            records.append({"resumed_from": step})
        end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
        if cfg.train.eval_batches and self.step_count == 0:
            records.append({"step": 0, **self.evaluate(cfg.train.eval_batches)})
        bar = tqdm(total=end, initial=self.step_count, disable=not progress, dynamic_ncols=True,
                   desc=f"decoder {cfg.model.unet}{' video' if cfg.model.video else ''}", mininterval=0.5)
        with open(self.run_dir / "metrics.jsonl", "a") as metrics:
            for record in records:
                metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            while self.step_count < end:
                start = time.perf_counter()
                result = self.step()
                elapsed = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", refresh=False)
                if self.step_count % cfg.train.log_every == 0 or self.step_count == end:
                    record = {"step": self.step_count, "loss": result.loss, "grad_norm": result.grad_norm,
                              "lr": self.scheduler.get_last_lr()[0],
                              "samples_per_s": result.samples / elapsed}
                    records.append(record)
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                if self.step_count % cfg.train.save_every == 0 or self.step_count == cfg.train.steps:
                    self.save()
            bar.close()
            if cfg.train.eval_batches and self.step_count == cfg.train.steps:
                record = {"step": self.step_count, **self.evaluate(cfg.train.eval_batches)}
                records.append(record)
                metrics.write(json.dumps(record) + "\n")
        return records
