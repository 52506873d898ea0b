"""Decoding shard samples into records: DALI pipelines (GPU or CPU), with PIL/PyAV as the
fallback and the reference.

`Decoder(kind, image_size, ...)` turns the members of one sample ({extension: bytes}, from
`shards.iter_tar_samples`) into the record of its kind (`records.py`), or None when the
sample is bad: every skip is counted by kind in `Decoder.stats` and the first of each kind
is logged. Member layout per kind: `make_shapes.py`.

Chat samples (LLaVA's conversation format, Emu2-Chat's instruction data) are a `.json`
`{"conversations": [{"from": "human", "value": "<image>\\nwhat is this?"}, {"from": "gpt",
"value": "a red circle."}, ...], "system": "chat", "images": ["0.jpg", ...]}` and their
images. "from" is "human" or "user" for the user, "gpt" or "assistant" for the assistant; the
turns alternate, user first, assistant last, every value a non-blank string. "system" is
optional: "chat" (the default) or "academic" (`records.CHAT_SYSTEMS`). "images" is optional:
member names, in marker order, at most MAX_CHAT_IMAGES; without it the sample's one image
member ("jpg", "0.png", ...) is its image (several are refused: their order is unknown), and a
sample without one is a text-only conversation. The
`records.IMAGE_MARKER`s of the instructions must number the images; instructions without any
get one marker per image put before the first instruction (LLaVA writes "<image>\\n" first).

Edit samples (InstructPix2Pix-style, Emu2-Gen's editing data) are a `.json` `{"instruction":
"make the red circle blue."}` (a non-blank string; other fields are ignored) and two image
members, `source.<ext>` and `edited.<ext>` (`000010003.source.jpg`, `000010003.edited.png`;
ext one of IMAGE_EXTENSIONS), decoded into `records.Edit`.

Pixels: decode to RGB, resize straight to image_size x image_size with a bicubic filter
(antialiased when shrinking; no crop, as the released Emu2 processor does), scale to [0, 1]
and normalise with the CLIP mean and std (`sequences.CLIP_MEAN`/`CLIP_STD`, the constants
of `sequences.to_pixels`, which is the PIL path): float32 (3, H, W). Video: the frames
uniformly sampled (the centre of each of n_frames equal segments), (T, 3, H, W).

Backends. DALI: one pipeline definition per modality (`image_pipeline`, `video_pipeline`);
the CPU and GPU versions differ only in the decoder's device ("cpu", or "mixed" for nvJPEG
and NVDEC) and the pipeline's device_id (None on the CPU). A whole batch of images is one
pipeline run. DALI's CPU video decoder reads VP8, VP9 and MJPEG only (its GPU one adds
H.264, H.265, AV1, MPEG-4): other codecs are decoded by PyAV, said once in the log.
PIL/PyAV: the same steps one sample at a time. `backend="auto"` takes DALI when it can be
imported and PIL/PyAV otherwise, and logs which.

Bad samples, each skipped and counted once (the first problem found):

| kind | what |
|---|---|
| `empty_file` | a member the sample needs has zero bytes |
| `missing_member` | no image / video member, no `source` or `edited` image of an edit, or an interleaved or chat image the JSON names is absent |
| `missing_caption` | no caption (`.txt`), or a blank one; `missing_text` for language-only samples |
| `bad_utf8` | a caption, text or JSON that is not UTF-8 |
| `bad_json` | JSON that does not parse or lacks the fields of its kind (e.g. a malformed interleaved document, a phrase span outside its caption, chat turns that do not alternate, image markers that do not number the images, an edit without a non-blank instruction) |
| `bad_box` | a grounding box outside [0, 1] image coordinates or empty |
| `corrupt_image` | image bytes that do not decode (including a JPEG cut short), or an image in a format other than JPEG, PNG, WebP |
| `image_too_large` | header dimensions (of an image or of video frames) above MAX_IMAGE_SIDE a side or MAX_IMAGE_PIXELS (a decompression bomb), refused before decoding |
| `corrupt_video` | a video that does not open or decode |
| `truncated_video` | fewer frames in the file than its duration and frame rate promise |
| `empty_video` | no video stream, or one with no frames |
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable

import av
import numpy as np
import torch
from PIL import Image, ImageOps

from emu2_engine.data.records import (CHAT_SYSTEMS, IMAGE_MARKER, VQA, Chat, Edit, Grounded, ImageText,
                                      Interleaved, Phrase, Record, SkipStats, Text, VideoText)
from emu2_engine.data.sequences import CLIP_MEAN, CLIP_STD, to_pixels

KINDS = ("image_text", "video_text", "interleaved", "grounded", "vqa", "chat", "text", "edit")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# The formats PIL may open: those of IMAGE_EXTENSIONS. Without the list PIL would try every
# format it knows on untrusted bytes (EPS, for one, runs Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
# PIL modes of one 16-bit channel (a 16-bit grayscale PNG): convert("RGB") would clip them at 255.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
VIDEO_EXTENSIONS = ("webm", "mp4", "mkv", "mov", "avi")
MAX_CHAT_IMAGES = 64  # images one conversation may name (each is decoded before any cap applies)
MAX_IMAGE_SIDE = 16384
MAX_IMAGE_PIXELS = 1 << 26  # 67M pixels, e.g. 8192 x 8192: 200 MB as RGB
MAX_VIDEO_FRAMES = 1 << 16  # a header promising more is treated as corrupt
# Chat roles ("from") of LLaVA's conversation format: the user's names, the assistant's.
CHAT_USER, CHAT_ASSISTANT = ("human", "user"), ("gpt", "assistant")
# Codecs DALI's video decoder reads, per pipeline device (its documentation).
DALI_VIDEO_CODECS = {"cpu": {"vp8", "vp9", "mjpeg"},
                     "gpu": {"vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4"}}


class BadSample(Exception):
    """A sample to skip: `kind` is its SkipStats kind, the message says why."""

    def __init__(self, kind: str, why: str):
        super().__init__(why)
        self.kind = kind


def dali_available() -> bool:
    """True when NVIDIA DALI can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def uniform_frame_indices(n_available: int, n_frames: int) -> list[int]:
    """Indices of n_frames frames spread uniformly over n_available: the centre frame of each
    of n_frames equal segments (frames repeat when the video is shorter than n_frames)."""
    return [min(n_available - 1, int((i + 0.5) * n_available / n_frames)) for i in range(n_frames)]


def check_image_header(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header, read without decoding the pixels.

    Raises BadSample: `empty_file`, `corrupt_image` (not a JPEG, PNG or WebP header; a JPEG
    whose first image ends before its end-of-image marker, i.e. cut short), `image_too_large`."""
    if not data:
        raise BadSample("empty_file", "zero-byte image")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height, fmt = *image.size, image.format
    except Image.DecompressionBombError as e:
        raise BadSample("image_too_large", str(e)) from None
    except Image.UnidentifiedImageError:
        raise BadSample("corrupt_image", f"not a readable {', '.join(IMAGE_FORMATS)} image (the formats accepted)") from None
    except Exception as e:  # PIL raises many types for garbage (UnidentifiedImageError, SyntaxError, ...)
        raise BadSample("corrupt_image", f"unreadable image header ({type(e).__name__}: {e})") from None
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise BadSample("image_too_large", f"{width}x{height} pixels, more than {MAX_IMAGE_SIDE} a side "
                        f"or {MAX_IMAGE_PIXELS} in all")
    # Checked here so that every backend refuses a cut-short JPEG (decoders differ: some fill
    # the missing rows with grey).
    if fmt == "JPEG" and _jpeg_cut_short(data):
        raise BadSample("corrupt_image", "JPEG data ends before its end-of-image marker (cut short)")
    return width, height


def _jpeg_cut_short(data: bytes) -> bool:
    """True when the first image of a JPEG ends before its end-of-image marker (FF D9).

    Walks the markers from the start: marker segments are skipped by their length (so an
    EXIF thumbnail's own markers are never seen), and in entropy-coded data every FF is
    stuffed (FF 00) or a restart marker (FF D0..D7), so the next other marker is the real
    one. Bytes appended after the end-of-image marker are ignored, as decoders do."""
    position = 2  # after the start-of-image marker FF D8
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            return True
        marker = data[position + 1]
        if marker == 0xD9:
            return False
        if marker == 0xFF:  # a fill byte before a marker
            position += 1
        elif marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD7:  # stuffed FF, TEM, restart: no length
            position += 2
        elif position + 4 > len(data):
            return True
        else:  # a marker segment (SOS included: its entropy-coded data follows the header)
            position += 2 + int.from_bytes(data[position + 2:position + 4], "big")


def open_upright_rgb(data: bytes) -> Image.Image:
    """The image in `data` as DALI's decoder gives it and viewers show it: the EXIF orientation
    applied, 16-bit grayscale scaled to 8 bits (level / 257, rounded: DALI's values) instead of
    saturating at 255, RGB. Only IMAGE_FORMATS are opened; PIL's errors propagate."""
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
        image.load()
        upright = ImageOps.exif_transpose(image)
        if upright.mode in _SIXTEEN_BIT_MODES:
            levels = np.asarray(upright).astype(np.float64).clip(0, 65535)
            upright = Image.fromarray(np.round(levels / 257).astype(np.uint8))
        return upright.convert("RGB")


def decode_image_pil(data: bytes, image_size: int) -> torch.Tensor:
    """PIL path: (3, image_size, image_size) float32, normalised (`sequences.to_pixels`) from
    `open_upright_rgb`'s image."""
    check_image_header(data)
    try:
        return to_pixels(open_upright_rgb(data), image_size)
    except Exception as e:
        raise BadSample("corrupt_image", f"image does not decode ({type(e).__name__}: {e})") from None


def probe_video(data: bytes) -> tuple[str, int]:
    """(codec name, number of frames) of the first video stream, from the container alone
    (packets are counted, nothing is decoded).

    Raises BadSample: `empty_file`, `corrupt_video` (does not open), `image_too_large`
    (frames over the image limits), `empty_video` (no video stream, no frames, or nothing
    after the header), `truncated_video` (fewer frames than the container's
    duration x frame rate, less one frame and 5% of slack for rounding and variable rates)."""
    if not data:
        raise BadSample("empty_file", "zero-byte video")
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise BadSample("empty_video", "the file has no video stream")
            stream = container.streams.video[0]
            codec, width, height = stream.codec_context.name, stream.codec_context.width, stream.codec_context.height
            if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
                raise BadSample("image_too_large", f"{width}x{height} video frames, more than "
                                f"{MAX_IMAGE_SIDE} a side or {MAX_IMAGE_PIXELS} pixels")
            n_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
            rate = stream.average_rate or stream.guessed_rate
            duration = container.duration  # microseconds, from the header
    except BadSample:
        raise
    except EOFError:  # the container ends before its first packet: a header and nothing else
        raise BadSample("empty_video", "the file ends before its first frame") from None
    except Exception as e:  # av.error.* for garbage; av raises several types
        raise BadSample("corrupt_video", f"video does not open ({type(e).__name__}: {e})") from None
    promised = round(duration * float(rate) / 1e6) if duration and rate else 0
    if promised > MAX_VIDEO_FRAMES:
        raise BadSample("corrupt_video", f"the header promises {promised} frames")
    if n_frames < promised - 1 - 0.05 * promised:
        raise BadSample("truncated_video", f"{n_frames} frames in the file, {promised} promised by its header")
    if n_frames == 0:
        raise BadSample("empty_video", "the video stream has no frames")
    return codec, n_frames


def decode_video_pyav(data: bytes, indices: list[int], image_size: int) -> torch.Tensor:
    """PyAV path: frames `indices` (sorted or not, repeats allowed) as (T, 3, S, S) float32."""
    wanted = set(indices)
    frames: dict[int, torch.Tensor] = {}
    try:
        with av.open(io.BytesIO(data)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames[i] = to_pixels(frame.to_image(), image_size)
                if i >= max(wanted):
                    break
    except Exception as e:
        raise BadSample("corrupt_video", f"video does not decode ({type(e).__name__}: {e})") from None
    if len(frames) < len(wanted):
        raise BadSample("truncated_video", f"decoded frames stop before frame {max(wanted)}")
    return torch.stack([frames[i] for i in indices])


def _normalisation_255() -> tuple[list[float], list[float]]:
    """CLIP mean and std on the 0..255 scale DALI's decoders output."""
    return [255 * m for m in CLIP_MEAN], [255 * s for s in CLIP_STD]


def image_pipeline(device: str, image_size: int):
    """The DALI image graph (call inside `pipeline_def`): encoded bytes fed as "encoded" ->
    decode (nvJPEG on "gpu") -> bicubic resize -> CLIP normalisation, CHW float32."""
    from nvidia.dali import fn, types
    mean, std = _normalisation_255()
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    images = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    images = fn.resize(images, resize_x=image_size, resize_y=image_size,
                       interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)


def video_pipeline(device: str, image_size: int):
    """The DALI video graph (call inside `pipeline_def`): encoded bytes fed as "encoded" and
    the frame indices to keep as "frames" -> decode those frames (NVDEC on "gpu") -> bicubic
    resize of every frame -> CLIP normalisation, FCHW float32."""
    from nvidia.dali import fn, types
    mean, std = _normalisation_255()
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
    video = fn.decoders.video(encoded, device="mixed" if device == "gpu" else "cpu", frames=frames)
    video = fn.resize(video, resize_x=image_size, resize_y=image_size,
                      interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.crop_mirror_normalize(video, dtype=types.FLOAT, output_layout="FCHW", mean=mean, std=std)


class _DaliRunner:
    """One built DALI pipeline of a graph, run on lists of inputs of at most batch_size.

    After a failed run the pipeline is rebuilt (DALI may leave it unusable), so the caller
    can retry item by item."""

    def __init__(self, graph, device: str, image_size: int, batch_size: int, num_threads: int):
        self.graph, self.device, self.image_size = graph, device, image_size
        self.batch_size, self.num_threads = batch_size, num_threads
        self._pipe = None

    def _build(self):
        from nvidia.dali import pipeline_def
        device_id = torch.cuda.current_device() if self.device == "gpu" else None
        pipe = pipeline_def(self.graph)(self.device, self.image_size, batch_size=self.batch_size,
                                        num_threads=self.num_threads, device_id=device_id,
                                        prefetch_queue_depth=1)
        pipe.build()
        return pipe

    def run(self, inputs: dict[str, list[np.ndarray]]) -> list[torch.Tensor]:
        """Outputs, one tensor per item of the inputs (lists of equal length <= batch_size)."""
        if self._pipe is None:
            self._pipe = self._build()
        try:
            for name, items in inputs.items():
                self._pipe.feed_input(name, items)
            (out,) = self._pipe.run()
        except Exception:
            self._pipe = None
            raise
        if self.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray
            batch = out.as_tensor()
            result = torch.empty(batch.shape(), dtype=torch.float32, device=torch.device("cuda"))
            feed_ndarray(batch, result, cuda_stream=torch.cuda.current_stream())
            return [item.clone() for item in result.unbind(0)]  # each owns its memory (below)
        # One copy per item. `as_array()` would copy the whole batch into one fresh array that
        # every item then views: each batch landed on new pages (faulting them in cost 165 ms per
        # 48 images of 448 px on the 2-core CI machine while the loader's pool held earlier ones),
        # and one item left in the pool kept the whole batch's memory alive. Per item the
        # allocator reuses freed memory: the proxy-1b loader went from 320 to 116 ms a batch.
        return [torch.from_numpy(np.array(out[i])) for i in range(len(out))]


class Decoder:
    """Decodes the samples of one dataset kind into records (see the module docstring).

    kind: one of KINDS. image_size: output side in pixels. n_frames: frames per video.
    device: "cpu" or "gpu" (GPU decoding needs DALI). backend: "auto", "dali" or "pil".
    batch_size / num_threads: DALI's pipeline batch and thread count.
    stats / log: where skips are counted and the first of each kind is said."""

    def __init__(self, kind: str, image_size: int, n_frames: int = 8, device: str = "cpu",
                 backend: str = "auto", stats: SkipStats | None = None,
                 log: Callable[[str], None] | None = print, batch_size: int = 32, num_threads: int = 1):
        if kind not in KINDS:
            raise ValueError(f"unknown sample kind {kind!r}; expected one of {KINDS}")
        if image_size < 1 or n_frames < 1:
            raise ValueError(f"image_size and n_frames must be >= 1, got {image_size} and {n_frames}")
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if backend not in ("auto", "dali", "pil"):
            raise ValueError(f"backend must be 'auto', 'dali' or 'pil', got {backend!r}")
        have_dali = dali_available()
        if backend == "dali" and not have_dali:
            raise ValueError("backend='dali' but NVIDIA DALI is not installed "
                             "(pip install nvidia-dali-cuda130, or backend='pil')")
        if backend == "pil" and device == "gpu":
            raise ValueError("device='gpu' decodes with DALI; the PIL/PyAV backend runs on the CPU only")
        self.kind, self.image_size, self.n_frames = kind, image_size, n_frames
        self.stats = stats if stats is not None else SkipStats()
        self.log = log
        self.backend = "dali" if backend == "dali" or (backend == "auto" and have_dali) else "pil"
        self.device = device if self.backend == "dali" else "cpu"
        if log is not None and backend == "auto" and kind != "text":
            where = f"DALI on the {self.device.upper()}" if self.backend == "dali" else "PIL/PyAV on the CPU"
            reason = "" if have_dali else " (DALI is not installed)"
            log(f"{kind}: decoding with {where}{reason}")
        self._images = self._videos = None
        if self.backend == "dali":
            self._images = _DaliRunner(image_pipeline, self.device, image_size, batch_size, num_threads)
            self._videos = _DaliRunner(video_pipeline, self.device, image_size, batch_size, num_threads)
        self._said_pyav_fallback = False

    def decode(self, key: str, members: dict[str, bytes]) -> Record | None:
        """The record of one sample, or None when it is bad (counted in `stats`)."""
        return self.decode_batch([(key, members)])[0]

    def decode_batch(self, samples: list[tuple[str, dict[str, bytes]]]) -> list[Record | None]:
        """Records of several samples, in order; None for each bad one. With DALI all the
        batch's images (and videos) go through one pipeline run; if that run fails, each
        item is decoded alone, so one corrupt image costs only its own sample."""
        plans: list[dict | None] = []
        for key, members in samples:
            try:
                plans.append(self._plan(key, members))
            except BadSample as bad:
                self.stats.skip(bad.kind, key, str(bad), self.log)
                plans.append(None)
        image_jobs = [(i, data) for i, plan in enumerate(plans) if plan is not None for data in plan["images"]]
        video_jobs = [(i, plan["video"]) for i, plan in enumerate(plans) if plan is not None and "video" in plan]
        failed: dict[int, BadSample] = {}
        pixels = self._decode_images(image_jobs, failed)
        frames = self._decode_videos(video_jobs, failed)
        records: list[Record | None] = []
        for i, ((key, _), plan) in enumerate(zip(samples, plans)):
            if plan is None:
                records.append(None)
            elif i in failed:
                self.stats.skip(failed[i].kind, key, str(failed[i]), self.log)
                records.append(None)
            else:
                records.append(plan["build"](pixels.get(i, []), frames.get(i)))
        return records

    # -- parsing: everything but pixels -------------------------------------------------------

    def _plan(self, key: str, members: dict[str, bytes]) -> dict:
        """Check a sample's text and structure; return the encoded images (and video) to
        decode and a function building the record from their pixels. Raises BadSample."""
        if self.kind == "text":
            text = _text(members, "txt", "missing_text")
            return {"images": [], "build": lambda images, video: Text(key, text)}
        if self.kind == "interleaved":
            texts, images, image_at = _document(_json(members), members)
            return {"images": [_header_checked(data) for data in images],
                    "build": lambda pixels, video: Interleaved(key, texts, pixels, image_at)}
        if self.kind == "chat":
            turns, images, system = _chat(_json(members), members)
            return {"images": [_header_checked(data) for data in images],
                    "build": lambda pixels, video: Chat(key, turns, pixels, system)}
        if self.kind == "edit":
            instruction = _nonblank_str(_json(members).get("instruction"), "edit instruction")
            images = [_header_checked(_named_image(members, name)) for name in ("source", "edited")]
            return {"images": images, "build": lambda px, video: Edit(key, px[0], instruction, px[1])}
        if self.kind == "video_text":
            data = first_member(members, VIDEO_EXTENSIONS, "video")
            caption = _text(members, "txt", "missing_caption")
            codec, n_available = probe_video(data)
            indices = uniform_frame_indices(n_available, self.n_frames)
            return {"images": [], "video": (data, codec, indices),
                    "build": lambda images, video: VideoText(key, video, caption)}
        image = _header_checked(first_member(members, IMAGE_EXTENSIONS, "image"))
        if self.kind == "image_text":
            caption = _text(members, "txt", "missing_caption")
            return {"images": [image], "build": lambda px, video: ImageText(key, px[0], caption)}
        if self.kind == "grounded":
            caption, phrases = _grounding(_json(members))
            return {"images": [image], "build": lambda px, video: Grounded(key, px[0], caption, phrases)}
        question, answers = _vqa(_json(members))
        return {"images": [image], "build": lambda px, video: VQA(key, px[0], question, answers)}

    # -- pixels -------------------------------------------------------------------------------

    def _decode_images(self, jobs: list[tuple[int, bytes]], failed: dict[int, BadSample]
                       ) -> dict[int, list[torch.Tensor]]:
        """Pixels per sample index, in member order; samples with a bad image go to `failed`."""
        jobs = [(i, data) for i, data in jobs if i not in failed]
        outputs: list[torch.Tensor | BadSample] = []
        if self.backend == "pil":
            for _, data in jobs:
                try:
                    outputs.append(decode_image_pil(data, self.image_size))
                except BadSample as bad:
                    outputs.append(bad)
        else:
            arrays = [np.frombuffer(data, dtype=np.uint8) for _, data in jobs]
            outputs = self._run_dali(self._images, [{"encoded": [a]} for a in arrays], "corrupt_image")
        pixels: dict[int, list[torch.Tensor]] = {}
        for (i, _), out in zip(jobs, outputs):
            if isinstance(out, BadSample):
                failed.setdefault(i, out)
            else:
                pixels.setdefault(i, []).append(out)
        return pixels

    def _decode_videos(self, jobs: list[tuple[int, tuple]], failed: dict[int, BadSample]
                       ) -> dict[int, torch.Tensor]:
        frames: dict[int, torch.Tensor] = {}
        dali_jobs, dali_items = [], []
        for i, (data, codec, indices) in jobs:
            if self.backend == "dali" and codec in DALI_VIDEO_CODECS[self.device]:
                dali_jobs.append(i)
                dali_items.append({"encoded": [np.frombuffer(data, dtype=np.uint8)],
                                   "frames": [np.asarray(indices, dtype=np.int32)]})
                continue
            if self.backend == "dali" and not self._said_pyav_fallback and self.log is not None:
                self.log(f"DALI's {self.device.upper()} video decoder cannot read {codec}: decoding "
                         f"such videos with PyAV (said once)")
                self._said_pyav_fallback = True
            try:
                frames[i] = decode_video_pyav(data, indices, self.image_size)
            except BadSample as bad:
                failed.setdefault(i, bad)
        for i, out in zip(dali_jobs, self._run_dali(self._videos, dali_items, "corrupt_video")):
            if isinstance(out, BadSample):
                failed.setdefault(i, out)
            else:
                frames[i] = out
        return frames

    def _run_dali(self, runner: _DaliRunner, items: list[dict[str, list[np.ndarray]]], bad_kind: str
                  ) -> list[torch.Tensor | BadSample]:
        """Run items (each {input name: [one array]}) through DALI, batch_size at a time; a
        failed batch is retried item by item, and an item that fails alone is BadSample."""
        outputs: list[torch.Tensor | BadSample] = []
        if not items:
            return outputs
        for start in range(0, len(items), runner.batch_size):
            chunk = items[start:start + runner.batch_size]
            batched = {name: [a for item in chunk for a in item[name]] for name in chunk[0]}
            try:
                outputs += runner.run(batched)
                continue
            except Exception:
                pass
            for item in chunk:
                try:
                    outputs += runner.run(item)
                except Exception as e:
                    outputs.append(BadSample(bad_kind, f"DALI could not decode it ({_first_line(e)})"))
        return outputs


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


# -- member parsing (shared by every backend) ----------------------------------------------------

def first_member(members: dict[str, bytes], extensions: tuple[str, ...], what: str) -> bytes:
    """The bytes of the sample's first member with one of `extensions` (in their order);
    BadSample `missing_member` naming `what` when there is none."""
    for ext in extensions:
        if ext in members:
            return members[ext]
    raise BadSample("missing_member", f"no {what} member (expected one of {', '.join(extensions)}; "
                    f"have {', '.join(sorted(members)) or 'none'})")


def _named_image(members: dict[str, bytes], name: str) -> bytes:
    """The bytes of member `name.<ext>` (ext in IMAGE_EXTENSIONS' order); BadSample
    `missing_member` when there is none."""
    for ext in IMAGE_EXTENSIONS:
        if f"{name}.{ext}" in members:
            return members[f"{name}.{ext}"]
    raise BadSample("missing_member", f"no {name} image (expected {name}.<{'|'.join(IMAGE_EXTENSIONS)}>; "
                    f"have {', '.join(sorted(members)) or 'none'})")


def _header_checked(data: bytes) -> bytes:
    check_image_header(data)
    return data


def _text(members: dict[str, bytes], ext: str, missing_kind: str) -> str:
    if ext not in members:
        raise BadSample(missing_kind, f"no .{ext} member")
    data = members[ext]
    if not data:
        raise BadSample("empty_file", f"zero-byte .{ext}")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise BadSample("bad_utf8", f".{ext} is not UTF-8 ({e})") from None
    if not text:
        raise BadSample(missing_kind, f".{ext} is blank")
    return text


def _json(members: dict[str, bytes]) -> dict:
    if "json" not in members:
        raise BadSample("bad_json", "no .json member")
    data = members["json"]
    if not data:
        raise BadSample("empty_file", "zero-byte .json")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("bad_utf8", f".json is not UTF-8 ({e})") from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise BadSample("bad_json", f".json does not parse ({e})") from None
    if not isinstance(obj, dict):
        raise BadSample("bad_json", f".json holds a {type(obj).__name__}, not an object")
    return obj


def _nonblank_str(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadSample("bad_json", f"{what} must be a non-blank string, got {value!r:.80}")
    return value


def _document(doc: dict, members: dict[str, bytes]) -> tuple[list[str], list[bytes], list[int]]:
    """Interleaved JSON {"texts": [...], "images": [...]} (aligned, exactly one of the two
    non-null at each position; an image entry names its member) -> texts, image bytes and
    image_at: the sentence each image belongs to, the first sentence after it (the last
    sentence for images after the last sentence). A document needs at least one sentence."""
    texts, images = doc.get("texts"), doc.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise BadSample("bad_json", "interleaved JSON needs lists 'texts' and 'images' of equal length")
    out_texts, out_images, image_at = [], [], []
    for position, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise BadSample("bad_json", f"interleaved JSON position {position} has "
                            f"{'both a text and an image' if text is not None else 'neither text nor image'}")
        if text is not None:
            out_texts.append(_nonblank_str(text, f"text {position}"))
            continue
        name = _nonblank_str(image, f"image {position}").lower()
        if name not in members:
            raise BadSample("missing_member", f"interleaved image {name!r} is not in the sample")
        out_images.append(members[name])
        image_at.append(len(out_texts))
    if not out_texts:
        raise BadSample("bad_json", "interleaved document has no text")
    return out_texts, out_images, [min(i, len(out_texts) - 1) for i in image_at]


def _grounding(meta: dict) -> tuple[str, list[Phrase]]:
    """GRIT-style JSON: `caption` and `noun_chunks` = [[start, end, x0, y0, x1, y1(, score)]]
    with boxes in [0, 1]; chunks of one span become one Phrase with several boxes."""
    caption = _nonblank_str(meta.get("caption"), "caption")
    chunks = meta.get("noun_chunks")
    if not isinstance(chunks, list) or not chunks:
        raise BadSample("bad_json", "grounded JSON needs a non-empty 'noun_chunks' list")
    phrases: dict[tuple[int, int], list] = {}
    for chunk in chunks:
        if (not isinstance(chunk, list) or len(chunk) not in (6, 7)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in chunk)):
            raise BadSample("bad_json", f"noun chunk {chunk!r:.80} is not [start, end, x0, y0, x1, y1(, score)]")
        start, end = chunk[0], chunk[1]
        if start != int(start) or end != int(end) or not 0 <= start < end <= len(caption):
            raise BadSample("bad_json", f"phrase span [{start}, {end}) is outside the {len(caption)}-character caption")
        x0, y0, x1, y1 = (float(v) for v in chunk[2:6])
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise BadSample("bad_box", f"box {[x0, y0, x1, y1]} is outside the image or empty")
        phrases.setdefault((int(start), int(end)), []).append((x0, y0, x1, y1))
    return caption, [Phrase(s, e, boxes) for (s, e), boxes in phrases.items()]


def _vqa(meta: dict) -> tuple[str, list[str]]:
    """VQAv2-style JSON: `question` and `answers` (strings, or {"answer": ...} objects)."""
    question = _nonblank_str(meta.get("question"), "question")
    answers = meta.get("answers")
    if not isinstance(answers, list) or not answers:
        raise BadSample("bad_json", "VQA JSON needs a non-empty 'answers' list")
    out = [_nonblank_str(a.get("answer") if isinstance(a, dict) else a, "answer") for a in answers]
    return question, out


def _chat(meta: dict, members: dict[str, bytes]) -> tuple[list[tuple[str, str]], list[bytes], str]:
    """LLaVA-style conversation JSON (module docstring) -> turns (instruction, answer), image
    bytes in marker order, system name. Instructions without markers get one per image
    before the first instruction."""
    conversation = meta.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        raise BadSample("bad_json", "chat JSON needs a non-empty 'conversations' list")
    values = []
    for position, message in enumerate(conversation):
        if not isinstance(message, dict):
            raise BadSample("bad_json", f"conversation message {position} is a {type(message).__name__}, "
                            f"not an object with 'from' and 'value'")
        role, expected = message.get("from"), CHAT_USER if position % 2 == 0 else CHAT_ASSISTANT
        if role not in CHAT_USER + CHAT_ASSISTANT:
            raise BadSample("bad_json", f"conversation message {position} is from {role!r:.40}, expected "
                            f"one of {', '.join(CHAT_USER + CHAT_ASSISTANT)}")
        if role not in expected:
            raise BadSample("bad_json", f"conversation message {position} is from {role!r}: messages "
                            f"alternate, the user's first")
        values.append(_nonblank_str(message.get("value"), f"conversation message {position}'s value"))
    if len(values) % 2:
        raise BadSample("bad_json", "the conversation ends with the user's message, not the assistant's answer")
    turns = list(zip(values[::2], values[1::2]))

    system = meta.get("system", "chat")
    if system not in CHAT_SYSTEMS:
        raise BadSample("bad_json", f"chat system {system!r:.40} is not one of {', '.join(CHAT_SYSTEMS)}")

    names = meta.get("images")
    if names is None:  # the sample's one image member, whatever its name ("jpg", "0.jpg", ...)
        found = sorted(k for k in members if k.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS)
        if len(found) > 1:
            raise BadSample("bad_json", f"chat sample with several image members ({', '.join(found[:4])}) "
                            f"and no 'images' list saying their order")
        images = [members[k] for k in found]
    elif not isinstance(names, list):
        raise BadSample("bad_json", f"chat 'images' must be a list of member names, got {names!r:.80}")
    elif len(names) > MAX_CHAT_IMAGES:
        raise BadSample("bad_json", f"chat 'images' names {len(names)} images, more than {MAX_CHAT_IMAGES}")
    else:
        images = []
        for j, name in enumerate(names):
            name = _nonblank_str(name, f"chat image {j}").lower()
            if name not in members:
                raise BadSample("missing_member", f"chat image {name!r} is not in the sample")
            images.append(members[name])

    for i, (_, answer) in enumerate(turns):
        if IMAGE_MARKER in answer:
            raise BadSample("bad_json", f"answer {i} holds an {IMAGE_MARKER} marker (images go in the instructions)")
    markers = sum(instruction.count(IMAGE_MARKER) for instruction, _ in turns)
    if markers == 0 and images:
        turns[0] = (f"{IMAGE_MARKER}\n" * len(images) + turns[0][0], turns[0][1])
    elif markers != len(images):
        raise BadSample("bad_json", f"{markers} {IMAGE_MARKER} markers in the instructions for {len(images)} images")
    return turns, images, system


def measure_decode_speed(jpegs: list[bytes], image_size: int, backend: str, seconds: float = 2.0,
                         batch_size: int = 32) -> float:
    """Images per second that one `Decoder` (one thread) decodes from `jpegs` on the CPU,
    cycling through them for about `seconds` after one warm-up batch."""
    decoder = Decoder("image_text", image_size, backend=backend, log=None, batch_size=batch_size)
    samples = [(str(i), {"jpg": data, "txt": b"x"}) for i, data in enumerate(jpegs)]
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    decoder.decode_batch(batches[0])
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in batches:
            n += sum(r is not None for r in decoder.decode_batch(batch))
    return n / (time.perf_counter() - start)
