"""Where one optimiser step spends its time, phase by phase, on the host and on the device.

`Trainer.step(batches, timeline=StepTimeline(device))` marks the end of each phase: the
weights' cast, each micro-batch's forward + backward, the return of the fp32 weights and
gradients, the clipping, the host's read-back of the loss and the norm, the optimiser, and the
gradients' reset with the schedule. At each mark the timeline takes the host's clock and, on a
CUDA device, records an event on the current stream.

`phases()` then gives, per phase, the host's time (from the previous mark to this one) and the
device's (from the moment the stream reached the previous mark's work to the moment it
finished this one's, idle gaps included). A phase whose host time exceeds its device time kept
the device waiting on the host; the read-back is the one phase where the host waits on the
device. With no timeline the step records nothing and costs nothing more.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Phase:
    name: str
    host_ms: float
    device_ms: float | None  # None on a device without events (the CPU)


class StepTimeline:
    """Marks of one step (see the module docstring). Use a fresh one per step."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._marks: list[tuple[str, float, object]] = []
        self.mark("start")

    def mark(self, name: str) -> None:
        """The phase called `name` ends here (the first mark, "start", begins the step)."""
        event = None
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
        self._marks.append((name, time.perf_counter(), event))

    def phases(self) -> list[Phase]:
        """Each phase in order. Waits for the device to reach the last mark."""
        if len(self._marks) < 2:
            raise ValueError("the timeline has no phase: mark at least one after the start")
        if self._cuda:
            self._marks[-1][2].synchronize()
        out = []
        for (_, t0, e0), (name, t1, e1) in zip(self._marks, self._marks[1:]):
            device_ms = e0.elapsed_time(e1) if self._cuda else None
            out.append(Phase(name, (t1 - t0) * 1e3, device_ms))
        return out

    def summary(self) -> dict[str, Phase]:
        """`phases()` with the micro-batches folded into "micro-batch 1" (the step's first: its
        gradients are assigned, not added) and "micro-batches 2+" (the rest, summed), and any
        other repeated name summed."""
        merged: dict[str, list[float | None]] = {}
        for p in self.phases():
            name = p.name
            if name.startswith("micro-batch ") and name != "micro-batch 1":
                name = "micro-batches 2+"
            host, dev = merged.get(name, [0.0, None if p.device_ms is None else 0.0])
            merged[name] = [host + p.host_ms, None if p.device_ms is None else dev + p.device_ms]
        return {name: Phase(name, host, dev) for name, (host, dev) in merged.items()}
