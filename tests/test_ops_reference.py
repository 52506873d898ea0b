"""The PyTorch references of the public ops: the mask rule, empty rows, GQA, pooling."""

import pytest
import torch

from emu2_engine.ops import modality_attention, modality_mask, pool_patches, pool_project
from emu2_engine.ops.attention import modality_attention_reference


def _mask_by_rule(doc, span, causal):
    S = len(doc)
    m = torch.zeros(S, S, dtype=torch.bool)
    for i in range(S):
        for j in range(S):
            ok = doc[i] == doc[j] and doc[i] >= 0
            if causal:
                ok = ok and (j <= i or (span[i] >= 0 and span[i] == span[j]))
            m[i, j] = ok
    return m


@pytest.mark.parametrize("causal", [True, False])
def test_mask_matches_rule_elementwise(causal):
    doc = [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, -1, -1]
    span = [-1, 3, 3, 3, -1, -1, 7, 7, -1, -1, -1, -1]
    got = modality_mask(torch.tensor([doc]), torch.tensor([span]), causal)[0]
    assert torch.equal(got, _mask_by_rule(doc, span, causal))


def _explicit_attention(q, k, v, mask, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def test_reference_against_explicit_softmax_with_gqa_and_empty_rows():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, S, D = 2, 4, 2, 19, 80
    q, k, v = (torch.randn(B, h, S, D, generator=g, dtype=torch.float64, requires_grad=True)
               for h in (Hq, Hkv, Hkv))
    doc = torch.tensor([[0] * 7 + [1] * 9 + [-1] * 3, [0] * 19], dtype=torch.int32)
    span = torch.full_like(doc, -1)
    span[0, 8:12] = 5
    span[1, 0:4] = 1  # a span at the row start
    out = modality_attention(q, k, v, doc, span, causal=True, scale=0.3)
    want = _explicit_attention(q, k, v, modality_mask(doc, span, True), 0.3)
    torch.testing.assert_close(out, want)
    # Padding rows (no allowed key): zeros, and no gradient reaches q, k or v through them.
    assert out[0, :, 16:].abs().max() == 0
    out[0, :, 16:].sum().backward()
    assert q.grad.abs().max() == 0 and k.grad.abs().max() == 0 and v.grad.abs().max() == 0
    q.grad = k.grad = v.grad = None
    out = modality_attention(q, k, v, doc, span, causal=True, scale=0.3)
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_single_document_fast_path_equals_masked_path():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=g) for _ in range(3))
    doc = torch.zeros(1, 33, dtype=torch.int32)
    span = torch.full_like(doc, -1)
    for causal in (True, False):
        torch.testing.assert_close(modality_attention(q, k, v, doc, span, causal),
                                   modality_attention_reference(q, k, v, doc, span, causal),
                                   atol=1e-5, rtol=1e-5)


def test_attention_shape_errors():
    q = torch.randn(1, 3, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    doc = torch.zeros(1, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        modality_attention(q, k, k, doc, doc)
    with pytest.raises(ValueError, match=r"doc_ids must have shape \(1, 8\)"):
        modality_attention(q, q, q, doc[:, :5], doc)


def test_backend_override_is_checked(monkeypatch):
    q = torch.randn(1, 2, 8, 16)
    doc = torch.zeros(1, 8, dtype=torch.int32)
    monkeypatch.setenv("EMU2_KERNELS", "fastest")
    with pytest.raises(ValueError, match="EMU2_KERNELS must be one of"):
        modality_attention(q, q, q, doc, doc - 1)
    monkeypatch.setenv("EMU2_KERNELS", "reference")
    assert modality_attention(q, q, q, doc, doc - 1).shape == q.shape


@pytest.mark.parametrize("grid,n_query", [(32, 64), (32, 256), (16, 16), (7, 49), (6, 4)])
def test_pool_patches_by_hand(grid, n_query):
    x = torch.randn(2, grid * grid, 5, dtype=torch.float64)
    side = int(n_query ** 0.5)
    k = grid // side
    img = x.view(2, grid, grid, 5)
    want = torch.stack([img[:, r * k:(r + 1) * k, c * k:(c + 1) * k].mean(dim=(1, 2))
                        for r in range(side) for c in range(side)], dim=1)
    torch.testing.assert_close(pool_patches(x, n_query), want)
    w = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(pool_project(x, w, n_query), want @ w.T)


def test_pool_errors():
    with pytest.raises(ValueError, match="square grid"):
        pool_patches(torch.randn(1, 10, 4), 4)
    with pytest.raises(ValueError, match=r"n_query \(9\) must be a square whose side divides"):
        pool_patches(torch.randn(1, 16, 4), 9)
    with pytest.raises(ValueError, match="weight must be"):
        pool_project(torch.randn(1, 16, 4), torch.randn(3, 5), 4)
