"""The Emu2 tokenizer: a sentencepiece model plus Emu2's added tokens after its last piece.

With LLaMA's 32000-piece `tokenizer.model` the added tokens get exactly the released ids
(`[PAD]` = 32000 ... `<patch_index_0256>` = 32271, `[USER]`/`[ASSISTANT]` = 32272/32273 with
`chat=True`; see `shared/reference/EMU2_FACTS.md`). Without a model path it loads the shipped
shapes-world model (`assets/shapes_sp.model`, 512 pieces, made by
`python -m emu2_engine.data.train_tokenizer`), giving a vocabulary of 784 (786 with chat).

Every call to `encode` says which of two kinds of text it holds (`special` has no default):

- data text (`special=False`): captions, document sentences, questions, answers, anything
  read from a dataset or a user. It is encoded by sentencepiece as written, so the characters
  "<image>" or "</s>" in a caption become ordinary (byte-fallback) pieces, never the ids the
  engine uses to place images or end sequences.
- a template the engine writes itself (`special=True`): special-token strings are recognised,
  as the released tokenizer does (Emu2's `emu/lm.py`: a slow Hugging Face LlamaTokenizer with
  the added tokens registered as plain strings through `add_special_tokens`, under the
  transformers 4.31 its requirements pin): the text is split on the added-token strings and on
  the model's `<s>`, `</s>` and `<unk>` pieces; the whitespace next to each added token is
  dropped (that version strips both sides of a special token given as a plain string, and
  keeps it next to `<s>`, `</s>` and `<unk>`, which the LlamaTokenizer itself registers with
  lstrip and rstrip off); each
  string between them is encoded by sentencepiece on its own (with its dummy prefix); each
  special string becomes its id. So `encode("</s>[USER]: hi", special=True)` starts with the
  EOS id then the `[USER]` id, and `"what? [ASSISTANT]:"` gives no lone "▁" before
  `[ASSISTANT]`.
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

from emu2_engine.data.tokens import SpecialIds, added_tokens

DEFAULT_MODEL = Path(__file__).parent / "assets" / "shapes_sp.model"


class Emu2Tokenizer:
    """Text <-> ids for Emu2 models: sentencepiece base pieces, then the added tokens."""

    def __init__(self, model_path: str | Path | None = None, chat: bool = False):
        path = Path(DEFAULT_MODEL if model_path is None else model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"sentencepiece model not found: {path} (expected a sentencepiece .model file, "
                f"e.g. LLaMA's tokenizer.model, or leave model_path unset for the shipped "
                f"shapes-world model)")
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
        except RuntimeError as e:
            raise ValueError(
                f"{path} is not a valid sentencepiece model ({e}); expected a serialised "
                f"sentencepiece ModelProto such as LLaMA's tokenizer.model") from None
        if self.sp.bos_id() < 0 or self.sp.eos_id() < 0:
            raise ValueError(f"{path} has no <s>/</s> pieces (bos_id={self.sp.bos_id()}, "
                             f"eos_id={self.sp.eos_id()}); Emu2 sequences need both")
        self.model_path = path
        self.chat = chat
        self.base_vocab_size: int = self.sp.get_piece_size()
        self.added: tuple[str, ...] = added_tokens(chat)
        self.vocab_size: int = self.base_vocab_size + len(self.added)
        self.ids = SpecialIds.for_base(self.base_vocab_size, bos=self.sp.bos_id(), eos=self.sp.eos_id())
        self._added_ids = {tok: self.base_vocab_size + i for i, tok in enumerate(self.added)}
        clash = [tok for tok in self.added if self.sp.piece_to_id(tok) != self.sp.unk_id()]
        if clash:
            raise ValueError(f"{path} already has pieces named like Emu2's added tokens: {clash[:5]}")
        # Strings recognised inside text: the added tokens and the base model's <s> </s> <unk>.
        self._special_ids = dict(self._added_ids)
        for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()):
            if i >= 0:
                self._special_ids[self.sp.id_to_piece(i)] = i
        alternatives = sorted(self._special_ids, key=len, reverse=True)  # longest match first
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def __repr__(self) -> str:
        return (f"Emu2Tokenizer({str(self.model_path)!r}, chat={self.chat}, "
                f"base_vocab_size={self.base_vocab_size}, vocab_size={self.vocab_size})")

    def encode(self, text: str, bos: bool = False, eos: bool = False, *, special: bool) -> list[int]:
        """Token ids of `text`, after `<s>` if `bos` and before `</s>` if `eos`.

        `special=False` for data text: every character is text, so no id of a special token
        can come out of it. `special=True` for templates the engine writes: special-token
        strings inside `text` map to their ids (see the module docstring). Keyword-only and
        without a default so that every caller states which kind of text it passes."""
        out = [self.ids.bos] if bos else []
        if not special:
            out.extend(self.sp.encode(text))
        else:
            parts = self._split.split(text)
            for i, chunk in enumerate(parts):
                if i % 2:  # re.split with one group: odd entries are the separators
                    out.append(self._special_ids[chunk])
                    continue
                if i > 0 and parts[i - 1] in self._added_ids:  # an added token before it
                    chunk = chunk.lstrip()
                if i < len(parts) - 1 and parts[i + 1] in self._added_ids:  # and after it
                    chunk = chunk.rstrip()
                if chunk:
                    out.extend(self.sp.encode(chunk))
        if eos:
            out.append(self.ids.eos)
        return out

    def decode(self, ids, skip_special: bool = False) -> str:
        """The text of `ids` (any iterable of ints); `skip_special` drops <s>, </s> and the
        added tokens, otherwise they are written as their strings."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside this tokenizer's vocabulary "
                             f"[0, {self.vocab_size}) ({self.base_vocab_size} base pieces + "
                             f"{len(self.added)} added tokens)")
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i < self.base_vocab_size and not self.sp.is_control(i):
                run.append(i)
                continue
            if run:
                parts.append(self.sp.decode(run))
                run = []
            if not skip_special:
                parts.append(self.id_to_token(i))
        if run:
            parts.append(self.sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int:
        """The id of an added token or of a sentencepiece piece (e.g. "▁red"); KeyError if none."""
        if token in self._added_ids:
            return self._added_ids[token]
        i = self.sp.piece_to_id(token)
        if i == self.sp.unk_id() and token != self.sp.id_to_piece(i):
            raise KeyError(f"{token!r} is neither a piece of {self.model_path.name} nor an Emu2 added token")
        return i

    def id_to_token(self, i: int) -> str:
        """The piece or added-token string of id `i`."""
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
        if i < self.base_vocab_size:
            return self.sp.id_to_piece(i)
        return self.added[i - self.base_vocab_size]
