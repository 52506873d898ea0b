"""Turn collected measurements into report.json, report.md and PNG plots.

Works from the JSON alone (`write_report(report, out_dir)`), so a report recorded on a GPU can
be re-rendered anywhere, and tests render a recorded fixture.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

# Metrics where a larger value is better; for the others (time, memory) smaller is better.
_HIGHER_IS_BETTER = {"tflops", "throughput", "mfu", "of_peak", "bandwidth"}


def _fmt(value: float) -> str:
    if value == 0 or 0.01 <= abs(value) < 100_000:
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:.3g}"


def ratio_rows(bench: dict) -> list[tuple[str, str, str, float]]:
    """(case, metric, baseline, ours-vs-baseline ratio) for every case measured by ours and a
    baseline; a ratio > 1 always means ours is better (faster, less memory, more FLOP/s)."""
    ours = bench.get("ours")
    if not ours:
        return []
    table: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for m in bench["measurements"]:
        table[(m["case"], m["metric"])][m["provider"]] = m["value"]
    rows = []
    for (case, metric), by_provider in table.items():
        if ours not in by_provider or by_provider[ours] == 0:
            continue
        for provider, value in sorted(by_provider.items()):
            if provider == ours or value == 0:
                continue
            mine = by_provider[ours]
            rows.append((case, metric, provider, mine / value if metric in _HIGHER_IS_BETTER else value / mine))
    return rows


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Benchmark report: suite `{report['suite']}`", "",
             f"- device: **{env.get('device')}**", f"- date: {report.get('date')}",
             f"- torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
             f"driver {env.get('driver')}, Python {env.get('python')}",
             f"- commit: `{env.get('git_commit')}`", ""]
    for name, bench in report["benchmarks"].items():
        lines += [f"## {name}", ""]
        if bench.get("error"):
            lines += [f"**failed**: `{bench['error']}`", ""]
        by_case: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
        providers: list[str] = []
        for m in bench["measurements"]:
            by_case[(m["case"], m["metric"], m["unit"])][m["provider"]] = m["value"]
            if m["provider"] not in providers:
                providers.append(m["provider"])
        if by_case:
            lines += ["| case | metric | " + " | ".join(providers) + " |",
                      "|---|---|" + "---|" * len(providers)]
            for (case, metric, unit), values in by_case.items():
                cells = [_fmt(values[p]) if p in values else "" for p in providers]
                lines.append(f"| {case} | {metric} ({unit}) | " + " | ".join(cells) + " |")
            lines.append("")
        ratios = ratio_rows(bench)
        if ratios:
            lines += [f"Ratios of `{bench['ours']}` against each baseline (> 1: ours is better):", "",
                      "| case | metric | baseline | ratio |", "|---|---|---|---|"]
            lines += [f"| {c} | {m} | {p} | {r:.2f}x |" for c, m, p, r in ratios]
            lines.append("")
        for reason in bench.get("skipped", []):
            lines.append(f"- skipped: {reason}")
        if bench.get("skipped"):
            lines.append("")
        lines.append(f"_{bench.get('seconds', 0):.1f} s_")
        lines.append("")
    return "\n".join(lines)


def _bar_plot(bench_name: str, bench: dict, request: dict, path: Path) -> bool:
    """Grouped bars: `metric` per case, one bar per provider (e.g. a step's time per phase)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, providers = request["metric"], request.get("providers")
    values: dict[str, dict[str, float]] = defaultdict(dict)
    unit = ""
    for m in bench["measurements"]:
        if m["metric"] == metric and (providers is None or m["provider"] in providers):
            values[m["case"]][m["provider"]] = m["value"]
            unit = m["unit"]
    if not values:
        return False
    cases = list(values)
    names = providers or sorted({p for v in values.values() for p in v})
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for j, name in enumerate(names):
        ax.bar([i + j * width for i in range(len(cases))], [values[c].get(name, 0.0) for c in cases],
               width=width, label=name)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(cases))], cases, fontsize=8)
    ax.set_ylabel(f"{metric} ({unit})")
    ax.set_title(request.get("title", f"{bench_name}: {metric}"))
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot(bench_name: str, bench: dict, request: dict, path: Path) -> bool:
    """One figure: `metric` against params[`x`] per provider (optionally filtered by `where`),
    or grouped bars per case with kind = "bar"."""
    if request.get("kind") == "bar":
        return _bar_plot(bench_name, bench, request, path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, x = request["metric"], request["x"]
    where = request.get("where", {})
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    unit = ""
    for m in bench["measurements"]:
        if m["metric"] != metric or x not in m["params"]:
            continue
        if any(m["params"].get(k) != v for k, v in where.items()):
            continue
        series[m["provider"]].append((m["params"][x], m["value"]))
        unit = m["unit"]
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for provider, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
    if request.get("logx"):
        ax.set_xscale("log", base=request["logx"] if request["logx"] is not True else 10)
    if request.get("logy"):
        ax.set_yscale("log")
    ax.set_xlabel(request.get("xlabel", x))
    ax.set_ylabel(f"{metric} ({unit})")
    ax.set_title(request.get("title", f"{bench_name}: {metric}"))
    ax.grid(True, alpha=0.3)
    ax.legend(title="provider")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """Write report.json, report.md and the requested plots into out_dir; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("report.json", json.dumps(report, indent=2)), ("report.md", markdown(report))):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out_dir / name)
        written.append(out_dir / name)
    for bench_name, bench in report["benchmarks"].items():
        for i, request in enumerate(bench.get("plots", [])):
            path = out_dir / f"{bench_name}-{request.get('name', i)}.png"
            if plot(bench_name, bench, request, path):
                written.append(path)
    return written
