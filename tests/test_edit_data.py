"""The edit kind: InstructPix2Pix-style samples (source image, instruction, edited image)
decoded into Edit records (PIL and DALI), every malformed one skipped and counted by kind, and
the shapes world's edit items and shards."""

import io
import json

import numpy as np
import pytest
import torch

from emu2_engine.data import make_shapes
from emu2_engine.data.decode import Decoder, dali_available
from emu2_engine.data.make_shapes import HELDOUT_START, encode_jpeg, sample_members, write_shapes_world
from emu2_engine.data.records import Edit, SkipStats
from emu2_engine.data.shapes import (BACKGROUNDS, COLOURS, EDIT_OPERATIONS, MAX_SHAPES, RECOLOUR_PHRASINGS,
                                     STREAM_CHAT, STREAM_EDIT, TEMPLATES, ShapesWorld, caption_text,
                                     noun_phrase, position_phrase)
from emu2_engine.data.shards import iter_tar_samples

BACKENDS = ["pil", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                 reason="NVIDIA DALI is not installed"))]
WORLD = ShapesWorld(13)
JPEGS = [encode_jpeg(WORLD.sample(i, 48).image) for i in range(2)]
INSTRUCTION = b'{"instruction": "make the red circle blue."}'


def _png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _image_pixels(data, backend, ext="jpg", size=32):
    return Decoder("image_text", size, backend=backend, log=None).decode("k", {ext: data, "txt": b"c"}).image


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_edit_decodes_both_images(backend):
    png = _png(WORLD.sample(5, 40).image)
    decoder = Decoder("edit", 32, backend=backend, log=None, batch_size=3)
    meta = json.dumps({"instruction": "remove the green square.", "source_caption": "x", "id": 3}).encode()
    jpg, png_edited = decoder.decode_batch([
        ("e", {"source.jpg": JPEGS[0], "edited.jpg": JPEGS[1], "json": INSTRUCTION}),
        # other extensions, other JSON fields (ignored)
        ("p", {"source.jpeg": JPEGS[1], "edited.png": png, "json": meta})])
    assert decoder.stats.counts == {}
    assert isinstance(jpg, Edit) and jpg.key == "e" and jpg.instruction == "make the red circle blue."
    assert jpg.image.shape == jpg.edited.shape == (3, 32, 32)
    torch.testing.assert_close(jpg.image, _image_pixels(JPEGS[0], backend), atol=0, rtol=0)
    torch.testing.assert_close(jpg.edited, _image_pixels(JPEGS[1], backend), atol=0, rtol=0)
    assert png_edited.instruction == "remove the green square."
    torch.testing.assert_close(png_edited.image, _image_pixels(JPEGS[1], backend), atol=0, rtol=0)
    torch.testing.assert_close(png_edited.edited, _image_pixels(png, backend, "png"), atol=0, rtol=0)


IMAGES = {"source.jpg": JPEGS[0], "edited.jpg": JPEGS[1]}
BAD_SAMPLES = {
    "no_json": (dict(IMAGES), "bad_json"),
    "json_not_json": ({**IMAGES, "json": b'{"instruction": "make'}, "bad_json"),
    "json_a_list": ({**IMAGES, "json": b'["make the red circle blue."]'}, "bad_json"),
    "no_instruction": ({**IMAGES, "json": b'{"caption": "a red circle."}'}, "bad_json"),
    "blank_instruction": ({**IMAGES, "json": b'{"instruction": " \\n"}'}, "bad_json"),
    "instruction_not_a_string": ({**IMAGES, "json": b'{"instruction": ["make it blue."]}'}, "bad_json"),
    "no_source": ({"edited.jpg": JPEGS[1], "json": INSTRUCTION}, "missing_member"),
    "no_edited": ({"source.jpg": JPEGS[0], "json": INSTRUCTION}, "missing_member"),
    "unnamed_images": ({"jpg": JPEGS[0], "0.jpg": JPEGS[1], "json": INSTRUCTION}, "missing_member"),
    "edited_as_gif": ({"source.jpg": JPEGS[0], "edited.gif": JPEGS[1], "json": INSTRUCTION}, "missing_member"),
    "zero_byte_source": ({**IMAGES, "source.jpg": b"", "json": INSTRUCTION}, "empty_file"),
    "zero_byte_json": ({**IMAGES, "json": b""}, "empty_file"),
    "latin1_json": ({**IMAGES, "json": '{"instruction": "make it caf\xe9"}'.encode("latin-1")}, "bad_utf8"),
    "corrupt_edited": ({**IMAGES, "edited.jpg": b"\x00\x01 not an image" * 10, "json": INSTRUCTION},
                       "corrupt_image"),
    "cut_short_edited": ({**IMAGES, "edited.jpg": JPEGS[1][:len(JPEGS[1]) // 2], "json": INSTRUCTION},
                         "corrupt_image"),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_edits_are_skipped_by_kind(backend):
    decoder = Decoder("edit", 32, backend=backend, log=None, batch_size=4)
    good = ("good", {**IMAGES, "json": INSTRUCTION})
    records = decoder.decode_batch([(name, members) for name, (members, _) in BAD_SAMPLES.items()] + [good])
    assert records[:-1] == [None] * len(BAD_SAMPLES) and isinstance(records[-1], Edit)
    expected = {}
    for name, (members, kind) in BAD_SAMPLES.items():
        expected[kind] = expected.get(kind, 0) + 1
        alone = Decoder("edit", 32, backend=backend, log=None)
        assert alone.decode(name, members) is None and dict(alone.stats.counts) == {kind: 1}, name
    assert dict(decoder.stats.counts) == expected


def test_skip_messages_say_what_is_wrong():
    logged = []
    Decoder("edit", 32, backend="pil", log=logged.append).decode("m", BAD_SAMPLES["no_edited"][0])
    assert "no edited image" in logged[0] and "source.jpg" in logged[0]
    Decoder("edit", 32, backend="pil", log=logged.append).decode("b", BAD_SAMPLES["blank_instruction"][0])
    assert "edit instruction must be a non-blank string" in logged[-1]


# -- the shapes world ------------------------------------------------------------------------------

def _pixels(sample):
    return np.asarray(sample.image, dtype=np.int32)


def _inside(changed, *boxes):
    """True when every changed pixel lies in one of the boxes."""
    allowed = np.zeros_like(changed)
    for x0, y0, x1, y1 in boxes:
        allowed[y0:y1, x0:x1] = True
    return not (changed & ~allowed).any()


def _background_like(pixels, box, background):
    """True when the box shows the background: within the textures' +-17 of its colour."""
    x0, y0, x1, y1 = box
    return np.abs(pixels[y0:y1, x0:x1] - np.array(BACKGROUNDS[background])).max() <= 17


def _reference(shapes, shape):
    same = sum(s.kind == shape.kind and s.colour == shape.colour for s in shapes)
    return f"the {shape.colour} {shape.kind}" + (f" {position_phrase(shape.position)}" if same > 1 else "")


def test_shapes_edits_change_only_what_the_instruction_says():
    world, seen = ShapesWorld(4), set()
    for i in range(80):
        item = world.edit(i, 48)
        again = ShapesWorld(4).edit(i, 48)
        assert (item.instruction, item.source.caption, item.edited.caption) == \
            (again.instruction, again.source.caption, again.edited.caption)
        assert _pixels(item.source).tobytes() == _pixels(again.source).tobytes()
        assert _pixels(item.edited).tobytes() == _pixels(again.edited).tobytes()
        source, edited, op = item.source, item.edited, item.operation
        seen.add(op)
        assert (source.background, source.texture) == (edited.background, edited.texture)
        # each caption describes its own image, with the same opening
        [template] = {t for t in TEMPLATES if caption_text(source.shapes, t) == source.caption}
        assert edited.caption == caption_text(edited.shapes, template)
        changed = (_pixels(source) != _pixels(edited)).any(axis=-1)
        assert changed.any(), item.instruction
        kept = [s for s in source.shapes if s in edited.shapes]
        assert len(kept) == len(source.shapes) - (op != "add")
        [target] = [s for s in source.shapes if s not in kept] or [None]
        [result] = [s for s in edited.shapes if s not in kept] or [None]
        if op == "recolour":
            assert (result.kind, result.box, result.position) == (target.kind, target.box, target.position)
            assert result.colour != target.colour
            assert item.instruction in [p.format(t=_reference(source.shapes, target), c=result.colour)
                                        for p in RECOLOUR_PHRASINGS]
            assert _inside(changed, target.box)
        elif op == "remove":
            assert result is None and len(source.shapes) >= 2
            assert item.instruction == f"remove {_reference(source.shapes, target)}."
            assert _inside(changed, target.box) and _background_like(_pixels(edited), target.box, edited.background)
        elif op == "move":
            assert (result.kind, result.colour) == (target.kind, target.colour)
            assert result.position != target.position and result.position not in [s.position for s in kept]
            assert item.instruction == f"move {_reference(source.shapes, target)} to the {result.position}."
            assert _inside(changed, target.box, result.box)
            assert _background_like(_pixels(edited), target.box, edited.background)
        else:
            assert target is None and len(source.shapes) < MAX_SHAPES
            assert result.position not in [s.position for s in source.shapes]
            added = f"{noun_phrase(result.colour, result.kind, 1)} {position_phrase(result.position)}"
            assert item.instruction == f"add {added}."
            assert _inside(changed, result.box) and _background_like(_pixels(source), result.box, source.background)
        if result is not None:  # the shape drawn where it says, in its colour
            x0, y0, x1, y1 = result.box
            centre = _pixels(edited)[(y0 + y1) // 2, (x0 + x1) // 2]
            assert np.abs(centre - np.array(COLOURS[result.colour])).max() <= 20, item.instruction
    assert seen == set(EDIT_OPERATIONS)


def test_edit_stream_is_new_and_leaves_the_others_alone():
    assert STREAM_EDIT > STREAM_CHAT
    world = ShapesWorld(0)
    for i in range(5):
        source = world.edit(i, 32).source.image.tobytes()
        assert all(source != other.image.tobytes()
                   for other in (world.sample(i, 32), world.chat(i, 32).sample, world.vqa(i, 32).sample))


def test_make_shapes_writes_edit_shards_that_decode(tmp_path, monkeypatch):
    monkeypatch.setattr(make_shapes, "KINDS", ("edit",))
    monkeypatch.setattr(make_shapes, "COUNTS", {"edit": {"train": 4, "heldout": 2}})
    monkeypatch.setattr(make_shapes, "SHARD_SIZE", {"edit": 3})
    manifest = write_shapes_world(tmp_path / "w", seed=7)
    assert manifest["shards"]["edit"]["train"] == ["edit/train/edit-train-00000.tar", "edit/train/edit-train-00001.tar"]
    world, decoder = ShapesWorld(7), Decoder("edit", 64, backend="pil", log=None)
    for split, first in (("train", 0), ("heldout", HELDOUT_START)):
        samples = [s for name in manifest["shards"]["edit"][split]
                   for s in iter_tar_samples(str(tmp_path / "w" / name), SkipStats(), log=None)]
        assert len(samples) == manifest["counts"]["edit"][split]
        for i, ((key, members), record) in enumerate(zip(samples, decoder.decode_batch(samples))):
            item = world.edit(first + i, 64)
            assert set(members) == {"source.jpg", "edited.jpg", "json"}
            assert json.loads(members["json"]) == {"key": key, "instruction": item.instruction,
                                                   "source_caption": item.source.caption,
                                                   "edited_caption": item.edited.caption}
            assert isinstance(record, Edit) and record.key == key and record.instruction == item.instruction
            assert record.image.shape == record.edited.shape == (3, 64, 64)
            torch.testing.assert_close(record.image, _image_pixels(members["source.jpg"], "pil", size=64),
                                       atol=0, rtol=0)
            assert not torch.equal(record.image, record.edited)
    assert decoder.stats.counts == {}
    key, members = samples[0]
    assert members == sample_members(world, "edit", HELDOUT_START, key)
