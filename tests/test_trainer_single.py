"""One process (no mesh): the [parallel] section's activation checkpointing and compile still
apply, as they do under torchrun."""

import pytest

from emu2_engine.train.trainer import Trainer
from test_trainer_resume import losses, tiny_config  # tests/ is on sys.path


def test_one_process_applies_activation_checkpointing(tmp_path):
    plain = Trainer(tiny_config(tmp_path / "plain", "--train.steps=2"))
    full = Trainer(tiny_config(tmp_path / "full", "--train.steps=2", "--parallel.activation_checkpoint=full"))
    wrapped = [n for n, _ in full.model.named_parameters() if "_checkpoint_wrapped_module" in n]
    assert wrapped and not any("_checkpoint_wrapped_module" in n for n, _ in plain.model.named_parameters())
    assert all(n.startswith(("visual.blocks.", "llm.layers.")) for n in wrapped)
    plain.train(progress=False)
    full.train(progress=False)
    want, got = losses(tmp_path / "plain"), losses(tmp_path / "full")
    assert sorted(got) == [1, 2]
    for step in want:  # recomputing the blocks' activations changes nothing
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7)


def test_one_process_compiles_every_block(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "compiled", "--parallel.compile=true"))
    blocks = list(trainer.model.visual.blocks.values()) + list(trainer.model.llm.layers.values())
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert trainer.model.lm_head._compiled_call_impl is None  # blocks only, as under torchrun
