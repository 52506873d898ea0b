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
import torch.nn.functional as F

from emu2_engine.data.batch import PackedBatch
from emu2_engine.models.config import Emu2Config
from emu2_engine.models.llama import LlamaDecoder, RMSNorm
from emu2_engine.models.projector import Projector
from emu2_engine.models.vit import EVAVisionTransformer
from emu2_engine.ops import HeadLoss, emu2_head_loss, pool_patches


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

    def visual_rows(self, features: torch.Tensor, input_ids: torch.Tensor, image_slots: torch.Tensor,
                    frame_queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder features (N, P, C) -> (the LLM rows (N, Q, hidden), the pooled embeddings
        (N, Q, C), detached: the regression targets, for images only) for the visual inputs
        whose slots `image_slots` (N, Q) lists.

        Every input is pooled to Q embeddings; a video frame (its first slot holds `[gIMG]` in
        `input_ids`) of a model whose frames take fewer (`frame_queries`, Emu2-Chat: 64 against
        256) gets the means of windows of those instead, in its first `frame_queries` rows, and
        zeros after them (its slots row is -1 there). Average pooling and `project_up` (no
        bias) are linear, so these are exactly the frame's patches pooled to `frame_queries`
        and projected, without a second pass over the encoder's output. `frame_queries`
        overrides the model's."""
        Q = image_slots.shape[1]
        visual, pooled = self.projector.pool_project(features, Q)
        fq = frame_queries or self.cfg.frame_queries
        if fq >= Q or visual.shape[0] == 0:
            return visual, pooled
        # A padding image's slots are -1: it reads position 0 (`<s>`), so it is not a frame.
        first = image_slots[:, 0].clamp(min=0)
        is_frame = (input_ids.reshape(-1)[first] == self.cfg.special_ids.gen_img)[:, None, None]
        coarse = F.pad(pool_patches(visual, fq), (0, 0, 0, Q - fq))
        # A frame's pooled rows stay as they are: such frames are never regressed (the batch
        # and the config refuse it), so nothing reads them.
        return torch.where(is_frame, coarse, visual), pooled

    def embed(self, input_ids: torch.Tensor, image_slots: torch.Tensor | None = None,
              visual: torch.Tensor | None = None, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with `visual` (N, Q, hidden) written at the flat positions
        `image_slots` (N, Q); a slot of -1 (a video frame's unused tail, a padding image) and
        the images that `image_mask` (N,) marks False write nowhere."""
        h = self.llm.embed_tokens(input_ids)
        if visual is None or visual.shape[0] == 0:
            return h
        B, S, H = h.shape
        # What writes nowhere writes into one extra row that is dropped: no data-dependent
        # shapes (pipeline stages need fixed ones), and its rows get exactly zero gradient.
        slots = image_slots.masked_fill(image_slots < 0, B * S)
        if image_mask is not None:
            slots = slots.masked_fill(~image_mask[:, None], B * S)
        flat = torch.cat([h.reshape(B * S, H), h.new_zeros(1, H)])
        flat.index_put_((slots.reshape(-1),), visual.reshape(-1, H).to(h.dtype))
        return flat[:B * S].view(B, S, H)

    # -- training -------------------------------------------------------------------------
    def forward(self, batch: PackedBatch) -> HeadLoss:
        """Losses of one packed micro-batch: (total, ce, mse, n_text, n_reg)."""
        C = self.cfg.vision.width
        visual, reg_target = None, self.project_down.weight.new_zeros(0, C)
        if batch.images.shape[0]:
            visual, pooled = self.visual_rows(self.visual(batch.images), batch.input_ids,
                                              batch.image_slots)
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
        filled, in row-major order, with the embeddings of `images` (N, 3, R, R): n_query each
        for an image (None: the model's), `frame_queries` each for a video frame (its slots
        are `[gIMG]`) when n_query is the model's, else n_query too."""
        h = self.prompt_embeddings(input_ids, images, n_query)
        B, S = input_ids.shape
        doc = torch.zeros(B, S, dtype=torch.int32, device=input_ids.device)
        pos = torch.arange(S, dtype=torch.int32, device=input_ids.device).expand(B, S)
        hidden = self.llm(h, pos, doc, torch.full_like(doc, -1))
        return self.lm_head(hidden)

    def prompt_embeddings(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                          n_query: int | None = None) -> torch.Tensor:
        """(B, S) unpacked ids -> (B, S, hidden) LLM input embeddings, the placeholders filled
        with the visual rows of `images` as `logits` describes (it runs the decoder on these)."""
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
        frame_q = self.cfg.frame_queries if n_query == self.cfg.n_query else n_query
        slots = self._slots_of(input_ids, 0 if images is None else images.shape[0], n_query, frame_q)
        visual = None
        if slots is not None:
            visual = self.visual_rows(self.visual(images), input_ids, slots, frame_q)[0]
        return self.embed(input_ids, slots, visual)

    def _slots_of(self, input_ids: torch.Tensor, n_images: int, n_query: int,
                  frame_q: int) -> torch.Tensor | None:
        """(n_images, n_query) flat slot positions of the visual inputs of unpacked ids, in
        row-major order (an image takes n_query, a frame frame_q, -1 after its last); None
        without images. Raises when the placeholders do not make n_images whole inputs."""
        ids = self.cfg.special_ids
        flat = input_ids.reshape(-1).cpu()
        is_frame = flat == ids.gen_img
        positions = ((flat == ids.image) | is_frame).nonzero().squeeze(1)
        n_image, n_frame = int((flat == ids.image).sum()), int(is_frame.sum())
        if n_image % n_query or n_frame % frame_q or n_image // n_query + n_frame // frame_q != n_images:
            raise ValueError(f"input_ids hold {n_image} image placeholders (<image>, {n_query} per "
                             f"image) and {n_frame} video-frame placeholders ([gIMG], {frame_q} per "
                             f"frame), which do not make the {n_images} visual input(s) given")
        if not n_images:
            return None
        slots = torch.full((n_images, n_query), -1, dtype=torch.int64)
        at = 0
        for k in range(n_images):
            frame = bool(is_frame[positions[at]])
            q = frame_q if frame else n_query
            run = positions[at:at + q]
            if run.numel() < q or bool((is_frame[run] != frame).any()):
                raise ValueError(f"visual input {k} of input_ids mixes <image> and [gIMG] "
                                 f"placeholders (or is cut short): each input takes "
                                 f"{n_query} <image> or {frame_q} [gIMG]")
            slots[k, :q] = run
            at += q
        return slots.to(input_ids.device)
