"""Throughput metrics: tokens/s, images/s, TFLOP/s and MFU over a window of training steps.

The FLOPs are model FLOPs (`emu2_engine.models.flops.training_flops`): the work the model
needs, recomputation and padding excluded. Every number is per rank: feed each rank's own
batches, and the MFU is that of its device.
"""

from __future__ import annotations

from emu2_engine.models.flops import mfu


class ThroughputMeter:
    """Accumulate steps with `update`, read rates with `report`, start a new window with `reset`.

    device_name: `torch.cuda.get_device_name()`, or None on the CPU (MFU is then None)."""

    def __init__(self, device_name: str | None = None):
        self.device_name = device_name
        self.reset()

    def reset(self) -> None:
        self.tokens = self.images = self.flops = 0
        self.seconds = 0.0

    def update(self, tokens: int, images: int, flops: int, seconds: float) -> None:
        """One step: real (non-padding) tokens, images, training FLOPs and its wall time (the
        caller synchronises the device before reading the clock)."""
        self.tokens += tokens
        self.images += images
        self.flops += flops
        self.seconds += seconds

    def report(self) -> dict[str, float | None]:
        """tokens_per_s, images_per_s, tflops (achieved TFLOP/s) and mfu (None if unknown)."""
        s = max(self.seconds, 1e-12)
        return {"tokens_per_s": self.tokens / s, "images_per_s": self.images / s,
                "tflops": self.flops / s / 1e12, "mfu": mfu(self.flops / s, self.device_name)}
