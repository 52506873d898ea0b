"""Emu2's added tokens, in the order the released tokenizer appends them.

With LLaMA's 32000-piece sentencepiece model these get the ids listed in
`shared/reference/EMU2_FACTS.md` (`[PAD]` = 32000 ... `<patch_index_0256>` = 32271, and
`[USER]`/`[ASSISTANT]` = 32272/32273 for Emu2-Chat). With a smaller base model (the shipped
shapes-world tokenizer) the same tokens follow its last piece in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

PAD = "[PAD]"
IMG = "[IMG]"
IMG_END = "[/IMG]"
IMAGE = "<image>"
GEN_IMG = "[gIMG]"
GEN_IMG_END = "[/gIMG]"
EOC = "[EOC]"
VIDEO = "[VIDEO]"
GROUNDING = "<grounding>"
PHRASE = "<phrase>"
PHRASE_END = "</phrase>"
OBJECT = "<object>"
OBJECT_END = "</object>"
MULTI_OBJECT_DELIMITER = "</delimiter_of_multi_objects/>"
REC = "<REC>"
N_PATCH_INDEX = 257  # <patch_index_0000> .. <patch_index_0256>
USER = "[USER]"
ASSISTANT = "[ASSISTANT]"

BASE_SPECIAL_TOKENS: tuple[str, ...] = (
    PAD, IMG, IMG_END, IMAGE, GEN_IMG, GEN_IMG_END, EOC, VIDEO, GROUNDING,
    PHRASE, PHRASE_END, OBJECT, OBJECT_END, MULTI_OBJECT_DELIMITER, REC,
) + tuple(f"<patch_index_{i:04d}>" for i in range(N_PATCH_INDEX))
CHAT_SPECIAL_TOKENS: tuple[str, ...] = (USER, ASSISTANT)


def added_tokens(chat: bool = False) -> tuple[str, ...]:
    """The added tokens in id order (272 of them, 274 with the chat tokens)."""
    return BASE_SPECIAL_TOKENS + (CHAT_SPECIAL_TOKENS if chat else ())


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens the model and the sequence builders need, for one vocabulary."""

    bos: int
    eos: int
    pad: int
    img: int
    img_end: int
    image: int
    gen_img: int
    gen_img_end: int
    video: int

    @classmethod
    def for_base(cls, base_vocab_size: int, bos: int = 1, eos: int = 2) -> "SpecialIds":
        """Ids when the added tokens follow a sentencepiece model of `base_vocab_size` pieces."""
        at = {tok: base_vocab_size + i for i, tok in enumerate(BASE_SPECIAL_TOKENS)}
        return cls(bos=bos, eos=eos, pad=at[PAD], img=at[IMG], img_end=at[IMG_END],
                   image=at[IMAGE], gen_img=at[GEN_IMG], gen_img_end=at[GEN_IMG_END],
                   video=at[VIDEO])

    @property
    def visual_slots(self) -> tuple[int, int]:
        """Placeholder ids whose embedding rows are replaced by visual embeddings."""
        return (self.image, self.gen_img)
