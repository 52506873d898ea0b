"""The Triton attention kernel (through the interpreter on the CPU) against the reference.

Every case draws fresh random q, k, v and dout, runs forward and backward through
`modality_attention` with EMU2_KERNELS=triton, and checks the output and dq, dk, dv with the
relative rule of STYLE.md item 7: the kernel's error against the fp64 reference is at most twice
the error of the same PyTorch computation (the reference, SDPA) done in the test dtype, plus a
floor from one table per dtype. The interpreter is slow, so head dims are covered at S = 97 and
the long sequences with one or two head dims and larger interpreter blocks.
"""

from __future__ import annotations

import random

import pytest
import torch

from emu2_engine.kernels import attention as K
from emu2_engine.ops import attention as A
from emu2_engine.ops import modality_attention, modality_mask
from emu2_engine.ops.attention import modality_attention_reference
from kernel_checks import assert_within_rule

# Absolute floor per dtype, relative to the reference's magnitude (about one unit of the last
# place at 1.0): what an exactly rounded result may still differ by.


@pytest.fixture(autouse=True)
def _triton(request, monkeypatch):
    if not K.INTERPRET and "gpu" not in request.keywords:
        pytest.skip("runs the kernel on CPU tensors through the Triton interpreter, which conftest "
                    "turns on only without a GPU; with one, the gpu-marked tests check the kernel")
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    monkeypatch.setattr(K, "AUTOTUNE", False)  # no autotuning in tests (on a GPU: the first config)


# ------------------------------------------------------------------------------------------
# Layouts of documents and spans
# ------------------------------------------------------------------------------------------
def layout(S: int, kind: str, seed: int) -> tuple[list[int], list[int]]:
    """doc_ids and span_ids of one row.

    packed: documents of random lengths, the first of length 1, a span ending on the last
      real token, a padding tail; giant: one document over the whole row with spans (one at the
      row's end); vit: one document, no spans; padding: the whole row is padding;
      interleaved: document ids that come back (the rule compares ids, not ranges);
      spans: one document tiled with back-to-back spans.
    """
    rng = random.Random(seed)
    doc, span = [-1] * S, [-1] * S
    if kind == "padding":
        return doc, span
    if kind in ("giant", "vit", "spans"):
        doc = [3] * S
        if kind == "giant":
            for _ in range(max(1, S // 40)):
                n = rng.randint(1, max(1, S // 5))
                a = rng.randint(0, S - n)
                span[a:a + n] = [rng.randint(0, 5)] * n
            n = min(S, rng.randint(1, 16))
            span[S - n:] = [9] * n
        if kind == "spans":
            step = max(1, S // 7)
            span = [i // step for i in range(S)]
        return doc, span
    if kind == "interleaved":
        doc = [rng.choice([0, 1, 2, -1]) for _ in range(S)]
        span = [rng.choice([-1, -1, 0, 1]) for _ in range(S)]
        return doc, span
    assert kind == "packed"
    real = S - rng.randint(0, S // 6) if S > 2 else S
    t, d = 0, 0
    while t < real:
        n = 1 if d == 0 else rng.randint(1, max(1, S // 3))
        n = min(n, real - t)
        doc[t:t + n] = [d] * n
        if n > 3:  # a span or two inside the document
            for _ in range(rng.randint(1, 2)):
                m = rng.randint(1, max(1, n // 2))
                a = t + rng.randint(0, n - m)
                span[a:a + m] = [d * 10 + rng.randint(0, 1)] * m
        t, d = t + n, d + 1
    if real > 4:  # a span that ends on the last real token (the row end when there is no pad)
        span[real - 3:real] = [99] * 3
        doc[real - 3:real] = [doc[real - 4]] * 3
    return doc, span


def ids(S: int, kinds: list[str], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [layout(S, k, seed + i) for i, k in enumerate(kinds)]
    return (torch.tensor([r[0] for r in rows], dtype=torch.int32),
            torch.tensor([r[1] for r in rows], dtype=torch.int32))


# ------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------
def _run(fn, inputs, dout, dtype):
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out = fn(*xs)
    out.backward(dout.to(dtype))
    return [out.detach()] + [x.grad for x in xs]


def assert_rule(got, ref, low, dtype, what):
    assert_within_rule(got, low, ref, dtype, what)


def check(B, Hq, Hkv, S, D, dtype, doc, span, causal, scale=None, seed=0):
    """Kernel vs fp64 reference, outputs and all three gradients, under the relative rule."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (Hq, Hkv, Hkv))
    dout = torch.randn(B, Hq, S, D, generator=g)
    ref_fn = lambda a, b, c: modality_attention_reference(a, b, c, doc, span, causal, scale)  # noqa: E731
    ker_fn = lambda a, b, c: modality_attention(a, b, c, doc, span, causal, scale)  # noqa: E731
    got = _run(ker_fn, (q, k, v), dout, dtype)
    ref = _run(ref_fn, (q, k, v), dout, torch.float64)
    low = _run(ref_fn, (q, k, v), dout, dtype)
    for name, a, r, lo in zip(("out", "dq", "dk", "dv"), got, ref, low):
        assert a.dtype == dtype and a.shape == r.shape
        assert_rule(a, r, lo, dtype, name)
    # Queries with no allowed key: exactly zero output.
    empty = ~modality_mask(doc, span, causal).any(-1)  # (B, S)
    rows = got[0].permute(0, 2, 1, 3)[empty]
    assert torch.equal(rows, torch.zeros_like(rows))
    return got


# ------------------------------------------------------------------------------------------
# Head dims, dtypes, GQA (S = 97: four 32-token tiles, the last one short)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", [16, 32, 64, 80, 96, 112, 128])
def test_head_dims_causal_gqa(D, dtype):
    doc, span = ids(97, ["packed", "giant"], seed=D)
    check(2, 2, 1, 97, D, dtype, doc, span, causal=True, seed=D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", [64, 112])
def test_head_dims_noncausal(D, dtype):
    doc, span = ids(97, ["packed", "vit"], seed=D + 1)
    check(2, 2, 2, 97, D, dtype, doc, span, causal=False, seed=D, scale=0.3)


# ------------------------------------------------------------------------------------------
# Sequence lengths and layouts
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("S,D,dtype,causal,kinds,Hq,Hkv", [
    (1, 64, torch.float32, True, ["packed", "padding"], 2, 1),
    (1, 112, torch.float16, False, ["vit"], 1, 1),
    (17, 64, torch.float16, True, ["packed", "giant"], 4, 1),
    (17, 80, torch.float32, False, ["interleaved", "packed"], 2, 2),
    (128, 64, torch.float16, True, ["packed", "spans"], 2, 1),
    (128, 128, torch.float32, False, ["vit", "padding"], 1, 1),
])
def test_sequence_lengths(S, D, dtype, causal, kinds, Hq, Hkv):
    doc, span = ids(S, kinds, seed=S)
    check(len(kinds), Hq, Hkv, S, D, dtype, doc, span, causal, seed=S)


@pytest.mark.parametrize("kinds,causal", [
    (["giant"], True), (["interleaved"], True), (["spans"], True), (["padding", "packed"], True),
    (["spans"], False), (["interleaved"], False),
])
def test_layouts(kinds, causal):
    doc, span = ids(71, kinds, seed=7)
    check(len(kinds), 2, 1, 71, 64, torch.float16, doc, span, causal, seed=3)


# Longer rows: larger interpreter blocks keep them affordable (the code path is the same; the
# block shapes themselves are covered by test_block_shapes).
BIG = {"tile": 64, "fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}


@pytest.mark.slow
@pytest.mark.parametrize("S,D,dtype,causal,kinds", [
    (257, 64, torch.float16, True, ["packed"]),
    (257, 112, torch.float32, False, ["vit"]),
    (600, 64, torch.float16, True, ["packed"]),
    (600, 128, torch.float32, True, ["giant"]),
])
def test_long_rows(monkeypatch, S, D, dtype, causal, kinds):
    monkeypatch.setattr(K, "INTERPRETER_BLOCKS", BIG)
    doc, span = ids(S, kinds, seed=S + D)
    check(1, 2, 1, S, D, dtype, doc, span, causal, seed=S)


@pytest.mark.parametrize("blocks", [
    {"tile": 16, "fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)},
    {"tile": 64, "fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)},
    {"tile": 64, "fwd": (64, 64), "dkdv": (64, 64), "dq": (64, 64)},
], ids=["tile16", "tile64-sub", "tile64-whole"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_block_shapes(monkeypatch, blocks, deterministic):
    """Kernel blocks smaller than a tile (sub-steps and programs inside a tile) and equal to it."""
    monkeypatch.setattr(K, "INTERPRETER_BLOCKS", blocks)
    torch.use_deterministic_algorithms(deterministic)
    try:
        doc, span = ids(83, ["packed", "giant"], seed=11)
        check(2, 2, 1, 83, 80, torch.float32, doc, span, causal=True, seed=5)
    finally:
        torch.use_deterministic_algorithms(False)


# ------------------------------------------------------------------------------------------
# Backward modes, empty rows, lse, layouts in memory
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_deterministic_backward_is_reproducible(dtype):
    doc, span = ids(97, ["packed", "giant"], seed=2)
    torch.use_deterministic_algorithms(True)
    try:
        first = check(2, 4, 2, 97, 96, dtype, doc, span, causal=True, seed=9)
        g = torch.Generator().manual_seed(9)
        q, k, v = (torch.randn(2, h, 97, 96, generator=g) for h in (4, 2, 2))
        dout = torch.randn(2, 4, 97, 96, generator=g)
        again = _run(lambda a, b, c: modality_attention(a, b, c, doc, span, True), (q, k, v), dout, dtype)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_rows_without_keys_give_zeros_and_zero_gradients():
    doc, span = ids(45, ["padding", "packed"], seed=4)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 45, 64, generator=g, requires_grad=True) for h in (2, 1, 1))
    out = modality_attention(q, k, v, doc, span, causal=True)
    empty = ~modality_mask(doc, span, True).any(-1)
    assert empty[0].all() and empty[1].any()
    rows = out.permute(0, 2, 1, 3)[empty]
    assert torch.equal(rows, torch.zeros_like(rows))
    # A gradient that enters only through the empty rows reaches nothing.
    (out.permute(0, 2, 1, 3)[empty] * torch.randn_like(rows)).sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t.grad))


def test_lse_matches_reference():
    doc, span = ids(61, ["packed", "padding"], seed=8)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 61, 32, generator=g) for h in (2, 1, 1))
    out, lse = torch.ops.emu2.modality_attention_fwd(q, k, v, doc, span, True, 0.2)
    ref_out, ref_lse = K.reference(q, k, v, doc, span, True, 0.2)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=0)
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and (lse[torch.isinf(lse)] < 0).all()
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=2e-6, rtol=0)


def test_strided_inputs_keep_their_layout():
    """The LLaMA layout (views of (B, S, H, D) projections) and the ViT's slices of a fused qkv:
    outputs and gradients come back in the inputs' layout, and are right."""
    B, S, H, D = 2, 37, 2, 48
    doc, span = ids(S, ["packed", "giant"], seed=1)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, S, 3, H, D, generator=g, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = modality_attention(q, k, v, doc, span, causal=True)
    assert out.stride() == torch.empty_like(q).stride() and out.transpose(1, 2).is_contiguous()
    dout = torch.randn(B, S, H, D, generator=g).transpose(1, 2)  # a (B, S, H, D) gradient
    out.backward(dout)
    ref_qkv = qkv.detach().double().requires_grad_()
    rq, rk, rv = ref_qkv.permute(2, 0, 3, 1, 4).unbind(0)
    ref = modality_attention_reference(rq, rk, rv, doc, span, True)
    ref.backward(dout.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(qkv.grad.double(), ref_qkv.grad, atol=1e-5, rtol=0)


def test_tile_map_is_built_once_for_forward_and_backward():
    A.tile_maps.clear()
    doc, span = ids(40, ["packed"], seed=0)
    q, k, v = (torch.randn(1, 2, 40, 32, requires_grad=True) for _ in range(3))
    before = A.tile_maps.builds
    x = q
    for _ in range(3):  # three "layers" over the same ids
        x = modality_attention(x, k, v, doc, span, causal=True)
    x.sum().backward()
    assert A.tile_maps.builds - before == 1


# ------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any launch
# ------------------------------------------------------------------------------------------
@pytest.fixture
def no_launch(monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(K, "attention_forward", launched)
    monkeypatch.setattr(A, "build_tile_map", launched)


@pytest.mark.parametrize("make,match", [
    (lambda: (torch.randn(1, 2, 8, 136), torch.randn(1, 2, 8, 136)), r"head dim 136"),
    (lambda: (torch.randn(1, 2, 8, 12), torch.randn(1, 2, 8, 12)), r"head dim 12"),
    (lambda: (torch.randn(1, 2, 8, 16, dtype=torch.float64),) * 2, r"q has dtype torch.float64"),
    (lambda: (torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16, dtype=torch.float16)),
     r"k has dtype torch.float16 but q has torch.float32"),
    (lambda: (torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16)), r"Hq a multiple of Hkv"),
    (lambda: (torch.randn(1, 2, 8, 16), torch.randn(1, 2, 9, 16)), r"does not match q"),
    (lambda: (torch.randn(2, 8, 16), torch.randn(2, 8, 16)), r"q \(B, Hq, S, D\)"),
])
def test_bad_tensors(no_launch, make, match):
    q, k = make()
    doc = torch.zeros(q.shape[0], q.shape[-2] if q.dim() == 4 else 8, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        modality_attention(q, k, k, doc, doc - 1)


def test_bad_ids(no_launch):
    q = torch.randn(2, 2, 8, 16)
    doc = torch.zeros(2, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"doc_ids must have shape \(2, 8\), got \(2, 7\)"):
        modality_attention(q, q, q, doc[:, :7], doc)
    with pytest.raises(ValueError, match=r"span_ids must have shape \(2, 8\), got \(8,\)"):
        modality_attention(q, q, q, doc, doc[0])
    with pytest.raises(ValueError, match=r"span_ids must hold integers"):
        modality_attention(q, q, q, doc, doc.float())
    with pytest.raises(TypeError, match=r"doc_ids must be a torch.Tensor"):
        modality_attention(q, q, q, [0] * 8, doc)


def test_configs_are_pruned_by_shared_memory(monkeypatch):
    """H100 (227 KiB per block): at head dim 128 in bf16 every listed config fits except those
    whose pipelined tiles do not; a small-memory GPU keeps fewer, and never none."""
    q = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16)
    for kind, table in (("fwd", K._FWD_CONFIGS), ("dkdv", K._DKDV_CONFIGS), ("dq", K._DQ_CONFIGS)):
        configs = K._configs(table)
        assert all(K.TILE % c.kwargs["BLOCK_M"] == 0 and K.TILE % c.kwargs["BLOCK_N"] == 0 for c in configs)
        monkeypatch.setattr(K, "_smem_limit", lambda index: 232448)
        h100 = K._fitting(kind, configs, q, 128)
        assert h100 and all(
            K._smem_bytes(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, 128, 2) <= 232448
            for c in h100)
        assert h100[0] is configs[0]  # the preferred config fits an H100: it is what runs untuned
        monkeypatch.setattr(K, "_smem_limit", lambda index: 48 * 1024)
        small = K._fitting(kind, configs, q, 128)
        assert 1 <= len(small) < len(h100)
    assert K._smem_bytes("fwd", 128, 128, 3, 128, 2) == 2 * 128 * (128 + 6 * 128)


def test_bf16_through_the_interpreter():
    """bf16 runs through the interpreter upcast after load (its bf16 arithmetic is wrong), so
    this checks layouts and masks in bf16; bf16 rounding itself is checked by test_gpu."""
    doc, span = ids(53, ["packed", "giant"], seed=13)
    check(2, 2, 1, 53, 64, torch.bfloat16, doc, span, causal=True, seed=13)


# ------------------------------------------------------------------------------------------
# On a GPU: the same checks in bf16 and fp16, at real sizes
# ------------------------------------------------------------------------------------------
def _gpu_layout(S: int, B: int, seed: int):
    """Emu2-like rows: documents of 1..S/2 tokens with 64-token spans, a padding tail."""
    rng = random.Random(seed)
    doc = torch.full((B, S), -1, dtype=torch.int32)
    span = torch.full((B, S), -1, dtype=torch.int32)
    for b in range(B):
        t, d, end = 0, 0, S - rng.randint(0, S // 8)
        while t < end:
            n = min(end - t, 1 if d == 0 else rng.randint(1, max(1, S // 2)))
            doc[b, t:t + n] = d
            for s in range(t, t + n - 64, 200):
                span[b, s:s + 64] = d * 100 + s
            t, d = t + n, d + 1
    return doc.cuda(), span.cuda()


# Compile time is the cost on a GPU (each head dim, dtype and mode is a kernel variant): bf16
# everywhere, fp16 and the deterministic backward on a few shapes.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,S,D,Hq,Hkv,causal,kind,deterministic", [
    (torch.bfloat16, 1, 64, 2, 1, True, "packed", False),
    (torch.bfloat16, 97, 80, 4, 2, True, "packed", False),
    (torch.bfloat16, 257, 96, 4, 1, True, "packed", True),
    (torch.bfloat16, 1025, 112, 4, 4, False, "vit", False),
    (torch.bfloat16, 1000, 128, 4, 2, True, "packed", False),
    (torch.bfloat16, 4096, 128, 4, 2, True, "packed", True),
    (torch.float16, 1025, 112, 4, 4, False, "vit", True),
    (torch.float16, 4096, 128, 4, 2, True, "packed", False),
], ids=lambda x: str(x).removeprefix("torch."))
def test_gpu(dtype, S, D, Hq, Hkv, causal, kind, deterministic):
    B = 2
    if kind == "vit":
        doc = torch.zeros(B, S, dtype=torch.int32, device="cuda")
        span = torch.full_like(doc, -1)
    else:
        doc, span = _gpu_layout(S, B, seed=S)
    g = torch.Generator(device="cuda").manual_seed(S)
    q, k, v = (torch.randn(B, h, S, D, generator=g, device="cuda") for h in (Hq, Hkv, Hkv))
    dout = torch.randn(B, Hq, S, D, generator=g, device="cuda")
    ref_fn = lambda a, b, c: modality_attention_reference(a, b, c, doc, span, causal)  # noqa: E731
    torch.use_deterministic_algorithms(deterministic)
    try:
        got = _run(lambda a, b, c: modality_attention(a, b, c, doc, span, causal), (q, k, v), dout, dtype)
    finally:
        torch.use_deterministic_algorithms(False)
    ref = _run(ref_fn, (q, k, v), dout, torch.float64)
    low = _run(ref_fn, (q, k, v), dout, dtype)
    for name, a, r, lo in zip(("out", "dq", "dk", "dv"), got, ref, low):
        assert_rule(a, r, lo, dtype, name)
    empty = ~modality_mask(doc, span, causal).any(-1)
    rows = got[0].permute(0, 2, 1, 3)[empty]
    assert torch.equal(rows, torch.zeros_like(rows))


@pytest.mark.gpu
def test_gpu_autotuned_path(monkeypatch):
    """The autotuned launch (pruning, reset of the atomic dQ buffer between trials) on two
    configs per kernel, both backward modes."""
    monkeypatch.setattr(K, "AUTOTUNE", True)
    monkeypatch.setattr(K, "AUTOTUNE_MIN_WORK", 0)
    for _, tuned, _ in K._KERNELS.values():
        monkeypatch.setattr(tuned, "configs", tuned.configs[:2])
    K.reset_tuning()
    doc, span = _gpu_layout(700, 2, seed=3)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, h, 700, 64, generator=g, device="cuda") for h in (4, 2, 2))
    dout = torch.randn(2, 4, 700, 64, generator=g, device="cuda")
    ref_fn = lambda a, b, c: modality_attention_reference(a, b, c, doc, span, True)  # noqa: E731
    ref = _run(ref_fn, (q, k, v), dout, torch.float64)
    low = _run(ref_fn, (q, k, v), dout, torch.bfloat16)
    try:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            got = _run(lambda a, b, c: modality_attention(a, b, c, doc, span, True), (q, k, v), dout,
                       torch.bfloat16)
            torch.use_deterministic_algorithms(False)
            for name, a, r, lo in zip(("out", "dq", "dk", "dv"), got, ref, low):
                assert_rule(a, r, lo, torch.bfloat16, f"{name} (deterministic={deterministic})")
    finally:
        torch.use_deterministic_algorithms(False)
        K.reset_tuning()
