"""CPU benchmark of the data loader: decode + build + pack of the shapes world, and the packer
on 1M samples with the lengths the loader really produces.

    python -m benchmarks.data [--seconds 5]

- Loader throughput: `PackedLoader` over `ShardStream`s of the shapes world (64 px JPEGs, VP9
  videos), in one thread (torch and DALI both set to one thread), so the rates are per core.
  Two blends: image-caption pairs alone (the issue's target: >= 200 images/s per core), and
  80 % pairs with 5 % each of videos, grounded pairs, interleaved documents and texts. Each with DALI's CPU pipeline and with the
  PIL/PyAV path, and, for scale, the same streams decoded without building or packing.
- Packer: the C++ best-fit-decreasing packer against its Python reference
  (`benchmarks.packer.measure`'s timing rule) on 1M sample lengths resampled from the
  loader's own samples, rows of the debug preset's 256 tokens.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import BenchResult, device_name
from benchmarks.packer import best_time
from emu2_engine.data.decode import Decoder, dali_available
from emu2_engine.data.loader import PackedLoader, shapes_world_root
from emu2_engine.data.packing import pack_sequences, pack_sequences_reference
from emu2_engine.data.shards import ShardStream
from emu2_engine.data.tokenizer import Emu2Tokenizer
from emu2_engine.models import Emu2Config
from emu2_engine.train.config import JobConfig

SUITES = ("cpu",)

BLENDS = {
    "image-caption": (["image_text"], [1.0]),
    "every kind": (["image_text", "video_text", "grounded", "interleaved", "text"],
                   [0.8, 0.05, 0.05, 0.05, 0.05]),
}


def _streams(cfg, root: Path, image_size: int, backend: str) -> list[ShardStream]:
    return [ShardStream(root / kind / "train",
                        Decoder(kind, image_size, n_frames=cfg.video_frames, backend=backend,
                                log=None, num_threads=1),
                        seed=cfg.seed, log=None)
            for kind in cfg.datasets]


def doc_lengths(batch) -> list[int]:
    """Token count of every document packed in a batch."""
    out = []
    for row in batch.doc_ids:
        out += torch.bincount(row[row >= 0].long()).tolist()
    return out


def loader_rates(blend: str, backend: str, seconds: float) -> dict:
    """Samples/s, images/s and batches/s of the whole loader, and records/s of decoding alone."""
    cfg = JobConfig.load(None).data
    kinds, weights = BLENDS[blend]
    cfg = replace(cfg, datasets=kinds, weights=weights, paths=[""] * len(kinds))
    model = Emu2Config.from_preset("debug")
    root = shapes_world_root(cfg)
    loader = PackedLoader(Emu2Tokenizer(), model, cfg,
                          _streams(cfg, root, model.vision.image_size, backend))
    next(loader)  # warm-up: DALI builds its pipelines on first use
    start, images, samples, batches = time.perf_counter(), 0, 0, 0
    while time.perf_counter() - start < seconds:
        batch = next(loader)
        images += batch.n_images
        samples += len(doc_lengths(batch))
        batches += 1
    elapsed = time.perf_counter() - start
    # decoding alone: the same streams, records drawn in the blend's proportions
    streams = _streams(cfg, root, model.vision.image_size, backend)
    for stream in streams:
        next(stream)
    share = np.asarray(weights) / sum(weights)
    start, decoded = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 2:
        for stream, w in zip(streams, share):
            for _ in range(max(1, round(20 * w))):
                next(stream)
                decoded += 1
    return {"samples_per_s": samples / elapsed, "images_per_s": images / elapsed,
            "batches_per_s": batches / elapsed,
            "decode_records_per_s": decoded / (time.perf_counter() - start)}


def sample_lengths(n: int, batches: int = 40) -> np.ndarray:
    """n lengths resampled from the documents the debug blend's loader packs."""
    cfg = JobConfig.load(None).data
    model = Emu2Config.from_preset("debug")
    loader = PackedLoader(Emu2Tokenizer(), model, cfg,
                          _streams(cfg, shapes_world_root(cfg), model.vision.image_size, "pil"))
    seen = [length for _ in range(batches) for length in doc_lengths(next(loader))]
    return np.random.default_rng(0).choice(np.asarray(seen, dtype=np.int64), size=n)


def packer_rates(n: int, row_len: int) -> dict:
    lengths = sample_lengths(n)
    cpp_s, rows = best_time(lambda: pack_sequences(lengths, row_len), 3)
    ref_s, ref_rows = best_time(lambda: pack_sequences_reference(lengths, row_len), 1)
    if rows != ref_rows:
        raise RuntimeError("the C++ packer and the Python reference disagree")
    return {"cpp_s": cpp_s, "python_s": ref_s, "rows": len(rows),
            "fill": float(lengths.sum()) / (len(rows) * row_len),
            "median_length": float(np.median(lengths))}


def run(suite: str, out_dir: Path, seconds: float = 4.0) -> BenchResult:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = BenchResult(ours="dali")
        backends = ["dali", "pil"] if dali_available() else ["pil"]
        if not dali_available():
            result.skipped.append("DALI is not installed: PIL/PyAV path only")
        for blend in BLENDS:
            for backend in backends:
                rates = loader_rates(blend, backend, seconds)
                case = f"decode+build+pack, {blend}, 1 core"
                for metric, unit in (("images_per_s", "images/s"), ("samples_per_s", "samples/s"),
                                     ("decode_records_per_s", "records/s")):
                    result.add(benchmark="data", case=case if metric != "decode_records_per_s"
                               else f"decode only, {blend}, 1 core", provider=backend,
                               metric="throughput", value=rates[metric], unit=unit)
        pack = packer_rates(1_000_000, 256)
        case = "packer, 1M shapes-world samples, rows of 256"
        result.add(benchmark="data", case=case, provider="cpp", metric="time",
                   value=pack["cpp_s"] * 1e3, unit="ms", params={"samples": 1_000_000})
        result.add(benchmark="data", case=case, provider="python", metric="time",
                   value=pack["python_s"] * 1e3, unit="ms", params={"samples": 1_000_000})
        result.add(benchmark="data", case=case, provider="cpp", metric="fill",
                   value=100 * pack["fill"], unit="%", params={"samples": 1_000_000})
        return result
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="timing window per case")
    args = parser.parse_args(argv)
    result = run("cpu", Path("."), args.seconds)
    print(f"on {device_name()}, one thread")
    for m in result.measurements:
        print(f"  {m.case:<55} {m.provider:<7} {m.value:10.1f} {m.unit}")
    for line in result.skipped:
        print(f"  skipped: {line}")


if __name__ == "__main__":
    main()
