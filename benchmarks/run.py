"""Run a benchmark suite and write its report.

    python -m benchmarks.run --suite cpu|gpu-quick|gpu-full [--out DIR] [--only NAME ...]

Each module in `MODULES` declares the suites it belongs to (`SUITES`) and measures with
`run(suite, out_dir)`. A module that is not in the suite, or that needs what the machine lacks
(a GPU, an optional package), is skipped with the reason in the report; one that fails is
reported as failed and the others still run. The report goes to DIR (default
benchmarks/results/<device>-<date>/): report.json, report.md and PNG plots.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import re
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.common import REPO, BenchResult, environment
from benchmarks.report import ratio_rows, write_report

SUITE_NAMES = ("cpu", "gpu-quick", "gpu-full")
# Module names under benchmarks/, in the order they run.
MODULES = ("packer", "data", "head_loss", "pool_project", "attention", "spatiotemporal_conv", "group_norm",
           "video_unet", "train_step")


def default_out_dir(device: str, suite: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:40]
    return REPO / "benchmarks" / "results" / f"{slug}-{suite}-{dt.date.today().isoformat()}"


def run_suite(suite: str, out_dir: Path, only: list[str] | None = None) -> dict:
    if suite not in SUITE_NAMES:
        raise ValueError(f"--suite must be one of {SUITE_NAMES}, got {suite!r}")
    if suite != "cpu" and not torch.cuda.is_available():
        print(f"note: suite {suite} asks for a GPU and none is visible; GPU parts will be skipped",
              file=sys.stderr)
    unknown = sorted(set(only or ()) - set(MODULES))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; expected some of {list(MODULES)}")
    if torch.cuda.is_available():  # every module allocates as training does
        from emu2_engine.train.trainer import prefer_expandable_segments
        prefer_expandable_segments()
    report = {"suite": suite, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "environment": environment(), "benchmarks": {}}
    for name in MODULES:
        if only and name not in only:
            continue
        start = time.perf_counter()
        entry: dict = {"measurements": [], "ours": "", "skipped": [], "plots": [], "error": None}
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            if suite not in getattr(module, "SUITES", ()):
                entry["skipped"].append(f"not part of the {suite} suite")
            else:
                print(f"[{name}] running ...", file=sys.stderr, flush=True)
                result: BenchResult = module.run(suite, out_dir)
                entry.update(result.to_dict())
        except Exception as e:  # one failing benchmark must not lose the others' numbers
            entry["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        entry["seconds"] = time.perf_counter() - start
        report["benchmarks"][name] = entry
    return report


def summary(report: dict) -> str:
    """The short table printed last: every ratio of ours against a baseline, and failures."""
    lines = [f"suite {report['suite']} on {report['environment']['device']}"]
    for name, bench in report["benchmarks"].items():
        if bench.get("error"):
            lines.append(f"  {name}: FAILED {bench['error']}")
            continue
        ratios = ratio_rows(bench)
        if not bench["measurements"]:
            lines.append(f"  {name}: skipped ({'; '.join(bench['skipped']) or 'nothing measured'})")
        for case, metric, baseline, r in ratios:
            lines.append(f"  {name:<13} {case:<42} {metric:<12} vs {baseline:<10} {r:6.2f}x")
        if bench["measurements"] and not ratios:
            for m in bench["measurements"][:6]:
                lines.append(f"  {name:<13} {m['case']:<42} {m['metric']:<12} {m['provider']:<10} "
                             f"{m['value']:.4g} {m['unit']}")
        # a case that failed inside a module that went on (noted "<case>: FAILED <error>")
        lines += [f"  {name}: {reason}" for reason in bench["skipped"] if ": FAILED " in reason]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", required=True, choices=SUITE_NAMES)
    parser.add_argument("--out", type=Path, help="report folder (default benchmarks/results/<device>-<suite>-<date>)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these of {list(MODULES)}")
    args = parser.parse_args(argv)
    env_device = environment()["device"]
    out_dir = args.out or default_out_dir(env_device, args.suite)
    try:
        report = run_suite(args.suite, out_dir, args.only)
    except ValueError as e:
        parser.error(str(e))
    paths = write_report(report, out_dir)
    print("\n".join(f"wrote {p}" for p in paths))
    print(summary(report))
    return 1 if any(b.get("error") for b in report["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
