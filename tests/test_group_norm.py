"""`group_norm`: the channels-last Triton kernel (through the interpreter) against PyTorch's
GroupNorm, values and gradients, with and without the fused SiLU, on awkward shapes; the
statistics on data with a large mean; layouts; bad input; the custom ops; sm_90 compilation."""

import pytest
import torch
import torch.nn.functional as F

from emu2_engine.ops import group_norm, group_norm_reference
from kernel_checks import assert_within_rule, compile_for_sm90, run_without_interpreter


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, *spatial) with the same values, laid out as contiguous (N, *spatial, C) rows."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def run(x, w, b, grad, groups, silu, dtype, fn=group_norm, layout=channels_last):
    """(y, dx, dweight, dbias) with every input cast to dtype."""
    x = layout(x.to(dtype, copy=True)).detach().requires_grad_()
    w = w.to(dtype, copy=True).requires_grad_()
    b = b.to(dtype, copy=True).requires_grad_()
    y = fn(x, groups, w, b, 1e-5, silu)
    y.backward(grad.to(dtype))
    return y, x.grad, w.grad, b.grad


def inputs(shape, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset
    w = 1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, w, b, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, groups, silu", [
    ((3, 40, 17, 23), 8, True),      # 5 channels per group, rows not a multiple of any block
    ((2, 24, 5, 7, 9), 3, False),    # 5D: statistics over frames x pixels (315 rows, 8 chunks)
    ((1, 96, 3, 5), 32, True),       # 3 channels per group, 15 rows: one chunk, one block
    ((2, 64, 1, 2), 64, False),      # one channel per group, two values each
    ((2, 24, 6, 5), 1, True),        # one group of 24 channels: six channel blocks per group
])
def test_kernel_matches_reference(monkeypatch, dtype, shape, groups, silu):
    x, w, b, grad = inputs(shape, seed=sum(shape))
    monkeypatch.setenv("EMU2_KERNELS", "reference")
    ref = run(x, w, b, grad, groups, silu, torch.float64)
    low = run(x, w, b, grad, groups, silu, dtype)
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    got = run(x, w, b, grad, groups, silu, dtype)
    for name, a, lo, r in zip(("y", "d x", "d weight", "d bias"), got, low, ref):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert_within_rule(a, lo, r, dtype, name)
    assert got[0].movedim(1, -1).is_contiguous()  # the output keeps the channels-last layout


def test_large_mean_is_not_cancelled(monkeypatch):
    """Activations with a mean 1,000 times their spread: a single-pass E[x^2] - E[x]^2 in fp32
    would lose the variance (its sum of squares, ~4e6 per value, has an ulp of 0.25 against a
    variance of 4); the chunked mean-and-deviation statistics keep it."""
    x, w, b, grad = inputs((2, 16, 13, 11), seed=3, offset=2000.0)
    x = x.float().double()  # the reference sees the same rounded input
    ref = run(x, w, b, grad, 4, True, torch.float64, fn=group_norm_reference)
    low = run(x, w, b, grad, 4, True, torch.float32, fn=group_norm_reference)
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    got = run(x, w, b, grad, 4, True, torch.float32)
    for name, a, lo, r in zip(("y", "d x", "d weight", "d bias"), got, low, ref):
        assert_within_rule(a, lo, r, torch.float32, name)


def test_nchw_input_and_no_affine(monkeypatch):
    """Forced, the kernel takes NCHW input too (copied to rows first) and no weight or bias;
    under auto on the CPU the op is PyTorch's, bit for bit."""
    x = torch.randn(2, 12, 6, 7)
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    got = group_norm(x, 4, None, None, 1e-6, silu=True)
    torch.testing.assert_close(got, F.silu(F.group_norm(x, 4, eps=1e-6)), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("EMU2_KERNELS", "auto")
    w, b = torch.randn(12), torch.randn(12)
    assert torch.equal(group_norm(x, 4, w, b), F.group_norm(x, 4, w, b))


def test_under_autocast_the_kernel_keeps_the_input_dtype(monkeypatch):
    """PyTorch's group_norm under autocast returns fp32; the kernel returns x's dtype, with the
    same values for fp32 input (the weight stays fp32: no cast)."""
    x = channels_last(torch.randn(2, 8, 5, 5))
    w = torch.randn(8, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = group_norm(x, 2, w, b)
        ref = F.group_norm(x, 2, w, b)
    assert got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0


def test_empty_batch(monkeypatch):
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    x = torch.randn(0, 8, 3, 3)
    assert group_norm(x, 2, torch.ones(8), torch.zeros(8)).shape == (0, 8, 3, 3)


@pytest.mark.parametrize("args, message", [
    ((torch.randn(4, 8), 2, None, None), r"expects x of shape \(N, C, \*spatial\)"),
    ((torch.randn(1, 10, 3, 3), 4, None, None), "10 channels to split into 4 equal groups"),
    ((torch.randn(1, 8, 3, 3), 2, torch.ones(6), None), r"weight must be \(8,\), got \(6,\)"),
    ((torch.randn(1, 8, 3, 3), 2, None, torch.ones(8, 1)), r"bias must be \(8,\), got \(8, 1\)"),
])
def test_bad_input(monkeypatch, args, message):
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    with pytest.raises(ValueError, match=message):
        group_norm(*args)


def test_reference_takes_channels_last_and_other_dtype_parameters(monkeypatch):
    """The reference path (auto on the CPU) on channels-last x needing no gradient under affine
    parameters that do (PyTorch 2.13's CPU backward killed the process there: run in a child
    process so a regression fails this test, not the suite), and on parameters in another
    dtype than x (fp32 parameters with fp16 activations; fp64 ones), which the kernel takes."""
    import subprocess
    import sys

    script = ("import torch\n"
              "from emu2_engine.ops import group_norm\n"
              "for x in (torch.randn(2, 8, 3, 4).contiguous(memory_format=torch.channels_last),\n"
              "          torch.randn(2, 8, 2, 3, 4).contiguous(memory_format=torch.channels_last_3d)):\n"
              "    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)\n"
              "    group_norm(x, 4, w, b, 1e-5, silu=True).sum().backward()\n"
              "    ref_w, ref_b = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()\n"
              "    torch.nn.functional.silu(torch.nn.functional.group_norm(x.contiguous(), 4, ref_w, ref_b)).sum().backward()\n"
              "    assert torch.allclose(w.grad, ref_w.grad, atol=1e-5) and torch.allclose(b.grad, ref_b.grad, atol=1e-5)\n"
              "print('ok')\n")
    env = {**__import__("os").environ, "EMU2_KERNELS": "auto"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    for x_dtype, p_dtype in ((torch.float16, torch.float32), (torch.float32, torch.float64)):
        xs = x.to(x_dtype)
        w, b = torch.randn(8, dtype=p_dtype), torch.randn(8, dtype=p_dtype)
        want = F.group_norm(xs.double(), 4, w.double(), b.double()).to(x_dtype)
        for backend in ("reference", "triton"):
            monkeypatch.setenv("EMU2_KERNELS", backend)
            got = group_norm(xs, 4, w, b)
            assert got.dtype == x_dtype, backend
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="weight must be a floating tensor, got torch.int64"):
        group_norm(x, 4, torch.ones(8, dtype=torch.long), None)


def test_forced_triton_on_the_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    """Every op's forced Triton path on CPU tensors without TRITON_INTERPRET=1 gets one clear
    message (it was Triton's "0 active drivers")."""
    from emu2_engine.ops import backend

    monkeypatch.setenv("EMU2_KERNELS", "triton")
    monkeypatch.setattr(backend, "_INTERPRET", False)  # as if imported without TRITON_INTERPRET=1
    with pytest.raises(RuntimeError, match="asks for triton for group_norm, but its input is on the cpu: "
                                           "set TRITON_INTERPRET=1"):
        backend.use_triton("group_norm", torch.zeros(1), has_kernel=True)
    monkeypatch.setattr(backend, "_INTERPRET", True)
    assert backend.use_triton("group_norm", torch.zeros(1), has_kernel=True)


def test_triton_refuses_fp64_and_auto_falls_back(monkeypatch):
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    with pytest.raises(ValueError, match="runs in"):
        group_norm(x, 2, None, None)
    monkeypatch.setenv("EMU2_KERNELS", "auto")
    torch.testing.assert_close(group_norm(x, 2, None, None), F.group_norm(x, 2))


def test_custom_ops_pass_opcheck():
    x = torch.randn(2, 30, 12)
    w, b = torch.randn(12), torch.randn(12)
    y, mean, rstd, scale, shift = torch.ops.emu2.group_norm_rows_fwd(x, w, b, 4, 1e-5, True)
    torch.library.opcheck(torch.ops.emu2.group_norm_rows_fwd, (x, w, b, 4, 1e-5, True))
    torch.library.opcheck(torch.ops.emu2.group_norm_rows_bwd,
                          (torch.randn_like(x), x, w, mean, rstd, scale, shift, True))


def test_kernels_compile_for_sm90():
    run_without_interpreter(__file__, "compile_kernels_for_sm90")


def compile_kernels_for_sm90():
    """All six kernels at the GPU tile sizes, for sm_90: bf16 activations with fp32 weights (the
    training path under autocast), and fp16 / fp32 activations with weights of their own dtype
    (a model cast whole, as the samplers run it)."""
    from emu2_engine.kernels import group_norm as kernel

    ints = dict(L="i32", C="i32", G="i32", CG="i32", rows_per_chunk="i32", n_chunks="i32")
    f32 = "*fp32"
    tiles = dict(BLOCK_R=kernel.BLOCK_R, BLOCK_C=kernel.BLOCK_C)
    small = dict(BLOCK_K=64, BLOCK_CG=64)
    aligned = ("x_ptr", "C")
    for act, wt in (("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")):
        x, w = f"*{act}", f"*{wt}"
        cases = [
            (kernel._stats_kernel, dict(x_ptr=x, mean_ptr=f32, m2_ptr=f32), tiles),
            (kernel._finalize_stats_kernel,
             dict(mean_ptr=f32, m2_ptr=f32, w_ptr=w, b_ptr=w, gmean_ptr=f32, grstd_ptr=f32,
                  scale_ptr=f32, shift_ptr=f32, eps="fp32"), small),
            (kernel._apply_kernel, dict(x_ptr=x, y_ptr=x, scale_ptr=f32, shift_ptr=f32),
             dict(SILU=True, **tiles)),
            (kernel._grad_partials_kernel,
             dict(x_ptr=x, dy_ptr=x, scale_ptr=f32, shift_ptr=f32, gmean_ptr=f32,
                  grstd_ptr=f32, p1_ptr=f32, p2_ptr=f32), dict(SILU=True, **tiles)),
            (kernel._finalize_grad_kernel,
             dict(p1_ptr=f32, p2_ptr=f32, w_ptr=w, gmean_ptr=f32, grstd_ptr=f32, t1_ptr=f32,
                  t2_ptr=f32, beta_ptr=f32, gamma_ptr=f32), small),
            (kernel._grad_input_kernel,
             dict(x_ptr=x, dy_ptr=x, dx_ptr=x, scale_ptr=f32, shift_ptr=f32,
                  beta_ptr=f32, gamma_ptr=f32), dict(SILU=True, **tiles)),
        ]
        for fn, pointers, constexprs in cases:
            types = {**ints, **pointers}
            binary = compile_for_sm90(fn, types, constexprs,
                                      aligned=tuple(a for a in aligned if a in fn.arg_names),
                                      num_warps=kernel.NUM_WARPS)
            assert "cubin" in binary.asm, (fn.fn.__name__, act, wt)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape, groups", [
    ((16, 320, 64, 64), 32),    # the video UNet's first level, 16 frames
    ((16, 2560, 8, 8), 32),     # a deep up-block resnet's input (skip concatenated)
    ((3, 40, 17, 23), 8),
])
def test_cuda_matches_pytorch(dtype, shape, groups, monkeypatch):
    x, w, b, grad = (t.cuda() for t in inputs(shape, seed=0))
    monkeypatch.setenv("EMU2_KERNELS", "reference")
    ref = run(x, w, b, grad, groups, True, torch.float64)
    low = run(x, w, b, grad, groups, True, dtype, layout=lambda t: t)
    monkeypatch.setenv("EMU2_KERNELS", "auto")  # the kernel: CUDA and channels-last
    got = run(x, w, b, grad, groups, True, dtype)
    for name, a, lo, r in zip(("y", "d x", "d weight", "d bias"), got, low, ref):
        assert_within_rule(a, lo, r, dtype, name)
    assert got[0].movedim(1, -1).is_contiguous()


def test_compiled_caller_matches_eager(monkeypatch):
    """torch.compile traces through the op (its custom ops are opaque calls, as inside the
    decoder trainer's compiled UNet blocks): a compiled norm + conv gives eager's values and
    gradients."""
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    conv = torch.nn.Conv2d(16, 8, 3, padding=1)
    weight, bias = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)

    def block(x):
        return conv(group_norm(x, 4, weight, bias, 1e-5, silu=True))

    x = channels_last(torch.randn(2, 16, 5, 7))
    outs = []
    for fn in (block, torch.compile(block, fullgraph=True)):
        for p in (*conv.parameters(), weight, bias):
            p.grad = None
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.square().sum().backward()
        outs.append((y, xi.grad, weight.grad, bias.grad, conv.weight.grad))
    for name, a, b in zip(("y", "d x", "d weight", "d bias", "d conv"), *outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_auto_leaves_the_norm_to_inductor_inside_a_compiled_graph(monkeypatch):
    """Under `auto`, a compiled caller gets PyTorch's group_norm in its graph (Inductor
    generates it, fused; measured faster than the kernel), and eager calls keep the kernel;
    `triton` forces the kernel into the graph too."""
    import importlib

    ops_gn = importlib.import_module("emu2_engine.ops.group_norm")  # the module, not the op
    monkeypatch.setattr(ops_gn, "use_triton", lambda *a, **k: True)   # a GPU, as far as the op knows
    weight, bias = torch.randn(16), torch.randn(16)
    x = channels_last(torch.randn(2, 16, 5, 7))
    graphs = []

    def record(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    def norm(x):
        return ops_gn.group_norm(x, 4, weight, bias, 1e-5, silu=True)

    for backend in ("auto", "triton"):
        monkeypatch.setenv("EMU2_KERNELS", backend)
        torch._dynamo.reset()
        y = torch.compile(norm, backend=record, fullgraph=True)(x)
        torch.testing.assert_close(y, group_norm_reference(x, 4, weight, bias, 1e-5, silu=True),
                                   rtol=1e-4, atol=1e-4)
    auto_graph, forced_graph = graphs
    calls, apply = [], ops_gn._kernel.GroupNormRows.apply
    monkeypatch.setattr(ops_gn._kernel.GroupNormRows, "apply", lambda *a: calls.append(1) or apply(*a))
    monkeypatch.setenv("EMU2_KERNELS", "auto")
    norm(x)  # eager: the kernel
    assert calls == [1]
    assert any("group_norm" in t for t in auto_graph) and not any("emu2" in t for t in auto_graph), auto_graph
    assert any("emu2" in t or "GroupNormRows" in t for t in forced_graph), forced_graph
