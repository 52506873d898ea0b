"""The plan tool (`emu2_engine.plan`): its memory figures against memory measured on the debug
model, its pipeline arithmetic by hand, and its answers for emu2-37b.

Measured, on the CPU:
- parameters, gradients and AdamW states: bytes of the real tensors after one AdamW step;
- activations: the storages one forward leaves for backward, counted once each: those autograd
  saves (`saved_tensors_hooks`) plus those created during the forward that are still alive
  after it (a dispatch mode with weak references), which catches what checkpointing holds
  (block inputs) and what the fused head loss keeps outside autograd (its gradients).
  Parameters are not activations, nor are the bf16 casts of parameters that autocast caches:
  those are measured apart, as the casts still alive once the forward's graph is gone. The
  model runs its Triton kernels (through the interpreter), which is what a GPU runs and what
  the formulas describe (flash attention saves no score matrix);
- the same under torch.autocast(bf16), as the engine trains, with CUDA autocast's layer_norm
  policy imitated on the CPU (`_cuda_layer_norm_policy`).
"""

import dataclasses
import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from emu2_engine import plan
from emu2_engine.data.batch import PackedBatch
from emu2_engine.models import Emu2Config, Emu2Model
from emu2_engine.parallel.fsdp import apply_ac
from emu2_engine.kernels import attention as _attention_kernel

REL = 0.10  # the tolerance


# ----------------------------------------------------------------------------------------------
# A real packed batch of the debug model: one row of two documents, two images, one regressed
# ----------------------------------------------------------------------------------------------
def _batch(cfg: Emu2Config, S: int = 128) -> PackedBatch:
    ids, n = cfg.special_ids, cfg.n_query
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, cfg.base_vocab_size, (1, S), generator=g)
    doc = torch.full((1, S), -1, dtype=torch.int32)
    doc[0, :60], doc[0, 60:120] = 0, 1  # 8 tokens of padding
    pos = torch.zeros(1, S, dtype=torch.int32)
    pos[0, :60], pos[0, 60:120] = torch.arange(60), torch.arange(60)
    slots = []
    for start in (5, 70):  # [IMG] <image> x n [/IMG] inside each document
        input_ids[0, start], input_ids[0, start + n + 1] = ids.img, ids.img_end
        input_ids[0, start + 1:start + 1 + n] = ids.image
        slots.append(torch.arange(start + 1, start + 1 + n))
    input_ids[0, 120:] = ids.pad
    labels = torch.cat([input_ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    no_text = (labels == ids.image) | (labels == ids.img) | (labels == ids.img_end) | (labels == ids.pad)
    labels[no_text | (doc < 0)] = -100
    labels[0, 59] = -100  # last token of document 0
    slots = torch.stack(slots)
    batch = PackedBatch(
        input_ids=input_ids, labels=labels, doc_ids=doc, span_ids=torch.full_like(doc, -1),
        position_ids=pos, images=torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g),
        image_slots=slots, reg_images=torch.tensor([1]),
        reg_positions=torch.cat([torch.tensor([69]), slots[1, :-1]])[None])
    batch.validate(cfg.llm.vocab_size, n, cfg.vision.image_size)
    return batch


@pytest.fixture(scope="module")
def debug():
    cfg = Emu2Config.from_preset("debug")
    return cfg, _batch(cfg)


def _workload(batch: PackedBatch, freeze_vision: bool = False) -> plan.Workload:
    B, S = batch.input_ids.shape
    return plan.Workload(seq_len=S, micro_batch=B, global_batch=B,
                         images_per_seq=batch.images.shape[0] // B, freeze_vision=freeze_vision)


# ----------------------------------------------------------------------------------------------
# Parameters, gradients, optimiser states
# ----------------------------------------------------------------------------------------------
def test_parameter_counts_match_the_modules():
    """Every count the plan uses equals the real modules' parameter count (debug on the CPU,
    emu2-37b on the meta device)."""
    for name in ("debug", "emu2-37b"):
        cfg = Emu2Config.from_preset(name)
        with torch.device("meta"):
            model = Emu2Model(cfg)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert plan.model_params(cfg) == count(model)
        assert plan.vit_block_params(cfg.vision) == count(model.visual.blocks["0"])
        assert plan.llama_layer_params(cfg.llm) == count(model.llm.layers["0"])
        assert plan.head_params(cfg) == count(model.lm_head) + count(model.project_down) + count(model.llm.norm)
    assert plan.model_params(Emu2Config.from_preset("emu2-37b")) == pytest.approx(36.9e9, rel=2e-3)


@pytest.mark.parametrize("freeze_vision", [False, True])
def test_states_match_a_real_adamw_step(debug, monkeypatch, freeze_vision):
    """fp32 parameters, fp32 gradients and AdamW's two moments after a real step, against the
    plan on one GPU (tp = pp = dp = 1: nothing is sharded). Freezing the encoder drops its
    gradients and optimiser states, not its parameters."""
    monkeypatch.setenv("EMU2_KERNELS", "reference")
    cfg, batch = debug
    torch.manual_seed(0)
    model = Emu2Model(cfg)
    if freeze_vision:
        model.visual.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-3)
    model(batch).total.backward()
    opt.step()
    measured = {
        "params": sum(p.nbytes for p in model.parameters()),
        "grads": sum(p.grad.nbytes for p in trained),
        "optimizer": sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t)),
    }
    est = plan.estimate(cfg, _workload(batch, freeze_vision), plan.Layout(1, 1, 1, 1, "none"),
                        plan.GPUS["h100-80gb"])
    for key, value in measured.items():
        assert getattr(est, key) == pytest.approx(value, rel=REL), key
    # The counts agree exactly; the optimiser's only extra is one `step` scalar per tensor.
    assert est.params == measured["params"] and est.grads == measured["grads"]
    assert measured["optimizer"] - est.optimizer == 4 * len(trained)


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------
class _Created(TorchDispatchMode):
    """Weak references to the storage of every tensor an op creates, and which of them are
    casts of a parameter (`params`: the parameters' storage addresses)."""

    def __init__(self, params: set[int]):
        super().__init__()
        self.params = params
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.weight_casts: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        cast = (func is torch.ops.aten._to_copy.default
                and args[0].untyped_storage().data_ptr() in self.params)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                s = t.untyped_storage()
                if s._cdata in inputs:
                    continue  # a view of an input, or an input written in place: nothing new
                # A later storage at the same address means the earlier one was freed.
                self.storages[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
                (self.weight_casts.add if cast else self.weight_casts.discard)(s.data_ptr())
        return out


def _measure_activations(model: Emu2Model, batch: PackedBatch) -> tuple[int, int]:
    """Bytes of the distinct storages one forward leaves for backward (see the module doc),
    as (activations, autocast's cached weight casts). Run inside an autocast region, the
    casts of parameters that are still alive once the forward's graph is freed are those the
    autocast cache holds (it keeps them until the region ends); they are not activations."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        # Detached: a node that saves its own output would otherwise hold itself through the
        # output's grad_fn and outlive the graph (this forward is never run backward).
        return t.detach()

    created = _Created(params)
    with created, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch)
    gc.collect()
    alive = {ptr: n for ptr, (ref, n) in created.storages.items() if not ref.expired()}
    kept = {ptr: n for ptr, n in {**saved, **alive}.items() if ptr not in params}
    del loss
    gc.collect()
    cached = {ptr for ptr in created.weight_casts & kept.keys()
              if not created.storages[ptr][0].expired()}
    torch.clear_autocast_cache()
    gc.collect()
    assert all(created.storages[ptr][0].expired() for ptr in cached)  # held by the cache alone
    activations = sum(n for ptr, n in kept.items() if ptr not in cached)
    return activations, sum(kept[ptr] for ptr in cached)


def _interpreter_kernels(monkeypatch):
    """The Triton kernels through the interpreter, with larger blocks than the kernel tests
    use: half the time, the same saved tensors."""
    monkeypatch.setenv("EMU2_KERNELS", "triton")
    monkeypatch.setattr(_attention_kernel, "INTERPRETER_BLOCKS",
                        {"tile": 64, "fwd": (64, 64), "dkdv": (64, 64), "dq": (64, 64)})


@pytest.mark.parametrize("ac, dtype", [("none", torch.float32), ("full", torch.float32),
                                       ("selective", torch.float32), ("none", torch.bfloat16)])
def test_activations_match_measured(debug, monkeypatch, ac, dtype):
    """The formula's activation bytes for the whole debug model (one GPU, one micro-batch)
    against the bytes the forward leaves for backward. bf16 checks the dtype-dependent terms
    (RMSNorm's fp32 copy, the per-layer RoPE casts); the interpreter's bf16 arithmetic is
    wrong but what autograd saves does not depend on the values."""
    _interpreter_kernels(monkeypatch)
    cfg, batch = debug
    torch.manual_seed(0)
    model = Emu2Model(cfg).to(dtype)
    apply_ac(model, ac)  # the engine's checkpointing (parallel/fsdp.py)
    measured, cached = _measure_activations(model, batch)
    whole = plan.Chunk(0, cfg.llm.layers, stem=True, head=True)
    p = plan.FP32_ONLY if dtype == torch.float32 else plan.BF16_ONLY
    want = plan.chunk_activations(cfg, _workload(batch), whole, ac, tp=1, p=p)
    assert want == pytest.approx(measured, rel=REL)
    assert cached == 0  # no autocast, no cache


def _cuda_layer_norm_policy(monkeypatch):
    """Make CPU autocast treat layer_norm as CUDA autocast does. CUDA's autocast puts it on
    its fp32 list (the input is cast to fp32, the output is fp32); CPU's leaves it alone. Of
    the other ops this model runs, those on one device's lists only give the same dtypes here:
    pow and rsqrt (fp32 on CUDA) get fp32 inputs in RMSNorm, and cat and index_put ("promote"
    on one device) get the widest type from eager type promotion on the other."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aten::layer_norm", "AutocastCUDA")
    layer_norm = torch.nn.functional.layer_norm

    def fp32_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        if torch.is_autocast_enabled("cpu"):  # the fp32 policy: every floating input to fp32
            x, weight, bias = (t if t is None else t.float() for t in (x, weight, bias))
        return layer_norm(x, shape, weight, bias, eps)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", fp32_layer_norm)


@pytest.mark.parametrize("ac, params, freeze_vision, fp32_residual", [
    ("none", torch.float32, False, False), ("full", torch.float32, False, False),
    ("selective", torch.float32, False, False), ("none", torch.float32, True, False),
    ("none", torch.bfloat16, False, False), ("full", torch.float32, False, True),
    ("none", torch.float32, False, True)])
def test_autocast_activations_match_measured(debug, monkeypatch, ac, params, freeze_vision,
                                             fp32_residual):
    """How the engine trains: torch.autocast(bf16) over fp32 parameters (one GPU, no FSDP:
    `plan.MIXED`), or over bf16 parameters (what FSDP2 gathers: `plan.MIXED_FSDP`), with the
    residual streams in bf16 or, with `train.fp32_residual`, in fp32 (`plan.MIXED_FP32_RESIDUAL`).
    The activations and the bf16 weight casts that autocast caches for the step, both against
    the formulas. CPU autocast caches weight casts as CUDA's does; its op lists differ from
    CUDA's only in ways `_cuda_layer_norm_policy` makes up for."""
    assert torch.is_autocast_cache_enabled()
    _interpreter_kernels(monkeypatch)
    _cuda_layer_norm_policy(monkeypatch)
    cfg, batch = debug
    torch.manual_seed(0)
    model = Emu2Model(cfg).to(params)
    model.visual.fp32_residual = model.llm.fp32_residual = fp32_residual
    if freeze_vision:
        model.visual.requires_grad_(False)
    apply_ac(model, ac)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured, cached = _measure_activations(model, batch)
    whole = plan.Chunk(0, cfg.llm.layers, stem=True, head=True)
    p = plan.MIXED if params == torch.float32 else plan.MIXED_FSDP
    if fp32_residual:
        p = plan.MIXED_FP32_RESIDUAL
    want = plan.chunk_activations(cfg, _workload(batch, freeze_vision), whole, ac, tp=1, p=p)
    assert want == pytest.approx(measured, rel=REL)
    if params == torch.float32:
        assert plan.BF16 * plan.autocast_cache_params(cfg, whole, freeze_vision) == cached
    else:
        assert cached == 0  # bf16 parameters need no cast


def test_activation_formulas_by_hand():
    """One LLaMA block and one ViT block of emu2-37b at bf16, term by term (bytes per token)."""
    cfg = Emu2Config.from_preset("emu2-37b")
    H, F, heads, D = 6656, 17920, 52, 128
    norm = 4 * H + 4 + 2 * H
    none = 2 * (norm + 2 * H) + 4 * D * 2 + 2 * 4 * H + 4 * heads + 4 * 2 * F
    assert plan.llama_layer_activations(cfg.llm, 1, "none") == none
    assert plan.llama_layer_activations(cfg.llm, 10, "full", tp=2) == 10 * 2 * H // 2
    C, M, T = 1792, 15360, 1025
    vit = 2 * C + 3 * 2 * C + 2 * C + 4 * 16 + 2 * C + 8 + 2 * C + 2 * 2 * M + 2 * C + 8
    assert plan.vit_block_activations(cfg.vision, 1, "none") == T * vit
    # Under sequence parallelism the gathered linear inputs keep their full size.
    assert plan.vit_block_activations(cfg.vision, 1, "none", tp=4) > T * vit // 4
    per_mode = [plan.llama_layer_activations(cfg.llm, 1, ac) for ac in ("full", "selective", "none")]
    assert per_mode == sorted(per_mode) and len(set(per_mode)) == 3


def test_mixed_precision_terms_by_hand(capsys):
    """What autocast changes, by hand, on proxy-1b (bytes per token): with fp32 parameters
    each RMSNorm keeps its normalised tensor in fp32 and every linear it feeds saves its own
    bf16 cast of its output; the residual streams are bf16 unless `train.fp32_residual`; the
    ViT's LayerNorms save an fp32 cast of their input; autocast
    caches a bf16 copy of the trained linears' weights and biases, and only without FSDP."""
    cfg = Emu2Config.from_preset("proxy-1b")
    H, F, D, heads = 2048, 5632, 128, 16
    norm = lambda s, linears: 4 * H + 4 + s * H + linears * 2 * H  # noqa: E731
    rest = 8 * D + 2 * 3 * H + 2 * H + 4 * heads + 4 * 2 * F  # RoPE casts, attention, SwiGLU
    llama = lambda p, ac="none": plan.llama_layer_activations(cfg.llm, 1, ac, p)  # noqa: E731
    assert llama(plan.MIXED) == norm(2, 3) + norm(2, 2) + rest  # bf16 stream, fp32 norm outputs
    assert llama(plan.MIXED_FP32_RESIDUAL) == norm(4, 3) + norm(4, 2) + rest
    assert llama(plan.MIXED_FSDP) == 2 * norm(2, 1) + rest
    assert llama(plan.MIXED, "full") == 2 * H  # the bf16 stream
    assert llama(plan.MIXED_FP32_RESIDUAL, "full") == 4 * H
    C, M, T = 1024, 4096, 1025
    vit = lambda ln: 2 * C + 3 * 2 * C + 2 * C + 4 * 16 + 2 * (ln * C + 8) + 2 * C + 4 * M  # noqa: E731
    block = lambda p: plan.vit_block_activations(cfg.vision, 1, "none", p)  # noqa: E731
    assert block(plan.MIXED) == block(plan.MIXED_FSDP) == T * vit(4)
    assert block(plan.BF16_ONLY) == T * vit(2)

    whole = plan.Chunk(0, cfg.llm.layers, stem=True, head=True)
    linears = 16 * (4 * H * H + 3 * H * F) + 24 * (4 * C * C + 2 * C * M + M + 2 * C) + C
    assert plan.autocast_cache_params(cfg, whole) == linears
    assert plan.autocast_cache_params(cfg, whole, freeze_vision=True) == 16 * (4 * H * H + 3 * H * F)
    wl = plan.Workload(micro_batch=2, global_batch=32, images_per_seq=22)
    gpu = plan.GPUS["h200-141gb"]
    one = plan.estimate(cfg, wl, plan.Layout(1, 1, 1, 1, "none"), gpu)
    assert one.autocast_cache == 2 * linears and one.working == 0  # no FSDP on one GPU
    fsdp = plan.estimate(cfg, wl, plan.Layout(1, 1, 2, 1, "none"), gpu)
    assert fsdp.autocast_cache == 0 and fsdp.working > 0
    # train.fp32_residual (--fp32-residual): fp32 streams cost more without FSDP, nothing with it
    wide = dataclasses.replace(wl, fp32_residual=True)
    assert plan.estimate(cfg, wide, plan.Layout(1, 1, 1, 1, "none"), gpu).activations > one.activations
    assert plan.estimate(cfg, wide, plan.Layout(1, 1, 2, 1, "none"), gpu).activations == fsdp.activations
    args = ["--preset", "proxy-1b", "--gpus", "1", "--micro-batch", "2", "--global-batch", "32",
            "--images-per-seq", "22", "--top", "1"]
    assert plan.main(args) == 0
    default = capsys.readouterr().out
    assert plan.main(args + ["--fp32-residual"]) == 0
    assert "fp32 residual streams" in capsys.readouterr().out and "fp32 residual" not in default


# ----------------------------------------------------------------------------------------------
# Pipeline arithmetic
# ----------------------------------------------------------------------------------------------
def test_in_flight_micro_batches():
    assert [plan.in_flight(4, 1, 32, r) for r in range(4)] == [[4], [3], [2], [1]]
    assert plan.in_flight(4, 1, 2, 0) == [2]  # fewer micro-batches than stages
    # Interleaved, pp = 4, v = 2: rank 0 runs 4 + 6 + 1 = 11 forwards before its first
    # backward, 4 per chunk in turn: chunk 0 gets 4 + 3 = 2 pp - 1, chunk 1 gets 4.
    assert plan.in_flight(4, 2, 32, 0) == [7, 4]
    assert plan.in_flight(4, 2, 32, 3) == [4, 1]


def test_split_balances_flops_with_the_vit_on_stage_0():
    cfg = Emu2Config.from_preset("emu2-37b")
    wl = plan.Workload(images_per_seq=8)
    chunks = plan.split_chunks(cfg, wl, 2)
    assert [c.stem for c in chunks] == [True, False] and [c.head for c in chunks] == [False, True]
    assert sum(c.layers for c in chunks) == 60
    costs = [plan.chunk_flops(cfg, wl, c) for c in chunks]
    layer = plan.chunk_flops(cfg, wl, plan.Chunk(1, 1, False, False))
    assert abs(costs[0] - costs[1]) <= layer  # balanced to within one layer
    # With four stages the ViT alone outweighs a quarter of the model: stage 0 gets no layer.
    four = plan.split_chunks(cfg, wl, 4)
    assert four[0].layers == 0 and all(c.layers >= 1 for c in four[1:])
    assert plan.split_chunks(cfg, wl, 62) is None  # more stages than layers + 1


def test_bubble_and_single_gpu_efficiency(debug):
    cfg = Emu2Config.from_preset("emu2-37b")
    wl = plan.Workload(global_batch=512)
    gpu = plan.GPUS["h100-80gb"]
    est = plan.estimate(cfg, wl, plan.Layout(4, 4, 4, 1, "full", virtual=2), gpu)
    m = 512 // 4
    assert est.bubble == pytest.approx(3 / (m * 2 + 3))
    # One GPU, no checkpointing: nothing to lose; full checkpointing re-runs the blocks'
    # forward, so the step costs at most 4/3 of the ideal.
    dcfg, batch = debug
    one = plan.estimate(dcfg, _workload(batch), plan.Layout(1, 1, 1, 1, "none"), gpu)
    full = plan.estimate(dcfg, _workload(batch), plan.Layout(1, 1, 1, 1, "full"), gpu)
    assert one.efficiency == pytest.approx(1.0) and one.bubble == 0
    assert 0.75 <= full.efficiency < 0.8


# ----------------------------------------------------------------------------------------------
# The answers
# ----------------------------------------------------------------------------------------------
def test_emu2_37b_on_64_h100(capsys):
    cfg = Emu2Config.from_preset("emu2-37b")
    gpu = plan.GPUS["h100-80gb"]
    rows, refused = plan.plan(cfg, 64, gpu, plan.Workload())
    best = rows[0]
    assert best.fits and best.total <= plan.usable_memory(gpu) < 80 * 1e9
    assert best.layout.gpus == 64
    assert all(e.layout.dp_shard > 1 or e.layout.dp_replicate == 1 for e in rows)  # HSDP needs sharding
    assert "parallel.tp = 8 must divide llm.heads (52) of the model 'emu2-37b'" in refused
    assert all(e.layout.tp in (1, 2, 4) for e in rows)
    fitting = [e for e in rows if e.fits]
    assert best.efficiency == max(e.efficiency for e in fitting)
    assert any(not e.fits for e in rows)  # some layouts do not fit (e.g. tp=1 pp=1 without checkpointing)
    assert plan.main(["--preset", "emu2-37b", "--gpus", "64", "--gpu", "h100-80gb", "--top", "5"]) == 0
    out = capsys.readouterr().out
    lay = best.layout
    assert (f"tp={lay.tp} pp={lay.pp} dp_shard={lay.dp_shard} dp_replicate={lay.dp_replicate}"
            in out.split("recommended")[1])
    assert f"activation_checkpoint={lay.ac} microbatches={2048 // (lay.dp_shard * lay.dp_replicate)}" in out
    assert sum(line.endswith((" yes", " no")) for line in out.splitlines()) == 5  # --top 5 rows


def test_layouts_the_engine_refuses_are_ruled_out():
    """12 sequences on 16 GPUs: dp must divide the batch, and a pipeline needs at least pp
    micro-batches (the engine's ParallelConfig check, message and all)."""
    cfg = Emu2Config.from_preset("emu2-37b")
    rows, refused = plan.plan(cfg, 16, plan.GPUS["h100-80gb"], plan.Workload(global_batch=12))
    assert "tp=1 pp=1: global batch 12 is not a multiple of dp x micro-batch = 16 x 1" in refused
    assert ("tp=1 pp=4 1f1b: parallel.microbatches (3) must be at least pp (4) to fill the pipeline"
            in refused)
    for e in rows:
        lay = e.layout
        m = 12 // (lay.dp_shard * lay.dp_replicate)
        assert 12 % (lay.dp_shard * lay.dp_replicate) == 0 and (lay.pp == 1 or m >= lay.pp)


def test_impossible_request_says_nothing_fits(capsys):
    assert plan.main(["--preset", "emu2-37b", "--gpus", "1", "--global-batch", "8"]) == 1
    out = capsys.readouterr().out
    assert "NOTHING FITS" in out and "recommended" not in out


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        plan.main(["--gpus", "0"])
    assert "--gpus must be >= 1" in capsys.readouterr().err
    # what the trainer would refuse is not planned: rows longer than the model's positions,
    # images that do not fit in a row
    with pytest.raises(SystemExit):
        plan.main(["--gpus", "64", "--seq-len", "4096"])
    assert "--seq-len 4096 exceeds the emu2-37b model's max_positions (2048)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plan.main(["--gpus", "64", "--images-per-seq", "40"])
    assert "need 2642 tokens, more than --seq-len 2048" in capsys.readouterr().err


def test_layouts_follow_the_trainers_rules_on_sequence_length(capsys):
    """tp must divide the sequence length (sequence parallelism): 2046 tokens rule out tp = 4.
    emu2-chat-37b's images take 258 tokens: by default as many as fit (7), not 8."""
    plan.main(["--gpus", "64", "--seq-len", "2046", "--top", "0"])
    out = capsys.readouterr().out
    assert "ruled out: tp=4: sequence parallelism needs the sequence length (2046) to be a multiple of tp" in out
    assert not [line for line in out.splitlines() if line.startswith("  4 ")]
    plan.main(["--preset", "emu2-chat-37b", "--gpus", "64", "--top", "1"])
    assert "7 images per sequence" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # one line, as for every other bad argument
        plan.main(["--preset", "nope", "--gpus", "8"])
    assert "error: unknown model preset 'nope'" in capsys.readouterr().err


def test_video_frames_of_a_chat_model(capsys):
    """Emu2-Chat's frames take 64 slots (66 tokens), its images 256 (258): a 16-frame video is
    1 + 16 x 66 = 1,057 tokens, and the 2,048 - 2 - 1,057 = 989 tokens left hold 3 images (the
    default: as many as fit). Every frame goes through the encoder like an image; only the
    label-free tokens differ."""
    chat = Emu2Config.from_preset("emu2-chat-37b")
    wl = plan.Workload(seq_len=2048, images_per_seq=3, frames_per_seq=16)
    assert wl.images == 19 and wl.visual_span(chat) == 3 * 258 + 1 + 16 * 66
    # the encoder costs the same per input; the projector needs 64 rows for a frame, not 256,
    # and the head counts more text rows when 4 of 5 inputs are frames of 66 tokens (after one
    # [VIDEO]) instead of images of 258
    chunk = plan.Chunk(index=0, layers=0, stem=True, head=True)
    video = plan.Workload(seq_len=2048, images_per_seq=1, frames_per_seq=4)
    as_images = plan.Workload(seq_len=2048, images_per_seq=5)
    head_rows = 4 * (258 - 66) - 1
    per_row = plan.head_flops(chat, 1, 0)
    projector = 4 * plan.projector_flops_per_image(chat, 256 - 64)
    assert (plan.chunk_flops(chat, video, chunk) - plan.chunk_flops(chat, as_images, chunk)
            == 3 * (head_rows * per_row - projector))
    plan.main(["--preset", "emu2-chat-37b", "--gpus", "64", "--frames-per-seq", "16", "--top", "1"])
    assert "3 images per sequence, a video of 16 frames" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        plan.main(["--preset", "emu2-chat-37b", "--gpus", "64", "--frames-per-seq", "16", "--images-per-seq", "4"])
    assert ("and a video of 16 frames of 66 tokens after [VIDEO] (--frames-per-seq) and <s> </s> "
            "need 2091 tokens" in capsys.readouterr().err)
    with pytest.raises(SystemExit):  # the video alone does not fit: the images are not named
        plan.main(["--preset", "emu2-chat-37b", "--gpus", "64", "--frames-per-seq", "40"])
    err = capsys.readouterr().err.splitlines()[-1]  # (the usage lines name every flag)
    assert "error: a video of 40 frames of 66 tokens" in err and "--images-per-seq" not in err
    with pytest.raises(SystemExit):
        plan.main(["--gpus", "64", "--frames-per-seq", "-1"])
    assert "--frames-per-seq and --top must be >= 0" in capsys.readouterr().err
