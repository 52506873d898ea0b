"""`spatiotemporal_conv` pass by pass: each of the op's six convolutions on whichever
implementation is fastest for the input's shape. One more path that `auto` times on a GPU
(`ops.spatiotemporal_conv.LIBRARY_PATHS`, "passes").

The forward and backward of the op are six convolutions (plus two bias row sums):

    spatial-fwd     s  = conv2d(x, w_s) + b_s                 per frame
    temporal-fwd    y  = s + conv_t(s, w_t) + b_t             the residual inside
    temporal-dgrad  ds = dy + conv_t^T(dy, w_t)               the residual's gradient inside
    spatial-dgrad   dx = conv2d^T(ds, w_s)
    spatial-wgrad   dw_s from x and ds
    temporal-wgrad  dw_t from s and dy

and each has up to three implementations on the channels_last_3d storage, none of which copies
a layout:
- "conv": ATen's convolution (cuDNN on CUDA): conv2d on the (B*F, C, H, W) channels-last view
  of the frames, conv3d with a (kt, 1, 1) kernel for the temporal passes, and their
  `aten.convolution_backward` with only the wanted gradient asked for;
- "gemm": the temporal passes as cuBLAS GEMMs over row ranges of the storage (`ops.temporal_gemm`);
- "triton": the tap-GEMM kernel of `kernels.spatiotemporal_conv` (`_tap_conv`), for the forward
  and dgrad passes (its wgrad kernel measured 4-8x slower than cuDNN and is not a candidate).

Why: session 6 timed each pass alone on an H200 (bf16, batch 1, 16 frames, kt = 3;
benchmarks/results/h200-gpu-quick-2026-11-27-s6/run2, ms), and no implementation wins every pass,
nor does any whole path hold every pass's winner:

| pass | C320 64x64 | C1280 32x32 |
|---|---|---|
| spatial-fwd | conv 0.262, triton 0.424 | conv 0.654, triton 1.009 |
| temporal-fwd | conv 0.135*, triton 0.163, gemm 0.179 | conv 0.282*, gemm 0.346, triton 0.451 |
| temporal-dgrad | triton 0.141, gemm 0.229, conv 0.434* | gemm 0.294, triton 0.418, conv 0.506* |
| spatial-dgrad | triton 0.369, conv 0.499 | conv 0.883, triton 1.001 |
| spatial-wgrad | conv 0.245 | conv 0.658 |
| temporal-wgrad | conv 0.164, gemm 0.209 | gemm 0.320, conv 0.399 |

(* without the residual add, which "conv" here adds as one more elementwise pass.) The winners
add up to 1.29 ms at C320 64x64 and 3.09 ms at C1280 32x32, against 1.65 and 3.25 ms for the
fastest whole paths (conv3d on channels_last_3d; the GEMM path). Whole paths measured 0.3-0.5
ms above the sum of their own passes, so whether this path wins is for `auto`'s timing to say,
shape by shape; nothing here has run on a GPU yet.

The plan (one implementation per pass, `PassPlan`) is chosen by timing each candidate of each
pass once per input signature (`tuned_plan`), on a GPU and where timing is allowed; elsewhere
`DEFAULT_PLAN` (the C1280 32x32 winners above) is used. The Triton candidates are only timed on
CUDA; on the CPU (the tests) a plan naming them runs them through the interpreter.
FlopCounterMode counts the "conv" passes (ATen convolutions) and the "gemm" ones (the
`emu2::temporal_gemm_*` custom ops' formulas) but not the Triton launches.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from emu2_engine.kernels import spatiotemporal_conv as _kernel
from emu2_engine.kernels.spatiotemporal_conv import _from_rows, _rows, _spatial_wgrad_library, _tap_conv
from emu2_engine.ops import temporal_gemm as _temporal_gemm  # noqa: F401 (registers emu2::temporal_gemm_*)

CL3D = torch.channels_last_3d


class PassPlan(NamedTuple):
    """The implementation of each pass, by name (`CANDIDATES`)."""
    spatial_fwd: str
    temporal_fwd: str
    temporal_dgrad: str
    spatial_dgrad: str
    spatial_wgrad: str
    temporal_wgrad: str


CANDIDATES = PassPlan(spatial_fwd=("conv", "triton"), temporal_fwd=("conv", "gemm", "triton"),
                      temporal_dgrad=("conv", "gemm", "triton"), spatial_dgrad=("conv", "triton"),
                      spatial_wgrad=("conv",), temporal_wgrad=("conv", "gemm"))
"""The implementations each pass may run on."""

DEFAULT_PLAN = PassPlan(spatial_fwd="conv", temporal_fwd="conv", temporal_dgrad="gemm", spatial_dgrad="conv",
                        spatial_wgrad="conv", temporal_wgrad="gemm")
"""The plan where nothing may be timed: the per-pass winners at C1280 32x32 in the table above
(the video UNet's most expensive layer)."""

_PLANS: dict[tuple, PassPlan] = {}
"""The tuner's plans, by input signature (`tuned_plan`)."""


def check_plan(plan, dtype: torch.dtype) -> PassPlan:
    """plan (six implementation names, in `PassPlan`'s order) as a `PassPlan` for inputs of
    dtype, or ValueError saying what is wrong with it."""
    if isinstance(plan, (str, dict)) or not hasattr(plan, "__len__") or len(plan) != len(PassPlan._fields):
        raise ValueError(f"a spatiotemporal_conv plan names one implementation for each of the "
                         f"{len(PassPlan._fields)} passes {PassPlan._fields}, got {plan!r}")
    plan = PassPlan(*plan)
    for name, impl, allowed in zip(PassPlan._fields, plan, CANDIDATES):
        if impl not in allowed:
            raise ValueError(f"spatiotemporal_conv pass {name} runs on one of {allowed}, got {impl!r}")
        if impl == "triton" and dtype not in _kernel.DTYPES:
            raise ValueError(f"spatiotemporal_conv pass {name} on triton runs in {_kernel.DTYPES}, got {dtype}")
    return plan


# ---- the passes. Tensors are (B, C, F, H, W) in channels_last_3d; results are too. ----

def frames_view(t: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) channels_last_3d -> the (B*F, C, H, W) channels-last view of its frames."""
    B, C, Fr, H, W = t.shape
    return t.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)


def _unframes(t4: torch.Tensor, B: int, Fr: int) -> torch.Tensor:
    """The inverse of `_frames` for a (B*F, C, H, W) result: (B, C, F, H, W) channels_last_3d."""
    t4 = t4.contiguous(memory_format=torch.channels_last)   # (a no-op for a channels-last result)
    return t4.view(B, Fr, *t4.shape[1:]).permute(0, 2, 1, 3, 4)


def _cl3d(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=CL3D)


def _temporal_weight5(w_t: torch.Tensor) -> torch.Tensor:
    """w_t (C, C, kt) as the (C, C, kt, 1, 1) conv3d weight, channels_last_3d like the input."""
    return w_t[..., None, None].contiguous(memory_format=CL3D)


def _spatial_taps(w_s: torch.Tensor, adjoint: bool) -> torch.Tensor:
    """w_s (Cout, Cin, kh, kw) as the tap kernel's (kh*kw, K, N) weight; adjoint: flipped and
    transposed, the weight of the input gradient (K = Cout, N = Cin)."""
    cout, cin, kh, kw = w_s.shape
    if adjoint:
        return w_s.flip(2, 3).permute(2, 3, 0, 1).reshape(kh * kw, cout, cin).contiguous()
    return w_s.permute(2, 3, 1, 0).reshape(kh * kw, cin, cout).contiguous()


def spatial_fwd(impl: str, x, w_s, b_s):
    B, _, Fr, H, W = x.shape
    kh, kw = w_s.shape[2:]
    if impl == "conv":
        return _unframes(F.conv2d(frames_view(x), w_s, b_s, padding=(kh // 2, kw // 2)), B, Fr)
    s = _tap_conv(_rows(x), _spatial_taps(w_s, adjoint=False), b_s, None, (Fr, H, W), (1, kh, kw))
    return _from_rows(s, B, Fr, H, W)


def temporal_fwd(impl: str, s, w_t, b_t):
    B, _, Fr, H, W = s.shape
    kt = w_t.shape[2]
    if impl == "conv":
        return _cl3d(s + F.conv3d(s, _temporal_weight5(w_t), b_t, padding=(kt // 2, 0, 0)))
    if impl == "gemm":   # (the custom op: FlopCounterMode counts its GEMMs, not seeing in-place addmm_)
        return torch.ops.emu2.temporal_gemm_fwd(s, w_t, b_t)
    rows = _rows(s)
    y = _tap_conv(rows, w_t.permute(2, 1, 0).contiguous(), b_t, rows, (Fr, H, W), (kt, 1, 1))
    return _from_rows(y, B, Fr, H, W)


def temporal_dgrad(impl: str, dy, w_t):
    """ds = dy + the adjoint temporal conv of dy."""
    B, _, Fr, H, W = dy.shape
    kt = w_t.shape[2]
    if impl == "conv":
        adj = torch.ops.aten.convolution_backward(
            dy, dy, _temporal_weight5(w_t), None, [1, 1, 1], [kt // 2, 0, 0], [1, 1, 1], False,
            [0, 0, 0], 1, [True, False, False])[0]
        return _cl3d(dy + adj)
    if impl == "gemm":
        return torch.ops.emu2.temporal_gemm_bwd(dy, dy, w_t, True, False, False)[0]
    rows = _rows(dy)
    ds = _tap_conv(rows, w_t.flip(2).permute(2, 0, 1).contiguous(), None, rows, (Fr, H, W), (kt, 1, 1))
    return _from_rows(ds, B, Fr, H, W)


def spatial_dgrad(impl: str, ds, x, w_s):
    B, _, Fr, H, W = x.shape
    kh, kw = w_s.shape[2:]
    if impl == "conv":
        dx = torch.ops.aten.convolution_backward(
            frames_view(ds), frames_view(x), w_s, None, [1, 1], [kh // 2, kw // 2], [1, 1], False, [0, 0], 1,
            [True, False, False])[0]
        return _unframes(dx, B, Fr)
    dx = _tap_conv(_rows(ds), _spatial_taps(w_s, adjoint=True), None, None, (Fr, H, W), (1, kh, kw))
    return _from_rows(dx, B, Fr, H, W)


def spatial_wgrad(impl: str, x, ds, w_s):
    return _spatial_wgrad_library(x, _rows(ds), w_s).to(w_s.dtype).contiguous()


def temporal_wgrad(impl: str, s, dy, w_t):
    kt = w_t.shape[2]
    if impl == "conv":
        w5 = _temporal_weight5(w_t)
        dw = torch.ops.aten.convolution_backward(
            dy, s, w5, None, [1, 1, 1], [kt // 2, 0, 0], [1, 1, 1], False, [0, 0, 0], 1,
            [False, True, False])[1]
        return dw.reshape(w_t.shape).contiguous()
    return torch.ops.emu2.temporal_gemm_bwd(dy, s, w_t, False, True, False)[1]   # (its batched GEMMs)


def _row_sum(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bias gradient: the sum over the pixel rows, in fp32 (fp64 stays fp64), cast to dtype."""
    rows = _rows(t)
    return rows.sum(0, dtype=torch.promote_types(rows.dtype, torch.float32)).to(dtype)


class PassConv(torch.autograd.Function):
    """y from x (channels_last_3d), w_s, b_s, w_t, b_t, each pass on the plan's implementation;
    saves x and s for backward."""

    @staticmethod
    def forward(ctx, x, w_s, b_s, w_t, b_t, plan: PassPlan):
        s = spatial_fwd(plan.spatial_fwd, x, w_s, b_s)
        y = temporal_fwd(plan.temporal_fwd, s, w_t, b_t)
        ctx.plan = plan
        ctx.save_for_backward(x, s, w_s, w_t)
        # the GEMM and Triton passes return a channels_last_3d view of their (P, C) buffer: an
        # output that is a view could not be changed in place by the caller (h += skip)
        return y.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, s, w_s, w_t = ctx.saved_tensors
        plan = ctx.plan
        need_dx, need_dw_s, need_db_s, need_dw_t, need_db_t = ctx.needs_input_grad[:5]
        dy = _cl3d(dy)
        dx = dw_s = db_s = dw_t = db_t = None
        if need_dw_t:
            dw_t = temporal_wgrad(plan.temporal_wgrad, s, dy, w_t)
        if need_db_t:
            db_t = _row_sum(dy, w_t.dtype)
        if need_dx or need_dw_s or need_db_s:
            ds = temporal_dgrad(plan.temporal_dgrad, dy, w_t)
            if need_dx:
                dx = spatial_dgrad(plan.spatial_dgrad, ds, x, w_s)
            if need_dw_s:
                dw_s = spatial_wgrad(plan.spatial_wgrad, x, ds, w_s)
            if need_db_s:
                db_s = _row_sum(ds, w_s.dtype)
        return dx, dw_s, db_s, dw_t, db_t, None


def signature(x, w_s, b_s, w_t, b_t, training: bool) -> tuple:
    """What a timing depends on: shapes, biases, dtype, device, and forward alone or with backward."""
    return (tuple(x.shape), tuple(w_s.shape), w_t.shape[2], b_s is not None, b_t is not None, x.dtype,
            x.device, training)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of fn() after one warm-up call: CUDA events on a GPU, the wall clock elsewhere."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _candidates(field: str, x: torch.Tensor) -> tuple[str, ...]:
    """The implementations of pass `field` the tuner times on x's device: Triton on CUDA only."""
    allowed = getattr(CANDIDATES, field)
    if x.is_cuda and x.dtype in _kernel.DTYPES:
        return allowed
    return tuple(impl for impl in allowed if impl != "triton")


def tune_plan(x, w_s, b_s, w_t, b_t, training: bool, timer=time_call) -> PassPlan:
    """Time every candidate of every pass (the forward passes alone unless training) on tensors
    of these shapes and return the fastest of each; passes not timed keep `DEFAULT_PLAN`'s choice.
    The arguments are only read."""
    with torch.no_grad():
        x = _cl3d(x)
        g = torch.Generator(device=x.device).manual_seed(0)
        s = _cl3d(torch.randn(x.shape[0], w_s.shape[0], *x.shape[2:], generator=g, device=x.device,
                              dtype=x.dtype))
        dy = torch.randn(s.shape, generator=g, device=x.device, dtype=x.dtype).contiguous(memory_format=CL3D)
        calls = {
            "spatial_fwd": lambda impl: spatial_fwd(impl, x, w_s, b_s),
            "temporal_fwd": lambda impl: temporal_fwd(impl, s, w_t, b_t),
            "temporal_dgrad": lambda impl: temporal_dgrad(impl, dy, w_t),
            "spatial_dgrad": lambda impl: spatial_dgrad(impl, s, x, w_s),   # s stands in for ds
            "spatial_wgrad": lambda impl: spatial_wgrad(impl, x, s, w_s),
            "temporal_wgrad": lambda impl: temporal_wgrad(impl, s, dy, w_t),
        }
        chosen = DEFAULT_PLAN._asdict()
        for field, call in calls.items():
            if not training and field not in ("spatial_fwd", "temporal_fwd"):
                continue
            options = _candidates(field, x)
            if len(options) > 1:
                seconds = {impl: timer(lambda impl=impl: call(impl), x.device) for impl in options}
                chosen[field] = min(seconds, key=seconds.get)
    return PassPlan(**chosen)


def _tunes_on(x: torch.Tensor) -> bool:
    """Whether plans are timed for x's device: on a GPU (a CPU's timings would not say what a
    GPU should run, and the CPU runs the op's reference under `auto` anyway)."""
    return x.is_cuda


def tuned_plan(x, w_s, b_s, w_t, b_t, may_time: bool) -> PassPlan:
    """The plan for these arguments: tuned once per signature on a GPU where `may_time`
    (cached), else `DEFAULT_PLAN`."""
    if not (may_time and _tunes_on(x)):
        return DEFAULT_PLAN
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_s, b_s, w_t, b_t))
    key = signature(x, w_s, b_s, w_t, b_t, training)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = tune_plan(x, w_s, b_s, w_t, b_t, training)
    return plan


def run_passes(x, w_s, b_s, w_t, b_t, plan: PassPlan | None, may_time: bool) -> torch.Tensor:
    """The op's arithmetic with each pass on `plan`'s implementation (None: `tuned_plan`), the
    arguments already checked (`ops.spatiotemporal_conv.spatiotemporal_conv_passes` is the
    public path). Returns (B, Cout, F, H, W) in channels_last_3d."""
    plan = tuned_plan(x, w_s, b_s, w_t, b_t, may_time) if plan is None else check_plan(plan, x.dtype)
    return PassConv.apply(_cl3d(x), w_s, b_s, w_t, b_t, plan)
