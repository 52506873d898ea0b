"""`modality_attention`: attention under Emu2's packed, interleaved-modality mask.

Mask rule (shared/DESIGN.md): query i may attend key j iff
``doc[i] == doc[j] and doc[i] >= 0`` and (``not causal`` or ``j <= i`` or
(``span[i] >= 0 and span[i] == span[j]``)). A query with no allowed key outputs zeros and
passes zero gradients.

Two implementations, chosen per call by `ops.backend` (Triton on CUDA tensors, the reference
elsewhere; ``EMU2_KERNELS`` overrides):
- the block-sparse Triton kernel (`emu2_engine.kernels.attention`): custom ops
  ``emu2::modality_attention_fwd``/``_bwd`` with fake implementations under an autograd.Function.
  It walks a tile map (`TileMap`, below): the mask at the granularity of the kernel's tiles,
  built once per batch from the ids and found again by every layer and by the backward through
  a cache keyed on the ids tensors (`tile_maps`);
- the reference, plain PyTorch (dense mask + SDPA), which torch.compile and FlopCounterMode see
  through as ordinary aten ops. It is not wrapped in a custom op: autograd cannot run inside one,
  so its backward would have to recompute the scores (2.5x the forward instead of 2x).
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from emu2_engine.ops.backend import requested_backend, use_triton

EMPTY, PARTIAL, FULL = 0, 1, 2


def _rule(q_doc, q_span, q_pos, k_doc, k_span, k_pos, causal: bool) -> torch.Tensor:
    """The rule for query ids (B, R) at positions q_pos (R,) against key ids (B, C) at k_pos."""
    ok = (q_doc[:, :, None] == k_doc[:, None, :]) & (q_doc[:, :, None] >= 0)
    if causal:
        same_span = (q_span[:, :, None] >= 0) & (q_span[:, :, None] == k_span[:, None, :])
        ok &= (k_pos[None, None, :] <= q_pos[None, :, None]) | same_span
    return ok


def modality_mask(doc_ids: torch.Tensor, span_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """The dense (B, S, S) boolean mask of the rule above (True = may attend)."""
    pos = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    return _rule(doc_ids, span_ids, pos, doc_ids, span_ids, pos, causal)


# ----------------------------------------------------------------------------------------------
# The tile map: the mask at the granularity of kernel tiles
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileMap:
    """Per batch row, the class of every (query tile, key tile) pair and the lists kernels walk.

    A tile is EMPTY when the rule allows none of its elements (a kernel never loads it), FULL
    when it lies inside the row and the rule allows every element (computed with no mask), and
    PARTIAL otherwise (the rule is evaluated per element from `doc`/`span`, which also masks
    positions past the end). ``row_*`` lists are indexed [b, query tile, i] and hold key tiles;
    ``col_*`` lists are indexed [b, key tile, i] and hold query tiles. Entries past ``*_num``
    are unused.
    """

    tile: int
    causal: bool
    kind: torch.Tensor  # (B, T, T) uint8: EMPTY, PARTIAL or FULL
    doc: torch.Tensor  # (B, S) int32, contiguous: what PARTIAL tiles evaluate the rule on
    span: torch.Tensor
    row_full_num: torch.Tensor  # (B, T) int32
    row_full_idx: torch.Tensor  # (B, T, T) int32
    row_part_num: torch.Tensor
    row_part_idx: torch.Tensor
    col_full_num: torch.Tensor
    col_full_idx: torch.Tensor
    col_part_num: torch.Tensor
    col_part_idx: torch.Tensor

    @property
    def n_tiles(self) -> int:
        return self.kind.shape[-1]


def classify_tiles(doc_ids: torch.Tensor, span_ids: torch.Tensor, causal: bool, tile: int,
                   band_elements: int = 1 << 24) -> torch.Tensor:
    """(B, T, T) uint8 tile classes, exact: evaluates the rule on every element, a band of tile
    rows at a time (about `band_elements` elements per band, so the transient memory stays near
    100 MB at any S), and reduces each tile with any/all.
    Positions past the end count as disallowed, so a tile that crosses the end is never FULL."""
    B, S = doc_ids.shape
    T = -(-S // tile)
    pad = T * tile - S
    doc = torch.nn.functional.pad(doc_ids.to(torch.int32), (0, pad), value=-1)
    span = torch.nn.functional.pad(span_ids.to(torch.int32), (0, pad), value=-1)
    band = max(1, band_elements // max(1, B * T * tile * tile))
    kinds = []
    for r0 in range(0, T, band):
        rows = slice(r0 * tile, min(T, r0 + band) * tile)
        ok = _rule(doc[:, rows], span[:, rows], torch.arange(rows.start, rows.stop, device=doc.device),
                   doc, span, torch.arange(T * tile, device=doc.device), causal)
        ok = ok.view(B, -1, tile, T, tile)
        full = ok.all(dim=4).all(dim=2)
        some = ok.any(dim=4).any(dim=2)
        kinds.append(torch.where(full, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.uint8))
    return torch.cat(kinds, dim=1)


def _lists(kind: torch.Tensor, which: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Count and ascending indices of the tiles of class `which` along the last dim."""
    hit = kind == which
    n = kind.shape[-1]
    j = torch.arange(n, device=kind.device, dtype=torch.int32)
    key = torch.where(hit, j, j + n)  # hits first, in order; the rest sort after them
    return hit.sum(-1, dtype=torch.int32).contiguous(), key.sort(dim=-1).values.contiguous()


def build_tile_map(doc_ids: torch.Tensor, span_ids: torch.Tensor, causal: bool, tile: int) -> TileMap:
    """The tile map of a batch (no host synchronisation; O(B S^2) comparisons, once per batch)."""
    kind = classify_tiles(doc_ids, span_ids, causal, tile)
    kind_t = kind.transpose(1, 2)
    rf, rp, cf, cp = _lists(kind, FULL), _lists(kind, PARTIAL), _lists(kind_t, FULL), _lists(kind_t, PARTIAL)
    # Copies: the cache holds the map, and must neither keep the ids alive nor see them change.
    return TileMap(tile, causal, kind, doc_ids.to(torch.int32, copy=True).contiguous(),
                   span_ids.to(torch.int32, copy=True).contiguous(),
                   *rf, *rp, *cf, *cp)


class _TileMapCache:
    """The tile maps of the ids tensors currently in use, keyed on tensor identity and version.

    A model passes the same `doc_ids`/`span_ids` tensors to every layer, and autograd hands the
    same tensors back to the backward, so the map is built by the first layer's forward and found
    by every later call of that step. The entry holds weak references to the ids: it dies with
    them, and an in-place change of the ids (a new version) rebuilds it. Inference tensors carry
    no version counter: their entry keeps a copy of the ids and is used only while they are
    still equal (an O(S) comparison instead of the O(S^2) rebuild in every layer).
    """

    def __init__(self, size: int = 8):
        self.size = size
        self.builds = 0
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()

    def get(self, doc_ids: torch.Tensor, span_ids: torch.Tensor, causal: bool, tile: int) -> TileMap:
        key = (id(doc_ids), id(span_ids), causal, tile)
        if doc_ids.is_inference() or span_ids.is_inference():
            version = (doc_ids.clone(), span_ids.clone())
            same = lambda old: torch.equal(old[0], doc_ids) and torch.equal(old[1], span_ids)  # noqa: E731
        else:
            version = (doc_ids._version, span_ids._version)
            same = lambda old: old == version  # noqa: E731
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is doc_ids and hit[1]() is span_ids and same(hit[2]):
            self._entries.move_to_end(key)
            return hit[3]
        tiles = build_tile_map(doc_ids, span_ids, causal, tile)
        self.builds += 1
        drop = lambda _ref, key=key: self._entries.pop(key, None)  # noqa: E731
        self._entries[key] = (weakref.ref(doc_ids, drop), weakref.ref(span_ids, drop), version, tiles)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return tiles

    def clear(self) -> None:
        self._entries.clear()


tile_maps = _TileMapCache()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor,
           span_ids: torch.Tensor) -> None:
    _check_qkv(q, k, v, doc_ids, span_ids)
    B, _, S, _ = q.shape
    for name, t in (("doc_ids", doc_ids), ("span_ids", span_ids)):
        if tuple(t.shape) != (B, S):
            raise ValueError(f"{name} must have shape {(B, S)}, got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers (int32 or int64), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *ids) -> None:
    """Types, shapes, dtypes and devices of q, k and v (and that `ids` are tensors)."""
    for name, t in (("q", q), ("k", k), ("v", v)) + tuple(zip(("doc_ids", "span_ids"), ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"modality_attention expects q (B, Hq, S, D) and k, v (B, Hkv, S, D) of equal "
                         f"shape, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Hq, S, D = q.shape
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D or Hq % k.shape[1]:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} "
                         f"(need same B, S, D and Hq a multiple of Hkv)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must match")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def modality_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 doc_ids: torch.Tensor, span_ids: torch.Tensor,
                                 causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Dense-mask SDPA; computes in the inputs' dtype (pass fp64 tensors for a test oracle)."""
    _check(q, k, v, doc_ids, span_ids)
    gqa = q.shape[1] != k.shape[1]
    mask = modality_mask(doc_ids, span_ids, causal)[:, None]  # (B, 1, S, S)
    has_key = mask.any(dim=-1, keepdim=True)  # (B, 1, S, 1)
    # Rows with no allowed key would give NaN in softmax: let them see everything, then zero
    # their output, which also zeroes every gradient that flows through them.
    safe = mask | ~has_key
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale, enable_gqa=gqa)
    return out * has_key.to(out.dtype)


def _single_document(doc_ids: torch.Tensor, span_ids: torch.Tensor) -> bool:
    """True when every row is one document with no padding and no bidirectional span."""
    return bool((doc_ids == doc_ids[:, :1]).all() and (doc_ids[:, 0] >= 0).all() and (span_ids < 0).all())


@functools.lru_cache(maxsize=16)
def one_document_ids(batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc_ids, span_ids) saying every row is one document with no spans. Cached, so every layer
    of a step (and later steps) gets the same tensors and the Triton path finds its tile map
    instead of rebuilding it per layer. Made outside inference mode so that training may save
    them for backward after a sampling call created them."""
    with torch.inference_mode(False):
        doc = torch.zeros(batch, length, dtype=torch.int32, device=device)
        return doc, torch.full_like(doc, -1)


def _kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton kernel takes these head dims and dtypes (`kernels.attention.
    check_supported`): under auto, other input runs the reference instead of failing there."""
    from emu2_engine.kernels import attention as K

    return q.shape[-1] in K.HEAD_DIMS and all(t.dtype in K.DTYPES for t in (q, k, v))


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                     scale: float | None) -> torch.Tensor:
    """Attention with no mask but causality: every row one document, no spans, no padding."""
    B, S = q.shape[0], q.shape[2]
    if use_triton("dense_attention", q, has_kernel=True) and B and S:
        doc, span = one_document_ids(B, S, q.device)
        _check(q, k, v, doc, span)
        from emu2_engine.kernels.attention import modality_attention_triton
        scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
        return modality_attention_triton(q, k, v, doc, span, causal, scale)
    _check_qkv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def modality_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None,
                       span_ids: torch.Tensor | None, causal: bool = True,
                       scale: float | None = None) -> torch.Tensor:
    """Attention under the interleaved-modality mask; q (B, Hq, S, D), k/v (B, Hkv, S, D).

    `doc_ids` and `span_ids` both None say that every row is one document with no spans and no
    padding (the ViT's images, the UNets' self-attention): the op then runs as the
    ``dense_attention`` backend entry, whose auto choice is SDPA's fused kernels on every device
    (`ops.backend`), with no ids to build or read.

    `scale` defaults to D ** -0.5. On the Triton path the output (and each gradient) has the
    memory layout of q (of k, v), so (B, S, H, D) projections need no copies.
    """
    if doc_ids is None or span_ids is None:
        if doc_ids is not None or span_ids is not None:
            raise ValueError("doc_ids and span_ids must both be tensors, or both None (every row one "
                             f"document), got {type(doc_ids).__name__} and {type(span_ids).__name__}")
        return _dense_attention(q, k, v, causal, scale)
    _check(q, k, v, doc_ids, span_ids)
    if q.shape[0] == 0 or q.shape[2] == 0:  # nothing to mask: SDPA returns the empty output
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if use_triton("modality_attention", q, has_kernel=True) and (
            requested_backend("modality_attention") == "triton" or _kernel_takes(q, k, v)):
        from emu2_engine.kernels.attention import modality_attention_triton
        scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
        return modality_attention_triton(q, k, v, doc_ids, span_ids, causal, scale)
    if not torch.compiler.is_compiling() and _single_document(doc_ids, span_ids):
        # The whole row is one document (unpacked inference): no mask to build, and
        # SDPA picks its fused kernels. (The test reads the ids, which a compiled graph cannot
        # branch on; compiled, the masked form below gives the same result.)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    return modality_attention_reference(q, k, v, doc_ids, span_ids, causal, scale)
