"""train.grad_accumulation_fusion: the blocks' linear layers add their weight gradients into
fp32 accumulators inside the weight-gradient GEMM (`emu2_engine/models/block_linear.py`,
`StepWeightCast(fused=...)`). The forward is unchanged; the accumulated gradients are those of
the unfused step, summed without rounding each micro-batch's to bf16 first."""

import pytest
import torch
import torch.nn as nn

from emu2_engine.models.block_linear import BlockLinear, accumulation_path, block_linear
from emu2_engine.train.config import JobConfig
from emu2_engine.train.trainer import Trainer
from emu2_engine.train.weight_cast import StepWeightCast
from test_trainer_resume import tiny_config  # tests/ is on sys.path


def test_without_main_grad_it_is_nn_linear():
    torch.manual_seed(0)
    plain = nn.Linear(8, 5)
    ours = BlockLinear(8, 5)
    ours.load_state_dict(plain.state_dict())
    assert ours.main_grad is None and list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 4, 8)
    assert torch.equal(ours(x), plain(x))
    ours(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert torch.equal(ours.weight.grad, plain.weight.grad) and torch.equal(ours.bias.grad, plain.bias.grad)


def test_fp32_the_accumulator_gets_the_sum_of_the_weight_gradients():
    """fp32, four backward passes: main_grad holds what .grad would (within fp32 rounding),
    .grad stays None; the input and bias gradients are autograd's."""
    torch.manual_seed(0)
    plain = nn.Linear(16, 24)
    ours = BlockLinear(16, 24)
    ours.load_state_dict(plain.state_dict())
    ours.main_grad = torch.zeros(24, 16)
    for _ in range(4):
        x = torch.randn(2, 7, 16)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ours(xa).sin().sum().backward()
        plain(xb).sin().sum().backward()
        assert torch.equal(xa.grad, xb.grad)
    assert ours.weight.grad is None
    torch.testing.assert_close(ours.main_grad, plain.weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.bias.grad, plain.bias.grad, rtol=1e-6, atol=1e-6)


def test_bf16_the_fused_sum_is_closer_to_exact_than_the_unfused_one():
    """Under bf16 autocast over bf16 weights (as inside a cast step), eight micro-batches: the
    fused accumulator is within fp32 rounding of the fp64 sum of the micro-batches' products,
    and closer to it than the unfused way (each micro-batch's gradient rounded to bf16, then
    added in fp32). The forward output and the input gradient are the unfused ones, bit for bit."""
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    ours, plain = BlockLinear(64, 32, bias=False), nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        ours.weight.data = w.bfloat16()
        plain.weight.data = w.bfloat16()
    ours.main_grad = torch.zeros(32, 64)
    unfused = torch.zeros(32, 64)
    exact = torch.zeros(32, 64, dtype=torch.float64)
    for _ in range(8):
        x = torch.randn(256, 64)
        dy = torch.randn(256, 32).bfloat16()
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # backward inside, as a step runs it
            ya, yb = ours(xa), plain(xb)
            assert torch.equal(ya, yb)
            ya.backward(dy)
            yb.backward(dy)
        assert torch.equal(xa.grad, xb.grad)
        unfused += plain.weight.grad.float()
        plain.weight.grad = None
        exact += dy.double().t() @ x.bfloat16().double()
    assert ours.weight.grad is None
    fused_err = (ours.main_grad.double() - exact).abs().max().item()
    unfused_err = (unfused.double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert fused_err <= 1e-6 * scale
    assert fused_err < unfused_err / 10


def test_compiled_block_traces_the_accumulation():
    """A compiled (fullgraph) module whose backward adds into main_grad: the same accumulator
    as eager; a new accumulator each step and the no-grad forward compile once each."""
    import torch._dynamo.utils as dynamo_utils

    torch.manual_seed(0)
    eager = nn.Sequential(BlockLinear(16, 32), nn.GELU(), BlockLinear(32, 16))
    compiled = nn.Sequential(BlockLinear(16, 32), nn.GELU(), BlockLinear(32, 16))
    compiled.load_state_dict(eager.state_dict())
    run = torch.compile(compiled, fullgraph=True)
    graphs = []
    for _ in range(3):
        for m in (eager, compiled):
            for layer in (m[0], m[2]):
                layer.main_grad = torch.zeros_like(layer.weight)
        for _ in range(2):
            x = torch.randn(4, 5, 16)
            eager(x).square().sum().backward()
            run(x).square().sum().backward()
        for a, b in ((eager[0], compiled[0]), (eager[2], compiled[2])):
            torch.testing.assert_close(b.main_grad, a.main_grad, rtol=1e-5, atol=1e-6)
            assert a.main_grad.abs().sum() > 0 and b.weight.grad is None
            a.main_grad = b.main_grad = None
        with torch.no_grad():
            run(x)
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[2]  # no recompilation after the first step


def _gradients(tmp_path, name: str, *extra: str) -> tuple[Trainer, float, dict]:
    """One step's forwards and backwards (3 micro-batches, bf16 autocast): the mean loss and
    every parameter's fp32 gradient."""
    trainer = Trainer(tiny_config(tmp_path / name, "--train.dtype=bf16", "--data.prefetch=0",
                                  "--parallel.microbatches=3", *extra))
    batches = [next(trainer.loader) for _ in range(3)]
    loss = trainer.forward_backward(trainer.micro_batches(iter(batches), 3))[0].item()
    return trainer, loss, {n: p.grad for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("extra", [(), ("--parallel.compile=true",),
                                   ("--parallel.activation_checkpoint=full",)],
                         ids=["eager", "compiled", "checkpointed"])
def test_a_steps_gradients_match_the_unfused_ones(tmp_path, extra):
    """One step of three micro-batches: the loss is the same bit for bit (the forward does not
    change), every parameter has an fp32 gradient where the unfused step has one, and each
    gradient is within 1 % of the unfused one's norm (the unfused sum rounds each micro-batch's
    weight gradient to bf16 first). Eager, with compiled blocks, and recomputing them."""
    plain, plain_loss, want = _gradients(tmp_path, "plain", *extra)
    fused, fused_loss, got = _gradients(tmp_path, "fused", "--train.grad_accumulation_fusion=true", *extra)
    assert plain.weight_cast.fused == [] and len(fused.weight_cast.fused) > 0
    assert fused_loss == plain_loss
    fused_names = {n for n, p in fused.model.named_parameters()
                   if any(p is m.weight for m in fused.weight_cast.fused)}
    assert fused_names
    for name, g in want.items():
        assert (got[name] is None) == (g is None), name
        if g is None:
            continue
        assert got[name].dtype == torch.float32, name
        err = (got[name] - g).norm().item()
        assert err <= 1e-2 * g.norm().item() + 1e-12, (name, err, g.norm().item())
    assert all(m.main_grad is None for m in fused.weight_cast.fused)


def test_a_layer_no_backward_reached_keeps_no_gradient():
    """A fused layer that no backward of the step reached (a step with no images skips the
    ViT) ends the step with gradient None, as unfused, so AdamW leaves it alone; one that had a
    gradient before the step keeps it."""
    used, idle, held = BlockLinear(4, 3), BlockLinear(4, 3), BlockLinear(4, 3)
    layers = [used, idle, held]
    params = [p for m in layers for p in m.parameters()]
    cast = StepWeightCast(params, torch.bfloat16, fused=layers)
    held.weight.grad = torch.ones(3, 4)
    with cast.cast(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert idle.main_grad is not None and held.main_grad is not None
        used(torch.randn(2, 4)).float().sum().backward()
    assert used.weight.grad is not None and used.weight.grad.abs().sum() > 0
    assert idle.weight.grad is None and idle.bias.grad is None
    assert torch.equal(held.weight.grad, torch.ones(3, 4))
    # the next step starts clean: nothing stale marks the idle layer as used
    with cast.cast():
        pass
    assert idle.weight.grad is None
    cast.remove()


def test_inside_the_step_the_gradient_is_in_main_grad(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "--train.dtype=bf16", "--data.prefetch=0",
                                  "--train.grad_accumulation_fusion=true"))
    layer = trainer.weight_cast.fused[0]
    batch = next(trainer.loader)
    with trainer.compute():
        assert layer.weight.dtype == torch.bfloat16 and layer.main_grad.dtype == torch.float32
        assert not layer.main_grad.any()
        trainer.model(batch).total.backward()
        assert layer.weight.grad is None and layer.main_grad.abs().sum() > 0
        acc = layer.main_grad
    assert layer.main_grad is None
    assert layer.weight.dtype == torch.float32 and layer.weight.grad is acc
    # a gradient present when the next step starts keeps accumulating into it
    with trainer.compute():
        assert layer.main_grad is acc
    trainer.model.zero_grad(set_to_none=True)
    # every weight of the blocks' BlockLinear layers is fused, and their biases keep the hook
    fused = {id(m.weight) for m in trainer.weight_cast.fused}
    names = {n for n, p in trainer.model.named_parameters() if id(p) in fused}
    assert any(n.endswith("mlp.fc1.weight") for n in names) and any(n.endswith("self_attn.q_proj.weight")
                                                                    for n in names)
    assert any(n.endswith("attn.qkv.weight") for n in names)
    assert not any(n.endswith("bias") for n in names)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="grad_accumulation_fusion needs train.weight_cast = 'step'"):
        JobConfig.load(None, ["--train.weight_cast=op", "--train.grad_accumulation_fusion=true"]).validate(
            world_size=1)
    with pytest.raises(ValueError, match=r"cannot use it: it computes in fp32 \(no 16-bit autocast\)"):
        Trainer(tiny_config(tmp_path / "fp32", "--train.grad_accumulation_fusion=true"))
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="must be BlockLinear layers whose weight is among the cast"):
        StepWeightCast(list(lin.parameters()), torch.bfloat16, [lin])
    with pytest.raises(ValueError, match="must be BlockLinear layers whose weight is among the cast"):
        StepWeightCast([], torch.bfloat16, [BlockLinear(4, 4)])
    layer = BlockLinear(4, 3)
    layer.main_grad = torch.zeros(3, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"main_grad must be an fp32 tensor of the weight's shape \(3, 4\)"):
        layer(torch.randn(2, 4))
    layer.main_grad = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"got torch.float32 \(4, 3\)"):
        block_linear(layer, torch.randn(2, 4))


def test_the_cpu_adds_an_fp32_product():
    assert accumulation_path(torch.device("cpu"), torch.bfloat16) == "fp32-product-then-add"
    assert accumulation_path(torch.device("cpu"), torch.float16) == "fp32-product-then-add"


@pytest.mark.gpu
def test_cuda_accumulation_matches_fp64():
    """On the GPU, with the backward inside autocast as in a step: with the fused GEMM
    ("addmm-fp32-epilogue") the accumulator after four bf16 micro-batches is within fp32
    rounding of the fp64 sum; a build without it ("product-then-add", which the benchmark's
    case name shows) is held to the unfused step's bf16 rounding instead."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    path = accumulation_path(device, torch.bfloat16)
    layer = BlockLinear(512, 256, bias=False, device=device, dtype=torch.bfloat16)
    layer.main_grad = torch.zeros(256, 512, device=device)
    exact = torch.zeros(256, 512, device=device, dtype=torch.float64)
    for _ in range(4):
        x = torch.randn(1024, 512, device=device, dtype=torch.bfloat16)
        dy = torch.randn(1024, 256, device=device, dtype=torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            layer(x).backward(dy)
        exact += dy.double().t() @ x.double()
    err = (layer.main_grad.double() - exact).abs().max().item()
    bound = 1e-5 if path == "addmm-fp32-epilogue" else 4 * 2.0 ** -8
    assert err <= bound * exact.abs().max().item(), (path, err)
    assert layer.weight.grad is None
