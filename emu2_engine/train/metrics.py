"""Training metrics: throughput (tokens/s, images/s, TFLOP/s, MFU), memory and data-loader wait
over a window of steps, and where the records go (JSONL, optionally TensorBoard).

The FLOPs are model FLOPs (`emu2_engine.models.flops.training_flops`): the work the model
needs, recomputation and padding excluded. The trainer feeds the whole job's totals (summed
over the ranks, each rank counting its share of the model); rates are then the job's, and
TFLOP/s and MFU are per device, against the peak of the device in `models/flops.py`'s table.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from emu2_engine.models.flops import mfu


class MetricsFileError(ValueError):
    """A metrics.jsonl that cannot be read back on resume (a bad line before the last)."""


class ThroughputMeter:
    """Accumulate steps with `update`, read rates with `report`, start a new window with `reset`.

    device_name: `torch.cuda.get_device_name()`, or None on the CPU (MFU is then None);
    devices: how many devices share the FLOPs fed in (the world size)."""

    def __init__(self, device_name: str | None = None, devices: int = 1):
        self.device_name = device_name
        self.devices = devices
        self.reset()

    def reset(self) -> None:
        self.tokens = self.images = self.flops = 0.0
        self.seconds = self.data_seconds = 0.0

    def update(self, tokens: float, images: float, flops: float, seconds: float,
               data_seconds: float = 0.0) -> None:
        """One step: real (non-padding) tokens, images and training FLOPs of the whole job, its
        wall time (the caller synchronises the device before reading the clock) and the part
        of it spent waiting for the data loader."""
        self.tokens += tokens
        self.images += images
        self.flops += flops
        self.seconds += seconds
        self.data_seconds += data_seconds

    def report(self) -> dict[str, float | None]:
        """tokens_per_s and images_per_s (the job's), tflops (achieved TFLOP/s per device), mfu
        (per device; None where the device has no peak in the table, as on a CPU) and
        data_wait (fraction of the wall time spent waiting for batches)."""
        s = max(self.seconds, 1e-12)
        per_device = self.flops / s / self.devices
        return {"tokens_per_s": self.tokens / s, "images_per_s": self.images / s,
                "tflops": per_device / 1e12, "mfu": mfu(per_device, self.device_name),
                "data_wait": self.data_seconds / s}


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process in GiB: CUDA memory allocated by tensors since the last
    call on a GPU (the peak counter is reset); resident set size since the start on a CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


class MetricsWriter:
    """Writes records to run_dir/metrics.jsonl and, with `tensorboard` (and the package
    installed), to run_dir/tensorboard. Only one rank writes; others make a disabled writer.

    `keep_until`: on resume, the records of steps up to it are kept (those written after the
    checkpoint by the interrupted run are dropped, as their steps will run again); None
    starts a new file. A last line cut short by a kill during its write is dropped with a
    warning; any other line that is not a JSON record is an error.

    The file is strict JSON: non-finite numbers (a NaN loss or gradient norm) are written as
    null, since NaN and Infinity are not JSON and strict readers refuse them."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, keep_until: int | None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        kept: list[dict] = []
        if keep_until is not None and self.path.is_file():
            kept = [r for r in read_records(self.path) if "loss" in r and r["step"] <= keep_until]
        tmp = self.path.with_name(self.path.name + ".tmp")  # a kill now leaves the old file whole
        tmp.write_text("".join(json_line(r) for r in kept))
        tmp.replace(self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("metrics: the tensorboard package is not installed; metrics go to "
                      f"{self.path} only", file=sys.stderr)
            else:
                # TensorBoard drops the events of steps >= purge_step: the first step run again
                purge = None if keep_until is None else keep_until + 1
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json_line(record))
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_records(path: Path) -> list[dict]:
    """The records of a metrics file. A last line that does not parse is a write cut short by
    a kill (the writer appends whole lines): it is dropped with a warning, so a restarted run
    does not fail on it again and again. A bad line before the last one is an error."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                print(f"metrics: dropping the last line of {path} (line {number}), cut short "
                      f"by an interrupted write: {line[:80]!r}", file=sys.stderr)
                break
            raise MetricsFileError(f"{path} line {number} is not a JSON record ({e.msg}): "
                             f"{line[:80]!r}") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise MetricsFileError(f"{path} line {number} must be a JSON object with an integer "
                             f"\"step\", got {line[:80]!r}")
        records.append(record)
    return records


def _finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (in nested dicts and lists too) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def json_line(record: dict) -> str:
    """One line of a metrics file: strict JSON (non-finite numbers as null), newline-ended."""
    return json.dumps(_finite_or_none(record), allow_nan=False) + "\n"


def repair_last_line(path: Path, prog: str = "metrics") -> None:
    """Make the metrics file `path` (if any) safe to append to, for a writer that appends
    without reading the file back (the decoder trainer; `MetricsWriter` reads it with
    `read_records`, whose records all carry a "step"). Records are appended one whole line per
    write, so a kill during a write leaves at most a last line without its newline: one that
    does not parse is that record cut short and is dropped with a warning from `prog` (its step
    runs again after the resume); a whole record that lost only its newline gets it back.
    Appended to as it was, the file would get the next record glued onto the fragment: a bad
    line in the middle, which strict readers refuse."""
    if not path.is_file():
        return
    text = path.read_text()
    if not text or text.endswith("\n"):
        return
    head, _, last = text.rpartition("\n")
    try:
        json.loads(last)
    except json.JSONDecodeError:
        number = text.count("\n") + 1
        print(f"{prog}: dropping the last line of {path} (line {number}), cut short by an "
              f"interrupted write: {last[:80]!r}", file=sys.stderr, flush=True)
        tmp = path.with_name(path.name + ".tmp")  # a kill now leaves the old file whole
        tmp.write_text(head + "\n" if head else "")
        tmp.replace(path)
        return
    with open(path, "a") as f:
        f.write("\n")
