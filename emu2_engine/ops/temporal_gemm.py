"""The temporal half of `spatiotemporal_conv` as cuBLAS GEMMs on the channels-last storage, with
the residual inside the first GEMM: what its library path runs after cuDNN's conv2d.

    y = s + conv1d_over_frames(s, w_t, b_t)    s (B, C, F, H, W) in channels_last_3d

In channels_last_3d, s is a row-major (P, C) matrix of P = B*F*H*W pixel rows, and the rows of
one frame of one clip are one contiguous block. Tap t of the temporal kernel (dt = t - kt // 2)
adds s[frame f + dt] @ W_t^T to y[frame f] for the frames f with f + dt inside the clip: per
batch element ONE contiguous range of output rows and one of input rows. So the whole temporal
convolution is kt GEMMs over views of the storage (a batched GEMM over the B clips), no
transposes, no padding copies:

- forward: y = s + b_t (one elementwise pass, which the old path's residual add also was), then
  y += s @ W_center^T over all rows (cuBLAS reads y as C with beta = 1), then
  y[rows] += s[shifted rows] @ W_t^T for the other taps;
- backward: ds = dy + dy @ W_center, then ds[shifted rows] += dy[rows] @ W_t for the others
  (the adjoint: the same ranges, the weight not transposed); dW_t by the batched GEMMs of
  `kernels.spatiotemporal_conv._temporal_wgrad_gemms` (fp32 results), db_t a row sum in fp32.

Why not conv1d: cuDNN's 1D convolution wants the frames innermost, so the library path used to
copy s to (B*H*W, F, C) and the result back, and add the residual separately. The GEMMs read
the tensor where it lies. Rounding: y is rounded to its dtype after each of the kt GEMMs (cuBLAS
accumulates each in fp32), where the reference rounds the temporal output and then the sum.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from emu2_engine.kernels.spatiotemporal_conv import _empty_cl, _from_rows, _rows, _temporal_wgrad_gemms


def _add_shifted_taps(dst: torch.Tensor, src: torch.Tensor, taps: torch.Tensor, B: int, Fr: int,
                      hw: int, adjoint: bool) -> None:
    """dst (P, N) += for every off-centre tap t of taps (kt, K, N): src (P, K) rows of frame
    f + dt times taps[t] into the rows of frame f, per clip (adjoint: from frame f into frame
    f + dt). In place, on views of the two matrices."""
    kt = taps.shape[0]
    dst3 = dst.view(B, Fr * hw, dst.shape[1])
    src3 = src.view(B, Fr * hw, src.shape[1])
    for t in range(kt):
        dt = t - kt // 2
        if dt == 0:
            continue
        if adjoint:
            dt = -dt
        lo, hi = max(0, -dt), Fr - max(0, dt)  # destination frames whose source frame exists
        if hi <= lo:
            continue
        out, inp = dst3[:, lo * hw:hi * hw], src3[:, (lo + dt) * hw:(hi + dt) * hw]
        if B == 1:
            out[0].addmm_(inp[0], taps[t])
        else:
            out.baddbmm_(inp, taps[t].expand(B, *taps[t].shape))


def temporal_gemm_rows(s: torch.Tensor, w_t: torch.Tensor, b_t: torch.Tensor | None) -> torch.Tensor:
    """The forward on s (B, C, F, H, W) in channels_last_3d -> y, channels_last_3d."""
    B, _, Fr, H, W = s.shape
    rows = _rows(s)
    # (kt, C in, C out): tap t is W_t^T, contiguous so that cuBLAS takes each tap as it is (a
    # strided (C, C) view would be copied per GEMM, and per clip when expanded for the batch)
    taps = w_t.permute(2, 1, 0).contiguous()
    y = rows + b_t if b_t is not None else rows.clone()
    y.addmm_(rows, taps[w_t.shape[2] // 2])
    _add_shifted_taps(y, rows, taps, B, Fr, H * W, adjoint=False)
    return _from_rows(y, B, Fr, H, W)


@torch.library.custom_op("emu2::temporal_gemm_fwd", mutates_args=())
def _temporal_gemm_fwd(s: torch.Tensor, w_t: torch.Tensor, b_t: torch.Tensor | None) -> torch.Tensor:
    return temporal_gemm_rows(s, w_t, b_t)


@_temporal_gemm_fwd.register_fake
def _(s, w_t, b_t):
    return _empty_cl(s.shape, s)


def temporal_gemm_grads(dy: torch.Tensor, s: torch.Tensor, w_t: torch.Tensor, need_ds: bool,
                        need_dw: bool, need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ds, dw_t, db_t) from dy and s (channels_last_3d); the ones not needed come back empty."""
    B, C, Fr, H, W = s.shape
    empty = s.new_empty(0)
    ds = dw = db = None
    g = _rows(dy)
    if need_ds:
        taps = w_t.permute(2, 0, 1).contiguous()     # (kt, C out, C in): tap t is W_t
        rows = g.clone()
        rows.addmm_(g, taps[w_t.shape[2] // 2])
        _add_shifted_taps(rows, g, taps, B, Fr, H * W, adjoint=True)
        ds = _from_rows(rows, B, Fr, H, W)
    if need_dw:
        dw = _temporal_wgrad_gemms(s, dy, w_t.shape[2]).to(w_t.dtype)
    if need_db:
        db = g.sum(0, dtype=torch.promote_types(g.dtype, torch.float32)).to(w_t.dtype)
    return (empty.clone() if ds is None else ds, empty.clone() if dw is None else dw,
            empty.clone() if db is None else db)


@torch.library.custom_op("emu2::temporal_gemm_bwd", mutates_args=())
def _temporal_gemm_bwd(dy: torch.Tensor, s: torch.Tensor, w_t: torch.Tensor, need_ds: bool,
                       need_dw: bool, need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return temporal_gemm_grads(dy, s, w_t, need_ds, need_dw, need_db)


@_temporal_gemm_bwd.register_fake
def _(dy, s, w_t, need_ds, need_dw, need_db):
    return (_empty_cl(s.shape, s) if need_ds else s.new_empty(0),
            w_t.new_empty(w_t.shape if need_dw else (0,)), w_t.new_empty(w_t.shape[0] if need_db else 0))


def _gemm_flops(s_shape, w_t_shape) -> int:
    """The temporal convolution's multiply-adds x 2, counted as `spatiotemporal_conv`'s formula
    counts them (every pixel row x every tap, clip ends included)."""
    B, C, Fr, H, W = s_shape
    return 2 * B * Fr * H * W * w_t_shape[0] * w_t_shape[1] * w_t_shape[2]


@register_flop_formula(torch.ops.emu2.temporal_gemm_fwd)
def _fwd_flops(s_shape, w_t_shape, b_t_shape, *args, out_shape=None, **kwargs):
    return _gemm_flops(s_shape, w_t_shape)


@register_flop_formula(torch.ops.emu2.temporal_gemm_bwd)
def _bwd_flops(dy_shape, s_shape, w_t_shape, need_ds, need_dw, need_db, *args, out_shape=None, **kwargs):
    return _gemm_flops(s_shape, w_t_shape) * (need_ds + need_dw)


class TemporalGemm(torch.autograd.Function):
    """y = s + the temporal conv of s (s in channels_last_3d); saves s and w_t."""

    @staticmethod
    def forward(ctx, s, w_t, b_t):
        ctx.save_for_backward(s, w_t)
        y = torch.ops.emu2.temporal_gemm_fwd(s, w_t, b_t)
        # a channels_last_3d view of the op's (P, C) buffer: as an output that is a view, the
        # caller could not change it in place (h += skip)
        return y.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        s, w_t = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last_3d)
        need = ctx.needs_input_grad  # False for an absent bias
        grads = torch.ops.emu2.temporal_gemm_bwd(dy, s, w_t, *need)
        return tuple(g if n else None for g, n in zip(grads, need))


def temporal_gemm(s: torch.Tensor, w_t: torch.Tensor, b_t: torch.Tensor | None) -> torch.Tensor:
    """y = s + conv1d_over_frames(s, w_t, b_t), "same" padding, for s (B, C, F, H, W); returns
    channels_last_3d (s is converted to it first when it is not)."""
    return TemporalGemm.apply(s.contiguous(memory_format=torch.channels_last_3d), w_t, b_t)
