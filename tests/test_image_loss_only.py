"""`data.text_loss = false`: Emu2-Gen's tuning objective, the image regression alone."""

import pytest
import torch

from emu2_engine.data.loader import build_loader, heldout_caption_loader
from emu2_engine.data.tokenizer import Emu2Tokenizer
from emu2_engine.models.config import PRESETS
from emu2_engine.train.config import JobConfig
from emu2_engine.train.trainer import Trainer
from test_trainer_resume import losses, tiny_config  # tests/ is on sys.path

IMAGE_LOSS = ["--data.text_loss=false", "--data.datasets=['image_text']", "--data.weights=[1]",
              "--data.paths=['']", "--data.regress=['image_text']", "--data.image_first_prob=0"]


def test_no_token_is_a_text_target(tmp_path):
    """Every label is -100 and the images after their captions are still regressed; the
    end-of-run check's held-out captions keep their text loss."""
    cfg = JobConfig.load(None, IMAGE_LOSS)
    batch = next(build_loader(cfg.data, Emu2Tokenizer(), PRESETS["debug"]))
    assert bool((batch.labels == -100).all())
    assert batch.reg_images.numel() > 0  # image after caption (image_first_prob = 0): regressed
    held_out = next(heldout_caption_loader(cfg.data, Emu2Tokenizer(), PRESETS["debug"]))
    assert int((held_out.labels != -100).sum()) > 0


def test_the_step_loss_is_the_weighted_regression(tmp_path):
    """Two steps: the cross-entropy is 0, the loss is regression_weight x mse, and the LM head
    gets no gradient while the regression head does."""
    run = tmp_path / "gen"
    trainer = Trainer(tiny_config(run, *IMAGE_LOSS, "--train.steps=2", "--model.regression_weight=2.0"))
    head = trainer.model.lm_head.weight
    before = head.detach().clone()
    assert not head.requires_grad  # frozen: AdamW would still decay it
    trainer.train(progress=False)
    assert torch.equal(head.detach(), before)
    got = losses(run)
    assert sorted(got) == [1, 2]
    for loss, ce, mse, grad_norm in got.values():
        assert ce == 0.0 and mse > 0.0 and loss == pytest.approx(2.0 * mse, rel=1e-6)
    # AdamW's first moment sums the head's gradients over both steps: all zero
    state = trainer.optimizer.state.get(head, {})
    assert "exp_avg" not in state or float(state["exp_avg"].abs().max()) == 0.0
    regress = trainer.model.project_down.weight
    assert float(trainer.optimizer.state[regress]["exp_avg"].abs().max()) > 0.0


@pytest.mark.parametrize("overrides, message", [
    (["--data.text_loss=false"], r"data.text_loss = false leaves the image regression as the only loss, but "
                                 r"data.regress is empty: nothing would be learned"),
    ([*IMAGE_LOSS, "--model.regression_weight=0"], r"but model.regression_weight is 0: nothing would be learned"),
    (["--model.preset=debug-chat", "--data.template=chat", "--data.datasets=['vqa']", "--data.weights=[1]",
      "--data.paths=['']", "--data.text_loss=false"],
     "data.text_loss = false with data.template = chat"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        JobConfig.load(None, overrides)


def test_resume_lays_the_pool_out_again_when_text_loss_or_a_records_samples_change(caplog):
    """A loader state saved with the text loss on and loaded with it off lays its waiting
    records out again (the layout key names text_loss); so does a state whose waiting record
    now gives fewer samples than it did when saved (samples that are now skipped), instead of
    failing on a sample that no longer exists."""
    from emu2_engine.data.records import ImageText, Text
    from test_loader import ListStream, make, pairs

    tok = Emu2Tokenizer()
    long_text = Text("t", " ".join(["a red circle at the top left."] * 60))  # several 64-token chunks
    saved_loader = make(tok, [ListStream([long_text] + pairs(30))], regress=["image_text"], image_first_prob=0.0)
    next(saved_loader)
    state = saved_loader.state_dict()
    assert any(k > 0 for _, _, k in state["pool"])  # a text record's later chunk is waiting

    gen = make(tok, [ListStream([long_text] + pairs(30))], regress=["image_text"], image_first_prob=0.0,
               text_loss=False)
    with caplog.at_level("WARNING"):
        gen.load_state_dict(state)
    assert "text_loss True -> False" in caplog.text or "text_loss None -> False" in caplog.text
    batch = next(gen)
    assert bool((batch.labels == -100).all())

    caplog.clear()
    fewer = make(tok, [ListStream([long_text] + pairs(30))], regress=["image_text"], image_first_prob=0.0)
    build = fewer.builder.build
    fewer.builder.build = lambda record, *a, **k: build(record, *a, **k)[:1]  # one chunk per text now
    with caplog.at_level("WARNING"):
        fewer.load_state_dict(state)
    assert "now give fewer samples" in caplog.text
    next(fewer)
