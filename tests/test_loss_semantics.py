"""The training loss on a hand-built packed batch, against CE and MSE computed by hand.

Row layout (S = 24, n_query = 4), two documents then padding:
  doc 0 (image first, image regressed): <s> [IMG] i i i i [/IMG] a b </s>          (10 tokens)
  doc 1 (caption first):                <s> c d [IMG] i i i i [/IMG] </s>          (10 tokens)
  padding:                              [PAD] x 4
Text loss: each position predicts the next token of its own document, only where that token
is text ([IMG], [/IMG], <image> and [PAD] are never targets; nothing across documents).
Regression (doc 0's image): the output at [IMG] predicts embedding 1, at slot k embedding k+1.
"""

import pytest
import torch
import torch.nn.functional as F

from emu2_engine.data.batch import PackedBatch
from emu2_engine.models import Emu2Config, Emu2Model
from emu2_engine.models.config import LlamaConfig, VisionConfig


def _tiny_config(reg_weight: float) -> Emu2Config:
    return Emu2Config(
        name="tiny", vision=VisionConfig(image_size=32, patch_size=8, width=48, depth=1, heads=4,
                                         mlp_hidden=64),
        llm=LlamaConfig(vocab_size=40 + 272, hidden=64, layers=2, heads=4, kv_heads=2, ffn_hidden=96),
        base_vocab_size=40, n_query=4, regression_weight=reg_weight)


def _batch(cfg: Emu2Config, images: torch.Tensor) -> tuple[PackedBatch, list, list]:
    ids = cfg.special_ids
    a, b, c, d = 11, 12, 13, 14
    doc0 = [ids.bos, ids.img, *[ids.image] * 4, ids.img_end, a, b, ids.eos]
    doc1 = [ids.bos, c, d, ids.img, *[ids.image] * 4, ids.img_end, ids.eos]
    S = 24
    input_ids = torch.tensor(doc0 + doc1 + [ids.pad] * 4)[None]
    # Pre-shifted labels written out by hand.
    x = -100
    labels = torch.tensor([x, x, x, x, x, x, a, b, ids.eos, x,       # doc 0
                           c, d, x, x, x, x, x, x, ids.eos, x,       # doc 1
                           x, x, x, x])[None]
    doc_ids = torch.tensor([0] * 10 + [1] * 10 + [-1] * 4, dtype=torch.int32)[None]
    pos = torch.tensor(list(range(10)) * 2 + [0] * 4, dtype=torch.int32)[None]
    batch = PackedBatch(
        input_ids=input_ids, labels=labels, doc_ids=doc_ids, span_ids=torch.full_like(doc_ids, -1),
        position_ids=pos, images=images,
        image_slots=torch.tensor([[2, 3, 4, 5], [14, 15, 16, 17]]),
        reg_images=torch.tensor([0]), reg_positions=torch.tensor([[1, 2, 3, 4]]))
    batch.validate(cfg.llm.vocab_size, cfg.n_query, cfg.vision.image_size)
    assert S == input_ids.shape[1]
    return batch, doc0, doc1


@pytest.mark.parametrize("reg_weight", [1.0, 0.25])
def test_ce_and_mse_by_hand(reg_weight):
    cfg = _tiny_config(reg_weight)
    model = Emu2Model(cfg).eval()
    images = torch.randn(2, 3, 32, 32)
    batch, doc0, doc1 = _batch(cfg, images)

    # Each document alone, unpacked: logits and final hidden states.
    captured = {}
    model.llm.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    with torch.no_grad():
        logits0 = model.logits(torch.tensor(doc0)[None], images[:1], n_query=4)[0]
        hidden0 = captured["h"][0]
        logits1 = model.logits(torch.tensor(doc1)[None], images[1:], n_query=4)[0]

    def nll(logits, t, target):
        return -F.log_softmax(logits[t].double(), dim=-1)[target]

    # Text targets: doc 0 positions 6,7,8 predict a, b, </s>; doc 1 positions 0,1,8 predict
    # c, d, </s>. Six counted tokens.
    terms = [nll(logits0, 6, doc0[7]), nll(logits0, 7, doc0[8]), nll(logits0, 8, doc0[9]),
             nll(logits1, 0, doc1[1]), nll(logits1, 1, doc1[2]), nll(logits1, 8, doc1[9])]
    want_ce = sum(terms) / len(terms)

    # Regression target: image 0's patch features averaged in 2x2 windows of the 4x4 grid.
    with torch.no_grad():
        feats = model.visual(images[:1])[0].double()  # (16, 48), row-major 4x4 grid
        grid = feats.view(4, 4, 48)
        target = torch.stack([grid[r:r + 2, c:c + 2].mean(dim=(0, 1)) for r in (0, 2) for c in (0, 2)])
        pred = hidden0[[1, 2, 3, 4]].double() @ model.project_down.weight.double().T
    want_mse = ((pred - target) ** 2).mean()

    with torch.no_grad():
        out = model(batch)
    assert int(out.n_text) == 6 and int(out.n_reg) == 4
    torch.testing.assert_close(out.ce.double(), want_ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mse.double(), want_mse, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(out.total.double(), want_ce + reg_weight * want_mse, atol=1e-5, rtol=1e-5)


def test_the_regressed_image_is_the_one_the_batch_names():
    """Regressing doc 1's image (image 1, after a caption): the prediction is read at its [IMG]
    and first three slots (packed positions 13-16, positions 3-6 of doc 1 alone) and the target
    is image 1's pooled features, not image 0's (the batch above regresses image 0, first in
    the row, which would pass with the images taken in order)."""
    cfg = _tiny_config(1.0)
    model = Emu2Model(cfg).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    batch, _, doc1 = _batch(cfg, images)
    batch.reg_images = torch.tensor([1])
    batch.reg_positions = torch.tensor([[13, 14, 15, 16]])
    batch.validate(cfg.llm.vocab_size, cfg.n_query, cfg.vision.image_size)
    captured = {}
    model.llm.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    with torch.no_grad():
        model.logits(torch.tensor(doc1)[None], images[1:], n_query=4)
        hidden1 = captured["h"][0]
        grid = model.visual(images[1:])[0].double().view(4, 4, 48)
        target = torch.stack([grid[r:r + 2, c:c + 2].mean(dim=(0, 1)) for r in (0, 2) for c in (0, 2)])
        pred = hidden1[[3, 4, 5, 6]].double() @ model.project_down.weight.double().T
        out = model(batch)
    assert int(out.n_reg) == 4
    torch.testing.assert_close(out.mse.double(), ((pred - target) ** 2).mean(), atol=1e-6, rtol=1e-4)


def test_regression_target_is_detached_and_gradients_flow():
    cfg = _tiny_config(1.0)
    model = Emu2Model(cfg)
    batch, _, _ = _batch(cfg, torch.randn(2, 3, 32, 32))
    out = model(batch)
    out.total.backward()
    # The LM head, project_down, project_up and the encoder all receive gradient (the encoder
    # through the input embeddings, not through the detached target).
    for name in ["lm_head.weight", "project_down.weight", "projector.project_up.weight",
                 "visual.blocks.0.attn.qkv.weight", "llm.layers.1.mlp.up_proj.weight"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name

    model.zero_grad()
    out = model(batch)
    out.mse.backward()
    # MSE alone: the target is detached, so the only path into the encoder is through the
    # embeddings the LLM reads; the LM head gets nothing.
    assert model.lm_head.weight.grad is None or model.lm_head.weight.grad.abs().sum() == 0


def test_no_text_and_no_regression_give_zero_not_nan():
    cfg = _tiny_config(1.0)
    model = Emu2Model(cfg)
    batch, _, _ = _batch(cfg, torch.randn(2, 3, 32, 32))
    batch.labels.fill_(-100)
    batch.reg_images = batch.reg_images[:0]
    batch.reg_positions = batch.reg_positions[:0]
    out = model(batch)
    assert out.ce.item() == 0.0 and out.mse.item() == 0.0 and int(out.n_text) == 0
    assert torch.isfinite(out.total)
