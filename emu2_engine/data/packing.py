"""Sequence packing: which samples share a fixed-length row, and laying the rows out as a
`PackedBatch` (the contract of `batch.py`).

Best-fit decreasing: samples are taken longest first (equal lengths in index order), and each
goes into the row with the least remaining space that still holds it (equal remaining space:
the row opened first), or opens a new row. Rows are numbered in the order they are opened and
list their samples in the order they were placed. `pack_sequences` runs the C++ packer in
`emu2_engine._C` (csrc/data/packer.cpp); `pack_sequences_reference` is the same algorithm in
plain Python and defines the result: the two agree exactly (tests/test_packer.py).

Samples longer than the row are refused rather than cut: truncation is the caller's decision
(`sequences.truncate_sample`).

A micro-batch holds at most `max_images` images (video frames count one each), so every
micro-batch has the same image-tensor shape, which pipeline stages need: `select_rows` keeps
the first `rows` rows of the packing and, walking them in order, leaves out any sample whose
images would pass the cap (it waits for the next micro-batch); `collate_packed` pads the images
to `max_images` with zero images that `image_mask` marks as padding.

Collation conventions (see also `batch.py` and docs/design.md):
- Padding tokens: `[PAD]` ids, labels -100, doc_ids -1, span_ids -1, position_ids 0.
- Labels are pre-shifted: `labels[t] = input_ids[t + 1]` when t + 1 is in the same document
  and `Sample.text_target[t + 1]`, else -100.
- `span_ids` of a bidirectional image cover its slots only (not `[IMG]`/`[/IMG]`):
  that is all that needs two-way attention. The span id is the image's index in the batch.
- Images are ordered by row, then by position in the row; `image_slots`, `reg_images`,
  `span_ids` and `images` all use that order; padding images come last, with slots -1.
- A video frame of fewer slots than n_query (`Sample.n_slots`; Emu2-Chat's 64 against 256)
  fills the start of its `image_slots` row, -1 after; it is never a regression target.
"""

from __future__ import annotations

import gc
import warnings
from bisect import bisect_left, insort
from typing import Sequence

import numpy as np
import torch

from emu2_engine.data.batch import PackedBatch
from emu2_engine.data.sequences import IGNORE_INDEX, Sample
from emu2_engine.data.tokens import SpecialIds

__all__ = ["MAX_ROW_LEN", "collate_packed", "pack_sequences", "pack_sequences_reference",
           "select_rows"]

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


def select_rows(lengths: Sequence[int], image_counts: Sequence[int], rows: int, row_len: int,
                max_images: int) -> list[list[int]]:
    """The rows of one micro-batch from a pool of samples: best-fit-decreasing packing of all
    of them (`pack_sequences`), its first `rows` rows, and in those, walking rows then samples
    in order, every sample whose images still fit under `max_images`. Samples not returned
    wait for a later micro-batch. Rows may come back empty when the pool is small."""
    if len(lengths) != len(image_counts):
        raise ValueError(f"lengths and image_counts must have one entry per sample, got "
                         f"{len(lengths)} and {len(image_counts)}")
    too_many = [i for i, n in enumerate(image_counts) if n > max_images]
    if too_many:
        i = too_many[0]
        raise ValueError(f"sample {i} has {image_counts[i]} images, more than max_images = "
                         f"{max_images}; truncate or drop it first")
    packed = pack_sequences(np.asarray(lengths, dtype=np.int64), row_len)[:rows]
    packed += [[] for _ in range(rows - len(packed))]
    out, images = [], 0
    for row in packed:
        kept = []
        for i in row:
            if images + image_counts[i] <= max_images:
                kept.append(i)
                images += image_counts[i]
        out.append(kept)
    return out


def _check_sample(sample: Sample, index: int, ids: SpecialIds, n_query: int) -> None:
    n = len(sample.images)
    if not (len(sample.image_starts) == len(sample.regress) == len(sample.bidirectional) == n):
        raise ValueError(f"sample {index}: images, image_starts, regress and bidirectional must have "
                         f"one entry per image, got {n}, {len(sample.image_starts)}, "
                         f"{len(sample.regress)}, {len(sample.bidirectional)}")
    if len(sample.text_target) != len(sample.input_ids):
        raise ValueError(f"sample {index}: text_target has {len(sample.text_target)} entries for "
                         f"{len(sample.input_ids)} tokens")
    if sample.n_slots and len(sample.n_slots) != n:
        raise ValueError(f"sample {index}: n_slots must be empty or have one entry per image, got "
                         f"{len(sample.n_slots)} for {n} images")
    previous_end = 0
    for k, (start, reg, bi) in enumerate(zip(sample.image_starts, sample.regress, sample.bidirectional)):
        if start < previous_end:
            raise ValueError(f"sample {index}: image_starts must be increasing and images must not overlap")
        q = sample.slots(k, n_query)
        previous_end = start + q + 2
        span = sample.input_ids[start:previous_end]
        if (len(span) != q + 2 or span[0] != ids.img or span[-1] != ids.img_end
                or not np.isin(span[1:-1], ids.visual_slots).all()):
            raise ValueError(f"sample {index}: the image at position {start} is not "
                             f"[IMG] + {q} slots + [/IMG]")
        if q != n_query and not (1 <= q < n_query and (span[1:-1] == ids.gen_img).all()):
            raise ValueError(f"sample {index}: the image at position {start} has {q} slots; "
                             f"an image takes n_query = {n_query}, only a video frame ([gIMG]) "
                             f"may take fewer")
        if reg and bi:
            raise ValueError(f"sample {index}: the image at position {start} is both regressed "
                             f"and bidirectional")
        if reg and q != n_query:
            raise ValueError(f"sample {index}: the image at position {start} is regressed but has "
                             f"{q} slots: the regression predicts n_query = {n_query} embeddings")


def collate_packed(samples: list[Sample], rows: list[list[int]], seq_len: int, ids: SpecialIds,
                   n_query: int, image_size: int, max_images: int | None = None) -> PackedBatch:
    """Lay out `rows` (each a list of indices into `samples`, in order) as a `PackedBatch` of
    shape (len(rows), seq_len); see the module docstring for the conventions. With
    `max_images`, the images are padded to exactly that many (ValueError if there are more)."""
    B, S = len(rows), seq_len
    input_ids = np.full((B, S), ids.pad, dtype=np.int64)
    labels = np.full((B, S), IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.full((B, S), -1, dtype=np.int32)
    span_ids = np.full((B, S), -1, dtype=np.int32)
    position_ids = np.zeros((B, S), dtype=np.int32)
    images: list[torch.Tensor] = []
    image_slots: list[np.ndarray] = []
    reg_images: list[int] = []
    reg_positions: list[np.ndarray] = []
    for b, row in enumerate(rows):
        total = sum(len(samples[i]) for i in row)
        if total > S:
            raise ValueError(f"row {b} holds {total} tokens (samples {list(row)}) but seq_len is {S}")
        offset = 0
        for doc, i in enumerate(row):
            sample = samples[i]
            _check_sample(sample, i, ids, n_query)
            L = len(sample)
            end = offset + L
            input_ids[b, offset:end] = sample.input_ids
            target = np.asarray(sample.text_target, dtype=bool)
            labels[b, offset:end - 1] = np.where(target[1:], sample.input_ids[1:], IGNORE_INDEX)
            doc_ids[b, offset:end] = doc
            position_ids[b, offset:end] = np.arange(L)
            for k, (image, start, reg, bi) in enumerate(zip(sample.images, sample.image_starts,
                                                            sample.regress, sample.bidirectional)):
                if tuple(image.shape) != (3, image_size, image_size):
                    raise ValueError(f"sample {i}: image of shape {tuple(image.shape)}, expected "
                                     f"(3, {image_size}, {image_size})")
                n, q = len(images), sample.slots(k, n_query)
                slots = np.full(n_query, -1, dtype=np.int64)  # a frame of fewer slots: -1 after them
                slots[:q] = b * S + offset + start + np.arange(1, q + 1)
                images.append(image)
                image_slots.append(slots)
                if bi:
                    span_ids[b, offset + start + 1:offset + start + 1 + q] = n
                if reg:
                    reg_images.append(n)
                    # [IMG] predicts embedding 1, slot k predicts embedding k + 1.
                    reg_positions.append(np.concatenate([[b * S + offset + start], slots[:-1]]))
            offset = end
    n_real = len(images)
    n_total = n_real if max_images is None else max_images
    if n_real > n_total:
        raise ValueError(f"the rows hold {n_real} images, more than max_images = {max_images}")
    pixels = torch.empty((n_total, 3, image_size, image_size), dtype=torch.float32)
    for k, image in enumerate(images):
        pixels[k].copy_(image)
    pixels[n_real:].zero_()
    slots = np.full((n_total, n_query), -1, dtype=np.int64)
    if image_slots:
        slots[:n_real] = np.stack(image_slots)
    mask = torch.zeros(n_total, dtype=torch.bool)
    mask[:n_real] = True
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        doc_ids=torch.from_numpy(doc_ids),
        span_ids=torch.from_numpy(span_ids),
        position_ids=torch.from_numpy(position_ids),
        images=pixels,
        image_slots=torch.from_numpy(slots),
        reg_images=torch.tensor(reg_images, dtype=torch.int64),
        reg_positions=torch.from_numpy(np.stack(reg_positions).astype(np.int64) if reg_positions
                                       else np.zeros((0, n_query), dtype=np.int64)),
        image_mask=mask,
    )
