"""Every bad-sample kind mixed into good samples: each is skipped and counted by kind (and
logged once per kind), every good sample arrives, nothing crashes, hangs or is written."""

import io
import itertools
import json
import tarfile

import av
import pytest
from PIL import EpsImagePlugin, Image

from emu2_engine.data.decode import Decoder, dali_available
from emu2_engine.data.make_shapes import encode_jpeg, encode_webm, sample_members
from emu2_engine.data.records import SkipStats
from emu2_engine.data.shapes import ShapesWorld
from emu2_engine.data.shards import ShardStream

BACKENDS = ["pil", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                 reason="NVIDIA DALI is not installed"))]
WORLD = ShapesWorld(11)


def _jpeg(index=0):
    return encode_jpeg(WORLD.sample(index, 48).image)


def _with_size(jpeg, width, height):
    """The JPEG with its frame header claiming width x height (the pixels stay tiny)."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[:sof + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[sof + 9:]


def _bad_huffman_table(jpeg):
    table = jpeg.index(b"\xff\xc4")
    return jpeg[:table + 4] + b"\xff" * 20 + jpeg[table + 24:]


def _header_only_webm():
    out = io.BytesIO()
    with av.open(out, mode="w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=8)
        stream.width = stream.height = 32
        container.start_encoding()
    return out.getvalue()


def _write(path, entries):
    """entries: (name, bytes) for files, (name, "symlink") for a link."""
    with tarfile.open(path, "w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "../../etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _sample(key, members):
    return [(f"{key}.{ext}", data) for ext, data in members.items()]


def _good(kind, i):
    key = f"good{i:02d}"
    return key, _sample(key, sample_members(WORLD, kind, i, key, image_size=48))


def _dataset(tmp_path, kind, bad):
    """One shard: good samples between the bad ones (and last, so every bad one is read
    before the last good record). Returns (shard path, good keys)."""
    entries, keys = [], []
    for i, bad_entries in enumerate(bad + [[]]):
        key, members = _good(kind, i)
        entries += members + bad_entries
        keys.append(key)
    path = tmp_path / f"{kind}.tar"
    _write(path, entries)
    return str(path), keys


CAPTION = b"a red circle."


def _image_text_bad():
    jpeg = _jpeg(1)
    return [
        _sample("corrupt", {"jpg": b"\x00\x01 this is not an image" * 10, "txt": CAPTION}),
        _sample("cut_short", {"jpg": jpeg[:len(jpeg) // 2], "txt": CAPTION}),
        _sample("bad_table", {"jpg": _bad_huffman_table(jpeg), "txt": CAPTION}),
        _sample("zero", {"jpg": b"", "txt": CAPTION}),
        _sample("latin1", {"jpg": jpeg, "txt": "un caf\xe9 rouge".encode("latin-1")}),
        _sample("no_caption", {"jpg": jpeg}),
        _sample("blank_caption", {"jpg": jpeg, "txt": b"  \n"}),
        _sample("no_image", {"txt": CAPTION, "json": b"{}"}),
        _sample("bomb", {"jpg": _with_size(jpeg, 60000, 60000), "txt": CAPTION}),
        _sample("too_wide", {"jpg": _with_size(jpeg, 20000, 8), "txt": CAPTION}),
        _sample("../../escape", {"jpg": jpeg, "txt": CAPTION}),
        _sample("/etc/absolute", {"jpg": jpeg, "txt": CAPTION}),
        [("link.jpg", "symlink"), ("link.txt", CAPTION)],
    ]


IMAGE_TEXT_COUNTS = {"corrupt_image": 3, "empty_file": 1, "bad_utf8": 1, "missing_caption": 2,
                     "missing_member": 1, "image_too_large": 2, "unsafe_path": 2, "special_member": 1}


def _video_bad():
    video = encode_webm(WORLD.video(1, 32, 16).frames)
    return [
        _sample("cut", {"webm": video[:int(len(video) * 0.7)], "txt": CAPTION}),
        _sample("no_frames", {"webm": _header_only_webm(), "txt": CAPTION}),
        _sample("garbage", {"webm": b"\x1a\x45\xdf\xa3 not really a webm" * 8, "txt": CAPTION}),
        _sample("zero", {"webm": b"", "txt": CAPTION}),
        _sample("no_caption", {"webm": video}),
    ]


VIDEO_COUNTS = {"truncated_video": 1, "empty_video": 1, "corrupt_video": 1, "empty_file": 1, "missing_caption": 1}


def _interleaved_bad():
    jpeg = _jpeg(2)
    doc = lambda texts, images: json.dumps({"texts": texts, "images": images}).encode()  # noqa: E731
    return [
        _sample("not_json", {"json": b'{"texts": ["a", ', "0.jpg": jpeg}),
        _sample("lengths", {"json": doc(["a", None], ["0.jpg"]), "0.jpg": jpeg}),
        _sample("both", {"json": doc(["a"], ["0.jpg"]), "0.jpg": jpeg}),
        _sample("not_object", {"json": b"[1, 2]"}),
        _sample("lost_image", {"json": doc(["a", None], [None, "1.jpg"]), "0.jpg": jpeg}),
        _sample("bad_image", {"json": doc([None, "a"], ["0.jpg", None]), "0.jpg": b"garbage" * 9}),
        _sample("latin1", {"json": '{"texts": ["caf\xe9"], "images": [null]}'.encode("latin-1")}),
    ]


INTERLEAVED_COUNTS = {"bad_json": 4, "missing_member": 1, "corrupt_image": 1, "bad_utf8": 1}


def _grounded_bad():
    jpeg = _jpeg(3)
    meta = lambda chunks: json.dumps({"caption": "a red circle.", "noun_chunks": chunks}).encode()  # noqa: E731
    return [
        _sample("outside", {"jpg": jpeg, "json": meta([[0, 12, 0.1, 0.1, 1.4, 0.5, 1.0]])}),
        _sample("negative", {"jpg": jpeg, "json": meta([[0, 12, -0.2, 0.1, 0.4, 0.5]])}),
        _sample("empty_box", {"jpg": jpeg, "json": meta([[0, 12, 0.5, 0.1, 0.5, 0.5]])}),
        _sample("span", {"jpg": jpeg, "json": meta([[5, 40, 0.1, 0.1, 0.4, 0.5]])}),
        _sample("no_chunks", {"jpg": jpeg, "json": meta([])}),
    ]


GROUNDED_COUNTS = {"bad_box": 3, "bad_json": 2}


def _vqa_bad():
    jpeg = _jpeg(4)
    return [
        _sample("no_answers", {"jpg": jpeg, "json": b'{"question": "how many?"}'}),
        _sample("no_question", {"jpg": jpeg, "json": b'{"answers": ["two"]}'}),
        _sample("zero_json", {"jpg": jpeg, "json": b""}),
    ]


VQA_COUNTS = {"bad_json": 2, "empty_file": 1}


def _text_bad():
    return [
        _sample("latin1", {"txt": "caf\xe9".encode("latin-1")}),
        _sample("zero", {"txt": b""}),
        _sample("blank", {"txt": b"\n\n"}),
        [("stray_name_without_extension", b"x")],
    ]


TEXT_COUNTS = {"bad_utf8": 1, "empty_file": 1, "missing_text": 1, "stray_member": 1}

CASES = {
    "image_text": (_image_text_bad, IMAGE_TEXT_COUNTS),
    "video_text": (_video_bad, VIDEO_COUNTS),
    "interleaved": (_interleaved_bad, INTERLEAVED_COUNTS),
    "grounded": (_grounded_bad, GROUNDED_COUNTS),
    "vqa": (_vqa_bad, VQA_COUNTS),
    "text": (_text_bad, TEXT_COUNTS),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(CASES))
def test_bad_samples_are_skipped_counted_and_good_ones_all_arrive(tmp_path, kind, backend):
    make_bad, expected_counts = CASES[kind]
    shard, good_keys = _dataset(tmp_path, kind, make_bad())
    before = sorted(p for p in tmp_path.parent.rglob("*"))
    logged = []
    decoder = Decoder(kind, 32, n_frames=4, backend=backend, log=logged.append, batch_size=5)
    stream = ShardStream([shard], decoder, shuffle=False, batch_size=5, log=logged.append)
    records = list(itertools.islice(stream, len(good_keys)))
    assert [r.key for r in records] == good_keys
    assert dict(stream.stats.counts) == expected_counts
    assert stream.stats is decoder.stats
    skip_lines = [line for line in logged if line.startswith("skipping sample")]
    assert sorted(line.split(": ")[1].split(" (")[0] for line in skip_lines) == sorted(expected_counts)
    # the stream goes on into the next epoch with the same good samples, counting again
    assert [r.key for r in itertools.islice(stream, len(good_keys))] == good_keys
    assert dict(stream.stats.counts) == {k: 2 * v for k, v in expected_counts.items()}
    assert sorted(p for p in tmp_path.parent.rglob("*")) == before  # nothing written anywhere


@pytest.mark.timeout(60)
def test_truncated_shard_between_good_shards(tmp_path):
    shards = []
    for s in range(3):
        entries = []
        for i in range(6):
            key = f"s{s}k{i}"
            entries += _sample(key, {"jpg": _jpeg(i), "txt": f"caption {s} {i}".encode()})
        path = tmp_path / f"shard{s}.tar"
        _write(path, entries)
        shards.append(str(path))
    data = open(shards[1], "rb").read()
    # cut inside the 5th sample's image: samples 0-3 of that shard are complete
    cut = data.index(b"s1k4.jpg") + 512 + 200
    open(shards[1], "wb").write(data[:cut])
    stats = SkipStats()
    stream = ShardStream(shards, Decoder("image_text", 32, backend="pil", stats=stats, log=None),
                         shuffle=False, batch_size=4, log=None)
    keys = [r.key for r in itertools.islice(stream, 16)]
    assert keys == [f"s0k{i}" for i in range(6)] + [f"s1k{i}" for i in range(4)] + [f"s2k{i}" for i in range(6)]
    assert dict(stats.counts) == {"truncated_tar": 1}
    assert stats.summary() == "skipped samples: truncated_tar=1"


def test_only_jpeg_png_webp_are_opened(monkeypatch):
    """Formats PIL knows but the shards never carry are refused without PIL's plugin for
    them running (EPS would start Ghostscript)."""
    eps_opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: eps_opened.append(1))
    bmp = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(bmp, format="BMP")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    for backend in ("pil",) + (("dali",) if dali_available() else ()):
        decoder = Decoder("image_text", 16, backend=backend, log=None)
        assert decoder.decode_batch([("bmp", {"jpg": bmp.getvalue(), "txt": CAPTION}),
                                     ("eps", {"jpg": eps, "txt": CAPTION})]) == [None, None]
        assert decoder.stats.counts == {"corrupt_image": 2}
    assert eps_opened == []


def test_jpeg_with_trailing_bytes_decodes_and_cut_jpeg_does_not():
    jpeg = encode_jpeg(ShapesWorld(5).sample(0, 48).image)
    decoder = Decoder("image_text", 16, backend="pil", log=None)
    reference = decoder.decode("k", {"jpg": jpeg, "txt": CAPTION}).image
    # data after the end-of-image marker (a second JPEG's scan start, padding, metadata)
    trailer = b"\xff\xd8\xff\xda\x00\x08junk" + bytes(40)
    appended = decoder.decode("k", {"jpg": jpeg + trailer, "txt": CAPTION})
    assert appended is not None and (appended.image == reference).all()
    # a thumbnail (EXIF, JFXX) is a whole JPEG inside an APPn segment of the header: its own
    # end marker does not make a main image cut inside its scan complete
    thumb = io.BytesIO()
    Image.new("RGB", (8, 8)).save(thumb, format="JPEG")
    with_app = jpeg[:2] + b"\xff\xe1" + (len(thumb.getvalue()) + 2).to_bytes(2, "big") + thumb.getvalue() + jpeg[2:]
    assert decoder.decode("k", {"jpg": with_app, "txt": CAPTION}) is not None
    for cut in (with_app[:len(with_app) - 100], jpeg[:len(jpeg) - 2], jpeg[:jpeg.index(b"\xff\xda") + 6]):
        assert decoder.decode("k", {"jpg": cut, "txt": CAPTION}) is None
    assert decoder.stats.counts == {"corrupt_image": 3}
