"""Every CUDA source in csrc/cuda compiles for sm_90 (H100). They run only on a GPU; this
machine checks that they build."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_SOURCES = sorted((Path(__file__).resolve().parent.parent / "csrc" / "cuda").glob("*.cu"))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_compiles_for_sm90(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not on PATH nor in /usr/local/cuda/bin")
    command = [nvcc, "--gpu-architecture=sm_90", "-std=c++17", "-O3", "-c", str(source),
               "-o", str(tmp_path / f"{source.stem}.o")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stderr}"
