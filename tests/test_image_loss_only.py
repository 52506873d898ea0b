"""`data.text_loss = false`: Emu2-Gen's tuning objective, the image regression alone."""

import pytest

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
    trainer.train(progress=False)
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
