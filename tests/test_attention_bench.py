"""benchmarks/attention.py on the CPU: the cases the issue asks for, the layouts, the FLOP
credit, and the cpu suite (which can only skip the GPU parts, with a reason)."""

import sys
from pathlib import Path

import torch

from emu2_engine.ops import modality_mask

REPO = Path(__file__).resolve().parent.parent
# benchmarks/ is not an installed package: import it from the repository root, then take the
# root off sys.path again so nothing else finds kernels/ as a top-level module.
sys.path.insert(0, str(REPO))
try:
    from benchmarks import attention as bench  # noqa: E402
finally:
    sys.path.remove(str(REPO))


def test_full_suite_has_the_issues_cases():
    cases = bench.cases("gpu-full")
    causal = [c for c in cases if c.family == "causal"]
    assert [c.S for c in causal] == [1024, 2048, 4096, 8192, 16384] and {c.D for c in causal} == {128}
    packed = {(c.S, c.bidirectional) for c in cases if c.family == "packed"}
    assert packed == {(4096, True), (4096, False), (8192, True), (8192, False)}
    dense = {c.name.split()[0]: (c.B, c.S, c.Hq, c.D, c.causal) for c in cases if c.family == "dense"}
    assert dense == {"vit-L": (44, 1025, 16, 64, False), "vit": (32, 1025, 16, 112, False),
                     "unet": (2, 4096, 10, 64, False)}
    quick = bench.cases("gpu-quick")
    assert {c.name for c in quick} < {c.name for c in cases}
    assert [c.family for c in quick[:2]] == ["dense", "dense"]  # first, so a capped run reports them


def test_packed_layout():
    case = bench.Case("p", "packed", 2, 4, 4, 4096, 128, True, True)
    doc, span = bench.layout(case, seed=1, device="cpu")
    for b in range(2):
        _, lengths = torch.unique_consecutive(doc[b], return_counts=True)
        assert (doc[b] >= 0).all() and lengths.sum() == 4096
        assert ((lengths[:-1] >= 256) & (lengths[:-1] <= 2048)).all() and lengths[-1] <= 2048
        ids, counts = torch.unique(span[b][span[b] >= 0], return_counts=True)
        assert len(ids) >= 4096 // 2048 and (counts == 64).all()
        for s in ids:  # every span lies inside one document
            assert len(torch.unique(doc[b][span[b] == s])) == 1
    _, causal_span = bench.layout(bench.Case("p", "packed", 2, 4, 4, 4096, 128, True, False), seed=1, device="cpu")
    assert (causal_span == -1).all()


def test_flop_credit_counts_allowed_elements_only():
    S = 300
    doc = torch.zeros(1, S, dtype=torch.int32)
    span = torch.full_like(doc, -1)
    assert bench.allowed_elements(doc, span, True) == S * (S + 1) // 2
    span[0, 10:74] = 0
    allowed = bench.allowed_elements(doc, span, True)
    assert allowed == int(modality_mask(doc, span, True).sum()) == S * (S + 1) // 2 + 64 * 63 // 2
    case = bench.Case("c", "causal", 1, 8, 8, S, 64, True)
    f = bench.flops(case, allowed)
    assert f["fwd"] == 4 * allowed * 64 * 8 and f["bwd"] == 2 * f["fwd"] and f["fwd+bwd"] == 3 * f["fwd"]


def test_cpu_suite_skips_the_gpu_parts(tmp_path):
    result = bench.run("cpu", tmp_path)
    assert result.ours == "triton"
    assert any("no CUDA device" in s for s in result.skipped)
    assert {m.provider for m in result.measurements} == {"tile map", "reference"}
    assert all(m.value > 0 and m.unit == "ms" for m in result.measurements)
    if not torch.cuda.is_available():
        assert len(bench.run("gpu-quick", tmp_path).measurements) == 2  # the same CPU numbers, GPU skipped
