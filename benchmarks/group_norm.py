"""Benchmark of `group_norm` (GroupNorm + SiLU on channels-last activations, Triton) against
the PyTorch paths a UNet would otherwise take.

    python -m benchmarks.group_norm     # cpu suite
    python -m benchmarks.run --suite gpu-quick --only group_norm

Providers, each y = silu(group_norm(x)) with 32 groups, forward and forward + backward:
- ours: the op on channels-last x (the layout the UNets' body runs in on CUDA), its kernel;
- torch-cl: F.group_norm + F.silu on the same channels-last x: PyTorch's CUDA GroupNorm copies
  it to NCHW and returns NCHW, which the next convolution copies back (that copy is not timed
  here, so this baseline is flattered);
- torch-nchw: the same on NCHW-contiguous x: PyTorch's norm where it needs no copy;
- compiled-cl (GPU): torch.compile of F.group_norm + F.silu on channels-last x: Inductor's own
  fused reductions, what `compile_unet_blocks` would generate from the reference path.

Suites (`run(suite, out_dir)` for `benchmarks.run`):
- cpu: torch-cl and torch-nchw at one small shape in fp32 (the kernel runs on a CPU only in
  the interpreter; its correctness is tests/test_group_norm.py's business).
- gpu-quick (CUDA): bf16, the emu2-video UNet's norm inputs for 16 frames of 64x64 latents:
  320 channels at 64x64, 640 at 32x32, 1280 at 16x16, and 2560 at 8x8 (a deep up-block
  resnet's input, the skip concatenated); time, bandwidth on the minimum bytes (forward: x
  read, y written; backward: x and dy read, dx written) and, for ours, the fraction of the
  HBM roofline. gpu-full adds batch 2 (32 frames) of each.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (BenchResult, device_name, hbm_bandwidth, measure_gpu_shapes, time_cpu,
                               time_cuda)
from emu2_engine.ops import group_norm

SUITES = ("cpu", "gpu-quick", "gpu-full")
GROUPS = 32


def _torch(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b, 1e-5))


def _ours(x, w, b):
    return group_norm(x, GROUPS, w, b, 1e-5, silu=True)


_compiled = None


def _compiled_torch(x, w, b):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_torch, dynamic=False)  # static, as compile_unet_blocks
    return _compiled(x, w, b)


PROVIDERS = {"ours": (_ours, True), "torch-cl": (_torch, True), "torch-nchw": (_torch, False),
             "compiled-cl": (_compiled_torch, True)}
"""name -> (function, whether x is channels-last)."""


def _measure(result: BenchResult, providers: list[str], shape: tuple[int, ...], dtype, device,
             timer) -> None:
    N, C, H, W = shape
    g = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(shape, generator=g, device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(C, generator=g, device=device)).requires_grad_()
    b = (0.1 * torch.randn(C, generator=g, device=device)).requires_grad_()
    grad = torch.randn(shape, generator=g, device=device, dtype=dtype)
    size = base.numel() * base.element_size()
    name = f"N{N} C{C} {H}x{W}"
    params = {"N": N, "C": C, "side": H}
    bandwidth = hbm_bandwidth()
    for p in providers:
        fn, channels_last = PROVIDERS[p]
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = base.contiguous(memory_format=fmt).requires_grad_()
        dy = grad.contiguous(memory_format=fmt)

        def forward():
            with torch.no_grad():
                fn(x, w, b)

        def both():
            x.grad = w.grad = b.grad = None
            fn(x, w, b).backward(dy)

        for phase, step, nbytes in (("fwd", forward, 2 * size), ("fwd+bwd", both, 5 * size)):
            try:
                ms = timer(step)
            except Exception as e:  # noqa: BLE001 - a compile failure must not cost the others
                result.skipped.append(f"{name} {phase} {p}: {type(e).__name__}: {str(e)[:200]}")
                continue
            case = f"{name} {phase}"
            result.add(benchmark="group_norm", case=case, provider=p, metric="time", value=ms,
                       unit="ms", params=params)
            result.add(benchmark="group_norm", case=case, provider=p, metric="bandwidth",
                       value=nbytes / ms / 1e6, unit="GB/s", params=params)
            if p == "ours" and bandwidth:
                floor = nbytes / bandwidth * 1e3
                result.add(benchmark="group_norm", case=case, provider=p, metric="of_roofline",
                           value=100 * floor / ms, unit="%", params=params)
            print(f"[group_norm] {case} {p}: {ms:.3f} ms", flush=True)


def run(suite: str, out_dir: Path) -> BenchResult:
    """The `suite` measurements (out_dir is unused: the harness writes the report)."""
    result = BenchResult(ours="ours")
    if suite == "cpu":
        result.skipped.append("ours: the Triton kernels run on a CPU only in the interpreter "
                              "(correctness in tests/test_group_norm.py, no timing)")
        _measure(result, ["torch-cl", "torch-nchw"], (8, 320, 32, 32), torch.float32, "cpu",
                 lambda step: time_cpu(step, warmup=1, repeats=3))
    elif not torch.cuda.is_available():
        result.skipped.append(f"{suite}: no CUDA device on this machine")
    else:
        shapes = [(16, 320, 64, 64), (16, 640, 32, 32), (16, 1280, 16, 16), (16, 2560, 8, 8)]
        if suite == "gpu-full":
            shapes += [(32, c, s, s) for _, c, s, _ in shapes]
        measure_gpu_shapes(result, shapes, lambda shape: _measure(
            result, list(PROVIDERS), shape, torch.bfloat16, "cuda",
            lambda step: time_cuda(step, warmup=3, repeats=10)))
    return result


if __name__ == "__main__":
    from benchmarks.run import default_out_dir, main
    out = f"{default_out_dir(device_name(), 'cpu')}-group_norm"
    sys.exit(main(["--suite", "cpu", "--only", "group_norm", "--out", out]))
