"""The chat kind: LLaVA-style conversation samples decoded into Chat records (PIL and DALI),
every malformed one skipped and counted by kind, and the shapes world's chat items and shards."""

import json

import pytest
import torch

from emu2_engine.data import make_shapes
from emu2_engine.data.decode import Decoder, dali_available
from emu2_engine.data.make_shapes import HELDOUT_START, encode_jpeg, sample_members, write_shapes_world
from emu2_engine.data.records import IMAGE_MARKER, Chat, SkipStats
from emu2_engine.data.shapes import (DESCRIPTION_REQUESTS, MAX_CHAT_TURNS, NUMBERS, STREAM_CHAT, STREAM_DOCUMENT,
                                     STREAM_GROUNDED, STREAM_TEXT, STREAM_VIDEO, STREAM_VQA, ShapesWorld)
from emu2_engine.data.shards import iter_tar_samples

BACKENDS = ["pil", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                 reason="NVIDIA DALI is not installed"))]
WORLD = ShapesWorld(13)
JPEGS = [encode_jpeg(WORLD.sample(i, 48).image) for i in range(3)]


def _chat_json(*values, roles=("human", "gpt"), **fields) -> bytes:
    """A conversation of `values`, the roles taken in turn from `roles`, plus top-level fields."""
    conversation = [{"from": roles[i % len(roles)], "value": v} for i, v in enumerate(values)]
    return json.dumps({"conversations": conversation, **fields}).encode()


def _image_pixels(jpeg, backend, size=32):
    return Decoder("image_text", size, backend=backend, log=None).decode("k", {"jpg": jpeg, "txt": b"c"}).image


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_conversation_with_one_image(backend):
    members = {"jpg": JPEGS[0], "json": _chat_json("<image>\nwhat is this?", "a red circle.",
                                                    "how many circles are there?", "one", system="academic")}
    record = Decoder("chat", 32, backend=backend, log=None).decode("c", members)
    assert isinstance(record, Chat) and record.key == "c" and record.system == "academic"
    assert record.turns == [("<image>\nwhat is this?", "a red circle."), ("how many circles are there?", "one")]
    assert len(record.images) == 1 and record.images[0].shape == (3, 32, 32)
    torch.testing.assert_close(record.images[0], _image_pixels(JPEGS[0], backend), atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_named_images_text_only_and_markers_put_first(backend):
    decoder = Decoder("chat", 32, backend=backend, log=None, batch_size=3)
    samples = [
        # two named images (in the list's order, looked up lower-cased), one marker each;
        # the list wins over the plain .jpg member
        ("two", {"0.jpg": JPEGS[0], "1.jpg": JPEGS[1], "jpg": JPEGS[2],
                 "json": _chat_json(f"compare {IMAGE_MARKER} and {IMAGE_MARKER}.", "the second has more shapes.",
                                    roles=("user", "assistant"), images=["1.JPG", "0.jpg"])}),
        # language-only instruction data: no image member, no marker
        ("text", {"json": _chat_json("count to three.", "one, two, three.", "and back?", "three, two, one.")}),
        ("empty_list", {"jpg": JPEGS[0], "json": _chat_json("say hi.", "hi.", images=[])}),
        # no markers: one per image before the first instruction
        ("no_marker", {"png": JPEGS[0], "json": _chat_json("what is this?", "a picture.", "sure?", "yes.")}),
        ("no_marker_two", {"a.jpg": JPEGS[0], "b.jpg": JPEGS[1],
                           "json": _chat_json("what are these?", "pictures.", images=["a.jpg", "b.jpg"])}),
        # one image member under any name, no list: it is the image
        ("numbered", {"0.jpg": JPEGS[1], "json": _chat_json("<image>what is this?", "a picture.")}),
    ]
    two, text, empty_list, no_marker, no_marker_two, numbered = decoder.decode_batch(samples)
    assert len(numbered.images) == 1
    torch.testing.assert_close(numbered.images[0], _image_pixels(JPEGS[1], backend), atol=0, rtol=0)
    assert decoder.stats.counts == {}
    assert two.turns == [("compare <image> and <image>.", "the second has more shapes.")] and two.system == "chat"
    assert len(two.images) == 2
    for image, jpeg in zip(two.images, (JPEGS[1], JPEGS[0])):
        torch.testing.assert_close(image, _image_pixels(jpeg, backend), atol=0, rtol=0)
    assert text.images == []
    assert text.turns == [("count to three.", "one, two, three."), ("and back?", "three, two, one.")]
    assert empty_list.images == [] and empty_list.turns == [("say hi.", "hi.")]
    assert no_marker.turns == [("<image>\nwhat is this?", "a picture."), ("sure?", "yes.")]
    assert len(no_marker.images) == 1
    assert no_marker_two.turns == [("<image>\n<image>\nwhat are these?", "pictures.")]
    assert len(no_marker_two.images) == 2


GOOD = ("<image>\nwhat is this?", "a red circle.")
BAD_SAMPLES = {
    "not_alternating": ({"jpg": JPEGS[0], "json": _chat_json(*GOOD, roles=("human", "human"))}, "bad_json"),
    "ends_with_user": ({"jpg": JPEGS[0], "json": _chat_json(*GOOD, "and then?")}, "bad_json"),
    "unknown_role": ({"jpg": JPEGS[0], "json": _chat_json(*GOOD, roles=("human", "bing"))}, "bad_json"),
    "assistant_first": ({"jpg": JPEGS[0], "json": _chat_json(*GOOD, roles=("gpt", "human"))}, "bad_json"),
    "blank_value": ({"jpg": JPEGS[0], "json": _chat_json(GOOD[0], " \n")}, "bad_json"),
    "value_not_a_string": ({"jpg": JPEGS[0], "json": _chat_json(GOOD[0], 3)}, "bad_json"),
    "bad_system": ({"jpg": JPEGS[0], "json": _chat_json(*GOOD, system="casual")}, "bad_json"),
    "two_markers_one_image": ({"jpg": JPEGS[0], "json": _chat_json("<image><image>what?", "x.")}, "bad_json"),
    "marker_without_image": ({"json": _chat_json(*GOOD)}, "bad_json"),
    "marker_in_answer": ({"jpg": JPEGS[0], "json": _chat_json(*GOOD, "again?", "<image> here.")}, "bad_json"),
    "conversations_not_a_list": ({"jpg": JPEGS[0], "json": b'{"conversations": "hello"}'}, "bad_json"),
    "conversations_empty": ({"jpg": JPEGS[0], "json": b'{"conversations": []}'}, "bad_json"),
    "message_not_an_object": ({"jpg": JPEGS[0], "json": b'{"conversations": [["human", "hi"]]}'}, "bad_json"),
    "images_not_a_list": ({"0.jpg": JPEGS[0], "json": _chat_json(*GOOD, images="0.jpg")}, "bad_json"),
    "no_json": ({"jpg": JPEGS[0]}, "bad_json"),
    # several image members and no "images" list: their order is unknown
    "two_unnamed_images": ({"0.jpg": JPEGS[0], "1.jpg": JPEGS[1], "json": _chat_json("what?", "x.")}, "bad_json"),
    # more images than one conversation may name (each would be decoded)
    "too_many_images": ({"jpg": JPEGS[0], "json": _chat_json("<image>" * 65 + "what?", "x.", images=["jpg"] * 65)},
                        "bad_json"),
    "json_not_json": ({"jpg": JPEGS[0], "json": b'{"conversations": ['}, "bad_json"),
    "missing_named_member": ({"0.jpg": JPEGS[0], "json": _chat_json(*GOOD, images=["1.jpg"])}, "missing_member"),
    "zero_byte_json": ({"jpg": JPEGS[0], "json": b""}, "empty_file"),
    "zero_byte_image": ({"jpg": b"", "json": _chat_json(*GOOD)}, "empty_file"),
    "latin1_json": ({"json": '{"conversations": [{"from": "human", "value": "caf\xe9"}]}'.encode("latin-1")},
                    "bad_utf8"),
    "corrupt_image": ({"jpg": b"\x00\x01 not an image" * 10, "json": _chat_json(*GOOD)}, "corrupt_image"),
    "cut_short_second_image": ({"0.jpg": JPEGS[0], "1.jpg": JPEGS[1][:len(JPEGS[1]) // 2],
                                "json": _chat_json("<image><image>which?", "the first.", images=["0.jpg", "1.jpg"])},
                               "corrupt_image"),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_conversations_are_skipped_by_kind(backend):
    decoder = Decoder("chat", 32, backend=backend, log=None, batch_size=4)
    good = ("good", {"jpg": JPEGS[1], "json": _chat_json(*GOOD)})
    samples = [(name, members) for name, (members, _) in BAD_SAMPLES.items()] + [good]
    records = decoder.decode_batch(samples)
    assert records[:-1] == [None] * len(BAD_SAMPLES) and isinstance(records[-1], Chat)  # one bad image costs one sample
    for name, (members, kind) in BAD_SAMPLES.items():
        alone = Decoder("chat", 32, backend=backend, log=None)
        assert alone.decode(name, members) is None and dict(alone.stats.counts) == {kind: 1}, name


def test_skip_messages_say_what_is_wrong():
    logged = []
    decoder = Decoder("chat", 32, backend="pil", log=logged.append)
    decoder.decode("m", {"0.jpg": JPEGS[0], "1.jpg": JPEGS[1],
                         "json": _chat_json("<image> <image> <image> which?", "x.", images=["0.jpg", "1.jpg"])})
    assert "3 <image> markers in the instructions for 2 images" in logged[0]
    decoder = Decoder("chat", 32, backend="pil", log=logged.append)
    decoder.decode("r", BAD_SAMPLES["not_alternating"][0])
    assert "message 1 is from 'human'" in logged[-1] and "alternate" in logged[-1]


# -- the shapes world ------------------------------------------------------------------------------

def test_shapes_chat_items():
    world = ShapesWorld(5)
    turn_counts = set()
    for i in range(60):
        item = world.chat(i, 32)
        again = ShapesWorld(5).chat(i, 32)
        assert item.turns == again.turns and item.sample.image.tobytes() == again.sample.image.tobytes()
        assert 1 <= len(item.turns) <= MAX_CHAT_TURNS
        turn_counts.add(len(item.turns))
        (request, caption), *rest = item.turns
        assert request in DESCRIPTION_REQUESTS and caption == item.sample.caption
        assert len({q for q, _ in rest}) == len(rest) and all(q.endswith("?") for q, _ in rest)
        assert all(IMAGE_MARKER not in q + a for q, a in item.turns)
        for question, answer in rest:
            if question == "how many shapes are there?":
                assert answer == NUMBERS[len(item.sample.shapes)]
    assert turn_counts == {1, 2, 3}


def test_chat_stream_is_new_and_leaves_the_others_alone():
    # existing streams keep their numbers, so every existing kind's items (and shards) are unchanged
    assert (STREAM_VIDEO, STREAM_GROUNDED, STREAM_VQA, STREAM_DOCUMENT, STREAM_TEXT) == (1, 2, 3, 4, 5)
    assert STREAM_CHAT not in (1, 2, 3, 4, 5)
    world = ShapesWorld(0)
    for i in range(5):
        chat = world.chat(i, 32).sample.image.tobytes()
        others = (world.sample(i, 32), world.vqa(i, 32).sample, world.grounded(i, 32).sample)
        assert all(chat != other.image.tobytes() for other in others)


def test_make_shapes_writes_chat_shards_that_decode(tmp_path, monkeypatch):
    monkeypatch.setattr(make_shapes, "COUNTS", {kind: {"train": 4, "heldout": 2} for kind in make_shapes.KINDS})
    monkeypatch.setattr(make_shapes, "SHARD_SIZE", {kind: 3 for kind in make_shapes.KINDS})
    manifest = write_shapes_world(tmp_path / "w", seed=7)
    assert manifest["version"] == make_shapes.VERSION and "chat" in manifest["counts"]
    assert manifest["shards"]["chat"]["train"] == ["chat/train/chat-train-00000.tar", "chat/train/chat-train-00001.tar"]
    world, decoder = ShapesWorld(7), Decoder("chat", 64, backend="pil", log=None)
    for split, first in (("train", 0), ("heldout", HELDOUT_START)):
        samples = [s for name in manifest["shards"]["chat"][split]
                   for s in iter_tar_samples(str(tmp_path / "w" / name), SkipStats(), log=None)]
        assert len(samples) == manifest["counts"]["chat"][split]
        for i, record in enumerate(decoder.decode_batch(samples)):
            item = world.chat(first + i, 64)
            assert set(samples[i][1]) == {"jpg", "json"}
            assert isinstance(record, Chat) and record.system == "chat" and len(record.turns) == len(item.turns)
            assert record.turns == [(("<image>\n" if t == 0 else "") + q, a) for t, (q, a) in enumerate(item.turns)]
            assert len(record.images) == 1 and record.images[0].shape == (3, 64, 64)
    assert decoder.stats.counts == {}
    # the shard member bytes are the writer's
    key, members = samples[0]
    assert members == sample_members(world, "chat", HELDOUT_START, key)
