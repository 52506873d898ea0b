"""The tile map of the attention kernel: exact classification, the lists kernels walk, and the
cache that lets one map serve every layer and the backward."""

from __future__ import annotations

import gc

import pytest
import torch

from emu2_engine.ops import attention as A
from emu2_engine.ops import modality_mask
from test_attention_kernel import ids  # tests/ is on sys.path (pytest's prepend import mode)


def _by_definition(doc, span, causal, tile):
    """Each tile from the dense mask: FULL iff it lies inside the row and every element is
    allowed, EMPTY iff no element is allowed, PARTIAL otherwise."""
    B, S = doc.shape
    mask = modality_mask(doc, span, causal)
    T = -(-S // tile)
    kind = torch.empty(B, T, T, dtype=torch.uint8)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                block = mask[b, i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]
                inside = (i + 1) * tile <= S and (j + 1) * tile <= S
                kind[b, i, j] = (A.FULL if inside and block.all() else
                                 A.PARTIAL if block.any() else A.EMPTY)
    return kind


@pytest.mark.parametrize("S", [1, 17, 97, 128, 257])
@pytest.mark.parametrize("tile", [16, 32])
@pytest.mark.parametrize("causal", [True, False])
def test_tile_map_is_exact(S, tile, causal):
    doc, span = ids(S, ["packed", "giant", "interleaved", "padding", "spans", "vit"], seed=S + tile)
    tiles = A.build_tile_map(doc, span, causal, tile)
    want = _by_definition(doc, span, causal, tile)
    assert torch.equal(tiles.kind, want)
    mask = modality_mask(doc, span, causal)
    # The property the kernels rely on, element by element: FULL -> all allowed, EMPTY -> none.
    for b, i, j in (tiles.kind == A.FULL).nonzero().tolist():
        assert mask[b, i * tile:(i + 1) * tile, j * tile:(j + 1) * tile].all()
    for b, i, j in (tiles.kind == A.EMPTY).nonzero().tolist():
        assert not mask[b, i * tile:(i + 1) * tile, j * tile:(j + 1) * tile].any()
    # The lists: for every query tile its FULL and PARTIAL key tiles, ascending; and the
    # transposed lists for every key tile.
    T = tiles.n_tiles
    for b in range(doc.shape[0]):
        for i in range(T):
            for which, num, idx, col_num, col_idx in (
                    (A.FULL, tiles.row_full_num, tiles.row_full_idx, tiles.col_full_num, tiles.col_full_idx),
                    (A.PARTIAL, tiles.row_part_num, tiles.row_part_idx, tiles.col_part_num, tiles.col_part_idx)):
                row = (want[b, i] == which).nonzero().squeeze(1).tolist()
                assert idx[b, i, :num[b, i]].tolist() == row
                col = (want[b, :, i] == which).nonzero().squeeze(1).tolist()
                assert col_idx[b, i, :col_num[b, i]].tolist() == col
    assert tiles.doc.dtype == tiles.span.dtype == torch.int32


def test_bands_join_exactly():
    """classify_tiles evaluates the rule a band of tile rows at a time; any band size agrees."""
    doc, span = ids(200, ["packed", "giant"], seed=3)
    whole = A.classify_tiles(doc, span, True, 16)
    assert whole.shape == (2, 13, 13)
    for budget in (1, 2 * 16 * 13 * 16 * 16 * 3):  # one tile row per band; three per band
        assert torch.equal(A.classify_tiles(doc, span, True, 16, band_elements=budget), whole)


@pytest.mark.parametrize("S,partial", [(1024, 0), (1025, 17), (1000, 15)])
def test_vit_rows_are_full_tiles(S, partial):
    """One document per image, no causality: every tile is FULL except those that cross the
    end of the row (1025 tokens: the last tile row and column)."""
    doc = torch.zeros(3, S, dtype=torch.int32)
    tiles = A.build_tile_map(doc, torch.full_like(doc, -1), causal=False, tile=128)
    T = -(-S // 128)
    assert int((tiles.kind == A.PARTIAL).sum()) == 3 * partial
    assert int((tiles.kind == A.FULL).sum()) == 3 * (T * T - partial)
    assert int((tiles.kind == A.EMPTY).sum()) == 0


def test_causal_document_and_packed_row():
    doc = torch.zeros(1, 256, dtype=torch.int32)
    span = torch.full_like(doc, -1)
    kind = A.build_tile_map(doc, span, True, 32).kind[0]
    T = 8
    below = torch.ones(T, T).tril().bool()
    want = torch.where(torch.eye(T, dtype=torch.bool), A.PARTIAL, torch.where(below, A.FULL, A.EMPTY))
    assert torch.equal(kind, want.to(torch.uint8))
    # Two documents of 128 tokens: the off-diagonal 4 x 4 blocks are empty.
    doc[0, 128:] = 1
    kind = A.build_tile_map(doc, span, True, 32).kind[0]
    assert (kind[4:, :4] == A.EMPTY).all() and (kind[:4, 4:] == A.EMPTY).all()
    # A bidirectional span across tiles 1 and 2 makes the tiles above the diagonal partial.
    span[0, 40:80] = 0
    kind = A.build_tile_map(doc, span, True, 32).kind[0]
    assert kind[1, 2] == A.PARTIAL and kind[2, 1] == A.FULL and kind[0, 1] == A.EMPTY


def test_cache_reuses_rebuilds_and_forgets():
    cache = A._TileMapCache(size=2)
    doc, span = ids(50, ["packed"], seed=0)
    first = cache.get(doc, span, True, 16)
    assert cache.get(doc, span, True, 16) is first and cache.builds == 1
    assert cache.get(doc, span, False, 16) is not first and cache.builds == 2  # another rule
    assert cache.get(doc.clone(), span, True, 16) is not first  # other tensors, same values
    doc[0, :5] = 7  # an in-place change is a new version: rebuilt
    rebuilt = cache.get(doc, span, True, 16)
    assert rebuilt is not first and rebuilt.doc[0, 0] == 7
    n = len(cache._entries)
    del doc
    gc.collect()
    assert len(cache._entries) < n  # the entry died with its ids
    with torch.inference_mode():
        d, s = torch.zeros(1, 8, dtype=torch.int32), torch.full((1, 8), -1, dtype=torch.int32)
    before = cache.builds
    first = cache.get(d, s, True, 16)
    assert cache.get(d, s, True, 16) is first and cache.builds == before + 1  # cached by value
    with torch.inference_mode():
        d[0, 4:] = 1  # no version counter here: the comparison with the kept copy catches it
    rebuilt = cache.get(d, s, True, 16)
    assert rebuilt is not first and cache.builds == before + 2 and rebuilt.doc[0, 4] == 1
