"""Model configuration: one dataclass per component, and the named presets.

Sizes of the real model come from `shared/reference/EMU2_FACTS.md` (the paper and the
released configs); every other preset says why it has the sizes it has.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from emu2_engine.data.tokens import SpecialIds, added_tokens


@dataclass(frozen=True)
class VisionConfig:
    """The EVA-CLIP vision transformer (post-norm blocks, absolute position embedding)."""

    image_size: int = 448
    """Input resolution in pixels (square)."""
    patch_size: int = 14
    """Side of one patch; image_size must be a multiple of it."""
    width: int = 1792
    """Hidden size of every block."""
    depth: int = 64
    """Number of blocks."""
    heads: int = 16
    """Attention heads; width must be a multiple of it."""
    mlp_hidden: int = 15360
    """Hidden size of the GELU MLP (int(1792 * 8.571428571428571) for EVA-02-CLIP-E-plus)."""
    ln_eps: float = 1e-6
    """LayerNorm epsilon."""

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        """Patches per image, CLS excluded."""
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size ({self.image_size}) must be a multiple of "
                             f"vision.patch_size ({self.patch_size})")
        if self.width % self.heads:
            raise ValueError(f"vision.width ({self.width}) must be a multiple of vision.heads ({self.heads})")


@dataclass(frozen=True)
class LlamaConfig:
    """The LLaMA decoder (RMSNorm, RoPE, SwiGLU, untied LM head)."""

    vocab_size: int = 32272
    """Rows of the input embedding and of the LM head (base pieces + Emu2's added tokens)."""
    hidden: int = 6656
    """Model width."""
    layers: int = 60
    """Number of decoder blocks."""
    heads: int = 52
    """Query heads."""
    kv_heads: int = 52
    """Key/value heads (== heads: no GQA in LLaMA-33B); heads must be a multiple of it."""
    ffn_hidden: int = 17920
    """Hidden size of the SwiGLU feed-forward."""
    rms_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    max_positions: int = 2048
    """Longest document (positions restart per packed document)."""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def validate(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"llm.hidden ({self.hidden}) must be a multiple of llm.heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"llm.heads ({self.heads}) must be a multiple of llm.kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"llm head dim ({self.head_dim}) must be even for RoPE")


@dataclass(frozen=True)
class Emu2Config:
    """A whole Emu2 model: encoder, projector, decoder, heads and the loss weighting."""

    name: str = "emu2-37b"
    """Preset name (informational)."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The vision encoder."""
    llm: LlamaConfig = field(default_factory=LlamaConfig)
    """The language model."""
    base_vocab_size: int = 32000
    """Pieces of the sentencepiece model; Emu2's added tokens follow them."""
    chat: bool = False
    """Whether the vocabulary carries the chat tokens [USER]/[ASSISTANT] (Emu2-Chat)."""
    n_query: int = 64
    """Visual embeddings per image after pooling (a square: 64 = 8x8, 256 = 16x16)."""
    frame_n_query: int = 0
    """Visual embeddings per video frame; 0: n_query, like an image. Emu2-Chat gives a frame 64
    (8x8) and an image 256 (EMU2_FACTS.md). A square whose side divides n_query's side: a frame's
    embeddings are means of windows of the image pooling's (see `Emu2Model.visual_rows`)."""
    regression_weight: float = 1.0
    """Weight of the image-regression MSE against the text cross-entropy (not released; 1.0)."""

    @property
    def special_ids(self) -> SpecialIds:
        return SpecialIds.for_base(self.base_vocab_size)

    @property
    def frame_queries(self) -> int:
        """Visual embeddings per video frame (`frame_n_query`, or n_query when it is 0)."""
        return self.frame_n_query or self.n_query

    def validate(self) -> None:
        """Raise ValueError with one line naming the first inconsistency."""
        self.vision.validate()
        self.llm.validate()
        want_vocab = self.base_vocab_size + len(added_tokens(self.chat))
        if self.llm.vocab_size != want_vocab:
            raise ValueError(f"llm.vocab_size must be base_vocab_size + added tokens = {want_vocab}, "
                             f"got {self.llm.vocab_size}")
        side = math.isqrt(self.n_query)
        if side * side != self.n_query or self.vision.grid % side:
            raise ValueError(f"n_query ({self.n_query}) must be a square whose side divides the "
                             f"patch grid side ({self.vision.grid})")
        frame_side = math.isqrt(max(self.frame_n_query, 0))
        if self.frame_n_query and (frame_side * frame_side != self.frame_n_query
                                   or side % frame_side):
            raise ValueError(f"frame_n_query ({self.frame_n_query}) must be 0 (n_query) or a square "
                             f"whose side divides n_query's side ({side})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Emu2Config":
        d = dict(d)
        vision = VisionConfig(**d.pop("vision", {}))
        llm = LlamaConfig(**d.pop("llm", {}))
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(vision=vision, llm=llm, **d)

    @classmethod
    def from_preset(cls, name: str) -> "Emu2Config":
        """The named preset (see `PRESETS`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
        cfg = PRESETS[name]
        cfg.validate()
        return cfg


_EMU2_VISION = VisionConfig()  # EVA-02-CLIP-E-plus at 448 px, as released with Emu2.
_EMU2_LLM = LlamaConfig()  # LLaMA-33B with the 272 added tokens.

PRESETS: dict[str, Emu2Config] = {
    # The released 37B model (Emu2 and Emu2-Gen share this shape).
    "emu2-37b": Emu2Config(name="emu2-37b"),
    # Emu2-Chat: two more tokens ([USER], [ASSISTANT]), 16x16 visual tokens per image and 8x8 per
    # video frame.
    "emu2-chat-37b": Emu2Config(name="emu2-chat-37b", chat=True, n_query=256, frame_n_query=64,
                                llm=replace(_EMU2_LLM, vocab_size=32274)),
    # The real widths with 4 LLM layers and 4 ViT blocks: per-GPU kernel efficiency at the real
    # shapes on one GPU.
    "emu2-37b-slice": Emu2Config(name="emu2-37b-slice", vision=replace(_EMU2_VISION, depth=4),
                                 llm=replace(_EMU2_LLM, layers=4)),
    # About 1B LLaMA parameters (0.95B: 16 layers of width 2048, head dim 128 as in LLaMA) behind
    # an EVA ViT-L-sized encoder (0.30B) at 448 px: fills one 80 GB H100 for MFU benchmarks.
    "proxy-1b": Emu2Config(
        name="proxy-1b",
        vision=VisionConfig(image_size=448, patch_size=14, width=1024, depth=24, heads=16,
                            mlp_hidden=4096),
        llm=LlamaConfig(hidden=2048, layers=16, heads=16, kv_heads=16, ffn_hidden=5632)),
    # Tiny, for the CPU: 64 px images in 8x8 patches, 4x4 visual tokens, the shipped 512-piece
    # shapes-world tokenizer, GQA (4 query heads on 2 kv heads) so that path is always run.
    "debug": Emu2Config(
        name="debug",
        vision=VisionConfig(image_size=64, patch_size=8, width=64, depth=2, heads=4, mlp_hidden=256),
        llm=LlamaConfig(vocab_size=512 + 272, hidden=128, layers=2, heads=4, kv_heads=2,
                        ffn_hidden=384, max_positions=512),
        base_vocab_size=512, n_query=16),
}
# The debug model with the chat vocabulary ([USER], [ASSISTANT] after the 272 added tokens): the
# CPU's stand-in for Emu2-Chat tuning from Emu2's weights (`checkpoint.init_from` grows the rows).
# Its frames take 2x2 visual tokens and its images 4x4, as Emu2-Chat's take a quarter of an image's.
PRESETS["debug-chat"] = replace(PRESETS["debug"], name="debug-chat", chat=True, frame_n_query=4,
                                llm=replace(PRESETS["debug"].llm, vocab_size=512 + 274))


# ----------------------------------------------------------------------------------------------
# Visual decoders (the UNets of emu2_engine/models/unet.py and unet3d.py)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UNetConfig:
    """A conditional UNet in diffusers' `UNet2DConditionModel` layout (linear projections in
    the transformers, GEGLU feed-forwards). Down blocks are listed from the input resolution
    down; the up blocks mirror them. Defaults are the released Emu2-Gen decoder (EMU2_FACTS.md)."""

    name: str = "emu2-gen"
    """Preset name (informational)."""
    in_channels: int = 4
    """Latent channels in (the VAE's latent channels)."""
    out_channels: int = 4
    """Channels of the predicted noise."""
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    """Width of each resolution level."""
    cross_attention: tuple[bool, ...] = (False, True, True)
    """Per level: whether its blocks carry transformers (CrossAttnDownBlock2D) or not (DownBlock2D)."""
    layers_per_block: int = 2
    """Resnets per down block (the up blocks have one more)."""
    transformer_layers: tuple[int, ...] = (1, 2, 10)
    """Transformer blocks inside each transformer, per level; the mid block uses the last."""
    attention_heads: tuple[int, ...] = (5, 10, 20)
    """Heads per level (diffusers calls this `attention_head_dim`, but uses it as the head count)."""
    cross_attention_dim: int = 1792
    """Width of the conditioning embeddings (the visual encoder's width)."""
    cond_tokens: int = 64
    """Conditioning embeddings per image (the encoder's n_query)."""
    text_time: bool = True
    """SDXL's added conditioning: the mean embedding and the six size/crop ids (`text_time`)."""
    addition_time_embed_dim: int = 256
    """Sinusoidal width of each of the six size/crop ids."""
    norm_groups: int = 32
    """GroupNorm groups."""
    norm_eps: float = 1e-5
    """GroupNorm epsilon of the resnets and the output norm (the transformers' GroupNorm uses 1e-6)."""
    sample_size: int = 128
    """Latent side the model was trained at (128 = 1024 px through the SDXL VAE); informational."""
    temporal_kernel: int = 3
    """Kernel of the temporal convolutions of the inflated video UNet (odd)."""

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding: 4 x the first level's width, as diffusers builds it."""
        return 4 * self.block_out_channels[0]

    @property
    def add_embed_in_dim(self) -> int:
        """Input width of `add_embedding`: pooled embedding + 6 sinusoidal ids (3328 for Emu2-Gen)."""
        return self.cross_attention_dim + 6 * self.addition_time_embed_dim

    def validate(self) -> None:
        """Raise ValueError with one line naming the first inconsistency."""
        levels = len(self.block_out_channels)
        for name in ("cross_attention", "transformer_layers", "attention_heads"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"unet.{name} needs one entry per level ({levels}), got "
                                 f"{len(getattr(self, name))}")
        for width, heads in zip(self.block_out_channels, self.attention_heads):
            if width % self.norm_groups:
                raise ValueError(f"unet level width {width} must be a multiple of norm_groups "
                                 f"({self.norm_groups})")
            if width % heads:
                raise ValueError(f"unet level width {width} must be a multiple of its heads ({heads})")
        if self.layers_per_block < 1 or min(self.transformer_layers) < 1:
            raise ValueError("unet.layers_per_block and every unet.transformer_layers must be >= 1")
        if self.block_out_channels[0] % 2 or self.addition_time_embed_dim % 2:
            raise ValueError("the sinusoidal embedding widths (block_out_channels[0], "
                             "addition_time_embed_dim) must be even")
        if self.temporal_kernel < 1 or self.temporal_kernel % 2 == 0:
            raise ValueError(f"unet.temporal_kernel must be odd and >= 1, got {self.temporal_kernel}")

    @classmethod
    def from_preset(cls, name: str) -> "UNetConfig":
        """The named preset (see `UNET_PRESETS`)."""
        if name not in UNET_PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; expected one of {sorted(UNET_PRESETS)}")
        cfg = UNET_PRESETS[name]
        cfg.validate()
        return cfg


UNET_PRESETS: dict[str, UNetConfig] = {
    # The released Emu2-Gen image decoder: SDXL-base's UNet with cross-attention on the
    # 64 x 1792 visual embeddings and the pooled (mean) embedding in `text_time`.
    "emu2-gen": UNetConfig(),
    # Stable Diffusion 2.1's UNet shape with cross-attention on the visual embeddings: the
    # paper's video decoder starts from SD 2.1 (its weights were never released). Inflated by
    # `unet3d.inflate_unet`.
    "emu2-video": UNetConfig(name="emu2-video", block_out_channels=(320, 640, 1280, 1280),
                             cross_attention=(True, True, True, False), transformer_layers=(1, 1, 1, 1),
                             attention_heads=(5, 10, 20, 20), text_time=False, sample_size=64),
    # Tiny, for the CPU: conditioned on the debug encoder (width 64, 16 embeddings per image),
    # on the 16x16 latents of a tiny VAE over 64 px images.
    "debug": UNetConfig(name="debug", block_out_channels=(32, 64), cross_attention=(False, True),
                        layers_per_block=1, transformer_layers=(1, 1), attention_heads=(2, 4),
                        cross_attention_dim=64, cond_tokens=16, addition_time_embed_dim=8,
                        norm_groups=8, sample_size=16),
}
