"""Benchmark of `spatiotemporal_conv` (as `auto` runs it, and its Triton kernel forced) against
the cuDNN paths a video UNet would otherwise take.

    python -m benchmarks.spatiotemporal_conv     # cpu suite
    python -m benchmarks.run --suite gpu-quick --only spatiotemporal_conv

Providers; each computes y = s + temporal(s), s = spatial(x). Ours is "auto":
- auto: `spatiotemporal_conv` as users run it. On a GPU it times its four library paths
  ("library", "cudnn-2d+1d-cl", "conv3d-cl3d", "passes") once per shape and runs the fastest
  (`AUTOTUNE` in `ops.spatiotemporal_conv`, where the measurements that led to it are). The log
  says which path it chose for each case.
- passes: each of the op's six passes on the implementation its own tuner timed fastest for the
  shape: cuDNN, the temporal GEMMs or the Triton tap kernel (`spatiotemporal_conv_passes`,
  `ops.conv_passes`). The log gives the plan it chose for each case.
- triton: `spatiotemporal_conv` forced to the Triton kernel on a channels_last_3d x (the
  kernel's layout, no copies): Triton forward and dgrad kernels, weight gradients on cuBLAS /
  cuDNN.
- triton-wgrad-kernel: the same op with `WGRAD = "triton"` (the Triton wgrad kernel, the first
  version's backward), to show in one run what the library weight gradients buy.
- triton-nosplit (the deep shapes only, 8x8 and 4x4 frames): the op with `SPLIT_K = False`, to
  show what splitting the K loop buys where the tile grid cannot fill the GPU.
- library: the op's GEMM library path (`spatiotemporal_conv_library`): cuDNN's conv2d on the
  channels-last frames, then the temporal conv and the residual as cuBLAS GEMMs over row ranges
  of the same storage (`ops.temporal_gemm`).
- cudnn-2d+1d-cl (the issue's first baseline; `spatiotemporal_conv_cudnn`): conv2d on the
  channels-last (B*F, C, H, W) view of x, a transpose of s to frames-inner (B*H*W, F, C) so
  conv1d runs channels-last, conv1d, a transpose back and the residual add.
- conv3d-ncdhw (the issue's second baseline): x contiguous NCDHW, conv3d with a (1, kh, kw)
  kernel, then conv3d with a (kt, 1, 1) kernel, plus the residual.
- conv3d-cl3d: the same two conv3d calls on channels_last_3d tensors (no layout shuffles;
  `spatiotemporal_conv_conv3d`, one of the paths "auto" chooses from).
- eager: the PyTorch reference (`spatiotemporal_conv_reference`, what the op runs without a GPU).

Suites (`run(suite, out_dir)` for `benchmarks.run`):
- cpu: the reference only at a tiny size in fp32 (the Triton kernel runs on a CPU only in the
  interpreter; correctness is tests/test_spatiotemporal_conv.py's business).
- gpu-quick (CUDA): bf16, kt = 3, 3x3 spatial, four video-UNet layers: 320 channels at 16
  frames of 64x64, 1280 channels at 16 frames of 32x32, and the deep levels of 32x32 latents,
  1280 channels at 16 frames of 8x8 and 4x4 (too few pixel rows to fill the GPU with tiles:
  the K loop is split, `_conv_split`), batch 1; forward and
  forward + backward; time, TFLOP/s (both convolutions' multiply-adds x 2; backward counted
  as 2x forward), and the fraction of the device's bf16 peak.
- gpu-full: 320/640/1280 channels x 64x64/32x32 latents x batch 1 and 2, and the two deep ones.
Both GPU suites also time each pass of the op alone ("<case> pass spatial-fwd", ...) against
the cuDNN call doing the same convolution (`_measure_passes`), to show which pass is short:
"triton" is what the op runs for that pass (for the two wgrad passes: the cuBLAS GEMMs and the
cuDNN call of the default path), "triton-wgrad-kernel" the Triton wgrad kernel (with the bias
gradient, as the first version ran it), "cudnn" the baseline call. gpu-quick also times the
candidate tiles `WIDE_TILE_CANDIDATES` on the 1280-channel spatial forward ("<case> pass
spatial-fwd tile 128x256x64 w8 s3", ...), so a run says which tile `_blocks` should pick.
Targets (issue 7): >= 1.2x cudnn-2d+1d-cl and >= 2x conv3d-ncdhw, forward and backward.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import BenchResult, device_name, time_cpu, time_cuda
from emu2_engine.kernels import spatiotemporal_conv as K
from emu2_engine.models.flops import peak_flops
from emu2_engine.ops import (spatiotemporal_conv, spatiotemporal_conv_conv3d, spatiotemporal_conv_cudnn,
                             spatiotemporal_conv_library, spatiotemporal_conv_passes,
                             spatiotemporal_conv_reference)
from emu2_engine.ops import conv_passes
from emu2_engine.ops.temporal_gemm import temporal_gemm_grads, temporal_gemm_rows

ops_stc = importlib.import_module("emu2_engine.ops.spatiotemporal_conv")  # the module, not the op

SUITES = ("cpu", "gpu-quick", "gpu-full")
CL3D = torch.channels_last_3d


def triton_path(x, w_s, b_s, w_t, b_t):
    return spatiotemporal_conv(x, w_s, b_s, w_t, b_t)


def _conv3d_pair(x, w_s, b_s, w_t, b_t):
    kh, kw, kt = w_s.shape[2], w_s.shape[3], w_t.shape[2]
    s = F.conv3d(x, w_s.unsqueeze(2), b_s, padding=(0, kh // 2, kw // 2))
    return s + F.conv3d(s, w_t[..., None, None], b_t, padding=(kt // 2, 0, 0))


PROVIDERS = {"auto": (triton_path, CL3D), "triton": (triton_path, CL3D), "triton-wgrad-kernel": (triton_path, CL3D),
             "triton-nosplit": (triton_path, CL3D),
             "library": (spatiotemporal_conv_library, CL3D),  # auto from LIBRARY_BELOW rows
             "cudnn-2d+1d-cl": (spatiotemporal_conv_cudnn, CL3D),  # auto below LIBRARY_BELOW rows
             "conv3d-ncdhw": (_conv3d_pair, torch.contiguous_format),
             "conv3d-cl3d": (spatiotemporal_conv_conv3d, CL3D),
             "passes": (spatiotemporal_conv_passes, CL3D),  # one of auto's paths, its own plan per shape
             "eager": (spatiotemporal_conv_reference, CL3D)}
WGRAD_OF = {"triton-wgrad-kernel": "triton"}
"""Providers that run the op with another `WGRAD` than the default (set while they are timed:
the op reads it when backward runs)."""


@contextmanager
def _settings(provider: str):
    """K.WGRAD and K.SPLIT_K as `provider` runs the op, inside the block; the "triton" providers
    force the kernel (`auto` runs the library paths: LIBRARY_BELOW)."""
    previous = K.WGRAD, K.SPLIT_K, os.environ.get("EMU2_KERNELS")
    K.WGRAD, K.SPLIT_K = WGRAD_OF.get(provider, K.WGRAD), provider != "triton-nosplit"
    if provider.startswith("triton"):
        os.environ["EMU2_KERNELS"] = "auto,spatiotemporal_conv=triton"
    elif provider == "auto":
        os.environ["EMU2_KERNELS"] = "auto"
    try:
        yield
    finally:
        K.WGRAD, K.SPLIT_K = previous[:2]
        if previous[2] is None:
            os.environ.pop("EMU2_KERNELS", None)
        else:
            os.environ["EMU2_KERNELS"] = previous[2]


def _inputs(shape, dtype, device, memory_format):
    B, C, Fr, H, W, kt = shape
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*size, scale=1.0, fmt=torch.contiguous_format):
        t = torch.randn(*size, generator=g, device=device, dtype=torch.float32) * scale
        return t.to(dtype).contiguous(memory_format=fmt).requires_grad_()

    x = randn(B, C, Fr, H, W, fmt=memory_format)
    w_s = randn(C, C, 3, 3, scale=(9 * C) ** -0.5)
    w_t = randn(C, C, kt, scale=(kt * C) ** -0.5)
    b_s, b_t = randn(C, scale=0.1), randn(C, scale=0.1)
    grad = torch.randn(B, C, Fr, H, W, generator=g, device=device).to(dtype)
    return (x, w_s, b_s, w_t, b_t), grad.contiguous(memory_format=memory_format)


def _measure(result, providers, shape, dtype, device, timer):
    B, C, Fr, H, W, kt = shape
    pixels = B * Fr * H * W
    fwd_flops = 2 * pixels * C * (9 * C + kt * C)
    peak = peak_flops(device_name()) if device == "cuda" else None
    case = f"B{B} C{C} F{Fr} {H}x{W}"
    params = {"batch": B, "channels": C, "frames": Fr, "side": H, "pixels": pixels}
    for p in providers:
        fn, fmt = PROVIDERS[p]
        args, grad = _inputs(shape, dtype, device, fmt)

        def forward():
            with torch.no_grad():
                fn(*args)

        def both():
            for a in args:
                a.grad = None
            fn(*args).backward(grad)

        for phase, step, flops in (("fwd", forward, fwd_flops), ("fwd+bwd", both, 3 * fwd_flops)):
            if phase == "fwd" and p in WGRAD_OF:
                continue  # the same forward as "triton"
            with _settings(p):
                ms = timer(step)
                if p == "auto" and device == "cuda":  # which path the tuner picked (cached by now)
                    with torch.enable_grad() if phase == "fwd+bwd" else torch.no_grad():
                        chose = ops_stc.tuned_choice(*args)
                    print(f"[spatiotemporal_conv] {case} {phase}: auto runs {chose}", flush=True)
                if p == "passes" and device == "cuda":  # the plan its tuner picked (cached by now)
                    with torch.enable_grad() if phase == "fwd+bwd" else torch.no_grad():
                        plan = conv_passes.tuned_plan(*args, may_time=True)
                    print(f"[spatiotemporal_conv] {case} {phase}: passes runs {plan}", flush=True)
            name = f"{case} {phase}"
            result.add(benchmark="spatiotemporal_conv", case=name, provider=p, metric="time",
                       value=ms, unit="ms", params=params)
            result.add(benchmark="spatiotemporal_conv", case=name, provider=p, metric="tflops",
                       value=flops / ms / 1e9, unit="TFLOP/s", params=params)
            if peak:
                result.add(benchmark="spatiotemporal_conv", case=name, provider=p,
                           metric="of_peak", value=100 * flops / (ms * 1e-3) / peak, unit="%",
                           params=params)
        del args, grad


def _measure_passes(result, shape, dtype, timer, sweep: bool):
    """Each pass of the op alone against the cuDNN call that does the same work (provider
    "cudnn"), so a GPU run shows which pass is short of cuDNN; "gemm" is the library path's
    temporal half (`ops.temporal_gemm`). Same FLOPs each side; cuDNN's temporal passes have no
    residual add (ours have it fused). sweep: also time the spatial
    forward with each of `K.WIDE_TILE_CANDIDATES`."""
    B, C, Fr, H, W, kt = shape
    P, geometry = B * Fr * H * W, (Fr, H, W)
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*size):
        return (torch.randn(*size, generator=g, device="cuda") * 0.05).to(dtype)

    rows, w_sp, w_tp, bias = randn(P, C), randn(9, C, C), randn(kt, C, C), randn(C)
    x4 = rows.view(B * Fr, H, W, C).permute(0, 3, 1, 2)                  # channels-last views
    x5 = rows.view(B, Fr, H, W, C).permute(0, 4, 1, 2, 3)
    w_s = randn(C, C, 3, 3)
    w_t = randn(C, C, kt)
    w4 = randn(C, C, 3, 3).contiguous(memory_format=torch.channels_last)
    w5 = randn(C, C, kt, 1, 1).contiguous(memory_format=CL3D)
    grad = torch.nn.grad
    spatial, temporal = 2 * P * C * C * 9, 2 * P * C * C * kt
    passes = {
        "spatial-fwd": (spatial, {
            "triton": lambda: K._tap_conv(rows, w_sp, bias, None, geometry, (1, 3, 3)),
            "cudnn": lambda: F.conv2d(x4, w4, bias, padding=1)}),
        "temporal-fwd": (temporal, {
            "triton": lambda: K._tap_conv(rows, w_tp, bias, rows, geometry, (kt, 1, 1)),
            "gemm": lambda: temporal_gemm_rows(x5, w_t, bias),
            "cudnn": lambda: F.conv3d(x5, w5, bias, padding=(kt // 2, 0, 0))}),
        "temporal-dgrad": (temporal, {
            "triton": lambda: K._tap_conv(rows, w_tp, None, rows, geometry, (kt, 1, 1)),
            "gemm": lambda: temporal_gemm_grads(x5, x5, w_t, True, False, False),
            "cudnn": lambda: grad.conv3d_input(x5.shape, w5, x5, padding=(kt // 2, 0, 0))}),
        "spatial-dgrad": (spatial, {
            "triton": lambda: K._tap_conv(rows, w_sp, None, None, geometry, (1, 3, 3)),
            "cudnn": lambda: grad.conv2d_input(x4.shape, w4, x4, padding=1)}),
        "spatial-wgrad": (spatial, {
            "triton": lambda: K._spatial_wgrad_library(x5, rows, w_s),
            "triton-wgrad-kernel": lambda: K._tap_wgrad(rows, rows, geometry, (1, 3, 3), True),
            "cudnn": lambda: grad.conv2d_weight(x4, w4.shape, x4, padding=1)}),
        "temporal-wgrad": (temporal, {
            "triton": lambda: K._temporal_wgrad_gemms(x5, x5, kt),
            "triton-wgrad-kernel": lambda: K._tap_wgrad(rows, rows, geometry, (kt, 1, 1), True),
            "cudnn": lambda: grad.conv3d_weight(x5, w5.shape, x5, padding=(kt // 2, 0, 0))}),
    }
    case = f"B{B} C{C} F{Fr} {H}x{W} pass"
    for name, (flops, providers) in passes.items():
        for provider, fn in providers.items():
            _add_time(result, f"{case} {name}", provider, timer(fn), flops, B, C, Fr, H, P)
    if sweep:
        for cfg in K.WIDE_TILE_CANDIDATES:
            tile = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{num_warps} s{num_stages}".format(**cfg)
            ms = timer(lambda: K._tap_conv(rows, w_sp, bias, None, geometry, (1, 3, 3), dict(cfg)))
            _add_time(result, f"{case} spatial-fwd tile {tile}", "triton", ms, spatial, B, C, Fr, H, P)


def _add_time(result, case, provider, ms, flops, B, C, Fr, side, P):
    """The time and TFLOP/s of one pass measurement."""
    params = {"batch": B, "channels": C, "frames": Fr, "side": side, "pixels": P}
    result.add(benchmark="spatiotemporal_conv", case=case, provider=provider, metric="time",
               value=ms, unit="ms", params=params)
    result.add(benchmark="spatiotemporal_conv", case=case, provider=provider, metric="tflops",
               value=flops / ms / 1e9, unit="TFLOP/s", params=params)


def run(suite: str, out_dir: Path) -> BenchResult:
    """The `suite` measurements (out_dir is unused: the harness writes the report)."""
    result = BenchResult(ours="auto")
    if suite == "cpu":
        result.skipped.append("triton: the kernel runs on a CPU only in the interpreter "
                              "(correctness in tests/test_spatiotemporal_conv.py, no timing)")
        _measure(result, ["eager", "library", "cudnn-2d+1d-cl", "conv3d-ncdhw", "passes"], (1, 64, 8, 16, 16, 3),
                 torch.float32, "cpu",
                 lambda step: time_cpu(step, warmup=1, repeats=3))
    elif not torch.cuda.is_available():
        result.skipped.append(f"{suite}: no CUDA device on this machine")
    else:
        deep = [(1, 1280, 16, 8, 8, 3), (1, 1280, 16, 4, 4, 3)]
        shapes = deep + [(1, 320, 16, 64, 64, 3), (1, 1280, 16, 32, 32, 3)]  # the split-K A/B first
        if suite == "gpu-full":
            shapes = [(b, c, 16, side, side, 3) for b in (1, 2) for c in (320, 640, 1280)
                      for side in (64, 32)] + deep
        providers = [p for p in PROVIDERS if p != "triton-nosplit" and (suite == "gpu-full" or p != "eager")]
        if suite != "gpu-full":
            result.skipped.append("eager (the reference): gpu-full only")
        for shape in shapes:
            timer = lambda step: time_cuda(step, warmup=3, repeats=10)  # noqa: E731
            deep = ["triton-nosplit"] if shape[3] <= 8 else []
            done = len(result.measurements)
            _measure(result, providers + deep, shape, torch.bfloat16, "cuda", timer)
            for m in result.measurements[done:]:  # printed as measured: a capped run keeps them in its log
                if m.metric == "time":
                    print(f"[spatiotemporal_conv] {m.case} {m.provider}: {m.value:.3f} {m.unit}", flush=True)
            _measure_passes(result, shape, torch.bfloat16, timer,
                            sweep=suite == "gpu-quick" and shape[1] == 1280 and shape[3] == 32)
            torch.cuda.empty_cache()
    return result


if __name__ == "__main__":
    from benchmarks.run import default_out_dir, main

    out = f"{default_out_dir(device_name(), 'cpu')}-spatiotemporal_conv"
    sys.exit(main(["--suite", "cpu", "--only", "spatiotemporal_conv", "--out", out]))
