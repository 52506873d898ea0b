"""Profiling a run (`[profiling]`): PyTorch profiler traces of chosen steps and CUDA memory
snapshots, written per rank into the run folder, as torchtitan's profiling options do.

Every `interval` steps the profiler records the last `active` steps of the interval (after
`warmup` steps in which it runs without recording, so that its own start-up is not in the
trace). The windows sit at fixed step numbers whatever step the run started or resumed at:
with interval 100 and active 1, steps 100, 200, ... are recorded. Each window writes

    <dir>/step-000200/rank0.json   the Chrome trace (chrome://tracing, Perfetto)
    <dir>/step-000200/rank0.txt    the operators and kernels by total time, top 40

and, with `memory_snapshot` (CUDA only), ``<dir>/step-000200/rank0_memory.pickle``: the
allocator's history since the run started, which https://pytorch.org/memory_viz draws.
Profiled steps run slower (the profiler's overhead), so their throughput records are too. A
run that stops inside a window (its last step, a signal) writes nothing for that window.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerAction, ProfilerActivity, profile

MEMORY_HISTORY_ENTRIES = 100_000
"""Allocator events kept for a memory snapshot (the newest; each costs a stack trace)."""


def window_action(step: int, interval: int, active: int, warmup: int) -> ProfilerAction:
    """What the profiler does during the run's step `step` (1-based): record the last `active`
    steps of each `interval` (saving after the last, a multiple of `interval`), run without
    recording for the `warmup` steps before them, else nothing. A function of the step number
    alone, so a resumed run records the same steps as one that ran through."""
    position = (step - 1) % interval  # 0 .. interval - 1 inside its interval
    if position == interval - 1:
        return ProfilerAction.RECORD_AND_SAVE
    if position >= interval - active:
        return ProfilerAction.RECORD
    if position >= interval - active - warmup:
        return ProfilerAction.WARMUP
    return ProfilerAction.NONE


class StepProfiler:
    """The profiler of one rank's training loop: `start()` before the first step, `step()`
    after each, `stop()` at the end (also on errors)."""

    def __init__(self, interval: int, active: int, warmup: int, directory: str | Path, rank: int,
                 device: torch.device, start_step: int, memory_snapshot: bool = False):
        if interval < 1 or active < 1 or warmup < 0 or warmup + active > interval:
            raise ValueError(f"profiling needs interval >= 1, active >= 1, warmup >= 0 and "
                             f"warmup + active <= interval, got interval {interval}, active "
                             f"{active}, warmup {warmup}")
        if memory_snapshot and device.type != "cuda":
            raise ValueError(f"profiling.memory_snapshot records the CUDA caching allocator; this "
                             f"run is on {device.type}")
        self.directory, self.rank, self.device = Path(directory), rank, device
        self.interval = interval
        self.memory_snapshot = memory_snapshot
        self.step_count = start_step
        self.windows: list[int] = []  # steps whose window was written
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self._profiler = profile(
            activities=activities,
            # the profiler numbers its steps from 0 at start(): the run's next step is start_step + 1
            schedule=lambda i: window_action(start_step + 1 + i, interval, active, warmup),
            on_trace_ready=self._write, record_shapes=False, with_stack=False)

    def start(self) -> None:
        if self.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self._profiler.start()

    def step(self, step_count: int) -> None:
        """After step `step_count` (the run's step number) has finished."""
        self.step_count = step_count
        with warnings.catch_warnings():  # each window on its own is what is wanted here
            warnings.filterwarnings("ignore", message=".*Profiler clears events at the end of each cycle")
            self._profiler.step()

    def stop(self) -> None:
        try:
            self._profiler.stop()
        finally:
            if self.memory_snapshot:
                torch.cuda.memory._record_memory_history(enabled=None)

    def _write(self, prof: profile) -> None:
        """The profiler's trace-ready hook. A window that cannot be written (a full disk, a
        folder taken away) is said in a warning and the run goes on: an error raised here
        would leave the profiler in a state whose stop() crashes the process."""
        try:
            self._write_window(prof)
        except OSError as e:
            warnings.warn(f"profiling: the window ending at step {self.step_count} was not written: {e}",
                          stacklevel=2)

    def _write_window(self, prof: profile) -> None:
        if self.step_count % self.interval:
            return  # stopped inside a window (the profiler hands over what it has): no trace
        folder = self.directory / f"step-{self.step_count:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"rank{self.rank}"
        _atomic(folder / f"{name}.json", lambda tmp: prof.export_chrome_trace(str(tmp)))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        _atomic(folder / f"{name}.txt", lambda tmp: tmp.write_text(table + "\n"))
        if self.memory_snapshot:
            _atomic(folder / f"{name}_memory.pickle",
                    lambda tmp: torch.cuda.memory._dump_snapshot(str(tmp)))
        self.windows.append(self.step_count)


def _atomic(path: Path, write) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename: a trace is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
