"""The inflated video UNet: a freshly inflated model equals the 2D model on every frame of a
static video; on a moving video the spatial-temporal attention and the temporal convs really
mix frames; inflation checks the 2D checkpoint whole; bad clips are refused."""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from emu2_engine.models.config import UNET_PRESETS
from emu2_engine.models.unet import Transformer2D, UNet
from emu2_engine.models.unet3d import TEMPORAL_KEYS, VideoUNet, inflate_unet

CFG = UNET_PRESETS["debug"]
B, FRAMES, H, W = 2, 5, 8, 12


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(1)
    unet = UNet(CFG).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    return unet, inflate_unet(unet).eval()


def _conditions():
    t = torch.tensor([7.0, 640.0])
    cond = torch.randn(B, CFG.cond_tokens, CFG.cross_attention_dim)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [96, 80, 4, 0, 64, 64]])
    return t, cond, ids


def _per_frame(unet, video, t, cond, ids):
    """The 2D model on each frame alone -> (B, C, F, H, W)."""
    return torch.stack([unet(video[:, :, f], t, cond, ids) for f in range(video.shape[2])], dim=2)


def test_inflated_keys_are_the_2d_keys_plus_temporal_convs(models):
    unet, video = models
    keys_2d = set(unet.state_dict())
    keys_3d = set(video.state_dict())
    extra = keys_3d - keys_2d
    assert keys_2d <= keys_3d and extra and all(any(s in k for s in TEMPORAL_KEYS) for k in extra)
    # one temporal conv after each of the two 3x3 convs of every resnet (weight + bias each)
    n_resnets = sum(1 for k in keys_2d if k.endswith("conv1.weight") and "resnets" in k)
    assert len(extra) == 4 * n_resnets
    for k in keys_2d:
        assert torch.equal(video.state_dict()[k], unet.state_dict()[k]), k
    for k in extra:
        assert not video.state_dict()[k].any(), k  # identity start


def test_static_video_equals_the_2d_model_on_every_frame(models):
    unet, video = models
    t, cond, ids = _conditions()
    frame = torch.randn(B, CFG.in_channels, H, W)
    clip = frame[:, :, None].expand(B, CFG.in_channels, FRAMES, H, W).contiguous()
    with torch.no_grad():
        want = unet(frame, t, cond, ids)
        got = video(clip, t, cond[:, None], ids)  # conditioned on one image per clip
        got_all = video(clip, t, cond[:, None].expand(B, FRAMES, -1, -1), ids)  # on every frame's
    assert got.shape == (B, CFG.in_channels, FRAMES, H, W)
    for f in range(FRAMES):
        torch.testing.assert_close(got[:, :, f], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_all[:, :, f], want, atol=1e-5, rtol=1e-5)


def _self_attention_gap(unet, video, clip, t, cond, ids) -> float:
    """Largest difference between the video model's self-attention outputs and the per-frame
    2D model's, over every transformer (hooks on attn1)."""
    def capture(model):
        outs = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o))
                 for n, m in model.named_modules() if n.endswith("attn1")]
        return outs, hooks

    with torch.no_grad():
        outs_3d, hooks = capture(video)
        video(clip, t, cond[:, None], ids)
        for h in hooks:
            h.remove()
        outs_2d, hooks = capture(unet)
        for f in range(clip.shape[2]):
            unet(clip[:, :, f], t, cond, ids)
        for h in hooks:
            h.remove()
    n = len(outs_3d)
    assert n == 4 and len(outs_2d) == n * clip.shape[2]
    gap = 0.0
    for i, out in enumerate(outs_3d):  # (B, F*HW, C) against F calls of (B, HW, C)
        per_frame = torch.cat([outs_2d[f * n + i] for f in range(clip.shape[2])], dim=1)
        gap = max(gap, (out - per_frame).abs().max().item())
    return gap


def test_moving_video_mixes_frames_in_attention(models):
    """Not a vacuous equality: on frames that differ, the video model's self-attention sees the
    other frames (outputs far from the per-frame model's), on a static video it does not (the
    difference is rounding), while the fresh temporal convs add nothing in both."""
    unet, video = models
    t, cond, ids = _conditions()
    frame = torch.randn(B, CFG.in_channels, 1, H, W)
    static_gap = _self_attention_gap(unet, video, frame.expand(-1, -1, FRAMES, -1, -1), t, cond, ids)
    moving_gap = _self_attention_gap(unet, video, torch.randn(B, CFG.in_channels, FRAMES, H, W), t, cond, ids)
    assert static_gap < 1e-6
    assert moving_gap > 100 * max(static_gap, 1e-7)


def test_spatial_temporal_attention_by_hand():
    """A Transformer2D with frames=F is attention over all F*H*W tokens of a clip: equal to
    per-frame attention when the frames are equal, different otherwise."""
    torch.manual_seed(0)
    block = Transformer2D(32, heads=2, layers=1, context_dim=8, groups=8).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    cond = torch.randn(1, 3, 8)
    frame = torch.randn(1, 32, 3, 5)
    static = frame.expand(4, -1, -1, -1)
    moving = torch.randn(4, 32, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(static, cond, frames=4),
                                   block(static, cond.expand(4, -1, -1), frames=1), atol=1e-5, rtol=1e-5)
        diff = block(moving, cond, frames=4) - block(moving, cond.expand(4, -1, -1), frames=1)
    assert diff.abs().max() > 0.1


def test_temporal_convs_are_wired(models):
    """Non-zero temporal weights change the output of a static video, and make frame f depend
    on its neighbours."""
    unet, _ = models
    video = inflate_unet(unet).eval()
    with torch.no_grad():
        for name, p in video.named_parameters():
            if "temporal_conv" in name:
                p.normal_(0, 0.05)
    t, cond, ids = _conditions()
    clip = torch.randn(B, CFG.in_channels, FRAMES, H, W)
    with torch.no_grad():
        base = video(clip, t, cond[:, None], ids)
        changed = clip.clone()
        changed[:, :, 0] += 1.0
        out = video(changed, t, cond[:, None], ids)
    assert (out[:, :, 1] - base[:, :, 1]).abs().max() > 1e-4


def test_gradients_reach_the_temporal_convs(models):
    unet, _ = models
    video = inflate_unet(unet)
    t, cond, ids = _conditions()
    video(torch.randn(B, CFG.in_channels, 3, H, W), t, cond[:, None], ids).square().mean().backward()
    grads = [p.grad for n, p in video.named_parameters() if "temporal_conv" in n]
    assert grads and all(g is not None for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_one_frame_is_the_2d_model(models):
    unet, video = models
    t, cond, ids = _conditions()
    frame = torch.randn(B, CFG.in_channels, H, W)
    with torch.no_grad():
        torch.testing.assert_close(video(frame[:, :, None], t, cond[:, None], ids)[:, :, 0],
                                   unet(frame, t, cond, ids), atol=1e-5, rtol=1e-5)


def test_inflate_from_a_state_dict(models):
    unet, video = models
    inflated = inflate_unet(unet.state_dict(), CFG)
    for k, v in video.state_dict().items():
        assert torch.equal(inflated.state_dict()[k], v), k


# -- bad input --------------------------------------------------------------------------------
def test_zero_frames_refused(models):
    _, video = models
    t, cond, ids = _conditions()
    with pytest.raises(ValueError, match="at least one frame"):
        video(torch.randn(B, CFG.in_channels, 0, H, W), t, cond[:, None], ids)


@pytest.mark.parametrize("cond_shape, message", [
    ((B, 16, 64), r"\(B, Fc >= 1, 16, 64\)"),  # an image's (B, N, D): the clip needs (B, Fc, N, D)
    ((B, 0, 16, 64), r"Fc >= 1"),
    ((B, 2, 12, 64), "16 visual embeddings"),
    ((B, 2, 16, 48), "width 64"),
])
def test_bad_video_conditioning(models, cond_shape, message):
    _, video = models
    t, _, ids = _conditions()
    with pytest.raises(ValueError, match=message):
        video(torch.randn(B, CFG.in_channels, 3, H, W), t, torch.randn(cond_shape), ids)


def test_video_unet_joins_the_embeddings_of_several_images(models):
    """Fc images per clip give Fc x cond_tokens cross-attention keys: accepted by the video UNet
    (only the image UNet requires exactly cond_tokens), and the clip's output depends on every
    image's embeddings."""
    _, video = models
    t, cond, ids = _conditions()
    x = torch.randn(B, CFG.in_channels, 2, H, W)
    two = torch.stack([cond, torch.randn_like(cond)], dim=1)  # (B, 2, N, D)
    with torch.no_grad():
        out = video(x, t, two, ids)
        first_only = video(x, t, two[:, :1], ids)
    assert out.shape == x.shape and not torch.allclose(out, first_only, atol=1e-4)


def test_image_latents_refused(models):
    _, video = models
    t, cond, ids = _conditions()
    with pytest.raises(ValueError, match=r"\(B, C, F, H, W\)"):
        video(torch.randn(B, CFG.in_channels, H, W), t, cond[:, None], ids)


def test_mismatched_checkpoint_loads_nothing(models):
    unet, _ = models
    sd = dict(unet.state_dict())
    sd.pop("mid_block.resnets.1.conv2.bias")
    sd["down_blocks.0.resnets.0.conv1.weight"] = torch.zeros(32, 32, 1, 1)
    sd["not.a.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        inflate_unet(sd, CFG)
    text = str(e.value)
    assert "mid_block.resnets.1.conv2.bias" in text and "not.a.weight" in text
    assert "down_blocks.0.resnets.0.conv1.weight: given (32, 32, 1, 1)" in text
    assert "temporal" not in text  # the temporal convs are not expected from a 2D checkpoint


def test_checkpoint_of_another_config_refused(models):
    unet, _ = models
    with pytest.raises(ValueError, match="does not match"):
        inflate_unet(unet.state_dict(), dataclasses.replace(CFG, block_out_channels=(32, 96)))


def test_inflate_refuses_wrong_arguments(models):
    unet, video = models
    with pytest.raises(ValueError, match="needs the UNetConfig"):
        inflate_unet(unet.state_dict())
    with pytest.raises(ValueError, match="already a VideoUNet"):
        inflate_unet(video)
    with pytest.raises(TypeError):
        inflate_unet([1, 2])
    assert isinstance(inflate_unet(unet), VideoUNet)


class _LayoutCopies(TorchDispatchMode):
    """The copies an op makes of tensors of 4 or more dimensions: (source shape, source strides)."""

    def __init__(self):
        super().__init__()
        self.copies: list[tuple[tuple, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            if src.dim() >= 4:
                self.copies.append((tuple(src.shape), src.stride()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_body_copies_no_activation_between_layouts(models, monkeypatch, channels_last):
    """With the kernels (the Triton conv and GroupNorm, here through the interpreter), a
    channels-last body copies activations between layouts nowhere: the forward and backward's
    only activation copies are of channel slices already channels-last (the gradients
    `torch.cat` hands back to the skip connections). The NCHW body, for contrast, converts
    around every kernel. Either way the output is the reference path's."""
    unet, _ = models
    video = inflate_unet(unet)
    t, cond, ids = _conditions()
    clip = torch.randn(1, CFG.in_channels, 2, 4, 4)
    monkeypatch.setenv("EMU2_KERNELS", "reference")
    want = video(clip, t[:1], cond[:1, None], ids[:1])
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    video.channels_last = channels_last
    with _LayoutCopies() as seen:
        out = video(clip, t[:1], cond[:1, None], ids[:1])
        out.square().mean().backward()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    params = {tuple(p.shape) for p in video.parameters()}
    activations = [(shape, stride) for shape, stride in seen.copies
                   if shape not in params and shape[1] != CFG.in_channels]  # not the input/output
    between_layouts = [(shape, stride) for shape, stride in activations if stride[1] != 1]
    if channels_last:
        assert not between_layouts, between_layouts
    else:
        assert len(between_layouts) >= 8
