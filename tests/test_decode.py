"""Decoding: CLIP-normalised pixels, uniform frame sampling, DALI against PIL/PyAV on the
same bytes, the PyAV fallback for codecs DALI's CPU decoder lacks, and records per kind."""

import io
import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from emu2_engine.data import decode as decode_module
from emu2_engine.data.decode import (Decoder, dali_available, decode_video_pyav, measure_decode_speed,
                                      uniform_frame_indices)
from emu2_engine.data.make_shapes import encode_jpeg, encode_webm, sample_members
from emu2_engine.data.records import VQA, Grounded, ImageText, Interleaved, Text, VideoText
from emu2_engine.data.sequences import CLIP_MEAN, CLIP_STD, to_pixels
from emu2_engine.data.shapes import ShapesWorld

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
BACKENDS = ["pil", pytest.param("dali", marks=needs_dali)]


def _image_sample(data, caption=b"a caption."):
    return {"jpg": data, "txt": caption}


def _encode_video(frames, codec, container_format):
    out = io.BytesIO()
    with av.open(out, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def test_uniform_frame_indices_take_segment_centres():
    assert uniform_frame_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert uniform_frame_indices(16, 16) == list(range(16))
    assert uniform_frame_indices(24, 12) == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]
    assert uniform_frame_indices(100, 4) == [12, 37, 62, 87]
    # (i + 0.5) * 5 / 8 = 0.31, 0.94, 1.56, 2.19, 2.81, 3.44, 4.06, 4.69: short videos repeat frames
    assert uniform_frame_indices(5, 8) == [0, 0, 1, 2, 2, 3, 4, 4]
    assert uniform_frame_indices(1, 3) == [0, 0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixels_are_resized_and_clip_normalised(backend):
    rgb = (10, 128, 250)
    png = io.BytesIO()
    Image.new("RGB", (20, 12), rgb).save(png, format="PNG")  # lossless, not square
    record = Decoder("image_text", 16, backend=backend, log=None).decode("k", {"png": png.getvalue(), "txt": b"c"})
    assert isinstance(record, ImageText) and record.caption == "c"
    assert record.image.shape == (3, 16, 16) and record.image.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)]
    for channel in range(3):
        torch.testing.assert_close(record.image[channel], torch.full((16, 16), expected[channel]),
                                   atol=1e-4, rtol=0)


def test_pil_path_is_sequences_to_pixels_of_the_jpeg():
    sample = ShapesWorld(0).sample(3, 64)
    jpeg = encode_jpeg(sample.image)
    for size in (32, 64, 80):
        record = Decoder("image_text", size, backend="pil", log=None).decode("k", _image_sample(jpeg))
        torch.testing.assert_close(record.image, to_pixels(Image.open(io.BytesIO(jpeg)), size), atol=0, rtol=0)
    # and close to the drawn image before JPEG compression
    record = Decoder("image_text", 64, backend="pil", log=None).decode("k", _image_sample(jpeg))
    assert (record.image - to_pixels(sample.image, 64)).abs().mean() < 0.1


@needs_dali
@pytest.mark.parametrize("size", [32, 64, 100, 448])
def test_dali_and_pil_give_close_pixels_on_the_same_jpegs(size):
    world = ShapesWorld(1)
    samples = [(str(i), _image_sample(encode_jpeg(world.sample(i, 64).image))) for i in range(6)]
    dali = Decoder("image_text", size, backend="dali", log=None).decode_batch(samples)
    pil = Decoder("image_text", size, backend="pil", log=None).decode_batch(samples)
    for a, b in zip(dali, pil):
        difference = (a.image - b.image).abs()
        # normalised units (1/255 of the range is about 0.015): same JPEG decoder family,
        # same bicubic kernel; they differ only in rounding and, when shrinking, antialiasing
        assert difference.mean() < 0.01 and difference.max() < 0.3, (size, difference.mean(), difference.max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_decoded_image_owns_its_memory(backend):
    """Images decoded in one batch do not share memory: an image the loader's pool keeps for a
    later row holds its own pixels only, not the whole decoded batch (DALI's CPU path copies per
    item, not one array viewed by every item)."""
    world = ShapesWorld(3)
    samples = [(str(i), _image_sample(encode_jpeg(world.sample(i, 64).image))) for i in range(5)]
    records = Decoder("image_text", 48, backend=backend, log=None).decode_batch(samples)
    storages = [r.image.untyped_storage() for r in records]
    assert len({st.data_ptr() for st in storages}) == 5
    assert all(st.nbytes() == r.image.numel() * r.image.element_size() for st, r in zip(storages, records))


@needs_dali
def test_each_decoded_video_owns_its_memory():
    videos = [(str(i), {"webm": _video_bytes(i, 10), "txt": b"c"}) for i in range(3)]
    decoder = Decoder("video_text", 32, n_frames=4, backend="dali", log=None)
    frames = [r.frames for r in decoder.decode_batch(videos)]
    assert len({f.untyped_storage().data_ptr() for f in frames}) == 3
    assert all(f.untyped_storage().nbytes() == f.numel() * f.element_size() for f in frames)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_corrupt_image_costs_only_its_own_sample(backend):
    world = ShapesWorld(2)
    jpegs = [encode_jpeg(world.sample(i, 64).image) for i in range(5)]
    good = jpegs[2]
    table = good.find(b"\xff\xc4")  # a Huffman table: garbage there passes the header check
    corrupt = good[:table + 4] + b"\xff" * 20 + good[table + 24:]
    samples = [(str(i), _image_sample(j)) for i, j in enumerate(jpegs)]
    samples[2] = ("2", _image_sample(corrupt))
    decoder = Decoder("image_text", 32, backend=backend, log=None, batch_size=8)
    records = decoder.decode_batch(samples)
    assert [r is None for r in records] == [False, False, True, False, False]
    assert decoder.stats.counts == {"corrupt_image": 1}
    alone = Decoder("image_text", 32, backend=backend, log=None)
    for i in (0, 1, 3, 4):
        torch.testing.assert_close(records[i].image, alone.decode(str(i), samples[i][1]).image)


def _video_bytes(index=0, n_frames=16):
    return encode_webm(ShapesWorld(0).video(index, 48, n_frames).frames)


def _pyav_frames(data, indices, size):
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    return torch.stack([to_pixels(frames[i], size) for i in indices])


@pytest.mark.parametrize("n_frames", [8, 12, 16])
def test_pyav_video_frames_are_the_uniformly_sampled_frames(n_frames):
    data = _video_bytes(3)
    record = Decoder("video_text", 32, n_frames=n_frames, backend="pil", log=None).decode(
        "v", {"webm": data, "txt": b"a red circle moves."})
    assert isinstance(record, VideoText) and record.caption == "a red circle moves."
    assert record.frames.shape == (n_frames, 3, 32, 32)
    torch.testing.assert_close(record.frames, _pyav_frames(data, uniform_frame_indices(16, n_frames), 32),
                               atol=0, rtol=0)


@needs_dali
@pytest.mark.parametrize("n_frames", [8, 16])
def test_dali_video_matches_pyav(n_frames):
    samples = [(str(i), {"webm": _video_bytes(i, 16 if i else 10), "txt": b"c"}) for i in range(3)]
    dali = Decoder("video_text", 40, n_frames=n_frames, backend="dali", log=None).decode_batch(samples)
    pil = Decoder("video_text", 40, n_frames=n_frames, backend="pil", log=None).decode_batch(samples)
    for a, b in zip(dali, pil):
        assert a.frames.shape == b.frames.shape == (n_frames, 3, 40, 40)
        difference = (a.frames - b.frames).abs()
        # YUV -> RGB conversion and chroma upsampling differ slightly between DALI and
        # libswscale: measured mean 0.008-0.027 (DALI about one level in 255 brighter),
        # 99th percentile 0.06-0.21, up to 0.48 on a few edge pixels of the shapes
        p99 = torch.quantile(difference.flatten(), 0.99)
        assert difference.mean() < 0.04 and p99 < 0.3 and difference.max() < 0.8, (difference.mean(), p99)


@needs_dali
def test_dali_cpu_falls_back_to_pyav_for_other_codecs_and_says_so_once():
    frames = ShapesWorld(0).video(1, 48, 16).frames
    mp4 = _encode_video(frames, "mpeg4", "mp4")
    mjpeg = _encode_video(frames, "mjpeg", "avi")
    logged = []
    decoder = Decoder("video_text", 32, n_frames=8, backend="dali", log=logged.append)
    records = decoder.decode_batch([("a", {"mp4": mp4, "txt": b"c"}), ("b", {"mp4": mp4, "txt": b"c"}),
                                    ("c", {"avi": mjpeg, "txt": b"c"})])
    assert all(r is not None for r in records) and not decoder.stats.counts
    assert len([line for line in logged if "mpeg4" in line]) == 1
    assert not any("mjpeg" in line for line in logged)  # DALI's CPU decoder reads MJPEG itself
    torch.testing.assert_close(records[0].frames, decode_video_pyav(mp4, uniform_frame_indices(16, 8), 32))


def test_records_of_every_kind_from_shapes_world_members():
    world = ShapesWorld(4)
    decoder = {kind: Decoder(kind, 32, backend="pil", log=None)
               for kind in ("interleaved", "grounded", "vqa", "text")}

    document = world.document(2, 64)
    record = decoder["interleaved"].decode("d", sample_members(world, "interleaved", 2, "d"))
    assert isinstance(record, Interleaved)
    assert record.texts == [item for item in document.items if isinstance(item, str)]
    images = [item for item in document.items if not isinstance(item, str)]
    assert len(record.images) == len(images) and all(x.shape == (3, 32, 32) for x in record.images)
    # the opening sentence comes first; image j sits before the caption that describes it
    assert record.image_at == [1 + 2 * j - j for j in range(len(images))] == list(range(1, len(images) + 1))
    for j, image in enumerate(images):
        assert record.texts[record.image_at[j]] == image.caption

    grounded = world.grounded(5, 64)
    record = decoder["grounded"].decode("g", sample_members(world, "grounded", 5, "g"))
    assert isinstance(record, Grounded) and record.caption == grounded.sample.caption
    assert [(p.start, p.end, list(p.boxes)) for p in record.phrases] == \
        [(p.start, p.end, list(p.boxes)) for p in grounded.phrases]

    vqa = world.vqa(6, 64)
    record = decoder["vqa"].decode("q", sample_members(world, "vqa", 6, "q"))
    assert isinstance(record, VQA) and record.question == vqa.question and record.answers == list(vqa.answers)

    record = decoder["text"].decode("t", sample_members(world, "text", 7, "t"))
    assert isinstance(record, Text) and record.text == world.paragraph(7)


def test_decoder_arguments_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="unknown sample kind"):
        Decoder("audio", 32)
    with pytest.raises(ValueError, match="device must be"):
        Decoder("image_text", 32, device="tpu")
    with pytest.raises(ValueError, match="backend must be"):
        Decoder("image_text", 32, backend="opencv")
    with pytest.raises(ValueError, match="CPU only"):
        Decoder("image_text", 32, backend="pil", device="gpu")
    monkeypatch.setattr(decode_module, "dali_available", lambda: False)
    with pytest.raises(ValueError, match="DALI is not installed"):
        Decoder("image_text", 32, backend="dali")
    logged = []
    decoder = Decoder("image_text", 32, backend="auto", log=logged.append)
    assert decoder.backend == "pil"
    assert logged == ["image_text: decoding with PIL/PyAV on the CPU (DALI is not installed)"]


def test_interleaved_images_belong_to_the_sentence_after_them_or_the_last():
    jpeg = encode_jpeg(ShapesWorld(0).sample(0, 32).image)
    doc = {"texts": [None, "first.", None, None, "second.", None],
           "images": ["0.jpg", None, "1.jpg", "2.jpg", None, "3.jpg"]}
    members = {"json": json.dumps(doc).encode(), **{f"{i}.jpg": jpeg for i in range(4)}}
    record = Decoder("interleaved", 16, backend="pil", log=None).decode("d", members)
    assert record.texts == ["first.", "second."] and len(record.images) == 4
    assert record.image_at == [0, 1, 1, 1]
    decoder = Decoder("interleaved", 16, backend="pil", log=None)
    only_images = {"json": json.dumps({"texts": [None], "images": ["0.jpg"]}).encode(), "0.jpg": jpeg}
    assert decoder.decode("e", only_images) is None and decoder.stats.counts == {"bad_json": 1}


@needs_dali
@pytest.mark.gpu
def test_dali_gpu_decoding_matches_the_cpu_graph():
    """The same graphs with the decoders on the GPU (nvJPEG, NVDEC): same pixels as the CPU run."""
    world = ShapesWorld(5)
    images = [(str(i), _image_sample(encode_jpeg(world.sample(i, 64).image))) for i in range(4)]
    videos = [(str(i), {"webm": _video_bytes(i), "txt": b"c"}) for i in range(2)]
    for kind, samples in (("image_text", images), ("video_text", videos)):
        gpu = Decoder(kind, 96, device="gpu", backend="dali", log=None).decode_batch(samples)
        cpu = Decoder(kind, 96, device="cpu", backend="dali", log=None).decode_batch(samples)
        for a, b in zip(gpu, cpu):
            x, y = (a.image, b.image) if kind == "image_text" else (a.frames, b.frames)
            assert x.is_cuda and not y.is_cuda
            assert (x.cpu() - y).abs().mean() < 0.02


def test_decode_speed_helper_counts_decoded_images():
    jpegs = [encode_jpeg(ShapesWorld(0).sample(i, 64).image) for i in range(8)]
    assert measure_decode_speed(jpegs, 32, "pil", seconds=0.05, batch_size=4) > 0


def test_oversized_video_frames_are_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(decode_module, "MAX_IMAGE_PIXELS", 47 * 48)  # the test video is 48 x 48
    decoder = Decoder("video_text", 16, backend="pil", log=None)
    assert decoder.decode("v", {"webm": _video_bytes(0), "txt": b"c"}) is None
    assert decoder.stats.counts == {"image_too_large": 1}


def _encode(image, fmt, **options):
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize("backend", BACKENDS)
def test_exif_orientation_is_applied(backend):
    # a wide image, left half white; EXIF orientation 6 says "rotate 90 degrees clockwise
    # to display": upright it is tall with the white half on top
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = _encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)
    image = Decoder("image_text", 32, backend=backend, log=None).decode("k", _image_sample(jpeg)).image
    white, black = [(v - m) / s for v, m, s in zip((1.0, 0.0), CLIP_MEAN[:1] * 2, CLIP_STD[:1] * 2)]
    assert image[0, :12].mean() > white - 0.1 and image[0, 20:].mean() < black + 0.1
    upright = Image.open(io.BytesIO(jpeg)).transpose(Image.Transpose.ROTATE_270)
    torch.testing.assert_close(image, to_pixels(upright, 32), atol=0.05 if backend == "dali" else 0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sixteen_bit_grayscale_png_is_scaled_not_saturated(backend):
    levels = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    png = _encode(Image.fromarray(levels), "PNG")
    image = Decoder("image_text", 32, backend=backend, log=None).decode("k", {"png": png, "txt": b"c"}).image
    eight_bit = np.round(levels / 257).astype(np.uint8)  # 0 -> 0, 65535 -> 255
    expected = to_pixels(Image.fromarray(eight_bit), 32)
    torch.testing.assert_close(image, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixels_are_the_released_transform_with_literal_constants(backend):
    """The released Emu2 image transform, written out here with OpenAI CLIP's literal mean and
    std (not the module's constants, which the other tests import): bicubic resize to a square,
    /255, normalise, CHW. A swapped or ImageNet mean, or bilinear resizing on every path at once,
    passed the tests that compare the paths with each other."""
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 72, 3), dtype=np.uint8))
    png = io.BytesIO()
    image.save(png, format="PNG")
    for size in (32, 96):
        want = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float64) / 255
        want = torch.from_numpy(((want - mean) / std).transpose(2, 0, 1))
        got = Decoder("image_text", size, backend=backend, log=None).decode("k", {"png": png.getvalue(), "txt": b"c"})
        error = (got.image.double() - want).abs().mean().item()
        assert error < (1e-5 if backend == "pil" else 0.02), (size, error)


@needs_dali
def test_dali_video_is_antialiased_when_it_shrinks():
    """128 px shapes-world videos decoded to 32 px: DALI's frames match PyAV + PIL's antialiased
    bicubic closely (measured p99 0.03, max 0.085); without antialiasing DALI's p99 was 0.27-0.35
    and its max 0.6-0.98, which the 48 -> 40 px comparison above let through."""
    samples = [(str(i), {"webm": encode_webm(ShapesWorld(0).video(i, 128, 8).frames), "txt": b"c"})
               for i in range(2)]
    dali = Decoder("video_text", 32, n_frames=8, backend="dali", log=None).decode_batch(samples)
    pil = Decoder("video_text", 32, n_frames=8, backend="pil", log=None).decode_batch(samples)
    for a, b in zip(dali, pil):
        difference = (a.frames - b.frames).abs().flatten()
        assert torch.quantile(difference, 0.99) < 0.1 and difference.max() < 0.3, difference.max()
