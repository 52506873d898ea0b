"""Compare two benchmark reports: `python -m benchmarks.compare A B` prints, for every
(benchmark, case, provider, metric) measured in both, B's value over A's.

A and B are report.json files or the folders that hold them. Ratios across different devices
compare machines, not code: the header says which devices the numbers came from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: Path) -> dict:
    path = path / "report.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such report (expected report.json or its folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a JSON report: {e}") from None


def _values(report: dict) -> dict[tuple, tuple[float, str]]:
    out = {}
    for name, bench in report["benchmarks"].items():
        for m in bench.get("measurements", []):
            out[(name, m["case"], m["provider"], m["metric"])] = (m["value"], m["unit"])
    return out


def compare(a: dict, b: dict) -> list[str]:
    lines = [f"A: {a['environment']['device']} ({a['environment'].get('git_commit')}, {a.get('date')})",
             f"B: {b['environment']['device']} ({b['environment'].get('git_commit')}, {b.get('date')})"]
    if a["environment"]["device"] != b["environment"]["device"]:
        lines.append("note: different devices; the ratios compare machines as well as code")
    va, vb = _values(a), _values(b)
    common = [k for k in va if k in vb]
    if not common:
        lines.append("no measurement appears in both reports")
    for key in common:
        (x, unit), (y, _) = va[key], vb[key]
        ratio = f"{y / x:8.3f}" if x else "     n/a"
        lines.append(f"{key[0]:<12} {key[1]:<40} {key[2]:<12} {key[3]:<12} "
                     f"{x:>12.4g} -> {y:<12.4g} {unit:<12} B/A {ratio}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    try:
        print("\n".join(compare(load(args.a), load(args.b))))
    except (FileNotFoundError, ValueError) as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
