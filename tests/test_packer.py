"""The C++ best-fit-decreasing packer against the Python reference, and the package layout
it is built into (emu2_engine._C, emu2_engine.kernels)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from emu2_engine.data import packing
from emu2_engine.data.packing import MAX_ROW_LEN, pack_sequences, pack_sequences_reference

REPO = Path(__file__).resolve().parent.parent


def _lengths(kind: str, n: int, row_len: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(1, row_len + 1, n)
    if kind == "skewed":  # many short samples, a tail up to the row length, like real data
        return np.clip(np.exp(rng.normal(np.log(row_len / 8), 1.0, n)), 1, row_len).astype(np.int64)
    if kind == "few_values":  # many equal lengths: exercises both tie-breaking rules
        return rng.choice(np.array([1, row_len // 3, row_len // 2, row_len], dtype=np.int64).clip(1), n)
    raise ValueError(kind)


def _check_valid(rows: list[list[int]], lengths: np.ndarray, row_len: int) -> None:
    placed = np.array([i for row in rows for i in row], dtype=np.int64)
    assert np.array_equal(np.sort(placed), np.arange(len(lengths))), "each sample exactly once"
    assert all(row for row in rows), "no empty rows"
    fill = [int(lengths[row].sum()) for row in rows]
    assert max(fill, default=0) <= row_len
    assert len(rows) >= -(-int(lengths.sum()) // row_len)


@pytest.mark.parametrize("row_len", [64, 1000, 2048])
@pytest.mark.parametrize("kind", ["uniform", "skewed", "few_values"])
@pytest.mark.parametrize("seed,n", [(0, 1), (1, 97), (2, 1025), (3, 20_000)])
def test_matches_reference(seed, n, kind, row_len):
    lengths = _lengths(kind, n, row_len, np.random.default_rng([seed, row_len]))
    expected = pack_sequences_reference(lengths, row_len)
    got = pack_sequences(lengths, row_len)
    _check_valid(got, lengths, row_len)
    _check_valid(expected, lengths, row_len)
    assert len(got) <= len(expected)
    assert got == expected


def test_extension_csr_output():
    from emu2_engine import _C

    lengths = np.array([5, 3, 8, 2, 2], dtype=np.int64)
    row_offsets, sample_index = _C.pack_best_fit(lengths, 10)
    assert row_offsets.dtype == np.int64 and sample_index.dtype == np.int64
    # 8 opens row 0 (2 left), 5 opens row 1 (5 left), 3 fits best in row 1 (2 left); the two
    # 2s tie on remaining space and go to the row opened first, then the other.
    assert row_offsets.tolist() == [0, 2, 5]
    assert sample_index.tolist() == [2, 3, 0, 1, 4]
    assert _C.MAX_ROW_LEN == MAX_ROW_LEN


def test_csr_to_lists():
    from emu2_engine import _C

    assert _C.csr_to_lists(np.array([0, 2, 2, 3]), np.array([5, 6, 7])) == [[5, 6], [], [7]]
    assert _C.csr_to_lists(np.array([0]), np.zeros(0, dtype=np.int64)) == []
    with pytest.raises(ValueError, match="must start at 0 and end at len"):
        _C.csr_to_lists(np.array([0, 4]), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="non-decreasing"):
        _C.csr_to_lists(np.array([0, 3, 1, 3]), np.array([1, 2, 3]))


def test_best_fit_not_first_fit():
    # First fit would put the 3 into row 0 (4 left); best fit picks row 1 (3 left, exact).
    assert pack_sequences([6, 7, 3], 10) == pack_sequences_reference([6, 7, 3], 10) == [[1, 2], [0]]


@pytest.mark.parametrize("lengths", [[], np.zeros(0, dtype=np.int64), np.array([])])
def test_empty(lengths):
    assert pack_sequences(lengths, 16) == []
    assert pack_sequences_reference(lengths, 16) == []


def test_single_full_row_and_unit_rows():
    assert pack_sequences([2048], 2048) == [[0]]
    assert pack_sequences(np.ones(5, dtype=np.int32), 1) == [[0], [1], [2], [3], [4]]
    assert pack_sequences([MAX_ROW_LEN], MAX_ROW_LEN) == [[0]]


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint16, np.int64])
def test_integer_dtypes(dtype):
    lengths = np.random.default_rng(5).integers(1, 100, 500).astype(dtype)
    assert pack_sequences(lengths, 128) == pack_sequences(lengths.astype(np.int64).tolist(), 128)


@pytest.mark.parametrize("packer", [pack_sequences, pack_sequences_reference])
def test_errors(packer):
    with pytest.raises(ValueError, match=r"sample 2 has length 11, longer than the row length 10"):
        packer([3, 10, 11, 12], 10)
    with pytest.raises(ValueError, match=r"sample 1 has length 0; every sample needs at least"):
        packer([3, 0, 4], 10)
    with pytest.raises(ValueError, match=r"sample 0 has length -3"):
        packer(np.array([-3, 2]), 10)
    for row_len in (0, -5, MAX_ROW_LEN + 1):
        with pytest.raises(ValueError, match=rf"row_len must be in \[1, {MAX_ROW_LEN}\], got {row_len}"):
            packer([1], row_len)
    for row_len in (2.5, True, "8"):
        with pytest.raises(TypeError, match="row_len must be an integer"):
            packer([1], row_len)
    with pytest.raises(ValueError, match=r"lengths must be 1-D, got shape \(2, 2\)"):
        packer([[1, 2], [3, 4]], 10)
    with pytest.raises(TypeError, match="lengths must be integers, got dtype float64"):
        packer([1.0, 2.5], 10)


def test_extension_errors():
    """The C++ packer checks its inputs itself when called directly."""
    from emu2_engine import _C

    with pytest.raises(ValueError, match="sample 1 has length 9, longer than the row length 8"):
        _C.pack_best_fit(np.array([1, 9]), 8)
    with pytest.raises(ValueError, match="sample 0 has length 0"):
        _C.pack_best_fit(np.array([0]), 8)
    with pytest.raises(ValueError, match="row_len must be in"):
        _C.pack_best_fit(np.array([1]), 0)
    with pytest.raises(ValueError, match="lengths must be 1-D"):
        _C.pack_best_fit(np.ones((2, 2), dtype=np.int64), 8)


def test_concurrent_calls_agree():
    """The packer runs without the GIL; calls from several threads must not interfere."""
    lengths = np.random.default_rng(7).integers(1, 2049, 50_000)
    expected = pack_sequences(lengths, 2048)
    results: list = [None] * 4

    def work(k: int) -> None:
        results[k] = pack_sequences(lengths, 2048)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results)


def test_fallback_warns_once(monkeypatch):
    import emu2_engine

    monkeypatch.delattr(emu2_engine, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "emu2_engine._C", None)  # makes the import fail
    monkeypatch.setattr(packing, "_warned_no_extension", False)
    with pytest.warns(RuntimeWarning, match="make build"):
        assert pack_sequences([6, 7, 3], 10) == [[1, 2], [0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        assert pack_sequences([4], 10) == [[0]]


def test_extension_is_built():
    from emu2_engine import _C

    assert Path(_C.__file__).name.startswith("_C")
    assert hasattr(_C, "pack_best_fit")


def test_kernels_is_a_subpackage_only():
    kernels = importlib.import_module("emu2_engine.kernels")
    assert kernels.__name__ == "emu2_engine.kernels"
    assert Path(kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"
    # Nothing may have imported kernels/ as a top-level `kernels` (transformers probes for the
    # PyPI package of that name); `make test` keeps the repository root off sys.path for this.
    origin = getattr(sys.modules.get("kernels"), "__file__", None)
    assert origin is None or not Path(origin).resolve().is_relative_to(REPO), (
        f"kernels/ was imported as a top-level module from {origin}: run the tests with the "
        f"repository root off sys.path (PYTHONSAFEPATH=1, as `make test` does)")


def test_installed_layout_has_no_top_level_kernels(tmp_path):
    """Outside the repository (no cwd on sys.path), the installed package maps kernels/ to
    emu2_engine.kernels, and a top-level `kernels` is either absent or someone else's."""
    code = (
        "import importlib, importlib.util\n"
        "k = importlib.import_module('emu2_engine.kernels')\n"
        "import emu2_engine._C\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(k.__file__)\n"
        "print(spec.origin if spec else None)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"is the package installed (make build)?\n{proc.stderr}"
    ours, top_level = proc.stdout.split("\n")[:2]
    assert Path(ours).resolve() == REPO / "kernels" / "__init__.py"
    assert top_level == "None" or not Path(top_level).resolve().is_relative_to(REPO)
