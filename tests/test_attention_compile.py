"""The attention kernels (`emu2_engine.kernels.attention`) compiled for an H100 (sm_90, to cubin
with the ptxas triton ships) without a GPU, with the launch parameters a GPU run would use.

The interpreter runs these kernels on the CPU at its own small blocks; the compiler catches what
it lets through (unsupported ops, dtype and layout errors, shared memory past the device's).
Nothing here is hand-typed: the host side (`attention_forward`, `attention_backward`) runs on
meta tensors with the kernels swapped for recorders, under the settings of an untuned H100 run
(`AUTOTUNE` off, `_smem_limit` = an H100's), so each launch's arguments, constexprs and config
are the launcher's own; then each launch is specialised the way `JITFunction.run` does it (i32 or
i64 by value, ints equal to 1 as constexprs, 16-divisibility of pointers and ints) and compiled.

Cases: Emu2's decoder (head dim 128, causal, (B, S, H, D) projections), its ViT (head dim 112,
bidirectional, one fused qkv projection), a GQA decoder at head dim 64, and a long sequence whose
batch strides pass 2^31 (i64 arguments). Every kernel the launcher starts: `_fwd_kernel`,
`_bwd_delta_kernel`, `_bwd_dkdv_kernel` with ATOMIC_DQ on (default) and off (deterministic), and
`_bwd_dq_kernel` (deterministic). Every config of the CUDA tables in bf16 and fp16 at head dim
128; the config the launcher picks (the first) at the others. The compiles run in up to two
worker processes (about a second each, about 65 of them).
"""

from __future__ import annotations

import functools
import os
import traceback

from kernel_checks import run_without_interpreter

H100_SHARED = 232448  # bytes of shared memory one block may use on an H100 (227 KiB opt-in)

# name -> (head dim, causal, B, S, query heads, kv heads, layout)
CASES = {
    "decoder": (128, True, 1, 4096, 52, 52, "bshd"),  # LLaMA-33B: 6656 = 52 x 128, no GQA
    "vit": (112, False, 2, 1025, 16, 16, "qkv"),  # EVA-CLIP-E: 1792 = 16 x 112, 32 x 32 patches + CLS
    "gqa": (64, True, 2, 2048, 16, 4, "bshd"),  # GROUP = 4: a runtime int, not the constexpr 1
    "long": (128, True, 1, 330_000, 52, 52, "bshd"),  # S x 52 x 128 > 2^31: i64 batch strides
}
# Every config of every table for these cases; the launcher's pick for the rest.
ALL_CONFIGS = {"decoder"}
DTYPES = ("bfloat16", "float16")
# (kernel, ATOMIC_DQ, deterministic backward that launches it)
KERNELS = [("_fwd_kernel", None, False), ("_bwd_delta_kernel", None, False), ("_bwd_dkdv_kernel", True, False),
           ("_bwd_dkdv_kernel", False, True), ("_bwd_dq_kernel", None, True)]


def test_kernels_compile_for_sm90():
    run_without_interpreter(__file__, "compile_kernels_for_sm90")


def compile_kernels_for_sm90():
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from emu2_engine.kernels import attention as A

    tables = {"_fwd_kernel": A._FWD_CONFIGS, "_bwd_dkdv_kernel": A._DKDV_CONFIGS, "_bwd_dq_kernel": A._DQ_CONFIGS}
    jobs = []
    for case in CASES:
        for dtype in DTYPES if case != "long" else DTYPES[:1]:
            for name, atomic, deterministic in KERNELS:
                configs = tables.get(name, [None]) if case in ALL_CONFIGS else [None]
                jobs += [(case, dtype, name, atomic, deterministic, config) for config in configs]
    # Slowest first (the 4-warp dK/dV configs take about 3 s), so the two workers end together.
    jobs.sort(key=lambda j: (j[2] != "_bwd_dkdv_kernel", (j[5] or (0, 0, 8))[2]))
    workers = max(1, min(2, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_compile_job, jobs))

    failures = [f"{job}:\n{error}" for job, error, _ in results if error]
    assert not failures, f"{len(failures)} of {len(jobs)} compiles failed:\n" + "\n".join(failures)
    for job, _, (config, shared, i64) in results:
        case, _, name, _, _, wanted = job
        if wanted is None and name in tables:
            assert config == tables[name][0], f"{job}: on an H100 the launcher picks {config}, not the first"
        # The launcher keeps only configs whose estimate fits (`_fitting`); each must really fit.
        assert shared <= H100_SHARED, f"{job}: {config} needs {shared} B of shared memory > {H100_SHARED}"
        assert bool(i64) == (case == "long"), f"{job}: i64 arguments {i64}"


def _compile_job(job):
    """(job, error text or None, (config, shared bytes, i64 argument names))."""
    case, dtype, name, atomic, deterministic, config = job
    try:
        for kernel, args, kwargs in _launches(case, dtype, deterministic):
            if kernel.__name__ == name and kwargs.get("ATOMIC_DQ") == atomic:
                break
        else:
            raise AssertionError(f"the launcher never started {name} with ATOMIC_DQ={atomic}")
        if config is not None:
            m, n, warps, stages = config
            kwargs = dict(kwargs, BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)
        compiled, signature = _compile_as_launched(kernel, args, kwargs)
        assert "cubin" in compiled.asm
        picked = ((kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"])
                  if "BLOCK_N" in kwargs else None)
        return job, None, (picked, compiled.metadata.shared, [k for k, v in signature.items() if v == "i64"])
    except Exception:
        return job, traceback.format_exc(limit=-6), None


@functools.lru_cache
def _launches(case, dtype_name, deterministic):
    """[(kernel, args, kwargs)] of every launch of a forward and a backward, recorded from the
    host side run on meta tensors as it would run untuned on an H100."""
    import torch
    from emu2_engine.kernels import attention as A
    from emu2_engine.ops.attention import build_tile_map

    D, causal, B, S, HQ, HKV, layout = CASES[case]
    dtype = getattr(torch, dtype_name)
    calls = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.kernel, args, kwargs))

    saved = dict(_KERNELS=A._KERNELS, _bwd_delta_kernel=A._bwd_delta_kernel, AUTOTUNE=A.AUTOTUNE,
                 _smem_limit=A._smem_limit)
    A._KERNELS = {kind: (Recorder(kernel), tuned, table) for kind, (kernel, tuned, table) in A._KERNELS.items()}
    A._bwd_delta_kernel = Recorder(A._bwd_delta_kernel)
    A.AUTOTUNE = False
    A._smem_limit = lambda device_index: H100_SHARED
    try:
        meta = dict(device="meta", dtype=dtype)
        if layout == "bshd":  # separate (B, S, H, D) projections, transposed to (B, H, S, D)
            q = torch.empty(B, S, HQ, D, **meta).transpose(1, 2)
            k = torch.empty(B, S, HKV, D, **meta).transpose(1, 2)
            v = torch.empty(B, S, HKV, D, **meta).transpose(1, 2)
        else:  # one fused qkv projection, as the ViT makes it
            q, k, v = torch.empty(B, S, 3, HQ, D, **meta).permute(2, 0, 3, 1, 4).unbind(0)
        ids = torch.zeros(B, S, dtype=torch.long, device="meta")
        tiles = build_tile_map(ids, ids, causal, A.TILE)
        out, lse = A.attention_forward(q, k, v, tiles, causal, D ** -0.5)
        A.attention_backward(torch.empty_like(out), q, k, v, out, lse, tiles, causal, D ** -0.5, deterministic)
    finally:
        for attr, value in saved.items():
            setattr(A, attr, value)
    return calls


def _compile_as_launched(kernel, args, kwargs):
    """What `JITFunction.run` compiles for this launch on an sm_90 device: (compiled kernel,
    signature). Mirrors its binder and `_pack_args` (triton 3.7)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    kwargs = dict(kwargs, debug=kernel.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, _ = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, None)
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__), signature
