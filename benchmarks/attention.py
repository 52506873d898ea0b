"""Attention benchmark: the block-sparse Triton kernel against SDPA, FlexAttention and flash-attn.

    python -m benchmarks.run --suite gpu-quick --only attention      # on a GPU, one command
    python -m benchmarks.attention --suite gpu-full                  # the same, standalone

Cases (issue 3; sizes as in docs/benchmarks.md's roofline table):
- causal: plain causal attention, one document per row, 32 heads of 128, S = 1k..16k
  (batch 4096 / S, at least 1);
- packed: Emu2 training rows of S = 4096 / 8192 tokens, 52 heads of 128, documents of
  256..2048 tokens each holding 64-token images (one per started 512 tokens), whose spans are
  bidirectional ("bi") or causal like the rest ("causal");
- dense (no mask but one document per row, non-causal): "vit-L" 44 images x 1025 tokens, 16
  heads of 64 (proxy-1b's encoder on one micro-batch of its recipe), "vit" 32 images x 1025
  tokens, 16 heads of 112 (Emu2's encoder), and "unet" 2 clips x 4096 tokens (16 frames of 16x16), 10
  heads of 64 (the video UNet's spatial-temporal attention at 640 channels). These calls pass no
  ids in the models, and `modality_attention` runs SDPA for them unless EMU2_KERNELS says
  dense_attention=triton: this family is the A/B behind that default.
Providers: ours, `triton` (`modality_attention` on the kernel: atomic-dQ backward) and
`triton-det` (the deterministic backward); `sdpa-mask` (SDPA with the dense boolean mask);
`sdpa-flash`, `sdpa-efficient`, `sdpa-cudnn` (SDPA `is_causal` or unmasked, one backend each,
where the case has no documents or spans); `flex` (compiled FlexAttention with the equivalent
BlockMask); `flash-attn` where it is importable and the case has no documents or spans.

gpu-quick runs the dense cases first and skips FlexAttention on them (a compile per case, and
nothing to skip without a mask), so a capped run still reports them; each case's numbers are also
printed as they are measured (the log keeps them if the module is stopped).

Metrics per case and phase (fwd, fwd+bwd, and bwd = their difference): time (ms, median of
`triton.testing.do_bench`), tflops counting only allowed score elements (forward 4 x allowed x D
per query head; backward 2 x forward, the recomputed QK^T earning nothing, docs/benchmarks.md),
peak_memory (MiB above what was allocated before one forward+backward), and the kernel's
max_abs_diff against sdpa-mask. gpu-quick runs the kernels untuned (the first config of each
list in kernels/attention.py, as tests do); gpu-full autotunes each case as a training run would.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import BenchResult, time_cpu
from emu2_engine.ops import attention as ops_attention
from emu2_engine.ops import modality_attention, modality_mask

SUITES = ("cpu", "gpu-quick", "gpu-full")


@dataclass
class Case:
    name: str
    family: str  # causal | packed | dense
    B: int
    Hq: int
    Hkv: int
    S: int
    D: int
    causal: bool
    bidirectional: bool = False


def cases(suite: str) -> list[Case]:
    out = [Case("vit-L 44x1025", "dense", 44, 16, 16, 1025, 64, False),  # proxy-1b's encoder, 2 rows
           Case("vit 32x1025", "dense", 32, 16, 16, 1025, 112, False),
           Case("unet 2x4096", "dense", 2, 10, 10, 4096, 64, False)]
    causal_S = (4096,) if suite == "gpu-quick" else (1024, 2048, 4096, 8192, 16384)
    out += [Case(f"causal S={S}", "causal", max(1, 4096 // S), 32, 32, S, 128, True) for S in causal_S]
    packed_S = (8192,) if suite == "gpu-quick" else (4096, 8192)
    out += [Case(f"packed S={S} {'bi' if bi else 'causal'}", "packed", 1, 52, 52, S, 128, True, bi)
            for S in packed_S for bi in (True, False)]
    return out


def layout(case: Case, seed: int = 0, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids, span_ids (B, S) of a case. Packed rows: documents of 256..2048 tokens (the last
    one cut to fit the row), one 64-token image per started 512 tokens at a random place, its
    span bidirectional or not."""
    B, S = case.B, case.S
    doc = torch.zeros(B, S, dtype=torch.int32)
    span = torch.full((B, S), -1, dtype=torch.int32)
    if case.family == "packed":
        rng = random.Random(seed)
        for b in range(B):
            t, d = 0, 0
            while t < S:
                n = min(S - t, rng.randint(256, 2048))
                doc[b, t:t + n] = d
                slots = sorted(rng.sample(range(max(1, n // 64)), k=min(max(1, n // 64), -(-n // 512))))
                for i, slot in enumerate(slots):
                    if case.bidirectional and (slot + 1) * 64 <= n:
                        span[b, t + slot * 64:t + (slot + 1) * 64] = d * 100 + i
                t, d = t + n, d + 1
    return doc.to(device), span.to(device)


def allowed_elements(doc: torch.Tensor, span: torch.Tensor, causal: bool) -> int:
    """Allowed (query, key) pairs over the batch, a row at a time (the dense mask of one row)."""
    return sum(int(modality_mask(doc[b:b + 1], span[b:b + 1], causal).sum()) for b in range(doc.shape[0]))


def flops(case: Case, allowed: int) -> dict[str, float]:
    """FLOPs credited per phase: forward, backward (2 x forward), forward+backward."""
    fwd = 4.0 * allowed * case.D * case.Hq
    return {"fwd": fwd, "bwd": 2.0 * fwd, "fwd+bwd": 3.0 * fwd}


# ----------------------------------------------------------------------------------------------
# Implementations: name -> callable (q, k, v) -> out, or a reason it does not apply
# ----------------------------------------------------------------------------------------------
def implementations(case: Case, doc: torch.Tensor, span: torch.Tensor, flex: bool = True) -> dict[str, object]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impls: dict[str, object] = {}
    scale = case.D ** -0.5
    gqa = case.Hq != case.Hkv

    def kernel(q, k, v):
        return modality_attention(q, k, v, doc, span, case.causal)

    impls["triton"] = kernel
    impls["triton-det"] = kernel  # measured under torch.use_deterministic_algorithms(True)
    mask = modality_mask(doc, span, case.causal)[:, None]
    impls["sdpa-mask"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    single = case.family != "packed"
    for backend, name in ((SDPBackend.FLASH_ATTENTION, "flash"), (SDPBackend.EFFICIENT_ATTENTION, "efficient"),
                          (SDPBackend.CUDNN_ATTENTION, "cudnn")):
        if not single:
            impls[f"sdpa-{name}"] = "documents and spans need a mask: see sdpa-mask"
            continue

        def sdpa(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=gqa)
        impls[f"sdpa-{name}"] = sdpa
    try:
        if not flex:
            raise RuntimeError("skipped in gpu-quick for this family")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, q_idx, kv_idx):
            ok = (doc[b, q_idx] == doc[b, kv_idx]) & (doc[b, q_idx] >= 0)
            if case.causal:
                s = span[b, q_idx]
                ok = ok & ((kv_idx <= q_idx) | ((s >= 0) & (s == span[b, kv_idx])))
            return ok

        block_mask = create_block_mask(mask_mod, case.B, None, case.S, case.S, device=doc.device)
        flex = torch.compile(flex_attention, dynamic=False)
        impls["flex"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
        impls["flex"] = f"unavailable: {type(e).__name__}: {e}"
    try:
        from flash_attn import flash_attn_func
        if single:
            impls["flash-attn"] = lambda q, k, v: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=case.causal).transpose(1, 2)
        else:
            impls["flash-attn"] = "no bidirectional spans in flash-attn; documents alone would need varlen"
    except ImportError:
        impls["flash-attn"] = "flash_attn is not importable here"
    return impls


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------
def _measure(fn, q, k, v, dout, deterministic: bool) -> dict:
    from triton.testing import do_bench

    def fwdbwd():
        fn(q, k, v).backward(dout)

    torch.use_deterministic_algorithms(deterministic)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN fill of empty_like outputs
    try:
        with torch.no_grad():
            fwd_ms = do_bench(lambda: fn(q, k, v), warmup=25, rep=100, return_mode="median")
        fwdbwd_ms = do_bench(fwdbwd, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwdbwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        q.grad = k.grad = v.grad = None
    return {"fwd": fwd_ms, "fwd+bwd": fwdbwd_ms, "bwd": fwdbwd_ms - fwd_ms, "peak": peak}


def run_case(case: Case, result: BenchResult, dtype: torch.dtype = torch.bfloat16, flex: bool = True) -> None:
    from emu2_engine.kernels import attention as K

    doc, span = layout(case)
    fl = flops(case, allowed_elements(doc, span, case.causal))
    params = {"S": case.S, "family": case.family, "B": case.B, "heads": case.Hq, "head_dim": case.D}
    add = lambda provider, metric, value, unit, phase="": result.add(  # noqa: E731
        benchmark="attention", case=f"{case.name} {phase}".strip(), provider=provider, metric=metric,
        value=value, unit=unit, params={**params, "phase": phase})
    K.reset_tuning()  # a run tunes for its own shape
    torch._dynamo.reset()  # FlexAttention recompiles per shape: stay under dynamo's recompile limit
    add("triton", "time", _time_synced(lambda: ops_attention.build_tile_map(doc, span, case.causal, K.TILE)),
        "ms", "tile map")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(case.B, h, case.S, case.D, generator=g, device="cuda", dtype=dtype, requires_grad=True)
               for h in (case.Hq, case.Hkv, case.Hkv))
    dout = torch.randn(case.B, case.Hq, case.S, case.D, generator=g, device="cuda", dtype=dtype)
    impls = implementations(case, doc, span, flex)
    with torch.no_grad():
        want = impls["sdpa-mask"](q, k, v).float()
    for name, impl in impls.items():
        if isinstance(impl, str):
            result.skipped.append(f"{case.name}: {name}: {impl}")
            continue
        deterministic = name == "triton-det"
        try:
            with torch.no_grad():
                diff = (impl(q, k, v).float() - want).abs().max().item()
            t = _measure(impl, q, k, v, dout, deterministic)
        except Exception as e:  # noqa: BLE001 - one failing provider must not lose the others
            result.skipped.append(f"{case.name}: {name} failed: {type(e).__name__}: {str(e)[:300]}")
            torch.cuda.empty_cache()
            continue
        for phase in ("fwd", "fwd+bwd", "bwd"):
            add(name, "time", t[phase], "ms", phase)
            add(name, "tflops", fl[phase] / t[phase] / 1e9, "TFLOP/s", phase)
        print(f"[attention] {case.name} {name}: fwd {t['fwd']:.3f} ms, fwd+bwd {t['fwd+bwd']:.3f} ms, "
              f"{fl['fwd+bwd'] / t['fwd+bwd'] / 1e9:.0f} TFLOP/s fwd+bwd", flush=True)
        add(name, "peak_memory", t["peak"], "MiB", "fwd+bwd")
        if name == "triton":
            add(name, "max_abs_diff", diff, f"vs sdpa-mask ({str(dtype).removeprefix('torch.')})", "fwd")
        torch.cuda.empty_cache()


def _time_synced(fn) -> float:
    """Median wall time of a host-driven function that launches GPU work (the tile map build)."""
    def synced():
        fn()
        torch.cuda.synchronize()
    return time_cpu(synced, warmup=1, repeats=5)


def _cpu(result: BenchResult) -> None:
    """No GPU: the tile map and the reference on one small packed row, for orders of magnitude."""
    case = Case("packed S=1024 bi (CPU)", "packed", 1, 4, 4, 1024, 64, True, True)
    doc, span = layout(case, device="cpu")
    q, k, v = (torch.randn(1, 4, 1024, 64) for _ in range(3))
    params = {"S": case.S, "family": case.family}
    result.add(benchmark="attention", case=f"{case.name} tile map", provider="tile map", metric="time",
               value=time_cpu(lambda: ops_attention.build_tile_map(doc, span, True, 128)), unit="ms",
               params=params)
    result.add(benchmark="attention", case=f"{case.name} fwd", provider="reference", metric="time",
               value=time_cpu(lambda: ops_attention.modality_attention_reference(q, k, v, doc, span, True)),
               unit="ms", params=params)


def run(suite: str, out_dir: Path) -> BenchResult:
    """The harness's entry point (benchmarks/run.py). out_dir is unused: the harness writes the
    report from the returned measurements."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
    result = BenchResult(ours="triton", plots=[
        {"name": "causal-fwd", "metric": "tflops", "x": "S", "logx": 2,
         "where": {"family": "causal", "phase": "fwd"}, "title": "attention, causal, forward"},
        {"name": "causal-fwdbwd", "metric": "tflops", "x": "S", "logx": 2,
         "where": {"family": "causal", "phase": "fwd+bwd"}, "title": "attention, causal, forward+backward"},
        {"name": "tflops", "kind": "bar", "metric": "tflops",
         "providers": ["triton", "triton-det", "sdpa-mask", "sdpa-flash", "sdpa-cudnn", "flex"],
         "title": "attention: TFLOP/s over allowed elements"}])
    if suite == "cpu" or not torch.cuda.is_available():
        _cpu(result)
        result.skipped.append("kernel and baseline timings: no CUDA device here (on the CPU the kernel "
                              "runs only through the Triton interpreter, which says nothing about speed)")
        return result
    from emu2_engine.kernels import attention as K
    K.AUTOTUNE = suite == "gpu-full"
    try:
        for case in cases(suite):
            run_case(case, result, flex=not (suite == "gpu-quick" and case.family == "dense"))
    finally:
        K.AUTOTUNE = True
    return result


def main(argv: list[str] | None = None) -> BenchResult:
    from benchmarks.report import markdown
    from benchmarks.run import SUITE_NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=SUITE_NAMES,
                        default="gpu-quick" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    result = run(args.suite, Path("."))
    from benchmarks.common import environment
    print(markdown({"suite": args.suite, "date": time.strftime("%Y-%m-%d"), "environment": environment(),
                    "benchmarks": {"attention": result.to_dict()}}))
    return result


if __name__ == "__main__":
    main()
