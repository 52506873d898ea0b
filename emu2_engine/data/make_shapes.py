"""Write the shapes world as WebDataset shards (`python -m emu2_engine.data.make_shapes`).

Layout, for each kind in KINDS and split in SPLITS:
`out_dir/<kind>/<split>/<kind>-<split>-NNNNN.tar`, plus `out_dir/manifest.json` (seed,
version, counts per kind and split, the shard list, sha256 and size of every shard).
Members follow img2dataset's webdataset layout: a sample is the run of members sharing a key
(`000010003.jpg`, `000010003.txt`, `000010003.json`); keys are `<shard:05d><index:04d>`.

| kind | members |
|---|---|
| image_text | `.jpg`, `.txt` (caption), `.json` (img2dataset fields + the shapes) |
| video_text | `.webm` (VP9, 16 frames at 8 fps), `.txt`, `.json` |
| interleaved | `.json` `{"texts": [...], "images": [...]}` (OBELICS-style: aligned lists, one of the two null at each position; an image entry names its member, e.g. "0.jpg") + `.0.jpg`, `.1.jpg`, ... |
| grounded | `.jpg`, `.json` (GRIT-style: `caption`, `noun_chunks` = [start, end, x0, y0, x1, y1, score] with boxes in [0, 1]) |
| vqa | `.jpg`, `.json` (VQAv2-style: `question`, `answers` = 10 x {answer, answer_confidence, answer_id}, `multiple_choice_answer`) |
| chat | `.jpg`, `.json` (LLaVA-style: `system` "chat", `conversations` = [{from: "human", value: "<image>\\n" + instruction}, {from: "gpt", value: answer}, ...], 1-3 turns, the marker in the first instruction only) |
| text | `.txt` |
| edit | `.source.jpg`, `.edited.jpg`, `.json` (`key`, `instruction`, e.g. "make the red circle blue.", `source_caption`, `edited_caption`) |

Same seed, same bytes: tar headers are fixed (mtime 0, uid/gid 0, no user names, mode 0644,
ustar), members are written in sorted order, JSON with sorted keys, JPEG through PIL (no
optimiser, no timestamps), VP9 through PyAV's libvpx-vp9 with one thread, realtime deadline
and the `bitexact` flags (without them the WebM muxer writes a random segment UID, so the
bytes differ run to run). The bytes are the same on one software stack; another libjpeg or
libvpx build may encode differently, which is why the manifest records hashes.

Generating the default world (about 20 MB, most of it tar headers and padding of small
members) takes 2-3 s on one core of the 2-core development machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

from emu2_engine.cli import ArgumentParser
from emu2_engine.data.records import IMAGE_MARKER
from emu2_engine.data.shapes import ShapesWorld

VERSION = 1
KINDS = ("image_text", "video_text", "interleaved", "grounded", "vqa", "chat", "text", "edit")
SPLITS = ("train", "heldout")
# Samples per kind and split at scale 1, and samples per shard (fixed, so scale adds shards).
COUNTS = {
    "image_text": {"train": 2000, "heldout": 200},
    "video_text": {"train": 300, "heldout": 50},
    "interleaved": {"train": 300, "heldout": 50},
    "grounded": {"train": 300, "heldout": 50},
    "vqa": {"train": 300, "heldout": 100},
    "chat": {"train": 300, "heldout": 50},
    "text": {"train": 300, "heldout": 50},
    "edit": {"train": 300, "heldout": 50},
}
SHARD_SIZE = {"image_text": 400, "video_text": 100, "interleaved": 100, "grounded": 100,
              "vqa": 100, "chat": 100, "text": 100, "edit": 100}
# Held-out samples are drawn from indices far above any training index.
HELDOUT_START = 1 << 32
IMAGE_SIZE = 64  # the debug model's resolution; decoding resizes to any model's
JPEG_QUALITY = 90
VIDEO_FRAMES, VIDEO_FPS = 16, 8


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB image (baseline, no optimiser: the same image gives the same bytes)."""
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def encode_webm(frames: list[Image.Image] | tuple[Image.Image, ...], fps: int = VIDEO_FPS) -> bytes:
    """A VP9 WebM of RGB frames, byte-identical for identical frames (see the module docstring).

    Realtime speed 8 with no look-ahead: every frame is one packet (no hidden alt-ref
    frames), and a 16-frame 64 px clip encodes in about 2 ms."""
    if not frames:
        raise ValueError("encode_webm needs at least one frame, got none")
    width, height = frames[0].size
    out = io.BytesIO()
    with av.open(out, mode="w", format="webm", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.thread_count = 1
        stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b:v": "0",
                          "lag-in-frames": "0", "row-mt": "0", "flags": "+bitexact"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame.convert("RGB")),
                                                                   format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def _json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def write_tar(path: str | Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write `samples` ((key, {extension: bytes})) as one tar with deterministic headers.

    Samples are written in the given order, each sample's members sorted by extension."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                data = members[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))


def _image_json(key: str, caption: str, sample) -> dict:
    """img2dataset's per-sample JSON fields, plus the drawn shapes (kind, colour, pixel box)."""
    width, height = sample.image.size
    return {"key": key, "caption": caption, "status": "success", "error_message": None,
            "width": width, "height": height, "original_width": width, "original_height": height,
            "shapes": [{"kind": s.kind, "colour": s.colour, "box": list(s.box), "position": s.position}
                       for s in sample.shapes]}


def sample_members(world: ShapesWorld, kind: str, index: int, key: str,
                   image_size: int = IMAGE_SIZE) -> dict[str, bytes]:
    """The shard members ({extension: bytes}) of item `index` of `kind`."""
    if kind == "image_text":
        sample = world.sample(index, image_size)
        return {"jpg": encode_jpeg(sample.image), "txt": sample.caption.encode("utf-8"),
                "json": _json(_image_json(key, sample.caption, sample))}
    if kind == "video_text":
        video = world.video(index, image_size, VIDEO_FRAMES)
        meta = {"key": key, "caption": video.caption, "status": "success", "error_message": None,
                "width": image_size, "height": image_size, "frames": VIDEO_FRAMES, "fps": VIDEO_FPS,
                "codec": "vp9"}
        return {"webm": encode_webm(video.frames), "txt": video.caption.encode("utf-8"),
                "json": _json(meta)}
    if kind == "interleaved":
        members, texts, images = {}, [], []
        for item in world.document(index, image_size).items:
            if isinstance(item, str):
                texts.append(item)
                images.append(None)
            else:
                name = f"{sum(x is not None for x in images)}.jpg"
                members[name] = encode_jpeg(item.image)
                texts.append(None)
                images.append(name)
        members["json"] = _json({"key": key, "texts": texts, "images": images})
        return members
    if kind == "grounded":
        grounded = world.grounded(index, image_size)
        chunks = [[p.start, p.end, *box, 1.0] for p in grounded.phrases for box in p.boxes]
        meta = {"key": key, "caption": grounded.sample.caption, "noun_chunks": chunks,
                "width": image_size, "height": image_size}
        return {"jpg": encode_jpeg(grounded.sample.image), "json": _json(meta)}
    if kind == "vqa":
        item = world.vqa(index, image_size)
        answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                   for i, a in enumerate(item.answers)]
        meta = {"key": key, "question_id": index, "question": item.question, "answers": answers,
                "multiple_choice_answer": item.answer}
        return {"jpg": encode_jpeg(item.sample.image), "json": _json(meta)}
    if kind == "chat":
        item = world.chat(index, image_size)
        conversation = []
        for i, (instruction, answer) in enumerate(item.turns):
            marker = f"{IMAGE_MARKER}\n" if i == 0 else ""
            conversation += [{"from": "human", "value": marker + instruction}, {"from": "gpt", "value": answer}]
        meta = {"key": key, "system": "chat", "conversations": conversation}
        return {"jpg": encode_jpeg(item.sample.image), "json": _json(meta)}
    if kind == "text":
        return {"txt": world.paragraph(index).encode("utf-8")}
    if kind == "edit":
        item = world.edit(index, image_size)
        meta = {"key": key, "instruction": item.instruction, "source_caption": item.source.caption,
                "edited_caption": item.edited.caption}
        return {"source.jpg": encode_jpeg(item.source.image), "edited.jpg": encode_jpeg(item.edited.image),
                "json": _json(meta)}
    raise ValueError(f"unknown shapes-world kind {kind!r}; expected one of {KINDS}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_shapes_world(out_dir: str | Path, seed: int, scale: int = 1,
                       image_size: int = IMAGE_SIZE) -> dict:
    """Write every kind and split of the shapes world under `out_dir`; return the manifest.

    `out_dir` must be empty or absent. `scale` multiplies every sample count (shard sizes
    stay fixed, so a larger world has more shards). Training items of a kind are indices
    0..n-1 of that kind's generator (image_text train sample i is `ShapesWorld(seed).sample(i)`),
    held-out items are indices HELDOUT_START + i."""
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; write_shapes_world writes into an empty or new directory")
    world = ShapesWorld(seed)
    manifest = {"name": "shapes-world", "version": VERSION, "seed": seed, "scale": scale,
                "image_size": image_size, "video": {"frames": VIDEO_FRAMES, "fps": VIDEO_FPS, "codec": "vp9"},
                "counts": {}, "shards": {}, "sha256": {}, "bytes": {}}
    for kind in KINDS:
        manifest["counts"][kind], manifest["shards"][kind] = {}, {}
        for split in SPLITS:
            count, per_shard = COUNTS[kind][split] * scale, SHARD_SIZE[kind]
            first = 0 if split == "train" else HELDOUT_START
            folder = out / kind / split
            folder.mkdir(parents=True, exist_ok=True)
            names = []
            for shard, start in enumerate(range(0, count, per_shard)):
                samples = []
                for i in range(start, min(start + per_shard, count)):
                    key = f"{shard:05d}{i - start:04d}"
                    samples.append((key, sample_members(world, kind, first + i, key, image_size)))
                path = folder / f"{kind}-{split}-{shard:05d}.tar"
                write_tar(path, samples)
                name = path.relative_to(out).as_posix()
                names.append(name)
                manifest["sha256"][name], manifest["bytes"][name] = _sha256(path), path.stat().st_size
            manifest["counts"][kind][split] = count
            manifest["shards"][kind][split] = names
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def verify_shapes_world(root: str | Path, seed: int | None = None, scale: int | None = None) -> dict:
    """The manifest of the world under `root`, after checking that it is complete: this
    VERSION, the given seed and scale (when not None), every shard present with the recorded
    size and sha256. Raises ValueError saying what is wrong."""
    root = Path(root)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{root} has no readable manifest.json ({e})") from None
    expected = {"version": VERSION, "seed": seed, "scale": scale}
    for field, value in expected.items():
        if value is not None and manifest.get(field) != value:
            raise ValueError(f"{root}: manifest {field} is {manifest.get(field)!r}, expected {value!r}")
    missing = [kind for kind in KINDS if kind not in manifest.get("shards", {})]
    if missing:  # written before these kinds existed (the others' bytes are unchanged)
        raise ValueError(f"{root}: the world has no {', '.join(missing)} shards")
    for name, digest in manifest["sha256"].items():
        path = root / name
        if not path.is_file() or path.stat().st_size != manifest["bytes"][name]:
            raise ValueError(f"{root}: shard {name} is missing or has the wrong size")
        if _sha256(path) != digest:
            raise ValueError(f"{root}: shard {name} does not match its sha256 in the manifest")
    return manifest


def ensure_shapes_world(cache_dir: str | Path, seed: int = 0, scale: int = 1) -> Path:
    """The root of the shapes world for (seed, scale) under `cache_dir`, generated on first use.

    The world is written into a temporary directory beside its final place and renamed
    into place only when complete, so a crash never leaves a half-written dataset; an
    existing directory that fails `verify_shapes_world` is moved aside and regenerated.
    Two processes racing to create it both end up with the same complete copy."""
    cache = Path(cache_dir)
    root = cache / f"shapes-world-v{VERSION}-seed{seed}-scale{scale}"
    if root.exists():
        try:
            verify_shapes_world(root, seed, scale)
            return root
        except ValueError:
            stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.stale-", dir=cache))
            os.replace(root, stale / "world")
            shutil.rmtree(stale, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=cache))
    try:
        write_shapes_world(tmp / "world", seed, scale)
        try:
            os.rename(tmp / "world", root)
        except OSError:  # another process finished first: keep its copy if it is complete
            verify_shapes_world(root, seed, scale)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main() -> None:
    parser = ArgumentParser(description="Write the shapes world as WebDataset shards.")
    parser.add_argument("--out", required=True, help="output directory (empty or new)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=1, help="multiply every sample count by this")
    args = parser.parse_args()
    if not args.out.strip():
        parser.error("--out must name a folder, got ''")
    if not 0 <= args.seed < 2 ** 63:
        parser.error(f"--seed must lie in [0, 2**63), got {args.seed}")
    start = time.perf_counter()
    try:
        manifest = write_shapes_world(args.out, args.seed, args.scale)
    except (ValueError, OSError) as e:  # not empty, a bad scale, a path that cannot be made
        parser.error(str(e))
    total = sum(manifest["bytes"].values())
    counts = ", ".join(f"{k} {v['train']}+{v['heldout']}" for k, v in manifest["counts"].items())
    print(f"wrote {len(manifest['bytes'])} shards, {total / 1e6:.1f} MB, to {args.out} in "
          f"{time.perf_counter() - start:.1f} s (train+heldout: {counts})")


if __name__ == "__main__":
    main()
