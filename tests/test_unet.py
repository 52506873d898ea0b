"""The image decoder's UNet against diffusers' UNet2DConditionModel: same parameter names and
shapes (so released Emu2-Gen weights load), same outputs; bad input and bad checkpoints."""

import dataclasses
import functools

import pytest
import torch

from emu2_engine.models.config import UNET_PRESETS, UNetConfig
from emu2_engine.models.unet import (UNet, diffusers_unet_config, load_unet_state_dict,
                                     load_unet_weights, timestep_embedding)

diffusers = pytest.importorskip("diffusers")

DEBUG = UNET_PRESETS["debug"]
# The other branch of the family: cross-attention on the first level, none on the last, three
# levels, two transformer layers in the middle, no text_time (the SD 2.1 / emu2-video shape).
SD_SHAPED = UNetConfig(name="sd-shaped", block_out_channels=(16, 32, 32), cross_attention=(True, True, False),
                       layers_per_block=1, transformer_layers=(1, 2, 1), attention_heads=(2, 4, 4),
                       cross_attention_dim=24, cond_tokens=4, text_time=False, norm_groups=8)


@functools.lru_cache(maxsize=None)
def _pair(cfg: UNetConfig):
    """diffusers' model with random weights, and ours loaded from its state dict (built once
    per config; tests must not change them)."""
    ref = diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg)).eval()
    with torch.no_grad():
        for p in ref.parameters():  # diffusers' init leaves some zeros; make every weight count
            p.normal_(0, 0.05)
    ours = UNet(cfg).eval()
    load_unet_state_dict(ours, ref.state_dict())
    return ref, ours


def _inputs(cfg: UNetConfig, B: int, H: int, W: int):
    x = torch.randn(B, cfg.in_channels, H, W)
    t = torch.tensor([3.0, 517.0, 999.0][:B])
    cond = torch.randn(B, cfg.cond_tokens, cfg.cross_attention_dim)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [800, 640, 12, 3, 1024, 1024],
                        [64, 64, 0, 0, 64, 64]][:B]) if cfg.text_time else None
    return x, t, cond, ids


def _reference(ref, cfg, x, t, cond, ids):
    kwargs = {"added_cond_kwargs": {"text_embeds": cond.mean(1), "time_ids": ids}} if cfg.text_time else {}
    return ref(x, t, encoder_hidden_states=cond, **kwargs).sample


@pytest.mark.parametrize("cfg", [DEBUG, SD_SHAPED], ids=lambda c: c.name)
@pytest.mark.parametrize("size", [(16, 16), (9, 13)])  # odd sizes take diffusers' sized upsampling
def test_matches_diffusers(cfg, size):
    ref, ours = _pair(cfg)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    x, t, cond, ids = _inputs(cfg, 3, *size)
    with torch.no_grad():
        want = _reference(ref, cfg, x, t, cond, ids)
        got = ours(x, t, cond, ids)
    assert want.abs().max() > 0.05  # the comparison is not between near-zero outputs
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_gradients_match_diffusers():
    ref, ours = _pair(DEBUG)
    ref.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    x, t, cond, ids = _inputs(DEBUG, 2, 8, 8)
    _reference(ref, DEBUG, x, t, cond, ids).square().mean().backward()
    ours(x, t, cond, ids).square().mean().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-6, rtol=1e-4, msg=name)
    ref.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)


@pytest.mark.parametrize("preset", ["emu2-gen", "emu2-video"])
def test_preset_has_diffusers_keys_and_shapes(preset):
    """The released configurations, built on the meta device: every parameter name and shape
    equals diffusers' model with the same config (emu2-gen = the released Emu2-Gen UNet)."""
    cfg = UNET_PRESETS[preset]
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg))
        ours = UNet(cfg)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    if preset == "emu2-gen":  # SDXL's UNet with 1792-wide cross-attention: 2.5B parameters
        assert got["add_embedding.linear_1.weight"] == (1280, 3328)
        assert got["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 1792)
        assert sum(v.numel() for v in ours.parameters()) == sum(v.numel() for v in ref.parameters())


def test_meta_model_takes_a_state_dict():
    ref, _ = _pair(DEBUG)
    with torch.device("meta"):
        ours = UNet(DEBUG)
    load_unet_state_dict(ours, {"unet." + k: v for k, v in ref.state_dict().items()}, prefix="unet.")
    assert not any(p.is_meta for p in ours.parameters())
    x, t, cond, ids = _inputs(DEBUG, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, cond, ids), _reference(ref, DEBUG, x, t, cond, ids),
                                   atol=2e-5, rtol=1e-4)


def test_timestep_embedding_by_hand():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 4)
    # frequencies exp(-ln(1e4) * i / 2) = 1, 0.01; cosines first
    want = torch.tensor([[1.0, 1.0, 0.0, 0.0],
                         [torch.cos(torch.tensor(10.0)), torch.cos(torch.tensor(0.1)),
                          torch.sin(torch.tensor(10.0)), torch.sin(torch.tensor(0.1))]])
    torch.testing.assert_close(emb, want)


def test_self_attention_goes_through_modality_attention(monkeypatch):
    import emu2_engine.models.unet as unet_module

    calls = []
    real = unet_module.modality_attention

    def spy(q, k, v, doc_ids, span_ids, causal=True, scale=None):
        calls.append((q.shape, doc_ids is None and span_ids is None, causal))
        return real(q, k, v, doc_ids, span_ids, causal=causal, scale=scale)

    monkeypatch.setattr(unet_module, "modality_attention", spy)
    model = UNet(DEBUG).eval()
    x, t, cond, ids = _inputs(DEBUG, 2, 8, 8)
    with torch.no_grad():
        model(x, t, cond, ids)
    # debug: transformers only on level 1 (4x4 tokens, 4 heads of 16): 1 down, the mid block,
    # 2 up (layers_per_block + 1), one transformer layer each
    assert len(calls) == 4
    assert all(c[1] and c[2] is False for c in calls)  # no ids (one document per row), not causal
    assert {c[0] for c in calls} == {torch.Size([2, 4, 16, 16])}


# -- bad input --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def debug_unet():
    return UNet(DEBUG).eval()


@pytest.mark.parametrize("change, message", [
    (lambda x, t, c, i: (x, t, c[:, :, :32], i), "width 64"),
    (lambda x, t, c, i: (x, t, c[:, :10], i), "16 visual embeddings"),
    # two images' embeddings joined, or Emu2-Chat's 256 per image: never averaged silently
    (lambda x, t, c, i: (x, t, c.repeat(1, 2, 1), i), r"exactly 16 visual embeddings per sample.*got 32 "
                                                     r"\(embeddings of shape \(2, 32, 64\)\)"),
    (lambda x, t, c, i: (x, t, c.repeat(1, 16, 1), i), r"exactly 16 .* got 256"),
    (lambda x, t, c, i: (x, t, c[:1], i), r"\(B=2, N, 64\)"),
    (lambda x, t, c, i: (x[:, :3], t, c, i), "4 channels"),
    (lambda x, t, c, i: (x, t, c, None), r"time_ids of shape \(2, 6\)"),
    (lambda x, t, c, i: (x, t, c, i[:, :4]), r"time_ids of shape \(2, 6\)"),
    (lambda x, t, c, i: (x, torch.zeros(3), c, i), "timesteps"),
    (lambda x, t, c, i: (x[:, :, None], t, c, i), r"\(B, C, H, W\)"),
])
def test_bad_input(debug_unet, change, message):
    args = change(*_inputs(DEBUG, 2, 8, 8))
    with pytest.raises(ValueError, match=message):
        debug_unet(*args)


def test_time_ids_refused_without_text_time():
    model = UNet(SD_SHAPED)
    x, t, cond, _ = _inputs(SD_SHAPED, 2, 8, 8)
    with pytest.raises(ValueError, match="no text_time"):
        model(x, t, cond, torch.zeros(2, 6))


def test_bad_state_dict_loads_nothing(debug_unet):
    good = UNet(DEBUG).state_dict()
    before = {k: v.clone() for k, v in debug_unet.state_dict().items()}
    bad = dict(good)
    del bad["conv_in.bias"]
    bad["extra.weight"] = torch.zeros(1)
    bad["conv_out.weight"] = torch.zeros(4, 32, 1, 1)
    with pytest.raises(ValueError) as e:
        load_unet_state_dict(debug_unet, bad)
    text = str(e.value)
    assert "nothing was loaded" in text and "missing (1): conv_in.bias" in text
    assert "unexpected (1): extra.weight" in text and "conv_out.weight: given (4, 32, 1, 1)" in text
    for k, v in debug_unet.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_unet_weights_from_an_emu2_gen_file(tmp_path, debug_unet):
    """A checkpoint laid out as the Emu2-Gen release: unet.* loads, the other parts are skipped."""
    from safetensors.torch import save_file

    src = UNet(DEBUG)
    tensors = {"unet." + k: v.contiguous() for k, v in src.state_dict().items()}
    tensors["vae.decoder.conv_in.weight"] = torch.zeros(2)
    tensors["multimodal_encoder.visual.cls_token"] = torch.zeros(3)
    save_file(tensors, tmp_path / "emu2_gen.safetensors")
    model = UNet(DEBUG)
    load_unet_weights(model, str(tmp_path / "emu2_gen.safetensors"))
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    tensors.pop("unet.conv_in.weight")
    save_file(tensors, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="conv_in.weight"):
        load_unet_weights(UNet(DEBUG), str(tmp_path / "broken.safetensors"))


def test_load_unet_weights_points_training_checkpoints_elsewhere(tmp_path):
    """A DCP folder (the decoder trainer's step-NNNNNN, found by DCP's index) is not a weights
    file: the error names the function that loads it."""
    step = tmp_path / "step-000003"
    step.mkdir()
    (step / ".metadata").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is a training checkpoint .*load_trained_decoder\(path, unet\)"):
        load_unet_weights(UNet(DEBUG), str(step))


def test_base_weights_load_all_but_the_condition_projections(tmp_path):
    """A base UNet of the same shape conditioned on 48-wide embeddings (as SDXL-base's 2048-wide
    text against Emu2's 1792), from a file or a diffusers folder: every tensor loads except the
    cross-attention keys/values, which keep the fresh initialisation, and the added-condition
    projection, which takes the base's size-id columns and zero pooled ones; all are named; a
    base that differs anywhere else loads nothing."""
    import dataclasses

    from safetensors.torch import save_file

    from emu2_engine.models.unet import CONDITION_INPUTS, load_base_unet_weights

    base = UNet(dataclasses.replace(DEBUG, cross_attention_dim=48))
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    (tmp_path / "unet").mkdir()  # a diffusers folder, as `unet/` of SDXL-base holds its weights
    save_file({k: v.contiguous() for k, v in base.state_dict().items()},
              tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    torch.manual_seed(3)
    model = UNet(DEBUG)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    kept = load_base_unet_weights(model, str(tmp_path / "base.safetensors"))
    from_folder = UNet(DEBUG)
    assert load_base_unet_weights(from_folder, str(tmp_path / "unet")) == kept
    assert torch.equal(from_folder.conv_in.weight, base.conv_in.weight)
    assert kept and all(k.endswith(CONDITION_INPUTS) for k in kept)
    assert {k.rsplit(".", 2)[-2] for k in kept} == {"to_k", "to_v", "linear_1"}
    ids = 6 * DEBUG.addition_time_embed_dim  # the added condition: [pooled | size ids]
    for k, v in model.state_dict().items():
        if k == "add_embedding.linear_1.weight":  # the base's size-id columns, zero pooled ones
            assert torch.equal(v[:, -ids:], base.state_dict()[k][:, -ids:]) and not v[:, :-ids].any()
            continue
        want = fresh[k] if k in kept else base.state_dict()[k]
        assert torch.equal(v, want), k
    other = UNet(dataclasses.replace(DEBUG, cross_attention_dim=48, block_out_channels=(32, 48)))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "other.safetensors")
    model = UNet(DEBUG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="nothing was loaded"):
        load_base_unet_weights(model, str(tmp_path / "other.safetensors"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("change, message", [
    (dict(cross_attention=(True,)), "one entry per level"),
    (dict(block_out_channels=(32, 60)), "multiple of norm_groups"),
    (dict(attention_heads=(2, 3)), "multiple of its heads"),
    (dict(temporal_kernel=2), "odd"),
])
def test_bad_config(change, message):
    with pytest.raises(ValueError, match=message):
        UNet(dataclasses.replace(DEBUG, **change))
