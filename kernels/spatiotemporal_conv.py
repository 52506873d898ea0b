"""`spatiotemporal_conv`: a per-frame 2D convolution and a temporal convolution over frames with
the residual, as implicit GEMMs over a channels-last 3D tensor.

What it computes (`reference` below; the op is `emu2_engine.ops.spatiotemporal_conv`):
    s = conv2d(x[:, :, f], w_s, b_s, padding="same")           for every frame f
    y = s + conv1d_over_frames(s, w_t, b_t, padding="same")    (zeros beyond the clip's ends)

Layout: x is (B, Cin, F, H, W) in `torch.channels_last_3d`, i.e. a row-major (P, Cin) matrix of
P = B*F*H*W pixel rows. Every convolution here is one kernel, `_tap_conv_kernel`: an implicit
GEMM over the pixel rows whose K loop runs over the taps of a (KT, KH, KW) box and, inside a
tap, over BLOCK_K channels. A tap is a row offset (dt*H*W + dy*W + dx) and a validity mask (the
shifted pixel stays inside its clip, frame and image), so "same" zero padding costs no copy and
no layout shuffle. The four convolution passes are that kernel with different weights:

- forward spatial:  s = taps(1, KH, KW) of x with w_s, + b_s                 (writes s)
- forward temporal: y = taps(KT, 1, 1) of s with w_t, + b_t, + s (residual)   (writes y)
- backward temporal dgrad: ds = dy + taps(KT, 1, 1) of dy with w_t flipped and transposed
- backward spatial dgrad:  dx = taps(1, KH, KW) of ds with w_s flipped and transposed
(flipping the taps and swapping the channel axes turns a convolution into its adjoint; with
odd kernels and "same" padding the tap offsets stay the same.)

The weight gradients run, by default (`WGRAD = "torch"`), on the vendor libraries, because the
Triton wgrad kernel measured 5-8x slower than cuDNN (H200, bf16, 2026-11-27, the "first
version" report in benchmarks/results/h200-gpu-quick-2026-11-27-spatiotemporal_conv/): spatial
wgrad 1.84 ms vs cuDNN 0.223 ms at 320 channels (16 frames of 64x64), 4.42 vs 0.675 ms at 1280
channels (16 frames of 32x32); temporal wgrad 0.718 vs 0.135 and 1.70 vs 0.437 ms; so forward
+ backward took 3.79 / 9.30 ms against 1.63 / 3.45 ms for two conv3d calls on channels_last_3d.
With the library weight gradients it took 1.86 / 4.44 ms, and 1.84 / 4.14 ms with the wide
tiles of `_blocks` (same card type and day: the `library-wgrad/` and `wide-tiles/` reports).
- temporal: for tap dt the rows p whose frame f has f + dt inside the clip are, per batch
  element, ONE contiguous range of pixel rows (frames max(0, -dt) .. F - max(0, dt)), so
  dW_t[:, :, tap] = sum_b dy_b.T @ s_b(shifted by dt frames) is one batched cuBLAS GEMM over
  strided (B, rows, C) views of the channels-last storage: no copies, fp32 results
  (`_temporal_wgrad_gemms`).
- spatial: cuDNN's own weight gradient of conv2d (aten.convolution_backward, weight only) on
  the (B*F, C, H, W) channels-last views of x and ds (`_spatial_wgrad_library`); ATen picks the
  channels-last algorithm from the input's strides, so nothing is copied.
- bias gradients: a sum over the pixel rows in fp32.
On the CPU the same code runs on ATen's CPU kernels (it is what the interpreter tests cover).
`WGRAD = "triton"` selects `_tap_wgrad_kernel` instead: for every tap, dW_tap (C, N) =
in_shifted.T @ g, a GEMM that reduces over the pixel rows, split over SPLIT slices of rows when
the (tap, tile) grid alone would not fill the GPU, the partial sums (fp32) added by torch, and
the bias gradient accumulated by the programs of the first channel tile of the first tap from
the g tiles they load anyway. It is kept, tested in the interpreter and on GPUs, and timed by
the benchmark ("triton-wgrad-kernel"), as the starting point for a wgrad that fuses more than
the libraries can; why it loses by that much has not been profiled yet.

Small frames (the video UNet's deepest levels: 16 frames of 8x8 or 4x4 latents are 1024 or 256
pixel rows) give too few (pixel tile, channel tile) programs to fill the GPU, so the tap GEMMs
split their K loop over a second grid axis (`_conv_split`): each slice writes fp32 partial sums,
which torch adds in a fixed order (deterministic) before the bias and the residual. Unmeasured
on a GPU as of this writing; the gpu-quick benchmark times both deep shapes.

Why two forward kernels, not one fused pass: the temporal GEMM reduces over all Cout channels
of s at kt frames, so a fused tile would have to compute s for every output channel at kt
frames (kt x the spatial FLOPs, or a cross-program exchange of the s tiles); at 320-1280
channels writing s once (it is saved for backward anyway) and reading it back through L2 is
the cheaper design. docs/kernels/spatiotemporal_conv.md gives the byte and FLOP floors.

Accumulation is fp32 in every kernel; inputs fp16, bf16 or fp32 (fp32 dots in IEEE precision,
so the kernel matches the fp32 reference, not TF32's).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes the kernels take (tl.dot has no fp64 path)."""
WGRAD_CHOICES = ("torch", "triton")
WGRAD = "torch"
"""Who computes the weight gradients: "torch" (cuBLAS GEMMs per temporal tap and cuDNN's conv2d
weight gradient on CUDA, ATen's kernels on the CPU; the fast path, see the module docstring) or
"triton" (`_tap_wgrad_kernel`). Read at every backward call."""


def reference(x, w_s, b_s, w_t, b_t):
    """The definition the kernels are tested against (conv2d per frame, conv1d over frames)."""
    from emu2_engine.ops.spatiotemporal_conv import spatiotemporal_conv_reference

    return spatiotemporal_conv_reference(x, w_s, b_s, w_t, b_t)


# -- tile sizes ----------------------------------------------------------------------------------
def _blocks(n_out: int, c_in: int, dtype: torch.dtype, residual: bool) -> dict:
    """Tile sizes and launch options for a tap GEMM with n_out output and c_in input channels
    (residual: whether its epilogue adds a residual tile).

    On an H100: 128 pixel rows x 128 output channels per program (64 fp32 accumulator registers
    per thread at 8 warps) with BLOCK_K = 64 channels per step at 16 bits: 3 stages of A and B
    tiles are 3 x 32 KB = 96 KB of shared memory; fp32 takes BLOCK_K = 32 to stay at that size.
    Wide 16-bit layers whose channel count is a multiple of 256 (>= 1024: the UNet's 1280) take
    128 x 256 tiles in the passes without a residual (the spatial forward and dgrad: 188
    registers, 144 KB, no spills): on an H200 (2026-11-27) the 1280-channel spatial forward took
    1.03 ms with them against 1.17 ms with 128 x 128 (256 x 128: 1.13; 128 x 128 at 4 warps and
    4 stages: 1.60), timed one after the other in one gpu-quick run. With the residual tile in
    the epilogue (temporal forward and dgrad) ptxas needs 255 registers and spills 44 bytes,
    so those keep 128 x 128.
    Narrow layers get narrower tiles (never below tl.dot's 16). The interpreter gets small
    tiles: it runs each program in numpy, and tests use tiny shapes.
    """
    def fit(n, cap):
        return max(16, min(cap, triton.next_power_of_2(n)))

    if _INTERPRET:
        return dict(BLOCK_M=64, BLOCK_N=fit(n_out, 32), BLOCK_K=fit(c_in, 32), num_warps=4,
                    num_stages=1)
    block_k = fit(c_in, 32 if dtype == torch.float32 else 64)
    block_n = fit(n_out, 128)
    if dtype != torch.float32 and not residual and n_out >= 1024 and n_out % 256 == 0:
        block_n = 256  # no partial N tiles: 320 or 640 channels would waste 37% or 17% of them
    return dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=8 if block_n >= 128 else 4, num_stages=3)


def _wgrad_blocks(c_in: int, n_out: int, dtype: torch.dtype) -> dict:
    """Tile sizes of the weight-gradient GEMM: a (c_in x n_out) tile per program, reducing over
    BLOCK_K pixel rows a step (the rows are the K axis here, so BLOCK_K is wide)."""
    def fit(n, cap):
        return max(16, min(cap, triton.next_power_of_2(n)))

    if _INTERPRET:
        return dict(BLOCK_C=fit(c_in, 32), BLOCK_N=fit(n_out, 32), BLOCK_K=64, num_warps=4,
                    num_stages=1)
    block_c, block_n = fit(c_in, 128), fit(n_out, 128)
    return dict(BLOCK_C=block_c, BLOCK_N=block_n, BLOCK_K=32 if dtype == torch.float32 else 64,
                num_warps=8 if block_c * block_n >= 128 * 128 else 4, num_stages=3)


WIDE_TILE_CANDIDATES = (
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),  # the first default
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
)
"""16-bit tiles for wide layers that the gpu-quick benchmark times on the 1280-channel spatial
forward (the pass furthest behind cuDNN: 385 vs 724 TFLOP/s on an H200), so one GPU run says
which `_blocks` should pick. ptxas (triton 3.7.1, sm_90, bf16, 3x3 taps) reports no spills for
any: 114 / 188 / 236 / 226 registers per thread and 96 / 144 / 144 / 128 KB of shared memory,
i.e. two programs per SM for the first, one for the others; none is better on those grounds
alone. Timed on an H200 (2026-11-27): 1.17 / 1.03 / 1.13 / 1.60 ms, so `_blocks` takes the
second for wide layers (in the passes without a residual)."""


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a small split still exercises the split-K path


# -- kernels -------------------------------------------------------------------------------------
@triton.jit
def _tap_conv_kernel(in_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, P, NF, H, W, C_IN, N_OUT,
                     ITERS_PER_SPLIT,
                     KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr,
                     SPLIT_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[p, n] = bias[n] + res[p, n] + sum_{tap, c} in[p + shift(tap), c] * w[tap, c, n]
    # in (P, C_IN), res/out (P, N_OUT) row-major; w (KT*KH*KW, C_IN, N_OUT) row-major.
    # SPLIT_K: program_id(1) sums only its ITERS_PER_SPLIT steps of the K loop and writes fp32
    # partial sums to out (split, P, N_OUT), with no bias and no residual (the launcher adds them).
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_n = tl.cdiv(N_OUT, BLOCK_N)
    pid_m = pid // tiles_n  # output-channel tiles fastest: they share the same input rows in L2
    pid_n = pid % tiles_n
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < P
    n_ok = n < N_OUT
    col = m % W
    row = (m // W) % H
    frame = (m // (W * H)) % NF
    chunks = tl.cdiv(C_IN, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # One flat loop over (tap, channel chunk) so the compiler pipelines all of K at once.
    total = KT * KH * KW * chunks
    first = 0
    last = total
    if SPLIT_K:
        first = split * ITERS_PER_SPLIT
        last = tl.minimum(first + ITERS_PER_SPLIT, total)
    for it in range(first, last):
        tap = it // chunks
        c = (it % chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
        dt = tap // (KH * KW) - KT // 2
        dy = (tap // KW) % KH - KH // 2
        dx = tap % KW - KW // 2
        ok = (m_ok & (frame + dt >= 0) & (frame + dt < NF) & (row + dy >= 0) & (row + dy < H)
              & (col + dx >= 0) & (col + dx < W))
        src = (m + (dt * H + dy) * W + dx).to(tl.int64)
        c_ok = c < C_IN
        a = tl.load(in_ptr + src[:, None] * C_IN + c[None, :], mask=ok[:, None] & c_ok[None, :],
                    other=0.0)
        b = tl.load(w_ptr + (tap * C_IN + c).to(tl.int64)[:, None] * N_OUT + n[None, :],
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_offs = m.to(tl.int64)[:, None] * N_OUT + n[None, :]
    mn = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K:
        out_offs += split.to(tl.int64) * P * N_OUT
    if HAS_RES:
        acc += tl.load(res_ptr + out_offs, mask=mn, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mn)


@triton.jit
def _tap_wgrad_kernel(in_ptr, g_ptr, dw_ptr, db_ptr, P, NF, H, W, C_IN, N_OUT, ROWS_PER_SPLIT,
                      KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                      HAS_DB: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # dw[split, tap, c, n] = sum over this split's rows p of in[p + shift(tap), c] * g[p, n]
    # db[split, n] = sum over the split's rows of g[p, n] (first tap, first channel tile only).
    pid = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    tiles_n = tl.cdiv(N_OUT, BLOCK_N)
    pid_c = pid // tiles_n
    pid_n = pid % tiles_n
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < C_IN
    n_ok = n < N_OUT
    dt = tap // (KH * KW) - KT // 2
    dy = (tap // KW) % KH - KH // 2
    dx = tap % KW - KW // 2
    shift = (dt * H + dy) * W + dx
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = split * ROWS_PER_SPLIT
    for r0 in range(first, first + ROWS_PER_SPLIT, BLOCK_K):
        m = r0 + tl.arange(0, BLOCK_K)
        m_ok = m < P
        col = m % W
        row = (m // W) % H
        frame = (m // (W * H)) % NF
        ok = (m_ok & (frame + dt >= 0) & (frame + dt < NF) & (row + dy >= 0) & (row + dy < H)
              & (col + dx >= 0) & (col + dx < W))
        src = (m + shift).to(tl.int64)
        a = tl.load(in_ptr + src[None, :] * C_IN + c[:, None], mask=c_ok[:, None] & ok[None, :],
                    other=0.0)  # (BLOCK_C, BLOCK_K): in_shifted.T
        g = tl.load(g_ptr + m.to(tl.int64)[:, None] * N_OUT + n[None, :],
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, g, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, g, acc)
        if HAS_DB:
            bias_acc += tl.sum(g.to(tl.float32), axis=0)
    base = (split * (KT * KH * KW) + tap).to(tl.int64) * C_IN * N_OUT
    tl.store(dw_ptr + base + c.to(tl.int64)[:, None] * N_OUT + n[None, :], acc,
             mask=c_ok[:, None] & n_ok[None, :])
    if HAS_DB:
        if (pid_c == 0) & (tap == 0):
            tl.store(db_ptr + split * N_OUT + n, bias_acc, mask=n_ok)


# -- launchers -----------------------------------------------------------------------------------
def _conv_split(P: int, n_out: int, c_in: int, n_taps: int, cfg: dict, device: torch.device) -> int:
    """How many slices of the K loop (taps x channel chunks) a tap GEMM is split into: 1 when its
    (pixel tile, channel tile) grid fills the GPU or `SPLIT_K` is off, else as many slices as
    fit in one wave (programs <= SMs: the wide tiles run one program per SM), with at least
    `_MIN_SPLIT_ITERS` K steps each and at most `_MAX_SPLIT` slices. 16 frames of 8x8 latents at
    1280 channels are 1,024 pixel rows, 40 programs of 128 x 256 on 132 SMs: split 3 ways they
    are 120, for the price of writing and re-reading fp32 partial sums."""
    tiles = triton.cdiv(P, cfg["BLOCK_M"]) * triton.cdiv(n_out, cfg["BLOCK_N"])
    iters = n_taps * triton.cdiv(c_in, cfg["BLOCK_K"])
    sms = _num_sms(device)
    if not SPLIT_K or tiles >= sms:
        return 1
    return max(1, min(sms // tiles, iters // _MIN_SPLIT_ITERS, _MAX_SPLIT))


_MAX_SPLIT = 3
"""Most slices of one K loop. On an H200 (bf16, 1280 channels, 16 frames; benchmarks/results/
h200-gpu-quick-2026-11-27-s4) 3 slices at 8x8 made forward + backward 1.26x faster than no
split, and 13 slices at 4x4 made it 0.84x as fast (forward 0.56x): the fp32 partial sums cost
more than the idle SMs. Between 3 and 13 is unmeasured. Under `auto` the op no longer runs the
kernel on a GPU (`ops.spatiotemporal_conv.LIBRARY_PATHS`); the split applies where it is forced
(`EMU2_KERNELS=spatiotemporal_conv=triton`)."""

_MIN_SPLIT_ITERS = 4
"""Fewest K steps per split slice: a guess, not measured (the pipeline's prologue and the
partial-sum traffic should outweigh what the extra programs add below a few steps); on the
GPU shapes of the video UNet (K >= 9 x 320 / 64 = 45 steps) it never binds."""

SPLIT_K = True
"""Whether `_conv_split` may split at all (the benchmark's "triton-nosplit" provider turns it
off to time the split's effect). Read at every launch."""


def _tap_conv(inp, weight, bias, residual, geometry, taps, cfg=None, split=None):
    """One tap GEMM: inp (P, C_IN), weight (taps[0]*taps[1]*taps[2], C_IN, N_OUT) contiguous ->
    (P, N_OUT) in inp's dtype. geometry = (F, H, W) of the pixel rows; taps = (KT, KH, KW);
    cfg: tiles and launch options (default `_blocks`; the benchmark passes its candidates);
    split: slices of the K loop (default `_conv_split`). Split, the slices' fp32 partial sums
    are added by torch (in a fixed order: deterministic), then the bias and the residual."""
    P, c_in = inp.shape
    n_out = weight.shape[2]
    out = inp.new_empty(P, n_out)
    if P == 0:
        return out
    cfg = cfg or _blocks(n_out, c_in, inp.dtype, residual is not None)
    n_taps = taps[0] * taps[1] * taps[2]
    iters = n_taps * triton.cdiv(c_in, cfg["BLOCK_K"])
    split = split or _conv_split(P, n_out, c_in, n_taps, cfg, inp.device)
    per_split = triton.cdiv(iters, split)
    split = triton.cdiv(iters, per_split)  # no empty slice
    tiles = triton.cdiv(P, cfg["BLOCK_M"]) * triton.cdiv(n_out, cfg["BLOCK_N"])
    partial = split > 1
    target = torch.empty(split, P, n_out, device=inp.device, dtype=torch.float32) if partial else out
    dummy = target  # never read when the matching HAS_ flag is off
    _tap_conv_kernel[(tiles, split)](
        inp, weight, bias.contiguous() if bias is not None and not partial else dummy,
        residual if residual is not None and not partial else dummy, target, P, *geometry, c_in, n_out,
        per_split, KT=taps[0], KH=taps[1], KW=taps[2],
        HAS_BIAS=bias is not None and not partial, HAS_RES=residual is not None and not partial,
        IEEE=inp.dtype == torch.float32, SPLIT_K=partial, **cfg)
    if not partial:
        return out
    acc = target.sum(0)
    if bias is not None:
        acc += bias.float()
    if residual is not None:
        acc += residual.float()
    return out.copy_(acc)


def _tap_wgrad(inp, grad, geometry, taps, with_bias: bool):
    """Weight (and bias) gradient of a tap GEMM: inp (P, C_IN), grad (P, N_OUT) ->
    (dW (taps, C_IN, N_OUT) fp32, db (N_OUT,) fp32 or None)."""
    P, c_in = inp.shape
    n_out = grad.shape[1]
    n_taps = taps[0] * taps[1] * taps[2]
    cfg = _wgrad_blocks(c_in, n_out, inp.dtype)
    tiles = triton.cdiv(c_in, cfg["BLOCK_C"]) * triton.cdiv(n_out, cfg["BLOCK_N"])
    # Enough (tile, tap, split) programs for two waves over the GPU, and at least 8 K steps each.
    row_steps = triton.cdiv(max(P, 1), cfg["BLOCK_K"])
    split = max(1, min(triton.cdiv(2 * _num_sms(inp.device), tiles * n_taps), row_steps // 8))
    rows_per_split = triton.cdiv(row_steps, split) * cfg["BLOCK_K"]
    split = triton.cdiv(max(P, 1), rows_per_split)
    dw = torch.empty(split, n_taps, c_in, n_out, device=inp.device, dtype=torch.float32)
    db = torch.empty(split, n_out, device=inp.device, dtype=torch.float32) if with_bias else None
    _tap_wgrad_kernel[(tiles, n_taps, split)](
        inp, grad, dw, db if with_bias else dw, P, *geometry, c_in, n_out, rows_per_split,
        KT=taps[0], KH=taps[1], KW=taps[2], HAS_DB=with_bias, IEEE=inp.dtype == torch.float32,
        **cfg)
    if split == 1:
        return dw[0], (db[0] if with_bias else None)
    return dw.sum(0), (db.sum(0) if with_bias else None)


def _bmm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b per batch element in fp32 (fp64 inputs: in fp64). On CUDA cuBLAS writes 16-bit
    products' fp32 accumulators as they are (out_dtype), so the sum over batch elements is not
    rounded to 16 bits per term; the CPU has no such kernel, so 16-bit inputs are upcast there."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.bmm(a, b)
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def _temporal_wgrad_gemms(s: torch.Tensor, dy: torch.Tensor, kt: int) -> torch.Tensor:
    """The temporal weight gradient (Cout, Cin, kt) in fp32 from s (B, Cin, F, H, W) and the
    output gradient dy (B, Cout, F, H, W), both channels_last_3d.

    Tap t shifts by dt = t - kt // 2 frames; the output frames f with f + dt inside the clip are
    max(0, -dt) .. F - max(0, dt), one contiguous range of pixel rows per batch element, so
    dw[:, :, t] = sum_b dy_b[rows].T @ s_b[rows shifted by dt frames] is one batched GEMM over
    strided views of the two tensors' storage (cuBLAS reads them transposed in place)."""
    B, cin, Fr, H, W = s.shape
    hw = H * W
    s3 = s.permute(0, 2, 3, 4, 1).reshape(B, Fr * hw, cin)       # views for channels_last_3d
    g3 = dy.permute(0, 2, 3, 4, 1).reshape(B, Fr * hw, dy.shape[1])
    taps = []
    for t in range(kt):
        dt = t - kt // 2
        lo, hi = max(0, -dt), Fr - max(0, dt)
        if hi <= lo:  # the shift leaves the clip: this tap never touches a valid frame
            taps.append(s.new_zeros(dy.shape[1], cin, dtype=torch.float32))
            continue
        g = g3[:, lo * hw:hi * hw].transpose(1, 2)                 # (B, Cout, rows)
        a = s3[:, (lo + dt) * hw:(hi + dt) * hw]                   # (B, rows, Cin)
        taps.append(_bmm_fp32(g, a).sum(0))
    return torch.stack(taps, dim=2)


def _spatial_wgrad_library(x: torch.Tensor, ds: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
    """The spatial weight gradient (Cout, Cin, kh, kw) in x's dtype: the library's weight
    gradient of conv2d (cuDNN on CUDA) on the (B*F, C, H, W) views of x (B, Cin, F, H, W) and of
    the ds rows (P, Cout), both channels-last, so ATen picks its channels-last algorithm and
    copies nothing. Only the weight gradient is asked for (output_mask)."""
    B, cin, Fr, H, W = x.shape
    kh, kw = w_s.shape[2:]
    frames = x.permute(0, 2, 1, 3, 4).reshape(B * Fr, cin, H, W)
    grad = ds.view(B * Fr, H, W, ds.shape[1]).permute(0, 3, 1, 2)
    return torch.ops.aten.convolution_backward(
        grad, frames, w_s, None, [1, 1], [kh // 2, kw // 2], [1, 1], False, [0, 0], 1,
        [False, True, False])[1]


def _wgrad_choice() -> str:
    if WGRAD not in WGRAD_CHOICES:
        raise ValueError(f"spatiotemporal_conv.WGRAD must be one of {WGRAD_CHOICES}, got {WGRAD!r}")
    return WGRAD


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) in channels_last_3d -> the (B*F*H*W, C) row-major view of its storage."""
    B, C, Fr, H, W = t.shape
    return t.permute(0, 2, 3, 4, 1).reshape(B * Fr * H * W, C)


def _from_rows(rows: torch.Tensor, B: int, Fr: int, H: int, W: int) -> torch.Tensor:
    """The inverse of `_rows`: a (B, C, F, H, W) view in channels_last_3d."""
    return rows.view(B, Fr, H, W, rows.shape[1]).permute(0, 4, 1, 2, 3)


def _dense(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of the weight gradient t (permuted or channels-last, fp32 or already in
    dtype) in dtype, in one pass."""
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


def _empty_cl(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last_3d)


@torch.library.custom_op("emu2::spatiotemporal_conv_fwd", mutates_args=())
def _spatiotemporal_conv_fwd(x: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor | None,
                             w_t: torch.Tensor, b_t: torch.Tensor | None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, Cin, F, H, W) channels_last_3d -> (y, s), both (B, Cout, F, H, W) channels_last_3d;
    s (the spatial conv) is what backward needs."""
    B, _, Fr, H, W = x.shape
    cout, _, kh, kw = w_s.shape
    kt = w_t.shape[2]
    geometry = (Fr, H, W)
    ws = w_s.permute(2, 3, 1, 0).reshape(kh * kw, w_s.shape[1], cout).contiguous()
    wt = w_t.permute(2, 1, 0).contiguous()  # (kt, Cout in, Cout out)
    s = _tap_conv(_rows(x), ws, b_s, None, geometry, (1, kh, kw))
    y = _tap_conv(s, wt, b_t, s, geometry, (kt, 1, 1))
    return _from_rows(y, B, Fr, H, W), _from_rows(s, B, Fr, H, W)


@_spatiotemporal_conv_fwd.register_fake
def _(x, w_s, b_s, w_t, b_t):
    B, _, Fr, H, W = x.shape
    shape = (B, w_s.shape[0], Fr, H, W)
    return _empty_cl(shape, x), _empty_cl(shape, x)


@torch.library.custom_op("emu2::spatiotemporal_conv_bwd", mutates_args=())
def _spatiotemporal_conv_bwd(grad_y: torch.Tensor, x: torch.Tensor, s: torch.Tensor,
                             w_s: torch.Tensor, w_t: torch.Tensor, need_dx: bool, need_dw_s: bool,
                             need_db_s: bool, need_dw_t: bool, need_db_t: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor]:
    """(dx, dw_s, db_s, dw_t, db_t) given grad_y, x and s in channels_last_3d. Only the gradients
    whose need_ flag is set are computed (a frozen spatial conv, the frozen input of a first
    layer); the others come back as empty tensors (a custom op returns tensors, not None)."""
    B, cin, Fr, H, W = x.shape
    cout, _, kh, kw = w_s.shape
    kt = w_t.shape[2]
    geometry = (Fr, H, W)
    wgrad = _wgrad_choice() if need_dw_s or need_dw_t else None
    dy = _rows(grad_y)
    dx = dws = dbs = dwt = dbt = None
    if need_dw_t and wgrad == "triton":
        dwt, dbt = _tap_wgrad(_rows(s), dy, geometry, (kt, 1, 1), need_db_t)
        dwt = dwt.permute(2, 1, 0)
    elif need_dw_t:
        dwt = _temporal_wgrad_gemms(s, grad_y, kt)
    if need_db_t and dbt is None:
        dbt = dy.sum(0, dtype=torch.float32)
    if need_dx or need_dw_s or need_db_s:
        # ds = dy + the adjoint temporal conv of dy: taps flipped, channel axes swapped.
        wt_adj = w_t.flip(2).permute(2, 0, 1).contiguous()  # (kt, Cout out, Cout in)
        ds = _tap_conv(dy, wt_adj, None, dy, geometry, (kt, 1, 1))
        if need_dx:
            ws_adj = w_s.flip(2, 3).permute(2, 3, 0, 1).reshape(kh * kw, cout, cin).contiguous()
            dx = _from_rows(_tap_conv(ds, ws_adj, None, None, geometry, (1, kh, kw)), B, Fr, H, W)
        if need_dw_s and wgrad == "triton":
            dws, dbs = _tap_wgrad(_rows(x), ds, geometry, (1, kh, kw), need_db_s)
            dws = dws.view(kh, kw, cin, cout).permute(3, 2, 0, 1)
        elif need_dw_s:
            dws = _spatial_wgrad_library(x, ds, w_s)
        if need_db_s and dbs is None:
            dbs = ds.sum(0, dtype=torch.float32)
    empty = x.new_empty(0)
    return (empty.clone() if dx is None else dx,
            empty.clone() if dws is None else _dense(dws, w_s.dtype),
            empty.clone() if dbs is None else dbs.to(w_s.dtype),
            empty.clone() if dwt is None else _dense(dwt, w_t.dtype),
            empty.clone() if dbt is None else dbt.to(w_t.dtype))


@_spatiotemporal_conv_bwd.register_fake
def _(grad_y, x, s, w_s, w_t, need_dx, need_dw_s, need_db_s, need_dw_t, need_db_t):
    cout = w_s.shape[0]
    return (_empty_cl(x.shape, x) if need_dx else x.new_empty(0),
            w_s.new_empty(w_s.shape if need_dw_s else (0,)), w_s.new_empty(cout if need_db_s else 0),
            w_t.new_empty(w_t.shape if need_dw_t else (0,)), w_t.new_empty(cout if need_db_t else 0))


def _conv_flops(x_shape, w_s_shape, w_t_shape) -> int:
    """Multiply-adds x 2 of both convolutions (the bias and residual adds are not counted)."""
    B, cin, Fr, H, W = x_shape
    cout, _, kh, kw = w_s_shape
    pixels = B * Fr * H * W
    return 2 * pixels * cout * (cin * kh * kw + cout * w_t_shape[2])


@register_flop_formula(torch.ops.emu2.spatiotemporal_conv_fwd)
def _fwd_flops(x_shape, w_s_shape, b_s_shape, w_t_shape, b_t_shape, *args, out_shape=None, **kwargs):
    return _conv_flops(x_shape, w_s_shape, w_t_shape)


@register_flop_formula(torch.ops.emu2.spatiotemporal_conv_bwd)
def _bwd_flops(grad_shape, x_shape, s_shape, w_s_shape, w_t_shape, need_dx, need_dw_s, need_db_s,
               need_dw_t, need_db_t, *args, out_shape=None, **kwargs):
    """Each dgrad or wgrad GEMM has its convolution's forward FLOPs; the temporal dgrad (ds)
    runs whenever anything of the spatial conv or the input needs a gradient."""
    spatial = _conv_flops(x_shape, w_s_shape, (0, 0, 0))
    temporal = _conv_flops(x_shape, w_s_shape, w_t_shape) - spatial
    need_ds = need_dx or need_dw_s or need_db_s
    return temporal * (need_ds + need_dw_t) + spatial * (need_dx + need_dw_s)


class SpatiotemporalConv(torch.autograd.Function):
    """y from x, w_s, b_s, w_t, b_t (x in channels_last_3d); saves x and s for backward."""

    @staticmethod
    def forward(ctx, x, w_s, b_s, w_t, b_t):
        y, s = torch.ops.emu2.spatiotemporal_conv_fwd(x, w_s, b_s, w_t, b_t)
        ctx.save_for_backward(x, s, w_s, w_t)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, s, w_s, w_t = ctx.saved_tensors
        grad_y = grad_y.contiguous(memory_format=torch.channels_last_3d)
        need = ctx.needs_input_grad  # False for an absent bias
        grads = torch.ops.emu2.spatiotemporal_conv_bwd(grad_y, x, s, w_s, w_t, *need)
        return tuple(g if n else None for g, n in zip(grads, need))
