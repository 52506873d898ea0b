"""`emu2_head_loss`: the fused op (chunked PyTorch on the CPU, Triton kernels through the
interpreter) against the unfused reference, values and gradients, at awkward sizes; bad input;
the op contracts (custom ops, FLOP accounting, no full logits); the model wired to it."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode

from emu2_engine.data.batch import PackedBatch
from emu2_engine.kernels import head_loss as kernel
from emu2_engine.models import Emu2Config, Emu2Model
from emu2_engine.models.config import LlamaConfig, VisionConfig
from emu2_engine.ops import emu2_head_loss
from emu2_engine.ops.head_loss import emu2_head_loss_reference
from emu2_engine.ops import head_loss as head_loss_module
from kernel_checks import assert_within_rule, compile_for_sm90, run_without_interpreter



def make_inputs(T, H, V, R, C, ignore=0.25, w_std=None, seed=0):
    """fp64 inputs: hidden (T, H), lm_weight (V, H), labels (T,) with a fraction ignored,
    down_weight (C, H), reg_index (R,) (with a repeat), reg_target (R, C)."""
    g = torch.Generator().manual_seed(seed)
    w_std = w_std or H ** -0.5
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    lm = torch.randn(V, H, generator=g, dtype=torch.float64) * w_std
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < ignore] = -100
    if ignore < 1:
        labels[0] = V - 1  # the last vocabulary row is a target
    down = torch.randn(C, H, generator=g, dtype=torch.float64) * H ** -0.5
    index = torch.randint(0, T, (R,), generator=g)
    if R > 1:
        index[1] = index[0]  # a hidden row regressed twice
    target = torch.randn(R, C, generator=g, dtype=torch.float64)
    return hidden, lm, labels, down, index, target


def run(fn, inputs, dtype, reg_weight=0.7, which="total", **kw):
    """Values and gradients (hidden, lm_weight, down_weight) of fn on inputs cast to dtype."""
    hidden, lm, labels, down, index, target = inputs
    params = [t.to(dtype, copy=True).requires_grad_() for t in (hidden, lm, down)]
    out = fn(params[0], params[1], labels, params[2], index, target.to(dtype), reg_weight, **kw)
    loss = getattr(out, which)
    if loss.requires_grad:
        loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    return out, grads


def check_against_reference(inputs, dtype, which="total", **kw):
    ref, ref_grads = run(emu2_head_loss_reference, inputs, torch.float64, which=which, **kw)
    low, low_grads = run(emu2_head_loss_reference, inputs, dtype, which=which, **kw)
    out, grads = run(emu2_head_loss, inputs, dtype, which=which, **kw)
    assert int(out.n_text) == int(ref.n_text) and int(out.n_reg) == int(ref.n_reg)
    for name in ("total", "ce", "mse"):
        assert torch.isfinite(getattr(out, name))
        assert_within_rule(getattr(out, name), getattr(low, name), getattr(ref, name), dtype, name)
    for name, g, lg, rg in zip(("d hidden", "d lm_weight", "d down_weight"), grads, low_grads, ref_grads):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert_within_rule(g, lg, rg, dtype, name)
    return out, grads


@pytest.fixture(params=["torch", "triton"])
def path(request, monkeypatch):
    """The fused op's two implementations: chunked PyTorch (auto on the CPU) and the Triton
    kernels (forced; TRITON_INTERPRET=1 runs them here). Counts the kernel launches."""
    monkeypatch.setenv("EMU2_KERNELS", "auto" if request.param == "torch" else "triton")
    calls = {"n": 0}
    stats = kernel.ce_stats

    def counted(*args):
        calls["n"] += 1
        return stats(*args)

    monkeypatch.setattr(kernel, "ce_stats", counted)
    yield calls
    if request.param == "torch":
        assert calls["n"] == 0
    else:
        assert calls["n"] > 0 or calls.get("no_text")


# fp16 matrix products are slow on a CPU (7-25 GFLOP/s here), so the fp16 cases take the large
# vocabulary and the large hidden size one at a time.
@pytest.mark.parametrize("T, H, V, R, C, dtype", [
    (1337, 96, 1000, 37, 80, torch.float32),      # several chunks of rows, awkward everything
    (1337, 96, 1000, 37, 80, torch.float16),
    (1, 96, 1000, 0, 80, torch.float32),          # one token, no regression targets
    (1, 96, 1000, 0, 80, torch.float16),
    (97, 1024, 32274, 64, 1792, torch.float32),   # Emu2's vocabulary and regression width
    (211, 96, 32274, 16, 80, torch.float16),
    (300, 1024, 1000, 16, 1792, torch.float16),
], ids=lambda v: str(v).removeprefix("torch."))
def test_matches_reference(path, T, H, V, R, C, dtype):
    out, grads = check_against_reference(make_inputs(T, H, V, R, C), dtype)
    if R == 0:
        assert out.mse.item() == 0.0 and grads[2].abs().max() == 0


@pytest.mark.slow
def test_large_vocab_many_tokens_triton(monkeypatch):
    """1,337 tokens x hidden 1,024 x vocabulary 32,274 through the interpreted kernels, fp32."""
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    check_against_reference(make_inputs(1337, 1024, 32274, 64, 112), torch.float32)


def test_all_labels_ignored_gives_zero_ce(path):
    path["no_text"] = True
    inputs = make_inputs(50, 96, 1000, 11, 80, ignore=1.1)
    out, grads = check_against_reference(inputs, torch.float32)
    assert out.ce.item() == 0.0 and int(out.n_text) == 0 and torch.isfinite(out.total)
    assert grads[1].abs().max() == 0  # the LM head gets nothing
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[inputs[4]] = False
    assert grads[0][untouched].abs().max() == 0 and grads[0][~untouched].abs().max() > 0


def test_nothing_to_count_is_zero_not_nan(path):
    path["no_text"] = True
    hidden, lm, labels, down, _, _ = make_inputs(7, 96, 1000, 0, 80)
    h = hidden.float().requires_grad_()
    out = emu2_head_loss(h, lm.float(), torch.full_like(labels, -100), down.float(),
                         torch.zeros(0, dtype=torch.long), torch.zeros(0, 80), 1.0)
    assert out.total.item() == 0.0 and out.ce.item() == 0.0 and out.mse.item() == 0.0
    out.total.backward()
    assert h.grad is not None and h.grad.abs().max() == 0


def test_reference_nothing_to_count_int32_labels_and_detached_targets(monkeypatch):
    """The reference backend (EMU2_KERNELS=reference, the A/B path) agrees with the fused op
    where it used to differ: a micro-batch with nothing to count backpropagates zeros (its
    total had no graph: the trainer's backward raised); int32 labels work; the regression
    target is a target (no gradient), as in the fused path."""
    monkeypatch.setenv("EMU2_KERNELS", "reference")
    hidden, lm, labels, down, index, target = make_inputs(7, 96, 1000, 3, 80)
    h = hidden.float().requires_grad_()
    out = emu2_head_loss(h, lm.float(), torch.full_like(labels, -100), down.float(),
                         torch.zeros(0, dtype=torch.long), torch.zeros(0, 80), 1.0)
    assert out.total.item() == 0.0
    out.total.backward()
    assert h.grad is not None and h.grad.abs().max() == 0
    for backend in ("reference", "auto"):
        monkeypatch.setenv("EMU2_KERNELS", backend)
        t = target.float().requires_grad_()
        got = emu2_head_loss(hidden.float().requires_grad_(), lm.float(), labels.int(), down.float(), index,
                             t, 1.0)
        want = emu2_head_loss_reference(hidden.float(), lm.float(), labels.long(), down.float(), index,
                                        target.float(), 1.0)
        torch.testing.assert_close(got.total, want.total)
        got.total.backward()
        assert t.grad is None, backend


def test_z_loss(path):
    # Large logits (weights x 4) so that the z-loss term is far from negligible.
    inputs = make_inputs(257, 96, 1000, 9, 80, w_std=4 * 96 ** -0.5)
    out, _ = check_against_reference(inputs, torch.float32, z_loss=0.01)
    plain, _ = run(emu2_head_loss, inputs, torch.float32)
    assert out.ce.item() > plain.ce.item() * 1.1


@pytest.mark.parametrize("which", ["ce", "mse"])
def test_each_term_alone(path, which):
    """Backward from ce or from mse alone: the other term contributes no gradient."""
    check_against_reference(make_inputs(300, 96, 1000, 20, 80), torch.float32, which=which)


def test_batched_hidden_and_backend_choice(monkeypatch):
    """(B, S, H) hidden with (B, S) labels equals the flat call; EMU2_KERNELS=reference runs the
    reference, which refuses a process group."""
    hidden, lm, labels, down, index, target = make_inputs(6 * 35, 96, 1000, 8, 80)
    args = [t.float() for t in (hidden, lm)] + [labels, down.float(), index, target.float()]
    flat = emu2_head_loss(*args)
    batched = emu2_head_loss(args[0].view(6, 35, 96), args[1], labels.view(6, 35), *args[3:])
    torch.testing.assert_close(batched.total, flat.total)
    monkeypatch.setenv("EMU2_KERNELS", "reference")
    torch.testing.assert_close(emu2_head_loss(*args).total, flat.total)
    with pytest.raises(ValueError, match="not vocabulary-parallel"):
        emu2_head_loss(*args, group=object())
    # a per-op entry wins over the global choice, both ways
    calls = []
    real = head_loss_module.emu2_head_loss_reference
    monkeypatch.setattr(head_loss_module, "emu2_head_loss_reference", lambda *a: calls.append(1) or real(*a))
    for setting, reference in (("reference,emu2_head_loss=auto", False), ("auto,emu2_head_loss=reference", True),
                               ("emu2_head_loss=reference", True)):
        monkeypatch.setenv("EMU2_KERNELS", setting)
        calls.clear()
        torch.testing.assert_close(emu2_head_loss(*args).total, flat.total)
        assert bool(calls) == reference, setting
    monkeypatch.setenv("EMU2_KERNELS", "auto,pool_project=reference,emu2_head_loss=triton")
    with pytest.raises(ValueError, match="the Triton head loss runs in"):
        emu2_head_loss(*make_inputs(30, 96, 1000, 4, 80))  # fp64: the per-op triton entry refuses it


def test_triton_refuses_fp64_and_auto_takes_the_pytorch_path(monkeypatch):
    inputs = make_inputs(30, 96, 1000, 4, 80)
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    with pytest.raises(ValueError, match="the Triton head loss runs in"):
        emu2_head_loss(*inputs)
    monkeypatch.setenv("EMU2_KERNELS", "auto")
    torch.testing.assert_close(emu2_head_loss(*inputs).total, emu2_head_loss_reference(*inputs).total)


def test_backward_twice_is_refused():
    hidden, lm, labels, down, index, target = make_inputs(20, 96, 1000, 3, 80)
    h = hidden.float().requires_grad_()
    out = emu2_head_loss(h, lm.float(), labels, down.float(), index, target.float())
    out.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="can therefore run only once"):
        out.total.backward()


def test_kernels_compile_for_sm90():
    run_without_interpreter(__file__, "compile_kernels_for_sm90")


def compile_kernels_for_sm90():
    """The launch parameters a GPU takes (`_ce_blocks`, `_regression_blocks` outside the
    interpreter), compiled for sm_90."""
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        _compile_kernels(dtype, torch_dtype)


def _compile_kernels(dtype, torch_dtype):
    block_t, block_v, warps = kernel._ce_blocks(32274)
    stats = compile_for_sm90(kernel._ce_stats_kernel, dict(
        logits_ptr=f"*{dtype}", target_ptr="*i64", max_ptr="*fp32", sumexp_ptr="*fp32",
        target_logit_ptr="*fp32", n_rows="i32", vocab="i32", stride_row="i32"),
        dict(BLOCK_T=block_t, BLOCK_V=block_v), num_warps=warps)
    grad = compile_for_sm90(kernel._ce_grad_kernel, dict(
        logits_ptr=f"*{dtype}", target_ptr="*i64", lse_ptr="*fp32", n_rows="i32", vocab="i32",
        stride_row="i32", z_loss="fp32", scale="fp32"),
        dict(BLOCK_T=block_t, BLOCK_V=block_v), num_warps=warps)
    block_r, block_c, block_k, warps, stages = kernel._regression_blocks(torch_dtype)
    reg = compile_for_sm90(kernel._regression_kernel, dict(
        h_ptr=f"*{dtype}", index_ptr="*i64", w_ptr=f"*{dtype}", target_ptr=f"*{dtype}",
        grad_ptr=f"*{dtype}", partial_ptr="*fp32", n_reg="i32", out_dim="i32", hidden_dim="i32",
        stride_h="i32", stride_w="i32", stride_t="i32", scale="fp32"),
        dict(BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_K=block_k, IEEE=dtype == "fp32"),
        num_warps=warps, num_stages=stages)
    assert all("cubin" in k.asm for k in (stats, grad, reg))


# -- bad input: clear errors before any work ---------------------------------------------------
def _bad(**change):
    hidden, lm, labels, down, index, target = make_inputs(40, 96, 1000, 5, 80)
    args = dict(hidden=hidden.float(), lm_weight=lm.float(), labels=labels, down_weight=down.float(),
                reg_index=index, reg_target=target.float())
    args.update(change)
    return args


@pytest.mark.parametrize("change, message", [
    (dict(labels=torch.full((40,), 1000)), r"labels must be -100 or in \[0, 1000\), got 1000"),
    (dict(labels=torch.full((40,), -5)), r"labels must be -100 or in \[0, 1000\), got -5"),
    (dict(labels=torch.zeros(41, dtype=torch.long)), r"labels must have shape \(40,\)"),
    (dict(labels=torch.zeros(40)), "labels must be an integer tensor"),
    (dict(reg_index=torch.tensor([0, 1, 2, 3, 40])), "reg_index must index the 40 hidden rows, got 40"),
    (dict(reg_index=torch.tensor([0, -1, 2, 3, 4])), "reg_index must index the 40 hidden rows, got -1"),
    (dict(reg_target=torch.zeros(4, 80)), r"reg_target must be a floating \(5, 80\) tensor"),
    (dict(lm_weight=torch.zeros(1000, 95)), r"lm_weight must be \(rows, 96\)"),
    (dict(lm_weight=torch.zeros(1000, 96, dtype=torch.float16)), "lm_weight is torch.float16 but hidden"),
    (dict(down_weight=torch.zeros(80, 96, dtype=torch.float64)), "down_weight is torch.float64"),
    (dict(hidden=torch.zeros(40, 96, dtype=torch.long)), "hidden must be a floating"),
])
def test_bad_input_is_refused_before_any_work(monkeypatch, change, message):
    def no_work(*args, **kwargs):
        raise AssertionError("the fused pass started on bad input")

    monkeypatch.setattr(kernel, "fused_forward", no_work)
    with pytest.raises(ValueError, match=message):
        emu2_head_loss(**_bad(**change))


# -- op contracts ----------------------------------------------------------------------------
def test_custom_ops_pass_opcheck():
    hidden, lm, labels, down, index, target = (t.float() if t.is_floating_point() else t
                                               for t in make_inputs(33, 16, 50, 4, 8))
    rows = (labels != -100).nonzero().squeeze(1)
    for with_grads in (False, True):
        for text_rows in (None, rows):
            torch.library.opcheck(torch.ops.emu2.head_loss_fused,
                                  (hidden, lm, labels, down, index, target, 0.0, with_grads, False, "", 0, 0,
                                   text_rows))
    out = torch.ops.emu2.head_loss_fused(hidden, lm, labels, down, index, target, 0.0, True, False,
                                         "", 0, 0)
    grads_in = (torch.tensor(1.0), torch.tensor(0.5))
    torch.library.opcheck(torch.ops.emu2.head_loss_backward, (*grads_in, *out[3:], index, out[2]))


def test_flop_count_is_the_unfused_models():
    """The fused op runs every GEMM in forward; the counter credits forward F and backward 2F,
    as for the unfused heads (see the note in kernels/head_loss.py)."""
    T, H, V, R, C = 60, 32, 100, 6, 24
    hidden, lm, labels, down, index, target = make_inputs(T, H, V, R, C)
    h = hidden.float().requires_grad_()
    n_text = int((labels != -100).sum())
    forward = 2 * n_text * H * V + 2 * R * H * C
    with FlopCounterMode(display=False) as fc:
        out = emu2_head_loss(h, lm.float(), labels, down.float(), index, target.float())
    assert fc.get_total_flops() == forward
    with FlopCounterMode(display=False) as fc:
        out.total.backward()
    assert fc.get_total_flops() == 2 * forward


class _LargestTensor(TorchDispatchMode):
    """The largest tensor, in bytes, that any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):  # bytes: the interpreter copies buffers as uint8
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("use_kernel", [False, True])
def test_never_forms_the_full_logits(use_kernel):
    T, H, V = 600, 32, 8192
    hidden, lm, labels, down, index, target = (t.float() if t.is_floating_point() else t
                                               for t in make_inputs(T, H, V, 5, 16, ignore=0.0))
    with _LargestTensor() as probe:
        kernel.fused_forward(hidden, lm, labels, down, index, target, 0.0, True, use_kernel)
    assert probe.largest <= 4 * kernel.chunk_rows(T, H, V) * V <= 4 * T * V // 4
    with _LargestTensor() as probe:
        F.cross_entropy(F.linear(hidden, lm), labels)
    assert probe.largest >= 4 * T * V  # the probe sees what eager forms


# -- the model ------------------------------------------------------------------------------
def test_model_fused_equals_reference(monkeypatch):
    """The tiny model's loss and every parameter gradient: fused heads and fused pool_project
    (auto) against the references."""
    cfg = Emu2Config(
        name="tiny", vision=VisionConfig(image_size=32, patch_size=8, width=48, depth=1, heads=4,
                                         mlp_hidden=64),
        llm=LlamaConfig(vocab_size=40 + 272, hidden=64, layers=1, heads=4, kv_heads=2, ffn_hidden=96),
        base_vocab_size=40, n_query=4, regression_weight=0.5)
    ids = cfg.special_ids
    doc = [ids.bos, ids.img, *[ids.image] * 4, ids.img_end, 11, 12, 13, ids.eos, ids.pad]
    input_ids = torch.tensor(doc)[None]
    labels = torch.tensor(doc[1:] + [-100])[None]
    labels[(labels == ids.image) | (labels == ids.img) | (labels == ids.img_end) | (labels == ids.pad)] = -100
    doc_ids = torch.tensor([0] * 11 + [-1], dtype=torch.int32)[None]
    batch = PackedBatch(
        input_ids=input_ids, labels=labels, doc_ids=doc_ids, span_ids=torch.full_like(doc_ids, -1),
        position_ids=torch.arange(12, dtype=torch.int32)[None], images=torch.randn(1, 3, 32, 32),
        image_slots=torch.tensor([[2, 3, 4, 5]]), reg_images=torch.tensor([0]),
        reg_positions=torch.tensor([[1, 2, 3, 4]]))
    batch.validate(cfg.llm.vocab_size, cfg.n_query, cfg.vision.image_size)
    model = Emu2Model(cfg)

    def loss_and_grads(backend):
        monkeypatch.setenv("EMU2_KERNELS", backend)
        model.zero_grad()
        out = model(batch)
        out.total.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, ref_grads = loss_and_grads("reference")
    out, grads = loss_and_grads("auto")
    assert int(out.n_reg) == 4 and int(out.n_text) == int(ref.n_text) > 0
    for name in ("total", "ce", "mse"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# -- on a GPU -------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_kernels_at_emu2_width(dtype, monkeypatch):
    """The Triton path on CUDA (auto) at hidden 4,096 and Emu2's vocabulary, bf16 included."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    inputs = [t.cuda() for t in make_inputs(2048, 4096, 32274, 256, 1792)]
    check_against_reference(inputs, dtype)


class _HostReads:
    """Records every call of the tensor methods that read device values back to the host (a
    synchronisation on a GPU): nonzero (a data-dependent shape), tolist, item, int, bool."""

    NAMES = ("nonzero", "tolist", "item", "__int__", "__bool__")

    def __init__(self, monkeypatch):
        self.reads = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def spy(t, *args, _name=name, _original=original, **kwargs):
                self.reads.append(_name)
                return _original(t, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, spy)


def test_text_rows_from_the_host_remove_every_host_read(path):
    """Given the text rows (computed where the labels were checked, on the CPU), the fused op
    reads nothing back from the device, and computes exactly what it computes without them."""
    inputs = make_inputs(1337, 96, 1000, 37, 80)
    labels = inputs[2]
    rows = (labels != -100).nonzero().squeeze(1)
    want, want_grads = run(emu2_head_loss, inputs, torch.float32)
    with pytest.MonkeyPatch.context() as patch:
        spy = _HostReads(patch)
        got, got_grads = run(emu2_head_loss, inputs, torch.float32, text_rows=rows)
        assert spy.reads == []
        run(emu2_head_loss, inputs, torch.float32)
        assert "nonzero" in spy.reads and "tolist" in spy.reads  # what the op reads without them
    assert int(got.n_text) == rows.numel()
    for name in ("total", "ce", "mse"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)
    with pytest.raises(ValueError, match="text_rows must be a 1-D int64 tensor"):
        run(emu2_head_loss, inputs, torch.float32, text_rows=rows.int())


def test_model_passes_the_batchs_text_rows(monkeypatch):
    """A batch that carries text_rows (`PackedBatch.with_text_rows`) gives the model the same
    loss as one that does not."""
    from emu2_engine.models.config import PRESETS

    cfg = PRESETS["debug"]
    torch.manual_seed(0)
    model = Emu2Model(cfg)
    from emu2_engine.data.loader import build_loader
    from emu2_engine.data.tokenizer import Emu2Tokenizer
    from emu2_engine.train.config import JobConfig

    job = JobConfig.load(None, ["--data.prefetch=0"])
    batch = next(iter(build_loader(job.data, Emu2Tokenizer(chat=cfg.chat), cfg, rank=0, world_size=1)))
    batch.validate(cfg.llm.vocab_size, cfg.n_query, cfg.vision.image_size)
    with_rows = batch.with_text_rows()
    assert torch.equal(with_rows.text_rows, (batch.labels.reshape(-1) != -100).nonzero().squeeze(1))
    assert torch.equal(model(with_rows).total, model(batch).total)
