"""The video decoder: the image UNet inflated to 3D (EMU2_FACTS.md, the paper's section 2.2.3).

Two changes turn `UNet` into `VideoUNet`:
- every 3x3 conv of every resnet is followed by a temporal conv over the frames of a clip
  (kernel `cfg.temporal_kernel`, 3), in the residual form ``s + temporal(s)``; both run as one
  `spatiotemporal_conv`. The temporal weights start at zero, so the layer starts as the 2D conv;
- self-attention runs over frames x positions: the F*H*W tokens of a clip are one sequence (one
  document of `modality_attention`), instead of one sequence per frame.
Everything else (norms, cross-attention, the time embedding, the up/down convs) acts on each
frame as in the 2D model, with the clip's timestep and conditioning.

`inflate_unet` builds a `VideoUNet` from a 2D model or state dict. Freshly inflated, it gives
the 2D model's output on every frame of a static video: the temporal convs add zero, and
attention over F identical copies of a frame's keys is the per-frame attention (each key's
softmax weight is divided by F and its value summed F times). On a video whose frames differ,
the spatial-temporal attention mixes frames, so outputs differ from the per-frame model.

Conditioning: the embeddings of one or more images per clip, (B, Fc, N, D) with N = cond_tokens
(Emu2 embeds a video as 64 embeddings per frame; a clip may be conditioned on all of its frames
or on one image). Cross-attention reads all Fc*N of them; the pooled `text_time` condition is
their mean.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from emu2_engine.models.config import UNetConfig
from emu2_engine.models.unet import UNet, check_state_dict, clips_to_frames, frames_to_clips

TEMPORAL_KEYS = ("temporal_conv1.", "temporal_conv2.")
"""Substrings of the parameter names that inflation adds (the rest are the 2D UNet's)."""


class VideoUNet(UNet):
    """Noisy video latents (B, C, F, H, W), timesteps (B,), visual embeddings (B, Fc, N, D) and
    size/crop ids (B, 6) (with `text_time`) -> predicted noise (B, C, F, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg, temporal_kernel=cfg.temporal_kernel)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | float, cond: torch.Tensor,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        if latents.dim() != 5:
            raise ValueError(f"video latents must be (B, C, F, H, W), got shape {tuple(latents.shape)}")
        frames = latents.shape[2]
        if frames < 1:
            raise ValueError(f"a clip needs at least one frame for the temporal convolutions, got "
                             f"latents of shape {tuple(latents.shape)}")
        cond = self.flatten_cond(cond)
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        self.check_inputs(latents, timesteps, cond, time_ids)
        emb = self.embed_time(timesteps, cond, time_ids, latents.shape[0], latents.dtype)
        out = self.denoise(clips_to_frames(latents), emb.repeat_interleave(frames, dim=0),
                           cond.to(latents.dtype), frames)
        return frames_to_clips(out, frames)

    def check_cond_count(self, cond: torch.Tensor) -> None:
        """The flattened (B, Fc*N, D) conditioning of a clip: Fc >= 1 images' cond_tokens each."""
        n = self.cfg.cond_tokens
        if cond.shape[1] == 0 or cond.shape[1] % n:
            raise ValueError(f"the video UNet reads {n} visual embeddings per conditioning image "
                             f"(Fc x {n} per clip), got {cond.shape[1]} per clip (flattened shape "
                             f"{tuple(cond.shape)})")

    def flatten_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, Fc, N, D) embeddings of Fc images per clip -> (B, Fc*N, D), the cross-attention
        keys of the clip; ValueError unless N is cond_tokens and Fc >= 1."""
        if cond.dim() != 4 or cond.shape[1] < 1:
            raise ValueError(f"video conditioning must be (B, Fc >= 1, {self.cfg.cond_tokens}, "
                             f"{self.cfg.cross_attention_dim}) (embeddings of Fc images per clip), "
                             f"got shape {tuple(cond.shape)}")
        if cond.shape[2] != self.cfg.cond_tokens:
            raise ValueError(f"each conditioning image has {self.cfg.cond_tokens} visual embeddings, "
                             f"got {cond.shape[2]}")
        return cond.flatten(1, 2)


def inflate_unet(source: UNet | Mapping[str, torch.Tensor], cfg: UNetConfig | None = None) -> VideoUNet:
    """A `VideoUNet` holding the weights of a 2D UNet (a `UNet` or its state dict, then with its
    `cfg`), with zero temporal convs. The state dict is checked whole (missing, unexpected and
    wrongly shaped keys in one error) before the video model is built."""
    if isinstance(source, UNet):
        if cfg is not None and cfg != source.cfg:
            raise ValueError("inflate_unet: cfg differs from the given model's cfg; pass one or the other")
        if isinstance(source, VideoUNet):
            raise ValueError("inflate_unet: the model is already a VideoUNet")
        cfg, state_dict = source.cfg, source.state_dict()
    elif isinstance(source, Mapping):
        if cfg is None:
            raise ValueError("inflate_unet: a state dict needs the UNetConfig it was made with (cfg=...)")
        state_dict = source
    else:
        raise TypeError(f"inflate_unet expects a UNet or a state dict, got {type(source).__name__}")
    with torch.device("meta"):
        shape_model = VideoUNet(cfg)
    check_state_dict(shape_model, state_dict, "the 2D UNet state dict", ignore=TEMPORAL_KEYS)
    ref = next(iter(state_dict.values()))
    model = VideoUNet(cfg).to(device=ref.device, dtype=ref.dtype)
    model.load_state_dict(state_dict, strict=False)
    return model
