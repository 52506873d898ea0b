"""Visual embeddings -> pixels: sampling the image and video decoders.

`decode_images` runs Emu2-Gen's sampler (EMU2_FACTS.md): diffusers' Euler discrete scheduler
(epsilon prediction, SDXL's scaled-linear betas, "leading" timesteps with offset 1), 50 steps,
classifier-free guidance 3.0, the conditional and unconditional passes batched into one UNet
call per step, then the VAE's decoder. `decode_video` is the same loop over the video UNet's
(B, C, F, h, w) latents, decoded frame by frame.

The negative (unconditional) condition must be the one the decoder was trained to treat as
"no condition": Emu2-Gen uses the embedding of an empty prompt, or of a zero image when
autoencoding, and the decoder trainer drops conditions to the zero-image embedding by default.
Both need the encoder (and, for the prompt, the LLM), so with guidance the caller must pass
`negative`: a tensor (`zero_image_embedding` computes the zero-image one), or the string
"zeros" for all-zero embeddings, what a decoder trained with ``null_condition = "zeros"`` saw.
There is no default: a wrong negative gives plausible but wrong pictures without any error.
Guidance 1 makes no unconditional pass and needs none.

`load_trained_decoder` loads a checkpoint of the decoder trainer into a UNet and returns the
null embedding its run saved: the negative that decoder was trained with.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from emu2_engine.models.unet import UNet
from emu2_engine.models.unet3d import VideoUNet

SDXL_NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear")
"""The training noise schedule of SDXL and of the Emu2-Gen decoder (scheduler/ of the release)."""

NULL_EMBEDDING_FILE = "null_embedding.safetensors"
"""Where the decoder trainer saves its run's null condition, run_dir/NULL_EMBEDDING_FILE (one
tensor, "null_embedding", (N, D) fp32): the embeddings a dropped condition became in training,
and so the negative to sample its checkpoints with."""


SAMPLING_SETTINGS = dict(prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)
"""Emu2-Gen's sampler settings, fixed: a `schedule` gives the training noise schedule only."""


def euler_scheduler(schedule: dict | None = None):
    """A fresh diffusers EulerDiscreteScheduler for `schedule` (default SDXL's) with Emu2-Gen's
    sampling settings. Fresh per call: the scheduler keeps a step counter."""
    from diffusers import EulerDiscreteScheduler

    fixed = sorted(set(schedule or {}) & set(SAMPLING_SETTINGS))
    if fixed:
        raise ValueError(f"schedule gives the training noise schedule (e.g. {sorted(SDXL_NOISE_SCHEDULE)}); "
                         f"the sampler's {sorted(SAMPLING_SETTINGS)} are fixed to Emu2-Gen's, got {fixed}")
    return EulerDiscreteScheduler(**(schedule or SDXL_NOISE_SCHEDULE), **SAMPLING_SETTINGS)


@torch.no_grad()
def zero_image_embedding(encode: Callable[[torch.Tensor], torch.Tensor], image_size: int,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """The negative condition for autoencoding: the encoder's embeddings (1, N, D) of an
    all-zero input image (zero after CLIP normalisation, the dataset's mean colour).

    The image is made where the encoder runs: on `device`, or with none given, on the device
    of an `nn.Module` encoder's parameters (the CPU for any other callable), and in the
    parameters' floating dtype (float32 otherwise)."""
    param = next(encode.parameters(), None) if isinstance(encode, nn.Module) else None
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    if device is None:
        device = param.device if param is not None else "cpu"
    return encode(torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype))


def load_trained_decoder(path: str | Path, unet: UNet) -> torch.Tensor | None:
    """Load a decoder trained by `train.decoder.DecoderTrainer` into `unet` for sampling and
    return its run's null embedding, the `negative` to sample it with (None when the run saved
    none: runs from before the trainer saved it).

    path: the run folder (train.run_dir), its checkpoints/ folder (the newest complete
    checkpoint is loaded), or one checkpoint folder (checkpoints/step-NNNNNN). `unet` must be
    the trained shape: a `UNet` of the run's preset, or a `VideoUNet` for a video run. Only the
    UNet's weights are read (`checkpoint.dcp.load_model_weights`: every key and shape checked
    first, no optimiser, one process); CheckpointError when there is no complete checkpoint or
    it holds another model."""
    from safetensors.torch import load_file

    from emu2_engine.checkpoint.dcp import CheckpointError, complete_checkpoints, load_model_weights

    path = Path(path)
    if path.name.startswith("step-"):  # one checkpoint (load_model_weights says if incomplete)
        checkpoint, run_dir = path, path.parent.parent
    else:
        for folder in (path, path / "checkpoints"):
            if found := complete_checkpoints(folder):
                checkpoint, run_dir = found[-1][1], folder.parent
                break
        else:
            raise CheckpointError(f"{path} holds no complete decoder checkpoint: expected a run folder "
                                  f"(train.run_dir, with checkpoints/step-NNNNNN), its checkpoints "
                                  f"folder, or one step-NNNNNN folder")
    load_model_weights(checkpoint, unet)
    null_file = run_dir / NULL_EMBEDDING_FILE
    if not null_file.is_file():
        return None
    null = load_file(null_file)["null_embedding"]
    want = (unet.cfg.cond_tokens, unet.cfg.cross_attention_dim)
    if tuple(null.shape) != want:
        raise CheckpointError(f"{null_file} holds a null embedding of shape {tuple(null.shape)}, but the "
                              f"loaded UNet reads {want}: it belongs to another run")
    return null


def size_ids(height: int, width: int, batch: int, device, original_size: tuple[int, int] | None = None,
             crop_top_left: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """SDXL's six size/crop ids (original height and width, crop top and left, target height and
    width), by default those of an uncropped image generated at its own size."""
    original = (height, width) if original_size is None else tuple(original_size)
    ids = torch.tensor([[*original, *crop_top_left, height, width]], dtype=torch.float32, device=device)
    return ids.expand(batch, 6)


def _whole(value, low: int) -> bool:
    """value is a whole number (not a bool) of at least low."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def _check_size_conditions(original_size, crop_top_left) -> None:
    """original_size (None: the target size) and crop_top_left are pairs of whole numbers."""
    pairs = [("crop_top_left", crop_top_left, 0)] + ([] if original_size is None else
                                                     [("original_size", original_size, 1)])
    for name, pair, low in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_whole(v, low) for v in pair)):
            raise ValueError(f"{name} must be two whole numbers >= {low} (height, width / top, left), got {pair!r}")


def _vae_factor(vae) -> int:
    """Pixels per latent along each side (2 per downsampling block of the VAE's encoder)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


NEGATIVE_HELP = ("pass negative=zero_image_embedding(encoder, image_size) (autoencoding: the trainer's "
                 "default null condition, diffusion.null_condition = \"zero-image\"), the null embedding "
                 "saved with the decoder's training run (what load_trained_decoder(run_dir, unet) "
                 "returns), or negative=\"zeros\" for a decoder trained with "
                 "diffusion.null_condition = \"zeros\"; guidance=1.0 needs no negative")


def _check_negative(guidance: float, negative: torch.Tensor | str | None) -> None:
    """With guidance, `negative` is a tensor or "zeros" (see the module docstring)."""
    if not (negative is None or isinstance(negative, torch.Tensor) or negative == "zeros"):
        raise ValueError(f"negative must be a tensor or the string \"zeros\", got {negative!r}: "
                         + NEGATIVE_HELP)
    if negative is None and guidance != 1.0:
        raise ValueError(f"guidance {guidance} needs the negative (unconditional) condition the decoder "
                         "was trained with, and there is no safe default: " + NEGATIVE_HELP)


def _negative_like(cond: torch.Tensor, negative: torch.Tensor | str) -> torch.Tensor:
    """`negative` broadcast to cond's shape, (B, N, D) for images, (B, Fc, N, D) for clips:
    (N, D) exactly, with any of the leading dims, each 1 or cond's. So the trainer's (N, D)
    null embedding and zero_image_embedding's (1, N, D) serve every sample and every
    conditioning image of a clip. "zeros" gives all-zero embeddings."""
    if isinstance(negative, str):
        return torch.zeros_like(cond)
    lead, tokens = cond.shape[:-2], tuple(cond.shape[-2:])
    given = tuple(negative.shape)
    fits = (2 <= len(given) <= cond.dim() and given[-2:] == tokens
            and all(n in (1, c) for n, c in zip(reversed(given[:-2]), reversed(lead))))
    if not fits:
        forms = [tuple(f"1 or {c}" for c in lead[len(lead) - k:]) + tokens for k in range(len(lead) + 1)]
        spelled = [f"({', '.join(map(str, form))})" for form in forms]
        raise ValueError(f"negative embeddings must be {', '.join(spelled[:-1])} or {spelled[-1]} to go with "
                         f"embeddings of shape {tuple(cond.shape)}; got shape {given}")
    negative = negative.to(device=cond.device, dtype=cond.dtype)
    return negative.reshape((1,) * (cond.dim() - len(given)) + given).expand_as(cond)


def _check_guidance(steps: int, guidance: float, train_timesteps: int) -> None:
    """steps a whole number from 1 to the schedule's training timesteps (diffusers' scheduler
    fails after the last UNet pass beyond them), guidance finite and >= 1."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= train_timesteps:
        raise ValueError(f"steps must be a whole number from 1 to the noise schedule's {train_timesteps} "
                         f"training timesteps, got {steps!r}")
    if not (math.isfinite(guidance) and guidance >= 1.0):
        raise ValueError(f"guidance must be a finite number >= 1 (1 turns classifier-free guidance "
                         f"off), got {guidance}")


def sample_latents(unet: UNet, cond: torch.Tensor, latent_shape: tuple[int, ...],
                   time_ids: torch.Tensor | None, *, steps: int, guidance: float,
                   negative: torch.Tensor | str | None, generator: torch.Generator | None,
                   schedule: dict | None = None) -> torch.Tensor:
    """The Euler loop with classifier-free guidance: latents of `latent_shape` (batch first).
    `negative`: a tensor or "zeros", required unless guidance is 1 (`_check_negative`)."""
    scheduler = euler_scheduler(schedule)
    _check_guidance(steps, guidance, scheduler.config.num_train_timesteps)
    _check_negative(guidance, negative)
    for name, t in (("embeddings", cond), ("negative", negative)):
        if isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} hold non-finite values (NaN or inf): the images would be "
                             f"blank; check what produced them")
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    scheduler.set_timesteps(int(steps), device=device)
    latents = torch.randn(latent_shape, generator=generator, dtype=torch.float32).to(device)
    latents = latents * scheduler.init_noise_sigma
    cond = cond.to(device=device, dtype=dtype)
    guided = guidance != 1.0
    if guided:  # one batched UNet call per step: [unconditional; conditional]
        cond = torch.cat([_negative_like(cond, negative), cond])
        time_ids = None if time_ids is None else torch.cat([time_ids, time_ids])
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents]) if guided else latents
        x = scheduler.scale_model_input(x, t).to(dtype)
        eps = unet(x, t, cond, time_ids).float()
        if guided:
            uncond, conditional = eps.chunk(2)
            eps = uncond + guidance * (conditional - uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    if not bool(torch.isfinite(latents).all()):
        raise FloatingPointError(f"the sampled latents hold non-finite values (NaN or inf): the UNet "
                                 f"overflowed in {dtype}; sample in a wider dtype (fp32 or bf16)")
    return latents


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8."""
    x = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def latent_scaling(vae) -> tuple[float, float]:
    """(scale, shift) of the VAE's latent space: the UNet's latents are (z - shift) x scale, as
    diffusers' pipelines map them (`scaling_factor`, and `shift_factor` where the config has one,
    e.g. SD3's VAE). Per-channel `latents_mean` / `latents_std` are refused: no pipeline here
    applies them."""
    config = vae.config
    for key in ("latents_mean", "latents_std"):
        if getattr(config, key, None) is not None:
            raise ValueError(f"the VAE's config sets {key}: per-channel latent statistics are not "
                             f"supported (the SDXL and SD 2.1 VAEs have none)")
    return float(config.scaling_factor), float(getattr(config, "shift_factor", None) or 0.0)


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) scaled latents -> (N, 3, H, W) pixels in about [-1, 1].

    An fp16 VAE whose config sets `force_upcast` (SDXL's does: its decoder overflows in fp16)
    decodes in fp32 and is cast back to fp16 afterwards, as diffusers' SDXL pipeline does."""
    param = next(vae.parameters())
    upcast = param.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:   # (nn.Module.to: diffusers' own .to warns about fp32 modules on every cast)
        nn.Module.to(vae, torch.float32)
    try:
        scale, shift = latent_scaling(vae)
        z = latents.to(device=param.device, dtype=next(vae.parameters()).dtype) / scale + shift
        pixels = vae.decode(z).sample
    finally:
        if upcast:
            nn.Module.to(vae, torch.float16)
    if not bool(torch.isfinite(pixels).all()):
        raise FloatingPointError(f"the VAE decoded non-finite pixels (NaN or inf) in {pixels.dtype}: decode "
                                 f"in fp32 (an fp16 VAE overflows unless its config sets force_upcast)")
    return pixels


def _pixel_size(unet: UNet, vae, height: int | None, width: int | None) -> tuple[int, int, int]:
    """(height, width, the VAE's factor); None means the UNet's sample_size through the VAE."""
    factor = _vae_factor(vae)
    height = unet.cfg.sample_size * factor if height is None else height
    width = unet.cfg.sample_size * factor if width is None else width
    for value in (height, width):
        if not _whole(value, 1) or value % factor:
            raise ValueError(f"height and width must be positive multiples of the VAE's factor {factor} "
                             f"(or None for the UNet's {unet.cfg.sample_size * factor}), got {height!r}x{width!r}")
    return int(height), int(width), factor


def _check_embeddings(embeddings, dims: str) -> None:
    """embeddings is a tensor of len(dims) dims (named in dims) with at least one sample."""
    if not isinstance(embeddings, torch.Tensor):
        raise ValueError(f"embeddings must be a torch.Tensor {dims}, got {type(embeddings).__name__}")
    if embeddings.dim() == dims.count(",") + 1 and embeddings.shape[0] == 0:
        raise ValueError(f"embeddings {dims} hold no sample (B = 0), shape {tuple(embeddings.shape)}")


@torch.no_grad()
def decode_images(embeddings: torch.Tensor, *, unet: UNet, vae, steps: int = 50, guidance: float = 3.0,
                  negative: torch.Tensor | str | None = None, height: int | None = None,
                  width: int | None = None, seed: int | None = None, schedule: dict | None = None,
                  original_size: tuple[int, int] | None = None,
                  crop_top_left: tuple[int, int] = (0, 0)) -> list[Image.Image]:
    """Visual embeddings (B, N, D) -> B PIL images of height x width pixels (default: the UNet's
    sample_size through the VAE, 1024 for Emu2-Gen).

    `original_size` and `crop_top_left` are SDXL's size conditions (its pipeline's
    `original_size` and `crops_coords_top_left`); by default an uncropped image at its own size.

    `negative`: the unconditional embeddings, (N, D) or (1 or B, N, D), or "zeros"; required
    unless guidance is 1 (see the module docstring). `seed` makes the initial noise
    reproducible.
    """
    if isinstance(unet, VideoUNet):
        raise ValueError("decode_images needs the image UNet; use decode_video for a VideoUNet")
    _check_embeddings(embeddings, "(B, N, D)")
    if embeddings.dim() != 3:
        raise ValueError(f"embeddings must be (B, N, D), got shape {tuple(embeddings.shape)}")
    height, width, factor = _pixel_size(unet, vae, height, width)
    _check_size_conditions(original_size, crop_top_left)
    B = embeddings.shape[0]
    device = next(unet.parameters()).device
    time_ids = (size_ids(height, width, B, device, original_size, crop_top_left) if unet.cfg.text_time
                else None)
    # The UNet's checks (embedding width and count), once, before any work.
    unet.check_inputs(torch.empty(B, unet.cfg.in_channels, 1, 1, device="meta"), torch.zeros(()),
                      embeddings, time_ids)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    latents = sample_latents(unet, embeddings, (B, unet.cfg.in_channels, height // factor, width // factor),
                             time_ids, steps=steps, guidance=guidance, negative=negative,
                             generator=generator, schedule=schedule)
    return [Image.fromarray(a) for a in _to_uint8(vae_decode(vae, latents))]


@torch.no_grad()
def decode_video(embeddings: torch.Tensor, *, unet: VideoUNet, vae, frames: int = 8, steps: int = 50,
                 guidance: float = 3.0, negative: torch.Tensor | str | None = None,
                 height: int | None = None, width: int | None = None, seed: int | None = None,
                 schedule: dict | None = None) -> list[np.ndarray]:
    """Visual embeddings of Fc images per clip (B, Fc, N, D) -> B uint8 arrays (frames, H, W, 3).

    `negative`: (N, D) (the trainer's null embedding), (1 or Fc, N, D) (zero_image_embedding's
    (1, N, D), or one per conditioning image) or (1 or B, 1 or Fc, N, D), broadcast over the
    clips and their conditioning images; or "zeros". Required unless guidance is 1.
    Frames go through the VAE's decoder one clip at a time.
    """
    if not isinstance(unet, VideoUNet):
        raise ValueError("decode_video needs a VideoUNet (see models.unet3d.inflate_unet)")
    _check_embeddings(embeddings, "(B, Fc, N, D)")
    if isinstance(frames, bool) or not isinstance(frames, numbers.Integral) or frames < 1:
        raise ValueError(f"frames must be a whole number >= 1, got {frames!r}")
    height, width, factor = _pixel_size(unet, vae, height, width)
    B = embeddings.shape[0]
    device = next(unet.parameters()).device
    time_ids = size_ids(height, width, B, device) if unet.cfg.text_time else None
    # The UNet's checks (embedding width and count), once, before any work.
    unet.check_inputs(torch.empty(B, unet.cfg.in_channels, frames, 1, 1, device="meta"), torch.zeros(()),
                      unet.flatten_cond(embeddings), time_ids)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    latents = sample_latents(unet, embeddings, (B, unet.cfg.in_channels, frames, height // factor,
                                                width // factor),
                             time_ids, steps=steps, guidance=guidance, negative=negative,
                             generator=generator, schedule=schedule)
    return [_to_uint8(vae_decode(vae, clip.transpose(0, 1))) for clip in latents]
