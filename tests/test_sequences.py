"""Sequence building and collation into the PackedBatch contract."""

import numpy as np
import pytest
import torch
from PIL import Image

from emu2_engine.data.sequences import (CLIP_MEAN, CLIP_STD, Sample, build_image_caption,
                                        collate_packed, to_pixels)
from emu2_engine.data.shapes import ShapesWorld
from emu2_engine.data.tokenizer import Emu2Tokenizer

NQ, SIZE = 4, 8


@pytest.fixture(scope="module")
def tok():
    return Emu2Tokenizer()


def pixels(value: float) -> torch.Tensor:
    return torch.full((3, SIZE, SIZE), value)


def test_build_image_caption_layouts(tok):
    ids = tok.ids
    cap = tok.encode("a red circle.")
    s = build_image_caption(tok, pixels(0), "a red circle.", NQ, image_first=True)
    assert s.input_ids.tolist() == [1, ids.img, *[ids.image] * NQ, ids.img_end, *cap, 2]
    assert s.text_target.tolist() == [True, False, *[False] * NQ, False, *[True] * len(cap), True]
    assert s.image_starts == [1] and s.regress == [False] and s.bidirectional == [False]
    s = build_image_caption(tok, pixels(0), "a red circle.", NQ, image_first=False, regress=True)
    assert s.input_ids.tolist() == [1, *cap, ids.img, *[ids.image] * NQ, ids.img_end, 2]
    assert s.image_starts == [1 + len(cap)] and s.regress == [True] and len(s) == len(cap) + NQ + 4
    with pytest.raises(ValueError, match="regression target cannot be bidirectional"):
        build_image_caption(tok, pixels(0), "x", NQ, image_first=True, regress=True, bidirectional=True)


def test_hand_checked_packing(tok):
    """Row 0: an image-first sample then a caption-first regressed one, then padding.
    Row 1: an image-first bidirectional sample, then padding."""
    P, s, e, I, E, X = 512, 1, 2, 513, 514, 515  # [PAD] <s> </s> [IMG] [/IMG] <image>
    piece = tok.token_to_id
    a, red, circle, dot = piece("▁a"), piece("▁red"), piece("▁circle"), piece(".")
    two, squares, blue, square = piece("▁two"), piece("▁squares"), piece("▁blue"), piece("▁square")
    samples = [
        build_image_caption(tok, pixels(0), "a red circle.", NQ, image_first=True),
        build_image_caption(tok, pixels(1), "two squares.", NQ, image_first=False, regress=True),
        build_image_caption(tok, pixels(2), "a blue square.", NQ, image_first=True, bidirectional=True),
    ]
    batch = collate_packed(samples, [[0, 1], [2]], seq_len=26, ids=tok.ids, n_query=NQ, image_size=SIZE)
    batch.validate(tok.vocab_size, NQ, SIZE)
    N = -100
    assert batch.input_ids.tolist() == [
        [s, I, X, X, X, X, E, a, red, circle, dot, e,   # doc 0, positions 0-11
         s, two, squares, dot, I, X, X, X, X, E, e,     # doc 1, positions 12-22
         P, P, P],
        [s, I, X, X, X, X, E, a, blue, square, dot, e] + [P] * 14,
    ]
    assert batch.labels.tolist() == [
        [N, N, N, N, N, N, a, red, circle, dot, e, N,
         two, squares, dot, N, N, N, N, N, N, e, N,
         N, N, N],
        [N, N, N, N, N, N, a, blue, square, dot, e, N] + [N] * 14,
    ]
    assert batch.doc_ids.tolist() == [[0] * 12 + [1] * 11 + [-1] * 3, [0] * 12 + [-1] * 14]
    assert batch.position_ids.tolist() == [list(range(12)) + list(range(11)) + [0] * 3,
                                           list(range(12)) + [0] * 14]
    assert batch.span_ids.tolist() == [[-1] * 26, [-1, -1, 2, 2, 2, 2] + [-1] * 20]
    assert batch.image_slots.tolist() == [[2, 3, 4, 5], [17, 18, 19, 20], [28, 29, 30, 31]]
    assert batch.reg_images.tolist() == [1]
    assert batch.reg_positions.tolist() == [[16, 17, 18, 19]]
    assert batch.images.shape == (3, 3, SIZE, SIZE) and batch.images.dtype == torch.float32
    assert batch.images[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    for name in ("doc_ids", "span_ids", "position_ids"):
        assert getattr(batch, name).dtype == torch.int32
    for name in ("input_ids", "labels", "image_slots", "reg_images", "reg_positions"):
        assert getattr(batch, name).dtype == torch.int64
    assert batch.n_tokens == 35


def test_no_images_and_empty_rows(tok):
    two, dot = tok.encode("two.")
    sample = Sample(input_ids=np.array([1, two, dot, 2]), text_target=np.ones(4, dtype=bool))
    batch = collate_packed([sample], [[0], []], seq_len=5, ids=tok.ids, n_query=NQ, image_size=SIZE)
    batch.validate(tok.vocab_size, NQ, SIZE)
    assert batch.images.shape == (0, 3, SIZE, SIZE)
    assert batch.image_slots.shape == (0, NQ) and batch.reg_positions.shape == (0, NQ)
    assert batch.reg_images.shape == (0,)
    assert batch.labels.tolist() == [[two, dot, 2, -100, -100], [-100] * 5]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0], [0] * 5]
    assert batch.doc_ids[1].tolist() == [-1] * 5


def test_row_longer_than_seq_len(tok):
    samples = [build_image_caption(tok, pixels(0), "a red circle.", NQ, image_first=True)] * 2
    with pytest.raises(ValueError, match=r"row 0 holds 24 tokens .* seq_len is 20"):
        collate_packed(samples, [[0, 1]], seq_len=20, ids=tok.ids, n_query=NQ, image_size=SIZE)


def test_bad_samples_are_rejected(tok):
    good = build_image_caption(tok, pixels(0), "a red circle.", NQ, image_first=True)
    with pytest.raises(ValueError, match=r"image of shape \(3, 8, 8\), expected \(3, 16, 16\)"):
        collate_packed([good], [[0]], seq_len=16, ids=tok.ids, n_query=NQ, image_size=16)
    with pytest.raises(ValueError, match=r"not \[IMG\] \+ 5 slots"):
        collate_packed([good], [[0]], seq_len=16, ids=tok.ids, n_query=5, image_size=SIZE)


def test_collated_shapes_world_batch_is_consistent(tok):
    world, rng, size, nq = ShapesWorld(0), np.random.default_rng(0), 32, 16
    samples = []
    for i in range(12):
        sample = world.sample(i, size)
        samples.append(build_image_caption(tok, to_pixels(sample.image, size), sample.caption, nq,
                                           image_first=bool(rng.random() < 0.5), regress=i % 3 == 0,
                                           bidirectional=i % 3 == 1))
    rows = [[0, 1, 2], [3, 4, 5, 6], [7], [8, 9, 10, 11]]
    batch = collate_packed(samples, rows, seq_len=256, ids=tok.ids, n_query=nq, image_size=size)
    batch.validate(tok.vocab_size, nq, size)
    flat_ids, flat_doc = batch.input_ids.flatten(), batch.doc_ids.flatten()
    assert (flat_ids[batch.image_slots] == tok.ids.image).all()
    assert batch.images.shape[0] == 12 and batch.reg_images.tolist() == [0, 3, 6, 9]
    assert (flat_ids[batch.reg_positions[:, 0]] == tok.ids.img).all()
    assert torch.equal(batch.reg_positions[:, 1:], batch.image_slots[batch.reg_images, :-1])
    # every label is the next token of the same document, and a text token
    b, t = torch.nonzero(batch.labels != -100, as_tuple=True)
    assert torch.equal(batch.labels[b, t], batch.input_ids[b, t + 1])
    assert torch.equal(batch.doc_ids[b, t], batch.doc_ids[b, t + 1])
    visual = torch.tensor([tok.ids.img, tok.ids.image, tok.ids.img_end, tok.ids.pad])
    assert not torch.isin(batch.labels[b, t], visual).any()
    # caption tokens and </s> are all predicted: labels count = text tokens minus one <s> per doc
    text = (batch.doc_ids >= 0) & ~torch.isin(batch.input_ids, torch.tensor(
        [tok.ids.img, tok.ids.image, tok.ids.img_end]))
    assert int((batch.labels != -100).sum()) == int(text.sum()) - 12
    # bidirectional spans: exactly the slots of images 1, 4, 7, 10
    spans = batch.span_ids.flatten()
    assert sorted(set(spans[spans >= 0].tolist())) == [1, 4, 7, 10]
    for n in (1, 4, 7, 10):
        assert torch.equal(torch.nonzero(spans == n).flatten(), batch.image_slots[n])
    assert torch.equal(batch.images[5], to_pixels(world.sample(5, size).image, size))


def test_to_pixels_resizes_and_normalises():
    white = Image.new("RGB", (40, 30), (255, 255, 255))
    x = to_pixels(white, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(x, torch.tensor(expected).view(3, 1, 1).expand(3, 16, 16), atol=1e-5)
    grey = to_pixels(Image.new("L", (16, 16), 0), 16)  # converted to RGB, not resized
    assert torch.allclose(grey[:, 0, 0], torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)]))
