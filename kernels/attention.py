"""Block-sparse flash attention under Emu2's interleaved-modality mask: Triton forward and backward.

What it computes: for every batch row b, query head h (key/value head h // (Hq / Hkv)) and query i,
``out[i] = sum_j P[i, j] v[j]`` with ``P = softmax_j(scale * q[i] . k[j])`` over the keys j that
`modality_mask` allows (documents, causality, bidirectional visual spans; shared/DESIGN.md), and
``lse[i] = log sum_j exp(scale * q[i] . k[j])`` over the same keys. A query with no allowed key
gets ``out = 0``, ``lse = -inf`` and zero gradients. `reference` at the bottom says the same in
dense PyTorch.

The tile map (`emu2_engine.ops.attention.TileMap`). The score matrix of each row is cut into
TILE x TILE tiles, each classified once per batch from the ids alone: EMPTY (no allowed
element: never loaded), FULL (every element allowed and inside the sequence: computed with no
mask at all) or PARTIAL (the rule is evaluated per element from the ids). The map stores, per query tile, the
ascending lists of its FULL and of its PARTIAL key tiles, and per key tile the same lists of query
tiles (for the dK/dV pass). Kernels walk these lists instead of the whole row, so their work is
proportional to the non-empty tiles. Kernel blocks divide TILE, so a kernel block inherits its
tile's class. The map is cached on the ids tensors a model passes to all its layers, so one map
serves every layer's forward and backward (docs/kernels/attention.md).

Forward: one program per (query block, batch x query head); online softmax in fp32, base 2.
Backward: a small kernel forms ``delta = rowsum(out * dout)``; one program per (key block,
batch x kv head) accumulates dK and dV over the kv head's query heads, recomputing P from the
saved lse. dQ is either accumulated in the same pass with fp32 atomic adds (default: 5 matrix
products per tile) or, when `torch.are_deterministic_algorithms_enabled()`, computed by a second
pass with one program per query block (7 products per tile, no atomics, bitwise reproducible).

Inputs are fp16, bf16 or fp32 with any strides; head dims up to 128 that are multiples of 8 are
loaded with masks over a power-of-two block (112 is not padded in memory). Outputs and gradients
take the memory layout of the corresponding input (`torch.empty_like`), so the usual
``(B, S, H, D)`` projections need no copy on either side.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from emu2_engine.ops.attention import TileMap, modality_mask, tile_maps

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HEAD_DIMS = tuple(range(8, 129, 8))
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # kernels exponentiate in base 2: exp(x) = exp2(x * LOG2E)
LOG2E_ = tl.constexpr(LOG2E)
# The interpreter computes bf16 arithmetic wrongly: there, bf16 tiles are upcast right after
# their load (so CPU tests check the indexing and masking in bf16, not its rounding).
_UPCAST_BF16 = tl.constexpr(INTERPRET)

# ----------------------------------------------------------------------------------------------
# Tuning. On a GPU the tile map uses 128 x 128 tiles, and every kernel block divides 128. Each
# list below is in the order of preference (first = the config run without tuning); none of it
# has been measured yet (benchmarks/attention.py does). 128-row blocks get 8 warps so that the
# fp32 accumulators (128 x 128 x 4 B, two of them for dK/dV) stay in registers at head dim 128.
# The interpreter (CPU tests) runs one fixed configuration with small blocks, so that short
# awkward sequences still span several tiles and every kernel walks sub-blocks of a tile.
# ----------------------------------------------------------------------------------------------
TILE = 128
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Forward: M = query block, N = key sub-block.
_FWD_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4)]
# dK/dV: N = the program's key block, M = query sub-block.
_DKDV_CONFIGS = [(32, 128, 8, 3), (64, 128, 8, 3), (32, 128, 4, 4), (64, 64, 4, 3), (32, 64, 4, 3)]
# dQ: M = the program's query block, N = key sub-block.
_DQ_CONFIGS = [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)]
# Autotune (per head dim, GQA group, causality and dtype; the first shape seen decides) only
# problems of at least this many score-element x head-dim products: below it, tuning would cost
# more than it saves (the debug model, short prompts). Tests turn AUTOTUNE off altogether.
AUTOTUNE = True
AUTOTUNE_MIN_WORK = 1 << 30
# What the interpreter runs (tests monkeypatch this to try other block shapes).
INTERPRETER_BLOCKS = {"tile": 32, "fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


def _smem_bytes(kind: str, m: int, n: int, stages: int, block_d: int, elem: int) -> int:
    """Shared memory a config needs, counting the operand tiles Triton stages through it: the
    block held for the whole program once, the streamed pair (k and v, or q and dout) once per
    pipeline stage."""
    if kind == "fwd":  # q resident; k, v streamed
        return elem * block_d * (m + 2 * stages * n)
    if kind == "dkdv":  # k, v resident; q, dout streamed (plus lse, delta)
        return elem * block_d * (2 * n + 2 * stages * m) + 8 * stages * m
    return elem * block_d * (2 * m + 2 * stages * n)  # dq: q, dout resident; k, v streamed


@functools.lru_cache
def _smem_limit(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _fitting(kind: str, configs: list[triton.Config], q: torch.Tensor, block_d: int) -> list[triton.Config]:
    """The configs whose shared memory fits the device, in order; never none (the last resort,
    the smallest blocks with one stage, fits every GPU Triton runs on)."""
    limit = _smem_limit(q.device.index)
    fits = [c for c in configs if _smem_bytes(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages,
                                              block_d, q.element_size()) <= limit]
    smallest = min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
    return fits or [triton.Config(smallest.kwargs, num_warps=4, num_stages=1)]


def _configs(table):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        return _fitting(kind, configs, named_args["Q"], kwargs["BLOCK_D"])
    return prune


def tile_map_for(doc_ids: torch.Tensor, span_ids: torch.Tensor, causal: bool) -> TileMap:
    """The (cached) tile map these kernels use for the ids: TILE x TILE tiles on a GPU, the
    interpreter's tile on the CPU."""
    return tile_maps.get(doc_ids, span_ids, causal, INTERPRETER_BLOCKS["tile"] if INTERPRET else TILE)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _allowed(q_pos, q_doc, q_span, k_pos, k_doc, k_span, CAUSAL: tl.constexpr):
    """The mask rule on broadcastable query and key vectors. Ids past the end are loaded as -1,
    which the rule never allows."""
    ok = (q_doc == k_doc) & (q_doc >= 0)
    if CAUSAL:
        ok = ok & ((k_pos <= q_pos) | ((q_span >= 0) & (q_span == k_span)))
    return ok


@triton.jit
def _load(ptrs, rows, cols, S, D: tl.constexpr, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """A (rows x head dim) tile; bounds are checked only where they can be crossed."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=(rows[:, None] < S) & (cols[None, :] < D), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < S, other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < D, other=0.0)
        else:
            x = tl.load(ptrs)
    if _UPCAST_BF16 and x.dtype == tl.bfloat16:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store(ptrs, x, rows, cols, S, D: tl.constexpr, CHECK_COLS: tl.constexpr):
    if CHECK_COLS:
        tl.store(ptrs, x, mask=(rows[:, None] < S) & (cols[None, :] < D))
    else:
        tl.store(ptrs, x, mask=rows[:, None] < S)


@triton.jit
def _block_ids(doc_b, span_b, offs, S, CAUSAL: tl.constexpr):
    """Document and span ids of a block of positions (-1 past the end). Without the causal
    rule spans are never read, and the doc ids stand in for them."""
    doc = tl.load(doc_b + offs, mask=offs < S, other=-1)
    span = doc
    if CAUSAL:
        span = tl.load(span_b + offs, mask=offs < S, other=-1)
    return doc, span


@triton.jit
def _tile_start(IDX, line, NT, it, TILE: tl.constexpr, SUB: tl.constexpr, BLOCK: tl.constexpr):
    """First position of the it-th sub-block (of BLOCK, SUB per tile) of the tiles listed in
    IDX's line `line`."""
    return tl.load(IDX + line * NT + it // SUB) * TILE + (it % SUB) * BLOCK


@triton.jit
def _partial_split(NUM, IDX, line, S, NT, TILE: tl.constexpr):
    """PARTIAL tiles of one list, split into the whole ones (walked in full sub-blocks) and the
    tile that crosses the end of the row, if listed (walked only up to S: no sub-block past the
    end is computed). Lists are ascending, so that tile is the last entry. Returns the count of
    whole tiles and where the crossing tile's walk starts (S when there is none)."""
    n = tl.load(NUM + line)
    last = tl.load(IDX + line * NT + tl.maximum(n - 1, 0))
    crossing = (n > 0) & (last == NT - 1) & (S % TILE != 0)
    return n - crossing.to(tl.int32), tl.where(crossing, (NT - 1) * TILE, S)


@triton.jit
def _fwd_step(acc, l_i, m_i, q, offs_m, q_doc, q_span, k_base, v_base, doc_b, span_b, start_n,
              sks, skd, svs, svd, S, qk_scale, offs_d,
              D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load(k_base + offs_n[:, None] * sks + offs_d[None, :] * skd, offs_n, offs_d, S, D, MASK, D != BLOCK_D)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASK:
        k_doc, k_span = _block_ids(doc_b, span_b, offs_n, S, CAUSAL)
        ok = _allowed(offs_m[:, None], q_doc[:, None], q_span[:, None], offs_n[None, :], k_doc[None, :],
                      k_span[None, :], CAUSAL)
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with nothing allowed so far keeps m = -inf; exponentiate against 0 instead so
        # that no -inf - -inf appears (its p and alpha are 0 either way).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        # Every row of a FULL tile has allowed keys in it: m_new is finite.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
    p = tl.exp2(qk - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, offs_n, offs_d, S, D, MASK, D != BLOCK_D)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, DOC, SPAN, ROW_FULL_NUM, ROW_FULL_IDX, ROW_PART_NUM, ROW_PART_IDX,
                qk_scale,
                sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
                S, HQ, GROUP, NT,
                D: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr, CAUSAL: tl.constexpr,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Last query blocks first: under a causal mask they have the most tiles, and starting them
    # early leaves the short ones for the tail of the launch.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = (pid_bh % HQ).to(tl.int64)
    hk = h // GROUP
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    doc_b = DOC + b * S
    span_b = SPAN + b * S

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd, offs_m, offs_d, S, D,
              True, D != BLOCK_D)
    q_doc, q_span = _block_ids(doc_b, span_b, offs_m, S, CAUSAL)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row = b * NT + (pid_m * BLOCK_M) // TILE
    SUB: tl.constexpr = TILE // BLOCK_N
    # FULL tiles: no mask, no bounds (they lie inside the sequence).
    n_full = tl.load(ROW_FULL_NUM + row)
    for it in range(n_full * SUB):
        start_n = _tile_start(ROW_FULL_IDX, row, NT, it, TILE, SUB, BLOCK_N)
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, offs_m, q_doc, q_span, k_base, v_base, doc_b, span_b,
                                  start_n, sks, skd, svs, svd, S, qk_scale, offs_d,
                                  D, BLOCK_D, BLOCK_N, False, CAUSAL, PREC)
    # PARTIAL tiles: the rule per element (which also masks keys past the end).
    n_part, tail = _partial_split(ROW_PART_NUM, ROW_PART_IDX, row, S, NT, TILE)
    for it in range(n_part * SUB):
        start_n = _tile_start(ROW_PART_IDX, row, NT, it, TILE, SUB, BLOCK_N)
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, offs_m, q_doc, q_span, k_base, v_base, doc_b, span_b,
                                  start_n, sks, skd, svs, svd, S, qk_scale, offs_d,
                                  D, BLOCK_D, BLOCK_N, True, CAUSAL, PREC)
    for start_n in range(tail, S, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, offs_m, q_doc, q_span, k_base, v_base, doc_b, span_b,
                                  start_n, sks, skd, svs, svd, S, qk_scale, offs_d,
                                  D, BLOCK_D, BLOCK_N, True, CAUSAL, PREC)

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) / LOG2E_, float("-inf"))
    _store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
           offs_m, offs_d, S, D, D != BLOCK_D)
    tl.store(LSE + pid_bh.to(tl.int64) * S + offs_m, lse, mask=offs_m < S)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, soh, sos, sod, sdb, sdh, sds, sdd, S, HQ,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[i] = sum_d out[i, d] * dout[i, d] (= sum_j P[i, j] dP[i, j]), in fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = (pid_bh % HQ).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod, offs_m, offs_d, S, D,
              True, D != BLOCK_D)
    do = _load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd, offs_m, offs_d, S, D,
               True, D != BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * S + offs_m, delta, mask=offs_m < S)


@triton.jit
def _dkdv_step(dk, dv, k, v, offs_n, k_doc, k_span, q_base, do_base, dq_base, lse_b, delta_b, doc_b, span_b,
               start_m, sqs, sqd, sds, sdd, sqqs, sqqd, S, qk_scale, sm_scale, offs_d,
               D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
               CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr, PREC: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load(q_base + offs_m[:, None] * sqs + offs_d[None, :] * sqd, offs_m, offs_d, S, D, MASK, D != BLOCK_D)
    do = _load(do_base + offs_m[:, None] * sds + offs_d[None, :] * sdd, offs_m, offs_d, S, D, MASK,
               D != BLOCK_D)
    if MASK:
        lse = tl.load(lse_b + offs_m, mask=offs_m < S, other=0.0)
        delta = tl.load(delta_b + offs_m, mask=offs_m < S, other=0.0)
        # A query with no allowed key has lse = -inf and only masked elements: use +inf so
        # that exp2(-inf - lse2) is 0 rather than NaN.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E_)
    else:
        lse2 = tl.load(lse_b + offs_m) * LOG2E_
        delta = tl.load(delta_b + offs_m)
    qk_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # (keys, queries)
    if MASK:
        q_doc, q_span = _block_ids(doc_b, span_b, offs_m, S, CAUSAL)
        ok = _allowed(offs_m[None, :], q_doc[None, :], q_span[None, :], offs_n[:, None], k_doc[:, None],
                      k_span[:, None], CAUSAL)
        qk_t = tl.where(ok, qk_t, float("-inf"))
    p_t = tl.exp2(qk_t - lse2[None, :])
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PREC) * sm_scale
        ptrs = dq_base + offs_m[:, None] * sqqs + offs_d[None, :] * sqqd
        if MASK:
            tl.atomic_add(ptrs, dq, mask=(offs_m[:, None] < S) & (offs_d[None, :] < D), sem="relaxed")
        elif D != BLOCK_D:
            tl.atomic_add(ptrs, dq, mask=offs_d[None, :] < D, sem="relaxed")
        else:
            tl.atomic_add(ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, DOC, SPAN,
                     COL_FULL_NUM, COL_FULL_IDX, COL_PART_NUM, COL_PART_IDX, sm_scale, qk_scale,
                     sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
                     skkb, skkh, skks, skkd, svvb, svvh, svvs, svvd, sqqb, sqqh, sqqs, sqqd,
                     S, HQ, HKV, GROUP, NT,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr, CAUSAL: tl.constexpr,
                     ATOMIC_DQ: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    doc_b = DOC + b * S
    span_b = SPAN + b * S
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load(K + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, offs_n, offs_d, S, D,
              True, D != BLOCK_D)
    v = _load(V + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :] * svd, offs_n, offs_d, S, D,
              True, D != BLOCK_D)
    k_doc, k_span = _block_ids(doc_b, span_b, offs_n, S, CAUSAL)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    col = b * NT + (pid_n * BLOCK_N) // TILE
    SUB: tl.constexpr = TILE // BLOCK_M
    n_full = tl.load(COL_FULL_NUM + col)
    n_part, tail = _partial_split(COL_PART_NUM, COL_PART_IDX, col, S, NT, TILE)
    for g in range(GROUP):  # the query heads that share this kv head, in order: deterministic
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        dq_base = DQ + b * sqqb + h * sqqh
        lse_b = LSE + (b * HQ + h) * S
        delta_b = DELTA + (b * HQ + h) * S
        for it in range(n_full * SUB):
            start_m = _tile_start(COL_FULL_IDX, col, NT, it, TILE, SUB, BLOCK_M)
            dk, dv = _dkdv_step(dk, dv, k, v, offs_n, k_doc, k_span, q_base, do_base, dq_base, lse_b, delta_b,
                                doc_b, span_b, start_m, sqs, sqd, sds, sdd, sqqs, sqqd, S, qk_scale, sm_scale,
                                offs_d, D, BLOCK_D, BLOCK_M, False, CAUSAL, ATOMIC_DQ, PREC)
        for it in range(n_part * SUB):
            start_m = _tile_start(COL_PART_IDX, col, NT, it, TILE, SUB, BLOCK_M)
            dk, dv = _dkdv_step(dk, dv, k, v, offs_n, k_doc, k_span, q_base, do_base, dq_base, lse_b, delta_b,
                                doc_b, span_b, start_m, sqs, sqd, sds, sdd, sqqs, sqqd, S, qk_scale, sm_scale,
                                offs_d, D, BLOCK_D, BLOCK_M, True, CAUSAL, ATOMIC_DQ, PREC)
        for start_m in range(tail, S, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, offs_n, k_doc, k_span, q_base, do_base, dq_base, lse_b, delta_b,
                                doc_b, span_b, start_m, sqs, sqd, sds, sdd, sqqs, sqqd, S, qk_scale, sm_scale,
                                offs_d, D, BLOCK_D, BLOCK_M, True, CAUSAL, ATOMIC_DQ, PREC)
    _store(DK + b * skkb + hk * skkh + offs_n[:, None] * skks + offs_d[None, :] * skkd,
           (dk * sm_scale).to(DK.dtype.element_ty), offs_n, offs_d, S, D, D != BLOCK_D)
    _store(DV + b * svvb + hk * svvh + offs_n[:, None] * svvs + offs_d[None, :] * svvd,
           dv.to(DV.dtype.element_ty), offs_n, offs_d, S, D, D != BLOCK_D)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, offs_m, q_doc, q_span, k_base, v_base, doc_b, span_b, start_n,
             sks, skd, svs, svd, S, qk_scale, offs_d,
             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
             CAUSAL: tl.constexpr, PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load(k_base + offs_n[:, None] * sks + offs_d[None, :] * skd, offs_n, offs_d, S, D, MASK, D != BLOCK_D)
    v = _load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd, offs_n, offs_d, S, D, MASK, D != BLOCK_D)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASK:
        k_doc, k_span = _block_ids(doc_b, span_b, offs_n, S, CAUSAL)
        ok = _allowed(offs_m[:, None], q_doc[:, None], q_span[:, None], offs_n[None, :], k_doc[None, :],
                      k_span[None, :], CAUSAL)
        qk = tl.where(ok, qk, float("-inf"))
    p = tl.exp2(qk - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC, SPAN, ROW_FULL_NUM, ROW_FULL_IDX, ROW_PART_NUM,
                   ROW_PART_IDX, sm_scale, qk_scale,
                   sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
                   sqqb, sqqh, sqqs, sqqd, S, HQ, GROUP, NT,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr, CAUSAL: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest rows first, as in the forward
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = (pid_bh % HQ).to(tl.int64)
    hk = h // GROUP
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    doc_b = DOC + b * S
    span_b = SPAN + b * S
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd, offs_m, offs_d, S, D,
              True, D != BLOCK_D)
    do = _load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd, offs_m, offs_d, S, D,
               True, D != BLOCK_D)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * S + offs_m, mask=offs_m < S, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E_)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * S + offs_m, mask=offs_m < S, other=0.0)
    q_doc, q_span = _block_ids(doc_b, span_b, offs_m, S, CAUSAL)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row = b * NT + (pid_m * BLOCK_M) // TILE
    SUB: tl.constexpr = TILE // BLOCK_N
    n_full = tl.load(ROW_FULL_NUM + row)
    for it in range(n_full * SUB):
        start_n = _tile_start(ROW_FULL_IDX, row, NT, it, TILE, SUB, BLOCK_N)
        dq = _dq_step(dq, q, do, lse2, delta, offs_m, q_doc, q_span, k_base, v_base, doc_b, span_b, start_n,
                      sks, skd, svs, svd, S, qk_scale, offs_d, D, BLOCK_D, BLOCK_N, False, CAUSAL, PREC)
    n_part, tail = _partial_split(ROW_PART_NUM, ROW_PART_IDX, row, S, NT, TILE)
    for it in range(n_part * SUB):
        start_n = _tile_start(ROW_PART_IDX, row, NT, it, TILE, SUB, BLOCK_N)
        dq = _dq_step(dq, q, do, lse2, delta, offs_m, q_doc, q_span, k_base, v_base, doc_b, span_b, start_n,
                      sks, skd, svs, svd, S, qk_scale, offs_d, D, BLOCK_D, BLOCK_N, True, CAUSAL, PREC)
    for start_n in range(tail, S, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, offs_m, q_doc, q_span, k_base, v_base, doc_b, span_b, start_n,
                      sks, skd, svs, svd, S, qk_scale, offs_d, D, BLOCK_D, BLOCK_N, True, CAUSAL, PREC)
    _store(DQ + b * sqqb + h * sqqh + offs_m[:, None] * sqqs + offs_d[None, :] * sqqd,
           (dq * sm_scale).to(DQ.dtype.element_ty), offs_m, offs_d, S, D, D != BLOCK_D)


_KEY = ["D", "GROUP", "CAUSAL"]  # (and the dtypes, which Triton adds)
_fwd_tuned = triton.autotune(_configs(_FWD_CONFIGS), key=_KEY,
                             prune_configs_by={"early_config_prune": _pruner("fwd")})(_fwd_kernel)
_dkdv_tuned = triton.autotune(_configs(_DKDV_CONFIGS), key=_KEY + ["ATOMIC_DQ"], reset_to_zero=["DQ"],
                              prune_configs_by={"early_config_prune": _pruner("dkdv")})(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_configs(_DQ_CONFIGS), key=_KEY,
                            prune_configs_by={"early_config_prune": _pruner("dq")})(_bwd_dq_kernel)
_KERNELS = {"fwd": (_fwd_kernel, _fwd_tuned, _FWD_CONFIGS), "dkdv": (_bwd_dkdv_kernel, _dkdv_tuned, _DKDV_CONFIGS),
            "dq": (_bwd_dq_kernel, _dq_tuned, _DQ_CONFIGS)}


def reset_tuning() -> None:
    """Forget the tuned configs (a benchmark sweeping S tunes each shape as a run would)."""
    for _, tuned, _ in _KERNELS.values():
        tuned.cache.clear()


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def check_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """What the kernels accept beyond the op's shape contract; raised before any launch."""
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        raise ValueError(f"q, k, v: head dim {D} is not supported by the Triton attention kernel "
                         f"(multiples of 8 up to 128; 64, 80, 96, 112 and 128 are the tuned ones)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the Triton attention kernel takes float16, "
                             f"bfloat16 or float32 (use EMU2_KERNELS=reference for others)")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError("the Triton attention kernel got CPU tensors: set TRITON_INTERPRET=1 before "
                           "importing emu2_engine to run it on the CPU, or use EMU2_KERNELS=reference")


def _run(kind: str, grid, work: int, *args, **consts):
    """Launch kernel `kind` with the interpreter's blocks, the tuned config, or the first config
    that fits."""
    kernel, tuned, table = _KERNELS[kind]
    if INTERPRET:
        m, n = INTERPRETER_BLOCKS[kind]
        kernel[grid({"BLOCK_M": m, "BLOCK_N": n})](*args, **consts, BLOCK_M=m, BLOCK_N=n)
    elif AUTOTUNE and work >= AUTOTUNE_MIN_WORK:
        tuned[grid](*args, **consts)
    else:
        c = _fitting(kind, _configs(table), args[0], consts["BLOCK_D"])[0]
        kernel[grid(c.kwargs)](*args, **consts, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def _consts(q: torch.Tensor, tiles: TileMap, causal: bool) -> dict:
    D = q.shape[-1]
    return dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), TILE=tiles.tile, CAUSAL=causal,
                PREC="ieee" if q.dtype == torch.float32 else "tf32")


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: TileMap, causal: bool,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out laid out like q, lse (B, Hq, S) fp32)."""
    B, HQ, S, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, HQ, S), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    _run("fwd", lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * HQ), B * HQ * S * S * D,
         q, k, v, out, lse, tiles.doc, tiles.span, tiles.row_full_num, tiles.row_full_idx,
         tiles.row_part_num, tiles.row_part_idx, scale * LOG2E,
         *q.stride(), *k.stride(), *v.stride(), *out.stride(), S, HQ, HQ // k.shape[1], tiles.n_tiles,
         **_consts(q, tiles, causal))
    return out, lse


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, tiles: TileMap, causal: bool, scale: float,
                       deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each laid out like its input."""
    B, HQ, S, D = q.shape
    HKV = k.shape[1]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    consts = _consts(q, tiles, causal)
    delta = torch.empty((B, HQ, S), device=q.device, dtype=torch.float32)
    block = 64 if not INTERPRET else 32
    _bwd_delta_kernel[(triton.cdiv(S, block), B * HQ)](out, grad_out, delta, *out.stride(), *grad_out.stride(),
                                                       S, HQ, D=D, BLOCK_D=consts["BLOCK_D"], BLOCK_M=block)
    # dQ: fp32 atomics into a zeroed buffer, or written once by its own pass.
    dq = torch.empty_like(q, dtype=torch.float32) if deterministic else torch.zeros_like(q, dtype=torch.float32)
    common = (q, k, v, grad_out, lse, delta)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    work = B * HQ * S * S * D
    _run("dkdv", lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * HKV), work,
         *common, dk, dv, dq, tiles.doc, tiles.span, tiles.col_full_num, tiles.col_full_idx,
         tiles.col_part_num, tiles.col_part_idx, scale, scale * LOG2E,
         *strides, *dk.stride(), *dv.stride(), *dq.stride(), S, HQ, HKV, HQ // HKV, tiles.n_tiles,
         ATOMIC_DQ=not deterministic, **consts)
    if deterministic:
        _run("dq", lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * HQ), work,
             *common, dq, tiles.doc, tiles.span, tiles.row_full_num, tiles.row_full_idx,
             tiles.row_part_num, tiles.row_part_idx, scale, scale * LOG2E,
             *strides, *dq.stride(), S, HQ, HQ // HKV, tiles.n_tiles, **consts)
    return dq.to(q.dtype), dk, dv


# ----------------------------------------------------------------------------------------------
# The op: custom ops with fake implementations, the autograd.Function over them
# ----------------------------------------------------------------------------------------------
# The ops find their tile map by looking the ids up on the host (`tile_map_for`): a CUDA graph
# would replay the map of the step it captured, so the ops stay out of graphs.
_TAGS = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)


@torch.library.custom_op("emu2::modality_attention_fwd", mutates_args=(), tags=_TAGS)
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor, span_ids: torch.Tensor,
            causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, tile_map_for(doc_ids, span_ids, causal), causal, scale)


@_fwd_op.register_fake
def _(q, k, v, doc_ids, span_ids, causal, scale):
    B, HQ, S, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, HQ, S), dtype=torch.float32)


@torch.library.custom_op("emu2::modality_attention_bwd", mutates_args=(), tags=_TAGS)
def _bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, doc_ids: torch.Tensor, span_ids: torch.Tensor, causal: bool, scale: float,
            deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tiles = tile_map_for(doc_ids, span_ids, causal)
    return attention_backward(grad_out, q, k, v, out, lse, tiles, causal, scale, deterministic)


@_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, doc_ids, span_ids, causal, scale, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class ModalityAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, span_ids, causal: bool, scale: float):
        out, lse = _fwd_op(q, k, v, doc_ids, span_ids, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids, span_ids)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, doc_ids, span_ids = ctx.saved_tensors
        dq, dk, dv = _bwd_op(grad_out, q, k, v, out, lse, doc_ids, span_ids, ctx.causal, ctx.scale,
                             torch.are_deterministic_algorithms_enabled())
        return dq, dk, dv, None, None, None, None


def modality_attention_triton(q, k, v, doc_ids, span_ids, causal: bool, scale: float) -> torch.Tensor:
    """The kernel path of `emu2_engine.ops.modality_attention` (inputs already checked there)."""
    check_supported(q, k, v)
    return ModalityAttention.apply(q, k, v, doc_ids, span_ids, causal, scale)


# ----------------------------------------------------------------------------------------------
# Reference: what the kernels compute, in dense PyTorch
# ----------------------------------------------------------------------------------------------
def reference(q, k, v, doc_ids, span_ids, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) in fp64 from the dense mask; empty rows give out = 0, lse = -inf."""
    G = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~modality_mask(doc_ids, span_ids, causal)[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ v, lse

