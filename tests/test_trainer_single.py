"""One process (no mesh): the [parallel] section's activation checkpointing and compile still
apply, as they do under torchrun."""

import pytest

from emu2_engine.train.trainer import MicroBatches, Trainer
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


def test_micro_batches_are_taken_one_at_a_time(tmp_path):
    """Without pipelining a step takes micro-batch k + 1 from the loader only after micro-batch
    k's forward and backward: one at a time on the device, the prefetcher free to build ahead.
    The counts the step reports are those of the batches it took."""
    trainer = Trainer(tiny_config(tmp_path / "lazy", "--train.steps=1", "--optim.warmup_steps=0", "--parallel.microbatches=3",
                                  "--data.prefetch=0"))
    events, taken, forward = [], [], trainer.model.forward

    class Recording:  # the loader, with every next() recorded
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            return self

        def __next__(self):
            events.append("next")
            taken.append(next(self.loader))
            return taken[-1]

        def __getattr__(self, name):
            return getattr(self.loader, name)

    trainer.loader = Recording(trainer.loader)
    trainer.model.forward = lambda batch: events.append("forward") or forward(batch)
    results, step = [], trainer.step
    trainer.step = lambda batches: results.append(step(batches)) or results[-1]
    trainer.train(progress=False)
    assert events == ["next", "forward"] * 3
    assert sorted(losses(tmp_path / "lazy")) == [1]
    assert results[0].tokens == sum(b.n_tokens for b in taken) > 0
    assert results[0].images == sum(b.n_images for b in taken)


def test_images_cast_to_the_autocast_dtype_change_nothing(tmp_path):
    """Under bf16 autocast the step hands the ViT bf16 images (half the bytes on the device):
    the patch embedding rounds fp32 pixels to bf16 anyway, so the encoder's output is the same,
    bit for bit."""
    import torch

    trainer = Trainer(tiny_config(tmp_path / "bf16", "--train.dtype=bf16", "--data.prefetch=0"))
    batch = next(trainer.loader)
    with trainer.autocast():
        want = trainer.model.visual(batch.images)
        got = trainer.model.visual(batch.images.to(torch.bfloat16))
    assert torch.equal(got, want)
    (moved,) = list(MicroBatches([batch], 1, trainer.device, trainer.batch_flops, trainer.autocast_dtype))
    assert moved.images.dtype == torch.bfloat16 and batch.images.dtype == torch.float32


def test_a_loader_that_ends_mid_step_says_so():
    import torch

    batches = MicroBatches(iter([]), 2, torch.device("cpu"), lambda batch: 0)
    with pytest.raises(RuntimeError, match="the data loader ended after 0 of the step's 2 micro-batches"):
        list(batches)
