"""Bad input to the model gets one clear error that says what was expected."""

import pytest
import torch

from emu2_engine.models import Emu2Config, Emu2Model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Emu2Model(Emu2Config.from_preset("debug")).eval()


def _ids_with_slots(model, n_images):
    cfg = model.cfg
    ids = torch.randint(0, 500, (1, 20 + n_images * cfg.n_query))
    ids[0, 10:10 + n_images * cfg.n_query] = cfg.special_ids.image
    return ids


def test_logits_fill_placeholders_in_order(model):
    cfg = model.cfg
    ids = _ids_with_slots(model, 2)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        both = model.logits(ids, images)
        swapped = model.logits(ids, images.flip(0))
    assert both.shape == (1, ids.shape[1], cfg.llm.vocab_size)
    assert torch.isfinite(both).all()
    # Tokens before the first image do not see it; tokens after do, so the order matters.
    torch.testing.assert_close(both[:, :10], swapped[:, :10])
    assert (both[:, -1] - swapped[:, -1]).abs().max() > 1e-4


def test_wrong_image_size(model):
    with pytest.raises(ValueError, match=r"images must have shape \(N, 3, 64, 64\).*got \(1, 3, 48, 48\)"):
        model.logits(_ids_with_slots(model, 1), torch.randn(1, 3, 48, 48))


def test_more_images_than_placeholders(model):
    with pytest.raises(ValueError, match=r"16 image placeholders \(<image>, 16 per image\) and 0 video-frame .* do not make the 2 visual input\(s\)"):
        model.logits(_ids_with_slots(model, 1), torch.randn(2, 3, 64, 64))


def test_fewer_images_than_placeholders(model):
    with pytest.raises(ValueError, match=r"32 image placeholders .* do not make the 1 visual input\(s\)"):
        model.logits(_ids_with_slots(model, 2), torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"do not make the 0 visual input\(s\)"):
        model.logits(_ids_with_slots(model, 1))


def test_ids_outside_vocabulary(model):
    ids = torch.tensor([[1, 5, 784]])
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 784\), got values in \[1, 784\]"):
        model.logits(ids)
    with pytest.raises(ValueError, match=r"must lie in \[0, 784\)"):
        model.logits(torch.tensor([[-1, 3]]))


def test_bad_n_query_and_empty_ids(model):
    """n_query = 0 is refused (it used to fall back to the model's); empty ids get a clear error."""
    for bad in (0, 9, -4):
        with pytest.raises(ValueError, match=rf"n_query must be a square whose side divides .* got {bad}"):
            model.logits(_ids_with_slots(model, 0), n_query=bad)
    with pytest.raises(ValueError, match=r"input_ids must be \(B, S\) with B, S >= 1, got shape \(1, 0\)"):
        model.logits(torch.zeros(1, 0, dtype=torch.long))


def test_rope_tables_stay_fp32_and_need_no_buffer():
    """The rotary frequencies are computed in fp32 in each call: a model cast to bf16 keeps
    fp32 angles (a bf16 buffer put the 37B model's angles off by up to 2.5 rad), and a model
    built on the meta device and materialised with to_empty() has no uninitialised table."""
    from emu2_engine.models.llama import RotaryEmbedding

    rope = RotaryEmbedding(128, 10000.0)
    assert list(rope.buffers()) == [] and rope.inv_freq().dtype == torch.float32
    pos = torch.arange(2048)[None]
    cos32, _ = rope(pos)
    cos16, _ = rope.to(torch.bfloat16)(pos)
    assert cos16.dtype == torch.float32 and torch.equal(cos16, cos32)
    want = 1.0 / 10000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    assert torch.allclose(rope.inv_freq().double(), want, rtol=1e-6)


def test_inconsistent_config_is_refused():
    from dataclasses import replace
    cfg = Emu2Config.from_preset("debug")
    with pytest.raises(ValueError, match="llm.vocab_size must be base_vocab_size \\+ added tokens = 784"):
        Emu2Model(replace(cfg, llm=replace(cfg.llm, vocab_size=800)))
    with pytest.raises(ValueError, match=r"n_query \(9\) must be a square whose side divides"):
        Emu2Model(replace(cfg, n_query=9))
    with pytest.raises(ValueError, match="llm.heads \\(4\\) must be a multiple of llm.kv_heads \\(3\\)"):
        Emu2Model(replace(cfg, llm=replace(cfg.llm, kv_heads=3)))


def test_init_weights_after_meta_touches_every_parameter():
    with torch.device("meta"):
        model = Emu2Model(Emu2Config.from_preset("debug"))
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(float("nan"))
    model.init_weights()
    assert [n for n, p in model.named_parameters() if torch.isnan(p).any()] == []
    assert torch.isfinite(model.logits(torch.tensor([[1, 5, 9]]))).all()
