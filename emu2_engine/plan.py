"""Scale on paper: per-GPU memory and an estimated throughput for every parallel layout.

``python -m emu2_engine.plan --preset emu2-37b --gpus 64 --gpu h100-80gb`` lists, for each
candidate layout (tp inside a node, pp across nodes, dp_shard x dp_replicate the rest;
activation checkpointing none / selective / full; 1F1B or interleaved 1F1B), the memory of its
fullest GPU (parameters, gradients, optimiser states, activations), the pipeline bubble, and
whether it fits with a safety margin, and recommends the fitting layout with the highest
estimated throughput. Every figure is derived from the model config; docs/plan.md explains
the memory model and tests/test_plan.py checks it against memory measured on the debug model.

The memory model (what the engine keeps, per GPU; it trains under torch.autocast(bf16)):
- FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) keeps the *sharded*
  parameters in fp32 (they are the optimiser's master weights: no separate master copy),
  fp32 sharded gradients and AdamW's two fp32 moments, all sharded over tp x dp_shard.
- FSDP all-gathers a bf16 copy of each block's parameters for its forward and backward. Without
  pipelining a block's copy is freed after use (reshard after forward), so two blocks (the
  running one and the prefetched one) and the root module are gathered at a time, and each
  block's unsharded bf16 gradient plus its fp32 copy for the reduce-scatter exist briefly.
  With pipelining the stage keeps its bf16 copy for the whole step and accumulates unsharded
  fp32 gradients over the micro-batches (torch.distributed.pipelining turns off resharding
  and gradient sync for all but the last backward; torchtitan does not reshard after forward
  under PP): 2 + 4 bytes per parameter of the stage, divided by tp only.
- Without data parallelism there is no FSDP (`ParallelDims.fsdp_mesh` is None): the forward
  reads the fp32 parameters themselves, and autocast caches a bf16 copy of every trained
  linear weight for the whole step (`autocast_cache_params`) instead of FSDP's gathered copies.
  `train.weight_cast = step` (the default; `train/weight_cast.py`) holds the same copies for the
  step, compiled blocks or not.
- Activations: what autograd saves in one forward, per micro-batch in flight, by
  checkpointing mode and `Precision` (the formulas below, one comment per saved tensor).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from functools import lru_cache

from emu2_engine.cli import ArgumentParser
from emu2_engine.models.config import Emu2Config, LlamaConfig, VisionConfig
from emu2_engine.models.flops import (head_flops, llm_flops, peak_flops, projector_flops_per_image,
                                      vit_flops_per_image)
from emu2_engine.parallel.apply import ParallelConfig
from emu2_engine.parallel.dims import ParallelDims
from emu2_engine.parallel.pipeline import MicroBatchShape, balance_layers, stage_costs

GiB = 1024 ** 3
GPUS_PER_NODE = 8
AC_MODES = ("none", "selective", "full")
FP32 = 4
BF16 = 2


# ----------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPU:
    """One accelerator kind: memory, peak rate and the links a layout's collectives use."""

    device_name: str
    """What `torch.cuda.get_device_name()` reports; its peak comes from flops.PEAK_BF16_FLOPS."""
    memory: int
    """Bytes of device memory as the driver reports them (nvidia-smi's MiB total)."""
    link: float
    """Bytes/s per direction between GPUs of one NVLink domain."""
    link_group: int
    """GPUs that share that NVLink domain (8 on SXM boards, 2 for bridged NVL cards)."""
    pcie: float
    """Bytes/s per direction between GPUs of one node outside the NVLink domain."""
    network: float
    """Bytes/s per GPU between nodes (one NIC per GPU)."""
    hbm: float
    """Device-memory bandwidth, bytes/s (what recomputed elementwise work is bound by)."""

    @property
    def peak(self) -> float:
        """Peak dense bf16 FLOP/s (NVIDIA data sheets, via models/flops.py)."""
        return peak_flops(self.device_name)


# Data-sheet numbers (NVIDIA H100, H200 and A100 data sheets; DGX H100/H200 and DGX A100 user
# guides for the NICs). Memory is the driver's total, which is what allocations compete for:
#   H100 SXM5 80 GB HBM3: 81559 MiB, 3.35 TB/s; NVLink 4 900 GB/s total = 450 GB/s per
#     direction; DGX H100: 8 x ConnectX-7 400 Gb/s = 50 GB/s per GPU.
#   H100 NVL 94 GB: 95830 MiB, 3.9 TB/s; NVLink bridge 600 GB/s (pairs only), PCIe Gen5 x16
#     64 GB/s per direction beyond the pair; 400 Gb/s per GPU assumed for the network.
#   H200 SXM 141 GB: 143771 MiB, 4.8 TB/s; NVLink 900 GB/s; 400 Gb/s per GPU (DGX H200).
#   A100 SXM4 80 GB: 81920 MiB, 2.04 TB/s; NVLink 3 600 GB/s total; DGX A100: 8 x 200 Gb/s HDR.
GPUS: dict[str, GPU] = {
    "h100-80gb": GPU("NVIDIA H100 80GB HBM3", 81559 * 2 ** 20, 450e9, 8, 64e9, 50e9, 3.35e12),
    "h100-94gb": GPU("NVIDIA H100 NVL", 95830 * 2 ** 20, 300e9, 2, 64e9, 50e9, 3.9e12),
    "h200-141gb": GPU("NVIDIA H200", 143771 * 2 ** 20, 450e9, 8, 64e9, 50e9, 4.8e12),
    "a100-80gb": GPU("NVIDIA A100-SXM4-80GB", 81920 * 2 ** 20, 300e9, 8, 32e9, 25e9, 2.04e12),
}

# Kept free on every GPU: the CUDA context, NCCL's buffers and cuBLAS/Triton workspaces take
# about 1-2 GiB; the rest of the margin absorbs allocator fragmentation and the transient
# buffers of the backward that the model does not itemise (activation gradients, collectives).
RESERVED_BYTES = 2 * GiB
MARGIN = 0.10

# The compute time that communication is compared with assumes the kernels run at this
# fraction of peak (Megatron-Core reports 47 % MFU for a 7B model on H100 clusters). It only
# weighs communication against compute when ranking layouts; nothing here measures a speed.
COMPUTE_EFFICIENCY = 0.5


def usable_memory(gpu: GPU) -> int:
    """Bytes a layout may plan for on `gpu`: total minus the reserve, minus the margin."""
    return int((gpu.memory - RESERVED_BYTES) * (1 - MARGIN))


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------
def vit_block_params(v: VisionConfig) -> int:
    C, M = v.width, v.mlp_hidden
    # qkv (no bias) + q_bias, v_bias; proj + bias; fc1 + bias; fc2 + bias; two LayerNorms.
    return 3 * C * C + 2 * C + C * C + C + C * M + M + M * C + C + 4 * C


def vit_stem_params(v: VisionConfig) -> int:
    # Patch-embedding conv (3 p^2 -> C, with bias), CLS token, position embedding (P + 1 rows).
    return 3 * v.patch_size ** 2 * v.width + v.width + v.width + (v.n_patches + 1) * v.width


def llama_layer_params(llm: LlamaConfig) -> int:
    q, kv = llm.heads * llm.head_dim, llm.kv_heads * llm.head_dim
    # q, k, v, o projections; SwiGLU gate, up, down; two RMSNorm weights.
    return llm.hidden * (q + 2 * kv) + q * llm.hidden + 3 * llm.hidden * llm.ffn_hidden + 2 * llm.hidden


def stem_params(cfg: Emu2Config) -> int:
    """What stage 0 holds besides blocks: the ViT stem, `project_up`, the token embedding."""
    return vit_stem_params(cfg.vision) + cfg.vision.width * cfg.llm.hidden + cfg.llm.vocab_size * cfg.llm.hidden


def head_params(cfg: Emu2Config) -> int:
    """What the last stage holds besides blocks: final RMSNorm, LM head, `project_down`."""
    return cfg.llm.hidden + cfg.llm.vocab_size * cfg.llm.hidden + cfg.llm.hidden * cfg.vision.width


def model_params(cfg: Emu2Config) -> int:
    return (stem_params(cfg) + cfg.vision.depth * vit_block_params(cfg.vision)
            + cfg.llm.layers * llama_layer_params(cfg.llm) + head_params(cfg))


# ----------------------------------------------------------------------------------------------
# Precision: which dtype each saved tensor has
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """The dtypes one forward runs in: the parameters it reads and whether torch.autocast(bf16)
    is on. The engine trains under autocast (`Trainer.autocast`) over the fp32 parameters
    themselves without data parallelism (no FSDP: one GPU, or tp / pp only), and over the bf16
    copies FSDP2 gathers (`MixedPrecisionPolicy(param_dtype=bf16)`, every shipped config) with it.

    What the dtypes change, op by op, under CUDA autocast (aten/src/ATen/autocast_mode.cpp):
    linears run in bf16 and cast an input that is not bf16 each time they read it (three casts
    of one RMSNorm output for q, k and v); the casts of fp32 *parameters* that require grad are
    cached for the whole autocast region (`autocast_cache_params`); `layer_norm` is on the fp32
    list, so it casts its input to fp32 and saves that; everything else (embedding, RMSNorm's
    elementwise ops, residual adds) keeps eager type promotion. The model casts both residual
    streams to bf16 at their entry under autocast and the ViT's LayerNorm outputs back to the
    stream's dtype, unless `train.fp32_residual` keeps them in the parameters' dtype."""

    params: int
    """Bytes per element of the parameters the forward reads (4: fp32, 2: bf16)."""
    autocast: bool
    """torch.autocast(dtype=bfloat16) is on."""
    fp32_residual: bool = False
    """`train.fp32_residual`: under autocast the residual streams stay in the parameters' dtype."""

    @property
    def compute(self) -> int:
        """Bytes of what the matmuls and attention produce and save."""
        return BF16 if self.autocast else self.params

    @property
    def layer_norm(self) -> int:
        """Bytes of the input LayerNorm saves: fp32 under autocast (CUDA's fp32 list)."""
        return FP32 if self.autocast else self.compute

    @property
    def stream(self) -> int:
        """Bytes of the ViT's and the LLaMA's residual streams (the blocks' inputs)."""
        return BF16 if self.autocast and not self.fp32_residual else self.params

    @property
    def norm_output(self) -> int:
        """Bytes of an RMSNorm's output, weight x normalised: the wider of the two dtypes."""
        return max(self.params, self.stream)


FP32_ONLY = Precision(FP32, autocast=False)
"""An fp32 model without autocast (measured on the CPU by the tests)."""
BF16_ONLY = Precision(BF16, autocast=False)
"""A model cast to bf16 with `.to(torch.bfloat16)`, without autocast."""
MIXED = Precision(FP32, autocast=True)
"""The engine without data parallelism: fp32 parameters under autocast."""
MIXED_FP32_RESIDUAL = Precision(FP32, autocast=True, fp32_residual=True)
"""The same with `train.fp32_residual`: fp32 residual streams."""
MIXED_FSDP = Precision(BF16, autocast=True)
"""The engine under FSDP2: bf16 gathered parameters under autocast."""


def training_precision(lay: Layout, fp32_residual: bool = False) -> Precision:
    """What a layout's training step runs in: FSDP (`parallel/fsdp.py`) is applied only with
    data parallelism (`ParallelDims.fsdp_mesh`); without it the parameters stay fp32, and
    `fp32_residual` (`train.fp32_residual`) keeps the residual streams fp32."""
    if lay.dp_shard * lay.dp_replicate > 1:
        return MIXED_FSDP
    return MIXED_FP32_RESIDUAL if fp32_residual else MIXED


def autocast_cache_params(cfg: Emu2Config, c: Chunk, freeze_vision: bool = False) -> int:
    """Parameters of a chunk whose bf16 casts autocast caches.

    Autocast caches the cast of a tensor that is an fp32 leaf, requires grad and enters an op on
    its bf16 list (here F.linear), and keeps it until the outermost autocast region ends: the
    trainer's covers every micro-batch's forward and backward, so the copies live for the whole
    step, once (autograd saves the same copy). Those are the linears' weights and biases. Not
    cached: RMSNorm and LayerNorm weights (no bf16 op), the ViT's q/v biases (concatenated
    first: not leaves), the patch embedding's weight (a reshaped view; its input needs no
    gradient, so its per-use cast is not saved either), the token embedding (no autocast op),
    a frozen encoder's weights (no grad), and `project_up`, the LM head and `project_down`,
    which the fused ops cast themselves (`ops.backend.autocast_dtype`: not cached; the held
    gradients and pool_project's saved weight are counted as activations)."""
    llm, v = cfg.llm, cfg.vision
    n = c.layers * (llama_layer_params(llm) - 2 * llm.hidden)  # all but the two RMSNorm weights
    if c.stem and not freeze_vision:
        # All but q_bias, v_bias and the two LayerNorms' weights and biases; plus the patch
        # embedding's bias.
        n += v.depth * (vit_block_params(v) - 6 * v.width) + v.width
    return n


# ----------------------------------------------------------------------------------------------
# Activations: what autograd saves in one forward of one micro-batch
# ----------------------------------------------------------------------------------------------
# `p` is the Precision; `a = p.compute` the bytes of what matmuls save (bf16 under autocast).
# Tensor parallelism follows `parallel/tensor_parallel.py`: LLaMA blocks are tensor +
# sequence parallel (the residual stream and the RMSNorms hold 1/tp of the sequence; heads and
# FFN columns are split over tp; the input of each sublayer's first linears is all-gathered to
# the full sequence and autograd saves that gathered copy, so those terms do not shrink with
# tp); ViT blocks are tensor parallel without sequence parallelism (the stream and the
# LayerNorms stay full and replicated). Flash attention (the Triton kernel) saves q, k, v,
# its output and the fp32 log-sum-exp, never the score matrix.
#
# Checkpointing modes are those of `parallel/fsdp.py`: full keeps each block's input and
# recomputes the block in backward; selective keeps the outputs of the matmuls, of attention
# and of the collectives, and recomputes the elementwise work between them (norms, RoPE,
# SiLU x up, GELU, residual adds, casts).

def _rms_norm_activations(H: int, consumers: int, p: Precision, tp: int) -> int:
    """Bytes per token one RMSNorm keeps, with the input(s) of the `consumers` linears that
    read its output.

    It computes in fp32: x.float() is saved by pow and by the product with rsqrt (a new fp32
    tensor when x is bf16, x itself when it is fp32), rsqrt per token, and the normalised
    tensor cast back to x's dtype (the stream's), saved by the weight multiply. Its output,
    weight x normalised, is in the wider of the parameters' and the stream's dtypes: when that
    is the matmuls' dtype the linears share it and it is saved once (all-gathered under SP, so
    full size); under autocast with fp32 parameters each linear saves its own bf16 cast of it."""
    a = p.compute
    linear_inputs = (1 if p.norm_output == a else consumers) * a * H
    return (FP32 * H + FP32 + p.stream * H) // tp + linear_inputs


def llama_layer_activations(llm: LlamaConfig, tokens: int, ac: str = "none",
                            p: Precision = BF16_ONLY, tp: int = 1) -> int:
    """Bytes one LLaMA block keeps for backward over `tokens` tokens."""
    H, F, D = llm.hidden, llm.ffn_hidden, llm.head_dim
    q, kv = llm.heads * D, llm.kv_heads * D
    a, s = p.compute, p.stream
    if ac == "full":
        return tokens * s * H // tp  # the block input (sequence-sharded under SP)
    if ac == "selective":
        per_token = (s * H // tp  # the block input, held by the checkpoint
                     + a * (q + 2 * kv) // tp  # q_proj, k_proj, v_proj outputs (local heads)
                     + a * q // tp + FP32 * llm.heads // tp  # attention output and log-sum-exp
                     + 2 * a * F // tp  # gate_proj and up_proj outputs
                     # o_proj and down_proj outputs: under TP the full-sequence partial sums
                     # that the reduce-scatter consumes, so full size at any tp
                     + 2 * a * H)
        if tp > 1:  # the collectives' outputs: two all-gathered norm outputs,
            per_token += 2 * p.norm_output * H + 2 * a * H // tp  # two reduce-scattered matmul outputs
        return tokens * per_token
    per_token = (
        _rms_norm_activations(H, 3, p, tp)  # input_layernorm, read by q/k/v_proj
        # RoPE: x * cos saves cos, not x (cos needs no gradient); cos and sin are cast to the
        # matmuls' dtype for q and for k: 4 saved casts per layer. In fp32 the casts are
        # no-ops and the fp32 tables are shared by every layer (`llm_stem_activations`).
        + (4 * D * a if a != FP32 else 0)
        + a * (q + 2 * kv) // tp  # attention saves the rotated q, k and v (local heads)
        + a * q // tp  # attention output: also o_proj's input (the kernel writes it in
        # (B, S, H, D) layout, so the reshape before o_proj is a view)
        + FP32 * llm.heads // tp  # attention log-sum-exp, fp32 per head
        + _rms_norm_activations(H, 2, p, tp)  # post_attention_layernorm, read by gate/up_proj
        + a * F // tp  # gate_proj output (saved by SiLU)
        + a * F // tp  # SiLU output (saved by the product)
        + a * F // tp  # up_proj output (saved by the product)
        + a * F // tp)  # SiLU(gate) * up (saved by down_proj)
    return tokens * per_token


def vit_block_activations(v: VisionConfig, images: int, ac: str = "none",
                          p: Precision = BF16_ONLY, tp: int = 1) -> int:
    """Bytes one (post-norm) EVA ViT block keeps for backward over `images` images."""
    C, M = v.width, v.mlp_hidden
    a, ln = p.compute, p.layer_norm
    tokens = images * (v.n_patches + 1)  # patches + CLS
    if ac == "full":
        return tokens * p.stream * C  # the block input (replicated: no SP in the ViT)
    if ac == "selective":
        per_token = (p.stream * C  # the block input
                     + 3 * a * C // tp  # qkv output (local heads)
                     + a * C // tp + FP32 * v.heads // tp  # attention output and log-sum-exp
                     + a * M // tp  # fc1 output
                     + 2 * a * C)  # proj and fc2 outputs (under TP the partial sums, full size)
        if tp > 1:
            per_token += 2 * a * C  # the all-reduced proj and fc2 outputs
        return tokens * per_token
    per_token = (
        a * C  # block input x (or its bf16 cast under autocast), saved by the fused qkv linear
        + 3 * a * C // tp  # qkv output: attention saves q, k, v, which are views of it
        + a * C // tp  # attention output (also proj's input: a view, as in the LLaMA block)
        + FP32 * v.heads // tp  # attention log-sum-exp
        # proj output (all-reduced under TP), saved by norm1 (its fp32 cast under autocast)
        # with fp32 mean and rstd
        + ln * C + 2 * FP32
        + a * C  # x + norm1(..) (or its cast): fc1's input
        + a * M // tp  # fc1 output (saved by GELU)
        + a * M // tp  # GELU output (saved by fc2)
        + ln * C + 2 * FP32)  # fc2 output (all-reduced under TP) or its cast, saved by norm2
    return tokens * per_token


def vision_stem_activations(cfg: Emu2Config, images: int, p: Precision = BF16_ONLY,
                            freeze_vision: bool = False) -> int:
    """Bytes saved outside the ViT blocks on the vision side (stage 0)."""
    v, a = cfg.vision, p.compute
    # pool_project saves the pooled features, and the copy of project_up's weight it casts
    # itself under autocast (`project_up` is trained with the encoder frozen too).
    n = images * cfg.n_query * v.width * a + (v.width * cfg.llm.hidden * a if a != p.params else 0)
    if not freeze_vision:  # the patch GEMM saves its input for its weight's gradient
        n += images * 3 * v.image_size ** 2 * a  # the pixels, cast to the matmuls' dtype
    return n


def llm_stem_activations(cfg: Emu2Config, tokens: int, visual_tokens: int, embed: bool,
                         p: Precision = BF16_ONLY, ac: str = "none") -> int:
    """Bytes saved once per micro-batch by a stage that runs LLaMA blocks (and, on stage 0,
    the token embedding)."""
    D = cfg.llm.head_dim
    n = tokens * 2 * 4  # int32 doc/span ids, saved by every layer's attention (one tensor each)
    if p.compute == FP32 or ac != "none":
        # The cos/sin tables, fp32 (RotaryEmbedding computes them so). Shared by every layer:
        # saved by RoPE's products when they run in fp32, and held as block inputs by the
        # checkpoints.
        n += tokens * 2 * D * FP32
    if embed:
        n += tokens * 8 + visual_tokens * 8  # int64 token ids (embedding), slot indices (index_put)
    return n


def head_activations(cfg: Emu2Config, tokens: int, p: Precision = BF16_ONLY, tp: int = 1) -> int:
    """Bytes the last stage holds from forward to backward for the final norm and the heads.

    `emu2_head_loss` computes its gradients during the forward (in the matmuls' dtype: under
    autocast it casts its inputs to bf16 itself) and holds them until backward instead of
    saving its inputs: the gradient of the hidden states (full sequence), of this rank's
    LM-head rows and of `project_down` (regression rows are not counted: at most n_query per
    regressed image)."""
    H, a = cfg.llm.hidden, p.compute
    norm = tokens * (FP32 * H + FP32 + p.stream * H) // tp  # final RMSNorm, as in the blocks
    grads = tokens * a * H + -(-cfg.llm.vocab_size // tp) * H * a + cfg.vision.width * H * a
    return norm + grads


# ----------------------------------------------------------------------------------------------
# Workload, layout and pipeline chunks
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """What one optimiser step processes."""

    seq_len: int = 2048
    """Tokens per packed sequence."""
    micro_batch: int = 1
    """Sequences per micro-batch."""
    global_batch: int = 2048
    """Sequences per optimiser step (2048 x 2048 tokens = 4M, LLaMA's batch)."""
    images_per_seq: int = 8
    """Images per sequence (Emu2's interleaved documents: 8 per 1024 tokens; packed pairs more)."""
    freeze_vision: bool = False
    """Encoder frozen (Emu2 stage 2): no ViT gradients, optimiser states or saved activations."""
    fp32_residual: bool = False
    """`train.fp32_residual`: fp32 residual streams under autocast (no effect under FSDP)."""
    frames_per_seq: int = 0
    """Video frames per sequence (each `[IMG]` + the model's `frame_queries` slots + `[/IMG]`,
    after one `[VIDEO]`; Emu2-Chat: 64 slots against an image's 256)."""

    @property
    def images(self) -> int:
        """Visual inputs per micro-batch, images and video frames: each goes through the encoder
        and is pooled to n_query (a frame's fewer rows are averages of those)."""
        return self.micro_batch * (self.images_per_seq + self.frames_per_seq)

    def visual_span(self, cfg: Emu2Config) -> int:
        """Tokens of one sequence's images and video (no text label on any of them)."""
        video = 1 + self.frames_per_seq * (cfg.frame_queries + 2) if self.frames_per_seq else 0
        return self.images_per_seq * (cfg.n_query + 2) + video

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch."""
        return self.micro_batch * self.seq_len


@dataclass(frozen=True)
class Layout:
    """One way to place the model on the GPUs (the degrees of `parallel.ParallelDims`)."""

    tp: int
    pp: int
    dp_shard: int
    dp_replicate: int
    ac: str
    """Activation checkpointing: none, selective or full."""
    virtual: int = 1
    """Stages per pipeline rank: 1 is 1F1B, 2 interleaved 1F1B."""

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp_shard * self.dp_replicate

    @property
    def schedule(self) -> str:
        """`parallel.ParallelConfig.pp_schedule`'s name for it."""
        return "-" if self.pp == 1 else ("1f1b" if self.virtual == 1 else "interleaved-1f1b")


@dataclass(frozen=True)
class Chunk:
    """One pipeline stage (a model chunk): stage `index` runs on rank index % pp."""

    index: int
    layers: int
    """LLaMA layers in this chunk."""
    stem: bool
    """Holds the ViT, `project_up` and the token embedding (stage 0)."""
    head: bool
    """Holds the final norm, the LM head and `project_down` (the last stage)."""


def chunk_params(cfg: Emu2Config, c: Chunk, trainable_only: bool = False,
                 freeze_vision: bool = False) -> int:
    """Parameters of a chunk; with trainable_only, without a frozen encoder's."""
    n = c.layers * llama_layer_params(cfg.llm)
    if c.stem:
        vision = vit_stem_params(cfg.vision) + cfg.vision.depth * vit_block_params(cfg.vision)
        n += stem_params(cfg) - vit_stem_params(cfg.vision)
        n += 0 if (trainable_only and freeze_vision) else vision
    if c.head:
        n += head_params(cfg)
    return n


def _layer_flops(cfg: Emu2Config, wl: Workload) -> int:
    """Forward FLOPs of one LLaMA layer on a micro-batch (one document per sequence: the most
    attention a packed row can hold)."""
    return sum(llm_flops(replace(cfg.llm, layers=1), [wl.seq_len] * wl.micro_batch).values())


def chunk_flops(cfg: Emu2Config, wl: Workload, c: Chunk) -> int:
    """Training FLOPs (forward + backward, no recomputation) of a chunk on one micro-batch."""
    n = 3 * c.layers * _layer_flops(cfg, wl)
    if c.stem:
        n += 3 * wl.micro_batch * (projector_flops_per_image(cfg, cfg.n_query) * wl.images_per_seq
                                   + projector_flops_per_image(cfg, cfg.frame_queries) * wl.frames_per_seq)
        n += (1 if wl.freeze_vision else 3) * wl.images * vit_flops_per_image(cfg.vision)
    if c.head:
        text = wl.tokens - wl.micro_batch * wl.visual_span(cfg)  # [IMG], slots, [/IMG]: no label
        n += 3 * head_flops(cfg, max(text, 0), 0)
    return n


def recompute_flops(cfg: Emu2Config, wl: Workload, c: Chunk, ac: str) -> int:
    """Matmul FLOPs repeated in backward: full checkpointing re-runs every block's forward;
    selective re-runs only elementwise work (not counted)."""
    if ac != "full":
        return 0
    n = c.layers * _layer_flops(cfg, wl)
    if c.stem and not wl.freeze_vision:
        v = cfg.vision
        patch_embed = 2 * v.n_patches * 3 * v.patch_size ** 2 * v.width  # not in a block
        n += wl.images * (vit_flops_per_image(v) - patch_embed)
    return n


@lru_cache(maxsize=256)
def split_chunks(cfg: Emu2Config, wl: Workload, n_chunks: int) -> tuple[Chunk, ...] | None:
    """The engine's split (`parallel.pipeline.balance_layers`): contiguous LLaMA layers per
    stage balancing forward FLOPs, the whole ViT on stage 0 (which may get no LLaMA layer).
    None if there are too few layers."""
    if n_chunks - 1 > cfg.llm.layers:
        return None
    costs = stage_costs(cfg, MicroBatchShape(wl.micro_batch, wl.seq_len, wl.images))
    counts = balance_layers(cfg.llm.layers, n_chunks, *costs)
    return tuple(Chunk(i, n, i == 0, i == n_chunks - 1) for i, n in enumerate(counts))


def in_flight(pp: int, virtual: int, microbatches: int, rank: int) -> list[int]:
    """Micro-batches whose activations pipeline rank `rank` holds at its peak, per local chunk.

    1F1B: rank r runs pp - r forwards before its first backward. Interleaved 1F1B (Megatron's
    schedule, which torch.distributed.pipelining follows): (v - 1) pp + 2 (pp - 1 - r) + 1
    forwards, in groups of pp micro-batches per local chunk, so chunk 0 (with the ViT on
    rank 0) holds up to 2 pp - 1 of them (Korthikanti et al. 2022: memory x (1 + (pp-1)/(pp v)))."""
    if virtual == 1:
        return [min(microbatches, pp - rank)]
    warmup = min(microbatches * virtual, (virtual - 1) * pp + 2 * (pp - 1 - rank) + 1)
    counts = [0] * virtual
    for k in range(warmup):
        counts[(k // pp) % virtual] += 1
    return counts


# ----------------------------------------------------------------------------------------------
# Memory and throughput of one layout
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    layout: Layout
    params: int
    """fp32 sharded parameters (the master weights) on the fullest GPU, bytes."""
    grads: int
    """fp32 sharded gradients."""
    optimizer: int
    """AdamW's two fp32 moments."""
    working: int
    """Unsharded bf16 parameters and gradients FSDP gathers or accumulates (see module doc)."""
    autocast_cache: int
    """Without FSDP: the bf16 copies of the fp32 weights that autocast caches for the step."""
    activations: int
    """Saved activations of every micro-batch in flight, plus one block's recomputation."""
    bubble: float
    """(pp - 1) / (m v + pp - 1): idle fraction of the pipeline schedule."""
    efficiency: float
    """Estimated fraction of the ideal step time (bubble, stage imbalance, recomputation,
    exposed communication); ranks layouts, it is not a measurement."""
    fits: bool

    @property
    def total(self) -> int:
        return (self.params + self.grads + self.optimizer + self.working + self.autocast_cache
                + self.activations)


def _rank_memory(cfg: Emu2Config, wl: Workload, lay: Layout, chunks: tuple[Chunk, ...], rank: int,
                 microbatches: int) -> dict[str, int]:
    own = [c for c in chunks if c.index % lay.pp == rank]
    shard = lay.tp * lay.dp_shard
    total = sum(chunk_params(cfg, c) for c in own)
    trained = sum(chunk_params(cfg, c, True, wl.freeze_vision) for c in own)
    p = training_precision(lay, wl.fp32_residual)
    working, cache = 0, 0
    if p.autocast and p.params == FP32:  # no FSDP: autocast's bf16 weight copies, for the step
        cache = BF16 * sum(autocast_cache_params(cfg, c, wl.freeze_vision) for c in own) // lay.tp
    elif lay.pp > 1:
        working = (BF16 * total + FP32 * trained) // lay.tp
    else:
        # Root module (stem + heads) stays gathered; two blocks gathered at a time, and one
        # block's bf16 gradient with its fp32 reduce-scatter copy.
        root = stem_params(cfg) + head_params(cfg)
        block = max(llama_layer_params(cfg.llm), vit_block_params(cfg.vision))
        working = (BF16 * root + (2 * BF16 + BF16 + FP32) * block) // lay.tp
    acts, recompute = 0, 0
    counts = in_flight(lay.pp, lay.virtual, microbatches, rank)
    for c, n in zip(own, counts):
        acts += n * chunk_activations(cfg, wl, c, lay.ac, lay.tp, p)
        if lay.ac != "none":
            # Backward of a checkpointed block first rebuilds its full set of activations.
            extra = []
            if c.layers:
                extra.append(llama_layer_activations(cfg.llm, wl.tokens, "none", p, lay.tp)
                             - llama_layer_activations(cfg.llm, wl.tokens, lay.ac, p, lay.tp))
            if c.stem and not wl.freeze_vision:
                extra.append(vit_block_activations(cfg.vision, wl.images, "none", p, lay.tp)
                             - vit_block_activations(cfg.vision, wl.images, lay.ac, p, lay.tp))
            recompute = max([recompute, *extra])
    if lay.pp > 1 and any(c.stem for c in own):
        # A pipeline schedule takes all of a step's micro-batches at once: their images (bf16,
        # `trainer.MicroBatches`) stay on the stage with the ViT for the whole step.
        acts += microbatches * wl.images * 3 * cfg.vision.image_size ** 2 * BF16
    return {"params": FP32 * total // shard, "grads": FP32 * trained // shard,
            "optimizer": 2 * FP32 * trained // shard, "working": working,
            "autocast_cache": cache, "activations": acts + recompute}


def chunk_activations(cfg: Emu2Config, wl: Workload, c: Chunk, ac: str, tp: int = 1,
                      p: Precision = BF16_ONLY) -> int:
    """Activation bytes a chunk saves for one micro-batch."""
    n = 0
    if c.layers:
        n += c.layers * llama_layer_activations(cfg.llm, wl.tokens, ac, p, tp)
        n += llm_stem_activations(cfg, wl.tokens, wl.images * cfg.n_query, c.stem, p, ac)
    if c.stem:
        if not wl.freeze_vision:
            n += cfg.vision.depth * vit_block_activations(cfg.vision, wl.images, ac, p, tp)
        n += vision_stem_activations(cfg, wl.images, p, wl.freeze_vision)
    if c.head:
        n += head_activations(cfg, wl.tokens, p, tp)
    return n


def _collective_bandwidth(gpu: GPU, group_span: int) -> float:
    """Bandwidth of a collective whose ranks lie within `group_span` consecutive GPUs."""
    if group_span <= gpu.link_group:
        return gpu.link
    return gpu.pcie if group_span <= GPUS_PER_NODE else gpu.network


def estimate(cfg: Emu2Config, wl: Workload, lay: Layout, gpu: GPU) -> Estimate | None:
    """Memory of the fullest GPU and the estimated efficiency of one layout; None when the
    model cannot be cut into lay.pp x lay.virtual stages."""
    dp = lay.dp_shard * lay.dp_replicate
    microbatches = wl.global_batch // (dp * wl.micro_batch)
    chunks = split_chunks(cfg, wl, lay.pp * lay.virtual)
    if chunks is None:
        return None
    ranks = [_rank_memory(cfg, wl, lay, chunks, r, microbatches) for r in range(lay.pp)]
    worst = max(ranks, key=lambda m: sum(m.values()))

    # Time per micro-batch of each chunk, in seconds on one GPU of its tp group.
    rate = gpu.peak * COMPUTE_EFFICIENCY
    tp_bw = _collective_bandwidth(gpu, lay.tp)
    per_collective = (lay.tp - 1) / lay.tp / tp_bw
    # Collectives per block, in units of one all-gather or reduce-scatter of the block's
    # activations (an all-reduce costs two): per sublayer an all-gather and a reduce-scatter
    # (LLaMA, SP) or one all-reduce (ViT) in forward, the same in backward; full recomputation
    # repeats the forward's; selective keeps their outputs.
    n_coll = 8 + (4 if lay.ac == "full" else 0)
    vit_tokens = wl.images * (cfg.vision.n_patches + 1)
    times = []
    for c in chunks:
        compute = (chunk_flops(cfg, wl, c) + recompute_flops(cfg, wl, c, lay.ac)) / (lay.tp * rate)
        if lay.ac == "selective":
            # The recomputed elementwise ops are bound by memory traffic: they read their
            # inputs and write the tensors that checkpointing did not keep, about twice the
            # bytes the mode saves against none.
            p = training_precision(lay, wl.fp32_residual)
            dropped = (chunk_activations(cfg, wl, c, "none", lay.tp, p)
                       - chunk_activations(cfg, wl, c, "selective", lay.tp, p))
            compute += 2 * dropped / gpu.hbm
        comm = c.layers * n_coll * wl.tokens * cfg.llm.hidden * BF16
        if c.stem and not wl.freeze_vision:
            comm += cfg.vision.depth * n_coll * vit_tokens * cfg.vision.width * BF16
        times.append(compute + comm * per_collective)
    # Data-parallel traffic of the fullest stage's parameters (bf16 all-gathers, fp32 reduce-scatter).
    stage_params = max(sum(chunk_params(cfg, c) for c in chunks if c.index % lay.pp == r)
                       for r in range(lay.pp)) / lay.tp
    shard_bw = _collective_bandwidth(gpu, lay.tp * lay.dp_shard)
    shard_time = (lay.dp_shard - 1) / lay.dp_shard / shard_bw
    replicate_time = 0.0
    if lay.dp_replicate > 1:  # all-reduce of the sharded fp32 gradients across replicas
        span = lay.tp * lay.dp_shard * lay.dp_replicate
        replicate_time = (2 * (lay.dp_replicate - 1) / lay.dp_replicate * FP32 * stage_params
                          / lay.dp_shard / _collective_bandwidth(gpu, span))
    if lay.pp == 1:
        # FSDP gathers every micro-batch (forward and backward) and reduce-scatters its
        # gradients; it overlaps with compute, so the slower of the two sets the pace.
        dp_time = (2 * BF16 + FP32) * stage_params * shard_time
        step = microbatches * max(times[0], dp_time) + replicate_time
        bubble = 0.0
    else:
        # The stage stays gathered for the step: one all-gather and one reduce-scatter, exposed.
        dp_time = (BF16 + FP32) * stage_params * shard_time
        rank_time = max(sum(t for c, t in zip(chunks, times) if c.index % lay.pp == r)
                        for r in range(lay.pp))
        step = microbatches * rank_time + (lay.pp - 1) * max(times) + dp_time + replicate_time
        bubble = (lay.pp - 1) / (microbatches * lay.virtual + lay.pp - 1)
    ideal = microbatches * dp * sum(chunk_flops(cfg, wl, c) for c in chunks) / (lay.gpus * rate)
    total = sum(worst.values())
    return Estimate(lay, **worst, bubble=bubble, efficiency=ideal / step,
                    fits=total <= usable_memory(gpu))


# ----------------------------------------------------------------------------------------------
# Candidates
# ----------------------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg: Emu2Config, gpus: int, wl: Workload) -> tuple[list[Layout], list[str]]:
    """Every layout of `gpus` GPUs the engine accepts (`ParallelDims.validate`,
    `ParallelConfig.validate`), and one line per reason something was ruled out."""
    layouts: list[Layout] = []
    refused: dict[str, None] = {}  # ordered, without repeats
    for tp in (1, 2, 4, 8):
        if gpus % tp or tp > GPUS_PER_NODE:
            continue
        try:  # heads, kv heads, FFN and MLP widths, vocabulary
            ParallelDims(tp=tp).validate(tp, cfg)
        except ValueError as err:
            refused[str(err)] = None
            continue
        if wl.seq_len % tp:  # sequence parallelism splits each row's tokens over tp (as the trainer checks)
            refused[f"tp={tp}: sequence parallelism needs the sequence length ({wl.seq_len}) to be a "
                    f"multiple of tp"] = None
            continue
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            if wl.global_batch % (dp * wl.micro_batch):
                refused[f"tp={tp} pp={pp}: global batch {wl.global_batch} is not a multiple of "
                        f"dp x micro-batch = {dp} x {wl.micro_batch}"] = None
                continue
            m = wl.global_batch // (dp * wl.micro_batch)
            for v in ((1,) if pp == 1 else (1, 2)):
                if pp * v - 1 > cfg.llm.layers:
                    continue
                schedule = "1f1b" if v == 1 else "interleaved-1f1b"
                for dps in _divisors(dp):
                    if dps == 1 and dp > 1:
                        continue  # replication needs sharding (HSDP): the same as dp_shard = dp
                    dims = ParallelDims(dp_replicate=dp // dps, dp_shard=dps, tp=tp, pp=pp)
                    try:
                        dims.validate(gpus, cfg)
                        ParallelConfig(pp_schedule=schedule, stages_per_rank=v, microbatches=m).validate(dims)
                    except ValueError as err:
                        refused[f"tp={tp} pp={pp} {schedule}: {err}"] = None
                        continue
                    layouts += [Layout(tp, pp, dps, dp // dps, ac, v) for ac in AC_MODES]
    return layouts, list(refused)


def plan(cfg: Emu2Config, gpus: int, gpu: GPU, wl: Workload) -> tuple[list[Estimate], list[str]]:
    """Estimates of every candidate, best first: fitting layouts by estimated efficiency (ties
    to less memory), then the rest by memory."""
    layouts, refused = candidates(cfg, gpus, wl)
    rows = [e for e in (estimate(cfg, wl, lay, gpu) for lay in layouts) if e is not None]
    rows.sort(key=lambda e: (not e.fits, -e.efficiency if e.fits else e.total, e.total))
    return rows, refused


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _gib(n: int) -> str:
    return f"{n / GiB:7.1f}"


def format_table(rows: list[Estimate]) -> str:
    head = (f"{'tp':>3} {'pp':>3} {'dp_sh':>5} {'dp_rep':>6} {'schedule':>16} {'v':>2} {'ac':>9} | "
            f"{'params':>7} {'grads':>7} {'optim':>7} {'working':>7} {'casts':>7} {'activ':>7} "
            f"{'total':>7} GiB | "
            f"{'bubble':>6} {'est.eff':>7} fits")
    lines = [head, "-" * len(head)]
    for e in rows:
        lay = e.layout
        lines.append(
            f"{lay.tp:>3} {lay.pp:>3} {lay.dp_shard:>5} {lay.dp_replicate:>6} {lay.schedule:>16} "
            f"{lay.virtual:>2} {lay.ac:>9} | "
            f"{_gib(e.params)} {_gib(e.grads)} {_gib(e.optimizer)} {_gib(e.working)} "
            f"{_gib(e.autocast_cache)} {_gib(e.activations)} {_gib(e.total)}     | "
            f"{e.bubble:6.1%} {e.efficiency:7.1%} {'yes' if e.fits else 'no'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m emu2_engine.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="emu2-37b", help="model preset (emu2_engine.models.config.PRESETS)")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs (8 per node)")
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS))
    p.add_argument("--seq-len", type=int, default=Workload.seq_len)
    p.add_argument("--micro-batch", type=int, default=Workload.micro_batch)
    p.add_argument("--global-batch", type=int, default=Workload.global_batch, help="sequences per step")
    p.add_argument("--images-per-seq", type=int, default=None,
                   help=f"images per sequence (default {Workload.images_per_seq}, or as many as a "
                        f"sequence holds when fewer)")
    p.add_argument("--frames-per-seq", type=int, default=0,
                   help="video frames per sequence, one video (the model's frame_n_query slots each)")
    p.add_argument("--freeze-vision", action="store_true", help="encoder frozen (Emu2 stage 2)")
    p.add_argument("--fp32-residual", action="store_true",
                   help="fp32 residual streams (train.fp32_residual; no effect with data parallelism)")
    p.add_argument("--top", type=int, default=20, help="rows to print, best first (0: all)")
    args = p.parse_args(argv)
    for name in ("gpus", "seq_len", "micro_batch", "global_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if (args.images_per_seq or 0) < 0 or args.top < 0 or args.frames_per_seq < 0:
        p.error("--images-per-seq, --frames-per-seq and --top must be >= 0")
    try:
        cfg = Emu2Config.from_preset(args.preset)
    except ValueError as e:
        p.error(str(e))
    wl = Workload(args.seq_len, args.micro_batch, args.global_batch, 0, args.freeze_vision,
                  args.fp32_residual, args.frames_per_seq)
    if args.images_per_seq is None:
        room = args.seq_len - 2 - wl.visual_span(cfg)
        args.images_per_seq = max(0, min(Workload.images_per_seq, room // (cfg.n_query + 2)))
    if args.seq_len > cfg.llm.max_positions:
        p.error(f"--seq-len {args.seq_len} exceeds the {args.preset} model's max_positions "
                f"({cfg.llm.max_positions})")
    wl = replace(wl, images_per_seq=args.images_per_seq)
    if wl.visual_span(cfg) + 2 > args.seq_len:
        parts = []
        if args.images_per_seq:
            parts.append(f"--images-per-seq {args.images_per_seq} images of {cfg.n_query + 2} tokens "
                         f"each ([IMG] + {cfg.n_query} slots + [/IMG])")
        if wl.frames_per_seq:
            parts.append(f"a video of {wl.frames_per_seq} frames of {cfg.frame_queries + 2} tokens "
                         f"after [VIDEO] (--frames-per-seq)")
        p.error(f"{' and '.join(parts)} and <s> </s> need {wl.visual_span(cfg) + 2} tokens, more "
                f"than --seq-len {args.seq_len}")
    gpu = GPUS[args.gpu]
    rows, refused = plan(cfg, args.gpus, gpu, wl)
    print(f"{cfg.name}: {model_params(cfg) / 1e9:.2f}B parameters on {args.gpus} x {args.gpu} "
          f"({gpu.memory / GiB:.1f} GiB each, {usable_memory(gpu) / GiB:.1f} GiB usable after "
          f"{RESERVED_BYTES / GiB:.0f} GiB reserved and a {MARGIN:.0%} margin)")
    print(f"workload: {wl.seq_len} tokens x {wl.micro_batch} per micro-batch, {wl.global_batch} "
          f"sequences per step, {wl.images_per_seq} images per sequence"
          f"{f', a video of {wl.frames_per_seq} frames' if wl.frames_per_seq else ''}"
          f"{', encoder frozen' if wl.freeze_vision else ''}"
          f"{', fp32 residual streams' if wl.fp32_residual else ''}; memory of the fullest GPU, under "
          f"bf16 autocast (fp32 weights without data parallelism, FSDP's bf16 copies with it)")
    for line in refused:
        print(f"  ruled out: {line}")
    if not rows:
        print("nothing to evaluate: no layout divides the GPUs and the batch")
        return 1
    print(format_table(rows if args.top == 0 else rows[:args.top]))
    if args.top and len(rows) > args.top:
        print(f"... {len(rows) - args.top} more (--top 0 prints all)")
    best = rows[0]
    if not best.fits:
        print(f"NOTHING FITS: the smallest layout needs {best.total / GiB:.1f} GiB per GPU "
              f"(tp={best.layout.tp} pp={best.layout.pp} dp_shard={best.layout.dp_shard} "
              f"ac={best.layout.ac}), {usable_memory(gpu) / GiB:.1f} GiB are usable: use more GPUs, "
              f"a GPU with more memory, shorter sequences or a smaller micro-batch")
        return 1
    lay = best.layout
    microbatches = wl.global_batch // (lay.dp_shard * lay.dp_replicate * wl.micro_batch)
    schedule = f" pp_schedule={lay.schedule} stages_per_rank={lay.virtual}" if lay.pp > 1 else ""
    print(f"recommended (ParallelDims / ParallelConfig fields): tp={lay.tp} pp={lay.pp} "
          f"dp_shard={lay.dp_shard} dp_replicate={lay.dp_replicate}{schedule} "
          f"activation_checkpoint={lay.ac} microbatches={microbatches}")
    print(f"  {best.total / GiB:.1f} GiB on the fullest GPU, bubble {best.bubble:.1%}, estimated "
          f"efficiency {best.efficiency:.0%} (a model, not a measurement)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
