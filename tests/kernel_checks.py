"""What every kernel test shares: the one tolerance table (STYLE.md item 7) and the sm_90
compile check.

The rule: a kernel's error against an fp64 reference is at most `factor` times the error of
the same PyTorch computation done in the low dtype, plus `floor` times the largest reference
magnitude (the floor covers results that the low-dtype PyTorch computation gets exactly).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

# dtype -> (factor, floor)
TOL = {torch.float32: (2.0, 2e-6), torch.float16: (2.0, 2.0 ** -11), torch.bfloat16: (2.0, 2.0 ** -8)}


def assert_within_rule(got: torch.Tensor, low: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                       what: str) -> None:
    """got: the kernel's result; low: PyTorch's in `dtype`; ref: the fp64 reference."""
    factor, floor = TOL[dtype]
    ref = ref.double()
    assert torch.isfinite(got).all(), f"{what}: not finite"
    err = (got.double() - ref).abs().max().item()
    base = (low.double() - ref).abs().max().item()
    bound = factor * base + floor * max(ref.abs().max().item(), 1e-3)
    assert err <= bound, (f"{what}: error {err:.3g} > {factor} x {base:.3g} (PyTorch in {dtype}) "
                          f"+ floor = {bound:.3g}")


def compile_for_sm90(kernel, types: dict, constexprs: dict, aligned: tuple = (), **options):
    """Compile a Triton kernel for an H100 (sm_90, to cubin with the ptxas triton ships) without
    a GPU: catches what the interpreter lets through (unsupported ops, dtype or layout errors).
    `aligned` names the arguments to compile as divisible by 16, as a launch specialises them
    (pointers from torch, channel counts that are multiples of 16): without that, vector loads
    and the software pipeline are not generated, so the code is not what runs.
    Run it in a process that has not interpreted kernels (the interpreter patches triton)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {n: "constexpr" if n in constexprs else types[n] for n in kernel.arg_names}
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def run_without_interpreter(test_file: str, function: str) -> None:
    """Call `function` of the test module `test_file` in a fresh process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import sys; sys.path.insert(0, {str(Path(test_file).parent)!r}); "
            f"import {Path(test_file).stem} as t; t.{function}()")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
