"""`modality_attention` as an op: the custom ops and their fake implementations (opcheck,
torch.compile with fullgraph), the backend choice, and the models running on the kernel."""

from __future__ import annotations

import pytest
import torch

from emu2_engine.kernels import attention as K
from emu2_engine.models import Emu2Config
from emu2_engine.models.llama import LlamaDecoder
from emu2_engine.models.vit import EVAVisionTransformer
from emu2_engine.ops import attention as A
from emu2_engine.ops import modality_attention
from test_attention_kernel import ids  # tests/ is on sys.path (pytest's prepend import mode)


# Tests that force the kernel on CPU tensors need the interpreter (conftest sets it only when
# there is no GPU).
interpreted = pytest.mark.skipif(not K.INTERPRET,
                                 reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU)")


def _inputs(S=23, D=32, Hq=2, Hkv=1, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    doc, span = ids(S, ["packed", "giant"], seed=1)
    q, k, v = (torch.randn(2, h, S, D, generator=g, dtype=dtype, requires_grad=grad) for h in (Hq, Hkv, Hkv))
    return q, k, v, doc, span


@interpreted
def test_opcheck_custom_ops():
    q, k, v, doc, span = _inputs()
    torch.library.opcheck(torch.ops.emu2.modality_attention_fwd.default, (q, k, v, doc, span, True, 0.25))
    out, lse = torch.ops.emu2.modality_attention_fwd(q, k, v, doc, span, True, 0.25)
    dout = torch.randn_like(out)
    for deterministic in (False, True):
        torch.library.opcheck(torch.ops.emu2.modality_attention_bwd.default,
                              (dout, q, k, v, out, lse, doc, span, True, 0.25, deterministic))


def test_ops_stay_out_of_cuda_graphs():
    """The map is looked up on the host per call: a captured graph would replay a stale one."""
    for op in (torch.ops.emu2.modality_attention_fwd, torch.ops.emu2.modality_attention_bwd):
        assert torch.Tag.cudagraph_unsafe in op.default.tags


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=interpreted), "reference"])
def test_compile_fullgraph_forward_and_backward(monkeypatch, backend):
    monkeypatch.setenv("EMU2_KERNELS", backend)
    torch._dynamo.reset()
    q, k, v, doc, span = _inputs(grad=True)

    def f(q, k, v):
        return modality_attention(q, k, v, doc, span, causal=True).square().sum()

    eager = f(q, k, v)
    want = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    got = torch.autograd.grad(compiled, (q, k, v))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


@pytest.mark.parametrize("setting,kernel", [("auto", False), ("reference", False),
                                            pytest.param("triton", True, marks=interpreted),
                                            ("dense_attention=triton", False),
                                            pytest.param("reference,modality_attention=triton", True,
                                                         marks=interpreted)])
def test_backend_choice(monkeypatch, setting, kernel):
    """auto: the reference on CPU tensors (Triton on CUDA ones); EMU2_KERNELS overrides, per op
    entries over the global one."""
    calls = []
    original = K.modality_attention_triton
    monkeypatch.setattr(K, "modality_attention_triton", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setenv("EMU2_KERNELS", setting)
    q, k, v, doc, span = _inputs()
    modality_attention(q, k, v, doc, span)
    assert bool(calls) == kernel


def test_auto_takes_the_reference_for_input_the_kernel_cannot_take(monkeypatch):
    """On a GPU, auto sends modality_attention to the Triton kernel; a head dim or dtype the
    kernel does not take (a model with head dim 12; fp64) runs the reference there instead of
    failing, while a forced triton still says why it cannot. (The GPU is stood in for by
    making use_triton answer yes.)"""
    monkeypatch.setattr(A, "use_triton", lambda op, x, has_kernel: True)
    launched = []
    original = K.modality_attention_triton
    monkeypatch.setattr(K, "modality_attention_triton", lambda *a: launched.append(1) or original(*a))
    for D, dtype in ((12, torch.float32), (16, torch.float64)):
        q, k, v = (torch.randn(1, 2, 9, D, dtype=dtype) for _ in range(3))
        doc, span = torch.zeros(1, 9, dtype=torch.int32), torch.full((1, 9), -1, dtype=torch.int32)
        monkeypatch.setenv("EMU2_KERNELS", "auto")
        torch.testing.assert_close(modality_attention(q, k, v, doc, span),
                                   A.modality_attention_reference(q, k, v, doc, span, True, None))
        assert not launched
        monkeypatch.setenv("EMU2_KERNELS", "triton")
        with pytest.raises(ValueError, match="not supported by the Triton attention kernel|has dtype torch.float64"):
            modality_attention(q, k, v, doc, span)
        launched.clear()


@pytest.mark.parametrize("setting", ["auto", "reference", pytest.param("triton", marks=interpreted)])
@pytest.mark.parametrize("B, S", [(0, 8), (2, 0)])
def test_empty_batch_or_sequence(monkeypatch, setting, B, S):
    """No rows or no tokens: an empty output of the right shape, and a backward, on every path."""
    monkeypatch.setenv("EMU2_KERNELS", setting)
    q = torch.randn(B, 4, S, 16, requires_grad=True)
    k, v = (torch.randn(B, 2, S, 16, requires_grad=True) for _ in range(2))
    for ids in ((torch.zeros(B, S, dtype=torch.int32), torch.full((B, S), -1, dtype=torch.int32)), (None, None)):
        out = modality_attention(q, k, v, *ids)
        assert out.shape == (B, 4, S, 16)
        out.sum().backward()
        assert q.grad.shape == q.shape


# ------------------------------------------------------------------------------------------
# The models on the kernel: same outputs and gradients as on the reference, one tile map per step
# ------------------------------------------------------------------------------------------
def _grads(model, run):
    model.zero_grad()
    out = run()
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@interpreted
def test_llama_decoder_on_the_kernel(monkeypatch):
    cfg = Emu2Config.from_preset("debug").llm  # GQA 4:2, head dim 32
    torch.manual_seed(0)
    model = LlamaDecoder(cfg)
    S = 45
    doc, span = ids(S, ["packed", "giant"], seed=5)
    pos = torch.arange(S, dtype=torch.int32).expand(2, S)
    h = torch.randn(2, S, cfg.hidden)
    run = lambda: model(h, pos, doc, span)  # noqa: E731
    monkeypatch.setenv("EMU2_KERNELS", "reference")
    want_out, want = _grads(model, run)
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    builds = A.tile_maps.builds
    got_out, got = _grads(model, run)
    assert A.tile_maps.builds - builds == 1  # every layer, forward and backward: one map
    torch.testing.assert_close(got_out, want_out, atol=2e-5, rtol=1e-4)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-3, msg=name)


@interpreted
def test_vit_on_the_kernel(monkeypatch):
    cfg = Emu2Config.from_preset("debug").vision  # 65 tokens, head dim 16, non-causal
    torch.manual_seed(0)
    model = EVAVisionTransformer(cfg)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    monkeypatch.setenv("EMU2_KERNELS", "reference")
    want_out, want = _grads(model, lambda: model(pixels))
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    A.tile_maps.clear()  # the ViT's ids are cached per shape: an earlier test may have mapped them
    builds = A.tile_maps.builds
    got_out, got = _grads(model, lambda: model(pixels))
    assert A.tile_maps.builds - builds == 1
    torch.testing.assert_close(got_out, want_out, atol=2e-5, rtol=1e-4)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-3, msg=name)


# ------------------------------------------------------------------------------------------
# No ids: dense attention (the ViT, the UNets)
# ------------------------------------------------------------------------------------------
def test_backend_entries_per_op(monkeypatch):
    from emu2_engine.ops.backend import requested_backend, use_triton

    monkeypatch.setenv("EMU2_KERNELS", "spatiotemporal_conv=reference, triton")
    assert requested_backend("spatiotemporal_conv") == "reference"
    assert requested_backend("pool_project") == "triton" and requested_backend() == "triton"
    cuda = type("FakeCuda", (), {"is_cuda": True})()  # use_triton reads only .is_cuda
    monkeypatch.setenv("EMU2_KERNELS", "auto")
    assert use_triton("modality_attention", cuda, has_kernel=True)
    assert not use_triton("dense_attention", cuda, has_kernel=True)  # SDPA's fused kernels first
    monkeypatch.setenv("EMU2_KERNELS", "dense_attention=triton")
    assert use_triton("dense_attention", cuda, has_kernel=True)
    for bad, message in (("fastest", "bad choice 'fastest'"), ("attention=triton", "names op 'attention'"),
                         ("pool_project=fast", "bad choice 'fast'")):
        monkeypatch.setenv("EMU2_KERNELS", bad)
        with pytest.raises(ValueError, match=message):
            requested_backend("pool_project")


def _dense_inputs(S, Hq=4, Hkv=2, D=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(2, h, S, D, generator=g, dtype=dtype, requires_grad=True) for h in (Hq, Hkv, Hkv)]


@pytest.mark.parametrize("setting", ["auto", pytest.param("dense_attention=triton", marks=interpreted)])
@pytest.mark.parametrize("causal", [False, True])
def test_no_ids_equals_one_document_per_row(monkeypatch, setting, causal):
    """None ids mean one document per row with no spans: outputs and gradients equal the masked
    reference given those ids, on SDPA and on the kernel."""
    from emu2_engine.ops.attention import modality_attention_reference

    S = 37
    q, k, v = _dense_inputs(S)
    doc = torch.zeros(2, S, dtype=torch.int32)
    want = modality_attention_reference(q, k, v, doc, doc - 1, causal, 0.3)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    calls = []
    original = K.modality_attention_triton
    monkeypatch.setattr(K, "modality_attention_triton", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setenv("EMU2_KERNELS", setting)
    got = modality_attention(q, k, v, None, None, causal=causal, scale=0.3)
    got_grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    assert bool(calls) == (setting != "auto")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-3)


def test_no_ids_input_errors():
    q = torch.randn(1, 2, 8, 16)
    doc = torch.zeros(1, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="both be tensors, or both None"):
        modality_attention(q, q, q, doc, None)
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        k = torch.randn(1, 3, 8, 16)
        modality_attention(q, k, k, None, None)
