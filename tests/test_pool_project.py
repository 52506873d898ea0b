"""`pool_project`: the fused Triton kernel (through the interpreter) against the reference,
values, the returned pooled features and gradients, on every window size the issue names and
awkward widths; bad input; the custom ops."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from emu2_engine.ops import pool_patches, pool_project
from kernel_checks import assert_within_rule, compile_for_sm90, run_without_interpreter



def run(x, w, grad, n_query, dtype):
    """(out, pooled, dx, dw) with inputs cast to dtype."""
    x = x.to(dtype, copy=True).requires_grad_()
    w = w.to(dtype, copy=True).requires_grad_()
    out, pooled = pool_project(x, w, n_query, return_pooled=True)
    out.backward(grad.to(dtype))
    return out, pooled, x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N, grid, n_query, C, H", [
    (2, 32, 64, 80, 96),     # Emu2: 32 -> 8 (4 x 4 windows)
    (1, 32, 256, 112, 100),  # Emu2-Chat: 32 -> 16
    (3, 16, 16, 80, 96),     # 16 -> 4
    (2, 7, 49, 48, 40),      # 7 -> 7: no pooling
    (1, 6, 4, 40, 33),       # 3 x 3 windows
])
def test_kernel_matches_reference(monkeypatch, dtype, N, grid, n_query, C, H):
    g = torch.Generator().manual_seed(N * grid + C)
    x = torch.randn(N, grid * grid, C, generator=g, dtype=torch.float64)
    w = torch.randn(H, C, generator=g, dtype=torch.float64) * C ** -0.5
    grad = torch.randn(N, n_query, H, generator=g, dtype=torch.float64)
    monkeypatch.setenv("EMU2_KERNELS", "reference")
    ref = run(x, w, grad, n_query, torch.float64)
    low = run(x, w, grad, n_query, dtype)
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    got = run(x, w, grad, n_query, dtype)
    for name, a, b, r in zip(("out", "pooled", "d x", "d weight"), got, low, ref):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert_within_rule(a, b, r, dtype, name)
    assert not got[1].requires_grad  # pooled comes back detached


def test_pooled_is_the_saved_activation_and_weight_only_grad(monkeypatch):
    """A frozen encoder (x without grad) still trains the weight; the pooled features equal
    `pool_patches` exactly in fp32."""
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    x = torch.randn(2, 64, 24)
    w = torch.randn(20, 24, requires_grad=True)
    out, pooled = pool_project(x, w, 4, return_pooled=True)
    torch.testing.assert_close(pooled, pool_patches(x, 4), rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    torch.testing.assert_close(w.grad, (2 * out.detach()).reshape(-1, 20).T @ pooled.reshape(-1, 24),
                               rtol=1e-5, atol=1e-5)


def test_no_images(monkeypatch):
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    x = torch.randn(0, 16, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    out = pool_project(x, w, 4)
    assert out.shape == (0, 4, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.abs().max() == 0


@pytest.mark.parametrize("args, message", [
    ((torch.randn(16, 4), torch.randn(3, 4), 4), r"expects \(N, P, C\)"),
    ((torch.randn(1, 10, 4), torch.randn(3, 4), 4), "square grid"),
    ((torch.randn(1, 16, 4), torch.randn(3, 4), 9), r"n_query \(9\) must be a square whose side divides"),
    ((torch.randn(1, 16, 4), torch.randn(3, 5), 4), r"weight must be \(H, 4\)"),
    ((torch.randn(1, 16, 4), torch.randn(3, 4, dtype=torch.float16), 4), "weight is torch.float16"),
])
def test_bad_input(monkeypatch, args, message):
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    with pytest.raises(ValueError, match=message):
        pool_project(*args)


def test_triton_refuses_fp64_and_auto_falls_back(monkeypatch):
    x, w = torch.randn(1, 16, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    with pytest.raises(ValueError, match="runs in"):
        pool_project(x, w, 4)
    monkeypatch.setenv("EMU2_KERNELS", "auto")
    torch.testing.assert_close(pool_project(x, w, 4), F.linear(pool_patches(x, 4), w))


def test_custom_ops_pass_opcheck_and_flops_are_the_gemms(monkeypatch):
    """The pooling ops pass opcheck; a forward + backward counts exactly the three GEMMs."""
    x, w = torch.randn(2, 64, 24), torch.randn(20, 24)
    torch.library.opcheck(torch.ops.emu2.pool_patches_fwd, (x, 16))
    torch.library.opcheck(torch.ops.emu2.pool_patches_bwd, (torch.randn(2, 16, 24), 64))
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    x.requires_grad_()
    w.requires_grad_()
    with FlopCounterMode(display=False) as fc:
        pool_project(x, w, 16).sum().backward()
    assert fc.get_total_flops() == 3 * (2 * 2 * 16 * 20 * 24)


def test_kernels_compile_for_sm90():
    run_without_interpreter(__file__, "compile_kernels_for_sm90")


def compile_kernels_for_sm90():
    """Both pooling kernels, in bf16 and fp32, at the GPU block size, compiled for sm_90."""
    from emu2_engine.kernels import pool_project as kernel

    common = dict(C="i32", GRID="i32", SIDE="i32", WINDOW="i32", n_query="i32", inv_area="fp32")
    for dt in ("bf16", "fp32"):
        opts = dict(num_warps=kernel.NUM_WARPS)
        fwd = compile_for_sm90(kernel._pool_kernel, dict(x_ptr=f"*{dt}", pooled_ptr=f"*{dt}", **common),
                               dict(BLOCK_C=kernel.BLOCK_C), **opts)
        bwd = compile_for_sm90(kernel._unpool_kernel, dict(dpooled_ptr=f"*{dt}", dx_ptr=f"*{dt}", **common),
                               dict(BLOCK_C=kernel.BLOCK_C), **opts)
        assert "cubin" in fwd.asm and "cubin" in bwd.asm


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_at_emu2_size(dtype, monkeypatch):
    """Emu2's projector on CUDA: 1024 patches of 1792 -> 64 tokens of 6656, 8 images."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 1024, 1792, generator=g, device="cuda", dtype=torch.float64)
    w = torch.randn(6656, 1792, generator=g, device="cuda", dtype=torch.float64) * 1792 ** -0.5
    grad = torch.randn(8, 64, 6656, generator=g, device="cuda", dtype=torch.float64)
    ref = run(x, w, grad, 64, torch.float64)
    monkeypatch.setenv("EMU2_KERNELS", "reference")
    low = run(x, w, grad, 64, dtype)
    monkeypatch.setenv("EMU2_KERNELS", "auto")  # the kernel, on CUDA
    got = run(x, w, grad, 64, dtype)
    for name, a, b, r in zip(("out", "pooled", "d x", "d weight"), got, low, ref):
        assert_within_rule(a, b, r, dtype, name)
