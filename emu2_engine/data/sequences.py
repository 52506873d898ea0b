"""Sequence building (samples -> token ids + metadata) and collation of packed rows into a
`PackedBatch` (see `batch.py` for the contract).

A `Sample` is one document: `<s> ... </s>` with its images inline. Each image occupies
`[IMG]` + n_query slots + `[/IMG]`; the slots (`<image>` for images, `[gIMG]` for video
frames) are the positions whose embedding rows the model replaces with visual embeddings.

Decisions recorded here:
- The text loss is described per token by `Sample.text_target`: True where the token may be
  the *target* of a next-token prediction. `build_image_caption` sets it for every text token
  (`<s>`, the caption, `</s>`) and clears it for `[IMG]`, `[/IMG]`, the slots and `[PAD]`
  (Emu2 takes no text loss on image tokens). Other builders (chat) clear it for everything
  but the answer. Collation turns it into pre-shifted labels:
  `labels[t] = input_ids[t + 1]` if t + 1 is in the same document and a text target, else -100.
- `span_ids` of a bidirectional image cover its n_query slots only (not `[IMG]`/`[/IMG]`):
  that is all that needs two-way attention, since `[IMG]` precedes the slots and `[/IMG]`
  follows them. The span id is the image's index in the batch (distinct, >= 0). A regressed
  image is never bidirectional (its embeddings are generated one by one).
- Padding: `[PAD]` ids, labels -100, doc_ids -1, span_ids -1, position_ids 0.
- Images are ordered by row, then by position in the row; `image_slots`, `reg_images`,
  `span_ids` and `images` all use that order.
- Image preprocessing follows the released Emu2 processor: a bicubic resize straight to
  image_size x image_size (no crop), then the CLIP mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from emu2_engine.data.batch import PackedBatch
from emu2_engine.data.tokens import SpecialIds

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = -100


@dataclass
class Sample:
    """One document, before packing."""

    input_ids: np.ndarray
    """(L,) int64 token ids, `<s>` first and `</s>` last."""
    text_target: np.ndarray
    """(L,) bool: this token may be the target of a next-token text prediction."""
    images: list[torch.Tensor] = field(default_factory=list)
    """Normalised (3, H, W) float32 pixels of each image, in sequence order."""
    image_starts: list[int] = field(default_factory=list)
    """Position of each image's `[IMG]`; its slots are the n_query positions after it."""
    regress: list[bool] = field(default_factory=list)
    """Per image: its visual embeddings are regression targets."""
    bidirectional: list[bool] = field(default_factory=list)
    """Per image: its slots attend to each other in both directions (never when regressed)."""

    def __len__(self) -> int:
        return len(self.input_ids)


def to_pixels(image: Image.Image, image_size: int) -> torch.Tensor:
    """(3, image_size, image_size) float32: bicubic resize, then CLIP normalisation."""
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


def image_tokens(ids: SpecialIds, n_query: int) -> list[int]:
    """`[IMG]` + `<image>` x n_query + `[/IMG]`."""
    return [ids.img] + [ids.image] * n_query + [ids.img_end]


def text_target_mask(input_ids: np.ndarray, ids: SpecialIds) -> np.ndarray:
    """True for text tokens: everything but `[PAD]`, `[IMG]`, `[/IMG]`, `<image>`, `[gIMG]`, `[/gIMG]`."""
    non_text = [ids.pad, ids.img, ids.img_end, ids.image, ids.gen_img, ids.gen_img_end]
    return ~np.isin(input_ids, non_text)


def build_image_caption(tokenizer, image: torch.Tensor, caption: str, n_query: int,
                        image_first: bool, regress: bool = False,
                        bidirectional: bool = False) -> Sample:
    """`<s>[IMG]<image>*n[/IMG]caption</s>` (image_first) or `<s>caption[IMG]<image>*n[/IMG]</s>`.

    `tokenizer` is an `Emu2Tokenizer` (anything with `encode(text)` and `ids`); `image` the
    normalised pixels (`to_pixels`). The caller draws `image_first` (p = 0.5 in pretraining).
    """
    if regress and bidirectional:
        raise ValueError("an image that is a regression target cannot be bidirectional: "
                         "its embeddings are generated one by one (causally)")
    if n_query < 1:
        raise ValueError(f"n_query must be >= 1, got {n_query}")
    ids = tokenizer.ids
    text = tokenizer.encode(caption)
    visual = image_tokens(ids, n_query)
    body = visual + text if image_first else text + visual
    input_ids = np.array([ids.bos] + body + [ids.eos], dtype=np.int64)
    start = 1 if image_first else 1 + len(text)
    return Sample(input_ids=input_ids, text_target=text_target_mask(input_ids, ids),
                  images=[image], image_starts=[start], regress=[regress],
                  bidirectional=[bidirectional])


def _check_sample(sample: Sample, index: int, ids: SpecialIds, n_query: int) -> None:
    n = len(sample.images)
    if not (len(sample.image_starts) == len(sample.regress) == len(sample.bidirectional) == n):
        raise ValueError(f"sample {index}: images, image_starts, regress and bidirectional must have "
                         f"one entry per image, got {n}, {len(sample.image_starts)}, "
                         f"{len(sample.regress)}, {len(sample.bidirectional)}")
    if len(sample.text_target) != len(sample.input_ids):
        raise ValueError(f"sample {index}: text_target has {len(sample.text_target)} entries for "
                         f"{len(sample.input_ids)} tokens")
    previous_end = 0
    for start, reg, bi in zip(sample.image_starts, sample.regress, sample.bidirectional):
        if start < previous_end:
            raise ValueError(f"sample {index}: image_starts must be increasing and images must not overlap")
        previous_end = start + n_query + 2
        span = sample.input_ids[start:previous_end]
        if (len(span) != n_query + 2 or span[0] != ids.img or span[-1] != ids.img_end
                or not np.isin(span[1:-1], ids.visual_slots).all()):
            raise ValueError(f"sample {index}: the image at position {start} is not "
                             f"[IMG] + {n_query} slots + [/IMG]")
        if reg and bi:
            raise ValueError(f"sample {index}: the image at position {start} is both regressed "
                             f"and bidirectional")


def collate_packed(samples: list[Sample], rows: list[list[int]], seq_len: int, ids: SpecialIds,
                   n_query: int, image_size: int) -> PackedBatch:
    """Lay out `rows` (each a list of indices into `samples`, in order) as a `PackedBatch` of
    shape (len(rows), seq_len); see the module docstring for the conventions."""
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
    slot_offsets = np.arange(1, n_query + 1)
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
            for image, start, reg, bi in zip(sample.images, sample.image_starts, sample.regress,
                                             sample.bidirectional):
                if tuple(image.shape) != (3, image_size, image_size):
                    raise ValueError(f"sample {i}: image of shape {tuple(image.shape)}, expected "
                                     f"(3, {image_size}, {image_size})")
                n = len(images)
                slots = b * S + offset + start + slot_offsets
                images.append(image)
                image_slots.append(slots)
                if bi:
                    span_ids[b, offset + start + 1:offset + start + 1 + n_query] = n
                if reg:
                    reg_images.append(n)
                    # [IMG] predicts embedding 1, slot k predicts embedding k + 1.
                    reg_positions.append(np.concatenate([[b * S + offset + start], slots[:-1]]))
            offset = end
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        doc_ids=torch.from_numpy(doc_ids),
        span_ids=torch.from_numpy(span_ids),
        position_ids=torch.from_numpy(position_ids),
        images=(torch.stack(images).float() if images
                else torch.zeros((0, 3, image_size, image_size), dtype=torch.float32)),
        image_slots=torch.from_numpy(np.stack(image_slots).astype(np.int64) if image_slots
                                     else np.zeros((0, n_query), dtype=np.int64)),
        reg_images=torch.tensor(reg_images, dtype=torch.int64),
        reg_positions=torch.from_numpy(np.stack(reg_positions).astype(np.int64) if reg_positions
                                       else np.zeros((0, n_query), dtype=np.int64)),
    )
