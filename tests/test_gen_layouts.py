"""Emu2-Gen's layouts: image edits (`[IMG]source[/IMG]instruction[IMG]edited[/IMG]`) and
grounded text-to-image (the grounded caption, then its image), with what is regressed."""

import numpy as np
import pytest
import torch

from emu2_engine.data.records import Edit, Grounded, Phrase
from emu2_engine.data.sequences import RecordError, SampleBuilder
from emu2_engine.data.tokenizer import Emu2Tokenizer
from emu2_engine.models.config import PRESETS
from emu2_engine.train.config import JobConfig

NQ = 4


@pytest.fixture(scope="module")
def tok():
    return Emu2Tokenizer()


def pixels(value: float) -> torch.Tensor:
    return torch.full((3, 8, 8), value)


def test_edit_layout_regresses_the_edited_image_only(tok):
    builder = SampleBuilder(tok, NQ)
    got = builder.build(Edit("k", pixels(1), "make the red circle blue.", pixels(2)), "0:edit", regress=True)[0]
    image = "[IMG]" + "<image>" * NQ + "[/IMG]"
    assert tok.decode(got.input_ids.tolist()) == f"<s>{image}make the red circle blue.{image}</s>"
    assert got.input_ids.tolist() == tok.encode(f"<s>{image}make the red circle blue.{image}</s>", special=True)
    assert [float(i[0, 0, 0]) for i in got.images] == [1.0, 2.0]
    assert got.regress == [False, True]  # the source has no text before it
    assert got.image_starts == [1, 1 + NQ + 2 + len(tok.encode("make the red circle blue.", special=False))]
    assert tok.decode(got.input_ids[1:][got.text_target[1:]]) == "make the red circle blue.</s>"  # (<s> is never predicted)
    assert builder.build(Edit("k", pixels(1), "x", pixels(2)), "0:edit")[0].regress == [False, False]
    with pytest.raises(RecordError, match="non-blank instruction"):
        builder.build_edit(pixels(1), "  ", pixels(2))


GROUNDED = Grounded("g", pixels(3), "a red circle left of a square",
                    [Phrase(2, 12, [(0.0, 0.0, 0.5, 0.5)]), Phrase(23, 29, [(0.5, 0.5, 1.0, 1.0)])])


def test_grounded_text_to_image_puts_the_image_last(tok):
    """With grounded_image_first = 0 the image follows its grounded caption and is regressed;
    the phrases, boxes and targets are those of the image-first layout."""
    first = SampleBuilder(tok, NQ, seed=5).build(GROUNDED, "0:grounded", regress=True)[0]
    last = SampleBuilder(tok, NQ, seed=5, grounded_image_first_prob=0.0).build(GROUNDED, "0:grounded",
                                                                             regress=True)[0]
    visual = [tok.ids.img] + [tok.ids.image] * NQ + [tok.ids.img_end]
    grounding = tok.token_to_id("<grounding>")
    ids = first.input_ids.tolist()
    caption = ids[1 + len(visual) + 1:-1]  # after <s> [IMG]...[/IMG] <grounding>, before </s>
    assert ids[1:1 + len(visual)] == visual and ids[1 + len(visual)] == grounding
    assert last.input_ids.tolist() == [tok.ids.bos, grounding, *caption, *visual, tok.ids.eos]
    assert first.regress == [False] and last.regress == [True]
    assert last.image_starts == [2 + len(caption)]
    assert tok.decode(first.input_ids[first.text_target]) == tok.decode(last.input_ids[last.text_target])
    assert not last.text_target[1]  # <grounding> is an instruction, not a target
    # the phrase-and-box ranges truncation keeps whole move with the caption
    assert last.keep_whole == [(a - len(visual), b - len(visual)) for a, b in first.keep_whole]


def test_the_default_keeps_the_draws_and_layout_of_grounded_samples(tok):
    """grounded_image_first = 1 (the default) draws nothing more: the phrase-order choices, and
    so every sample, are what they were before the option existed; at 0.5 both layouts occur."""
    default = SampleBuilder(tok, NQ, seed=9)
    explicit = SampleBuilder(tok, NQ, seed=9, grounded_image_first_prob=1.0)
    for key in "abcdefgh":
        record = Grounded(key, pixels(0), GROUNDED.caption, GROUNDED.phrases)
        a, b = default.build(record, "0:grounded")[0], explicit.build(record, "0:grounded")[0]
        assert np.array_equal(a.input_ids, b.input_ids) and a.input_ids[1] == tok.ids.img
    half = SampleBuilder(tok, NQ, seed=9, grounded_image_first_prob=0.5)
    layouts = {int(half.build(Grounded(k, pixels(0), GROUNDED.caption, GROUNDED.phrases), "0:grounded")[0]
                   .input_ids[1]) for k in "abcdefghijklmnop"}
    assert layouts == {tok.ids.img, tok.token_to_id("<grounding>")}


def test_gen_recipe_and_config_checks():
    gen = JobConfig.load(__import__("pathlib").Path(__file__).resolve().parent.parent / "configs" / "gen_37b.toml")
    d = gen.data
    assert d.datasets == ["image_text", "grounded", "edit"] and d.weights == [4096.0, 3584.0, 2048.0]
    assert set(d.regress) == set(d.datasets) and not d.text_loss
    assert d.image_first_prob == 0.0 and d.grounded_image_first == 0.0
    with pytest.raises(ValueError, match=r"data.grounded_image_first must lie in \[0, 1\], got 2.0"):
        JobConfig.load(None, ["--data.grounded_image_first=2"])
    with pytest.raises(ValueError, match=r"chat_template|no chat form"):
        JobConfig.load(None, ["--model.preset=debug-chat", "--data.template=chat", "--data.datasets=['edit']",
                              "--data.weights=[1]", "--data.paths=['']"])


def test_edit_loader_on_the_shapes_world():
    """Edits of the shapes world, image loss only: every micro-batch regresses the edited images
    and nothing else; no label is set."""
    from emu2_engine.data.loader import build_loader

    cfg = JobConfig.load(None, ["--data.datasets=['edit']", "--data.weights=[1]", "--data.paths=['']",
                                "--data.regress=['edit']", "--data.text_loss=false"])
    batch = next(build_loader(cfg.data, Emu2Tokenizer(), PRESETS["debug"]))
    real = int(batch.image_mask.sum())
    assert real >= 2 and real % 2 == 0 and batch.reg_images.numel() == real // 2
    assert (batch.reg_images % 2 == 1).all()  # the second image of each edit (sources first)
    assert bool((batch.labels == -100).all())


def test_the_gen_recipe_draws_batches_that_regress_every_kind():
    """gen_37b's data settings (paths emptied: the shapes world) at the 37B model's shapes: every
    micro-batch has regressed images and no label, from each of its three kinds over a few."""
    from emu2_engine.data.loader import build_loader

    path = __import__("pathlib").Path(__file__).resolve().parent.parent / "configs" / "gen_37b.toml"
    cfg = JobConfig.load(path, ["--data.paths=['', '', '']"])
    loader = build_loader(cfg.data, Emu2Tokenizer(), PRESETS["emu2-37b"])
    for _ in range(3):
        batch = next(loader)
        assert batch.reg_images.numel() > 0 and bool((batch.labels == -100).all())
    assert not loader.skip_counts()  # nothing skipped: every sample has an image to regress
    assert (loader.blend.taken > 0).all()  # samples of each of the three kinds were drawn


def test_an_image_loss_only_blend_must_regress_every_dataset():
    with pytest.raises(ValueError, match=r"the datasets \['text'\] never give a regressed image"):
        JobConfig.load(None, ["--data.text_loss=false", "--data.datasets=['image_text', 'text']",
                              "--data.weights=[1, 1]", "--data.paths=['', '']", "--data.regress=['image_text']"])
    with pytest.raises(ValueError, match=r"the datasets \['grounded'\] never give a regressed image"):
        JobConfig.load(None, ["--data.text_loss=false", "--data.datasets=['grounded']", "--data.weights=[1]",
                              "--data.paths=['']", "--data.regress=['grounded']"])  # grounded image first
