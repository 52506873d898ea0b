"""The decoder trainer's data: for every image (or clip), the encoder's pixels and the VAE's.

Two sources with one interface (`train_batch(step)`, `heldout(n_batches)`, `describe()`):

- `InMemoryData` (data.paths = ""): shapes-world images (`data.shapes.ShapesWorld`) and clips
  of moving shapes (`moving_shapes_clip`), pure functions of (data.seed, index). Step s reads
  samples [s B, (s + 1) B) of the global batch B; a rank reads the positions it is given.
- `ShardData` (data.paths): WebDataset shards in img2dataset's layout through the data
  pipeline's `shards.ShardStream`: each rank reads its own shards (or, with fewer shards than
  ranks, its own samples of each), in an order shuffled per epoch by data.seed, and each step
  takes the rank's next B / W records. The stream's exact position is the checkpoints'
  per-rank data state, so a resumed run reads what the uninterrupted one would have.

Pixels. Every image or frame gives two tensors, both from the same square of the picture:
the encoder's, CLIP-normalised at the encoder's resolution (`sequences.to_pixels`, as the
pretraining data path makes them), and the VAE's, in [-1, 1] at data.image_size
(`vae_pixels`). Both are bicubic resizes (antialiased when shrinking). A shard image is first
centre-cropped to its largest centred square (of an odd margin, the extra pixel is cut on the
left / top, as DALI's centred crop rounds). The pretraining path does not crop: it resizes straight to a
square, as the released Emu2 processor does, squashing wide or tall images. The decoder crops
because its VAE pixels are the target it learns to draw: squashed targets would teach it
squashed pictures; the encoder sees the same crop, so the embeddings describe the target.
In-memory images and clips are square already.

Video clips: `data.frames` frames spread uniformly over the clip (`decode.uniform_frame_indices`,
the pretraining rule: the centre frame of each of data.frames equal segments). A clip with
fewer frames than that is skipped (`too_few_frames`) where the pretraining path would repeat
frames: a clip with repeated frames would teach the video decoder stalled motion.

The trainer takes its batches through an iterator with the resumable-loader interface of
`data.prefetch` (`__next__`, `state_dict` / `load_state_dict`): `ShardData` itself (its state is
the stream's position and skip counts, which the checkpoints hold), or `StepBatches` over the
in-memory data (its state is the next step, which the trainer sets from its own step). With
data.prefetch > 0 a `data.prefetch.Prefetcher` runs that iterator in a background thread, so
decoding (shards) or drawing (in memory: ~90 ms per 1024 px image and its two views, one
thread of our 2-core CPU) overlaps the UNet's step. Both are prefetched: the in-memory data is what the GPU recipes read
when data.paths is empty, and there its drawing would otherwise stall every step.

Decoding (`PairDecoder`): DALI on the CPU when it can be imported (a batch of images or clips
is one pipeline run: decode -> centre crop -> two resizes -> two normalisations), PIL/PyAV
otherwise, with the header checks, accepted formats, EXIF orientation and frame rule of
`data.decode`; `decode.Decoder` itself makes one size, uncropped, CLIP-normalised, which cannot
serve here. Clips in codecs DALI's CPU decoder lacks go to PyAV. Bad samples are skipped and
counted by kind (`decode.BadSample`'s kinds and `too_few_frames`; tar-level ones by
`shards.iter_tar_samples`) in the stream's `SkipStats`.
"""

from __future__ import annotations

import io
import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import av
import numpy as np
import torch
from PIL import Image, ImageDraw

from emu2_engine.data.decode import (DALI_VIDEO_CODECS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, BadSample,
                                     check_image_header, dali_available, first_member, open_upright_rgb,
                                     probe_video, uniform_frame_indices)
from emu2_engine.data.records import SkipStats
from emu2_engine.data.sequences import CLIP_MEAN, CLIP_STD, to_pixels
from emu2_engine.data.shapes import BACKGROUNDS, COLOURS, KINDS, ShapesWorld
from emu2_engine.data.shards import ShardStream, check_shard_spec, iter_records, iter_tar_samples
from emu2_engine.train.decoder_config import DecoderJobConfig

HELD_OUT_SEED_OFFSET = 7919  # in-memory held-out samples: the same generators under another seed
PROBE_SAMPLES = 8  # samples of the first shard looked at before training (`check_shards`)


@dataclass
class DecoderBatch:
    """One step's pixels. Images: (B, 3, R, R); clips: (B, F, 3, R, R)."""

    encoder_pixels: torch.Tensor
    """CLIP-normalised at the encoder's resolution."""
    vae_pixels: torch.Tensor
    """In [-1, 1] at the decoder's resolution."""


# ----------------------------------------------------------------------------------------------
# In memory: shapes-world images and clips of moving shapes
# ----------------------------------------------------------------------------------------------
def moving_shapes_clip(seed: int, index: int, frames: int, size: int) -> list[Image.Image]:
    """Clip `index`: one or two shapes sliding in straight lines over a plain background, drawn
    at `frames` evenly spaced times. A pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index, 1])  # the trailing 1 keeps clips apart from images
    background = BACKGROUNDS[list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]]
    shapes = []
    for _ in range(int(rng.integers(1, 3))):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        colour = COLOURS[list(COLOURS)[int(rng.integers(len(COLOURS)))]]
        side = rng.uniform(0.2, 0.35)
        start, end = rng.uniform(side / 2, 1 - side / 2, size=(2, 2))
        shapes.append((kind, colour, side, start, end))
    clip = []
    for f in range(frames):
        progress = f / max(frames - 1, 1)
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        for kind, colour, side, start, end in shapes:
            cx, cy = (start + (end - start) * progress) * size
            half = side * size / 2
            box = (cx - half, cy - half, cx + half, cy + half)
            if kind == "circle":
                draw.ellipse(box, fill=colour)
            elif kind == "square":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
        clip.append(image)
    return clip


def vae_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) in [-1, 1], the VAE's input range (bicubic resize)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def make_batch(cfg: DecoderJobConfig, encoder_size: int, indices: Sequence[int], seed: int) -> DecoderBatch:
    """The shapes-world images (or clips) of the given sample indices under `seed`."""
    d = cfg.data
    if cfg.model.video:
        clips = [moving_shapes_clip(seed, i, d.frames, d.image_size) for i in indices]
        enc = torch.stack([torch.stack([to_pixels(f, encoder_size) for f in c]) for c in clips])
        vae = torch.stack([torch.stack([vae_pixels(f, d.image_size) for f in c]) for c in clips])
        return DecoderBatch(enc, vae)
    world = ShapesWorld(seed)
    images = [world.sample(i, d.image_size).image for i in indices]
    return DecoderBatch(torch.stack([to_pixels(im, encoder_size) for im in images]),
                        torch.stack([vae_pixels(im, d.image_size) for im in images]))


class InMemoryData:
    """The in-memory images or clips of one rank, whose samples sit at `positions` of every
    step's global batch."""

    has_heldout = True

    def __init__(self, cfg: DecoderJobConfig, encoder_size: int, positions: range):
        self.cfg, self.encoder_size, self.positions = cfg, encoder_size, positions

    def _indices(self, step: int) -> list[int]:
        """Sample indices of this rank's slice of the global batch of `step`."""
        return [step * self.cfg.data.batch_size + p for p in self.positions]

    def train_batch(self, step: int) -> DecoderBatch:
        """This rank's slice of the global batch of `step`."""
        return make_batch(self.cfg, self.encoder_size, self._indices(step), self.cfg.data.seed)

    def heldout(self, n_batches: int) -> Iterator[tuple[DecoderBatch, torch.Tensor]]:
        """For each held-out global batch, this rank's slice and the encoder pixels of the
        samples that follow its own: held-out sample k is given sample k + 1's (the "wrong
        condition" of the evaluation), across batch boundaries, so it is another sample even
        at batch size 1 (`ShardData.heldout` follows the same rule)."""
        seed = self.cfg.data.seed + HELD_OUT_SEED_OFFSET
        for i in range(n_batches):
            own = self._indices(i)
            yield (make_batch(self.cfg, self.encoder_size, own, seed),
                   make_batch(self.cfg, self.encoder_size, [k + 1 for k in own], seed).encoder_pixels)

    def describe(self) -> str:
        return f"in-memory shapes-world {'clips' if self.cfg.model.video else 'images'} (data.paths is empty)"


class StepBatches:
    """The in-memory data's training batches, step after step: `data.train_batch(step)` for
    step = `step`, step + 1, ..., as the resumable iterator `data.prefetch.Prefetcher` runs.
    Its state is the next step; a checkpoint does not hold it: a batch is a function of its
    step, so the trainer sets it from the step it resumes at."""

    def __init__(self, data: InMemoryData, step: int = 0):
        self.data, self.step = data, step

    def __iter__(self) -> StepBatches:
        return self

    def __next__(self) -> DecoderBatch:
        batch = self.data.train_batch(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


# ----------------------------------------------------------------------------------------------
# Shards: decoding one sample into its two views
# ----------------------------------------------------------------------------------------------
@dataclass
class PixelPair:
    """One decoded image (3, R, R) or clip (F, 3, R, R): the two views `DecoderBatch` stacks."""

    key: str
    encoder_pixels: torch.Tensor
    vae_pixels: torch.Tensor
    source: str = ""
    """The shard it came from (set by the shard readers)."""


def centre_square(image: Image.Image) -> Image.Image:
    """The largest centred square of `image`; an odd margin's extra pixel is cut on the left /
    top, where DALI's centred crop cuts it (`(margin + 1) // 2`)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side + 1) // 2, (height - side + 1) // 2
    return image if width == height else image.crop((left, top, left + side, top + side))


def decode_image_pair_pil(data: bytes, encoder_size: int, vae_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL path: the centred square of an image (header already checked), as (encoder pixels,
    VAE pixels). Raises BadSample `corrupt_image` when the bytes do not decode."""
    try:
        square = centre_square(open_upright_rgb(data))
    except Exception as e:
        raise BadSample("corrupt_image", f"image does not decode ({type(e).__name__}: {e})") from None
    return to_pixels(square, encoder_size), vae_pixels(square, vae_size)


def decode_clip_pair_pyav(data: bytes, indices: list[int], encoder_size: int,
                          vae_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PyAV path: frames `indices` of a clip, each cropped to its centred square, as (F, 3, ...)
    encoder pixels and VAE pixels. Raises BadSample `corrupt_video` / `truncated_video`."""
    wanted: dict[int, Image.Image] = {}
    try:
        with av.open(io.BytesIO(data)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in indices:
                    wanted[i] = centre_square(frame.to_image())
                if i >= max(indices):
                    break
    except Exception as e:
        raise BadSample("corrupt_video", f"video does not decode ({type(e).__name__}: {e})") from None
    if len(wanted) < len(set(indices)):
        raise BadSample("truncated_video", f"decoded frames stop before frame {max(indices)}")
    squares = [wanted[i] for i in indices]
    return (torch.stack([to_pixels(s, encoder_size) for s in squares]),
            torch.stack([vae_pixels(s, vae_size) for s in squares]))


def _square_in_two_sizes(pixels, height_axis: int, layout: str, encoder_size: int, vae_size: int):
    """DALI graph tail: crop decoded uint8 pixels to their centred square, resize to each size
    (bicubic, antialiased) and normalise: CLIP mean / std for the encoder, [-1, 1] for the VAE."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    shape = pixels.shape(dtype=types.FLOAT)
    side = dmath.min(shape[height_axis], shape[height_axis + 1])
    square = fn.crop(pixels, crop_h=side, crop_w=side)  # crop_pos 0.5: centred
    resized = {}
    outputs = []
    for size, mean, std in ((encoder_size, [255 * m for m in CLIP_MEAN], [255 * s for s in CLIP_STD]),
                            (vae_size, [127.5] * 3, [127.5] * 3)):
        if size not in resized:
            resized[size] = fn.resize(square, resize_x=size, resize_y=size,
                                      interp_type=types.INTERP_CUBIC, antialias=True)
        outputs.append(fn.crop_mirror_normalize(resized[size], dtype=types.FLOAT, output_layout=layout,
                                                mean=mean, std=std))
    return tuple(outputs)


def image_pair_pipeline(encoder_size: int, vae_size: int):
    """The DALI image graph (call inside `pipeline_def`): encoded bytes fed as "encoded" ->
    CPU decode -> centred square -> (encoder pixels, VAE pixels), CHW float32."""
    from nvidia.dali import fn, types

    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
    return _square_in_two_sizes(images, 0, "CHW", encoder_size, vae_size)


def clip_pair_pipeline(encoder_size: int, vae_size: int):
    """The DALI video graph: encoded bytes as "encoded", the frame indices to keep as "frames"
    -> CPU decode of those frames -> centred squares -> (encoder pixels, VAE pixels), FCHW."""
    from nvidia.dali import fn, types

    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
    video = fn.decoders.video(encoded, device="cpu", frames=frames)
    return _square_in_two_sizes(video, 1, "FCHW", encoder_size, vae_size)


class _PairPipeline:
    """One DALI CPU pipeline of a graph above, built on first use and rebuilt after a failed
    run (DALI may leave it unusable), as `decode.Decoder`'s runners are."""

    def __init__(self, graph, encoder_size: int, vae_size: int, batch_size: int):
        self.graph, self.sizes, self.batch_size = graph, (encoder_size, vae_size), batch_size
        self._pipe = None

    def run(self, inputs: dict[str, list[np.ndarray]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(encoder pixels, VAE pixels) per item of the inputs (lists of length <= batch_size)."""
        if self._pipe is None:
            from nvidia.dali import pipeline_def
            self._pipe = pipeline_def(self.graph)(*self.sizes, batch_size=self.batch_size, num_threads=1,
                                                  device_id=None, prefetch_queue_depth=1)
            self._pipe.build()
        try:
            for name, items in inputs.items():
                self._pipe.feed_input(name, items)
            encoder, vae = self._pipe.run()
        except Exception:
            self._pipe = None
            raise
        return list(zip(torch.from_numpy(encoder.as_array()).unbind(0),
                        torch.from_numpy(vae.as_array()).unbind(0)))


class PairDecoder:
    """Decodes shard samples (key, {extension: bytes}) into `PixelPair`s: an image, or `frames`
    uniformly sampled frames of a clip when `video`; see the module docstring. Only the pixels
    are read: a sample needs no caption. Skips are counted in `stats` and the first of each
    kind is said through `log`. backend: "auto" (DALI on the CPU when importable), "dali" or
    "pil" (PIL/PyAV); batch_size: DALI's pipeline batch."""

    def __init__(self, video: bool, encoder_size: int, vae_size: int, frames: int, backend: str = "auto",
                 stats: SkipStats | None = None, log: Callable[[str], None] | None = print,
                 batch_size: int = 32):
        if backend not in ("auto", "dali", "pil"):
            raise ValueError(f"backend must be 'auto', 'dali' or 'pil', got {backend!r}")
        if backend == "dali" and not dali_available():
            raise ValueError("backend='dali' but NVIDIA DALI is not installed (or backend='pil')")
        if min(encoder_size, vae_size, frames, batch_size) < 1:
            raise ValueError(f"sizes, frames and batch_size must be >= 1, got {encoder_size}, {vae_size}, "
                             f"{frames}, {batch_size}")
        self.video, self.encoder_size, self.vae_size, self.frames = video, encoder_size, vae_size, frames
        self.stats = stats if stats is not None else SkipStats()
        self.log = log
        self.backend = "dali" if backend == "dali" or (backend == "auto" and dali_available()) else "pil"
        graph = clip_pair_pipeline if video else image_pair_pipeline
        self._dali = _PairPipeline(graph, encoder_size, vae_size, batch_size) if self.backend == "dali" else None
        self._said_pyav_fallback = False

    def describe(self) -> str:
        return "DALI on the CPU" if self.backend == "dali" else "PIL/PyAV on the CPU"

    def decode(self, key: str, members: dict[str, bytes]) -> PixelPair | None:
        """The pair of one sample, or None when it is bad (counted in `stats`)."""
        return self.decode_batch([(key, members)])[0]

    def decode_batch(self, samples: list[tuple[str, dict[str, bytes]]]) -> list[PixelPair | None]:
        """Pairs of several samples, in order; None for each bad one. With DALI the batch is
        one pipeline run; if it fails, each item runs alone, so a corrupt file costs only its
        own sample."""
        plans: list[tuple | None] = []
        for key, members in samples:
            try:
                plans.append(self._plan(members))
            except BadSample as bad:
                self.stats.skip(bad.kind, key, str(bad), self.log)
                plans.append(None)
        outputs: dict[int, tuple | BadSample] = {}
        dali_jobs = []
        for i, plan in enumerate(plans):
            if plan is None:
                continue
            data, codec, indices = plan
            if self.backend == "dali" and (codec is None or codec in DALI_VIDEO_CODECS["cpu"]):
                dali_jobs.append(i)
            else:
                outputs[i] = self._decode_alone(data, codec, indices)
        items = [{"encoded": [np.frombuffer(plans[i][0], dtype=np.uint8)],
                  **({"frames": [np.asarray(plans[i][2], dtype=np.int32)]} if self.video else {})}
                 for i in dali_jobs]
        outputs.update(zip(dali_jobs, self._run_dali(items)))
        pairs: list[PixelPair | None] = []
        for i, (key, _) in enumerate(samples):
            out = outputs.get(i)
            if isinstance(out, BadSample):
                self.stats.skip(out.kind, key, str(out), self.log)
                out = None
            pairs.append(None if out is None else PixelPair(key, *out))
        return pairs

    def _plan(self, members: dict[str, bytes]) -> tuple[bytes, str | None, list[int] | None]:
        """(encoded bytes, codec, frame indices) of a sample, checked from headers alone (codec
        and indices are None for an image). Raises BadSample."""
        if not self.video:
            data = first_member(members, IMAGE_EXTENSIONS, "image")
            check_image_header(data)
            return data, None, None
        data = first_member(members, VIDEO_EXTENSIONS, "video")
        codec, n_available = probe_video(data)
        if n_available < self.frames:
            raise BadSample("too_few_frames", f"{n_available} frames, fewer than data.frames = {self.frames}")
        return data, codec, uniform_frame_indices(n_available, self.frames)

    def _decode_alone(self, data: bytes, codec: str | None, indices: list[int] | None) -> tuple | BadSample:
        """PIL / PyAV decoding of one sample: its pair, or the BadSample it raised."""
        if codec is not None and self.backend == "dali" and not self._said_pyav_fallback and self.log:
            self.log(f"DALI's CPU video decoder cannot read {codec}: decoding such clips with PyAV (said once)")
            self._said_pyav_fallback = True
        try:
            if indices is None:
                return decode_image_pair_pil(data, self.encoder_size, self.vae_size)
            return decode_clip_pair_pyav(data, indices, self.encoder_size, self.vae_size)
        except BadSample as bad:
            return bad

    def _run_dali(self, items: list[dict[str, list[np.ndarray]]]) -> list[tuple | BadSample]:
        """Items through the DALI pipeline, batch_size at a time; a failed batch is retried
        item by item, and an item that fails alone is a BadSample."""
        kind = "corrupt_video" if self.video else "corrupt_image"
        outputs: list[tuple | BadSample] = []
        if not items:
            return outputs
        size = self._dali.batch_size
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            try:
                outputs += self._dali.run({name: [a for item in chunk for a in item[name]] for name in chunk[0]})
                continue
            except Exception:
                pass
            for item in chunk:
                try:
                    outputs += self._dali.run(item)
                except Exception as e:
                    lines = [line for line in str(e).splitlines() if line.strip()]
                    outputs.append(BadSample(kind, f"DALI could not decode it ({type(e).__name__}: "
                                                   f"{lines[-1] if lines else ''})"))
        return outputs


# ----------------------------------------------------------------------------------------------
# Shards: checking them, and the per-rank training stream
# ----------------------------------------------------------------------------------------------
def check_shards(spec: str, name: str, video: bool, frames: int) -> list[str]:
    """The shards `spec` names, after a look at the first PROBE_SAMPLES samples of the first:
    ValueError, in one line naming the config field `name`, when nothing matches the spec or
    none of its first shards is a tar file (`check_shard_spec`), when none of those samples holds an image (a clip when `video`), or when no clip among
    them has `frames` frames. Samples that are merely bad are left to the stream to skip."""
    shards = check_shard_spec(spec, name)  # something matches, and a tar file among the first
    what, extensions = ("video clips", VIDEO_EXTENSIONS) if video else ("images", IMAGE_EXTENSIONS)
    samples = list(itertools.islice(iter_tar_samples(shards[0], SkipStats(), log=None), PROBE_SAMPLES))
    if not samples:
        return shards  # an unreadable or empty first shard: the stream skips and counts it
    have = sorted({ext for _, members in samples for ext in members})
    if not any(ext in members for _, members in samples for ext in extensions):
        raise ValueError(f"{name}: model.video = {str(video).lower()} trains on {what}, but none of the "
                         f"first {len(samples)} samples of {shards[0]} has a member "
                         f"{'/'.join('.' + e for e in extensions)} (they have {', '.join(have)})")
    if video:
        lengths = []
        for _, members in samples:
            try:
                lengths.append(probe_video(first_member(members, VIDEO_EXTENSIONS, "video"))[1])
            except BadSample:
                continue
        if lengths and max(lengths) < frames:
            raise ValueError(f"{name}: data.frames = {frames}, but the clips of {shards[0]} have at most "
                             f"{max(lengths)} frames (first {len(samples)} samples); lower data.frames")
    return shards


def stack_pairs(pairs: list[PixelPair]) -> DecoderBatch:
    return DecoderBatch(torch.stack([p.encoder_pixels for p in pairs]), torch.stack([p.vae_pixels for p in pairs]))


HELDOUT_DECODE_BATCH = 32
"""Held-out samples decoded at a time: every rank reads the whole held-out global batch (to find
the same first usable samples at any world size) but keeps only its slice and the samples after
them."""


class ShardData:
    """Images or clips from shards for one rank of `world`, whose samples sit at `positions`
    of every global batch (see the module docstring). Iterating gives the training batches;
    `state_dict` / `load_state_dict` (the checkpoints' per-rank data state) hold the stream's
    position and the running skip counts."""

    STATE_VERSION = 1

    def __init__(self, cfg: DecoderJobConfig, encoder_size: int, positions: range, rank: int = 0,
                 world: int = 1, log: Callable[[str], None] | None = print):
        d = cfg.data
        self.cfg, self.encoder_size, self.positions, self.log = cfg, encoder_size, positions, log
        self.rank, self.world = rank, world
        self.shards = check_shards(d.paths, "data.paths", cfg.model.video, d.frames)
        self.has_heldout = bool(d.heldout_paths)
        if self.has_heldout:
            check_shards(d.heldout_paths, "data.heldout_paths", cfg.model.video, d.frames)
        self.decoder = self._decoder(batch_size=len(positions))
        self.stream = ShardStream(self.shards, self.decoder, rank=rank, world_size=world, seed=d.seed,
                                  shuffle=True, batch_size=len(positions), log=log)
        self.stats = self.stream.stats

    def _decoder(self, batch_size: int, stats: SkipStats | None = None) -> PairDecoder:
        d = self.cfg.data
        return PairDecoder(self.cfg.model.video, self.encoder_size, d.image_size, d.frames, stats=stats,
                           log=self.log, batch_size=batch_size)

    def __iter__(self) -> ShardData:
        return self

    def __next__(self) -> DecoderBatch:
        """This rank's next len(positions) records: the next step's batch."""
        return stack_pairs([next(self.stream) for _ in self.positions])

    def train_batch(self, step: int) -> DecoderBatch:
        """This rank's next len(positions) records. `step` is not used: the stream's position,
        restored from the checkpoint of the step before, is where `step` starts."""
        return next(self)

    def heldout(self, n_batches: int) -> Iterator[tuple[DecoderBatch, torch.Tensor]]:
        """The held-out global batches are the first n_batches x data.batch_size usable samples
        of data.heldout_paths, in file order: the same at every evaluation and for any number
        of ranks. Each rank decodes them all and yields its slice and, like `InMemoryData`,
        the encoder pixels of the samples after its own (sample k gets sample k + 1's; one
        more usable sample is read for the last). Skips go to their own counts."""
        size = self.cfg.data.batch_size
        needed = n_batches * size + 1
        chunk = min(size, HELDOUT_DECODE_BATCH)  # decoded pixels of a 1024 px image: ~15 MB
        records = iter_records(self.cfg.data.heldout_paths, self._decoder(chunk, SkipStats()),
                               batch_size=chunk, log=self.log)
        mine = set(self.positions)
        kept: dict[int, PixelPair] = {}  # by index in the held-out sequence
        read = 0
        for i in range(n_batches):
            first = i * size
            for record in itertools.islice(records, first + size + 1 - read):  # through sample first + size
                if read % size in mine or (read >= 1 and (read - 1) % size in mine):  # ours, or one after ours
                    kept[read] = record
                read += 1
            if read < first + size + 1:
                raise ValueError(f"data.heldout_paths = {self.cfg.data.heldout_paths!r} gives {read} usable "
                                 f"samples; train.eval_batches x data.batch_size + 1 = {needed} are needed "
                                 f"(the last one lends its embeddings to the one before it)")
            yield (stack_pairs([kept[first + p] for p in self.positions]),
                   torch.stack([kept[first + p + 1].encoder_pixels for p in self.positions]))
            kept = {k: record for k, record in kept.items() if k >= first + size}  # the next batches' only

    def describe(self) -> str:
        """One line: what is read and how (for the start of a run)."""
        kind = "clips" if self.cfg.model.video else "images"
        split = (f"fewer shards than ranks: each of the {self.world} ranks reads every shard and keeps "
                 f"1 sample in {self.world}" if len(self.shards) < self.world else
                 f"rank {self.rank} of {self.world} reads {len(self.stream.epoch_shards(0))} of them per epoch")
        return (f"{len(self.shards)} shards of {kind} from {self.cfg.data.paths!r} ({split}), "
                f"decoded with {self.decoder.describe()}")

    def skip_counts(self) -> Counter:
        """This rank's training samples skipped so far, by kind."""
        return Counter(self.stats.counts)

    def state_dict(self) -> dict:
        return {"version": self.STATE_VERSION, "stream": self.stream.state_dict(),
                "skipped": dict(self.stats.counts)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was saved: the next records are those the saving rank would
        have read next, and the skip counts continue from its totals."""
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"decoder data state version {state.get('version')!r}, expected {self.STATE_VERSION}")
        self.stream.load_state_dict(state["stream"])
        self.stats.counts = Counter(state["skipped"])
