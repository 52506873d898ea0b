"""Sequence building: one decoded record (`records.py`) -> token ids + image metadata.

A `Sample` is one document, `<s> ... </s>`, with its images inline. Each image occupies
`[IMG]` + n_query `<image>` slots + `[/IMG]`, each video frame `[IMG]` + frame_n_query `[gIMG]`
slots + `[/IMG]` (as many as an image's but for Emu2-Chat: 64 against 256); the slots are the
positions whose embedding rows the model replaces with visual embeddings. The layouts are
those of the released Emu2 (shared/reference/EMU2_FACTS.md):

- image-text: `<s>[IMG]<image>*n[/IMG]caption</s>` or `<s>caption[IMG]<image>*n[/IMG]</s>`,
  the image first with p = 0.5 (`image_first_prob`).
- video-text: `[VIDEO]` then per frame `[IMG][gIMG]*n[/IMG]`, before or after the caption
  like an image.
- interleaved (MMC4-style): up to N = 8 images with their sentences, each image before or
  after its sentence with p = 0.5, cut at L = 1024 tokens.
- grounded: `<s>[IMG]...[/IMG]<grounding>` + the caption in which every phrase with boxes
  becomes `<phrase>text</phrase><object><patch_index_a><patch_index_b></object>` (several
  boxes joined by `</delimiter_of_multi_objects/>`), the phrase before its box with p = 0.7,
  else the box first. Boxes are quantised as Kosmos-2 does (`box_to_patch_indices`). With
  `grounded_image_first_prob` < 1 the image may come last instead, `<s><grounding>` + the
  caption + `[IMG]...[/IMG]` (grounded text-to-image, Emu2-Gen).
- image editing (Emu2-Gen, InstructPix2Pix data): `<s>[IMG]source[/IMG]instruction[IMG]edited[/IMG]</s>`.
- language-only: chunks of at most 2048 tokens, each wrapped in `<s> ... </s>`.
- VQA (evaluation): the prompts of the paper's evaluation protocol (`build_vqa`).
- chat (Emu2-Chat instruction tuning, `template="chat"`, `build_chat`):
  `<s>{system} [USER]: {instruction} [ASSISTANT]: {answer}</s>[USER]: ... </s>`, the images
  where the instruction's `<image>` markers are (`records.IMAGE_MARKER`); only the answers and
  the `</s>` closing each carry the text loss. Under this template VQA and image-caption records
  become academic-task conversations (the academic system message, the question or a caption
  request followed by LLaVA-1.5's output-format instruction, the answer or caption as the
  reply); chat records are laid out as they are. The other kinds have no chat form here.

Decisions recorded here:
- The text loss is described per token by `Sample.text_target`: True where the token may be
  the *target* of a next-token prediction: text, `</s>` and the phrase, object and
  patch-index tokens, never `[IMG]`, `[/IMG]`, `<image>`, `[gIMG]`, `[/gIMG]`, `[VIDEO]` or
  `[PAD]` (Emu2 takes no text loss on visual tokens), nor the `<grounding>` instruction. Collation (`packing.collate_packed`) turns it into pre-shifted
  labels: `labels[t] = input_ids[t + 1]` if t + 1 is in the same document and a target.
- Chat tokens: each stretch of text between two special tokens is encoded in one piece,
  without the whitespace next to them, as the released (slow) tokenizer encodes the whole
  template string (`Emu2Tokenizer.encode(special=True)`), except that the answer is
  encoded on its own after the `:` that follows `[ASSISTANT]`: the answer tokens are then
  exactly the tokens a model generates after the inference prompt `... [ASSISTANT]:`, and the
  loss mask has a clean edge. Both agree whenever sentencepiece splits `: answer` at its space.
- A `</s>` that closes a sequence cut short (a truncated sample, a text chunk that is not the
  document's last) is not a target: the document did not end there.
- Regression targets: an image of a dataset listed in `data.regress` is regressed when text
  precedes it in its sequence (there is something to generate it from); `[VIDEO]` and `<s>`
  are not text. A regressed image is never bidirectional; other images get bidirectional
  spans only when `data.bidirectional` asks (the released Emu2 LLM is fully causal).
- Every random choice about a sample (image first, which 8 images, phrase first) comes from
  `sample_rng(seed, dataset, key, epoch)`, so it does not depend on the order samples arrive
  in, on the rank, or on a resume, and changes from one epoch to the next.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from emu2_engine.data import tokens as tk
from emu2_engine.data.records import (CHAT_SYSTEMS, IMAGE_MARKER, VQA, Chat, Edit, Grounded, ImageText,
                                      Interleaved, Phrase, Record, Text, VideoText)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = -100

GRID_SIDE = 16
"""Patch-index grid of the released tokenizer: 16 x 16 = 256 cells, `<patch_index_0000>` to
`<patch_index_0255>`; the release adds 257 such tokens, so `<patch_index_0256>` is never
produced (Kosmos-2's processor takes the grid side as int(sqrt(number of tokens)), 16 here)."""

ZERO_SHOT_VQA = "based on the picture, answer in one word or phrase. {question} short answer:"
FEW_SHOT_VQA = "based on the picture, {question} short answer:"
"""The paper's evaluation prompts (Appendix, evaluation protocol); the image precedes them."""

SYSTEM_MESSAGES = {
    "academic": "You are a helpful assistant, dedicated to provide concise and efficient answers.",
    "chat": "You are a helpful assistant, dedicated to delivering comprehensive and meticulous responses.",
}
"""Emu2-Chat's two system messages (paper, Appendix B.1): academic-task data, multimodal chat data."""
assert tuple(SYSTEM_MESSAGES) == tuple(reversed(CHAT_SYSTEMS))

SHORT_ANSWER = "Answer the question using a single word or phrase."
CAPTION_REQUEST = "Provide a one-sentence caption for the provided image."
"""The output-format instructions of LLaVA-1.5 (Liu et al., "Improved Baselines with Visual
Instruction Tuning", 2023, Table 7: VQAv2/GQA and COCO/TextCaps), which the Emu2 paper says its
academic-task data uses ("instructions with output-format control information as used in [49]");
Emu2's own instruction data was not released."""

TEMPLATES = ("pretrain", "chat")
_NO_CHAT_TOKENS = ("the chat template needs a tokenizer with the chat tokens [USER] and [ASSISTANT] "
                   "(Emu2Tokenizer(chat=True), a preset with chat = True)")


class RecordError(ValueError):
    """A record whose content cannot be laid out (a box outside the image, an image attached
    to a sentence that does not exist, ...): the loader skips and counts it."""


@dataclass
class Sample:
    """One document, before packing."""

    input_ids: np.ndarray
    """(L,) int64 token ids, `<s>` first and `</s>` last."""
    text_target: np.ndarray
    """(L,) bool: this token may be the target of a next-token text prediction."""
    images: list[torch.Tensor] = field(default_factory=list)
    """Normalised (3, H, W) float32 pixels of each image or frame, in sequence order."""
    image_starts: list[int] = field(default_factory=list)
    """Position of each image's `[IMG]`; its slots are the positions after it."""
    regress: list[bool] = field(default_factory=list)
    """Per image: its visual embeddings are regression targets."""
    bidirectional: list[bool] = field(default_factory=list)
    """Per image: its slots attend to each other in both directions (never when regressed)."""
    keep_whole: list[tuple[int, int]] = field(default_factory=list)
    """Half-open token ranges besides the image spans that truncation must not cut: a video
    (`[VIDEO]` and all its frames), a grounded phrase with its boxes."""
    n_slots: list[int] = field(default_factory=list)
    """Per image: its number of slots (a video frame may take fewer than an image). Empty:
    n_query each, as every input of a model that gives frames an image's count."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def slots(self, k: int, n_query: int) -> int:
        """The number of slots of image k (n_query when `n_slots` is empty)."""
        return self.n_slots[k] if self.n_slots else n_query


def to_pixels(image: Image.Image, image_size: int) -> torch.Tensor:
    """(3, image_size, image_size) float32: bicubic resize, then CLIP normalisation."""
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


def sample_rng(seed: int, dataset: str, key: str, epoch: int = 0) -> np.random.Generator:
    """The generator of every layout choice for sample `key` of `dataset` under `seed` in
    `epoch`: each pass over the data lays a sample out afresh (image first or after, which
    images), the same way on every rank and after any resume."""
    digest = hashlib.blake2b(f"{dataset}\0{key}".encode(), digest_size=16).digest()
    words = np.frombuffer(digest, dtype=np.uint32).tolist()
    return np.random.default_rng([seed, *words] + ([epoch] if epoch else []))


def box_to_patch_indices(box: tuple[float, float, float, float], side: int = GRID_SIDE) -> tuple[int, int]:
    """Indices of the grid cells holding a box's top-left and bottom-right corners.

    The rule of Kosmos-2 (Peng et al., 2023, grounded input representation;
    `coordinate_to_patch_index` in the Hugging Face Kosmos-2 processor), whose pipeline built
    Emu2's grounded data: with
    (x0, y0, x1, y1) in [0, 1] and x1 > x0, y1 > y0, the top-left cell is
    (floor(x0 * side), floor(y0 * side)) and the bottom-right cell is
    (ceil(x1 * side - 1), ceil(y1 * side - 1)), i.e. the cell holding the last point inside
    the box; a cell (col, row) has index row * side + col.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise RecordError(f"box {tuple(box)} must be (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 "
                          f"and 0 <= y0 < y1 <= 1")
    left, top = int(np.floor(x0 * side)), int(np.floor(y0 * side))
    right, bottom = int(np.ceil(x1 * side - 1)), int(np.ceil(y1 * side - 1))
    return top * side + left, bottom * side + right


class SampleBuilder:
    """Turns records into Samples with the Emu2 layouts, drawing every choice from
    `sample_rng(seed, dataset, record.key, epoch)`.

    The `build_*` methods take the choices as arguments (so tests can pin each layout);
    `build(record, dataset)` draws them and dispatches on the record type.
    """

    def __init__(self, tokenizer, n_query: int, seed: int = 0, image_first_prob: float = 0.5,
                 phrase_first_prob: float = 0.7, interleaved_images: int = 8,
                 interleaved_len: int = 1024, text_len: int = 2048, bidirectional: bool = False,
                 frame_n_query: int = 0, template: str = "pretrain", grounded_image_first_prob: float = 1.0):
        if n_query < 1:
            raise ValueError(f"n_query must be >= 1, got {n_query}")
        if not 0 <= frame_n_query <= n_query:
            raise ValueError(f"frame_n_query must lie in [0 (n_query), n_query = {n_query}], got "
                             f"{frame_n_query}")
        for name, p in (("image_first_prob", image_first_prob), ("phrase_first_prob", phrase_first_prob),
                        ("grounded_image_first_prob", grounded_image_first_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p}")
        if interleaved_images < 1:
            raise ValueError(f"interleaved_images must be >= 1, got {interleaved_images}")
        if text_len < 3:
            raise ValueError(f"text_len must be >= 3 (<s>, a token, </s>), got {text_len}")
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        if template == "chat" and not getattr(tokenizer, "chat", False):
            raise ValueError(_NO_CHAT_TOKENS)
        self.template = template
        self.tok, self.ids = tokenizer, tokenizer.ids
        self.n_query, self.seed = n_query, seed
        self.frame_n_query = frame_n_query or n_query
        self.image_first_prob, self.phrase_first_prob = image_first_prob, phrase_first_prob
        self.grounded_image_first_prob = grounded_image_first_prob
        self.interleaved_images, self.interleaved_len, self.text_len = (
            interleaved_images, interleaved_len, text_len)
        self.bidirectional = bidirectional
        t = tokenizer.token_to_id
        self.grounding, self.phrase, self.phrase_end = t(tk.GROUNDING), t(tk.PHRASE), t(tk.PHRASE_END)
        self.object, self.object_end = t(tk.OBJECT), t(tk.OBJECT_END)
        self.delimiter = t(tk.MULTI_OBJECT_DELIMITER)
        self.patch_index0 = t("<patch_index_0000>")
        self.user = t(tk.USER) if getattr(tokenizer, "chat", False) else None
        self.assistant = t(tk.ASSISTANT) if getattr(tokenizer, "chat", False) else None
        ids = self.ids
        self._non_text = np.array([ids.pad, ids.img, ids.img_end, ids.image, ids.gen_img,
                                   ids.gen_img_end, ids.video], dtype=np.int64)

    # -- dispatch -------------------------------------------------------------------------
    def build(self, record: Record, dataset: str, regress: bool = False, epoch: int = 0) -> list[Sample]:
        """The samples of one record (several for a long text, one otherwise). `dataset` names
        the record's dataset and `epoch` the pass over it it was read in (they seed the
        choices); `regress`: its images may be regression targets (those with text before
        them)."""
        if not isinstance(record, (ImageText, VideoText, Interleaved, Grounded, Text, VQA, Chat, Edit)):
            raise TypeError(f"no sequence builder for {type(record).__name__}")
        if self.template == "chat" or isinstance(record, Chat):
            return [self.build_chat_record(record)]
        rng = sample_rng(self.seed, dataset, record.key, epoch)
        if isinstance(record, ImageText):
            first = bool(rng.random() < self.image_first_prob)
            return [self.build_image_text(record.image, record.caption, first, regress)]
        if isinstance(record, VideoText):
            first = bool(rng.random() < self.image_first_prob)
            return [self.build_video_text(record.frames, record.caption, first, regress)]
        if isinstance(record, Interleaved):
            texts, images, image_at = self.select_interleaved(record, rng)
            firsts = [bool(x) for x in rng.random(len(images)) < self.image_first_prob]
            return [self.build_interleaved(texts, images, image_at, firsts, regress)]
        if isinstance(record, Grounded):
            firsts = [bool(x) for x in rng.random(len(record.phrases)) < self.phrase_first_prob]
            p = self.grounded_image_first_prob  # drawn only when it is a choice (the draws before
            image_first = p >= 1 or (p > 0 and bool(rng.random() < p))  # stay those of p = 1)
            return [self.build_grounded(record.image, record.caption, record.phrases, firsts, regress,
                                        image_first=image_first)]
        if isinstance(record, Edit):
            return [self.build_edit(record.image, record.instruction, record.edited, regress)]
        if isinstance(record, Text):
            return self.build_text(record.text)
        answer = Counter(record.answers).most_common(1)[0][0] if record.answers else None
        return [self.build_vqa(record.image, record.question, answer=answer)]

    # -- pieces ---------------------------------------------------------------------------
    def _text(self, text: str) -> list[int]:
        """Ids of data text (a caption, sentence, question or answer, possibly inside one of
        this module's prompt templates, which hold no special tokens), stripped. Encoded as
        plain text: special-token strings written in the data stay text, so they cannot
        become the markers the builders place by id."""
        return self.tok.encode(text.strip(), special=False) if text.strip() else []

    def _visual(self, slot: int) -> list[int]:
        """`[IMG]` + the slots of an image (`<image>`) or a video frame (`[gIMG]`) + `[/IMG]`."""
        n = self.frame_n_query if slot == self.ids.gen_img else self.n_query
        return [self.ids.img] + [slot] * n + [self.ids.img_end]

    def _finish(self, body: list[int], images: list[torch.Tensor], starts: list[int],
                regress: bool, keep_whole: list[tuple[int, int]] = (),
                extra_non_targets: list[int] = ()) -> Sample:
        """`<s>` + body + `</s>` (starts/keep_whole are body positions), with the regression
        and span rule of the module docstring applied to every image."""
        input_ids = np.array([self.ids.bos, *body, self.ids.eos], dtype=np.int64)
        target = ~np.isin(input_ids, self._non_text)
        for i in extra_non_targets:
            target[i + 1] = False
        starts = [s + 1 for s in starts]
        # text precedes position s: some target token in [1, s)
        text_before = np.cumsum(target[:-1] & (np.arange(len(target) - 1) >= 1))
        flags = [regress and bool(text_before[s - 1]) for s in starts]
        n_slots = [self.frame_n_query if input_ids[s + 1] == self.ids.gen_img else self.n_query
                   for s in starts]
        return Sample(input_ids=input_ids, text_target=target, images=list(images),
                      image_starts=starts, regress=flags,
                      bidirectional=[self.bidirectional and not r for r in flags],
                      keep_whole=[(a + 1, b + 1) for a, b in keep_whole], n_slots=n_slots)

    # -- builders -------------------------------------------------------------------------
    def build_image_text(self, image: torch.Tensor, caption: str, image_first: bool,
                         regress: bool = False) -> Sample:
        """`<s>[IMG]<image>*n[/IMG]caption</s>` (image_first) or `<s>caption[IMG]<image>*n[/IMG]</s>`."""
        text, visual = self._text(caption), self._visual(self.ids.image)
        body = visual + text if image_first else text + visual
        return self._finish(body, [image], [0 if image_first else len(text)], regress)

    def build_video_text(self, frames: torch.Tensor, caption: str, video_first: bool,
                         regress: bool = False) -> Sample:
        """`[VIDEO]` + `[IMG][gIMG]*n[/IMG]` per frame, before or after the caption."""
        if frames.dim() != 4 or frames.shape[0] == 0:
            raise RecordError(f"a video needs frames of shape (T >= 1, 3, H, W), got {tuple(frames.shape)}")
        text = self._text(caption)
        video = [self.ids.video]
        for _ in range(frames.shape[0]):
            video += self._visual(self.ids.gen_img)
        at = 0 if video_first else len(text)
        body = video + text if video_first else text + video
        step = self.frame_n_query + 2
        starts = [at + 1 + f * step for f in range(frames.shape[0])]
        return self._finish(body, list(frames.unbind(0)), starts, regress,
                            keep_whole=[(at, at + len(video))])

    def select_interleaved(self, record: Interleaved, rng: np.random.Generator
                           ) -> tuple[list[str], list[torch.Tensor], list[int]]:
        """At most `interleaved_images` consecutive images (a random window when the document
        has more) and the sentences around them: from the first sentence after the last image
        left out before the window to the sentence before the first image left out after it."""
        texts, n = record.texts, len(record.images)
        if len(record.image_at) != n:
            raise RecordError(f"interleaved document {record.key!r}: {n} images but "
                              f"{len(record.image_at)} image_at entries")
        bad = [j for j in record.image_at if not 0 <= j < len(texts)]
        if bad:
            raise RecordError(f"interleaved document {record.key!r}: image attached to sentence "
                              f"{bad[0]}, but the document has {len(texts)} sentences")
        order = sorted(range(n), key=lambda j: record.image_at[j])  # stable: by sentence, then index
        at = [record.image_at[j] for j in order]
        N = self.interleaved_images
        lo = int(rng.integers(0, n - N + 1)) if n > N else 0
        hi = min(n, lo + N)
        first = 0 if lo == 0 else min(at[lo], at[lo - 1] + 1)
        last = len(texts) if hi == n else max(at[hi - 1] + 1, at[hi])
        chosen = order[lo:hi]
        return (texts[first:last], [record.images[j] for j in chosen],
                [record.image_at[j] - first for j in chosen])

    def build_interleaved(self, texts: list[str], images: list[torch.Tensor], image_at: list[int],
                          image_first: list[bool], regress: bool = False) -> Sample:
        """Sentences in order, each image just before (image_first) or just after its sentence;
        cut at `interleaved_len` tokens at a boundary that splits no image."""
        if not (len(images) == len(image_at) == len(image_first)):
            raise ValueError(f"images, image_at and image_first must have one entry per image, got "
                             f"{len(images)}, {len(image_at)}, {len(image_first)}")
        visual_min = 2 + self.n_query + 2  # <s> [IMG] slots [/IMG] </s>; checked here, where it
        if self.interleaved_len < visual_min:  # matters (a blend without documents never reads it)
            raise ValueError(f"interleaved_len ({self.interleaved_len}) cannot hold one image of "
                             f"{self.n_query} tokens (needs {visual_min})")
        before: dict[int, list[int]] = {}
        after: dict[int, list[int]] = {}
        for j, (i, first) in enumerate(zip(image_at, image_first)):
            (before if first else after).setdefault(i, []).append(j)
        body: list[int] = []
        starts: list[int] = []
        order: list[int] = []
        for i, sentence in enumerate(texts):
            for j in before.get(i, []):
                starts.append(len(body))
                order.append(j)
                body += self._visual(self.ids.image)
            body += self._text(sentence)
            for j in after.get(i, []):
                starts.append(len(body))
                order.append(j)
                body += self._visual(self.ids.image)
        sample = self._finish(body, [images[j] for j in order], starts, regress)
        cut = truncate_sample(sample, self.interleaved_len, self.ids.eos, self.n_query)
        assert cut is not None, "interleaved_len holds at least one image (checked in __init__)"
        return cut

    def build_grounded(self, image: torch.Tensor, caption: str, phrases: list[Phrase],
                       phrase_first: list[bool], regress: bool = False, image_first: bool = True) -> Sample:
        """`[IMG]...[/IMG]<grounding>` + the caption, each phrase with boxes written as
        `<phrase>text</phrase><object>boxes</object>` (phrase_first) or the reverse; with
        `image_first=False`, `<grounding>` + the caption + `[IMG]...[/IMG]` (grounded
        text-to-image, as Emu2-Gen tunes on: the image after its boxes)."""
        if len(phrase_first) != len(phrases):
            raise ValueError(f"phrase_first needs one entry per phrase, got {len(phrase_first)} "
                             f"for {len(phrases)}")
        spans = sorted(zip(phrases, phrase_first), key=lambda p: p[0].start)
        body = (self._visual(self.ids.image) if image_first else []) + [self.grounding]
        keep: list[tuple[int, int]] = []
        cursor = 0
        for phrase, first in spans:
            if not 0 <= cursor <= phrase.start < phrase.end <= len(caption):
                raise RecordError(f"phrase span [{phrase.start}, {phrase.end}) of a {len(caption)}-"
                                  f"character caption is empty, out of range or overlaps another")
            if not phrase.boxes:
                raise RecordError(f"phrase {caption[phrase.start:phrase.end]!r} has no box")
            body += self._text(caption[cursor:phrase.start])
            words = [self.phrase, *self._text(caption[phrase.start:phrase.end]), self.phrase_end]
            boxes = [self.object]
            for k, box in enumerate(phrase.boxes):
                if k:
                    boxes.append(self.delimiter)
                boxes += [self.patch_index0 + i for i in box_to_patch_indices(box)]
            boxes.append(self.object_end)
            start = len(body)
            body += words + boxes if first else boxes + words
            keep.append((start, len(body)))
            cursor = phrase.end
        body += self._text(caption[cursor:])
        at = 0 if image_first else len(body)
        if not image_first:
            body += self._visual(self.ids.image)
        # <grounding> is an instruction the data gives, not text to predict
        return self._finish(body, [image], [at], regress, keep_whole=keep,
                            extra_non_targets=[self.n_query + 2 if image_first else 0])

    def build_edit(self, source: torch.Tensor, instruction: str, edited: torch.Tensor,
                   regress: bool = False) -> Sample:
        """An image edit, as Emu2-Gen lays out InstructPix2Pix data:
        `[IMG]source[/IMG]instruction[IMG]edited[/IMG]`. Regressed (with `regress`): the edited
        image, which has the instruction before it; the source, first, never is."""
        text = self._text(instruction)
        if not text:
            raise RecordError("an edit needs a non-blank instruction")
        visual = self._visual(self.ids.image)
        body = visual + text + visual
        return self._finish(body, [source, edited], [0, len(visual) + len(text)], regress)

    def build_text(self, text: str) -> list[Sample]:
        """Language-only data: `<s>` + at most text_len - 2 tokens + `</s>` per chunk; only the
        last chunk's `</s>` is a target (the others did not end the document)."""
        tokens = self._text(text)
        step = self.text_len - 2
        chunks = [tokens[i:i + step] for i in range(0, len(tokens), step)] or [[]]
        out = []
        for c, chunk in enumerate(chunks):
            last = c == len(chunks) - 1
            out.append(self._finish(chunk, [], [], False,
                                    extra_non_targets=[] if last else [len(chunk)]))
        return out

    def build_vqa(self, image: torch.Tensor, question: str, answer: str | None = None,
                  shots: list[tuple[torch.Tensor, str, str]] = ()) -> Sample:
        """The evaluation prompt: zero-shot `[image]` + "based on the picture, answer in one
        word or phrase. {question} short answer:"; with shots (image, question, answer), each
        `[image]based on the picture, {q} short answer: {a}`, joined by ". ", then the query
        with the few-shot prompt. Without `answer` the sample ends after the prompt (no
        `</s>`, nothing to predict: a generation prompt); with it, the answer and `</s>` follow
        and only they are text targets (teacher-forced scoring)."""
        body: list[int] = []
        images, starts = [], []
        for shot_image, q, a in shots:
            starts.append(len(body))
            images.append(shot_image)
            body += self._visual(self.ids.image) + self._text(f"{FEW_SHOT_VQA.format(question=q)} {a}.")
        starts.append(len(body))
        images.append(image)
        prompt = (FEW_SHOT_VQA if shots else ZERO_SHOT_VQA).format(question=question)
        body += self._visual(self.ids.image) + self._text(prompt)
        n_prompt = len(body)
        if answer is not None:
            body += self._text(answer)
        sample = self._finish(body, images, starts, False)
        sample.text_target[:n_prompt + 1] = False  # <s> and the prompt carry no loss
        if answer is None:  # a prompt to continue, not a closed document
            sample.input_ids, sample.text_target = sample.input_ids[:-1], sample.text_target[:-1]
        return sample

    def build_chat_record(self, record: Record, prompt_only: bool = False) -> Sample:
        """A record as an Emu2-Chat conversation: a chat record as it is; a VQA record (its most
        common answer) or an image-caption record as an academic-task conversation, the image
        first and LLaVA-1.5's output-format instruction after the question (`SHORT_ANSWER`) or as
        the request (`CAPTION_REQUEST`). ValueError for the kinds without a chat form.
        `prompt_only`: a VQA record's question as the prompt a model answers (no answer, ending
        `[ASSISTANT]:`), as `evaluate.py` asks it."""
        if isinstance(record, Chat):
            return self.build_chat(record.system, record.turns, record.images)
        if isinstance(record, VQA):
            if not (prompt_only or record.answers):
                raise RecordError("a VQA record needs an answer to be a conversation")
            answer = None if prompt_only else Counter(record.answers).most_common(1)[0][0]
            return self.build_chat("academic", [(f"{record.question}\n{SHORT_ANSWER}", answer)],
                                   [record.image], markers=False)
        if isinstance(record, ImageText):
            return self.build_chat("academic", [(CAPTION_REQUEST, record.caption)], [record.image],
                                   markers=False)
        raise ValueError(f"the chat template lays out chat, vqa and image_text records; a "
                         f"{type(record).__name__} record has no chat form (use template = "
                         f"\"pretrain\" for it)")

    def build_chat(self, system: str, turns: list[tuple[str, str | None]],
                   images: list[torch.Tensor] = (), markers: bool = True) -> Sample:
        """Emu2-Chat's template: `<s>{system message} [USER]: {instruction} [ASSISTANT]: {answer}`,
        each later turn after the previous answer's `</s>` as `[USER]: ... [ASSISTANT]: ...`,
        and `</s>` at the end. `system`: "chat" or "academic" (`SYSTEM_MESSAGES`). Each
        IMAGE_MARKER in an instruction is replaced by the next image; with `markers=False` the
        text holds no marker (an IMAGE_MARKER in it is text) and the images go first in the first
        instruction. The whitespace next to a
        special token (`[USER]`, `[IMG]`, ...) is dropped, as the released tokenizer drops it
        (`tokenizer.py`). Only the answers and the `</s>` after each are text targets.

        The last answer may be None: the sample then ends with `[ASSISTANT]:` (no `</s>`), the
        prompt a model continues at inference, as `build_vqa` without an answer."""
        if self.user is None:
            raise ValueError(_NO_CHAT_TOKENS)
        if system not in SYSTEM_MESSAGES:
            raise RecordError(f"system must be one of {list(SYSTEM_MESSAGES)}, got {system!r}")
        if not turns:
            raise RecordError("a conversation needs at least one turn")
        for i, (instruction, answer) in enumerate(turns):
            if not isinstance(instruction, str) or not instruction.strip():
                raise RecordError(f"turn {i}: the instruction must be a non-blank string, got {instruction!r:.80}")
            last = i == len(turns) - 1
            if answer is None and not last:
                raise RecordError(f"turn {i}: only the last turn may leave its answer out (a prompt)")
            if answer is not None and (not isinstance(answer, str) or not answer.strip()):
                raise RecordError(f"turn {i}: the answer must be a non-blank string, got {answer!r:.80}")
            if markers and answer is not None and IMAGE_MARKER in answer:
                raise RecordError(f"turn {i}: an image marker {IMAGE_MARKER} in an answer (images go in "
                                  f"the instructions)")
        count = sum(instruction.count(IMAGE_MARKER) for instruction, _ in turns)
        if markers and count != len(images):
            raise RecordError(f"{count} {IMAGE_MARKER} markers in the instructions for "
                              f"{len(images)} images")
        body: list[int] = []
        answer_token: list[bool] = []  # per body token: a text target
        starts: list[int] = []

        def put(ids: list[int], target: bool = False) -> None:
            body.extend(ids)
            answer_token.extend([target] * len(ids))

        def text(chunk: str) -> list[int]:  # template and data text alike, as plain text, without
            chunk = chunk.strip()               # the whitespace next to the special tokens
            return self.tok.encode(chunk, special=False) if chunk else []

        chunk = SYSTEM_MESSAGES[system] + " "
        for i, (instruction, answer) in enumerate(turns):
            put(text(chunk))
            put([self.user])
            if markers:
                pieces = instruction.strip().split(IMAGE_MARKER)
            else:  # the images (first turn only), then the text
                pieces = [""] * (len(images) if i == 0 else 0) + [instruction.strip()]
            chunk = ": "
            for k, piece in enumerate(pieces):
                piece = piece.lstrip() if k else piece
                if k == len(pieces) - 1:
                    chunk += piece
                    break
                put(text(chunk + piece.rstrip()))  # an image follows
                starts.append(len(body))
                put(self._visual(self.ids.image))
                chunk = ""
            put(text(chunk + " "))
            put([self.assistant])
            put(text(":"))
            if answer is None:
                break
            put(self._text(answer), target=True)
            if i < len(turns) - 1:
                put([self.ids.eos], target=True)
            chunk = ""
        sample = self._finish(body, list(images), starts, False)
        sample.text_target = np.array([False, *answer_token, True], dtype=bool)
        if turns[-1][1] is None:  # a prompt to continue, not a closed conversation
            sample.input_ids, sample.text_target = sample.input_ids[:-1], sample.text_target[:-1]
        return sample


def truncate_sample(sample: Sample, max_len: int, eos: int, n_query: int) -> Sample | None:
    """`sample` cut to at most `max_len` tokens at a boundary inside no image span and no
    `keep_whole` range, closed by a `</s>` that is not a text target (or, for a cut just after
    a chat answer's `</s>`, by that one); images after the cut are dropped. The sample itself
    if it fits; None if no such cut keeps more than `<s>`."""
    if len(sample) <= max_len:
        return sample
    ends = [s + sample.slots(k, n_query) + 2 for k, s in enumerate(sample.image_starts)]
    ranges = list(zip(sample.image_starts, ends)) + list(sample.keep_whole)
    cut = max_len - 1  # keep tokens [0, cut), then </s>
    moved = True
    while moved:
        moved = False
        for a, b in ranges:
            if a < cut < b:
                cut, moved = a, True
    if cut <= 1:
        return None
    keep = [k for k, end in enumerate(ends) if end <= cut]
    if sample.input_ids[cut - 1] == eos:  # just after a chat answer's </s>: it closes the sample
        ids, target = sample.input_ids[:cut].copy(), sample.text_target[:cut].copy()
    else:
        ids = np.append(sample.input_ids[:cut], eos).astype(np.int64)
        target = np.append(sample.text_target[:cut], False)
    return Sample(
        input_ids=ids,
        text_target=target,
        images=[sample.images[k] for k in keep],
        image_starts=[sample.image_starts[k] for k in keep],
        regress=[sample.regress[k] for k in keep],
        bidirectional=[sample.bidirectional[k] for k in keep],
        keep_whole=[(a, b) for a, b in sample.keep_whole if b <= cut],
        n_slots=[sample.n_slots[k] for k in keep] if sample.n_slots else [])
