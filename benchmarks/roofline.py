"""Roofline floors of each kernel at the sizes the GPU suites measure (H100 SXM).

    python -m benchmarks.roofline        # prints the markdown table of docs/benchmarks.md

Floor = max(FLOPs / peak, minimum bytes / bandwidth), bf16 inputs and outputs (2 bytes).
"""

from __future__ import annotations

PEAK_FLOPS = 989e12  # H100 SXM dense bf16 (NVIDIA datasheet: 1,979 with sparsity)
BANDWIDTH = 3.35e12  # H100 SXM HBM3, bytes/s
BF16 = 2


def attention(name: str, size: str, heads: int, dim: int, seq: int, pairs: int, batch: int = 1,
              backward: bool = False) -> tuple:
    """pairs: allowed (query, key) pairs per head and batch entry. Forward: QK^T and PV, 4*dim
    FLOPs a pair; backward 2x that (dP = dO V^T, dV, dQ, dK), as the benchmarks count it: a
    flash-style kernel also recomputes QK^T (2.5x), which earns no credit. Minimum bytes:
    q, k, v, o once (+ do, dq, dk, dv for the backward)."""
    flops = 4 * dim * pairs * heads * batch * (3 if backward else 1)
    tensors = 8 if backward else 4
    return name, size, flops, tensors * batch * heads * seq * dim * BF16


def cases() -> list[tuple]:
    rows = []
    for s in (4096, 16384):
        rows.append(attention("attention fwd, causal", f"S={s}, 32 heads x 128", 32, 128, s, s * (s + 1) // 2))
    docs = [256, 512, 1024, 2048, 256, 512, 1024, 2048, 512]  # 8192 tokens in 9 documents
    rows.append(attention("attention fwd+bwd, packed rows", "S=8192, docs 256..2048, 52 x 128", 52, 128,
                          8192, sum(n * (n + 1) // 2 for n in docs), backward=True))
    rows.append(attention("attention fwd, ViT", "32 images x 1025, 16 heads x 112", 16, 112, 1025,
                          1025 * 1025, batch=32))
    T, H, V, C = 8192, 4096, 32274, 1792
    # Forward logits (2THV) + backward dH and dW (4THV); regression is < 6 % of it.
    rows.append(("head loss fwd+bwd (CE)", f"T={T}, hidden {H}, vocab {V}", 6 * T * H * V,
                 (2 * T * H + 2 * V * H) * BF16))
    N, P, Q, Hd = 256, 1024, 64, 6656
    rows.append(("pool_project fwd", f"{N} images x {P} x {C} -> {Q} x {Hd}", 2 * N * Q * C * Hd,
                 (N * P * C + C * Hd + N * Q * Hd) * BF16))
    return rows


def table() -> str:
    lines = []
    for name, size, flops, nbytes in cases():
        t_c, t_m = flops / PEAK_FLOPS, nbytes / BANDWIDTH
        lines.append(f"| {name} | {size} | {flops / 1e9:,.1f} G | {nbytes / 1e6:,.1f} MB | "
                     f"{t_c * 1e3:.3f} ms | {t_m * 1e3:.3f} ms | {'compute' if t_c >= t_m else 'memory'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
