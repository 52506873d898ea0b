"""Sequence builders (the Emu2 layout of every sample type, token by token), truncation, and
collation into the PackedBatch contract."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from emu2_engine.data.packing import collate_packed
from emu2_engine.data.records import VQA, Grounded, ImageText, Interleaved, Phrase, Text, VideoText
from emu2_engine.data.sequences import (CLIP_MEAN, CLIP_STD, RecordError, Sample, SampleBuilder,
                                        box_to_patch_indices, sample_rng, to_pixels, truncate_sample)
from emu2_engine.data.shapes import ShapesWorld
from emu2_engine.data.tokenizer import Emu2Tokenizer

NQ, SIZE = 4, 8


@pytest.fixture(scope="module")
def tok():
    return Emu2Tokenizer()


@pytest.fixture(scope="module")
def builder(tok):
    return SampleBuilder(tok, NQ, seed=0)


def pixels(value: float) -> torch.Tensor:
    return torch.full((3, SIZE, SIZE), value)


def marks(tok):
    """Ids of the markers, by their released names, for the shipped 512-piece tokenizer."""
    ids = tok.ids
    return dict(s=ids.bos, e=ids.eos, I=ids.img, E=ids.img_end, X=ids.image, G=ids.gen_img,
                V=ids.video, **{name: tok.token_to_id(t) for name, t in (
                    ("grounding", "<grounding>"), ("p", "<phrase>"), ("_p", "</phrase>"),
                    ("o", "<object>"), ("_o", "</object>"),
                    ("delim", "</delimiter_of_multi_objects/>"))})


def patch(tok, i):
    return tok.token_to_id(f"<patch_index_{i:04d}>")


def test_released_ids_with_llama_sized_base(tok):
    """With LLaMA's 32000 pieces the markers land on the released ids (EMU2_FACTS.md); our
    builders take every id from the tokenizer, so they emit exactly those."""
    from emu2_engine.data.tokens import SpecialIds, added_tokens
    ids = SpecialIds.for_base(32000)
    assert (ids.pad, ids.img, ids.img_end, ids.image, ids.gen_img, ids.video) == (
        32000, 32001, 32002, 32003, 32004, 32007)
    at = {t: 32000 + i for i, t in enumerate(added_tokens())}
    assert [at[t] for t in ("<grounding>", "<phrase>", "</phrase>", "<object>", "</object>",
                            "</delimiter_of_multi_objects/>")] == [32008, 32009, 32010, 32011, 32012, 32013]
    assert at["<patch_index_0000>"] == 32015 and at["<patch_index_0256>"] == 32271
    # the shipped tokenizer: the same order after its 512 pieces
    assert tok.token_to_id("<grounding>") == 512 + 8 and patch(tok, 0) == 512 + 15


def test_image_text_layouts(tok, builder):
    m, cap = marks(tok), tok.encode("a red circle.", special=False)
    s = builder.build_image_text(pixels(0), "a red circle.", image_first=True)
    assert s.input_ids.tolist() == [m["s"], m["I"], *[m["X"]] * NQ, m["E"], *cap, m["e"]]
    assert s.text_target.tolist() == [True, False, *[False] * NQ, False, *[True] * len(cap), True]
    assert s.image_starts == [1] and s.regress == [False] and s.bidirectional == [False]
    # regressed only when text precedes the image
    assert builder.build_image_text(pixels(0), "a red circle.", True, regress=True).regress == [False]
    s = builder.build_image_text(pixels(0), "a red circle.", image_first=False, regress=True)
    assert s.input_ids.tolist() == [m["s"], *cap, m["I"], *[m["X"]] * NQ, m["E"], m["e"]]
    assert s.image_starts == [1 + len(cap)] and s.regress == [True] and len(s) == len(cap) + NQ + 4
    bi = SampleBuilder(tok, NQ, bidirectional=True)
    assert bi.build_image_text(pixels(0), "x", True).bidirectional == [True]
    s = bi.build_image_text(pixels(0), "x", False, regress=True)
    assert s.regress == [True] and s.bidirectional == [False]  # never both


def test_video_text_layout(tok, builder):
    m, cap = marks(tok), tok.encode("a ball moves.", special=False)
    frames = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, SIZE, SIZE)
    frame = [m["I"], *[m["G"]] * NQ, m["E"]]
    s = builder.build_video_text(frames, "a ball moves.", video_first=True)
    assert s.input_ids.tolist() == [m["s"], m["V"], *frame * 3, *cap, m["e"]]
    assert s.image_starts == [2, 2 + NQ + 2, 2 + 2 * (NQ + 2)]
    assert [float(f[0, 0, 0]) for f in s.images] == [0.0, 1.0, 2.0]
    assert s.text_target.tolist() == [True] + [False] * (1 + 3 * (NQ + 2)) + [True] * (len(cap) + 1)
    assert s.keep_whole == [(1, 2 + 3 * (NQ + 2))]
    s = builder.build_video_text(frames, "a ball moves.", video_first=False, regress=True)
    assert s.input_ids.tolist() == [m["s"], *cap, m["V"], *frame * 3, m["e"]]
    assert s.regress == [True] * 3
    with pytest.raises(RecordError, match="frames of shape"):
        builder.build_video_text(torch.zeros(0, 3, SIZE, SIZE), "x", True)


def test_box_quantisation_hand_values():
    """16 x 16 cells; top-left cell floor(x * 16), bottom-right cell ceil(x * 16 - 1)."""
    assert box_to_patch_indices((0.0, 0.0, 1.0, 1.0)) == (0, 255)
    assert box_to_patch_indices((0.1, 0.2, 0.3, 0.4)) == (3 * 16 + 1, 6 * 16 + 4)  # 49, 100
    assert box_to_patch_indices((0.5, 0.5, 0.75, 1.0)) == (8 * 16 + 8, 15 * 16 + 11)
    # a box inside one cell, and one ending exactly on a cell edge (that cell is not included)
    assert box_to_patch_indices((0.51, 0.01, 0.55, 0.05)) == (8, 8)
    assert box_to_patch_indices((0.0, 0.0, 0.125, 0.125)) == (0, 16 + 1)
    for bad in [(0.5, 0.1, 0.5, 0.2), (0.1, 0.1, 1.2, 0.2), (-0.1, 0.0, 0.5, 0.5), (0.3, 0.4, 0.2, 0.5)]:
        with pytest.raises(RecordError, match="must be"):
            box_to_patch_indices(bad)


def test_grounded_layout(tok, builder):
    m = marks(tok)
    cap = "a picture of a red circle and two blue squares."
    phrases = [Phrase(30, 46, [(0.0, 0.0, 1.0, 1.0), (0.5, 0.5, 0.75, 1.0)]),  # out of order on purpose
               Phrase(13, 25, [(0.1, 0.2, 0.3, 0.4)])]
    s = builder.build_grounded(pixels(0), cap, phrases, phrase_first=[False, True])
    enc = lambda text: tok.encode(text, special=False)  # noqa: E731
    circle = [m["p"], *enc("a red circle"), m["_p"], m["o"], patch(tok, 49), patch(tok, 100), m["_o"]]
    squares = [m["o"], patch(tok, 0), patch(tok, 255), m["delim"], patch(tok, 136), patch(tok, 251),
               m["_o"], m["p"], *enc("two blue squares"), m["_p"]]
    head = [m["s"], m["I"], *[m["X"]] * NQ, m["E"], m["grounding"]]
    expected = head + enc("a picture of") + circle + enc("and") + squares + enc(".") + [m["e"]]
    assert s.input_ids.tolist() == expected
    target = [False] * len(head) + [True] * (len(expected) - len(head))
    target[0] = True  # <s> (never a target in practice: nothing precedes it)
    assert s.text_target.tolist() == target
    a = len(head) + 3
    assert s.keep_whole == [(a, a + len(circle)), (a + len(circle) + 1, a + len(circle) + 1 + len(squares))]
    with pytest.raises(RecordError, match="out of range or overlaps"):
        builder.build_grounded(pixels(0), cap, [Phrase(13, 25, [(0, 0, 1, 1)]), Phrase(20, 30, [(0, 0, 1, 1)])],
                               [True, True])
    with pytest.raises(RecordError, match="has no box"):
        builder.build_grounded(pixels(0), cap, [Phrase(13, 25, [])], [True])


def test_interleaved_layout_and_regression(tok, builder):
    m = marks(tok)
    image = [m["I"], *[m["X"]] * NQ, m["E"]]
    texts = ["first sentence.", "second one.", "third."]
    s = builder.build_interleaved(texts, [pixels(0), pixels(1), pixels(2)], [0, 2, 2],
                                  image_first=[True, False, True], regress=True)
    t = [tok.encode(x, special=False) for x in texts]
    assert s.input_ids.tolist() == [m["s"], *image, *t[0], *t[1], *image, *t[2], *image, m["e"]]
    # images in sequence order: image 0, then image 2 (before sentence 2), then image 1
    assert [float(x[0, 0, 0]) for x in s.images] == [0.0, 2.0, 1.0]
    assert s.regress == [False, True, True]  # the first image has no text before it


def test_interleaved_selects_a_window_of_images(tok):
    b = SampleBuilder(tok, NQ, interleaved_images=2)
    rec = Interleaved("doc", texts=["t0", "t1", "t2", "t3", "t4", "t5"],
                      images=[pixels(i) for i in range(5)], image_at=[0, 1, 1, 3, 5])
    windows = set()
    for seed in range(40):
        texts, images, at = b.select_interleaved(rec, np.random.default_rng(seed))
        windows.add((tuple(texts), tuple(float(x[0, 0, 0]) for x in images), tuple(at)))
    assert windows == {
        (("t0", "t1"), (0.0, 1.0), (0, 1)),             # image 2 (also on t1) left out
        (("t1", "t2"), (1.0, 2.0), (0, 0)),             # t2 has no image: kept up to image 3's t3
        (("t1", "t2", "t3", "t4"), (2.0, 3.0), (0, 2)),  # starts at image 2's sentence t1
        (("t2", "t3", "t4", "t5"), (3.0, 4.0), (1, 3)),
    }
    with pytest.raises(RecordError, match="image attached to sentence 7"):
        b.select_interleaved(Interleaved("bad", ["a"], [pixels(0)], [7]), np.random.default_rng(0))


def test_interleaved_is_cut_at_its_token_budget_between_images(tok):
    b = SampleBuilder(tok, NQ, interleaved_len=24)
    texts = ["one two three four five six seven eight.", "nine ten.", "eleven twelve."]
    s = b.build_interleaved(texts, [pixels(0), pixels(1)], [0, 1], [True, True])
    assert len(s) <= 24 and s.input_ids[-1] == tok.ids.eos and not s.text_target[-1]
    assert len(s.images) == 1  # the second image would have straddled the cut
    assert tok.ids.img not in s.input_ids[s.image_starts[0] + 1:].tolist()


def test_text_chunks(tok):
    b = SampleBuilder(tok, NQ, text_len=6)
    text = "one two three four five six seven eight nine"
    body = tok.encode(text, special=False)
    chunks = b.build_text(text)
    assert [c.input_ids.tolist() for c in chunks] == [
        [1, *body[i:i + 4], 2] for i in range(0, len(body), 4)]
    assert all(len(c) <= 6 and not c.images for c in chunks)
    # only the document's real end is a target
    assert [bool(c.text_target[-1]) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [c.input_ids.tolist() for c in b.build_text("")] == [[1, 2]]


def test_vqa_prompts(tok, builder):
    m = marks(tok)
    image = [m["I"], *[m["X"]] * NQ, m["E"]]
    q = "how many circles are there?"
    zero = tok.encode(f"based on the picture, answer in one word or phrase. {q} short answer:",
                      special=False)
    s = builder.build_vqa(pixels(0), q)
    assert s.input_ids.tolist() == [m["s"], *image, *zero]  # a prompt: no </s>
    assert not s.text_target.any()
    shot = tok.encode("based on the picture, what colour? short answer: red.", special=False)
    few = tok.encode(f"based on the picture, {q} short answer:", special=False)
    s = builder.build_vqa(pixels(0), q, answer="two", shots=[(pixels(1), "what colour?", "red")])
    two = tok.encode("two", special=False)
    assert s.input_ids.tolist() == [m["s"], *image, *shot, *image, *few, *two, m["e"]]
    assert s.text_target.tolist() == [False] * (len(s) - 2) + [True, True]
    assert s.image_starts == [1, 1 + len(image) + len(shot)]
    assert [float(x[0, 0, 0]) for x in s.images] == [1.0, 0.0]


def test_special_strings_in_data_stay_text(tok, builder):
    """Captions, sentences, plain text, questions and answers are data: "</s>", "<image>",
    "[IMG]" written in them are encoded as characters, so the only marker ids in a sample are
    the ones the builder placed (and image slots are found where the images are)."""
    m = marks(tok)
    bad = "a red </s> circle <image> [IMG] x"
    cap = tok.encode(bad, special=False)
    specials = {tok.ids.bos, tok.ids.eos, tok.sp.unk_id()} | set(range(tok.base_vocab_size, tok.vocab_size))
    assert cap and not specials & set(cap)
    s = builder.build_image_text(pixels(0), bad, image_first=False, regress=True)
    assert s.input_ids.tolist() == [m["s"], *cap, m["I"], *[m["X"]] * NQ, m["E"], m["e"]]
    assert s.text_target.tolist() == [True] * (1 + len(cap)) + [False] * (NQ + 2) + [True]
    assert s.image_starts == [1 + len(cap)] and s.regress == [True]

    def placed_only(sample, image_slots):
        """Marker ids only at the builder's own positions: <s> first, </s> last, slots where
        the sample's images start."""
        ids = sample.input_ids.tolist()
        at = [i for i, t in enumerate(ids) if t in specials]
        slots = [i for i, t in enumerate(ids) if t == image_slots]
        assert slots == [a + 1 + k for a in sample.image_starts for k in range(NQ)]
        return at

    frames = torch.zeros(2, 3, SIZE, SIZE)
    video = builder.build_video_text(frames, bad, video_first=False)
    assert video.input_ids.tolist()[1:1 + len(cap)] == cap
    placed_only(video, m["G"])
    doc = builder.build_interleaved([bad, "b"], [pixels(0)], [0], [False])
    assert doc.input_ids.tolist()[1:1 + len(cap)] == cap
    assert placed_only(doc, m["X"]) == [0, *range(1 + len(cap), 1 + len(cap) + NQ + 2), len(doc) - 1]
    text = builder.build_text(bad)
    assert [c.input_ids.tolist() for c in text] == [[m["s"], *cap, m["e"]]]
    phrase = Phrase(len(bad) + 1, len(bad) + 11, [(0, 0, 1, 1)])  # "red circle"
    grounded = builder.build_grounded(pixels(0), bad + " red circle", [phrase], [True])
    assert grounded.input_ids.tolist()[NQ + 4:NQ + 4 + len(cap)] == cap
    vqa = builder.build_vqa(pixels(0), "is there an <image> or a </s>?", answer="no </s> [IMG]")
    assert placed_only(vqa, m["X"]) == [0, *range(1, NQ + 3), len(vqa) - 1]
    answer = tok.encode("no </s> [IMG]", special=False)
    assert vqa.input_ids.tolist()[-len(answer) - 1:] == [*answer, m["e"]]


def test_build_draws_are_a_function_of_seed_dataset_and_key(tok):
    b = SampleBuilder(tok, NQ, seed=3)
    rec = ImageText("k1", pixels(0), "a red circle.")
    first = [b.build(ImageText(f"k{i}", pixels(0), "a red circle."), "0:image_text")[0].image_starts[0] == 1
             for i in range(400)]
    assert abs(np.mean(first) - 0.5) < 0.08  # p = 0.5
    again = SampleBuilder(tok, NQ, seed=3)
    for ds in ("0:image_text", "1:image_text"):
        assert np.array_equal(b.build(rec, ds)[0].input_ids, again.build(rec, ds)[0].input_ids)
    draws = {bool(sample_rng(s, "0:image_text", "k1").random() < 0.5) for s in range(20)}
    assert draws == {True, False}  # the seed matters
    # the epoch matters too: each pass over the data lays a sample out afresh; epoch 0 is the
    # epoch-free draw
    assert sample_rng(3, "0:image_text", "k1", 0).random() == sample_rng(3, "0:image_text", "k1").random()
    by_epoch = [[b.build(ImageText(f"k{i}", pixels(0), "a red circle."), "0:image_text", epoch=e)[0]
                 .image_starts[0] == 1 for i in range(200)] for e in (0, 1)]
    assert 0.3 < np.mean(np.array(by_epoch[0]) != np.array(by_epoch[1])) < 0.7  # independent draws
    assert np.array_equal(b.build(rec, "0:image_text", epoch=1)[0].input_ids,
                          again.build(rec, "0:image_text", epoch=1)[0].input_ids)
    phrase = tok.token_to_id("<phrase>")
    p_first = [b.build(Grounded(f"g{i}", pixels(0), "a red circle", [Phrase(0, 12, [(0, 0, 1, 1)])]),
                       "0:grounded")[0].input_ids[NQ + 4] == phrase for i in range(400)]
    assert abs(np.mean(p_first) - 0.7) < 0.08  # p = 0.7


def test_build_dispatches_every_record_type(tok):
    b = SampleBuilder(tok, NQ, text_len=8)
    frames = torch.zeros(2, 3, SIZE, SIZE)
    out = {
        "image": b.build(ImageText("a", pixels(0), "x"), "d"),
        "video": b.build(VideoText("b", frames, "x"), "d"),
        "doc": b.build(Interleaved("c", ["x", "y"], [pixels(0)], [1]), "d"),
        "grounded": b.build(Grounded("e", pixels(0), "x", [Phrase(0, 1, [(0, 0, 1, 1)])]), "d"),
        "text": b.build(Text("f", "one two three four five six seven eight"), "d"),
        "vqa": b.build(VQA("g", pixels(0), "how many?", ["two", "three", "two"]), "d"),
    }
    n_chunks = -(-len(tok.encode("one two three four five six seven eight", special=False)) // 6)
    assert n_chunks > 1 and [len(v) for v in out.values()] == [1, 1, 1, 1, n_chunks, 1]
    assert [len(v[0].images) for v in out.values()] == [1, 2, 1, 1, 0, 1]
    vqa = out["vqa"][0]
    most_common = tok.encode("two", special=False)
    assert vqa.input_ids[-2:].tolist() == [*most_common, tok.ids.eos]  # the most common answer
    with pytest.raises(TypeError, match="no sequence builder for str"):
        b.build("not a record", "d")


def test_truncate_never_cuts_an_image_or_a_kept_range(tok, builder):
    m = marks(tok)
    s = builder.build_interleaved(["one two three.", "four five.", "six."], [pixels(0), pixels(1)], [0, 1],
                                  [False, False])
    first_end = s.image_starts[0] + NQ + 2
    # a cut that would fall inside the second image moves to its start
    cut = truncate_sample(s, s.image_starts[1] + 3, m["e"], NQ)
    assert cut.input_ids.tolist() == s.input_ids[:s.image_starts[1]].tolist() + [m["e"]]
    assert len(cut.images) == 1 and cut.image_starts == s.image_starts[:1]
    assert not cut.text_target[-1] and cut.text_target[:-1].tolist() == s.text_target[:s.image_starts[1]].tolist()
    # a cut between text tokens stays where it is
    assert len(truncate_sample(s, first_end + 2, m["e"], NQ)) == first_end + 2
    assert truncate_sample(s, len(s), m["e"], NQ) is s
    # a video is kept whole; nothing left but <s> -> None
    v = builder.build_video_text(torch.zeros(3, 3, SIZE, SIZE), "a ball.", video_first=True)
    assert truncate_sample(v, 2 * (NQ + 2) + 5, m["e"], NQ) is None
    cap_first = builder.build_video_text(torch.zeros(3, 3, SIZE, SIZE), "a ball.", video_first=False)
    cut = truncate_sample(cap_first, len(cap_first) - 3, m["e"], NQ)
    ball = tok.encode("a ball.", special=False)
    assert cut.input_ids.tolist() == [m["s"], *ball, m["e"]] and cut.images == []


def test_hand_checked_packing(tok):
    """Row 0: an image-first sample then a caption-first regressed one, then padding.
    Row 1: an image-first bidirectional sample, then padding; images padded to 4."""
    P, s, e, I, E, X = 512, 1, 2, 513, 514, 515  # [PAD] <s> </s> [IMG] [/IMG] <image>
    piece = tok.token_to_id
    a, red, circle, dot = piece("▁a"), piece("▁red"), piece("▁circle"), piece(".")
    two, squares, blue, square = piece("▁two"), piece("▁squares"), piece("▁blue"), piece("▁square")
    causal, bidirectional = SampleBuilder(tok, NQ), SampleBuilder(tok, NQ, bidirectional=True)
    samples = [
        causal.build_image_text(pixels(0), "a red circle.", image_first=True),
        causal.build_image_text(pixels(1), "two squares.", image_first=False, regress=True),
        bidirectional.build_image_text(pixels(2), "a blue square.", image_first=True),
    ]
    batch = collate_packed(samples, [[0, 1], [2]], seq_len=26, ids=tok.ids, n_query=NQ, image_size=SIZE,
                           max_images=4)
    batch.validate(tok.vocab_size, NQ, SIZE)
    N = -100
    assert batch.input_ids.tolist() == [
        [s, I, X, X, X, X, E, a, red, circle, dot, e,   # doc 0, positions 0-11
         s, two, squares, dot, I, X, X, X, X, E, e,     # doc 1, positions 12-22
         P, P, P],
        [s, I, X, X, X, X, E, a, blue, square, dot, e] + [P] * 14,
    ]
    assert batch.labels.tolist() == [
        [N, N, N, N, N, N, a, red, circle, dot, e, N,
         two, squares, dot, N, N, N, N, N, N, e, N,
         N, N, N],
        [N, N, N, N, N, N, a, blue, square, dot, e, N] + [N] * 14,
    ]
    assert batch.doc_ids.tolist() == [[0] * 12 + [1] * 11 + [-1] * 3, [0] * 12 + [-1] * 14]
    assert batch.position_ids.tolist() == [list(range(12)) + list(range(11)) + [0] * 3,
                                           list(range(12)) + [0] * 14]
    assert batch.span_ids.tolist() == [[-1] * 26, [-1, -1, 2, 2, 2, 2] + [-1] * 20]
    assert batch.image_slots.tolist() == [[2, 3, 4, 5], [17, 18, 19, 20], [28, 29, 30, 31], [-1] * 4]
    assert batch.image_mask.tolist() == [True, True, True, False] and batch.n_images == 3
    assert batch.reg_images.tolist() == [1]
    assert batch.reg_positions.tolist() == [[16, 17, 18, 19]]
    assert batch.images.shape == (4, 3, SIZE, SIZE) and batch.images.dtype == torch.float32
    assert batch.images[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 0.0]
    for name in ("doc_ids", "span_ids", "position_ids"):
        assert getattr(batch, name).dtype == torch.int32
    for name in ("input_ids", "labels", "image_slots", "reg_images", "reg_positions"):
        assert getattr(batch, name).dtype == torch.int64
    assert batch.n_tokens == 35
    with pytest.raises(ValueError, match="hold 3 images, more than max_images = 2"):
        collate_packed(samples, [[0, 1], [2]], seq_len=26, ids=tok.ids, n_query=NQ, image_size=SIZE,
                       max_images=2)


def test_video_and_grounding_labels_after_collation(tok):
    """[VIDEO], [IMG], [gIMG], [/IMG] and <grounding> are never label targets; grounding
    tokens after the instruction are."""
    b = SampleBuilder(tok, NQ)
    m = marks(tok)
    samples = [b.build_video_text(torch.zeros(2, 3, SIZE, SIZE), "a ball.", video_first=False),
               b.build_grounded(pixels(0), "a cat", [Phrase(0, 5, [(0, 0, 1, 1)])], [True])]
    batch = collate_packed(samples, [[0, 1]], seq_len=64, ids=tok.ids, n_query=NQ, image_size=SIZE)
    labels = batch.labels[0][batch.labels[0] != -100].tolist()
    for marker in ("V", "I", "E", "X", "G", "grounding"):
        assert m[marker] not in labels
    assert {m["p"], m["_p"], m["o"], m["_o"], patch(tok, 0), patch(tok, 255)} <= set(labels)
    assert (batch.input_ids.flatten()[batch.image_slots[:2]] == m["G"]).all()


def test_no_images_and_empty_rows(tok):
    two, dot = tok.encode("two.", special=False)
    sample = Sample(input_ids=np.array([1, two, dot, 2]), text_target=np.ones(4, dtype=bool))
    batch = collate_packed([sample], [[0], []], seq_len=5, ids=tok.ids, n_query=NQ, image_size=SIZE)
    batch.validate(tok.vocab_size, NQ, SIZE)
    assert batch.images.shape == (0, 3, SIZE, SIZE) and batch.image_mask.shape == (0,)
    assert batch.image_slots.shape == (0, NQ) and batch.reg_positions.shape == (0, NQ)
    assert batch.reg_images.shape == (0,)
    assert batch.labels.tolist() == [[two, dot, 2, -100, -100], [-100] * 5]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0], [0] * 5]
    assert batch.doc_ids[1].tolist() == [-1] * 5


def test_row_longer_than_seq_len(tok, builder):
    samples = [builder.build_image_text(pixels(0), "a red circle.", image_first=True)] * 2
    with pytest.raises(ValueError, match=r"row 0 holds 24 tokens .* seq_len is 20"):
        collate_packed(samples, [[0, 1]], seq_len=20, ids=tok.ids, n_query=NQ, image_size=SIZE)


def test_bad_samples_are_rejected(tok, builder):
    good = builder.build_image_text(pixels(0), "a red circle.", image_first=True)
    with pytest.raises(ValueError, match=r"image of shape \(3, 8, 8\), expected \(3, 16, 16\)"):
        collate_packed([good], [[0]], seq_len=16, ids=tok.ids, n_query=NQ, image_size=16)
    with pytest.raises(ValueError, match=r"has 4 slots; an image takes n_query = 5, only a video frame"):
        collate_packed([good], [[0]], seq_len=16, ids=tok.ids, n_query=5, image_size=SIZE)
    with pytest.raises(ValueError, match=r"not \[IMG\] \+ 3 slots"):  # without n_slots: n_query each
        collate_packed([replace(good, n_slots=[])], [[0]], seq_len=16, ids=tok.ids, n_query=3,
                       image_size=SIZE)
    short = SampleBuilder(tok, NQ, interleaved_len=7)  # refused where it is used: documents
    short.build_image_text(pixels(0), "a red circle.", image_first=True)
    with pytest.raises(ValueError, match="interleaved_len .* cannot hold one image"):
        short.build_interleaved(["a red circle."], [pixels(0)], [0], [True])


def test_collated_shapes_world_batch_is_consistent(tok):
    world, rng, size, nq = ShapesWorld(0), np.random.default_rng(0), 32, 16
    causal, bidirectional = SampleBuilder(tok, nq), SampleBuilder(tok, nq, bidirectional=True)
    samples = []
    for i in range(12):
        sample = world.sample(i, size)
        first = bool(rng.random() < 0.5) if i % 3 else False  # regressed ones follow their caption
        b = bidirectional if i % 3 == 1 else causal
        samples.append(b.build_image_text(to_pixels(sample.image, size), sample.caption, first,
                                          regress=i % 3 == 0))
    rows = [[0, 1, 2], [3, 4, 5, 6], [7], [8, 9, 10, 11]]
    batch = collate_packed(samples, rows, seq_len=256, ids=tok.ids, n_query=nq, image_size=size)
    batch.validate(tok.vocab_size, nq, size)
    flat_ids = batch.input_ids.flatten()
    assert (flat_ids[batch.image_slots] == tok.ids.image).all()
    assert batch.images.shape[0] == 12 and batch.reg_images.tolist() == [0, 3, 6, 9]
    assert (flat_ids[batch.reg_positions[:, 0]] == tok.ids.img).all()
    assert torch.equal(batch.reg_positions[:, 1:], batch.image_slots[batch.reg_images, :-1])
    # every label is the next token of the same document, and a text token
    b, t = torch.nonzero(batch.labels != -100, as_tuple=True)
    assert torch.equal(batch.labels[b, t], batch.input_ids[b, t + 1])
    assert torch.equal(batch.doc_ids[b, t], batch.doc_ids[b, t + 1])
    visual = torch.tensor([tok.ids.img, tok.ids.image, tok.ids.img_end, tok.ids.pad])
    assert not torch.isin(batch.labels[b, t], visual).any()
    # caption tokens and </s> are all predicted: labels count = text tokens minus one <s> per doc
    text = (batch.doc_ids >= 0) & ~torch.isin(batch.input_ids, torch.tensor(
        [tok.ids.img, tok.ids.image, tok.ids.img_end]))
    assert int((batch.labels != -100).sum()) == int(text.sum()) - 12
    # bidirectional spans: exactly the slots of images 1, 4, 7, 10
    spans = batch.span_ids.flatten()
    assert sorted(set(spans[spans >= 0].tolist())) == [1, 4, 7, 10]
    for n in (1, 4, 7, 10):
        assert torch.equal(torch.nonzero(spans == n).flatten(), batch.image_slots[n])
    assert torch.equal(batch.images[5], to_pixels(world.sample(5, size).image, size))


def test_to_pixels_resizes_and_normalises():
    white = Image.new("RGB", (40, 30), (255, 255, 255))
    x = to_pixels(white, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(x, torch.tensor(expected).view(3, 1, 1).expand(3, 16, 16), atol=1e-5)
    grey = to_pixels(Image.new("L", (16, 16), 0), 16)  # converted to RGB, not resized
    assert torch.allclose(grey[:, 0, 0], torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)]))
