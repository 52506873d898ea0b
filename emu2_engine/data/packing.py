"""Sequence packing: which samples share a fixed-length row.

Best-fit decreasing: samples are taken longest first (equal lengths in index order), and each
goes into the row with the least remaining space that still holds it (equal remaining space:
the row opened first), or opens a new row. Rows are numbered in the order they are opened and
list their samples in the order they were placed. `pack_sequences` runs the C++ packer in
`emu2_engine._C` (csrc/data/packer.cpp); `pack_sequences_reference` is the same algorithm in
plain Python and defines the result: the two agree exactly (tests/test_packer.py).

Samples longer than the row are refused rather than cut: truncation is the caller's decision.
"""

from __future__ import annotations

import gc
import warnings
from bisect import bisect_left, insort
from typing import Sequence

import numpy as np

__all__ = ["MAX_ROW_LEN", "pack_sequences", "pack_sequences_reference"]

MAX_ROW_LEN = 1 << 22
"""Longest row the packers accept (the C++ packer's memory grows with the row length)."""

_warned_no_extension = False


def _check(lengths: Sequence[int] | np.ndarray, row_len: int) -> np.ndarray:
    """Validates the inputs of both packers; returns the lengths as a 1-D int64 array."""
    if isinstance(row_len, (bool, np.bool_)) or not isinstance(row_len, (int, np.integer)):
        raise TypeError(f"row_len must be an integer, got {type(row_len).__name__}")
    row_len = int(row_len)
    if not 1 <= row_len <= MAX_ROW_LEN:
        raise ValueError(f"row_len must be in [1, {MAX_ROW_LEN}], got {row_len}")
    array = np.asarray(lengths)
    if array.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"lengths must be integers, got dtype {array.dtype}")
    bad = np.flatnonzero((array <= 0) | (array > row_len))
    if bad.size:
        i = int(bad[0])
        length = int(array[i])
        if length <= 0:
            raise ValueError(
                f"sample {i} has length {length}; every sample needs at least one token")
        raise ValueError(
            f"sample {i} has length {length}, longer than the row length {row_len}; "
            "truncate or drop it first")
    return array.astype(np.int64, copy=False)


def pack_sequences(lengths: Sequence[int] | np.ndarray, row_len: int) -> list[list[int]]:
    """Packs samples into rows of `row_len` tokens (best-fit decreasing, in C++).

    Args:
        lengths: 1-D integers, the token count of each sample; each in [1, row_len].
        row_len: tokens per row, in [1, MAX_ROW_LEN].

    Returns:
        One list per row of the sample indices it holds, longest first. Every index appears
        exactly once and no row's lengths sum past `row_len`. Identical to
        `pack_sequences_reference(lengths, row_len)`.

    Raises:
        ValueError: a length is <= 0 or > row_len (naming the first such sample), `lengths`
            is not 1-D, or row_len is out of range.
        TypeError: `lengths` or `row_len` is not integer.
    """
    array = _check(lengths, row_len)
    try:
        from emu2_engine import _C
    except ImportError:
        global _warned_no_extension
        if not _warned_no_extension:
            _warned_no_extension = True
            warnings.warn(
                "emu2_engine._C is not built, so pack_sequences runs the slow Python "
                "reference; run `make build` to compile it", RuntimeWarning, stacklevel=2)
        return pack_sequences_reference(array, row_len)
    row_offsets, sample_index = _C.pack_best_fit(array, int(row_len))
    # Building ~n/6 lists of ~n ints would trigger the cyclic garbage collector over and over,
    # each pass scanning every live object of the process (2x the whole call on 1M samples in
    # a process holding a few hundred thousand objects); none of these objects can form a cycle.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _C.csr_to_lists(row_offsets, sample_index)
    finally:
        if collecting:
            gc.enable()


def pack_sequences_reference(lengths: Sequence[int] | np.ndarray, row_len: int) -> list[list[int]]:
    """Best-fit-decreasing packing in plain Python; defines what `pack_sequences` returns.

    Same arguments, result and errors as `pack_sequences`. Keeps the rows with room left in
    a list sorted by (remaining tokens, row number), so the best row for a sample of length
    L is the first entry at or after (L, -1). Full rows leave the list: no sample fits them.
    """
    sizes = _check(lengths, row_len).tolist()
    row_len = int(row_len)
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])  # stable: ties by index
    rows: list[list[int]] = []
    with_room: list[tuple[int, int]] = []  # (remaining, row), sorted
    for i in order:
        k = bisect_left(with_room, (sizes[i], -1))
        if k == len(with_room):
            row, remaining = len(rows), row_len
            rows.append([])
        else:
            remaining, row = with_room.pop(k)
        rows[row].append(i)
        remaining -= sizes[i]
        if remaining > 0:
            insort(with_room, (remaining, row))
    return rows
