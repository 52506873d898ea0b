"""Benchmark of `pool_project` (Triton average pool, then the cuBLAS projection) against eager
PyTorch (`pool_patches` = transpose + avg_pool2d + transpose, then F.linear) and against a
pool-then-GEMM baseline (a strided view + mean, then F.linear: no transposed copies).

    python -m benchmarks.pool_project     # cpu suite -> benchmarks/results/<device>-cpu-<date>-pool_project/
    python -m benchmarks.run --suite gpu-quick --only pool_project

Suites (`run(suite, out_dir)`, for `benchmarks.run`; ours is "ours"):
- cpu: the two PyTorch baselines, forward and forward + backward, at 16 images of Emu2's shape
  in fp32. Ours is not timed: its pooling kernel runs on a CPU only in the interpreter.
- gpu-quick / gpu-full (CUDA only, skipped elsewhere): 256 images of 1024 x 1792 patch
  features -> 64 tokens of 6656 (Emu2), bf16 (full adds 256 tokens per image, Emu2-Chat, and
  64 images); time per phase (`benchmarks.common.time_cuda`), TFLOP/s, bandwidth on the
  minimum bytes (forward: x and W read, the output written), and for ours the
  fraction of the roofline max(bytes / HBM bandwidth, FLOPs / peak) it reaches. Targets
  (issue 4): >= 80% of the roofline and >= 2x eager.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (BenchResult, device_name, hbm_bandwidth, measure_gpu_shapes, time_cpu,
                               time_cuda)
from emu2_engine.models.flops import peak_flops
from emu2_engine.ops import pool_patches, pool_project

SUITES = ("cpu", "gpu-quick", "gpu-full")


def eager(x, w, n_query):
    return F.linear(pool_patches(x, n_query), w)


def view_mean(x, w, n_query):
    N, P, C = x.shape
    grid, side = math.isqrt(P), math.isqrt(n_query)
    k = grid // side
    pooled = x.view(N, side, k, side, k, C).mean(dim=(2, 4)).reshape(N, n_query, C)
    return F.linear(pooled, w)


def ours(x, w, n_query):
    return pool_project(x, w, n_query)


PROVIDERS = {"eager": eager, "view-mean": view_mean, "ours": ours}


def _inputs(N, P, C, H, n_query, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, P, C, generator=g, device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(H, C, generator=g, device=device, dtype=dtype) * C ** -0.5).requires_grad_()
    grad = torch.randn(N, n_query, H, generator=g, device=device, dtype=dtype)
    return x, w, grad


def _measure(result, providers, shape, dtype, device, timer):
    N, P, C, H, n_query = shape
    x, w, grad = _inputs(N, P, C, H, n_query, dtype, device)
    name = f"{N}x{P}x{C}->{n_query}x{H}"
    params = {"images": N, "n_query": n_query, "hidden": H}
    M, size = N * n_query, x.element_size()
    fwd_bytes = (N * P * C + H * C + M * H) * size
    both_bytes = fwd_bytes + (M * H + H * C + M * C + N * P * C + H * C) * size  # + dout, W, pooled in; dx, dW out
    flops = 2 * M * C * H
    bandwidth = hbm_bandwidth()
    peak = peak_flops(device_name()) if device == "cuda" else None
    for p in providers:
        fn = PROVIDERS[p]

        def forward():
            with torch.no_grad():
                fn(x, w, n_query)

        def both():
            x.grad = w.grad = None
            fn(x, w, n_query).backward(grad)

        for phase, step, nbytes, nflops in (("fwd", forward, fwd_bytes, flops),
                                            ("fwd+bwd", both, both_bytes, 3 * flops)):
            ms = timer(step)
            case = f"{name} {phase}"
            result.add(benchmark="pool_project", case=case, provider=p, metric="time", value=ms,
                       unit="ms", params=params)
            result.add(benchmark="pool_project", case=case, provider=p, metric="bandwidth",
                       value=nbytes / ms / 1e6, unit="GB/s", params=params)
            result.add(benchmark="pool_project", case=case, provider=p, metric="tflops",
                       value=nflops / ms / 1e9, unit="TFLOP/s", params=params)
            if p == "ours" and bandwidth and peak:
                floor = max(nbytes / bandwidth, nflops / peak) * 1e3
                result.add(benchmark="pool_project", case=case, provider=p, metric="of_roofline",
                           value=100 * floor / ms, unit="%", params=params)


def run(suite: str, out_dir: Path) -> BenchResult:
    """The `suite` measurements (out_dir is unused: the harness writes the report)."""
    result = BenchResult(ours="ours")
    if suite == "cpu":
        result.skipped.append("ours: the Triton pooling kernel runs on a CPU only in the interpreter "
                              "(correctness in tests/test_pool_project.py, no timing)")
        _measure(result, ["eager", "view-mean"], (16, 1024, 1792, 6656, 64), torch.float32, "cpu",
                 lambda step: time_cpu(step, warmup=1, repeats=3))
    elif not torch.cuda.is_available():
        result.skipped.append(f"{suite}: no CUDA device on this machine")
    else:
        shapes = [(256, 1024, 1792, 6656, 64)]
        if suite == "gpu-full":
            shapes += [(256, 1024, 1792, 6656, 256), (64, 1024, 1792, 6656, 64)]
        measure_gpu_shapes(result, shapes, lambda shape: _measure(
            result, list(PROVIDERS), shape, torch.bfloat16, "cuda",
            lambda step: time_cuda(step, warmup=3, repeats=10)))
    return result


if __name__ == "__main__":
    from benchmarks.run import default_out_dir, main

    out = f"{default_out_dir(device_name(), 'cpu')}-pool_project"
    sys.exit(main(["--suite", "cpu", "--only", "pool_project", "--out", out]))
