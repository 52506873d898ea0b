"""The shapes world as shards: layout, deterministic bytes, content that matches the
generator, the manifest and ensure_shapes_world's atomic first-use generation."""

import io
import json
import shutil
import tarfile

import av
import numpy as np
import pytest
from PIL import Image

from emu2_engine.data import make_shapes
from emu2_engine.data.make_shapes import (HELDOUT_START, KINDS, SPLITS, ensure_shapes_world,
                                          verify_shapes_world, write_shapes_world)
from emu2_engine.data.records import SkipStats
from emu2_engine.data.shapes import COLOURS, NUMBERS, ShapesWorld, answer_variant
from emu2_engine.data.shards import iter_tar_samples

TINY_COUNTS = {kind: {"train": 5, "heldout": 2} for kind in KINDS}
TINY_SHARD_SIZE = {kind: 3 for kind in KINDS}


@pytest.fixture
def tiny(monkeypatch):
    """Make write_shapes_world write 5 + 2 samples per kind, 3 per shard."""
    monkeypatch.setattr(make_shapes, "COUNTS", TINY_COUNTS)
    monkeypatch.setattr(make_shapes, "SHARD_SIZE", TINY_SHARD_SIZE)


def _samples(root, kind, split):
    out = []
    for name in sorted((root / kind / split).glob("*.tar")):
        out += list(iter_tar_samples(str(name), SkipStats(), log=None))
    return out


def _all_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_counts_and_manifest(tmp_path, tiny):
    manifest = write_shapes_world(tmp_path / "w", seed=3)
    root = tmp_path / "w"
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert manifest["seed"] == 3 and manifest["version"] == make_shapes.VERSION
    for kind in KINDS:
        for split in SPLITS:
            shards = manifest["shards"][kind][split]
            assert shards == [f"{kind}/{split}/{kind}-{split}-{i:05d}.tar" for i in range(len(shards))]
            assert len(shards) == (2 if split == "train" else 1)  # 5 samples at 3 per shard
            samples = _samples(root, kind, split)
            assert len(samples) == manifest["counts"][kind][split] == TINY_COUNTS[kind][split]
            assert [k for k, _ in samples] == ["000000000", "000000001", "000000002",
                                               "000010000", "000010001"][:len(samples)]
    assert verify_shapes_world(root, seed=3) == manifest
    expected_members = {
        "image_text": {"jpg", "txt", "json"}, "video_text": {"webm", "txt", "json"},
        "grounded": {"jpg", "json"}, "vqa": {"jpg", "json"}, "chat": {"jpg", "json"}, "text": {"txt"},
        "edit": {"source.jpg", "edited.jpg", "json"}}
    for kind, members in expected_members.items():
        assert all(set(m) == members for _, m in _samples(root, kind, "train")), kind
    for _, members in _samples(root, "interleaved", "train"):
        doc = json.loads(members["json"])
        names = [name for name in doc["images"] if name is not None]
        assert set(members) == {"json", *names} and names == [f"{i}.jpg" for i in range(len(names))]


def test_tar_headers_are_fixed(tmp_path, tiny):
    write_shapes_world(tmp_path / "w", seed=0)
    with tarfile.open(tmp_path / "w" / "image_text" / "train" / "image_text-train-00000.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos[:3]] == ["000000000.jpg", "000000000.json", "000000000.txt"]
    assert all(i.mtime == 0 and i.uid == 0 and i.gid == 0 and i.uname == "" and i.mode == 0o644
               for i in infos)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, tiny):
    write_shapes_world(tmp_path / "a", seed=5)
    write_shapes_world(tmp_path / "b", seed=5)
    write_shapes_world(tmp_path / "c", seed=6)
    a, b, c = (_all_bytes(tmp_path / x) for x in "abc")
    assert a == b  # every shard, video included, and the manifest
    assert a.keys() == c.keys()
    assert all(a[name] != c[name] for name in a if name.endswith(".tar"))


def test_image_text_matches_the_generator(tmp_path, tiny):
    write_shapes_world(tmp_path / "w", seed=2)
    world = ShapesWorld(2)
    for split, first in (("train", 0), ("heldout", HELDOUT_START)):
        for i, (key, members) in enumerate(_samples(tmp_path / "w", "image_text", split)):
            sample = world.sample(first + i, 64)
            assert members["txt"].decode() == sample.caption
            meta = json.loads(members["json"])
            assert meta["caption"] == sample.caption and meta["key"] == key
            assert (meta["width"], meta["height"], meta["status"]) == (64, 64, "success")
            assert [tuple(s["box"]) for s in meta["shapes"]] == [s.box for s in sample.shapes]
            decoded = np.asarray(Image.open(io.BytesIO(members["jpg"])), dtype=np.float32)
            error = np.abs(decoded - np.asarray(sample.image, dtype=np.float32)).mean()
            other = np.asarray(world.sample(first + i + 1, 64).image, dtype=np.float32)
            assert error < 5 and error < np.abs(decoded - other).mean() / 3  # JPEG q90 loses little


def _decode_webm(data):
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].codec_context.name == "vp9"
        return [f.to_ndarray(format="rgb24").astype(np.int32) for f in container.decode(video=0)]


def _centroid(frame, colour):
    mask = np.abs(frame - np.array(COLOURS[colour])).max(axis=-1) < 40
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean(), mask.sum()


def test_videos_show_what_their_captions_say(tmp_path, tiny):
    write_shapes_world(tmp_path / "w", seed=0)
    seen = set()
    videos = _samples(tmp_path / "w", "video_text", "train") + _samples(tmp_path / "w", "video_text", "heldout")
    for _, members in videos:
        caption = members["txt"].decode()
        frames = _decode_webm(members["webm"])
        assert len(frames) == 16 and frames[0].shape == (64, 64, 3)
        colour = next(c for c in COLOURS if f" {c} " in f" {caption}")
        (x0, y0, a0), (xm, ym, am), (x1, y1, a1) = (_centroid(frames[i], colour) for i in (0, 8, 15))
        if "grows" in caption:
            seen.add("grows")
            assert am > 1.5 * a0 and am > 1.5 * a1
        else:
            start, end = caption.split(" moves from the ")[1].rstrip(".").split(" to the ")
            seen.add(start)
            axis = {"left": x1 - x0, "right": x0 - x1, "top": y1 - y0, "bottom": y0 - y1}[start]
            assert axis > 20, (caption, x0, x1, y0, y1)
    assert len(seen) >= 2


def test_grounded_vqa_interleaved_and_text_content(tmp_path, tiny):
    write_shapes_world(tmp_path / "w", seed=1)
    root = tmp_path / "w"
    for _, members in _samples(root, "grounded", "train"):
        meta = json.loads(members["json"])
        pixels = np.asarray(Image.open(io.BytesIO(members["jpg"])), dtype=np.int32)
        for start, end, x0, y0, x1, y1, score in meta["noun_chunks"]:
            phrase = meta["caption"][start:end]
            colour = next(c for c in COLOURS if c in phrase.split())
            assert phrase.split()[0] in ("a", "an", *NUMBERS)
            cx, cy = int((x0 + x1) / 2 * 64), int((y0 + y1) / 2 * 64)
            assert np.abs(pixels[cy, cx] - np.array(COLOURS[colour])).max() < 40, phrase
    for _, members in _samples(root, "vqa", "train"):
        meta = json.loads(members["json"])
        answers = [a["answer"] for a in meta["answers"]]
        assert len(answers) == 10 and [a["answer_id"] for a in meta["answers"]] == list(range(1, 11))
        best = meta["multiple_choice_answer"]
        assert set(answers) <= {best, answer_variant(best)} and meta["question"].endswith("?")
    for _, members in _samples(root, "interleaved", "train"):
        doc = json.loads(members["json"])
        assert all((t is None) != (i is None) for t, i in zip(doc["texts"], doc["images"]))
        assert doc["texts"][-1].startswith("in all there are")
        # every image is followed by its caption
        for position, name in enumerate(doc["images"]):
            if name is not None:
                assert doc["texts"][position + 1] is not None
    for _, members in _samples(root, "text", "train"):
        assert members["txt"].decode().count(".") >= 3


def test_write_refuses_a_non_empty_directory(tmp_path, tiny):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "x").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        write_shapes_world(tmp_path / "w", seed=0)


def test_ensure_generates_once_and_regenerates_a_damaged_world(tmp_path, tiny):
    root = ensure_shapes_world(tmp_path / "cache", seed=4)
    assert root.parent == tmp_path / "cache" and verify_shapes_world(root, seed=4)["seed"] == 4
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [root.name]  # no temp dirs left
    shard = root / "text" / "train" / "text-train-00000.tar"
    stamp = shard.stat().st_mtime_ns
    assert ensure_shapes_world(tmp_path / "cache", seed=4) == root
    assert shard.stat().st_mtime_ns == stamp  # reused, not rewritten
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match="wrong size"):
        verify_shapes_world(root)
    assert ensure_shapes_world(tmp_path / "cache", seed=4) == root
    verify_shapes_world(root, seed=4)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [root.name]


def test_a_world_written_before_a_kind_existed_is_completed_in_place(tmp_path, tiny):
    """A cached world without the chat kind (written before it existed) fails the check and is
    written again at the same path, its other shards byte for byte the same: runs that saved
    their loaders' shard lists over it still resume."""
    root = ensure_shapes_world(tmp_path / "cache", seed=4)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*.tar") if "chat" not in p.parts}
    manifest = json.loads((root / "manifest.json").read_text())
    for table in ("shards", "counts"):
        del manifest[table]["chat"]
    for name in [n for n in manifest["sha256"] if n.startswith("chat/")]:
        del manifest["sha256"][name], manifest["bytes"][name]
    (root / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(root / "chat")
    with pytest.raises(ValueError, match="the world has no chat shards"):
        verify_shapes_world(root)
    assert ensure_shapes_world(tmp_path / "cache", seed=4) == root
    assert (root / "chat" / "train").is_dir() and verify_shapes_world(root, seed=4)
    assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*.tar") if "chat" not in p.parts} == before


def test_ensure_leaves_nothing_behind_when_generation_crashes(tmp_path, tiny, monkeypatch):
    calls = []

    def crash(path, samples):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(path, samples)

    real = make_shapes.write_tar
    monkeypatch.setattr(make_shapes, "write_tar", crash)
    with pytest.raises(OSError, match="disk full"):
        ensure_shapes_world(tmp_path / "cache", seed=0)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(make_shapes, "write_tar", real)
    verify_shapes_world(ensure_shapes_world(tmp_path / "cache", seed=0), seed=0)


def test_command_line(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["make_shapes", "--out", str(tmp_path / "w"), "--seed", "9", "--scale", "2"])
    make_shapes.main()
    manifest = verify_shapes_world(tmp_path / "w", seed=9, scale=2)
    assert manifest["counts"]["image_text"] == {"train": 10, "heldout": 4}
    assert "wrote" in capsys.readouterr().out
    # again into the same folder, or with a bad scale: one line (argparse's), exit 2
    for argv, message in ((["--out", str(tmp_path / "w")], "is not empty"),
                          (["--out", str(tmp_path / "v"), "--scale", "0"], "scale must be a positive integer")):
        monkeypatch.setattr("sys.argv", ["make_shapes", *argv])
        with pytest.raises(SystemExit) as exit_info:
            make_shapes.main()
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_generators_say_true_things():
    world = ShapesWorld(8)
    for i in range(30):
        document = world.document(i, 32)
        images = [item for item in document.items if not isinstance(item, str)]
        assert 2 <= len(images) <= 3 and isinstance(document.items[0], str)
        total = sum(len(image.shapes) for image in images)
        assert document.items[-1] == f"in all there are {NUMBERS[total]} shapes."
        item = world.vqa(i, 32)
        shapes = item.sample.shapes
        if item.question == "how many shapes are there?":
            assert item.answer == NUMBERS[len(shapes)]
        elif item.question.startswith("is there "):
            assert item.answer in ("yes", "no")
        assert item.answers.count(item.answer) >= 5
        grounded = world.grounded(i, 32)
        assert sum(len(p.boxes) for p in grounded.phrases) == len(grounded.sample.shapes)
        assert all(grounded.sample.caption[p.start:p.end].split()[-1].rstrip("s") in ("circle", "square", "triangle")
                   for p in grounded.phrases)
    # each sample type has its own random stream: video i, document i, ... are not sample i
    assert world.grounded(0, 32).sample.caption != world.sample(0, 32).caption or \
        world.grounded(0, 32).sample.image.tobytes() != world.sample(0, 32).image.tobytes()
    assert world.video(0, 32).frames[0].tobytes() == ShapesWorld(8).video(0, 32).frames[0].tobytes()
