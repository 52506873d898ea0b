"""Forward FLOPs of an Emu2 model, per component, from its `Emu2Config`; peak rates and MFU.

Conventions (STYLE.md item 10):

- A multiply-add is 2 FLOPs: ``y = x @ W`` with x (m, k), W (k, n) is ``2 * m * k * n``.
- Only matmuls are counted (linear layers, the patch-embedding conv, attention scores and the
  attention-weighted sum). Elementwise work is ignored: biases, LayerNorm, RMSNorm, GELU,
  SiLU and the SwiGLU product, softmax and its scale, RoPE, residual adds, position-embedding
  add, pooling means, cross-entropy and MSE. Each is O(tokens x width) against the
  O(tokens x width^2) matmuls: for emu2-37b well under 1 % of the total.
  `torch.utils.flop_counter.FlopCounterMode` counts the same set of ops.
- Work the model *needs*, not work a kernel happens to do: masked attention counts only the
  allowed (query, key) elements of the mask, padding tokens count nothing, logits count only
  for rows that carry a label. A dense kernel that computes masked scores (the current
  reference: dense mask + SDPA) or a padded row does more work than is credited here.
- Training = 3 x forward: the backward of a matmul computes two products of the forward's
  size (gradient of the input, gradient of the weight). Activation recomputation earns no
  credit (it is a cost of the memory plan, not work the model needs). See `training_flops`
  for the frozen-encoder case.

Size for orientation (emu2-37b, 448 px, n_query 64): the ViT forward is 9.39 TFLOP per image
(`vit_flops_per_image`), the LLM forward 64.2 GFLOP per token plus attention, so one image's
66 LLM tokens ([IMG], 64 slots, [/IMG]) cost 4.2 TFLOP: the encoder is more than twice the
decoder's share of an image, which is why the ViT must be counted.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from emu2_engine.data.batch import PackedBatch
from emu2_engine.models.config import Emu2Config, LlamaConfig, VisionConfig


def vit_flops_per_image(vision: VisionConfig) -> int:
    """Forward FLOPs of the EVA ViT on one image (unmasked attention over P + 1 tokens)."""
    C, M, p = vision.width, vision.mlp_hidden, vision.patch_size
    P = vision.n_patches
    T = P + 1  # patches + CLS (1025 at 448 px / patch 14)
    # Patch embedding: Conv2d(3, C, kernel = stride = p) is one (3 p^2 -> C) matmul per patch.
    patch_embed = 2 * P * (3 * p * p) * C
    # Per block, per token: fused qkv C -> 3C, proj C -> C, fc1 C -> M, fc2 M -> C
    # (the q/v biases and the proj/fc biases are elementwise adds: not counted).
    linear = 2 * T * (C * 3 * C + C * C + C * M + M * C)
    # Per block: scores Q K^T are heads x T x T dot products of head_dim = T^2 * C multiply-adds,
    # the weighted sum A V the same again; every image is one unmasked document, so all T^2
    # elements are needed: 2 matmuls x 2 FLOPs x T^2 x C.
    attention = 2 * 2 * T * T * C
    return patch_embed + vision.depth * (linear + attention)


def projector_flops_per_image(cfg: Emu2Config, n_query: int) -> int:
    """Forward FLOPs of `project_up` (vision width -> LLM hidden) on one image's pooled tokens
    (or on any n_query rows).

    The average pooling before it is P x C adds and n_query x C divides per image (1.8 MFLOP
    for emu2-37b, 1e-3 of `project_up` and 2e-7 of the ViT): not counted."""
    return 2 * n_query * cfg.vision.width * cfg.llm.hidden


def llm_flops(llm: LlamaConfig, doc_lengths: Iterable[int], span_lengths: Iterable[int] = (),
              causal: bool = True) -> dict[str, int]:
    """Forward FLOPs of the LLaMA decoder over documents of the given lengths.

    doc_lengths: tokens of every (packed) document; padding is no document and counts nothing.
    span_lengths: tokens of every bidirectional visual span (span_ids >= 0), each inside one
    document. causal=False counts every (query, key) pair of a document, as an unmasked
    encoder, or a dense attention FLOP counter, would.
    Returns {"llm_linear": ..., "llm_attention": ...}.
    """
    H, d, F = llm.hidden, llm.head_dim, llm.ffn_hidden
    q_width, kv_width = llm.heads * d, llm.kv_heads * d  # GQA: k and v are kv_heads wide
    lengths = [int(n) for n in doc_lengths]
    tokens = sum(lengths)
    # Per layer, per token: q_proj H -> heads*d, k_proj and v_proj H -> kv_heads*d each,
    # o_proj heads*d -> H, SwiGLU gate_proj and up_proj H -> F, down_proj F -> H.
    # The token embedding is a lookup (0 FLOPs); the final RMSNorm is elementwise.
    per_token = 2 * (H * q_width + 2 * H * kv_width + q_width * H + 3 * H * F)
    linear = llm.layers * tokens * per_token
    # Attention counts the allowed (query, key) elements only (DESIGN.md mask rule):
    # causal, a document of L tokens has L (L + 1) / 2 of them (key j <= query i); a visual
    # span of n tokens whose tokens see each other adds the n (n - 1) / 2 keys after the query
    # inside the span. Unmasked (causal=False): L^2 per document.
    if causal:
        pairs = sum(L * (L + 1) // 2 for L in lengths) + sum(int(n) * (int(n) - 1) // 2 for n in span_lengths)
    else:
        pairs = sum(L * L for L in lengths)
    # Per allowed element and layer: the score (a dot product of head_dim) and its share of the
    # weighted sum over V (head_dim multiply-adds), for every query head; GQA shares k/v
    # between heads but each query head still does its own products: 2 x 2 x heads x head_dim.
    attention = llm.layers * pairs * 2 * 2 * llm.heads * d
    return {"llm_linear": linear, "llm_attention": attention}


def head_flops(cfg: Emu2Config, n_text_tokens: int, n_reg_embeddings: int) -> int:
    """Forward FLOPs of the LM head and `project_down`.

    `emu2_head_loss` forms logits only for the rows whose label is not -100 (hidden -> vocab);
    `project_down` (hidden -> vision width) runs only on the rows that predict a regressed
    embedding (n_query per regressed image). Cross-entropy and MSE are elementwise."""
    H = cfg.llm.hidden
    return 2 * n_text_tokens * H * cfg.llm.vocab_size + 2 * n_reg_embeddings * H * cfg.vision.width


def _group_sizes(*keys: torch.Tensor) -> list[int]:
    """Sizes of the groups of equal key tuples (one entry per position of the key tensors)."""
    if keys[0].numel() == 0:
        return []
    _, counts = torch.unique(torch.stack([k.reshape(-1).long() for k in keys]), dim=1, return_counts=True)
    return counts.tolist()


def batch_flops(cfg: Emu2Config, batch: PackedBatch) -> dict[str, int]:
    """Forward FLOPs of `Emu2Model.forward(batch)`, per component, and their total.

    Document lengths come from `batch.doc_ids` (per row, the tokens of each doc id >= 0) and
    span lengths from `batch.span_ids`; this reads tensors back, so call it on the batch while it
    is still on the CPU. Keys: vit, projector, llm_linear, llm_attention, heads, total."""
    n_images = batch.n_images  # padding images count nothing
    # `project_up` rows the inputs need: an image's n_query, a video frame's fewer (Emu2-Chat;
    # the model projects n_query rows and averages them down, more than is credited here)
    real = batch.image_mask.cpu() if batch.image_mask is not None else slice(None)
    visual_rows = int((batch.image_slots.cpu()[real] >= 0).sum())
    B, S = batch.doc_ids.shape
    row = torch.arange(B).repeat_interleave(S)
    doc, span = batch.doc_ids.reshape(-1).cpu(), batch.span_ids.reshape(-1).cpu()
    in_doc = doc >= 0
    in_span = in_doc & (span >= 0)
    out = {
        "vit": n_images * vit_flops_per_image(cfg.vision),
        "projector": projector_flops_per_image(cfg, visual_rows),
        **llm_flops(cfg.llm, _group_sizes(row[in_doc], doc[in_doc]),
                    _group_sizes(row[in_span], doc[in_span], span[in_span])),
        "heads": head_flops(cfg, int((batch.labels != -100).sum()), batch.reg_positions.numel()),
    }
    out["total"] = sum(out.values())
    return out


def training_flops(forward: dict[str, int], vision_trainable: bool = True,
                   projector_trainable: bool = True, llm_trainable: bool = True) -> int:
    """FLOPs of one training step (forward + backward) from `batch_flops`' forward counts.

    Backward = 2 x forward (input and weight gradients), so a trained component costs 3 x its
    forward. A frozen encoder needs no backward at all (nothing upstream of it trains and its
    weights take no gradient), so with vision_trainable=False the ViT counts its forward only,
    1x. A frozen `project_up` needs the gradient of its input only when the encoder trains
    (2x), else nothing (1x: Emu2-Chat's recipe). Two first layers need no input gradient and
    are still counted 3x when trained, as is the usual convention: the patch embedding (pixels)
    and, with a frozen ViT, `project_up`; together under 0.1 % of emu2-37b's step.

    A frozen LLM (optim.lr = 0: blocks, embeddings and the LM head) computes no weight gradients:
    its linear layers and heads cost 2x (input gradients, for the encoder or `project_up` before
    it) or 1x when nothing before it trains; its attention still costs 3x whenever a gradient
    passes through it. `project_down`'s few FLOPs are counted with the heads (as the LM head's),
    an undercount where it alone trains."""
    vit, projector = forward["vit"], forward["projector"]
    upstream = vision_trainable or projector_trainable   # a gradient must pass back through the LLM
    llm_times = 3 if llm_trainable else (2 if upstream else 1)
    attention_times = 3 if (llm_trainable or upstream) else 1
    projector_times = 3 if projector_trainable else (2 if vision_trainable else 1)
    return (llm_times * (forward["llm_linear"] + forward["heads"]) + attention_times * forward["llm_attention"]
            + (3 if vision_trainable else 1) * vit + projector_times * projector)


# Peak dense (no 2:4 sparsity) BF16 tensor-core rates, FLOP/s, from NVIDIA's datasheets, which
# list the sparse figure: dense = half of it.
#   H100 datasheet: SXM 1,979 TFLOPS -> 989; PCIe 1,513 -> 756; NVL 1,671 -> 835.
#   H200 datasheet: SXM 1,979 -> 989; NVL 1,671 -> 835.
#   A100 datasheet: 312 dense (624 sparse), SXM and PCIe alike.
# Matched as substrings of `torch.cuda.get_device_name()` ("NVIDIA H100 80GB HBM3",
# "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", ...), first match wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),  # SXM5 (the name says "HBM3")
    ("H200", 989e12),  # SXM
    ("A100", 312e12),
)


def peak_flops(device_name: str | None) -> float | None:
    """Peak dense BF16 FLOP/s of the named device; None if unknown (or a CPU: pass None). A MIG
    slice ("... MIG 1g.10gb") is unknown: it has a part of the GPU's SMs, not its peak."""
    if not device_name or "mig" in device_name.lower().split():
        return None
    name = device_name.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in name:
            return peak
    return None


def mfu(flops_per_second: float, device_name: str | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the device's peak; None if unknown."""
    peak = peak_flops(device_name)
    return None if peak is None else flops_per_second / peak
