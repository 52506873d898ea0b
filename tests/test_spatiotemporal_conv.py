"""`spatiotemporal_conv`: the Triton kernels (through the interpreter) against the PyTorch
reference in fp64: outputs and all five gradients at fp32 and fp16 on awkward sizes (5 frames,
17x23 frames, 40 -> 24 channels, 1x1 / 3x3 / 3x5 spatial and 1 / 3 / 5 temporal kernels, one
frame, with and without biases, channels-last and contiguous inputs), with the default weight
gradients (cuBLAS / cuDNN on CUDA, ATen on the CPU) and with the Triton wgrad kernel (and its
split over rows); the library wgrads read the tensors in place; the zero temporal kernel; bad
input; the custom ops; the sm_90 compile (spill-free, the candidate tiles too); bf16 and
video-UNet sizes on CUDA. The pass-by-pass path (`ops.conv_passes`): every library plan in fp64,
Triton plans through the interpreter, its tuner, bad plans, in-place outputs and FLOP counts."""

import itertools
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from emu2_engine.kernels import spatiotemporal_conv as kernel
from emu2_engine.ops import spatiotemporal_conv, spatiotemporal_conv_reference
from kernel_checks import assert_within_rule, compile_for_sm90, run_without_interpreter

NAMES = ("y", "d x", "d w_s", "d b_s", "d w_t", "d b_t")


def make_inputs(B, cin, Fr, H, W, cout, kh, kw, kt, bias_s, bias_t, seed, device="cpu"):
    """fp64 (x, w_s, b_s, w_t, b_t) and an output gradient, scaled like a trained layer."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float64) * scale

    args = (randn(B, cin, Fr, H, W), randn(cout, cin, kh, kw, scale=(cin * kh * kw) ** -0.5),
            randn(cout, scale=0.5) if bias_s else None, randn(cout, cout, kt, scale=(cout * kt) ** -0.5),
            randn(cout, scale=0.5) if bias_t else None)
    return args, randn(B, cout, Fr, H, W)


def run(fn, args, grad, dtype, memory_format=torch.contiguous_format):
    """(y, dx, dw_s, db_s, dw_t, db_t) of fn with the inputs cast to dtype (absent biases: None)."""
    leaves = [None if t is None else t.to(dtype, copy=True).requires_grad_() for t in args]
    x = leaves[0].detach().contiguous(memory_format=memory_format).requires_grad_()
    y = fn(x, *leaves[1:])
    y.backward(grad.to(dtype))
    return (y, x.grad) + tuple(None if t is None else t.grad for t in leaves[1:])


def count_triton_wgrads(monkeypatch) -> list:
    """Make every launch of the Triton wgrad kernel's launcher append to the returned list."""
    calls, launch = [], kernel._tap_wgrad
    monkeypatch.setattr(kernel, "_tap_wgrad", lambda *a: calls.append(a[3]) or launch(*a))
    return calls


def check_against_reference(monkeypatch, dtype, shape, bias_s, bias_t, memory_format, seed=0,
                            wgrad="torch"):
    args, grad = make_inputs(*shape, bias_s, bias_t, seed)
    monkeypatch.setenv("EMU2_KERNELS", "reference")
    ref = run(spatiotemporal_conv_reference, args, grad, torch.float64)
    low = run(spatiotemporal_conv_reference, args, grad, dtype)
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    monkeypatch.setattr(kernel, "WGRAD", wgrad)
    launches = count_triton_wgrads(monkeypatch)
    got = run(spatiotemporal_conv, args, grad, dtype, memory_format)
    # the weight gradients ran where WGRAD says: both taps boxes in the kernel, or neither
    assert launches == ([(shape[8], 1, 1), (1, shape[6], shape[7])] if wgrad == "triton" else [])
    assert got[0].is_contiguous(memory_format=torch.channels_last_3d)
    for name, a, b, r in zip(NAMES, got, low, ref):
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == dtype and a.shape == r.shape, name
        assert_within_rule(a, b, r, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, bias_s, bias_t, memory_format", [
    # (B, Cin, F, H, W, Cout, kh, kw, kt)
    ((1, 40, 5, 17, 23, 24, 3, 3, 3), True, True, torch.channels_last_3d),   # the sizes
    ((2, 24, 3, 7, 5, 40, 1, 1, 3), False, False, torch.contiguous_format),   # 1x1, NCDHW input
    ((1, 20, 4, 6, 9, 17, 3, 5, 1), True, False, torch.channels_last_3d),     # 3x5, kt = 1
    ((2, 12, 1, 9, 4, 20, 3, 3, 5), False, True, torch.contiguous_format),    # one frame, kt = 5
])
def test_kernel_matches_reference(monkeypatch, dtype, shape, bias_s, bias_t, memory_format):
    check_against_reference(monkeypatch, dtype, shape, bias_s, bias_t, memory_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_wgrad_kernel_matches_reference(monkeypatch, dtype):
    """WGRAD = "triton": the weight and bias gradients from `_tap_wgrad_kernel` (two clips,
    3x3 taps whose halo leaves the 5x7 frames, 12 -> 20 channels)."""
    check_against_reference(monkeypatch, dtype, (2, 12, 3, 5, 7, 20, 3, 3, 3), True, True,
                            torch.channels_last_3d, wgrad="triton")


def test_triton_wgrad_kernel_splits_rows(monkeypatch):
    """With 1024 pixel rows the temporal wgrad splits its rows over two programs per tap (the
    interpreter counts as 4 SMs: 3 taps x 1 tile is short of 2 waves, 16 K steps allow 2
    splits); the split partials add up to the library's GEMMs and the bias to the row sum."""
    grids, launch = [], kernel._tap_wgrad_kernel

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return launch[grid]

    monkeypatch.setattr(kernel, "_tap_wgrad_kernel", Recorder())
    g = torch.Generator().manual_seed(8)
    s = torch.randn(2, 8, 4, 8, 16, generator=g).contiguous(memory_format=torch.channels_last_3d)
    dy = torch.randn(2, 8, 4, 8, 16, generator=g).contiguous(memory_format=torch.channels_last_3d)
    dw, db = kernel._tap_wgrad(kernel._rows(s), kernel._rows(dy), (4, 8, 16), (3, 1, 1), True)
    assert grids == [(1, 3, 2)]
    torch.testing.assert_close(dw.permute(2, 1, 0), kernel._temporal_wgrad_gemms(s, dy, 3),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(db, kernel._rows(dy).sum(0), rtol=1e-5, atol=1e-4)


def test_wgrad_choice_is_checked(monkeypatch):
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    monkeypatch.setattr(kernel, "WGRAD", "cutlass")
    (x, w_s, b_s, w_t, b_t), grad = make_inputs(1, 4, 2, 3, 3, 4, 3, 3, 3, True, True, seed=6)
    leaves = [t.float().requires_grad_() for t in (x, w_s, b_s, w_t, b_t)]
    y = spatiotemporal_conv(*leaves)
    with pytest.raises(ValueError, match=r"WGRAD must be one of \('torch', 'triton'\), got 'cutlass'"):
        y.backward(grad.float())


class _LogOps(TorchDispatchMode):
    """Records (op name, args) of every ATen call made under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func.overloadpacket.__name__, args))
        return func(*args, **(kwargs or {}))


def test_library_wgrads_read_the_tensors_in_place():
    """The default weight gradients hand cuBLAS / cuDNN views of the channels-last storage:
    no ATen call copies anything, the temporal GEMMs read slices of s and dy (per tap, the rows
    whose shifted frame stays in the clip), the spatial wgrad gets x and ds as channels-last
    (B*F, C, H, W) views, and both equal the fp64 conv weight gradients."""
    (x, w_s, _, w_t, _), grad = make_inputs(2, 8, 4, 5, 6, 12, 3, 3, 3, False, False, seed=7)
    x = x.float().contiguous(memory_format=torch.channels_last_3d)
    s = torch.randn(2, 12, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    dy = grad.float().contiguous(memory_format=torch.channels_last_3d)
    ds, w_s = torch.randn(2 * 4 * 5 * 6, 12), w_s.float()
    with _LogOps() as log:
        dw_t = kernel._temporal_wgrad_gemms(s, dy, 3)
        dw_s = kernel._spatial_wgrad_library(x, ds, w_s)
    names = [name for name, _ in log.calls]
    assert not {"clone", "copy_", "_to_copy", "contiguous"} & set(names), names
    storages = {t.untyped_storage().data_ptr() for t in (s, dy)}
    gemms = [args for name, args in log.calls if name == "bmm"]
    assert len(gemms) == 3 and all(a.untyped_storage().data_ptr() in storages
                                   for args in gemms for a in args)
    assert [args[0].shape[2] for args in gemms] == [3 * 30, 4 * 30, 3 * 30]  # rows per clip
    (conv_args,) = [args for name, args in log.calls if name == "convolution_backward"]
    assert conv_args[0].data_ptr() == ds.data_ptr() and conv_args[1].data_ptr() == x.data_ptr()
    assert all(a.is_contiguous(memory_format=torch.channels_last) for a in conv_args[:2])
    # fp64 definitions: conv1d over frames (pixels as the batch) and conv2d over the frames
    seq = s.double().permute(0, 3, 4, 1, 2).reshape(-1, 12, 4)
    gseq = dy.double().permute(0, 3, 4, 1, 2).reshape(-1, 12, 4)
    frames = x.double().permute(0, 2, 1, 3, 4).reshape(8, 8, 5, 6)
    gframes = ds.double().view(8, 5, 6, 12).permute(0, 3, 1, 2)
    for got, ref in ((dw_t, torch.nn.grad.conv1d_weight(seq, w_t.shape, gseq, padding=1)),
                     (dw_s, torch.nn.grad.conv2d_weight(frames, w_s.shape, gframes, padding=1))):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-4)


def test_zero_temporal_kernel_is_the_per_frame_conv2d(monkeypatch):
    """An inflated UNet starts with w_t = 0, b_t = None: the layer is then exactly its spatial
    conv (y equals the kernel's own s bit for bit), which is conv2d on every frame; w_t still
    gets its gradient."""
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    (x, w_s, b_s, w_t, _), grad = make_inputs(2, 8, 3, 5, 6, 12, 3, 3, 3, True, False, seed=1)
    x, w_s, b_s, grad = x.float(), w_s.float(), b_s.float(), grad.float()
    w_t = torch.zeros(12, 12, 3, requires_grad=True)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    y, s = torch.ops.emu2.spatiotemporal_conv_fwd(x_cl, w_s, b_s, w_t.detach(), None)
    assert torch.equal(y, s)
    frames = [F.conv2d(x[:, :, f], w_s, b_s, padding=1) for f in range(3)]
    torch.testing.assert_close(y, torch.stack(frames, dim=2), rtol=1e-5, atol=1e-5)
    spatiotemporal_conv(x_cl, w_s, b_s, w_t, None).backward(grad)
    assert w_t.grad.abs().max() > 0


@pytest.mark.parametrize("trained", [("x",), ("w_t", "b_t"), ("w_s",), ("b_s", "w_t"), ("x", "b_t")])
def test_only_the_gradients_asked_for(monkeypatch, trained):
    """A frozen input, a frozen spatial conv (video UNets often train only the temporal
    layers), a frozen layer: each tensor that needs a gradient gets the reference's, the others
    none, and the backward skips the GEMMs nobody needs."""
    (x, w_s, b_s, w_t, b_t), grad = make_inputs(1, 8, 3, 4, 5, 8, 3, 3, 3, True, True, seed=2)
    leaves = dict(x=x, w_s=w_s, b_s=b_s, w_t=w_t, b_t=b_t)
    results = []
    for backend, fn in (("reference", spatiotemporal_conv_reference), ("triton", spatiotemporal_conv)):
        monkeypatch.setenv("EMU2_KERNELS", backend)
        args = {n: t.float().requires_grad_(n in trained) for n, t in leaves.items()}
        fn(*args.values()).backward(grad.float())
        results.append(args)
    for name in leaves:
        ref, got = results[0][name].grad, results[1][name].grad
        if name in trained:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        else:
            assert got is None, name


def test_strided_weights_and_biases(monkeypatch):
    """Weights and biases that are views with gaps (slices of bigger tensors) give the same y."""
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    (x, w_s, b_s, w_t, b_t), _ = make_inputs(1, 8, 3, 4, 5, 6, 3, 3, 3, True, True, seed=5)
    x, w_s, b_s, w_t, b_t = (t.float() for t in (x, w_s, b_s, w_t, b_t))
    views = (torch.stack([w_s, w_s], dim=1)[:, 0], torch.stack([b_s, b_s], dim=1)[:, 1],
             w_t.transpose(0, 1).contiguous().transpose(0, 1), torch.stack([b_t, b_t], dim=1)[:, 0])
    assert not any(v.is_contiguous() for v in views)
    torch.testing.assert_close(spatiotemporal_conv(x, *views[:2], *views[2:]),
                               spatiotemporal_conv(x, w_s, b_s, w_t, b_t), rtol=0, atol=0)


def test_autocast_runs_the_kernel_in_the_autocast_dtype(monkeypatch):
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    (x, w_s, b_s, w_t, b_t), _ = make_inputs(1, 8, 2, 3, 4, 8, 3, 3, 3, True, True, seed=3)
    x, w_s, b_s, w_t, b_t = (t.float() for t in (x, w_s, b_s, w_t, b_t))
    with torch.autocast("cpu", dtype=torch.float16):
        y = spatiotemporal_conv(x, w_s, b_s, w_t, b_t)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, spatiotemporal_conv(*(t.half() for t in (x, w_s, b_s, w_t, b_t))))


def _bad(dtypes=None, x=(1, 4, 3, 5, 5), w_s=(6, 4, 3, 3), b_s=(6,), w_t=(6, 6, 3), b_t=(6,)):
    """Arguments of the given shapes, fp32 unless `dtypes` names another dtype for an argument."""
    shapes = dict(x=x, w_s=w_s, b_s=b_s, w_t=w_t, b_t=b_t)
    return [torch.randn(*s, dtype=(dtypes or {}).get(n, torch.float32)) for n, s in shapes.items()]


@pytest.mark.parametrize("args, message", [
    (_bad(x=(4, 3, 5, 5)), r"expects x of shape \(B, C, F, H, W\), got \(4, 3, 5, 5\)"),
    (_bad(w_s=(6, 5, 3, 3)), r"w_s must be \(Cout, 4, kh, kw\), got \(6, 5, 3, 3\)"),
    (_bad(w_s=(6, 4, 2, 3)), "spatial kernel sides must be odd .* got 2x3"),
    (_bad(w_t=(6, 5, 3)), r"w_t must be \(6, 6, kt\), got \(6, 5, 3\)"),
    (_bad(w_t=(6, 6, 2)), "temporal kernel size must be odd, got 2"),
    (_bad(b_s=(5,)), r"b_s must be \(6,\) or None, got \(5,\)"),
    (_bad(b_t=(6, 1)), r"b_t must be \(6,\) or None, got \(6, 1\)"),
    (_bad({"w_t": torch.float16}), "w_t is torch.float16 on cpu but x is torch.float32 on cpu"),
])
def test_bad_input(monkeypatch, args, message):
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    with pytest.raises(ValueError, match=message):
        spatiotemporal_conv(*args)


def test_wrong_device_is_refused(monkeypatch):
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    x, w_s, b_s, w_t, b_t = _bad()
    with pytest.raises(ValueError, match="b_s is torch.float32 on meta but x is torch.float32 on cpu"):
        spatiotemporal_conv(x, w_s, b_s.to("meta"), w_t, b_t)


def test_triton_refuses_fp64_and_auto_falls_back(monkeypatch):
    args = _bad({n: torch.float64 for n in ("x", "w_s", "b_s", "w_t", "b_t")})
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    with pytest.raises(ValueError, match="runs in"):
        spatiotemporal_conv(*args)
    monkeypatch.setenv("EMU2_KERNELS", "auto")
    torch.testing.assert_close(spatiotemporal_conv(*args), spatiotemporal_conv_reference(*args))


def test_custom_ops_pass_opcheck_and_count_flops():
    x, w_s, b_s, w_t, b_t = _bad(x=(1, 4, 2, 3, 4))
    x = x.contiguous(memory_format=torch.channels_last_3d)
    torch.library.opcheck(torch.ops.emu2.spatiotemporal_conv_fwd, (x, w_s, b_s, w_t, b_t))
    y, s = torch.ops.emu2.spatiotemporal_conv_fwd(x, w_s, None, w_t, None)
    for need in ((True, True, True, False, False), (False, False, False, True, True),
                 (True, False, True, False, True)):
        torch.library.opcheck(torch.ops.emu2.spatiotemporal_conv_bwd,
                              (torch.randn_like(y), x, s, w_s, w_t, *need))
    spatial, temporal = 2 * 24 * 6 * 4 * 9, 2 * 24 * 6 * 6 * 3  # 24 pixels, 4 -> 6 channels
    cases = [((True,) * 5, 2 * (spatial + temporal)),          # every gradient: 2x forward
             ((True, False, False, False, False), temporal + spatial),  # ds, then dx
             ((False, False, False, True, True), temporal),    # temporal wgrad only
             ((False, True, False, False, False), temporal + spatial)]  # ds, then spatial wgrad
    for need, expected in cases:
        with FlopCounterMode(display=False) as fc:
            torch.ops.emu2.spatiotemporal_conv_bwd(y, x, s, w_s, w_t, *need)
        assert fc.get_total_flops() == expected, need
    with FlopCounterMode(display=False) as fc:
        torch.ops.emu2.spatiotemporal_conv_fwd(x, w_s, b_s, w_t, b_t)
    assert fc.get_total_flops() == spatial + temporal


def test_kernels_compile_for_sm90():
    run_without_interpreter(__file__, "compile_kernels_for_sm90")


def compile_kernels_for_sm90():
    """The tiles the launchers pick for video-UNet layers, in bf16 and fp32, compiled for sm_90
    as a launch specialises them (aligned pointers, channel counts divisible by 16). In bf16 at
    UNet widths the main loops must be software-pipelined (cp.async into shared memory) wgmma
    loops: without the alignment the loads are scalar and nothing is pipelined."""
    from emu2_engine.kernels import spatiotemporal_conv as kernel

    ints = dict(P="i32", NF="i32", H="i32", W="i32", C_IN="i32", N_OUT="i32")
    for dt, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for n_out, c_in, taps, residual in ((320, 320, (1, 3, 3), False), (1280, 1280, (1, 3, 3), False),
                                            (1280, 1280, (3, 1, 1), True), (48, 32, (1, 1, 1), True)):
            cfg = kernel._blocks(n_out, c_in, torch_dtype, residual)
            opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            consts = dict(KT=taps[0], KH=taps[1], KW=taps[2], HAS_BIAS=True, HAS_RES=residual,
                          IEEE=dt == "fp32", SPLIT_K=False, **cfg)
            types = dict(in_ptr=f"*{dt}", w_ptr=f"*{dt}", bias_ptr=f"*{dt}", res_ptr=f"*{dt}",
                         out_ptr=f"*{dt}", ITERS_PER_SPLIT="i32", **ints)
            aligned = [n for n, t in types.items() if t.startswith("*")] + ["C_IN", "N_OUT"]
            conv = compile_for_sm90(kernel._tap_conv_kernel, types, consts, aligned, **opts)
            # split K (small frames): fp32 partial sums out, no bias or residual in the epilogue
            split = compile_for_sm90(kernel._tap_conv_kernel, dict(types, out_ptr="*fp32"),
                                     dict(consts, HAS_BIAS=False, HAS_RES=False, SPLIT_K=True),
                                     aligned, **opts)
            cfg = kernel._wgrad_blocks(c_in, n_out, torch_dtype)
            opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            consts = dict(KT=taps[0], KH=taps[1], KW=taps[2], HAS_DB=True, IEEE=dt == "fp32", **cfg)
            types = dict(in_ptr=f"*{dt}", g_ptr=f"*{dt}", dw_ptr="*fp32", db_ptr="*fp32",
                         ROWS_PER_SPLIT="i32", **ints)
            aligned = [n for n, t in types.items() if t.startswith("*")] + ["C_IN", "N_OUT", "ROWS_PER_SPLIT"]
            wgrad = compile_for_sm90(kernel._tap_wgrad_kernel, types, consts, aligned, **opts)
            for compiled in (conv, split, wgrad):
                assert "cubin" in compiled.asm
                ptx = compiled.asm["ptx"]
                if dt == "bf16" and n_out >= 128:  # narrow tiles may use mma.sync instead
                    assert "cp.async" in ptx and "wgmma" in ptx, (compiled.name, n_out, c_in)
                    assert ptxas_usage(ptx)[1] == 0, (compiled.name, n_out, c_in)  # no spills
    # the candidate tiles the benchmark times on the 1280-channel spatial forward
    consts = dict(KT=1, KH=3, KW=3, HAS_BIAS=True, HAS_RES=False, IEEE=False, SPLIT_K=False)
    types = dict(in_ptr="*bf16", w_ptr="*bf16", bias_ptr="*bf16", res_ptr="*bf16", out_ptr="*bf16",
                 ITERS_PER_SPLIT="i32", **ints)
    aligned = [n for n, t in types.items() if t.startswith("*")] + ["C_IN", "N_OUT"]
    for cfg in kernel.WIDE_TILE_CANDIDATES:
        cfg = dict(cfg)
        opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
        compiled = compile_for_sm90(kernel._tap_conv_kernel, types, dict(consts, **cfg), aligned, **opts)
        ptx = compiled.asm["ptx"]
        assert "cp.async" in ptx and "wgmma" in ptx, (cfg, opts)
        registers, spilled = ptxas_usage(ptx)
        assert spilled == 0 and registers <= 255, (cfg, opts, registers, spilled)


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, bytes of spill stores) that triton's ptxas reports for this PTX
    on sm_90a, with the register-allocation option triton itself passes."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(90).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",
                               str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", proc.stderr).group(1))
    return registers, int(re.search(r"(\d+) bytes spill stores", proc.stderr).group(1))


# The widest layer, for its 128 x 256 tiles (16 bits only). In fp32 it uses the 320-channel
# case's tiles, and its dx (a sequential fp32 sum over K = 9 x 1280 per output) came out at
# 2.46e-5 against the rule's bound of 2.38e-5 (cuDNN's own error 5.5e-6) on an H200: the
# summation order of a long fp32 reduction, not a tile's fault.
WIDE = (1, 1280, 2, 16, 16, 1280, 3, 3, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("wgrad", kernel.WGRAD_CHOICES)
@pytest.mark.parametrize("dtype, shape", [
    *[(dtype, shape) for dtype in (torch.bfloat16, torch.float16, torch.float32) for shape in (
        (1, 320, 8, 32, 32, 320, 3, 3, 3),   # a video-UNet layer (fewer frames)
        (2, 40, 5, 17, 23, 24, 3, 3, 3))],   # the awkward CPU shape, on the compiled kernels
    (torch.bfloat16, WIDE), (torch.float16, WIDE),
    (torch.bfloat16, (1, 1280, 16, 4, 4, 1280, 3, 3, 3))])  # the deepest level: split K on a GPU
def test_cuda(dtype, shape, wgrad, monkeypatch):
    """Both weight-gradient paths on the GPU (the default's cuBLAS out_dtype GEMMs and cuDNN
    wgrad exist only there), against the fp64 reference by the rule. The 4x4 shape's tap GEMMs
    have too few tiles for the GPU, so its K loops are split (`_conv_split`)."""
    splits = []
    choose = kernel._conv_split
    monkeypatch.setattr(kernel, "_conv_split", lambda *a: splits.append(choose(*a)) or splits[-1])
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    args, grad = make_inputs(*shape, True, True, seed=4, device="cuda")
    ref = run(spatiotemporal_conv_reference, args, grad, torch.float64)
    low = run(spatiotemporal_conv_reference, args, grad, dtype)
    # the kernel, forced: `auto` would send these small shapes to the library path
    monkeypatch.setenv("EMU2_KERNELS", "spatiotemporal_conv=triton")
    monkeypatch.setattr(kernel, "WGRAD", wgrad)
    got = run(spatiotemporal_conv, args, grad, dtype, torch.channels_last_3d)
    for name, a, b, r in zip(NAMES, got, low, ref):
        assert_within_rule(a, b, r, dtype, name)
    if shape[3] == 4:
        assert splits and max(splits) > 1, splits


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_auto_runs_a_library_path(dtype, monkeypatch):
    """`auto` on a GPU runs a deep-level shape (16 frames of 4x4, 320 channels: 256 pixel rows)
    on a library path (timed first), within the rule of the fp64 reference."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    args, grad = make_inputs(1, 320, 16, 4, 4, 320, 3, 3, 3, True, True, seed=6, device="cuda")
    ref = run(spatiotemporal_conv_reference, args, grad, torch.float64)
    low = run(spatiotemporal_conv_reference, args, grad, dtype)
    monkeypatch.setenv("EMU2_KERNELS", "auto")
    launches = []
    monkeypatch.setattr(kernel.SpatiotemporalConv, "apply", lambda *a: launches.append(a))
    got = run(spatiotemporal_conv, args, grad, dtype, torch.channels_last_3d)
    assert launches == []  # the kernel was not called
    for name, a, b, r in zip(NAMES, got, low, ref):
        assert_within_rule(a, b, r, dtype, name)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 320, 8, 32, 32, 320, 3, 3, 3), (1, 1280, 16, 4, 4, 1280, 3, 3, 3)])
def test_cuda_pass_plans(shape, monkeypatch):
    """The pass-by-pass path on a GPU in bf16: its plan tuned there (printed), DEFAULT_PLAN, and
    every Triton candidate, each within the rule of the fp64 reference."""
    import importlib

    from emu2_engine.ops import spatiotemporal_conv_passes
    from emu2_engine.ops.conv_passes import DEFAULT_PLAN, PassPlan

    cp = importlib.import_module("emu2_engine.ops.conv_passes")
    monkeypatch.setattr(cp, "_PLANS", {})
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    dtype = torch.bfloat16
    args, grad = make_inputs(*shape, True, True, seed=15, device="cuda")
    ref = run(spatiotemporal_conv_reference, args, grad, torch.float64)
    low = run(spatiotemporal_conv_reference, args, grad, dtype)
    for plan in (None, DEFAULT_PLAN, PassPlan("triton", "triton", "triton", "triton", "conv", "conv")):
        got = run(lambda *a: spatiotemporal_conv_passes(*a, plan=plan), args, grad, dtype, torch.channels_last_3d)
        for name, a, b, r in zip(NAMES, got, low, ref):
            assert_within_rule(a, b, r, dtype, f"{plan} {name}")
    assert len(cp._PLANS) == 1
    print(f"[conv_passes] {shape}: tuned plan {next(iter(cp._PLANS.values()))}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_library_path_on_a_batch_of_clips(dtype, monkeypatch):
    """The library path called directly on two clips (the temporal taps as batched GEMMs on
    strided views, in place) at a video-UNet width, within the rule of the fp64 reference."""
    from emu2_engine.ops import spatiotemporal_conv_library

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    args, grad = make_inputs(2, 640, 16, 16, 16, 640, 3, 3, 3, True, True, seed=8, device="cuda")
    ref = run(spatiotemporal_conv_reference, args, grad, torch.float64)
    low = run(spatiotemporal_conv_reference, args, grad, dtype)
    got = run(spatiotemporal_conv_library, args, grad, dtype, torch.channels_last_3d)
    for name, a, b, r in zip(NAMES, got, low, ref):
        assert_within_rule(a, b, r, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_k_on_small_frames(monkeypatch, dtype):
    """A deep-level shape (3 frames of 4x4, 40 channels, kt = 5): 48 pixel rows x 2 channel tiles
    are short of the interpreter's 4 "SMs", so every tap GEMM splits its K loop (forward spatial
    and temporal, both dgrads) and the op still matches the reference in every output and
    gradient."""
    grids, launch = [], kernel._tap_conv_kernel

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return launch[grid]

    monkeypatch.setattr(kernel, "_tap_conv_kernel", Recorder())
    check_against_reference(monkeypatch, dtype, (1, 40, 3, 4, 4, 40, 3, 3, 5), True, True,
                            torch.channels_last_3d, seed=11)
    assert len(grids) == 4 and all(tiles == 2 and split > 1 for tiles, split in grids), grids


def test_split_k_equals_one_pass():
    """The split partial sums, bias and residual added by torch equal the one-pass epilogue."""
    g = torch.Generator().manual_seed(12)
    rows = torch.randn(48, 24, generator=g)
    w = torch.randn(9, 24, 16, generator=g) / 15
    bias, res = torch.randn(16, generator=g), torch.randn(48, 16, generator=g)
    one = kernel._tap_conv(rows, w, bias, res, (3, 4, 4), (1, 3, 3), split=1)
    for split in (2, 3, 9):
        torch.testing.assert_close(kernel._tap_conv(rows, w, bias, res, (3, 4, 4), (1, 3, 3), split=split),
                                   one, rtol=1e-5, atol=1e-5)


def test_split_count_fits_one_wave(monkeypatch):
    """_conv_split: no more programs than SMs (the interpreter counts 4), at least
    _MIN_SPLIT_ITERS K steps a slice, at most _MAX_SPLIT slices, and none with SPLIT_K off."""
    cfg = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)
    cpu = torch.device("cpu")
    assert kernel._conv_split(48, 40, 40, 9, cfg, cpu) == 2        # 2 tiles: 2 x 2 = 4 programs
    assert kernel._conv_split(48, 20, 40, 9, cfg, cpu) == 3        # 1 tile: 4 would fit; capped at 3
    monkeypatch.setattr(kernel, "_MAX_SPLIT", 8)
    assert kernel._conv_split(48, 20, 40, 9, cfg, cpu) == 4        # uncapped: 4 slices of 4-5 steps
    assert kernel._conv_split(48, 20, 40, 1, cfg, cpu) == 1        # 2 K steps: too few to split
    assert kernel._conv_split(512, 40, 40, 9, cfg, cpu) == 1       # 16 tiles fill the 4 "SMs"
    monkeypatch.setattr(kernel, "SPLIT_K", False)
    assert kernel._conv_split(48, 20, 40, 9, cfg, cpu) == 1


def test_the_library_paths_compute_the_reference():
    """The four paths `auto` chooses from on a GPU compute the reference's numbers (fp64, all
    five gradients) and return channels-last-3d ("passes" with its DEFAULT_PLAN: on the CPU
    nothing is timed)."""
    from emu2_engine.ops import (spatiotemporal_conv_conv3d, spatiotemporal_conv_cudnn,
                                 spatiotemporal_conv_library, spatiotemporal_conv_passes)

    for shape in [(2, 40, 5, 7, 9, 24, 3, 3, 3), (1, 8, 1, 4, 5, 6, 3, 1, 5)]:
        args, grad = make_inputs(*shape, True, True, seed=5)
        ref = run(spatiotemporal_conv_reference, args, grad, torch.float64)
        for path in (spatiotemporal_conv_library, spatiotemporal_conv_cudnn, spatiotemporal_conv_conv3d,
                     spatiotemporal_conv_passes):
            got = run(path, args, grad, torch.float64)
            for name, a, r in zip(NAMES, got, ref):
                torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=f"{path.__name__} {shape} {name}")
            out = path(*[None if t is None else t.detach() for t in args[:5]])
            assert out.is_contiguous(memory_format=torch.channels_last_3d), path.__name__


def _library_plans():
    """Every plan that names no Triton implementation (they all run in fp64)."""
    from emu2_engine.ops.conv_passes import CANDIDATES, PassPlan

    return [PassPlan(*c) for c in itertools.product(*[[i for i in impls if i != "triton"] for impls in CANDIDATES])]


def test_every_library_pass_plan_computes_the_reference():
    """The pass-by-pass path (`ops.conv_passes`) under each of its 8 plans of cuDNN / ATen
    convolutions and temporal GEMMs gives the reference's output and five gradients (fp64) in
    channels-last-3d, also from an NCDHW input, and with only some gradients asked for."""
    from emu2_engine.ops import spatiotemporal_conv_passes

    plans = _library_plans()
    assert len(plans) == 8   # temporal fwd, dgrad and wgrad: conv or gemm
    for shape, fmt in [((2, 12, 5, 7, 9, 8, 3, 3, 3), torch.channels_last_3d),
                       ((1, 6, 1, 4, 5, 5, 3, 1, 5), torch.contiguous_format)]:
        args, grad = make_inputs(*shape, True, True, seed=11)
        ref = run(spatiotemporal_conv_reference, args, grad, torch.float64)
        for plan in plans:
            got = run(lambda *a: spatiotemporal_conv_passes(*a, plan=plan), args, grad, torch.float64, fmt)
            assert got[0].is_contiguous(memory_format=torch.channels_last_3d), plan
            for name, a, r in zip(NAMES, got, ref):
                torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=f"{plan} {shape} {name}")
    # a frozen spatial conv and input: only the temporal weight and bias get gradients
    args, grad = make_inputs(1, 6, 3, 4, 4, 6, 3, 3, 3, True, True, seed=12)
    w_t, b_t = args[3].clone().requires_grad_(), args[4].clone().requires_grad_()
    y = spatiotemporal_conv_passes(args[0], args[1], args[2], w_t, b_t, plan=plans[-1])
    y.backward(grad)
    rw_t, rb_t = args[3].clone().requires_grad_(), args[4].clone().requires_grad_()
    spatiotemporal_conv_reference(args[0], args[1], args[2], rw_t, rb_t).backward(grad)
    torch.testing.assert_close(w_t.grad, rw_t.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b_t.grad, rb_t.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pass_plans_with_the_triton_kernel(monkeypatch, dtype):
    """Plans with the Triton tap kernel in the forward and dgrad passes (through the
    interpreter), alone and mixed with the libraries, within the rule of the fp64 reference, on
    the issue's awkward sizes."""
    from emu2_engine.ops import spatiotemporal_conv_passes
    from emu2_engine.ops.conv_passes import PassPlan

    cases = [((1, 40, 5, 17, 23, 24, 3, 3, 3), PassPlan("triton", "triton", "triton", "triton", "conv", "gemm")),
             ((2, 12, 3, 5, 7, 20, 3, 3, 3), PassPlan("conv", "triton", "gemm", "triton", "conv", "conv"))]
    for shape, plan in cases:
        args, grad = make_inputs(*shape, True, True, seed=13)
        ref = run(spatiotemporal_conv_reference, args, grad, torch.float64)
        low = run(spatiotemporal_conv_reference, args, grad, dtype)
        got = run(lambda *a: spatiotemporal_conv_passes(*a, plan=plan), args, grad, dtype)
        for name, a, b, r in zip(NAMES, got, low, ref):
            assert a.dtype == dtype and a.shape == r.shape, name
            assert_within_rule(a, b, r, dtype, f"{plan} {name}")


def test_the_pass_tuner_picks_the_fastest_of_each_pass(monkeypatch):
    """`tune_plan` times every candidate of every pass (here with a fake timer that says which is
    fastest) and keeps the fastest of each; for inference only the two forward passes are timed;
    the Triton candidates are timed on CUDA only. `tuned_plan` tunes once per signature where a
    GPU is (faked) and timing is allowed, and otherwise runs DEFAULT_PLAN; a bad plan is refused
    in one line naming the pass."""
    import importlib

    from emu2_engine.ops import spatiotemporal_conv_passes
    from emu2_engine.ops.conv_passes import DEFAULT_PLAN, PassPlan

    cp = importlib.import_module("emu2_engine.ops.conv_passes")
    cost = {"conv": 3.0, "gemm": 2.0, "triton": 1.0}
    calls = []

    def timer(fn, device):
        fn()  # the candidate really runs, so a broken one fails the tuner
        impl = calls[-1]
        return cost[impl] + len(calls) * 1e-6

    for name in ("spatial_fwd", "temporal_fwd", "temporal_dgrad", "spatial_dgrad", "spatial_wgrad",
                 "temporal_wgrad"):
        real = getattr(cp, name)
        monkeypatch.setattr(cp, name, lambda impl, *a, real=real: calls.append(impl) or real(impl, *a))
    args, _ = make_inputs(1, 6, 3, 4, 5, 6, 3, 3, 3, True, True, seed=14)
    args = [None if t is None else t.float() for t in args]

    plan = cp.tune_plan(*args, training=True, timer=timer)   # the CPU: no Triton candidate
    assert plan == PassPlan("conv", "gemm", "gemm", "conv", "conv", "gemm")
    # the passes with more than one candidate: temporal fwd, dgrad and wgrad
    assert calls == ["conv", "gemm"] * 3
    calls.clear()
    plan = cp.tune_plan(*args, training=False, timer=timer)
    assert calls == ["conv", "gemm"]                    # the forward passes alone
    assert plan == DEFAULT_PLAN._replace(spatial_fwd="conv", temporal_fwd="gemm")
    monkeypatch.setattr(cp, "_candidates", lambda field, x: getattr(cp.CANDIDATES, field))  # as on CUDA
    calls.clear()
    plan = cp.tune_plan(*args, training=True, timer=timer)
    assert plan == PassPlan("triton", "triton", "triton", "triton", "conv", "gemm")

    tuned = []
    monkeypatch.setattr(cp, "tune_plan", lambda *a, **k: tuned.append(a[-1]) or PassPlan(
        "triton", "conv", "conv", "conv", "conv", "conv"))
    monkeypatch.setattr(cp, "_PLANS", {})
    x = args[0].clone().requires_grad_()
    spatiotemporal_conv_passes(x, *args[1:])
    assert tuned == []                                   # the CPU: DEFAULT_PLAN, nothing timed
    monkeypatch.setattr(cp, "_tunes_on", lambda x: True)
    for _ in range(2):
        spatiotemporal_conv_passes(x, *args[1:])
    with torch.no_grad():
        spatiotemporal_conv_passes(x, *args[1:])
    assert tuned == [True, False] and len(cp._PLANS) == 2   # training, then inference; cached
    monkeypatch.setenv("EMU2_CONV_AUTOTUNE", "0")   # a new shape: would be tuned, but may not be
    spatiotemporal_conv_passes(torch.randn(1, 6, 2, 4, 5), *args[1:])
    assert len(tuned) == 2 and len(cp._PLANS) == 2
    monkeypatch.delenv("EMU2_CONV_AUTOTUNE")
    spatiotemporal_conv_passes(torch.randn(1, 6, 2, 4, 5), *args[1:])
    assert len(tuned) == 3 and len(cp._PLANS) == 3

    with pytest.raises(ValueError, match=r"pass temporal_fwd runs on one of \('conv', 'gemm', 'triton'\), got 'cudnn'"):
        spatiotemporal_conv_passes(*args, plan=("conv", "cudnn", "gemm", "conv", "conv", "gemm"))
    for bad in ("conv", ("conv",) * 5, {"spatial_fwd": "conv"}):
        with pytest.raises(ValueError, match="one implementation for each of the 6 passes"):
            spatiotemporal_conv_passes(*args, plan=bad)
    with pytest.raises(ValueError, match=r"pass spatial_dgrad on triton runs in .*, got torch.float64"):
        spatiotemporal_conv_passes(*[t.double() for t in args], plan=DEFAULT_PLAN._replace(spatial_dgrad="triton"))


def test_pass_outputs_take_in_place_changes_and_count_their_flops():
    """Whatever a plan's temporal forward runs on, the output is no view of an internal buffer,
    so the caller may change it in place (h += skip), as the GEMM library path's may; and
    FlopCounterMode counts a plan of library passes as it counts the kernel's custom ops: the
    forward, and twice that for the backward (the Triton passes are not counted)."""
    from emu2_engine.ops import spatiotemporal_conv_library, spatiotemporal_conv_passes

    args, grad = make_inputs(1, 8, 3, 4, 5, 8, 3, 3, 3, True, True, seed=16)
    args = [t.float().requires_grad_() for t in args]
    expected = 2 * 3 * 4 * 5 * 8 * (8 * 9 + 8 * 3)
    paths = {impl: (lambda *a, impl=impl: spatiotemporal_conv_passes(*a, plan=("conv", impl, "gemm", "conv",
                                                                               "conv", "gemm")))
             for impl in ("conv", "gemm", "triton")}
    paths["library"] = spatiotemporal_conv_library
    for name, fn in paths.items():
        with FlopCounterMode(display=False) as fc:
            y = fn(*args)
        forward = fc.get_total_flops()
        y.add_(1.0)                        # in place, on an autograd output
        with FlopCounterMode(display=False) as fc:
            y.backward(grad.float())
        if name != "triton":
            assert (forward, fc.get_total_flops()) == (expected, 2 * expected), name


def test_auto_times_the_library_paths_once_per_signature(monkeypatch):
    """Under `auto` on a GPU (faked here) the op times each library path once per input
    signature, forward alone for inference and forward + backward for training, and runs the
    fastest from then on; where it may not time (compiling, or EMU2_CONV_AUTOTUNE=0) the
    LIBRARY_BELOW rule decides; `triton` still forces the kernel."""
    import importlib
    import time as time_module

    ops_stc = importlib.import_module("emu2_engine.ops.spatiotemporal_conv")  # the module, not the op
    small = torch.empty(1, 8, 16, 8, 8)     # 1,024 rows
    large = torch.empty(1, 8, 16, 32, 32)   # 16,384 rows
    assert not ops_stc.prefers_library(small) and ops_stc.prefers_library(large)

    runs, timed = [], []
    delay = {"gemm": 0.004, "conv2d+conv1d": 0.008, "conv3d": 0.0}   # seconds per forward

    def fake(name):
        def path(x, w_s, b_s, w_t, b_t):
            runs.append(name)
            time_module.sleep(delay[name])
            if torch.is_grad_enabled() and x.requires_grad:   # the backward is slow for conv3d
                return _SlowBackward.apply(x * 1.0, 0.02 if name == "conv3d" else 0.0)
            return x * 1.0
        return path

    class _SlowBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y, seconds):
            ctx.seconds = seconds
            return y.view_as(y)

        @staticmethod
        def backward(ctx, g):
            time_module.sleep(ctx.seconds)
            return g, None

    real_time_path = ops_stc._time_path
    monkeypatch.setattr(ops_stc, "_time_path", lambda fn, args, grad, repeats=3:
                        timed.append(grad is not None) or real_time_path(fn, args, grad, repeats))
    monkeypatch.setattr(ops_stc, "LIBRARY_PATHS", {n: fake(n) for n in delay})
    monkeypatch.setattr(ops_stc, "_TUNED", {})
    monkeypatch.setattr(ops_stc, "use_triton", lambda *a, **k: True)
    monkeypatch.setattr(ops_stc._kernel.SpatiotemporalConv, "apply", lambda *a: runs.append("kernel"))
    monkeypatch.setenv("EMU2_KERNELS", "auto")
    x = torch.randn(1, 8, 2, 4, 4)
    w_s, w_t = torch.randn(8, 8, 3, 3), torch.randn(8, 8, 3)

    with torch.no_grad():   # inference: forward alone, conv3d is fastest
        ops_stc.spatiotemporal_conv(x, w_s, None, w_t, None)
    assert timed == [False] * 3 and runs[-1] == "conv3d"
    runs.clear()
    with torch.no_grad():   # cached: no more timing
        ops_stc.spatiotemporal_conv(x, w_s, None, w_t, None)
    assert runs == ["conv3d"] and len(timed) == 3
    # training: forward + backward, where conv3d's slow backward makes gemm the fastest
    xg = x.clone().requires_grad_()
    ops_stc.spatiotemporal_conv(xg, w_s, None, w_t, None)
    assert timed[3:] == [True] * 3 and runs[-1] == "gemm"
    assert len(ops_stc._TUNED) == 2
    # a new shape is a new signature
    ops_stc.spatiotemporal_conv(torch.randn(1, 8, 3, 4, 4), w_s, None, w_t, None)
    assert len(timed) == 9 and len(ops_stc._TUNED) == 3

    # nothing timed while compiling or with the tuner off: the LIBRARY_BELOW rule
    runs.clear()
    monkeypatch.setattr(ops_stc, "LIBRARY_BELOW", 64)
    big = torch.randn(1, 8, 4, 4, 4)   # 64 rows
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ops_stc.spatiotemporal_conv(x, w_s, None, w_t, None)
    ops_stc.spatiotemporal_conv(big, w_s, None, w_t, None)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setenv("EMU2_CONV_AUTOTUNE", "0")
    ops_stc.spatiotemporal_conv(big, w_s, None, w_t, None)
    monkeypatch.setenv("EMU2_KERNELS", "spatiotemporal_conv=triton")
    ops_stc.spatiotemporal_conv(x, w_s, None, w_t, None)
    assert runs == ["conv3d", "gemm", "gemm", "kernel"] and len(timed) == 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B, Fr, kt, bias", [(1, 5, 3, True), (2, 5, 3, False), (2, 4, 5, True),
                                             (1, 1, 3, True), (2, 2, 5, False)])
def test_temporal_gemm_matches_the_reference(dtype, B, Fr, kt, bias):
    """The library path's temporal half (GEMMs over row ranges, the residual in the first one):
    one clip and a batch (addmm and batched GEMMs), 1 frame and fewer frames than taps (taps that
    leave the clip are skipped), with and without bias; y and the three gradients within the rule
    of the fp64 reference (conv1d over frames, + s)."""
    from emu2_engine.ops.temporal_gemm import temporal_gemm

    C, H, W = 24, 3, 5
    g = torch.Generator().manual_seed(B * 100 + Fr * 10 + kt)
    s = torch.randn(B, C, Fr, H, W, generator=g, dtype=torch.float64)
    w_t = torch.randn(C, C, kt, generator=g, dtype=torch.float64) * (C * kt) ** -0.5
    b_t = torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    grad = torch.randn(B, C, Fr, H, W, generator=g, dtype=torch.float64)

    def reference(s, w_t, b_t):
        seq = s.permute(0, 3, 4, 1, 2).reshape(B * H * W, C, Fr)
        t = F.conv1d(seq, w_t, b_t, padding=kt // 2).reshape(B, H, W, C, Fr).permute(0, 3, 4, 1, 2)
        return s + t

    def run(fn, dt):
        inputs = [None if t is None else t.to(dt, copy=True).requires_grad_() for t in (s, w_t, b_t)]
        if dt != torch.float64:
            inputs[0] = inputs[0].detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
        y = fn(*inputs)
        y.backward(grad.to(dt))
        return [y] + [None if t is None else t.grad for t in inputs]

    ref, low, got = run(reference, torch.float64), run(reference, dtype), run(temporal_gemm, dtype)
    assert got[0].is_contiguous(memory_format=torch.channels_last_3d)
    for name, a, lo, r in zip(("y", "d s", "d w_t", "d b_t"), got, low, ref):
        if r is None:
            assert a is None
            continue
        assert a.dtype == dtype and a.shape == r.shape, name
        assert_within_rule(a, lo, r, dtype, name)


def test_temporal_gemm_copies_nothing_and_counts_its_flops():
    """Forward and backward read and write the channels-last storage in place: the only copies
    of activations are the residual's initial values (y = s, ds = dy: same layout), the rest are
    GEMMs on views; the weight is laid out once per pass;
    FlopCounterMode counts the temporal conv's multiply-adds through the custom ops' formulas."""
    from emu2_engine.ops.temporal_gemm import temporal_gemm, temporal_gemm_grads, temporal_gemm_rows

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names, self.layout_changes = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.names.append(func.__name__)
            if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
                src, dst = (args[1], args[0]) if func is torch.ops.aten.copy_.default else (args[0], out)
                if src.dim() >= 2 and src.stride() != dst.stride():
                    self.layout_changes.append((func.__name__, tuple(src.shape)))
            return out

    B, C, Fr, H, W, kt = 2, 16, 4, 3, 5, 3
    s = torch.randn(B, C, Fr, H, W).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    w_t = (torch.randn(C, C, kt) * 0.1).requires_grad_()
    b_t = torch.randn(C, requires_grad=True)
    dy = torch.randn(B, C, Fr, H, W).contiguous(memory_format=torch.channels_last_3d)
    with Ops() as ops:  # the custom ops' bodies (a dispatch mode sees a custom op as one call)
        y = temporal_gemm_rows(s.detach(), w_t.detach(), b_t.detach())
        temporal_gemm_grads(dy, s.detach(), w_t.detach(), True, True, True)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    # the one layout change per pass is the (kt, C, C) weight, made contiguous for cuBLAS
    assert [shape for _, shape in ops.layout_changes] == [(kt, C, C)] * 2, ops.layout_changes
    assert sum(n.startswith(("addmm", "baddbmm")) for n in ops.names) == 2 * kt  # fwd and ds
    torch.library.opcheck(torch.ops.emu2.temporal_gemm_fwd, (s.detach(), w_t.detach(), b_t.detach()))
    torch.library.opcheck(torch.ops.emu2.temporal_gemm_bwd,
                          (dy, s.detach(), w_t.detach(), True, True, True))
    flops = 2 * B * Fr * H * W * C * C * kt
    with FlopCounterMode(display=False) as fc:
        temporal_gemm(s, w_t, b_t).backward(dy)
    assert fc.get_total_flops() == 3 * flops  # forward, ds, dw_t


def test_a_compiled_caller_traces_the_size_rule(monkeypatch):
    """Inside a torch.compile trace (a GPU faked) the op times nothing and follows the
    LIBRARY_BELOW rule: conv3d below it, conv2d + the temporal GEMMs from it; the graph is whole
    (fullgraph) and computes the reference's numbers."""
    import importlib

    ops_stc = importlib.import_module("emu2_engine.ops.spatiotemporal_conv")  # the module, not the op
    monkeypatch.setattr(ops_stc, "use_triton", lambda *a, **k: True)
    monkeypatch.setattr(ops_stc, "_TUNED", {})
    monkeypatch.setenv("EMU2_KERNELS", "auto")
    g = torch.Generator().manual_seed(3)
    w_s, w_t = torch.randn(8, 8, 3, 3, generator=g) / 9, torch.randn(8, 8, 3, generator=g) / 9
    graphs = []

    def record(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    for shape in [(1, 8, 2, 4, 4), (1, 8, 16, 32, 32)]:   # 32 and 16,384 pixel rows
        torch._dynamo.reset()
        x = torch.randn(*shape, generator=g).contiguous(memory_format=torch.channels_last_3d)
        y = torch.compile(lambda x: ops_stc.spatiotemporal_conv(x, w_s, None, w_t, None),
                          backend=record, fullgraph=True)(x)
        torch.testing.assert_close(y, spatiotemporal_conv_reference(x, w_s, None, w_t, None), rtol=1e-4, atol=1e-4)
    small, large = graphs
    assert sum("conv3d" in t for t in small) == 2 and not any("emu2" in t for t in small), small
    assert any("conv2d" in t for t in large) and any("temporal_gemm" in t for t in large), large
    assert ops_stc._TUNED == {}


def test_the_tuner_runs_inside_an_activation_checkpoint(monkeypatch):
    """The first call of a shape times the real paths (here on the CPU, a GPU faked) inside a
    non-reentrant activation checkpoint: the trials' graphs do not meet the checkpoint's
    saved-tensor hooks, and the output and gradients are the reference's."""
    import importlib

    from torch.utils.checkpoint import checkpoint

    ops_stc = importlib.import_module("emu2_engine.ops.spatiotemporal_conv")  # the module, not the op
    monkeypatch.setattr(ops_stc, "use_triton", lambda *a, **k: True)
    monkeypatch.setattr(ops_stc, "_TUNED", {})
    monkeypatch.setenv("EMU2_KERNELS", "auto")
    args, grad = make_inputs(1, 8, 3, 5, 6, 8, 3, 3, 3, True, True, seed=9)
    ref = run(spatiotemporal_conv_reference, args, grad, torch.float64)
    got = run(lambda *a: checkpoint(ops_stc.spatiotemporal_conv, *a, use_reentrant=False), args, grad,
              torch.float32)   # (fp64 would go to the reference: the kernel's dtypes gate auto)
    assert len(ops_stc._TUNED) == 1
    for name, a, r in zip(NAMES, got, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4, msg=name)
