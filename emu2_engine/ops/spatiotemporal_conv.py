"""`spatiotemporal_conv`: a 2D convolution on every frame, then a temporal convolution over
frames in the residual form video UNets use.

    s = conv2d(x[:, :, f], w_s, b_s, padding="same")      for every frame f
    y = s + conv1d_over_frames(s, w_t, b_t, padding="same") (zeros beyond the first/last frame)

x is (B, Cin, F, H, W); w_s (Cout, Cin, kh, kw) with odd kh, kw; w_t (Cout, Cout, kt) with odd
kt (3 in the video decoder); the biases are (Cout,) or None. A zero w_t and b_t make the
layer exactly the 2D convolution on each frame, which is how an inflated UNet starts equal
to the 2D one. This module holds the argument checks, the PyTorch reference and the public op,
which runs the Triton kernel (`emu2_engine.kernels.spatiotemporal_conv`: implicit GEMMs over
the channels-last tensor for the forward and the input gradients, the weight gradients on
cuBLAS and cuDNN) or the reference (`ops.backend`). Under `auto` on a GPU the op runs mostly
on the vendor libraries, which an H200 measured faster than the whole kernel at every
video-UNet size (`LIBRARY_BELOW`), through whichever of four paths (`LIBRARY_PATHS`) is fastest
for the input's shape, timed once per shape (`AUTOTUNE`); only the fourth may run single passes
on the Triton tap kernel:
- cuDNN's conv2d, then the temporal conv as cuBLAS GEMMs on the same storage
  (`spatiotemporal_conv_library`);
- cuDNN's conv2d, then conv1d (`spatiotemporal_conv_cudnn`);
- cuDNN's conv3d twice on channels_last_3d (`spatiotemporal_conv_conv3d`);
- each of the six passes on its own fastest implementation, cuDNN, GEMMs or the Triton tap
  kernel, itself timed pass by pass (`spatiotemporal_conv_passes`, `ops.conv_passes`).

`triton` forces the kernel.

The kernel works on `torch.channels_last_3d` tensors (strides of B, F, H, W, C) and returns
that format; other inputs are converted first (one copy, counted in the backward too).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from emu2_engine.kernels import spatiotemporal_conv as _kernel
from emu2_engine.ops import conv_passes
from emu2_engine.ops.backend import autocast_dtype, requested_backend, use_triton
from emu2_engine.ops.temporal_gemm import temporal_gemm


def check_spatiotemporal_args(x, w_s, b_s, w_t, b_t) -> None:
    """Raise ValueError naming the first argument whose shape, dtype or device is wrong."""
    if x.dim() != 5:
        raise ValueError(f"spatiotemporal_conv expects x of shape (B, C, F, H, W), got {tuple(x.shape)}")
    if w_s.dim() != 4 or w_s.shape[1] != x.shape[1]:
        raise ValueError(f"w_s must be (Cout, {x.shape[1]}, kh, kw), got {tuple(w_s.shape)}")
    cout, _, kh, kw = w_s.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"spatial kernel sides must be odd for 'same' padding, got {kh}x{kw}")
    if w_t.dim() != 3 or w_t.shape[0] != cout or w_t.shape[1] != cout:
        raise ValueError(f"w_t must be ({cout}, {cout}, kt), got {tuple(w_t.shape)}")
    if w_t.shape[2] % 2 == 0:
        raise ValueError(f"the temporal kernel size must be odd, got {w_t.shape[2]}")
    for name, b in (("b_s", b_s), ("b_t", b_t)):
        if b is not None and tuple(b.shape) != (cout,):
            raise ValueError(f"{name} must be ({cout},) or None, got {tuple(b.shape)}")
    for name, t in (("w_s", w_s), ("b_s", b_s), ("w_t", w_t), ("b_t", b_t)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")


def spatiotemporal_conv_reference(x: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor | None,
                                  w_t: torch.Tensor, b_t: torch.Tensor | None) -> torch.Tensor:
    """conv2d per frame, then conv1d over frames, plus the residual: (B, Cout, F, H, W)."""
    check_spatiotemporal_args(x, w_s, b_s, w_t, b_t)
    B, C, Fr, H, W = x.shape
    cout, _, kh, kw = w_s.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
    s = F.conv2d(frames, w_s, b_s, padding=(kh // 2, kw // 2))          # (B*F, Cout, H, W)
    s = s.reshape(B, Fr, cout, H, W)
    seq = s.permute(0, 3, 4, 2, 1).reshape(B * H * W, cout, Fr)       # frames last
    t = F.conv1d(seq, w_t, b_t, padding=w_t.shape[2] // 2)
    t = t.reshape(B, H, W, cout, Fr).permute(0, 4, 3, 1, 2)           # (B, F, Cout, H, W)
    return (s + t).permute(0, 2, 1, 3, 4)


def prefers_library(x: torch.Tensor) -> bool:
    """Whether, where `auto` cannot time the paths, it runs x on the GEMM path
    (`spatiotemporal_conv_library`) rather than conv3d (`spatiotemporal_conv_conv3d`):
    `LIBRARY_BELOW` pixel rows or more."""
    B, _, Fr, H, W = x.shape
    return B * Fr * H * W >= LIBRARY_BELOW


def spatiotemporal_conv_cudnn(x: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor | None,
                              w_t: torch.Tensor, b_t: torch.Tensor | None) -> torch.Tensor:
    """cuDNN's two convolutions on channels-last views: conv2d on the (B*F, C, H, W) frames,
    one copy of s to frames-inner order (B*H*W, F, C) so that conv1d runs channels-last,
    conv1d, and the residual add. Returns (B, Cout, F, H, W) in channels_last_3d. One of the
    paths `auto` times (`LIBRARY_PATHS`); the benchmark's "cudnn-2d+1d-cl" baseline."""
    check_spatiotemporal_args(x, w_s, b_s, w_t, b_t)
    B, C, Fr, H, W = x.shape
    cout, _, kh, kw = w_s.shape
    kt = w_t.shape[2]
    x = x.contiguous(memory_format=torch.channels_last_3d)
    frames = conv_passes.frames_view(x)                               # a channels-last view
    s = F.conv2d(frames, w_s, b_s, padding=(kh // 2, kw // 2))
    s = s.view(B, Fr, cout, H, W).permute(0, 1, 3, 4, 2)              # (B, F, H, W, C) view
    seq = s.permute(0, 2, 3, 1, 4).reshape(B * H * W, Fr, cout)        # frames inner: one copy
    t = F.conv1d(seq.transpose(1, 2), w_t, b_t, padding=kt // 2)       # (BHW, C, F) channels last
    t = t.transpose(1, 2).reshape(B, H, W, Fr, cout).permute(0, 3, 1, 2, 4)
    y = (s + t).permute(0, 4, 1, 2, 3)                                 # (B, C, F, H, W) view
    return y.contiguous(memory_format=torch.channels_last_3d)  # (a no-op unless a size-1 dim broke it)


def spatiotemporal_conv_library(x: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor | None,
                                w_t: torch.Tensor, b_t: torch.Tensor | None) -> torch.Tensor:
    """The reference's arithmetic on the vendor libraries, without a layout copy: conv2d on the
    channels-last (B*F, C, H, W) view of the frames (cuDNN on CUDA), then the temporal conv and
    the residual as GEMMs over row ranges of the channels-last storage (`ops.temporal_gemm`).
    Returns (B, Cout, F, H, W) in channels_last_3d. One of the paths `auto` times
    (`LIBRARY_PATHS`), and its choice from `LIBRARY_BELOW` pixel rows up where nothing is timed."""
    check_spatiotemporal_args(x, w_s, b_s, w_t, b_t)
    B, C, Fr, H, W = x.shape
    cout, _, kh, kw = w_s.shape
    x = x.contiguous(memory_format=torch.channels_last_3d)
    frames = conv_passes.frames_view(x)                               # a channels-last view
    s = F.conv2d(frames, w_s, b_s, padding=(kh // 2, kw // 2))
    s = s.view(B, Fr, cout, H, W).permute(0, 2, 1, 3, 4)    # channels_last_3d (s is channels-last)
    return temporal_gemm(s, w_t, b_t)


def spatiotemporal_conv_conv3d(x: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor | None,
                               w_t: torch.Tensor, b_t: torch.Tensor | None) -> torch.Tensor:
    """cuDNN's 3D convolution twice on channels_last_3d tensors: a (1, kh, kw) conv3d gives s,
    a (kt, 1, 1) conv3d over it gives the temporal term, plus the residual. No layout copy; the
    benchmark's "conv3d-cl3d". Returns (B, Cout, F, H, W) in channels_last_3d."""
    check_spatiotemporal_args(x, w_s, b_s, w_t, b_t)
    kh, kw, kt = w_s.shape[2], w_s.shape[3], w_t.shape[2]
    x = x.contiguous(memory_format=torch.channels_last_3d)
    s = F.conv3d(x, w_s.unsqueeze(2), b_s, padding=(0, kh // 2, kw // 2))
    s = s.contiguous(memory_format=torch.channels_last_3d)
    t = F.conv3d(s, w_t[..., None, None], b_t, padding=(kt // 2, 0, 0))
    return (s + t).contiguous(memory_format=torch.channels_last_3d)


def spatiotemporal_conv_passes(x: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor | None,
                               w_t: torch.Tensor, b_t: torch.Tensor | None,
                               plan: conv_passes.PassPlan | None = None) -> torch.Tensor:
    """Each of the op's six passes (spatial and temporal forward, dgrad, wgrad) on its own
    implementation: cuDNN's convolutions, the temporal GEMMs or the Triton tap kernel
    (`ops.conv_passes`). plan names them; by default it is timed once per input signature on a
    GPU where `auto` may time (`conv_passes.tuned_plan`), else `conv_passes.DEFAULT_PLAN`.
    Returns (B, Cout, F, H, W) in channels_last_3d. One of the paths `auto` times."""
    check_spatiotemporal_args(x, w_s, b_s, w_t, b_t)
    return conv_passes.run_passes(x, w_s, b_s, w_t, b_t, plan, may_time=_may_time(x))


LIBRARY_PATHS = {"gemm": spatiotemporal_conv_library, "conv2d+conv1d": spatiotemporal_conv_cudnn,
                 "conv3d": spatiotemporal_conv_conv3d, "passes": spatiotemporal_conv_passes}
"""The library paths `auto` chooses from on a GPU, by name. All compute the reference's
arithmetic and return channels_last_3d; they differ in which cuDNN / cuBLAS calls (and, for
"passes", Triton kernels) do it."""

LIBRARY_BELOW = 16384
"""Where `auto` cannot time the paths (inside a torch.compile trace or a CUDA graph capture,
or with `AUTOTUNE` off), inputs of at least this many pixel rows (B x F x H x W) run the
"gemm" path, smaller ones "conv3d". Measured on an H200 (bf16, batch 1, 16 frames, kt = 3,
forward + backward; benchmarks/results/h200-gpu-quick-2026-11-27-s6/run2), ms:

| layer (pixel rows) | gemm | conv2d+conv1d | conv3d | Triton kernel |
|---|---|---|---|---|
| C320 64x64 (65,536) | 1.87 | 2.32 | 1.65 | 2.02 |
| C1280 32x32 (16,384) | 3.25 | 4.23 | 3.42 | 4.25 |
| C1280 8x8 (1,024) | 1.82 | 1.04 | 0.94 | 1.69 |
| C1280 4x4 (256) | 1.33 | 0.84 | 0.55 | 1.57 |

Forward alone the order changes (64x64: gemm 0.451, conv3d 0.657; 32x32: conv3d 1.07, gemm
1.20), so no rule of size fits both. `auto` therefore times them (`AUTOTUNE`)."""

AUTOTUNE = True
"""Under `auto` on a GPU, outside compilation and graph capture, time each of `LIBRARY_PATHS`
once per input signature (shapes, dtype, biases, device, and whether gradients are wanted:
forward + backward for training, forward alone for inference) and run the fastest from then on,
as `torch.backends.cudnn.benchmark` does for cuDNN's algorithms. The "passes" path first times
each of its passes' implementations (`conv_passes.tuned_plan`), inside its own warm-up call.
`EMU2_CONV_AUTOTUNE=0` turns both off (the `LIBRARY_BELOW` rule then decides, and "passes"
keeps `conv_passes.DEFAULT_PLAN`)."""

_TUNED: dict[tuple, str] = {}
"""The tuner's choices, by input signature (`tuned_choice`)."""


def _static_choice(x: torch.Tensor) -> str:
    return "gemm" if prefers_library(x) else "conv3d"


_signature = conv_passes.signature


def _time_path(fn, args: list, grad: torch.Tensor | None, repeats: int = 3) -> float:
    """Median seconds of `fn(*args)` (and its backward with `grad`), after one warm-up call."""

    def once():
        out = fn(*args)
        if grad is not None:
            out.backward(grad)

    return conv_passes.time_call(once, args[0].device, repeats)


def _may_time(x: torch.Tensor) -> bool:
    """Whether the tuners may time paths for x now: `AUTOTUNE` on, and neither a torch.compile
    trace nor a CUDA graph capture under way."""
    return (AUTOTUNE and os.environ.get("EMU2_CONV_AUTOTUNE", "1") != "0" and not torch.compiler.is_compiling()
            and not (x.is_cuda and torch.cuda.is_current_stream_capturing()))


def tuned_choice(x: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor | None, w_t: torch.Tensor,
                 b_t: torch.Tensor | None) -> str:
    """The name of the `LIBRARY_PATHS` entry `auto` runs for these arguments: the fastest when
    timed on fresh random tensors of the same signature (cached), or `LIBRARY_BELOW`'s rule
    where nothing may be timed."""
    if torch.compiler.is_compiling() or not _may_time(x):  # (first: a trace reads nothing else here)
        return _static_choice(x)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_s, b_s, w_t, b_t))
    key = _signature(x, w_s, b_s, w_t, b_t, training)
    name = _TUNED.get(key)
    if name is None:
        g = torch.Generator(device=x.device).manual_seed(0)

        def fresh(t, fmt=torch.contiguous_format):
            if t is None:
                return None
            r = torch.randn(t.shape, generator=g, device=t.device, dtype=t.dtype) / max(1, t[0].numel()) ** 0.5
            return r.contiguous(memory_format=fmt).requires_grad_(training and t.requires_grad)

        # Identity saved-tensor hooks: the trials' graphs must not reach the hooks of a caller
        # (a non-reentrant activation checkpoint would stash their tensors for recomputation).
        with (torch.enable_grad() if training else torch.no_grad(),
              torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)):
            args = [fresh(x, torch.channels_last_3d), fresh(w_s), fresh(b_s), fresh(w_t), fresh(b_t)]
            grad = None
            if training:
                grad = torch.randn(x.shape[0], w_s.shape[0], *x.shape[2:], generator=g, device=x.device,
                                   dtype=x.dtype).contiguous(memory_format=torch.channels_last_3d)
            seconds = {n: _time_path(fn, args, grad) for n, fn in LIBRARY_PATHS.items()}
        name = _TUNED[key] = min(seconds, key=seconds.get)
    return name


def spatiotemporal_conv(x: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor | None,
                        w_t: torch.Tensor, b_t: torch.Tensor | None) -> torch.Tensor:
    """conv2d per frame then the residual temporal conv: x (B, Cin, F, H, W) -> (B, Cout, F, H, W).

    The Triton path returns a `torch.channels_last_3d` tensor (the reference path returns what
    the PyTorch convolutions give). Under autocast the inputs are cast to the autocast dtype
    and the op runs with autocast off, as a convolution under autocast would."""
    dtype = autocast_dtype(x)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            cast = [None if t is None else t.to(dtype) for t in (x, w_s, b_s, w_t, b_t)]
            return spatiotemporal_conv(*cast)
    check_spatiotemporal_args(x, w_s, b_s, w_t, b_t)
    use_kernel = use_triton("spatiotemporal_conv", x, has_kernel=True)
    if use_kernel and x.dtype not in _kernel.DTYPES:
        if requested_backend("spatiotemporal_conv") == "triton":
            raise ValueError(f"the Triton spatiotemporal_conv runs in {_kernel.DTYPES}, got {x.dtype}")
        use_kernel = False  # auto: the reference handles any dtype
    if not use_kernel:
        return spatiotemporal_conv_reference(x, w_s, b_s, w_t, b_t)
    if requested_backend("spatiotemporal_conv") == "auto":
        return LIBRARY_PATHS[tuned_choice(x, w_s, b_s, w_t, b_t)](x, w_s, b_s, w_t, b_t)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    return _kernel.SpatiotemporalConv.apply(x, w_s.contiguous(), b_s, w_t.contiguous(), b_t)
