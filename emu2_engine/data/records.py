"""Decoded samples: what the shard readers and decoders hand to the sequence builders.

One dataclass per sample type. Images are float tensors (3, H, W) already resized to the
model's resolution and normalised with the CLIP mean and std; video frames are (T, 3, H, W).
Boxes are (x0, y0, x1, y1) in [0, 1] image coordinates. `key` is the sample's key in its
shard (unique within a dataset), `source` the shard it came from.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class ImageText:
    key: str
    image: torch.Tensor
    caption: str
    source: str = ""


@dataclass
class VideoText:
    key: str
    frames: torch.Tensor
    caption: str
    source: str = ""


@dataclass
class Interleaved:
    """A document: texts[i] is the i-th sentence; images[j] belongs to sentence image_at[j].

    Shard documents are OBELICS-style aligned lists (`make_shapes.py`); the decoder gives an
    image to the first sentence after it, or to the last sentence when no sentence follows
    it, so 0 <= image_at[j] < len(texts) and images keep their document order."""
    key: str
    texts: list[str]
    images: list[torch.Tensor]
    image_at: list[int]
    source: str = ""


@dataclass
class Phrase:
    """A phrase of a grounded caption: caption[start:end], with one or more boxes."""
    start: int
    end: int
    boxes: list[tuple[float, float, float, float]]


@dataclass
class Grounded:
    key: str
    image: torch.Tensor
    caption: str
    phrases: list[Phrase]
    source: str = ""


@dataclass
class VQA:
    key: str
    image: torch.Tensor
    question: str
    answers: list[str]
    source: str = ""


@dataclass
class Edit:
    """An image edit (InstructPix2Pix): `image` changed as `instruction` says gives `edited`."""
    key: str
    image: torch.Tensor
    instruction: str
    edited: torch.Tensor
    source: str = ""


IMAGE_MARKER = "<image>"
"""Where an image goes in a chat instruction (LLaVA's convention): one marker per image, in the
order of `Chat.images`."""

CHAT_SYSTEMS = ("chat", "academic")
"""The names of Emu2-Chat's two system messages (`sequences.SYSTEM_MESSAGES`)."""


@dataclass
class Chat:
    """A conversation, LLaVA-style: `turns[i]` = (the user's instruction, the assistant's
    answer). The instructions hold IMAGE_MARKER once per image, in the order of `images`
    (`decode.py` puts the markers of a conversation that has none before its first
    instruction). `system` names the system message: "chat" (multimodal chat data) or
    "academic" (academic-task data with short annotations)."""
    key: str
    turns: list[tuple[str, str]]
    images: list[torch.Tensor] = field(default_factory=list)
    system: str = "chat"
    source: str = ""


@dataclass
class Text:
    key: str
    text: str
    source: str = ""


Record = ImageText | VideoText | Interleaved | Grounded | VQA | Chat | Edit | Text


@dataclass
class SkipStats:
    """Samples skipped, by kind ("corrupt_image", "empty_file", "bad_utf8", ...).

    `skip` logs the first occurrence of each kind once; `summary()` gives the totals."""
    counts: Counter = field(default_factory=Counter)

    def skip(self, kind: str, key: str, why: str, log=None) -> None:
        first = self.counts[kind] == 0
        self.counts[kind] += 1
        if first and log is not None:
            log(f"skipping sample {key!r}: {kind} ({why}); further {kind} samples are counted silently")

    def summary(self) -> str:
        if not self.counts:
            return "no samples skipped"
        return "skipped samples: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
