"""The decoder trainer's shard data (`train/decoder_data.py`): the two views of an image or a
clip equal decoding the same members by hand (centre square, CLIP pixels, [-1, 1] pixels),
DALI agrees with PIL/PyAV, bad samples are skipped and counted, ranks read disjoint data, the
stream's state resumes exactly, skip totals included (and a trainer on the shapes world's
shards resumes bit for bit), a prefetched trainer equals an unprefetched one and checkpoints
the position of its last step, held-out batches split over ranks like one process, and shard
configs that cannot work are refused in one line before anything is built."""

import io
import json
import math
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from decoder_worker import write_small_shards
from emu2_engine import train_decoder
from emu2_engine.data.decode import dali_available
from emu2_engine.data.make_shapes import encode_jpeg, encode_webm, ensure_shapes_world, write_tar
from emu2_engine.data.sequences import CLIP_MEAN, CLIP_STD, to_pixels
from emu2_engine.data.shapes import ShapesWorld
from emu2_engine.train import decoder_data
from emu2_engine.train.decoder import DecoderJobConfig, DecoderTrainer
from emu2_engine.train.decoder_data import PairDecoder, ShardData

pytest.importorskip("diffusers")
needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
BACKENDS = ["pil", pytest.param("dali", marks=needs_dali)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The shapes world's real shards (image_text: 5 train shards of 400 JPEGs, 1 held-out;
    video_text: 3 train shards of 100 VP9 clips of 16 frames)."""
    return ensure_shapes_world(tmp_path_factory.mktemp("cache"), seed=0)


@pytest.fixture
def pil_only(monkeypatch):
    """The trainer's decoders take PIL/PyAV even where DALI is installed."""
    monkeypatch.setattr(decoder_data, "dali_available", lambda: False)


def _cfg(run_dir, *overrides) -> DecoderJobConfig:
    return DecoderJobConfig.load(None, [f"--train.run_dir={run_dir}", "--optim.warmup_steps=1", *overrides])


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _gradient(width: int, height: int) -> Image.Image:
    """Every pixel different, so a crop off by one pixel shows."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    rgb = np.stack([x * 255 // width, y * 255 // height, (x * 7 + y * 13) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def _by_hand(image: Image.Image, box, encoder_size: int, vae_size: int):
    """The two views written out: crop `box`, bicubic resizes, CLIP normalisation, [-1, 1]."""
    square = image.convert("RGB").crop(box)
    vae = np.asarray(square.resize((vae_size, vae_size), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    return to_pixels(square, encoder_size), torch.from_numpy(vae).permute(2, 0, 1)


def _write_shards_with_late_bad_samples(folder: Path) -> None:
    """Two shards of 12 x 10 JPEGs (10 usable) with bad samples and members after good ones, so
    reading on past a step meets skips that the step's own reading had not: an empty image, a
    cut JPEG, a sample with no image, and tar-level refusals (a stray member, an unsafe name)."""
    world = ShapesWorld(9)
    images = iter(encode_jpeg(world.sample(i, 16).image.resize((12, 10))) for i in range(20))
    layout = [["a0", "a1", "empty", "a2", "stray", "a3", "cut", "a4", "a5"],
              ["b0", "unsafe", "b1", "b2", "no_image", "b3", "b4"]]
    folder.mkdir()
    for shard, entries in enumerate(layout):
        with tarfile.open(folder / f"late-{shard}.tar", "w") as tar:
            for i, entry in enumerate(entries):
                bad = {"empty": (f"e{i}.jpg", b""), "stray": ("README", b"not a sample"),
                       "unsafe": (f"../u{i}.jpg", b"x"), "no_image": (f"n{i}.txt", b"a caption")}
                if entry == "cut":
                    name, data = f"c{i}.jpg", next(images)[:40]
                else:
                    name, data = bad[entry] if entry in bad else (f"{entry}.jpg", next(images))
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _tar_samples(path) -> list[tuple[str, dict[str, bytes]]]:
    """A shard's samples in tar order, read with tarfile alone."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return list(samples.items())


# -- one sample's two views -----------------------------------------------------------------------
@pytest.mark.parametrize("size, box", [((40, 24), (8, 0, 32, 24)),     # wide: 8 px cut on each side
                                       ((24, 41), (0, 9, 24, 33)),     # tall, odd margin: 9 above, 8 below
                                       ((30, 30), (0, 0, 30, 30))])
def test_an_image_gives_its_centred_square_in_both_transforms(size, box):
    image = _gradient(*size)
    pair = PairDecoder(False, 16, 20, frames=1, backend="pil", log=None).decode("k", {"png": _png(image)})
    want_encoder, want_vae = _by_hand(image, box, 16, 20)
    assert pair.encoder_pixels.shape == (3, 16, 16) and pair.vae_pixels.shape == (3, 20, 20)
    assert torch.equal(pair.encoder_pixels, want_encoder) and torch.equal(pair.vae_pixels, want_vae)
    assert pair.vae_pixels.min() >= -1 and pair.vae_pixels.max() <= 1


@needs_dali
def test_dali_gives_the_pil_views_on_the_same_images():
    """The same crop (DALI's rounding of an odd margin) and close pixels: both libraries decode
    the same, the bicubic resizes differ in rounding and antialiasing only."""
    world = ShapesWorld(3)
    images = [_gradient(40, 24), _gradient(24, 41), world.sample(0, 64).image.resize((64, 45)),
              world.sample(1, 64).image]
    samples = [(str(i), {"jpg": encode_jpeg(im)}) for i, im in enumerate(images)]
    dali = PairDecoder(False, 16, 24, frames=1, backend="dali", log=None).decode_batch(samples)
    pil = PairDecoder(False, 16, 24, frames=1, backend="pil", log=None).decode_batch(samples)
    for a, b in zip(dali, pil):
        for x, y, unit in ((a.encoder_pixels, b.encoder_pixels, 1 / (255 * 0.26)),
                           (a.vae_pixels, b.vae_pixels, 2 / 255)):
            assert x.shape == y.shape
            difference = (x - y).abs() / unit  # in levels of 255
            assert difference.mean() < 1.0 and difference.max() < 20, (a.key, difference.mean(), difference.max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_clip_gives_its_uniformly_sampled_frames(backend):
    """16 frames, data.frames = 4: frames 2, 6, 10, 14 (the centres of 4 equal segments), each
    cropped to its centred square (64 x 48 -> columns 8..56) and seen through both transforms."""
    frames = [f.resize((64, 48)) for f in ShapesWorld(0).video(2, 64, 16).frames]
    data = encode_webm(frames)
    pair = PairDecoder(True, 16, 24, frames=4, backend=backend, log=None).decode("v", {"webm": data})
    with av.open(io.BytesIO(data)) as container:
        decoded = [f.to_image() for f in container.decode(video=0)]
    views = [_by_hand(decoded[i], (8, 0, 56, 48), 16, 24) for i in (2, 6, 10, 14)]
    want_encoder, want_vae = torch.stack([e for e, _ in views]), torch.stack([v for _, v in views])
    assert pair.encoder_pixels.shape == (4, 3, 16, 16) and pair.vae_pixels.shape == (4, 3, 24, 24)
    if backend == "pil":
        assert torch.equal(pair.encoder_pixels, want_encoder) and torch.equal(pair.vae_pixels, want_vae)
    else:  # YUV -> RGB differs slightly between DALI and libswscale (see test_decode.py)
        for got, want, unit in ((pair.encoder_pixels, want_encoder, 1 / (255 * 0.26)),
                                (pair.vae_pixels, want_vae, 2 / 255)):
            difference = (got - want).abs() / unit  # in levels of 255
            assert difference.mean() < 4 and difference.max() < 64, (difference.mean(), difference.max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_samples_are_skipped_and_counted_and_cost_only_themselves(backend):
    world = ShapesWorld(2)
    good = [encode_jpeg(world.sample(i, 64).image) for i in range(4)]
    table = good[0].find(b"\xff\xc4")  # garbage in a Huffman table passes the header check
    samples = [("g0", {"jpg": good[0]}),
               ("cut", {"jpg": good[1][:len(good[1]) // 2]}),
               ("g1", {"jpg": good[1], "txt": b"a caption is not needed"}),
               ("garbage", {"jpg": good[2][:table + 4] + b"\xff" * 20 + good[2][table + 24:]}),
               ("text", {"txt": b"no image"}),
               ("empty", {"jpg": b""}),
               ("g2", {"png": _png(world.sample(3, 64).image)})]
    decoder = PairDecoder(False, 16, 16, frames=1, backend=backend, log=None, batch_size=8)
    pairs = decoder.decode_batch(samples)
    assert [p.key if p else None for p in pairs] == ["g0", None, "g1", None, None, None, "g2"]
    assert decoder.stats.counts == {"corrupt_image": 2, "missing_member": 1, "empty_file": 1}
    alone = PairDecoder(False, 16, 16, frames=1, backend=backend, log=None)
    for pair, (key, members) in zip(pairs, samples):
        if pair is not None:
            assert torch.equal(pair.vae_pixels, alone.decode(key, members).vae_pixels), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_clips_are_skipped_and_other_codecs_decoded(backend):
    """A 3-frame clip cannot give 4 distinct frames: skipped as too_few_frames. An MPEG-4 clip
    (which DALI's CPU decoder cannot read) goes through PyAV."""
    clip = ShapesWorld(0).video(1, 32, 16).frames
    mpeg4 = io.BytesIO()
    with av.open(mpeg4, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in clip:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")))
        container.mux(stream.encode())
    logged = []
    decoder = PairDecoder(True, 16, 16, frames=4, backend=backend, log=logged.append)
    pairs = decoder.decode_batch([("vp9", {"webm": encode_webm(clip)}), ("short", {"webm": encode_webm(clip[:3])}),
                                  ("mp4", {"mp4": mpeg4.getvalue()}), ("image", {"jpg": encode_jpeg(clip[0])})])
    assert [p is not None for p in pairs] == [True, False, True, False]
    assert decoder.stats.counts == {"too_few_frames": 1, "missing_member": 1}
    assert pairs[2].encoder_pixels.shape == (4, 3, 16, 16)
    assert any("mpeg4" in line for line in logged) == (backend == "dali")


# -- the trainer's data from the shapes world's shards ---------------------------------------------
def test_shard_batches_equal_the_members_decoded_by_hand(world, tmp_path, pil_only):
    """The first step reads the first samples of the first shard of the epoch's order."""
    cfg = _cfg(tmp_path, f"--data.paths={world}/image_text/train", "--data.batch_size=3",
               "--data.image_size=48")
    data = ShardData(cfg, 64, range(3), log=None)
    first = data.stream.epoch_shards(0)[0]
    batch = data.train_batch(0)
    views = [_by_hand(Image.open(io.BytesIO(m["jpg"])), (0, 0, 64, 64), 64, 48) for _, m in _tar_samples(first)[:3]]
    assert batch.encoder_pixels.shape == (3, 3, 64, 64) and batch.vae_pixels.shape == (3, 3, 48, 48)
    assert torch.equal(batch.encoder_pixels, torch.stack([e for e, _ in views]))
    assert torch.equal(batch.vae_pixels, torch.stack([v for _, v in views]))
    assert -1 <= batch.vae_pixels.min() < 0 < batch.vae_pixels.max() <= 1
    lowest = min((0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD))
    highest = max((1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD))
    assert lowest - 1e-6 <= batch.encoder_pixels.min() and batch.encoder_pixels.max() <= highest + 1e-6
    assert "5 shards of images" in data.describe() and "PIL/PyAV" in data.describe()


def test_clip_batches_have_the_video_shapes(world, tmp_path, pil_only):
    cfg = _cfg(tmp_path, f"--data.paths={world}/video_text/train", "--model.video=true",
               "--data.batch_size=2", "--data.frames=4", "--data.image_size=32")
    data = ShardData(cfg, 64, range(2), log=None)
    batch = data.train_batch(0)
    assert batch.encoder_pixels.shape == (2, 4, 3, 64, 64) and batch.vae_pixels.shape == (2, 4, 3, 32, 32)
    (key, members), = _tar_samples(data.stream.epoch_shards(0)[0])[:1]
    with av.open(io.BytesIO(members["webm"])) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    want = torch.stack([_by_hand(frames[i], (0, 0, 64, 64), 64, 32)[1] for i in (2, 6, 10, 14)])
    assert torch.equal(batch.vae_pixels[0], want)


def test_video_decoder_trains_on_clip_shards(world, tmp_path):
    """The inflated UNet on the shapes world's VP9 clips: the latents and conditions have the
    clip shapes, and a held-out evaluation on held-out clips runs before and after."""
    trainer = DecoderTrainer(_cfg(tmp_path, f"--data.paths={world}/video_text/train",
                                  f"--data.heldout_paths={world}/video_text/heldout", "--model.video=true",
                                  "--data.batch_size=2", "--data.frames=2", "--data.image_size=32",
                                  "--train.steps=2", "--train.eval_batches=1", "--train.log_every=1"))
    latents, cond = trainer.conditions(trainer.data.train_batch(0), trainer.generators(0))
    assert latents.shape == (2, 4, 2, 8, 8) and cond.shape == (2, 2, 16, 64)
    records = trainer.train(progress=False)
    assert [r["step"] for r in records] == [0, 1, 2, 2] and "heldout_loss" in records[-1]
    assert all(math.isfinite(r.get("loss", r.get("heldout_loss"))) for r in records)


def test_two_ranks_read_disjoint_shards(world, tmp_path):
    """5 shards over 2 ranks: each epoch the ranks split them (3 + 2, then 2 + 3: every other
    shard of the sequence of all epochs' shards, so they advance together); their records come
    from their own shards."""
    cfg = _cfg(tmp_path, f"--data.paths={world}/image_text/train", "--data.batch_size=4")
    ranks = [ShardData(cfg, 64, range(2 * r, 2 * r + 2), rank=r, world=2, log=None) for r in (0, 1)]
    for epoch, rank0_reads in ((0, 3), (1, 2)):
        mine = [set(data.stream.epoch_shards(epoch)) for data in ranks]
        assert not mine[0] & mine[1] and len(mine[0] | mine[1]) == 5 and len(mine[0]) == rank0_reads
    for data, shards in zip(ranks, [set(d.stream.epoch_shards(0)) for d in ranks]):
        assert {next(data.stream).source for _ in range(3)} <= shards


def test_stream_state_resumes_exactly_across_shards_and_epochs(tmp_path):
    """A rank's data saved after k steps and loaded into a fresh one gives the next steps'
    batches exactly, across shard and epoch ends, and the skip counts continue from the saved
    totals (one rank of 2: the state is per rank)."""
    write_small_shards(tmp_path / "shards")
    cfg = _cfg(tmp_path, f"--data.paths={tmp_path / 'shards'}", "--data.batch_size=6", "--data.image_size=16")
    whole = ShardData(cfg, 8, range(3), rank=0, world=2, log=None)
    want = [whole.train_batch(s).vae_pixels for s in range(6)]
    first = ShardData(cfg, 8, range(3), rank=0, world=2, log=None)
    for s in range(2):
        first.train_batch(s)
    state = json.loads(json.dumps(first.state_dict()))  # plain data, as the checkpoint pickles it
    resumed = ShardData(cfg, 8, range(3), rank=0, world=2, log=None)
    resumed.load_state_dict(state)
    assert resumed.skip_counts() == first.skip_counts() and sum(first.skip_counts().values()) > 0
    for s in range(2, 6):
        assert torch.equal(resumed.train_batch(s).vae_pixels, want[s]), s
    assert resumed.skip_counts() == whole.skip_counts() and sum(whole.skip_counts().values()) > 0
    other = ShardData(cfg, 8, range(3, 6), rank=1, world=2, log=None)
    with pytest.raises(ValueError, match="rank"):
        other.load_state_dict(state)


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_skip_counts_after_a_resume_equal_the_uninterrupted_runs(tmp_path, steps):
    """Bad samples after good ones: a rank's data saved after k steps and loaded into a fresh
    one has, after every later step, the skip totals of the data that was never stopped (the
    re-read part of the shard is not counted twice) and its batches."""
    _write_shards_with_late_bad_samples(tmp_path / "shards")
    cfg = _cfg(tmp_path, f"--data.paths={tmp_path / 'shards'}", "--data.batch_size=2", "--data.image_size=16")
    whole = ShardData(cfg, 8, range(2), log=None)
    want = [(next(whole).vae_pixels, whole.skip_counts()) for _ in range(9)]
    assert set(want[-1][1]) == {"empty_file", "corrupt_image", "missing_member", "stray_member", "unsafe_path"}
    first = ShardData(cfg, 8, range(2), log=None)
    for _ in range(steps):
        next(first)
    resumed = ShardData(cfg, 8, range(2), log=None)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.skip_counts() == want[steps - 1][1]
    for pixels, counts in want[steps:]:
        assert torch.equal(next(resumed).vae_pixels, pixels)
        assert resumed.skip_counts() == counts


def test_fewer_shards_than_ranks_split_the_samples(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    world = ShapesWorld(6)
    write_tar(folder / "only.tar", [(f"k{i}", {"jpg": encode_jpeg(world.sample(i, 16).image)}) for i in range(6)])
    cfg = _cfg(tmp_path, f"--data.paths={folder / 'only.tar'}", "--data.batch_size=2", "--data.image_size=16")
    streams = [ShardData(cfg, 8, range(r, r + 1), rank=r, world=2, log=None).stream for r in (0, 1)]
    keys = [[next(s).key for _ in range(3)] for s in streams]
    assert keys == [["k0", "k2", "k4"], ["k1", "k3", "k5"]]


def test_heldout_batches_split_over_ranks_like_one_process(world, tmp_path):
    """Each held-out sample's "wrong" embeddings are the next sample's (the last of a batch
    gets the next batch's first), and two ranks' slices are one process's."""
    cfg = _cfg(tmp_path, f"--data.paths={world}/image_text/train",
               f"--data.heldout_paths={world}/image_text/heldout", "--data.batch_size=4", "--data.image_size=16")
    whole = list(ShardData(cfg, 16, range(4), log=None).heldout(2))
    for r in (0, 1):
        parts = list(ShardData(cfg, 16, range(2 * r, 2 * r + 2), rank=r, world=2, log=None).heldout(2))
        for (part, other), (batch, batch_other) in zip(parts, whole, strict=True):
            assert torch.equal(part.vae_pixels, batch.vae_pixels[2 * r:2 * r + 2])
            assert torch.equal(other, batch_other[2 * r:2 * r + 2])
    (first, first_other), (second, _) = whole
    assert torch.equal(first_other, torch.cat([first.encoder_pixels[1:], second.encoder_pixels[:1]]))
    with pytest.raises(ValueError, match=r"gives 200 usable samples; train.eval_batches x data.batch_size \+ 1 = 401"):
        list(ShardData(cfg, 16, range(4), log=None).heldout(100))


def test_heldout_wrong_condition_is_another_sample_at_batch_1(world, tmp_path):
    """At batch size 1, sample k's "wrong" embeddings are sample k + 1's, never its own."""
    cfg = _cfg(tmp_path, f"--data.paths={world}/image_text/train",
               f"--data.heldout_paths={world}/image_text/heldout", "--data.batch_size=1", "--data.image_size=16")
    batches = list(ShardData(cfg, 16, range(1), log=None).heldout(3))
    for (batch, other), (after, _) in zip(batches, batches[1:]):
        assert torch.equal(other, after.encoder_pixels)
    assert all(not torch.equal(batch.encoder_pixels, other) for batch, other in batches)


def test_heldout_decodes_in_chunks_and_gives_the_same_batches(world, tmp_path, monkeypatch):
    """Held-out global batches larger than the decode chunk (3 here, 32 by default) come out
    the same as decoded whole: each rank keeps only its slice and the neighbours."""
    import emu2_engine.train.decoder_data as decoder_data

    cfg = _cfg(tmp_path, f"--data.paths={world}/image_text/train",
               f"--data.heldout_paths={world}/image_text/heldout", "--data.batch_size=8", "--data.image_size=16")
    want = list(ShardData(cfg, 16, range(4, 8), rank=1, world=2, log=None).heldout(2))
    monkeypatch.setattr(decoder_data, "HELDOUT_DECODE_BATCH", 3)
    got = list(ShardData(cfg, 16, range(4, 8), rank=1, world=2, log=None).heldout(2))
    assert len(got) == len(want) == 2
    for (batch, shifted), (want_batch, want_shifted) in zip(got, want):
        assert torch.equal(batch.vae_pixels, want_batch.vae_pixels)
        assert torch.equal(batch.encoder_pixels, want_batch.encoder_pixels)
        assert torch.equal(shifted, want_shifted)


# -- the trainer -------------------------------------------------------------------------------
def test_trainer_on_shards_resumes_bit_for_bit(world, tmp_path):
    """Real shards (DALI when installed): a run checkpointed at step 2 that goes on to step 3
    and dies, resumed by a fresh trainer, repeats the uninterrupted run's steps 3 and 4 bit
    for bit, and the checkpoint holds the rank's stream position."""
    import torch.distributed.checkpoint as dcp

    args = [f"--data.paths={world}/image_text/train", "--data.batch_size=2", "--data.image_size=32",
            "--train.steps=4", "--train.save_every=2", "--train.eval_batches=0", "--train.log_every=1"]
    want = DecoderTrainer(_cfg(tmp_path / "whole", *args)).train(progress=False)
    DecoderTrainer(_cfg(tmp_path / "split", *args)).train(progress=False, stop_at=3)
    saved = dcp.FileSystemReader(str(tmp_path / "split" / "checkpoints" / "step-000002")).read_metadata()
    assert "dataloader.dp0of1" in saved.state_dict_metadata
    got = DecoderTrainer(_cfg(tmp_path / "split", *args)).train(progress=False)
    assert got[0] == {"resumed_from": 2}
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in got[1:]] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in want[2:]]
    assert all(r["skipped"] == {} for r in want)


def test_prefetched_trainer_equals_the_unprefetched_one_and_saves_its_last_steps_position(tmp_path):
    """data.prefetch = 2 against 0 on shards with late bad samples, 4 steps, checkpoints at 2
    and 4: the same losses, gradient norms and skip totals bit for bit, with the producer made
    to fill its queue after every step (its read-ahead meets skips the steps have not). The
    checkpoint of step 2 holds the stream position and skip counts after exactly 2 batches
    (not the read-ahead's), and the thread is stopped when train() returns."""
    _write_shards_with_late_bad_samples(tmp_path / "shards")
    args = [f"--data.paths={tmp_path / 'shards'}", "--data.batch_size=2", "--data.image_size=16",
            "--train.steps=4", "--train.save_every=2", "--train.eval_batches=0", "--train.log_every=1"]
    plain = DecoderTrainer(_cfg(tmp_path / "plain", *args, "--data.prefetch=0"))
    assert plain.batches is plain.data
    want = plain.train(progress=False)
    prefetched = DecoderTrainer(_cfg(tmp_path / "prefetched", *args, "--data.prefetch=2"))
    real_step = prefetched.step

    def step_then_let_the_producer_fill_its_queue():
        result = real_step()
        _wait_until(lambda: prefetched.batches._queue.full())
        return result

    prefetched.step = step_then_let_the_producer_fill_its_queue
    got = prefetched.train(progress=False)
    keys = ("step", "loss", "grad_norm", "lr", "skipped")
    assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in want]
    assert want[1]["skipped"] != want[-1]["skipped"], "the skips must grow over the steps"
    assert not prefetched.batches._thread.is_alive()
    assert prefetched.data.state_dict() != prefetched.batches.state_dict()  # the data had read ahead

    two_batches = ShardData(prefetched.cfg, 64, range(2), log=None)
    next(two_batches), next(two_batches)
    reader = DecoderTrainer(_cfg(tmp_path / "reader", *args, "--data.prefetch=0"))
    assert reader.checkpointer.load(tmp_path / "prefetched" / "checkpoints" / "step-000002") == 2
    assert reader.data.state_dict() == two_batches.state_dict()


def _wait_until(condition, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the prefetch thread did not fill its queue"
        time.sleep(0.01)


def test_trainer_reports_skips_and_skips_heldout_eval_without_heldout_shards(tmp_path, capsys):
    write_small_shards(tmp_path / "shards")
    rc = train_decoder.main(["--no-progress", f"--data.paths={tmp_path / 'shards'}", "--data.batch_size=2",
                             "--data.image_size=16", "--train.steps=4", "--train.log_every=2",
                             "--optim.warmup_steps=1", f"--train.run_dir={tmp_path / 'run'}"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"train_decoder: data: 3 shards of images from '{tmp_path / 'shards'}'" in out
    assert "held-out evaluation skipped: data.paths are real shards and data.heldout_paths names no" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]  # no evaluation records
    # 4 steps of 2: the 8 usable samples of one epoch, after the 3 bad ones
    assert records[-1]["skipped"] == {"corrupt_image": 1, "empty_file": 1, "missing_member": 1}
    assert "data: skipped samples: corrupt_image=1, empty_file=1, missing_member=1" in out


# -- configs that cannot work ----------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["--data.paths=/nowhere/x-*.tar"],
     "data.paths = '/nowhere/x-*.tar': no shards: '/nowhere/x-*.tar' matches no file"),
    (["--data.paths={world}/image_text/train", "--model.video=true"],
     "data.paths: model.video = true trains on video clips, but none of the first 8 samples of "
     "{world}/image_text/train/image_text-train-00000.tar has a member .webm/.mp4/.mkv/.mov/.avi "
     "(they have jpg, json, txt)"),
    (["--data.paths={world}/video_text/train"],
     "data.paths: model.video = false trains on images, but none of the first 8 samples of "
     "{world}/video_text/train/video_text-train-00000.tar has a member .jpg/.jpeg/.png/.webp "
     "(they have json, txt, webm)"),
    (["--data.paths={world}/video_text/train", "--model.video=true", "--data.frames=17"],
     "data.paths: data.frames = 17, but the clips of {world}/video_text/train/video_text-train-00000.tar "
     "have at most 16 frames (first 8 samples); lower data.frames"),
    (["--data.paths={world}/image_text/train", "--data.heldout_paths={world}/nothing"],
     "data.heldout_paths = '{world}/nothing': no shards: '{world}/nothing' (from '{world}/nothing') "
     "is not a file"),
    (["--data.heldout_paths={world}/image_text/heldout"],
     "data.heldout_paths ('{world}/image_text/heldout') needs data.paths: the in-memory data "
     "(data.paths = \"\") has its own held-out samples"),
])
def test_shard_configs_that_cannot_work_are_refused_in_one_line(world, tmp_path, capsys, overrides, message):
    args = [o.format(world=world) for o in overrides]
    assert train_decoder.main(args + [f"--train.run_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == f"train_decoder: {message.format(world=world)}\n"
    assert not (tmp_path / "config.toml").exists()  # refused before the run started
