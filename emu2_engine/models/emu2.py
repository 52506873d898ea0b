"""The whole Emu2 model: vision encoder, projector, LLaMA decoder, LM head and regression head.

Training works on packed micro-batches (`emu2_engine.data.batch.PackedBatch`): every image of
the micro-batch goes through the encoder at once, is pooled and projected, and its rows replace
the embeddings of its `<image>`/`[gIMG]` slots; the decoder runs with the packed-document mask;
`emu2_head_loss` gives the text cross-entropy and the image regression (the output at `[IMG]`
predicts embedding 1, the output at slot k predicts embedding k+1; targets are the pooled
features before `project_up`, detached, which `pool_project` returns beside its output).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from emu2_engine.data.batch import PackedBatch
from emu2_engine.models.config import Emu2Config
from emu2_engine.models.llama import LlamaDecoder, RMSNorm
from emu2_engine.models.projector import Projector
from emu2_engine.models.vit import EVAVisionTransformer
from emu2_engine.ops import HeadLoss, emu2_head_loss


class Emu2Model(nn.Module):
    def __init__(self, cfg: Emu2Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.visual = EVAVisionTransformer(cfg.vision)
        self.projector = Projector(cfg.vision.width, cfg.llm.hidden)
        self.llm = LlamaDecoder(cfg.llm)
        self.lm_head = nn.Linear(cfg.llm.hidden, cfg.llm.vocab_size, bias=False)
        self.project_down = nn.Linear(cfg.llm.hidden, cfg.vision.width, bias=False)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        nn.init.normal_(self.project_down.weight, std=0.02)

    def init_weights(self) -> None:
        """Fresh initialisation of every parameter (after `to_empty` from meta), skipping the
        parts a pipeline stage does not hold."""
        if self.visual is not None:
            self.visual.init_weights()
        self.llm.init_weights()
        for m in (self.projector and self.projector.project_up, self.lm_head, self.project_down):
            if m is not None:
                nn.init.normal_(m.weight, std=0.02)

    # -- pieces ---------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor, n_query: int | None = None) -> torch.Tensor:
        """(N, 3, R, R) normalised pixels -> (N, n_query, vision width) pooled features, the
        regression targets (before `project_up`)."""
        return Projector.pool(self.visual(pixels), n_query or self.cfg.n_query)

    def embed(self, input_ids: torch.Tensor, image_slots: torch.Tensor | None = None,
              visual: torch.Tensor | None = None, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with `visual` (N, n_query, hidden) written at the flat positions
        `image_slots` (N, n_query); images that `image_mask` (N,) marks False are padding and
        write nowhere."""
        h = self.llm.embed_tokens(input_ids)
        if visual is None or visual.shape[0] == 0:
            return h
        B, S, H = h.shape
        if image_mask is None:
            flat = h.reshape(B * S, H).index_put((image_slots.reshape(-1),), visual.reshape(-1, H).to(h.dtype))
            return flat.view(B, S, H)
        # Padding images write into one extra row that is dropped: no data-dependent shapes
        # (pipeline stages need fixed ones), and their features get exactly zero gradient.
        slots = image_slots.masked_fill(~image_mask[:, None], B * S).reshape(-1)
        flat = torch.cat([h.reshape(B * S, H), h.new_zeros(1, H)])
        flat.index_put_((slots,), visual.reshape(-1, H).to(h.dtype))
        return flat[:B * S].view(B, S, H)

    # -- training -------------------------------------------------------------------------
    def forward(self, batch: PackedBatch) -> HeadLoss:
        """Losses of one packed micro-batch: (total, ce, mse, n_text, n_reg)."""
        C = self.cfg.vision.width
        visual, reg_target = None, self.project_down.weight.new_zeros(0, C)
        if batch.images.shape[0]:
            visual, pooled = self.projector.pool_project(self.visual(batch.images),
                                                         batch.image_slots.shape[1])
            reg_target = pooled[batch.reg_images].reshape(-1, C)  # detached
        h = self.embed(batch.input_ids, batch.image_slots, visual, batch.image_mask)
        hidden = self.llm(h, batch.position_ids, batch.doc_ids, batch.span_ids)
        return emu2_head_loss(hidden, self.lm_head.weight, batch.labels, self.project_down.weight,
                              batch.reg_positions.reshape(-1), reg_target, self.cfg.regression_weight,
                              text_rows=batch.text_rows)

    # -- inference and parity checks ------------------------------------------------------
    def logits(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
               n_query: int | None = None) -> torch.Tensor:
        """(B, S) unpacked ids -> (B, S, V) logits. The `<image>`/`[gIMG]` placeholders are
        filled, in row-major order, with the embeddings of `images` (N, 3, R, R), n_query each
        (None: the model's)."""
        n_query = self.cfg.n_query if n_query is None else n_query
        side = math.isqrt(max(n_query, 0))
        if n_query < 1 or side * side != n_query or self.cfg.vision.grid % side:
            raise ValueError(f"n_query must be a square whose side divides the patch grid side "
                             f"({self.cfg.vision.grid}), got {n_query}")
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be (B, S) with B, S >= 1, got shape {tuple(input_ids.shape)}")
        V = self.cfg.llm.vocab_size
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"input_ids must lie in [0, {V}), got values in [{lo}, {hi}]")
        ids = self.cfg.special_ids
        if self.cfg.chat and bool((input_ids == ids.gen_img).any()):
            raise ValueError(f"input_ids hold video frames ([gIMG]) for the chat model: Emu2-Chat's "
                             f"frames take 64 visual tokens each and its images {self.cfg.n_query}; "
                             f"this engine gives every visual input one count: video is not "
                             f"supported for chat models")
        is_slot = (input_ids == ids.image) | (input_ids == ids.gen_img)
        n_images = 0 if images is None else images.shape[0]
        n_slots = int(is_slot.sum())
        if n_slots != n_images * n_query:
            raise ValueError(f"input_ids hold {n_slots} visual placeholders, expected {n_images} "
                             f"image(s) x {n_query} = {n_images * n_query}")
        B, S = input_ids.shape
        visual = slots = None
        if n_images:
            visual = self.projector.pool_project(self.visual(images), n_query)[0]
            slots = is_slot.reshape(-1).nonzero().squeeze(1).view(n_images, n_query)
        h = self.embed(input_ids, slots, visual)
        doc = torch.zeros(B, S, dtype=torch.int32, device=input_ids.device)
        pos = torch.arange(S, dtype=torch.int32, device=input_ids.device).expand(B, S)
        hidden = self.llm(h, pos, doc, torch.full_like(doc, -1))
        return self.lm_head(hidden)
