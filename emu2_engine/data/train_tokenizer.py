"""Train the shapes-world sentencepiece model: `python -m emu2_engine.data.train_tokenizer --out PATH`.

The shipped `emu2_engine/data/assets/shapes_sp.model` was made by exactly this command with
the defaults (`--out emu2_engine/data/assets/shapes_sp.model`); rerunning it reproduces the
file byte for byte (one thread, no sampling or shuffling of the input).

The settings follow LLaMA's tokenizer.model, scaled down: BPE, byte fallback (every string
encodes, no `<unk>` in practice), digits split, identity normalisation, whitespace kept as
is, a dummy prefix; `<unk>` = 0, `<s>` = 1, `</s>` = 2, no pad piece (Emu2 adds `[PAD]`
after the base pieces). 512 pieces: 3 control, 256 bytes, the corpus characters, and BPE
merges for the rest, so the debug model's vocabulary is 512 + 272 = 784.
"""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm

from emu2_engine.cli import ArgumentParser
from emu2_engine.data.shapes import tokenizer_corpus

VOCAB_SIZE = 512
DEFAULT_OUT = Path(__file__).parent / "assets" / "shapes_sp.model"


def train_sentencepiece(lines: list[str], vocab_size: int = VOCAB_SIZE) -> bytes:
    """Train a LLaMA-style BPE sentencepiece model on `lines`; returns the serialised model."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=True,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        max_sentence_length=4096,
        minloglevel=2,
    )
    return model.getvalue()


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the .model file")
    parser.add_argument("--seed", type=int, default=0, help="shapes-world seed of the corpus")
    args = parser.parse_args()
    data = train_sentencepiece(tokenizer_corpus(args.seed))
    sp = spm.SentencePieceProcessor(model_proto=data)
    if sp.get_piece_size() != VOCAB_SIZE:
        raise SystemExit(f"trained {sp.get_piece_size()} pieces, expected {VOCAB_SIZE}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"wrote {args.out} ({len(data)} bytes, {sp.get_piece_size()} pieces)")


if __name__ == "__main__":
    main()
