"""Sampling the decoders: the batched classifier-free-guidance loop equals separate
conditional and unconditional passes through diffusers' Euler scheduler; outputs are PIL
images / uint8 frame arrays of the asked size; seeds reproduce; bad input fails before any
UNet call."""

import numpy as np
import pytest
import torch
from PIL import Image

from emu2_engine.inference import decode_images, decode_video, zero_image_embedding
from emu2_engine.inference.decode import euler_scheduler, sample_latents, size_ids
from emu2_engine.models.config import UNET_PRESETS
from emu2_engine.models.unet import UNet
from emu2_engine.models.unet3d import inflate_unet

diffusers = pytest.importorskip("diffusers")
CFG = UNET_PRESETS["debug"]


@pytest.fixture(scope="module")
def parts():
    from emu2_engine.train.decoder import build_vae

    torch.manual_seed(0)
    unet = UNet(CFG).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    return unet, build_vae("tiny-random", 32, seed=0)


@pytest.fixture
def calls(parts):
    """The batch size of every UNet call made during the test."""
    batches = []
    hook = parts[0].register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    yield batches
    hook.remove()


def test_batched_guidance_equals_separate_passes(parts):
    unet, _ = parts
    B, steps, guidance = 2, 4, 3.0
    cond = torch.randn(B, CFG.cond_tokens, CFG.cross_attention_dim)
    negative = torch.randn(CFG.cond_tokens, CFG.cross_attention_dim)
    ids = size_ids(32, 32, B, "cpu")
    got = sample_latents(unet, cond, (B, 4, 8, 8), ids, steps=steps, guidance=guidance, negative=negative,
                         generator=torch.Generator().manual_seed(3))
    # By hand: the same scheduler, the two passes apart, eps = u + g (c - u).
    scheduler = euler_scheduler()
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == [751.0, 501.0, 251.0, 1.0]  # "leading" spacing, offset 1
    latents = torch.randn((B, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    latents = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            c = unet(x, t, cond, ids)
            u = unet(x, t, negative.expand(B, -1, -1), ids)
            latents = scheduler.step(u + guidance * (c - u), t, latents).prev_sample
    torch.testing.assert_close(got, latents, atol=1e-5, rtol=1e-5)


def test_one_batched_call_per_step(parts, calls):
    unet, vae = parts
    emb = torch.randn(3, CFG.cond_tokens, CFG.cross_attention_dim)
    decode_images(emb, unet=unet, vae=vae, steps=3, height=32, width=32, negative="zeros")
    assert calls == [6, 6, 6]  # unconditional and conditional together
    calls.clear()
    decode_images(emb, unet=unet, vae=vae, steps=3, guidance=1.0, height=32, width=32)
    assert calls == [3, 3, 3]  # guidance 1: no unconditional pass


def test_decode_images_gives_pil_images(parts):
    unet, vae = parts
    emb = torch.randn(2, CFG.cond_tokens, CFG.cross_attention_dim)
    neg = torch.randn(CFG.cond_tokens, CFG.cross_attention_dim)
    images = decode_images(emb, unet=unet, vae=vae, steps=2, height=32, width=24, seed=7, negative=neg)
    assert len(images) == 2 and all(isinstance(im, Image.Image) for im in images)
    assert images[0].size == (24, 32) and images[0].mode == "RGB"
    again = decode_images(emb, unet=unet, vae=vae, steps=2, height=32, width=24, seed=7, negative=neg)
    other = decode_images(emb, unet=unet, vae=vae, steps=2, height=32, width=24, seed=8, negative=neg)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))


def test_decode_video_gives_uint8_frames(parts):
    unet, vae = parts
    video = inflate_unet(unet).eval()
    emb = torch.randn(2, 1, CFG.cond_tokens, CFG.cross_attention_dim)  # one image per clip
    clips = decode_video(emb, unet=video, vae=vae, frames=3, steps=2, height=16, width=16, seed=1,
                         negative="zeros")
    assert len(clips) == 2
    assert all(c.shape == (3, 16, 16, 3) and c.dtype == np.uint8 for c in clips)
    assert not np.array_equal(clips[0][0], clips[0][1])  # each frame starts from its own noise


def test_guidance_needs_an_explicit_negative(parts, calls):
    """No default negative: with guidance, None is refused (before any UNet call) with what to
    pass; "zeros" is the all-zero negative, spelled out; guidance 1 needs none."""
    unet, vae = parts
    emb = torch.randn(2, CFG.cond_tokens, CFG.cross_attention_dim)
    video = inflate_unet(unet).eval()
    for decode, model, e in ((decode_images, unet, emb), (decode_video, video, emb[:, None])):
        with pytest.raises(ValueError, match=r"guidance 3.0 needs the negative .*zero_image_embedding\(encoder, "
                                             r"image_size\).* null embedding saved with .* negative=\"zeros\""):
            decode(e, unet=model, vae=vae, steps=2, height=16, width=16)
        with pytest.raises(ValueError, match=r"must be a tensor or the string \"zeros\", got 'zero'"):
            decode(e, unet=model, vae=vae, steps=2, height=16, width=16, negative="zero")
    assert calls == []
    zeros = decode_images(emb, unet=unet, vae=vae, steps=2, height=16, width=16, seed=3, negative="zeros")
    explicit = decode_images(emb, unet=unet, vae=vae, steps=2, height=16, width=16, seed=3,
                             negative=torch.zeros(CFG.cond_tokens, CFG.cross_attention_dim))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(zeros, explicit))
    calls.clear()
    decode_images(emb, unet=unet, vae=vae, steps=2, guidance=1.0, height=16, width=16)
    assert calls == [2, 2]


def test_video_negative_broadcasts_over_frames_and_batch(parts):
    """decode_video takes the trainer's (N, D) null embedding and zero_image_embedding's (1, N, D)
    with Fc > 1 conditioning images: the same clips as the negative written out per clip and
    image; a shape that fits neither is refused with the shape the caller passed."""
    unet, vae = parts
    video = inflate_unet(unet).eval()
    emb = torch.randn(2, 3, CFG.cond_tokens, CFG.cross_attention_dim)  # 3 conditioning images per clip
    null = torch.randn(CFG.cond_tokens, CFG.cross_attention_dim)
    kwargs = dict(unet=video, vae=vae, frames=2, steps=2, height=16, width=16, seed=4)
    want = decode_video(emb, negative=null.expand(2, 3, -1, -1), **kwargs)
    per_image = torch.randn(3, CFG.cond_tokens, CFG.cross_attention_dim)
    for negative in (null, null[None], null[None, None]):
        got = decode_video(emb, negative=negative, **kwargs)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), tuple(negative.shape)
    got = decode_video(emb, negative=per_image, **kwargs)  # one negative per conditioning image
    assert all(np.array_equal(a, b) for a, b in
               zip(got, decode_video(emb, negative=per_image.expand(2, -1, -1, -1), **kwargs)))
    with pytest.raises(ValueError, match=r"negative embeddings must be \(16, 64\), \(1 or 3, 16, 64\) or "
                                         r"\(1 or 2, 1 or 3, 16, 64\) .*\(2, 3, 16, 64\); got shape \(2, 16, 64\)"):
        decode_video(emb, negative=null.expand(2, -1, -1), **kwargs)
    with pytest.raises(ValueError, match=r"must be \(16, 64\) or \(1 or 2, 16, 64\) .*; got shape \(16, 65\)"):
        decode_images(emb[:, 0], unet=unet, vae=vae, steps=2, height=16, width=16, negative=torch.zeros(16, 65))


def test_zero_image_embedding_runs_where_the_encoder_is():
    """No device given: the all-zero image is made on the encoder's device, in its dtype (here
    the meta device, standing in for a GPU, and float64); an explicit device still works."""
    seen = []

    class Encoder(torch.nn.Module):
        def __init__(self, device, dtype):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones((), device=device, dtype=dtype))

        def forward(self, pixels):
            seen.append((pixels.device, pixels.dtype))
            return (pixels * self.scale).mean(dim=(2, 3))[:, None]

    zero_image_embedding(Encoder("meta", torch.float64), 8)
    zero_image_embedding(Encoder("cpu", torch.float64), 8, device="cpu")
    assert seen == [(torch.device("meta"), torch.float64), (torch.device("cpu"), torch.float64)]
    assert zero_image_embedding(lambda x: x.sum(), 4) == 0  # any callable: made on the CPU


def test_zero_image_embedding():
    from emu2_engine.models.config import PRESETS
    from emu2_engine.train.decoder import FrozenEncoder

    encoder = FrozenEncoder(PRESETS["debug"])
    got = zero_image_embedding(encoder, 64)
    assert got.shape == (1, 16, 64)
    torch.testing.assert_close(got, encoder(torch.zeros(1, 3, 64, 64)))


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, message", [
    ((2, CFG.cond_tokens, 32), "width 64"),
    ((2, 10, CFG.cross_attention_dim), "16 visual embeddings"),
    ((1, 32, CFG.cross_attention_dim), r"exactly 16 visual embeddings per sample.*got 32"),  # two images joined
    ((1, 64, CFG.cross_attention_dim), r"exactly 16 visual embeddings per sample.*got 64"),
    ((CFG.cond_tokens, CFG.cross_attention_dim), r"\(B, N, D\)"),
])
def test_bad_embeddings_fail_before_sampling(parts, calls, shape, message):
    unet, vae = parts
    with pytest.raises(ValueError, match=message):
        decode_images(torch.randn(shape), unet=unet, vae=vae, steps=2, height=32, width=32, negative="zeros")
    assert calls == []


def test_bad_arguments(parts):
    unet, vae = parts
    emb = torch.randn(2, CFG.cond_tokens, CFG.cross_attention_dim)
    with pytest.raises(ValueError, match="multiples of the VAE's factor 4"):
        decode_images(emb, unet=unet, vae=vae, steps=2, height=30, width=32)
    with pytest.raises(ValueError, match="steps must be a whole number from 1"):
        decode_images(emb, unet=unet, vae=vae, steps=0, height=32, width=32)
    for guidance in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance must be a finite number >= 1"):
            decode_images(emb, unet=unet, vae=vae, steps=2, guidance=guidance, height=32, width=32,
                          negative="zeros")
    bad = emb.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="embeddings hold non-finite values"):
        decode_images(bad, unet=unet, vae=vae, steps=2, height=32, width=32, negative="zeros")
    with pytest.raises(ValueError, match="negative hold non-finite values"):
        decode_images(emb, unet=unet, vae=vae, steps=2, height=32, width=32, negative=bad[0])
    with pytest.raises(ValueError, match=r"negative embeddings must be .*; got shape \(3, 16, 64\)"):
        decode_images(emb, unet=unet, vae=vae, steps=2, height=32, width=32, negative=torch.zeros(3, 16, 64))
    video = inflate_unet(unet)
    with pytest.raises(ValueError, match="use decode_video"):
        decode_images(emb, unet=video, vae=vae, steps=2, height=32, width=32)
    with pytest.raises(ValueError, match="needs a VideoUNet"):
        decode_video(emb[:, None], unet=unet, vae=vae, steps=2, height=32, width=32)
    with pytest.raises(ValueError, match="frames must be a whole number >= 1"):
        decode_video(emb[:, None], unet=video, vae=vae, frames=0, steps=2, height=32, width=32)
    with pytest.raises(ValueError, match=r"\(B, Fc >= 1, 16, 64\)"):
        decode_video(emb, unet=video, vae=vae, frames=2, steps=2, height=32, width=32)


def _sdxl_pipeline(unet, vae):
    """diffusers' own SDXL pipeline around a diffusers UNet holding `unet`'s weights."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from emu2_engine.models.unet import diffusers_unet_config

    ref = UNet2DConditionModel(**diffusers_unet_config(unet.cfg)).eval()
    ref.load_state_dict(unet.state_dict())
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=ref, scheduler=euler_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sampling_matches_the_sdxl_pipeline(parts):
    """decode_images is what a user of diffusers' StableDiffusionXLPipeline gets with the same
    weights, embeddings as the prompt embeddings and their mean as the pooled one (EMU2_FACTS.md):
    the same latents (scheduler, guidance, size ids) and the same uint8 pixels (VAE scaling,
    rounding), with guidance 3 and without it (1)."""
    unet, vae = parts
    pipe = _sdxl_pipeline(unet, vae)
    B = 2
    emb = torch.randn(B, CFG.cond_tokens, CFG.cross_attention_dim, generator=torch.Generator().manual_seed(20))
    neg = torch.randn(CFG.cond_tokens, CFG.cross_attention_dim, generator=torch.Generator().manual_seed(21))
    negb = neg.expand(B, -1, -1)
    for steps, guidance in ((4, 3.0), (3, 1.0)):
        kw = dict(prompt_embeds=emb, negative_prompt_embeds=negb, pooled_prompt_embeds=emb.mean(1),
                  negative_pooled_prompt_embeds=negb.mean(1), num_inference_steps=steps, guidance_scale=guidance,
                  height=32, width=32)
        theirs = pipe(**kw, generator=torch.Generator().manual_seed(5), output_type="latent").images
        ours = sample_latents(unet, emb, (B, 4, 8, 8), size_ids(32, 32, B, "cpu"), steps=steps, guidance=guidance,
                              negative=neg, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        images = pipe(**kw, generator=torch.Generator().manual_seed(5), output_type="pil").images
        got = decode_images(emb, unet=unet, vae=vae, steps=steps, guidance=guidance, negative=neg, height=32,
                            width=32, seed=5)
        for a, b in zip(got, images):
            diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
            # equal but where float noise (1e-6 in the latents) crosses a rounding boundary;
            # truncating instead of rounding would move about half the values by 1
            assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())
    # SDXL's size conditions as the pipeline takes them (Emu2-Gen's sends 1024 x 1024, crop 0, 0)
    kw.update(original_size=(1024, 768), crops_coords_top_left=(8, 4))
    theirs = pipe(**kw, generator=torch.Generator().manual_seed(6), output_type="latent").images
    ours = sample_latents(unet, emb, (B, 4, 8, 8), size_ids(32, 32, B, "cpu", (1024, 768), (8, 4)), steps=3,
                          guidance=1.0, negative=neg, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    got = decode_images(emb, unet=unet, vae=vae, steps=3, guidance=1.0, height=32, width=32, seed=6,
                        original_size=(1024, 768), crop_top_left=(8, 4))
    plain = decode_images(emb, unet=unet, vae=vae, steps=3, guidance=1.0, height=32, width=32, seed=6)
    images = pipe(**kw, generator=torch.Generator().manual_seed(6), output_type="pil").images
    assert np.abs(np.asarray(got[0], dtype=int) - np.asarray(images[0], dtype=int)).max() <= 1
    assert not np.array_equal(np.asarray(got[0]), np.asarray(plain[0]))


def test_each_video_frame_is_the_vae_decode_of_its_latents(parts):
    """decode_video's frame f of clip b is the VAE's decode of the sampled latents' frame f (the
    (C, F) -> (F, C) order, not a reshape that mixes channels and frames)."""
    from emu2_engine.inference.decode import _to_uint8, vae_decode

    unet, vae = parts
    video = inflate_unet(unet).eval()
    emb = torch.randn(2, 1, CFG.cond_tokens, CFG.cross_attention_dim, generator=torch.Generator().manual_seed(22))
    clips = decode_video(emb, unet=video, vae=vae, frames=3, steps=2, height=16, width=16, seed=1,
                         negative="zeros")
    latents = sample_latents(video, emb, (2, 4, 3, 4, 4), size_ids(16, 16, 2, "cpu"), steps=2, guidance=3.0,
                             negative="zeros", generator=torch.Generator().manual_seed(1))
    for b, clip in enumerate(clips):
        for f in range(3):
            assert np.array_equal(clip[f], _to_uint8(vae_decode(vae, latents[b:b + 1, :, f]))[0]), (b, f)


def test_an_fp16_vae_that_overflows_decodes_in_fp32_when_its_config_says_so():
    """SDXL's VAE overflows in fp16 and its config sets force_upcast; as in diffusers' pipeline,
    vae_decode then decodes in fp32 (and gives the VAE back in fp16). Without the flag the
    overflow is an error naming it, never a silently black image."""
    from emu2_engine.inference.decode import vae_decode
    from emu2_engine.train.decoder import build_vae

    vae = build_vae("tiny-random", 32, seed=0)
    with torch.no_grad():   # activations past fp16's 65504 after conv_in (the next GroupNorm rescales them)
        vae.decoder.conv_in.weight.mul_(300)
        vae.decoder.conv_in.bias.fill_(6e4)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(23))
    want = vae_decode(vae, z)
    vae.to(torch.float16)
    assert vae.config.force_upcast
    got = vae_decode(vae, z)
    assert next(vae.parameters()).dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-3)   # fp16 weights, fp32 arithmetic
    vae.register_to_config(force_upcast=False)
    with pytest.raises(FloatingPointError, match="non-finite pixels .* in torch.float16"):
        vae_decode(vae, z)


def test_bad_sampling_arguments_fail_before_sampling(parts, calls):
    """steps beyond the schedule's training timesteps (diffusers failed after the last UNet pass)
    or not whole, sizes of 0 or below, no sample, not a tensor, a schedule overriding the
    sampler's own settings: one-line errors before any UNet call."""
    unet, vae = parts
    emb = torch.randn(2, CFG.cond_tokens, CFG.cross_attention_dim)
    kw = dict(unet=unet, vae=vae, height=32, width=32, negative="zeros")
    for steps in (1001, 2.5, True):
        with pytest.raises(ValueError, match=r"steps must be a whole number from 1 to the noise schedule's 1000"):
            decode_images(emb, steps=steps, **kw)
    for height in (0, -32, 32.0):
        with pytest.raises(ValueError, match="height and width must be positive multiples"):
            decode_images(emb, steps=2, **{**kw, "height": height})
    with pytest.raises(ValueError, match=r"hold no sample \(B = 0\)"):
        decode_images(emb[:0], steps=2, **kw)
    for bad in ({"original_size": (1024,)}, {"original_size": (0, 1024)}, {"crop_top_left": (-1, 0)}):
        with pytest.raises(ValueError, match="must be two whole numbers"):
            decode_images(emb, steps=2, **kw, **bad)
    with pytest.raises(ValueError, match="must be a torch.Tensor .*, got ndarray"):
        decode_images(emb.numpy(), steps=2, **kw)
    with pytest.raises(ValueError, match=r"sampler's .* are fixed to Emu2-Gen's, got \['timestep_spacing'\]"):
        decode_images(emb, steps=2, schedule={"num_train_timesteps": 1000, "timestep_spacing": "trailing"}, **kw)
    video = inflate_unet(unet)
    with pytest.raises(ValueError, match="frames must be a whole number >= 1"):
        decode_video(emb[:, None], unet=video, vae=vae, frames=2.0, steps=2, height=32, width=32)
    assert calls == []


def test_the_latent_space_mapping_follows_the_vae_config():
    """vae_decode maps latents as diffusers does: z / scaling_factor + shift_factor (a VAE whose
    config has a shift, e.g. SD3's); per-channel latents_mean / latents_std are refused."""
    from emu2_engine.inference.decode import latent_scaling, vae_decode
    from emu2_engine.train.decoder import build_vae

    vae = build_vae("tiny-random", 32, seed=0)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(24))
    scale, shift = latent_scaling(vae)
    assert shift == 0.0
    plain = vae_decode(vae, z)
    vae.register_to_config(shift_factor=0.5)
    assert latent_scaling(vae) == (scale, 0.5)
    shifted = vae_decode(vae, z)                      # decodes z / scale + 0.5
    vae.register_to_config(shift_factor=None)
    torch.testing.assert_close(shifted, vae_decode(vae, z + 0.5 * scale))
    assert not torch.allclose(shifted, plain)
    vae.register_to_config(latents_mean=[0.0] * 4)
    with pytest.raises(ValueError, match="sets latents_mean: per-channel latent statistics are not supported"):
        vae_decode(vae, z)
