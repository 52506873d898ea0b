"""train.weight_cast = step: the blocks' linear weights cast once per step, their gradients
accumulated in fp32 by hooks (`emu2_engine/train/weight_cast.py`). Same numbers as autocast
casting them at every use, bit for bit."""

import pytest
import torch
import torch.nn as nn

from emu2_engine.train.config import JobConfig
from emu2_engine.train.trainer import Trainer
from emu2_engine.train.weight_cast import StepWeightCast, block_linear_parameters
from test_trainer_resume import tiny_config  # tests/ is on sys.path


def _train(tmp_path, name: str, *extra: str) -> tuple[Trainer, list]:
    trainer = Trainer(tiny_config(tmp_path / name, "--train.dtype=bf16", "--data.prefetch=0",
                                  "--optim.warmup_steps=0", "--parallel.microbatches=3", *extra))
    results = []
    for _ in range(3):
        batches = trainer.micro_batches(trainer.loader, trainer.cfg.parallel.microbatches)
        results.append(trainer.step(batches))
    return trainer, results


def test_step_cast_gives_the_per_use_casts_numbers_bit_for_bit(tmp_path):
    """Three optimiser steps of three micro-batches each under bf16 autocast: the losses, the
    gradient norms and every parameter afterwards are identical between the two ways."""
    op, op_results = _train(tmp_path, "op", "--train.weight_cast=op")
    step, step_results = _train(tmp_path, "step", "--train.weight_cast=step")
    assert op.weight_cast is None
    assert step.weight_cast is not None and len(step.weight_cast.params) > 0
    for a, b in zip(op_results, step_results):
        assert (a.loss, a.ce, a.mse, a.grad_norm) == (b.loss, b.ce, b.mse, b.grad_norm)
    want = dict(op.model.named_parameters())
    for name, p in step.model.named_parameters():
        assert p.dtype == torch.float32, name
        assert torch.equal(p, want[name]), name
    # the optimiser's state is fp32 and the same too
    for (pa, sa), (pb, sb) in zip(op.optimizer.state.items(), step.optimizer.state.items()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and sb["exp_avg"].dtype == torch.float32


def test_which_parameters_are_cast(tmp_path):
    """The weights and biases of the blocks' linear layers, nothing else: not the norms, the
    embeddings, the heads or the ViT's q/v biases (those are added inside the attention)."""
    trainer = Trainer(tiny_config(tmp_path / "run", "--train.dtype=bf16"))
    cast = {id(p) for p in trainer.weight_cast.params}
    names = {n for n, p in trainer.model.named_parameters() if id(p) in cast}
    assert names and all(n.startswith(("visual.blocks.", "llm.layers.")) for n in names)
    assert any(n.endswith("mlp.fc1.bias") for n in names)
    assert not any("norm" in n or n.endswith(("q_bias", "v_bias")) for n in names)
    assert "llm.embed_tokens.weight" not in names and "lm_head.weight" not in names
    # no autocast (fp32 on the CPU): nothing to cast
    assert Trainer(tiny_config(tmp_path / "fp32")).weight_cast is None


def test_inside_the_step_the_weights_are_bf16_and_outside_fp32(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "--train.dtype=bf16", "--data.prefetch=0"))
    p = trainer.weight_cast.params[0]
    master = p.data
    batch = next(trainer.loader)
    with trainer.compute():
        assert p.dtype == torch.bfloat16 and p.grad is None
        torch.testing.assert_close(p.data.float(), master, rtol=2**-8, atol=0)
        trainer.model(batch).total.backward()
        assert p.grad is None  # the hook moved it to the fp32 accumulator
    assert p.data_ptr() == master.data_ptr() and p.grad.dtype == torch.float32
    with pytest.raises(RuntimeError, match="does not nest"):
        with trainer.weight_cast.cast(), trainer.weight_cast.cast():
            pass
    assert p.data_ptr() == master.data_ptr()  # the outer cast() restored it on the way out


def test_gradients_from_before_and_after_the_cast_are_kept_in_fp32():
    """A gradient present when cast() starts keeps accumulating; a backward run after cast()
    ended (the graph was built inside) still leaves an fp32 gradient on an fp32 parameter."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    cast = StepWeightCast(list(lin.parameters()), torch.bfloat16)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x).float().sum().backward()  # outside cast(): plain autocast, fp32 gradient
    first = lin.weight.grad.clone()
    with cast.cast(), torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x).float().sum().backward()
    torch.testing.assert_close(lin.weight.grad, 2 * first, rtol=0, atol=0)
    with cast.cast(), torch.autocast("cpu", dtype=torch.bfloat16):
        late = lin(x).float().sum()
    lin.zero_grad(set_to_none=True)
    late.backward()
    assert lin.weight.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    torch.testing.assert_close(lin.weight.grad, first, rtol=0, atol=0)
    cast.remove()


def test_bad_input():
    with pytest.raises(ValueError, match="16-bit autocast dtype, got torch.float32"):
        StepWeightCast([nn.Parameter(torch.ones(2))], torch.float32)
    with pytest.raises(ValueError, match="needs fp32 parameters"):
        StepWeightCast([nn.Parameter(torch.ones(2, dtype=torch.bfloat16))], torch.bfloat16)
    with pytest.raises(ValueError, match="train.weight_cast must be 'step' or 'op', got 'never'"):
        JobConfig.load(None, ["--train.weight_cast=never"]).validate(world_size=1)


def test_block_linear_parameters_skips_frozen_ones(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "--train.dtype=bf16", "--optim.lr_vision=0"))
    names = {n for n, p in trainer.model.named_parameters()
             if any(p is q for q in trainer.weight_cast.params)}
    assert names and not any(n.startswith("visual.") for n in names)
    assert block_linear_parameters(nn.Linear(2, 2)) == []


def test_compiled_blocks_give_the_same_numbers(tmp_path):
    """With every block compiled, the cast weights reach the compiled graphs as bf16 inputs:
    the same losses and parameters as autocast's per-use casts in the same compiled blocks."""
    op, op_results = _train(tmp_path, "op", "--train.weight_cast=op", "--parallel.compile=true")
    step, step_results = _train(tmp_path, "step", "--train.weight_cast=step", "--parallel.compile=true")
    assert [(r.loss, r.grad_norm) for r in op_results] == [(r.loss, r.grad_norm) for r in step_results]
    for (name, a), b in zip(op.model.named_parameters(), step.model.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_cuda_step_cast_gives_the_same_numbers(tmp_path):
    """On the GPU (cuBLAS bf16 GEMMs, eager), over 3 steps of 3 micro-batches. The first forward
    is deterministic, so its loss is compared exactly; the attention backward may add in
    another order from run to run, so the rest are compared within a tolerance."""
    op, op_results = _train(tmp_path, "op", "--train.device=cuda", "--train.weight_cast=op")
    step, step_results = _train(tmp_path, "step", "--train.device=cuda", "--train.weight_cast=step")
    assert step.weight_cast is not None and step.weight_cast.params[0].is_cuda
    assert op_results[0].loss == step_results[0].loss
    for a, b in zip(op_results, step_results):
        assert b.loss == pytest.approx(a.loss, rel=1e-5) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    for (name, a), b in zip(op.model.named_parameters(), step.model.parameters()):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_a_dropped_cast_frees_its_parameters_without_the_garbage_collector():
    """The hooks hold the caster weakly: dropping the model and the caster frees the weights at
    once (a reference cycle would keep a dropped trainer's GPU memory until gc ran)."""
    import gc
    import weakref

    lin = nn.Linear(4, 4)
    cast = StepWeightCast(list(lin.parameters()), torch.bfloat16)
    watch = weakref.ref(lin.weight)
    gc.disable()
    try:
        del lin, cast
        assert watch() is None
    finally:
        gc.enable()
