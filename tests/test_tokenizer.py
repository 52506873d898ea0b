"""Emu2Tokenizer: the shipped shapes-world model, added-token ids, special strings, errors."""

import pytest

from emu2_engine.data import tokens
from emu2_engine.data.shapes import ShapesWorld, tokenizer_corpus
from emu2_engine.data.tokenizer import DEFAULT_MODEL, Emu2Tokenizer
from emu2_engine.data.tokens import SpecialIds
from emu2_engine.data.train_tokenizer import train_sentencepiece


@pytest.fixture(scope="module")
def tok():
    return Emu2Tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return Emu2Tokenizer(chat=True)


def test_special_ids_of_llama_base_match_released_tokenizer():
    ids = SpecialIds.for_base(32000)
    assert (ids.bos, ids.eos) == (1, 2)
    assert (ids.pad, ids.img, ids.img_end, ids.image) == (32000, 32001, 32002, 32003)
    assert (ids.gen_img, ids.gen_img_end, ids.video) == (32004, 32005, 32007)
    assert len(tokens.added_tokens()) == 272 and len(tokens.added_tokens(chat=True)) == 274


def test_shipped_model_sizes(tok, chat_tok):
    assert DEFAULT_MODEL.stat().st_size < 300_000
    assert tok.base_vocab_size == 512 and tok.vocab_size == 784
    assert chat_tok.base_vocab_size == 512 and chat_tok.vocab_size == 786
    assert (tok.sp.unk_id(), tok.sp.bos_id(), tok.sp.eos_id(), tok.sp.pad_id()) == (0, 1, 2, -1)
    assert tok.ids == SpecialIds.for_base(512, bos=1, eos=2)


def test_added_token_ids_follow_the_base(tok, chat_tok):
    base = tok.base_vocab_size
    assert tok.token_to_id("[PAD]") == base
    assert tok.token_to_id("<image>") == base + 3 == tok.ids.image
    assert tok.token_to_id("[VIDEO]") == base + 7 == tok.ids.video
    assert tok.token_to_id("<patch_index_0000>") == base + 15
    assert tok.token_to_id("<patch_index_0256>") == base + 271 == tok.vocab_size - 1
    assert chat_tok.token_to_id("[USER]") == base + 272
    assert chat_tok.token_to_id("[ASSISTANT]") == base + 273
    with pytest.raises(KeyError):
        tok.token_to_id("[USER]")
    for i, t in enumerate(tokens.added_tokens(chat=True)):
        assert chat_tok.id_to_token(base + i) == t
    assert tok.id_to_token(1) == "<s>" and tok.token_to_id("▁red") == tok.encode("red", special=False)[0]


def test_added_ids_follow_any_base_size(tmp_path):
    # A throwaway model of another size: the ids are computed from its piece count.
    path = tmp_path / "small.model"
    path.write_bytes(train_sentencepiece(tokenizer_corpus(0, n_samples=300), vocab_size=400))
    small = Emu2Tokenizer(path, chat=True)
    assert small.base_vocab_size == 400 and small.vocab_size == 674
    assert small.ids == SpecialIds.for_base(400)
    assert small.encode("[IMG]<image>[/IMG][USER]", special=True) == [401, 403, 402, 672]


def test_captions_round_trip_in_word_pieces(tok):
    world = ShapesWorld(5)
    for i in range(100):
        caption = world.caption(i)
        ids = tok.encode(caption, special=False)
        assert tok.decode(ids) == caption
        assert all(3 <= t < tok.base_vocab_size and not tok.sp.is_byte(t) for t in ids)
        assert len(ids) <= len(caption.split()) + caption.count(",") + 1  # one piece per word
    assert tok.encode("a red circle.", bos=True, eos=True, special=False) == [
        1, *tok.encode("a red circle.", special=False), 2]


def test_any_text_encodes_through_byte_fallback(tok):
    text = "Größe: 形 — 42 🙂"
    ids = tok.encode(text, special=False)
    assert tok.sp.unk_id() not in ids
    assert tok.decode(ids) == text


def test_special_strings_inside_text(tok, chat_tok):
    ids = tok.ids
    text = "a red circle"
    assert tok.encode("[IMG]<image><image>[/IMG]" + text, special=True) == [
        ids.img, ids.image, ids.image, ids.img_end, *tok.encode(text, special=False)]
    assert tok.encode("<patch_index_0007></s>", special=True) == [tok.base_vocab_size + 15 + 7, ids.eos]
    chat = "</s>[USER]: how many circles are there? [ASSISTANT]: two."
    encoded = chat_tok.encode(chat, special=True)
    assert encoded[:2] == [2, chat_tok.token_to_id("[USER]")]
    assert chat_tok.token_to_id("[ASSISTANT]") in encoded
    # the whitespace next to a special string is dropped, as the released tokenizer drops it
    assert chat_tok.decode(encoded) == "</s>[USER]: how many circles are there?[ASSISTANT]: two."
    assert encoded == [2, chat_tok.token_to_id("[USER]"),
                       *chat_tok.encode(": how many circles are there?", special=False),
                       chat_tok.token_to_id("[ASSISTANT]"), *chat_tok.encode(": two.", special=False)]
    assert chat_tok.decode(encoded, skip_special=True) == ": how many circles are there?: two."
    # without chat=True, "[USER]" is plain text
    plain = tok.encode("[USER]", special=True)
    assert all(t < tok.base_vocab_size for t in plain) and tok.decode(plain) == "[USER]"


def test_data_text_never_yields_special_ids(tok, chat_tok):
    """special=False: special-token strings written in data are ordinary characters; with
    special=True (templates) the same string gives the markers."""
    caption = "a red </s> circle <image> [IMG] <s> <unk> [USER] <patch_index_0007> x"
    for t in (tok, chat_tok):
        ids = t.encode(caption, special=False)
        specials = {t.ids.bos, t.ids.eos, t.sp.unk_id()} | set(range(t.base_vocab_size, t.vocab_size))
        assert not specials & set(ids)
        assert t.decode(ids) == caption
        assert ids == t.sp.encode(caption)  # sentencepiece on the whole string, nothing split off
    template = tok.encode(caption, special=True)
    assert [i for i in template if i in (tok.ids.eos, tok.ids.image, tok.ids.img, tok.ids.bos)] == [
        tok.ids.eos, tok.ids.image, tok.ids.img, tok.ids.bos]
    with pytest.raises(TypeError, match="special"):
        tok.encode(caption)  # every caller says which kind of text it passes


def test_decode_writes_or_skips_specials(tok):
    ids = tok.encode("[IMG]<image>[/IMG] two squares.", bos=True, eos=True, special=True)
    assert tok.decode(ids) == "<s>[IMG]<image>[/IMG]two squares.</s>"  # (the space next to [/IMG] is dropped)
    assert tok.decode(ids, skip_special=True) == "two squares."


def test_decode_rejects_ids_out_of_range(tok):
    with pytest.raises(ValueError, match=r"token id 784 is outside .*\[0, 784\)"):
        tok.decode([5, 784])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])
    with pytest.raises(ValueError):
        tok.id_to_token(10_000)


def test_missing_model_file(tmp_path):
    path = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="sentencepiece model not found: .*nope/tokenizer.model"):
        Emu2Tokenizer(path)


def test_corrupt_model_file(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match=r"tokenizer.model is not a valid sentencepiece model.*ModelProto"):
        Emu2Tokenizer(path)


def test_shipped_model_is_what_the_script_makes():
    # train_tokenizer is deterministic, and the shipped file is its output for the defaults.
    # If shapes.tokenizer_corpus changes, rerun `python -m emu2_engine.data.train_tokenizer`.
    assert train_sentencepiece(tokenizer_corpus(0)) == DEFAULT_MODEL.read_bytes()


def test_every_added_token_has_its_released_id():
    """Each of the 15 named added tokens, and the two chat tokens, at the id the released
    tokenizer gives it (EMU2_FACTS.md's table), by literal string: a swap of two tokens that
    the engine never emits ([EOC], <REC>) passed the tests that pin only the ones it uses."""
    names = ["[PAD]", "[IMG]", "[/IMG]", "<image>", "[gIMG]", "[/gIMG]", "[EOC]", "[VIDEO]", "<grounding>",
             "<phrase>", "</phrase>", "<object>", "</object>", "</delimiter_of_multi_objects/>", "<REC>"]
    added = tokens.added_tokens(chat=True)
    ids = {token: 32000 + i for i, token in enumerate(added)}   # the added tokens follow a 32000 base
    assert [ids[t] for t in names] == list(range(32000, 32015))
    assert ids["<patch_index_0000>"] == 32015 and ids["<patch_index_0256>"] == 32271
    assert (ids["[USER]"], ids["[ASSISTANT]"]) == (32272, 32273)


def test_template_whitespace_next_to_added_tokens_only_is_dropped(tok, chat_tok):
    """As the released tokenizer (a slow LlamaTokenizer, transformers 4.31, the added tokens
    given as plain strings): the whitespace on both sides of an added token is dropped; next
    to `<s>`, `</s>` and `<unk>` (registered with lstrip/rstrip off) it stays."""
    sp = tok.sp.encode
    assert tok.encode("red [IMG] blue", special=True) == [*sp("red"), tok.ids.img, *sp("blue")]
    assert tok.encode("red </s> blue", special=True) == [*sp("red "), tok.ids.eos, *sp(" blue")]
    assert chat_tok.encode("hi </s>[USER] : x", special=True) == [
        *sp("hi "), chat_tok.ids.eos, chat_tok.token_to_id("[USER]"), *sp(": x")]
