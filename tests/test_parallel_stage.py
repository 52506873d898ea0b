"""The stage forward, the pipeline cut and activation checkpointing in one process: the stage
module computes what `Emu2Model.forward` computes (the loss and every gradient), cut stages
chained by hand give the same loss, and the checkpointing modes recompute what they say."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import parallel_worker as worker
from emu2_engine.models import Emu2Model
from emu2_engine.parallel.fsdp import apply_ac, apply_compile
from emu2_engine.parallel.pipeline import Emu2Stage, cut_stage, stage_inputs

CFG = worker.model_config(None)


@pytest.fixture(scope="module")
def batch():
    b = worker.make_batches(CFG, 1, seed=3)[0]
    # The checks below need every kind of image: regressed, bidirectional and padding.
    assert b.reg_images.numel() and (b.span_ids >= 0).any() and not b.image_mask.all()
    return b


def _model() -> Emu2Model:
    torch.manual_seed(0)
    return Emu2Model(CFG)


def _grads(module) -> dict[str, torch.Tensor]:
    return {n.removeprefix("model.").replace("_checkpoint_wrapped_module.", ""): p.grad
            for n, p in module.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def reference(batch):
    model = _model()
    out = model(batch)
    out.total.backward()
    return torch.stack([out.total, out.ce, out.mse]).detach(), _grads(model)


def _assert_same(losses, grads, reference):
    want_losses, want_grads = reference
    torch.testing.assert_close(losses, want_losses, rtol=1e-6, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("split_backward", [False, True])
def test_stage_computes_the_model_forward(batch, reference, split_backward):
    stage = Emu2Stage(_model())
    stage.split_backward = split_backward  # zero-bubble form: precomputed head-loss gradients
    losses = stage(**stage_inputs(batch))
    losses[0].backward()
    _assert_same(losses.detach(), _grads(stage), reference)


def test_stage_with_host_indices_computes_the_same(batch, reference):
    """Without a pipeline the stage gets the regressed images' indices and the text rows made on
    the host (no boolean-mask selection, no read-back in the head loss): same losses and
    gradients."""
    mb = stage_inputs(batch.with_text_rows(), host_indices=True)
    assert torch.equal(mb["reg_images"], batch.reg_images) and "text_rows" in mb
    assert "reg_images" not in stage_inputs(batch) and "text_rows" not in stage_inputs(batch.with_text_rows())
    stage = Emu2Stage(_model())
    losses = stage(**mb)
    losses[0].backward()
    _assert_same(losses.detach(), _grads(stage), reference)


class _DeviceReads(TorchDispatchMode):
    """Records the ops that read a device value back to the host on a GPU: a scalar read
    (item, int, bool: aten._local_scalar_dense), nonzero, and indexing by a boolean mask (whose
    result size is data-dependent), with whether the tensor read was `exempt`."""

    def __init__(self, exempt: torch.Tensor):
        super().__init__()
        self.exempt, self.reads = exempt, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        flat = [a for a in args if isinstance(a, torch.Tensor)]
        indices = [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        if name in ("_local_scalar_dense", "nonzero") or (
                name in ("index", "index_put", "index_put_") and any(t.dtype == torch.bool for t in indices)):
            self.reads.append((name, bool(flat) and flat[0] is self.exempt))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("split_backward", [False, True])
def test_stage_under_a_schedule_takes_the_step_indices(batch, reference, split_backward):
    """Under a pipeline schedule the fixed-shape kwargs carry only ``mb_index`` (a CPU tensor);
    the stage finds the micro-batch's host-made indices in `step_indices`: same losses and
    gradients, and the loss (the regression selection and the fused head loss) reads no value
    back from any tensor but that index; without them it reads the boolean masks and labels.
    (The CPU's reference attention reads the ids; the GPU runs the Triton kernel.)"""
    mb = {**stage_inputs(batch), "mb_index": torch.tensor([1])}
    stage = Emu2Stage(_model())
    stage.split_backward = split_backward
    other = {"reg_images": batch.reg_images[:0], "text_rows": torch.zeros(0, dtype=torch.long)}
    indices = [other, {"reg_images": batch.reg_images, "text_rows": batch.with_text_rows().text_rows}]
    loss, modes = stage._loss, []

    def watched_loss(*args, **kwargs):
        modes.append(_DeviceReads(mb["mb_index"]))
        with modes[-1]:
            return loss(*args, **kwargs)

    stage._loss = watched_loss
    stage.step_indices = indices
    losses = stage(**mb)
    stage.step_indices = None  # as a step without them: the masks and the labels are read
    stage(**mb)
    with_indices, without = modes
    assert with_indices.reads and all(exempt for _, exempt in with_indices.reads), with_indices.reads
    assert any(not exempt for _, exempt in without.reads), without.reads
    losses[0].backward()
    _assert_same(losses.detach(), _grads(stage), reference)


def test_cut_stages_chain_to_the_model(batch, reference):
    model = _model()
    # Stage 0 holds only the ViT, projector and embedding; stages 1 and 2 one layer each.
    parts = [Emu2Stage(cut_stage(model, layers, 3, i))
             for i, layers in enumerate([range(0, 0), range(0, 1), range(1, 2)])]
    names = [{n.removeprefix("model.") for n, _ in p.named_parameters()} for p in parts]
    everything = {n for n, _ in model.named_parameters()}
    assert sum(len(n) for n in names) == len(everything) and set().union(*names) == everything
    assert names[1] == {n for n in everything if n.startswith("llm.layers.0.")}
    mb = stage_inputs(batch)
    carry = parts[0](**mb)
    carry = parts[1](*carry, **mb)
    losses = parts[2](*carry, **mb)
    losses[0].backward()
    grads = {}
    for p in parts:
        grads.update(_grads(p))
    _assert_same(losses.detach(), grads, reference)


class _CountOps(TorchDispatchMode):
    """Counts aten ops by name while active."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_activation_checkpointing_modes(batch, reference):
    products, attention, elementwise = {}, {}, {}
    for mode in ("none", "selective", "full"):
        model = _model()
        apply_ac(model, mode)
        losses = Emu2Stage(model)(**stage_inputs(batch))
        with _CountOps() as backward:
            losses[0].backward()
        _assert_same(losses.detach(), _grads(model), reference)
        ops = backward.counts
        products[mode] = ops.get("mm", 0) + ops.get("addmm", 0)
        attention[mode] = ops.get("_scaled_dot_product_flash_attention_for_cpu", 0)
        # Forward-only elementwise ops (their gradients are other ops: silu_backward, ...).
        elementwise[mode] = {k: ops.get(k, 0) for k in ("silu", "gelu", "native_layer_norm", "rsqrt")}
    # Without checkpointing nothing of the forward runs again.
    assert attention["none"] == 0 and not any(elementwise["none"].values())
    # Full recomputes each block's forward up to the last tensor its backward needs: the 4
    # products of each of the 2 ViT blocks (qkv, proj, fc1, fc2; fc2's output feeds norm2) and
    # 6 of the 7 of each of the 2 LLaMA blocks (down_proj's output only feeds the residual add),
    # and the attention of all 4 blocks.
    assert products["full"] - products["none"] == 2 * 4 + 2 * 6
    assert attention["full"] == 4
    # Selective keeps every product and attention output and recomputes the elementwise work:
    # SiLU and RMSNorm's rsqrt (2 per block) in the LLaMA blocks, GELU and LayerNorm in the ViT.
    assert products["selective"] == products["none"] and attention["selective"] == 0
    assert elementwise["selective"] == {"silu": 2, "gelu": 2, "native_layer_norm": 4, "rsqrt": 4}
    assert elementwise["full"] == elementwise["selective"]


def test_unknown_checkpointing_mode():
    with pytest.raises(ValueError, match=r"must be one of \('none', 'selective', 'full'\), got 'all'"):
        apply_ac(_model(), "all")


@pytest.mark.slow
def test_compiled_blocks_compute_the_same(batch, reference):
    """About 30 s on 2 busy cores: inductor compiles the ViT and LLaMA blocks for the CPU."""
    model = _model()
    apply_compile(model)
    losses = Emu2Stage(model)(**stage_inputs(batch))
    losses[0].backward()
    want_losses, want_grads = reference
    torch.testing.assert_close(losses.detach(), want_losses, rtol=1e-5, atol=1e-5)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_stage_encodes_only_the_real_images_under_a_schedule(batch, reference):
    """With the host's count of real images in `step_indices`, stage 0 runs the ViT on those
    alone (the padding images stay in the fixed-shape inputs and the zero-padded pooled
    output): the same losses and gradients as the whole batch through the encoder."""
    real = batch.with_real_images().real_images
    assert real is not None and real < batch.images.shape[0]
    mb = {**stage_inputs(batch), "mb_index": torch.tensor([0])}
    stage = Emu2Stage(_model())
    seen = []
    stage.model.visual.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    stage.step_indices = [{"reg_images": batch.reg_images, "real_images": real}]
    losses = stage(**mb)
    assert seen == [real]
    losses[0].backward()
    _assert_same(losses.detach(), _grads(stage), reference)
    # a micro-batch without real images keeps one through the encoder (FSDP gathers every time)
    stage.step_indices = [{"reg_images": batch.reg_images[:0], "real_images": 0}]
    empty = {**mb, "image_mask": torch.zeros_like(mb["image_mask"]), "reg_mask": torch.zeros_like(mb["reg_mask"])}
    stage(**empty)
    assert seen[-1] == 1
