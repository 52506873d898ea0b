"""What every benchmark module shares: the measurement record, timers, and machine facts.

A benchmark module exposes ``SUITES`` (the suites it belongs to) and
``run(suite: str, out_dir: Path) -> BenchResult``. `benchmarks.run` calls it; the report is
built from the measurements alone, so a module never formats tables or plots itself.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Measurement:
    """One number."""

    benchmark: str
    """Module that measured it (packer, attention, ...)."""
    case: str
    """What was measured, e.g. 'causal S=4096 D=128' (the rows of the report's tables)."""
    provider: str
    """Whose implementation: ours ('triton', 'cpp', 'fused') or a baseline ('sdpa', 'eager', ...)."""
    metric: str
    """time, tflops, peak_memory, throughput, mfu, ..."""
    value: float
    unit: str
    """ms, TFLOP/s, MiB, tokens/s, %, ..."""
    params: dict = field(default_factory=dict)
    """Numeric parameters of the case (S, tokens, ...), the x axes of the plots."""


@dataclass
class BenchResult:
    """What one module returns: its numbers, which provider is ours, what it skipped and why."""

    measurements: list[Measurement] = field(default_factory=list)
    ours: str = ""
    """Provider whose ratio against each baseline the report tabulates."""
    skipped: list[str] = field(default_factory=list)
    """One line per part not run on this machine, saying why."""
    plots: list[dict] = field(default_factory=list)
    """Plot requests: {"metric", "x" (a params key), "title", "logx"}; one figure each."""

    def add(self, **kw) -> None:
        self.measurements.append(Measurement(**kw))

    def to_dict(self) -> dict:
        return {"measurements": [asdict(m) for m in self.measurements], "ours": self.ours,
                "skipped": list(self.skipped), "plots": list(self.plots)}


def device_name() -> str:
    """The GPU's name, or the CPU's model name."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def environment() -> dict:
    """Versions and identity of the machine and the code."""
    env = {"device": device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cuda": torch.version.cuda, "driver": None, "triton": None}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            pass
    # the CUDA allocator's configuration: unset, `run_suite` asks for expandable segments on a
    # GPU, as the trainer does (`prefer_expandable_segments`)
    env["alloc_conf"] = next((f"{var}={os.environ[var]}" for var in ("PYTORCH_ALLOC_CONF",
                              "PYTORCH_CUDA_ALLOC_CONF") if os.environ.get(var)),
                             "expandable_segments:True (the engine's default)" if torch.cuda.is_available()
                             else "unset (no GPU)")
    # A copy of the tree sent to another machine may carry stale git metadata (the device
    # tool's does): whoever sends it can name the commit in EMU2_COMMIT.
    if os.environ.get("EMU2_COMMIT"):
        env["git_commit"] = os.environ["EMU2_COMMIT"] + " (EMU2_COMMIT)"
        return env
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        env["git_commit"] = commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        env["git_commit"] = None
    return env


HBM_BANDWIDTH = {"NVIDIA H100 80GB HBM3": 3.35e12, "NVIDIA H100 PCIe": 2.0e12,
                 "NVIDIA H100 NVL": 3.9e12, "NVIDIA H200": 4.8e12}
"""HBM bandwidth (bytes/s) by device-name prefix, from the vendors' data sheets."""


def hbm_bandwidth() -> float | None:
    """This GPU's HBM bandwidth in bytes/s, or None when it has none on record."""
    return next((v for k, v in HBM_BANDWIDTH.items() if device_name().startswith(k)), None)


def measure_gpu_shapes(result: "BenchResult", shapes: list, measure: Callable[[object], None]) -> None:
    """`measure(shape)` for each shape on the GPU, the cache emptied between them; notes in
    `result` when the device has no HBM bandwidth on record (no roofline fractions then)."""
    if hbm_bandwidth() is None:
        result.skipped.append(f"of_roofline: no HBM bandwidth on record for {device_name()}")
    for shape in shapes:
        measure(shape)
        torch.cuda.empty_cache()


def time_cpu(fn: Callable[[], object], warmup: int = 1, repeats: int = 5) -> float:
    """Median wall time of fn() in milliseconds, after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_cuda(fn: Callable[[], object], warmup: int = 5, repeats: int = 20) -> float:
    """Median time of fn() on the current CUDA stream in milliseconds (CUDA events, after
    warm-up; the L2 cache is flushed before each run so small inputs are not timed hot)."""
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# Kernel families of a profile, by substrings of the kernel's name, tried in this order: cuDNN's
# attention kernels contain "fprop" like its convolutions, which contain "gemm" (implicit GEMM).
_FAMILIES = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn", "_fwd_kernel", "_bwd_dkdv", "_bwd_dq", "_bwd_delta")),
    ("conv", ("fprop", "dgrad", "wgrad", "conv", "_tap_")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "::mm", "addmm", "bmm")),
    ("norm", ("norm",)),
    ("copy", ("copy", "transpose", "cat", "memcpy", "memset")),
)


def kernel_family(name: str) -> str:
    """conv, attention, gemm, norm, copy or other, from a CUDA kernel's name (`_FAMILIES`)."""
    lower = name.lower().replace("convert", "")  # Inductor's casts (fused_convert_element_type)
    for family, keys in _FAMILIES:
        if any(k in lower for k in keys):
            return family
    return "other"


def _idle_gaps(spans: list[tuple[float, float, str]]) -> list[tuple[float, str, str]]:
    """(idle us, last event before, event after) for every stretch of the timeline covered by
    no event (events may overlap: streams), from the first event's start to the last's end."""
    gaps = []
    busy_until, last = None, ""
    for start, end, name in sorted(spans):
        if busy_until is not None and start > busy_until:
            gaps.append((start - busy_until, last, name))
        if busy_until is None or end > busy_until:
            busy_until, last = end, name
    return gaps


def _by_shapes(prof, cuda: bool, rows: int) -> str:
    """The profiler's table of ops grouped by input shapes, sorted by self device (or CPU) time."""
    averages = prof.key_averages(group_by_input_shape=True)
    keys = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    for key in keys:
        try:
            return averages.table(sort_by=key, row_limit=rows, max_name_column_width=60,
                                  max_shapes_column_width=160)
        except (AttributeError, KeyError, ValueError):
            continue
    return "(no table: this profiler sorts by none of " + ", ".join(keys) + ")"


# CUDA runtime calls that can make the host wait for the device (a blocking copy, a
# synchronisation, or an allocation the caching allocator could not serve from its pool).
_HOST_BLOCKING = ("Synchronize", "cudaMemcpy", "cudaFree", "cudaMalloc", "cuMemAlloc", "cuMemFree")


def _host_lines(host: dict[str, list[float]], top: int) -> list[str]:
    """Markdown: the host's `top` events by self CPU time, then the runtime calls of
    `_HOST_BLOCKING` (all of them; "none" when there were none)."""
    ranked = sorted(host.items(), key=lambda kv: -kv[1][1])[:top]
    lines = ["| host ms (self) | calls | event |", "|---:|---:|---|"]
    lines += [f"| {ms:.3f} | {calls} | `{name[:100]}` |" for name, (calls, ms) in ranked]
    blocking = sorted((n, v) for n, v in host.items() if any(k in n for k in _HOST_BLOCKING))
    lines += ["", "Runtime calls that can block the host: " + (", ".join(
        f"`{n}` x{calls} ({ms:.3f} ms)" for n, (calls, ms) in blocking) or "none") + "."]
    return lines


def profile_kernels(fn: Callable[[], object], path: Path, title: str, device: str = "cuda",
                    top: int = 30) -> dict[str, float]:
    """Profile one call of fn() (after one warm-up call). On "cuda" it ranks the GPU kernels by
    total device time; on "cpu" (where there are no kernels, and tests run this path) the aten
    ops by self CPU time. Appends the `top` of them (ms, calls, family, name) under `title` to
    `path`, and returns the milliseconds per family (`kernel_family`) plus their sum, "total".
    On "cuda" it also returns "idle": the time within the profiled span (first kernel's start to
    last kernel's end) when no kernel ran, the GPU waiting on the CPU; the largest gaps go to
    `path` with the kernels on either side, to say where the CPU fell behind.

    Both return "host": the wall time until fn() returned, before any synchronisation, in a
    call of its own without the profiler (after the warm-up, before the profiled call). On
    "cuda", a host time close to the kernels' span says the CPU, not the GPU, set the pace. The
    CPU side goes to `path` too: the host's top events by self time (aten ops, CUDA runtime
    calls) and the runtime calls that can block the host (synchronisations, blocking copies,
    cudaMalloc / cudaFree), so that a sync inside the profiled call shows with its count. A
    fourth call, profiled with its input shapes recorded, gives the table by op and shapes."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()  # the host's time, without the profiler's own overhead
    fn()
    host_ms = (time.perf_counter() - start) * 1e3
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        sync()
    # The shapes in a call of their own: recording them costs the host time per op, which
    # would show as GPU idle in the call above. A failure there costs the table only.
    try:
        with profile(activities=activities, record_shapes=True) as shaped:
            fn()
            sync()
        by_shapes = _by_shapes(shaped, cuda, 25)
    except Exception as e:  # noqa: BLE001 - the timings above must survive it
        by_shapes = f"(no table: {type(e).__name__}: {str(e)[:200]})"
    kernels: dict[str, list[float]] = {}
    host: dict[str, list[float]] = {}  # on "cuda": the CPU events, by self CPU time
    spans: list[tuple[float, float, str]] = []  # (start us, end us, name) of each device event
    for event in prof.events():
        if getattr(event, "is_user_annotation", False):
            continue  # ranges ("Torch-Compiled Region", record_function) span the kernels in them
        if cuda and event.device_type == torch.autograd.DeviceType.CUDA:
            ms = event.time_range.elapsed_us() / 1e3
            spans.append((event.time_range.start, event.time_range.end, event.name))
        elif not cuda and event.device_type == torch.autograd.DeviceType.CPU and event.name.startswith("aten::"):
            ms = event.self_cpu_time_total / 1e3
        else:
            if cuda and event.device_type == torch.autograd.DeviceType.CPU:
                entry = host.setdefault(event.name, [0, 0.0])
                entry[0] += 1
                entry[1] += event.self_cpu_time_total / 1e3
            continue
        entry = kernels.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += ms
    families: dict[str, float] = {}
    for name, (_, ms) in kernels.items():
        family = kernel_family(name)
        families[family] = families.get(family, 0.0) + ms
    families["total"] = sum(ms for _, ms in kernels.values())
    gaps = _idle_gaps(spans)
    if spans:
        families["idle"] = sum(g for g, _, _ in gaps) / 1e3
    families["host"] = host_ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]
    lines = [f"## {title}", "",
             "families (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(families.items())), "",
             "| ms | calls | family | kernel |", "|---:|---:|---|---|"]
    lines += [f"| {ms:.3f} | {calls} | {kernel_family(name)} | `{name[:140]}` |"
              for name, (calls, ms) in ranked]
    if spans:
        largest = sorted(gaps, key=lambda g: -g[0])[:10]
        lines += ["", f"GPU idle {families['idle']:.2f} ms in {len(gaps)} gaps; the largest:", "",
                  "| idle ms | after | before |", "|---:|---|---|"]
        lines += [f"| {us / 1e3:.3f} | `{a[:70]}` | `{b[:70]}` |" for us, a, b in largest]
        span = (max(e for _, e, _ in spans) - min(s for s, _, _ in spans)) / 1e3
        lines += ["", f"Host: fn() returned after {host_ms:.2f} ms (unprofiled); the kernels spanned {span:.2f} ms "
                  f"(first start to last end, in the profiled call).", ""] + _host_lines(host, top=15)
    else:
        lines += ["", f"Host: fn() returned after {host_ms:.2f} ms."]
    lines += ["", "By op and input shapes (which call launched the kernels above; top 25 by self "
              + ("device" if cuda else "CPU") + " time; a call of its own):", "", "```", by_shapes, "```"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n\n")
    return families
