"""CPU benchmark of the sequence packer: the C++ best-fit-decreasing packer against the
Python reference, on lengths shaped like real data (16..row_len tokens, most of them short).

    python -m benchmarks.packer [--n 1000000] [--row-len 2048]

Prints the times, the speedup (goal: >= 20x) and the fill, and writes
benchmarks/results/cpu-packer.json with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from benchmarks.common import BenchResult
from emu2_engine import _C
from emu2_engine.data.packing import pack_sequences, pack_sequences_reference

RESULTS = Path(__file__).resolve().parent / "results"


def sample_lengths(n: int, row_len: int, seed: int = 0) -> np.ndarray:
    """Log-normal lengths, median row_len / 10, clipped to [16, row_len]: mostly short
    captions and a tail of long interleaved documents."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(row_len / 10), 1.0, n))
    return np.clip(lengths, min(16, row_len), row_len).astype(np.int64)


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        result = None  # the previous result is freed outside the timed region
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


SUITES = ("cpu",)


def run(suite: str, out_dir: Path) -> BenchResult:
    """For the harness: time against sample count (10k, 100k, 1M) at rows of 2048."""
    result = BenchResult(ours="cpp", plots=[{"name": "time", "metric": "time", "x": "samples",
                                             "logx": True, "logy": True,
                                             "title": "packer: time to pack (rows of 2048)"}])
    for n in (10_000, 100_000, 1_000_000):
        report = measure(n, 2048)
        case = f"n={n:,} row_len=2048"
        for provider, key in (("cpp", "cpp_pack_sequences"), ("python", "python_reference")):
            result.add(benchmark="packer", case=case, provider=provider, metric="time",
                       value=report["seconds"][key] * 1e3, unit="ms", params={"samples": n})
        result.add(benchmark="packer", case=case, provider="cpp", metric="fill",
                   value=100 * report["fill_fraction"], unit="%", params={"samples": n})
    return result


def measure(n: int, row_len: int) -> dict:
    """Times both packers on n lengths; refuses to report if they disagree."""
    args = argparse.Namespace(n=n, row_len=row_len)
    lengths = sample_lengths(args.n, args.row_len)
    core_s, (row_offsets, _) = best_time(lambda: _C.pack_best_fit(lengths, args.row_len), 5)
    public_s, rows = best_time(lambda: pack_sequences(lengths, args.row_len), 3)
    reference_s, reference_rows = best_time(lambda: pack_sequences_reference(lengths, args.row_len), 1)
    if rows != reference_rows:
        raise RuntimeError("the C++ packer and the Python reference disagree")

    tokens = int(lengths.sum())
    report = {
        "benchmark": "sequence packer, best-fit decreasing",
        "device": f"CPU: {cpu_name()} ({os.cpu_count()} logical cores; the packer uses one)",
        "machine": {"processor": platform.processor(), "cpu_name": cpu_name(),
                    "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "numpy": np.__version__},
        "n_samples": args.n,
        "row_len": args.row_len,
        "lengths": {"min": int(lengths.min()), "median": float(np.median(lengths)),
                    "mean": float(lengths.mean()), "max": int(lengths.max())},
        "rows": len(rows),
        "rows_lower_bound": -(-tokens // args.row_len),
        "fill_fraction": tokens / (len(rows) * args.row_len),
        "seconds": {"cpp_core_csr": core_s, "cpp_pack_sequences": public_s,
                    "python_reference": reference_s},
        "speedup_pack_sequences_vs_reference": reference_s / public_s,
        "speedup_cpp_core_vs_reference": reference_s / core_s,
        "identical_to_reference": True,
    }
    assert len(row_offsets) - 1 == len(rows)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of samples")
    parser.add_argument("--row-len", type=int, default=2048, help="tokens per packed row")
    args = parser.parse_args(argv)
    report = measure(args.n, args.row_len)
    core_s, public_s = report["seconds"]["cpp_core_csr"], report["seconds"]["cpp_pack_sequences"]
    reference_s, rows = report["seconds"]["python_reference"], report["rows"]

    print(f"{args.n} samples, rows of {args.row_len} tokens, on {report['device']}")
    print(f"  C++ core (CSR arrays)        {core_s * 1e3:9.1f} ms")
    print(f"  pack_sequences (C++ + lists) {public_s * 1e3:9.1f} ms")
    print(f"  Python reference             {reference_s * 1e3:9.1f} ms")
    print(f"  speedup: {report['speedup_pack_sequences_vs_reference']:.1f}x (pack_sequences), "
          f"{report['speedup_cpp_core_vs_reference']:.1f}x (core); goal >= 20x")
    print(f"  rows {rows} (lower bound {report['rows_lower_bound']}), "
          f"fill {report['fill_fraction']:.4%}; identical to the reference")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "cpu-packer.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"  wrote {out}")
    return report


if __name__ == "__main__":
    main()
