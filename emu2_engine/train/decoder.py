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

Data (`train.decoder_data`): WebDataset shards of images or clips (data.paths), each rank
reading its own, or with no paths shapes-world images and moving-shape clips made in memory.
The next data.prefetch steps' batches are built in a background thread while the UNet trains
(`data.prefetch.Prefetcher`): the checkpoints hold the stream position of the last batch a step
took, never the read-ahead, and `train()` stops the thread when it returns or raises.
Every random draw of a sample (posterior sample, noise, noise offset, timestep, condition
dropout) comes from its own generator, seeded by (train.seed, step, its position in the global
batch B = data.batch_size): a resumed run repeats the uninterrupted run's losses exactly with
no RNG state, and W ranks draw what one process draws.

Under torchrun with WORLD_SIZE = W > 1 each rank builds the frozen encoder and VAE whole, the
UNet is sharded with FSDP2 (`shard_unet`), and rank r takes positions [r B/W, (r + 1) B/W) of
every step's global batch. The loss of a rank is the mean over its slice; FSDP's
reduce-scatter averages the gradients over the ranks, so with equal slices the update is the
one-process update of the whole batch, and the logged loss is the mean over the ranks.

Checkpoints (`train.save_every`, the last step, and a SIGTERM/SIGINT stop) go through
`checkpoint.dcp.Checkpointer`: run_dir/checkpoints/step-NNNNNN with the (sharded) UNet, the
AdamW state, the schedule, the step, the counts of non-finite steps and, when reading shards,
each (data-parallel) rank's stream position, written atomically, the newest `train.keep`
kept. With `train.resume` a run continues from the newest one. A signalled stop writes
run_dir/stopped.json once its checkpoint is complete, as the pretraining trainer does. Before
the first step rank 0 writes the null condition to run_dir/null_embedding.safetensors:
sampling a checkpoint needs it as its negative (`inference.decode.load_trained_decoder` loads
both).

Rank 0 appends the metric records to run_dir/metrics.jsonl in strict JSON (a NaN or inf loss or
gradient norm is written as null, as pretraining's `train.metrics` writes it); a last line cut
short by a kill during its write is dropped, with a warning, when the next run starts.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from emu2_engine.checkpoint.dcp import Checkpointer
from emu2_engine.data.prefetch import Prefetcher, prefetch_depth
from emu2_engine.data.shapes import ShapesWorld
from emu2_engine.inference.decode import NULL_EMBEDDING_FILE, latent_scaling, size_ids, zero_image_embedding
from emu2_engine.models.config import Emu2Config, UNetConfig
from emu2_engine.models.projector import Projector
from emu2_engine.models.unet import UNet, load_base_unet_weights, load_unet_weights
from emu2_engine.models.unet3d import inflate_unet
from emu2_engine.models.vit import EVAVisionTransformer
from emu2_engine.ops.backend import check_triton_can_run
from emu2_engine.parallel.dims import ParallelDims
from emu2_engine.train.decoder_config import DecoderJobConfig
from emu2_engine.train.decoder_data import DecoderBatch, InMemoryData, ShardData, StepBatches, vae_pixels
from emu2_engine.train.metrics import json_line, repair_last_line
from emu2_engine.train.optim import build_scheduler
from emu2_engine.train.paths import check_folders, hold_run_folders
from emu2_engine.train.trainer import (STOPPED_FILE, NonFiniteCounts, NonFiniteError, mark_stopped, rank_device,
                                       world_size)

__all__ = ["DecoderJobConfig", "DecoderTrainer", "FrozenEncoder", "build_vae",
           "mark_stopped", "offset_noise", "sample_generator", "shard_unet", "unet_units", "compile_unet_blocks"]


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


def unet_units(unet: UNet) -> list[nn.Module]:
    """Every resnet and transformer of the down, mid and up blocks, in order: the units that
    FSDP shards and `compile_unet_blocks` compiles."""
    units = []
    for block in (*unet.down_blocks.values(), unet.mid_block, *unet.up_blocks.values()):
        for group in (block.resnets, block.attentions):
            units.extend(group.values() if group is not None else ())
    return units


def compile_unet_blocks(unet: UNet) -> None:
    """torch.compile each of `unet_units` in place (`Module.compile`: parameter names and state
    dict keys stay as they are). Static shapes: Inductor failed on this UNet with dynamic ones
    (a symbolic size it could not compare, on the CPU). Units of one class share one code object
    and so one cache of compiled graphs, one per distinct shape and per mode (training, and
    evaluation without gradients): emu2-video's 38 units made 36 graphs of one class in a
    training and an evaluation pass at one resolution, far past dynamo's default limit of 8 per
    code object. The limit is raised to 4 per unit (a process-wide setting, only ever raised)."""
    import torch._dynamo.config as dynamo_config

    units = unet_units(unet)
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 4 * len(units))
    for unit in units:
        unit.compile(dynamic=False)


def shard_unet(unet: UNet, mesh: DeviceMesh, param_dtype: torch.dtype) -> None:
    """FSDP2 over the 1-D `mesh`, in place: every resnet and every transformer of the down, mid
    and up blocks is one all-gather / reduce-scatter unit, then the UNet itself (the root: the
    input and output convs, the time embeddings, the down- and upsamplers). Per resnet and
    transformer rather than per down/up block: in Emu2-Gen's UNet (2.53B parameters) the first
    up block holds 1.19B, which would be gathered at once; the largest unit here is one
    ten-layer transformer (344M) and the root holds 31M. Parameters are gathered in
    `param_dtype`, gradients reduce-scattered in fp32 and averaged over the ranks."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for unit in unet_units(unet):
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
    lr: float
    """The learning rate of this step's update (the first group's)."""
    stop: bool
    """Some rank was signalled (SIGTERM/SIGINT) by the end of the step: every rank stops."""
    skipped: bool = False
    """The gradient norm was not finite: no optimiser update (the schedule still advances)."""


class DecoderTrainer:
    """One rank of a decoder training run: builds the data, the frozen encoder and VAE, the
    UNet (FSDP2 under WORLD_SIZE > 1), AdamW, the schedule and the checkpointer; steps,
    evaluates, saves and resumes. Every rank of a torchrun job builds one."""

    def __init__(self, cfg: DecoderJobConfig):
        world = dist.get_world_size() if dist.is_initialized() else world_size()
        cfg.validate(world_size=world)
        cfg.check_files()  # a mistyped weights path, before the encoder is built and loaded
        check_folders(self.folders(cfg))
        from diffusers import DDPMScheduler

        self.cfg = cfg
        self.device, self.autocast_dtype = rank_device(cfg.train.device, cfg.train.dtype)
        check_triton_can_run(self.device)
        self.run_dir = Path(cfg.train.run_dir)
        self.world = world
        mesh = None
        if world > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            mesh = ParallelDims(dp_shard=world).build_mesh(self.device.type)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.local_batch = cfg.data.batch_size // world
        self.encoder_cfg = Emu2Config.from_preset(cfg.model.encoder)
        # the data first: shard paths that cannot work are refused before anything is built
        encoder_size = self.encoder_cfg.vision.image_size
        self.data: InMemoryData | ShardData = (
            ShardData(cfg, encoder_size, self._positions(), self.rank, world, log=_warn) if cfg.data.paths
            else InMemoryData(cfg, encoder_size, self._positions()))
        # The steps take their batches from `batches`: built data.prefetch steps ahead in a
        # background thread, or when asked (0). A prefetcher's state_dict is the position after
        # the last batch taken, so the checkpoints save it through this object.
        source = self.data if isinstance(self.data, ShardData) else StepBatches(self.data)
        self.batches: Prefetcher | ShardData | StepBatches = (
            Prefetcher(source, depth=depth, device=self.device) if (depth := prefetch_depth(cfg.data.prefetch, self.device))
            else source)

        torch.manual_seed(cfg.train.seed)  # every rank builds the same frozen parts and UNet
        self.encoder = FrozenEncoder(self.encoder_cfg)
        if cfg.model.encoder_weights:
            self.encoder.load_released(cfg.model.encoder_weights)
        self.encoder.to(self.device)
        self.vae = build_vae(cfg.model.vae, cfg.data.image_size, cfg.train.seed).to(self.device)
        latent_scaling(self.vae)  # a latent space this trainer cannot map is refused now, in one line
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if cfg.data.image_size % factor:
            raise ValueError(f"data.image_size ({cfg.data.image_size}) must be a multiple of the VAE's "
                             f"downsampling factor ({factor}, model.vae = {cfg.model.vae!r}): its latents "
                             f"would decode to {cfg.data.image_size // factor * factor} px images")
        self.unet_cfg: UNetConfig = UNetConfig.from_preset(cfg.model.unet)
        if self.vae.config.latent_channels != self.unet_cfg.in_channels:
            raise ValueError(f"the VAE has {self.vae.config.latent_channels} latent channels but the "
                             f"{cfg.model.unet} UNet takes {self.unet_cfg.in_channels}")
        unet = UNet(self.unet_cfg)
        if cfg.model.unet_weights:
            load_unet_weights(unet, cfg.model.unet_weights)
        elif cfg.model.unet_base_weights:
            fresh = load_base_unet_weights(unet, cfg.model.unet_base_weights)
            if self.rank == 0:
                print(f"train_decoder: UNet from {cfg.model.unet_base_weights}; {len(fresh)} "
                      f"projection(s) that read the condition start fresh", flush=True)
        self.unet: UNet = (inflate_unet(unet) if cfg.model.video else unet).to(self.device)
        if cfg.train.compile:
            compile_unet_blocks(self.unet)
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
        self.step_count = 0
        self.nonfinite_in_a_row = self.nonfinite_total = 0
        # The in-memory data has no state (a batch is a function of the step). A shard stream's
        # position is saved per data-parallel rank: every rank is one (FSDP shards the UNet
        # only), so another world size restarts the data with the checkpointer's warning rather
        # than handing one rank's position to a reader of another split. The non-finite counts
        # are saved too, so that a resumed run (a torchrun --max-restarts restart too) goes on
        # counting towards max_nonfinite.
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", self.unet, self.optimizer,
                                         scheduler=self.scheduler, keep=cfg.train.keep,
                                         dataloader=self.batches if isinstance(self.data, ShardData) else None,
                                         data_rank=(self.rank, world), extra={"nonfinite": NonFiniteCounts(self)})
        self._stop_signal: str | None = None

    # -- pieces ---------------------------------------------------------------------------------
    @staticmethod
    def folders(cfg: DecoderJobConfig) -> dict[str, Path]:
        """The folders the run writes into, by config key: the run folder (its checkpoints go
        in run_dir/checkpoints) and, when profiling, its profiles."""
        run_dir = Path(cfg.train.run_dir)
        folders = {"train.run_dir": run_dir, "train.run_dir (its checkpoints)": run_dir / "checkpoints"}
        if cfg.profiling.enable:
            folders["profiling.dir"] = Path(cfg.profiling.dir or run_dir / "profile")
        return folders

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

    def save_null_embedding(self) -> Path:
        """Write `null_embedding` to run_dir/NULL_EMBEDDING_FILE (rank 0, before the first step):
        the negative to sample this run's checkpoints with (`inference.decode.load_trained_decoder`
        returns it). Written under a temporary name, then renamed, so a reader never sees half a
        file. Every start of the run writes it again: it is a function of the config (the seed,
        the encoder and null_condition), so a resumed run writes the same tensor."""
        from safetensors.torch import save_file

        from emu2_engine.checkpoint.released import atomic_path

        path = self.run_dir / NULL_EMBEDDING_FILE
        with atomic_path(path) as tmp:
            save_file({"null_embedding": self.null_embedding.detach().float().cpu().contiguous()}, str(tmp),
                      metadata={"null_condition": self.cfg.diffusion.null_condition,
                                "encoder": self.cfg.model.encoder})
        return path

    def _positions(self) -> range:
        """Positions in the global batch of this rank's samples."""
        first = self.rank * self.local_batch
        return range(first, first + self.local_batch)

    def generators(self, step: int, held_out: bool = False) -> list[torch.Generator]:
        """One generator per sample of this rank's slice of `step` (`sample_generator`)."""
        return [sample_generator(self.cfg.train.seed, step, p, held_out) for p in self._positions()]

    @torch.no_grad()
    def conditions(self, batch: DecoderBatch,
                   generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents x scaling, embeddings) of a batch: images give (B, C, h, w) and (B, n, D);
        clips (B, C, F, h, w) and (B, F, n, D). Latents are sampled from the VAE's posterior,
        each sample's with the first draw of its generator."""
        enc = batch.encoder_pixels.to(self.device, non_blocking=True)  # pinned by the prefetcher
        pix = batch.vae_pixels.to(self.device, non_blocking=True)
        video = enc.dim() == 5
        if video:
            enc, pix = enc.flatten(0, 1), pix.flatten(0, 1)
        with self.autocast():
            cond = self.encoder(enc).float()
            posterior = self.vae.encode(pix).latent_dist
        B = batch.encoder_pixels.shape[0]
        per_sample = (posterior.mean.shape[0] // B,) + tuple(posterior.mean.shape[1:])  # (F or 1, C, h, w)
        eps = torch.cat([torch.randn(per_sample, generator=g) for g in generators]).to(self.device)
        scale, shift = latent_scaling(self.vae)
        latents = (posterior.mean.float() + posterior.std.float() * eps - shift) * scale
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

    def micro_batches(self, batch: DecoderBatch, generators: list[torch.Generator]
                      ) -> list[tuple[DecoderBatch, list[torch.Generator]]]:
        """This rank's slice split into `train.microbatches` equal parts, each with its samples'
        generators."""
        n = self.cfg.train.microbatches
        size = len(generators) // n
        parts = [slice(i * size, (i + 1) * size) for i in range(n)]
        return [(DecoderBatch(batch.encoder_pixels[p], batch.vae_pixels[p]), generators[p]) for p in parts]

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
        if self.cfg.optim.grad_clip > 0 and torch.isfinite(norm):  # an inf norm would scale by 0 into NaN
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optim.grad_clip, norm)
        return norm.item()

    def skip_counts(self) -> Counter:
        """This rank's training samples skipped by the shard readers, by kind, up to the batch
        of the last step (not the prefetcher's read-ahead); empty for in-memory data."""
        return self.batches.skip_counts() if isinstance(self.data, ShardData) else Counter()

    def skip_totals(self) -> dict[str, int]:
        """`skip_counts` summed over all ranks (a collective: every rank calls it at the same
        step)."""
        counts = self.skip_counts()
        if dist.is_initialized():
            gathered: list[Counter | None] = [None] * self.world
            dist.all_gather_object(gathered, counts)
            counts = sum(gathered, Counter())
        return dict(sorted(counts.items()))

    def step(self) -> DecoderStep:
        """One optimiser step on this rank's slice of the current step's global batch, in
        `train.microbatches` micro-batches (their gradients accumulated: the gradient of the
        slice's mean loss). One reduction returns the global mean loss and whether any rank was
        signalled."""
        self.unet.train()
        n = self.cfg.train.microbatches
        sharded = hasattr(self.unet, "set_requires_gradient_sync")  # FSDP2
        loss = torch.zeros((), device=self.device)
        parts = self.micro_batches(next(self.batches), self.generators(self.step_count))
        for i, (micro, generators) in enumerate(parts):
            if sharded:  # reduce-scatter the gradients once, after the last micro-batch
                self.unet.set_requires_gradient_sync(i == n - 1)
            part_loss = self.loss(micro, generators) / n
            part_loss.backward()
            loss += part_loss.detach()
        grad_norm = self.clip_grad_norm()  # global: every rank takes the same decision below
        lr = self.scheduler.get_last_lr()[0]   # this update's, before the schedule moves on
        skipped = not math.isfinite(grad_norm)
        if skipped:  # NaN or inf gradients would poison AdamW's moments, then every checkpoint
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
        else:
            self.nonfinite_in_a_row = 0
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step_count += 1
        loss_sum, signalled = self._sum_over_ranks([loss.item(), float(self._stop_signal is not None)])
        return DecoderStep(loss=loss_sum / self.world, grad_norm=grad_norm,
                           samples=self.cfg.data.batch_size, lr=lr, stop=signalled > 0, skipped=skipped)

    @torch.no_grad()
    def evaluate(self, n_batches: int) -> dict:
        """Denoising loss on held-out samples with fixed noise and timesteps (comparable across
        steps): with each sample's own embeddings, and with the next held-out sample's (another
        sample at any batch size, `InMemoryData.heldout`). A decoder that reads its condition
        does better with the right one.
        Each rank evaluates its slice, in `train.microbatches` parts as the step does; the means
        are of the global batches."""
        self.unet.eval()
        totals = {"right": 0.0, "wrong": 0.0}
        n_micro = self.cfg.train.microbatches
        for i, (batch, other_pixels) in enumerate(self.data.heldout(n_batches)):
            other = DecoderBatch(other_pixels, batch.vae_pixels)  # another sample's embeddings
            for key, source in (("right", batch), ("wrong", other)):
                # fresh generators per pass: both see the same latents, noise and timesteps, so
                # the two losses differ only by the condition
                generators = self.generators(i, held_out=True)
                for micro, gens in self.micro_batches(source, generators):  # as the step splits
                    totals[key] += self.loss(micro, gens, drop=False).item() / n_micro
        right, wrong = self._sum_over_ranks([totals["right"], totals["wrong"]])
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
        metric records (rank 0 also appends them to run_dir/metrics.jsonl, non-finite numbers
        as null, after dropping a torn last line: `metrics.repair_last_line`). `stop_at` ends the
        run after that step without a checkpoint, as a crash would (tests). SIGTERM or SIGINT
        ends it after the step under way, with a checkpoint of that step, on every rank, and
        rank 0 writes run_dir/stopped.json. When reading shards, every step record carries the
        running skip counts of all ranks (`skipped`)."""
        with hold_run_folders(self.folders(self.cfg), lead=self.rank == 0):
            return self._train(progress, stop_at)

    def _train(self, progress: bool, stop_at: int | None) -> list[dict]:
        from tqdm import tqdm

        cfg = self.cfg
        lead = self.rank == 0
        metrics = self.run_dir / "metrics.jsonl"
        if lead:
            cfg.save(self.run_dir / "config.toml")
            repair_last_line(metrics, "train_decoder")
            self.save_null_embedding()
            (self.run_dir / STOPPED_FILE).unlink(missing_ok=True)  # this run has not stopped yet
            print(f"train_decoder: data: {self.data.describe()}", flush=True)
        records: list[dict] = []

        def log(record: dict) -> None:
            records.append(record)
            if lead:
                with open(metrics, "a") as f:
                    f.write(json_line(record))  # strict JSON: NaN and inf as null

        if cfg.train.resume and (step := self.checkpointer.load()) is not None:
            self.step_count = step
            log({"resumed_from": step})
            if lead:
                print(f"resumed from step {step} ({self.checkpoint_dir})")
        if not isinstance(self.data, ShardData):  # in memory, the batches follow the step
            self.batches.load_state_dict({"step": self.step_count})
        end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
        evaluate = cfg.train.eval_batches > 0 and self.data.has_heldout
        if cfg.train.eval_batches and not evaluate and lead:
            print("train_decoder: held-out evaluation skipped: data.paths are real shards and "
                  "data.heldout_paths names no held-out shards of them", flush=True)
        if evaluate and self.step_count == 0:
            log({"step": 0, **self.evaluate(cfg.train.eval_batches)})
        bar = tqdm(total=end, initial=self.step_count, disable=not (progress and lead), dynamic_ncols=True,
                   desc=f"decoder {cfg.model.unet}{' video' if cfg.model.video else ''}", mininterval=0.5)
        stopped = False
        first_step = self.step_count
        profiler = cfg.profiling.profiler(self.run_dir, self.rank, self.device, self.step_count)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            if profiler is not None:
                profiler.start()
            while self.step_count < end:
                start = time.perf_counter()
                result = self.step()
                elapsed = time.perf_counter() - start
                if profiler is not None:
                    profiler.step(self.step_count)
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", refresh=False)
                if self.step_count % cfg.train.log_every == 0 or self.step_count == end:
                    record = {"step": self.step_count, "loss": result.loss, "grad_norm": result.grad_norm,
                              "lr": result.lr, "samples_per_s": result.samples / elapsed,
                              "nonfinite_steps": self.nonfinite_total}
                    if isinstance(self.data, ShardData):
                        record["skipped"] = self.skip_totals()
                    log(record)
                if self.nonfinite_in_a_row >= cfg.train.max_nonfinite:
                    raise NonFiniteError.after(self.nonfinite_in_a_row, self.step_count, "gradient norm",
                                               result.loss, result.grad_norm)
                stopped = result.stop
                reason = self._stop_signal or "a signal on another rank"
                if stopped and lead:  # said before the save: a launcher may kill us during it
                    bar.close()
                    print(f"train_decoder: {reason}: saving a checkpoint of step {self.step_count}", flush=True)
                if stopped or self.step_count % cfg.train.save_every == 0 or self.step_count == cfg.train.steps:
                    self.checkpointer.save(self.step_count)  # synchronous: complete when it returns
                if stopped:
                    if lead:
                        mark_stopped(self.run_dir, self.step_count, reason, self.checkpoint_dir)
                        print(f"train_decoder: {reason}: checkpoint of step {self.step_count} saved in "
                              f"{self.checkpoint_dir}; run the same command to resume", flush=True)
                    break
            bar.close()
            # The final evaluation, once: by the invocation that trained the last step. A signal
            # during it only sets the flag (the last checkpoint is already complete).
            if evaluate and self.step_count == cfg.train.steps and self.step_count > first_step and not stopped:
                log({"step": self.step_count, **self.evaluate(cfg.train.eval_batches)})
        finally:
            if profiler is not None:
                profiler.stop()
            if isinstance(self.batches, Prefetcher):
                self.batches.close()  # no thread outlives the run; the position is kept
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            bar.close()
        return records


def _warn(message: str) -> None:
    """Where the shard readers and decoders say things (the first skipped sample of each kind,
    a codec left to PyAV): stderr, prefixed, on every rank (each reads its own shards)."""
    print(f"train_decoder: {message}", file=sys.stderr, flush=True)
