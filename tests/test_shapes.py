"""The shapes world: determinism, captions that match the pixels, speed."""

import time

import numpy as np
import pytest
import torch

from emu2_engine.data.shapes import (COLOURS, KINDS, NUMBERS, POSITIONS, ShapesWorld,
                                     position_phrase, tokenizer_corpus)


def test_same_seed_and_index_give_same_sample():
    a, b = ShapesWorld(7).sample(3, 64), ShapesWorld(7).sample(3, 64)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.caption == b.caption and a.shapes == b.shapes


def test_sample_does_not_depend_on_what_was_drawn_before():
    world = ShapesWorld(1)
    for i in range(10):
        world.sample(i, 64)
    assert world.sample(5, 64).image.tobytes() == ShapesWorld(1).sample(5, 64).image.tobytes()


def test_other_index_or_seed_gives_other_sample():
    world = ShapesWorld(0)
    images = {world.sample(i, 64).image.tobytes() for i in range(20)}
    assert len(images) == 20
    assert ShapesWorld(0).sample(0, 64).image.tobytes() != ShapesWorld(1).sample(0, 64).image.tobytes()


def test_caption_without_drawing_matches_sample():
    world = ShapesWorld(3)
    for i in range(20):
        assert world.caption(i) == world.sample(i, 32).caption


@pytest.mark.parametrize("size", [64, 448])
def test_image_size_and_mode(size):
    image = ShapesWorld(0).sample(11, size).image
    assert image.size == (size, size) and image.mode == "RGB"


def test_shapes_are_where_the_metadata_and_caption_say():
    world = ShapesWorld(0)
    for i in range(200):
        s = world.sample(i, 64)
        pixels = np.asarray(s.image, dtype=np.int32)
        assert 1 <= len(s.shapes) <= 3
        cells = set()
        for shape in s.shapes:
            x0, y0, x1, y1 = shape.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            # the box centre is inside every kind of shape; the colour is jittered by <= 12
            assert np.abs(pixels[cy, cx] - np.array(COLOURS[shape.colour])).max() <= 12, (i, shape)
            cell = (min(cy * 3 // 64, 2), min(cx * 3 // 64, 2))
            assert POSITIONS[cell] == shape.position
            cells.add(cell)
        assert len(cells) == len(s.shapes)  # one shape per cell: no overlaps
        for shape in s.shapes:
            same = [t for t in s.shapes if (t.colour, t.kind) == (shape.colour, shape.kind)]
            if len(same) == 1:
                assert f"{shape.colour} {shape.kind} {position_phrase(shape.position)}" in s.caption
            else:
                assert f"{NUMBERS[len(same)]} {shape.colour} {shape.kind}s," in s.caption
                assert f"one {position_phrase(shape.position)}" in s.caption
        assert s.caption.endswith(".")


def test_world_covers_every_colour_kind_and_count():
    world = ShapesWorld(0)
    samples = [world.sample(i, 16) for i in range(300)]
    assert {len(s.shapes) for s in samples} == {1, 2, 3}
    assert {t.kind for s in samples for t in s.shapes} == set(KINDS)
    assert {t.colour for s in samples for t in s.shapes} == set(COLOURS)
    assert {t.position for s in samples for t in s.shapes} == set(POSITIONS.values())
    assert {s.texture for s in samples} == {"plain", "noise", "gradient"}


def test_tokenizer_corpus_has_captions_and_answers():
    corpus = tokenizer_corpus(0, n_samples=200)
    assert ShapesWorld(0).caption(0) in corpus
    assert any(line.startswith("how many circles are there? ") for line in corpus)
    assert any("short answer:" in line for line in corpus)
    assert corpus == tokenizer_corpus(0, n_samples=200)


def test_fast_enough():
    world = ShapesWorld(0)
    start = time.perf_counter()
    for i in range(300):
        world.sample(i, 64)
    rate = 300 / (time.perf_counter() - start)
    assert rate >= 500, f"{rate:.0f} images/s at 64 px"


def test_the_kinds_that_came_before_chat_and_edit_are_unchanged():
    """Adding the chat and edit streams (and splitting the drawing into scene and pixels) left
    every earlier kind's items as they were: digests of a few items of each, computed with the
    code before those streams (commit 40c5d30), and of the grounded layouts drawn from them."""
    import hashlib

    from emu2_engine.data.records import Grounded, Phrase
    from emu2_engine.data.sequences import SampleBuilder
    from emu2_engine.data.tokenizer import Emu2Tokenizer

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    w = ShapesWorld(0)
    assert digest(b"".join(w.sample(i, 64).image.tobytes() for i in range(3))) == "4604bda246d9a0f3"
    assert digest(b"".join(w.vqa(i, 64).sample.image.tobytes() + w.vqa(i, 64).question.encode()
                           for i in range(3))) == "48206d7436c0d08f"
    assert digest(b"".join(w.grounded(i, 64).sample.image.tobytes() for i in range(3))) == "270bfeb52ab5d8c0"
    assert digest(b"".join(f.tobytes() for f in w.video(0, 64, 4).frames)) == "9ad2dd69c28815bf"
    document = w.document(0, 64)
    assert digest(repr(document.items[0]).encode() + document.items[1].image.tobytes()) == "9feab004a82f3eeb"
    assert digest(w.paragraph(0).encode()) == "fb9a687b237d9314"
    builder, g = SampleBuilder(Emu2Tokenizer(), 4, seed=9), w.grounded(1, 64)
    phrases = [Phrase(p.start, p.end, list(p.boxes)) for p in g.phrases]
    ids = [i for k in "abcdefgh" for i in builder.build(
        Grounded(k, torch.zeros(3, 8, 8), g.sample.caption, phrases), "0:grounded")[0].input_ids.tolist()]
    assert digest(str(ids).encode()) == "9699b119574f41df"
