"""One process (no mesh): the [parallel] section's activation checkpointing and compile still
apply, as they do under torchrun."""

import copy
import dataclasses
import warnings

import pytest
import torch

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


def test_padding_images_are_dropped_without_changing_the_step(tmp_path):
    """Without a pipeline schedule the step drops the loader's padding images before the
    encoder: same loss and gradients as the padded batch (fp32), counts taken before; a batch
    with no real image keeps one slot so the encoder still runs (FSDP ranks must all gather it)."""
    import torch

    trainer = Trainer(tiny_config(tmp_path / "pad", "--data.prefetch=0"))
    batch = next(trainer.loader)
    n_real, slots = batch.n_images, batch.images.shape[0]
    assert 0 < n_real < slots, "the tiny config must pad its micro-batches for this test"
    (moved,) = list(trainer.micro_batches([batch], 1))
    assert moved.images.shape[0] == n_real and moved.image_slots.shape[0] == n_real
    assert bool(moved.image_mask.all())
    # the trainer's batches were validated, so they carry their text rows; a MicroBatches whose
    # flops_of does not validate adds none (the head loss then checks the labels itself)
    assert torch.equal(moved.text_rows, (batch.labels.reshape(-1) != -100).nonzero().squeeze(1))
    (unchecked,) = list(MicroBatches([batch], 1, trainer.device, lambda b: 0))
    assert unchecked.text_rows is None

    def loss_and_grads(b):
        trainer.model.zero_grad(set_to_none=True)
        out = trainer.model(b)
        out.total.backward()
        return out.total.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                    if p.grad is not None}

    want_loss, want = loss_and_grads(batch)
    got_loss, got = loss_and_grads(moved)
    assert got.keys() == want.keys() and any(n.startswith("visual.") for n in got)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)

    # no real image: one padding slot stays; a hand-built batch without a mask is left alone
    empty = batch.without_padding_images()
    empty.image_mask = torch.zeros_like(empty.image_mask)
    empty.image_slots = torch.full_like(empty.image_slots, -1)
    empty.reg_images = empty.reg_images[:0]
    empty.reg_positions = empty.reg_positions[:0]
    kept = empty.without_padding_images()
    assert kept.images.shape[0] == 1 and not bool(kept.image_mask.any())
    hand = batch.without_padding_images()
    hand.image_mask = None
    assert hand.without_padding_images() is hand


@pytest.mark.gpu
def test_side_stream_copies_are_safe_while_the_gpu_is_busy(tmp_path):
    """On CUDA the micro-batches are copied on the side stream (pinned, non-blocking, images cast
    there). Images of 150 MB make each copy slow: a read queued right after a micro-batch is
    taken would see a partial copy without the compute stream's wait, and a read queued behind
    long compute work, still pending when the next copy starts, would see that copy's data in
    its buffer without `record_stream`. Both reads stay on the GPU until the end."""
    import torch

    from emu2_engine.data.prefetch import pin_batch
    from emu2_engine.train.trainer import copy_stream

    device = torch.device("cuda")
    trainer = Trainer(tiny_config(tmp_path / "cpu", "--data.prefetch=0", "--train.device=cpu"))
    base = next(trainer.loader)
    g = torch.Generator().manual_seed(0)
    batches = [pin_batch(dataclasses.replace(base, images=torch.randn(64, 3, 448, 448, generator=g)))
               for _ in range(4)]
    busy = torch.randn(4096, 4096, device=device)
    first_reads, late_reads = [], []
    for moved in MicroBatches(iter(batches), 4, device, lambda b: 0, torch.bfloat16):
        first_reads.append(moved.images.float().sum())
        for _ in range(8):  # about 10 ms of queued work before the late read
            busy = torch.tanh(busy @ busy)
        late_reads.append((moved.images.float() * 2).sum())
        del moved  # its memory may go to the next copy: record_stream must hold it back
    torch.cuda.synchronize()
    assert copy_stream(device) is copy_stream(torch.device("cuda", torch.cuda.current_device()))
    for b, first, late in zip(batches, first_reads, late_reads):
        want = b.images.to(device).to(torch.bfloat16).float()
        torch.testing.assert_close(first, want.sum(), rtol=1e-6, atol=0)
        torch.testing.assert_close(late, (want * 2).sum(), rtol=1e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_the_cuda_step_never_waits_for_the_gpu(tmp_path, compile):
    """Forward and backward of a step's micro-batches make no host synchronisation on CUDA
    (`torch.cuda.set_sync_debug_mode("error")` raises at the first one), so the CPU can queue
    work ahead of the GPU: a sync in the middle of a step drains the GPU's queue, and proxy-1b's
    profiles show 12-31 ms of GPU idle per micro-batch (session 6). A first step warms up what
    may sync once (autotuning, compilation, the conv tuner); the step's own end (the loss and
    gradient norm read back) is outside the check."""
    import torch

    from emu2_engine.data.prefetch import pin_batch

    flag = f"--parallel.compile={str(compile).lower()}"
    trainer = Trainer(tiny_config(tmp_path / "run", "--train.device=cuda", "--train.dtype=bf16",
                                  "--data.prefetch=0", "--parallel.microbatches=2", flag))
    batches = [pin_batch(next(trainer.loader)) for _ in range(2)]
    trainer.step(trainer.micro_batches(iter(batches), 2))
    torch.cuda.synchronize()
    micro = trainer.micro_batches(iter(batches), 2)
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = trainer.forward_backward(micro)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(losses).all()


@pytest.mark.parametrize("fp32_residual", [False, True])
def test_residual_streams_under_autocast(tmp_path, fp32_residual):
    """Under bf16 autocast the ViT's and the LLM's blocks get bf16 residual streams (their
    inputs and outputs), or fp32 ones with train.fp32_residual; the loss agrees between the two
    within bf16's resolution."""
    import torch

    flag = f"--train.fp32_residual={str(fp32_residual).lower()}"
    trainer = Trainer(tiny_config(tmp_path / "run", "--train.dtype=bf16", "--data.prefetch=0", flag))
    model = trainer.model
    seen = []
    for blocks in (model.visual.blocks, model.llm.layers):
        for block in blocks.values():
            block.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    batch = next(trainer.loader)
    with trainer.autocast():
        loss = model(batch).total
    want = torch.float32 if fp32_residual else torch.bfloat16
    assert len(seen) == len(model.visual.blocks) + len(model.llm.layers)
    assert all(pair == (want, want) for pair in seen), seen
    model.visual.fp32_residual = model.llm.fp32_residual = not fp32_residual
    with trainer.autocast():
        other = model(batch).total
    torch.testing.assert_close(loss.float(), other.float(), rtol=2e-2, atol=2e-2)


# aten ops whose result size or value the host must read from the device: on CUDA each one is a
# host synchronisation (`.item()`, `bool(t)`, `int(t)` become _local_scalar_dense or is_nonzero).
_READS_BACK = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "masked_scatter",
                         "equal", "allclose", "unique_dim", "_unique2", "unique_consecutive",
                         "repeat_interleave", "argwhere", "bincount", "histc"})


# Tensor methods that hand a value to Python or move it to the host: on a CPU tensor some of
# them dispatch no aten op (tolist, numpy, cpu), so the scan catches them at the Python level.
_TO_HOST = frozenset({"tolist", "numpy", "cpu", "item", "__bool__", "__int__", "__float__", "__index__"})


def _reads_back(trainer, batches) -> dict[str, int]:
    """The read-back ops (`_READS_BACK`, and indexing with a boolean mask) that one
    `Trainer.forward_backward` over `batches` (already moved) dispatches, and the calls of
    `_TO_HOST` methods (and ``.to`` a CPU device) made outside the Triton interpreter (which
    runs the kernels on the host by design), with their counts. Also the tensors built from
    Python data on a device (``torch.tensor(3, device=d)``): on CUDA that is a copy from pageable
    memory, which PyTorch follows with a stream synchronisation (``torch.full`` fills on the
    device instead)."""
    import collections
    import sys

    import torch

    _FROM_HOST_DATA = (torch.tensor, torch.as_tensor)
    from torch._library.custom_ops import OPDEFS
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: collections.Counter = collections.Counter()

    def to_cpu(args, kwargs) -> bool:
        places = list(args[1:]) + [kwargs.get("device")]
        return any(isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu" for a in places
                   if a is not None and not isinstance(a, torch.dtype))

    def in_interpreter() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if "/triton/" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if (name in _TO_HOST or (name == "to" and to_cpu(args, kwargs))) and not in_interpreter():
                seen[f"Tensor.{name}"] += 1
            if func in _FROM_HOST_DATA and kwargs.get("device") is not None and args \
                    and not isinstance(args[0], torch.Tensor) and not in_interpreter():
                seen[f"torch.{name}(data, device=...)"] += 1
            return func(*args, **kwargs)

    def boolean_index(args) -> bool:
        return any(isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                                        for t in a) for a in args)

    calls = Calls()

    class Scan(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func._schema.name.split("::")[-1]
            if name in _READS_BACK or (name.startswith("index") and boolean_index(args)):
                seen[name] += 1
            seen["(all)"] += 1
            opdef = OPDEFS.get(func._schema.name)
            if opdef is not None:
                # one of the engine's custom ops (the head loss, the attention kernels, ...):
                # both modes are off while a handler runs, and the op's body would run unseen,
                # so run its body here under both, as the op itself would run it
                seen["(custom ops)"] += 1
                devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
                body = next((opdef._backend_fns[d] for d in devices if d in opdef._backend_fns), opdef._init_fn)
                with calls, self:
                    return body(*args, **kwargs)
            return func(*args, **kwargs)

    with calls, Scan():
        losses = trainer.forward_backward(batches)
    assert torch.isfinite(losses).all()
    return dict(seen)


def test_the_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """The CPU's view of `test_the_cuda_step_never_waits_for_the_gpu`, run in every CI: with
    the ops CUDA's auto choice runs (the Triton kernels, through the interpreter here, and SDPA
    for unmasked attention), a step's forwards and backwards (bf16 autocast, the weights cast
    once per step, 2 micro-batches, after a first step) dispatch no op that reads a value back to
    the host, and call no tensor method that hands a value to Python; with the fused gradient
    accumulation too. The scan sees the backward too, and it catches the reference path, whose
    head loss and attention do read back."""
    monkeypatch.setenv("EMU2_KERNELS", "triton,dense_attention=reference")
    trainer = Trainer(tiny_config(tmp_path / "run", "--train.dtype=bf16", "--data.prefetch=0",
                                  "--parallel.microbatches=2"))
    batches = [next(trainer.loader) for _ in range(2)]
    trainer.step(trainer.micro_batches(iter(batches), 2))
    moved = list(trainer.micro_batches(iter(batches), 2))  # validation reads the CPU batch: not scanned
    seen = _reads_back(trainer, moved)
    assert seen.pop("(all)") > 500  # forward and backward ops were seen
    assert seen.pop("(custom ops)") >= 4  # and the bodies of the engine's custom ops
    assert seen == {}, f"ops that read back from the device inside a step: {seen}"
    monkeypatch.setenv("EMU2_KERNELS", "reference")
    moved = list(trainer.micro_batches(iter(batches[:1]), 1))
    caught = _reads_back(trainer, moved)
    assert caught.get("_local_scalar_dense", 0) > 0 and caught.get("nonzero", 0) > 0, caught
    assert caught.get("Tensor.__bool__", 0) > 0, caught  # the reference's one-document test
    # a tensor built from Python data on the device, as the fused head loss once built its
    # text-row count: caught
    import torch

    from emu2_engine.kernels import head_loss as fused_head_loss

    monkeypatch.setenv("EMU2_KERNELS", "triton,dense_attention=reference")
    with monkeypatch.context() as m:
        m.setattr(fused_head_loss, "device_count", lambda n, device: torch.tensor(n, dtype=torch.int64, device=device))
        moved = list(trainer.micro_batches(iter(batches[:1]), 1))
        assert _reads_back(trainer, moved).get("torch.tensor(data, device=...)", 0) == 1
    # and the Python-level catch sees what dispatches nothing on the CPU: the head loss's range
    # check reads its flags with .tolist() when a batch carries no text rows
    monkeypatch.setenv("EMU2_KERNELS", "triton,dense_attention=reference")
    moved = [dataclasses.replace(b, text_rows=None) for b in trainer.micro_batches(iter(batches[:1]), 1)]
    assert _reads_back(trainer, moved).get("Tensor.tolist", 0) == 1
    fused = Trainer(tiny_config(tmp_path / "fused", "--train.dtype=bf16", "--data.prefetch=0",
                                "--train.grad_accumulation_fusion=true"))
    fused.step(fused.micro_batches(iter(batches[:1]), 1))
    seen = _reads_back(fused, list(fused.micro_batches(iter(batches[1:]), 1)))
    assert seen.pop("(all)") > 500 and seen.pop("(custom ops)") >= 4 and seen == {}, seen


def test_the_cuda_allocator_gets_expandable_segments_unless_configured(monkeypatch):
    """On CUDA the trainer's device setup asks PyTorch's allocator for expandable segments (as
    torchtitan's launcher does), unless PYTORCH_ALLOC_CONF or PYTORCH_CUDA_ALLOC_CONF says
    otherwise."""
    import torch

    from emu2_engine.train import trainer as trainer_module
    from emu2_engine.train.trainer import ALLOC_CONF_VARS, prefer_expandable_segments, rank_device

    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    for var in ALLOC_CONF_VARS:
        monkeypatch.delenv(var, raising=False)
    assert prefer_expandable_segments() and calls == ["expandable_segments:True"]
    for var in ALLOC_CONF_VARS:
        monkeypatch.setenv(var, "max_split_size_mb:128")
        assert not prefer_expandable_segments() and calls == ["expandable_segments:True"]
        monkeypatch.delenv(var)
    # rank_device on a CUDA device is where the trainers get it
    monkeypatch.setattr(trainer_module, "pick_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    assert rank_device("cuda", "auto") == (torch.device("cuda", 0), torch.bfloat16)
    assert calls == ["expandable_segments:True"] * 2


@pytest.mark.gpu
def test_a_cuda_trainer_allocates_expandable_segments(tmp_path, monkeypatch):
    """Starting from fixed-size segments, a CUDA trainer's model lands in expandable ones (the
    segments holding its parameters, found in the allocator's snapshot; earlier tests' leftovers
    may sit in either kind). The setting is put back to fixed afterwards."""
    import torch

    from emu2_engine.train.trainer import ALLOC_CONF_VARS, allocator_settings_call

    for var in ALLOC_CONF_VARS:
        monkeypatch.delenv(var, raising=False)
    settle = allocator_settings_call()
    settle("expandable_segments:False")
    torch.cuda.empty_cache()
    try:
        trainer = Trainer(tiny_config(tmp_path / "run", "--train.device=cuda", "--data.prefetch=0"))
        trainer.step(trainer.micro_batches(trainer.loader, 1))
        segments = torch.cuda.memory_snapshot()

        def segment_of(t):
            return next(seg for seg in segments
                        if seg["address"] <= t.data_ptr() < seg["address"] + seg["total_size"])

        params = [p for p in trainer.model.parameters() if p.numel() >= 1024]
        kinds = {bool(segment_of(p).get("is_expandable")) for p in params}
        assert params and kinds == {True}, kinds
    finally:
        settle("expandable_segments:False")


def test_one_copy_stream_per_gpu_for_the_process(monkeypatch):
    """`copy_stream` makes the side stream once per GPU (the caching allocator pools memory per
    stream; a new stream per step would strand each step's batch buffers in a pool of its own).
    On the CPU with a stand-in for torch.cuda.Stream; the GPU test above checks the real one."""
    import torch

    from emu2_engine.train import trainer as trainer_module

    made = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: made.append(device) or object())
    trainer_module._copy_stream.cache_clear()
    try:
        first = trainer_module.copy_stream(torch.device("cuda", 0))
        assert trainer_module.copy_stream(torch.device("cuda", 0)) is first
        assert trainer_module.copy_stream(torch.device("cuda", 1)) is not first
        assert made == [torch.device("cuda", 0), torch.device("cuda", 1)]
    finally:
        trainer_module._copy_stream.cache_clear()


def test_grounding_check_gives_a_one_image_batch_another_image(tmp_path, monkeypatch):
    """The held-out pass can end on a batch with one image, where rolling the images changes
    nothing (right and wrong would be one number, pulling the gap towards 0): that batch gets
    the previous batch's last image instead; a first batch of one, with no image before it,
    is not scored."""
    from emu2_engine.data.loader import heldout_caption_loader
    from emu2_engine.train import trainer as trainer_module

    trainer = Trainer(tiny_config(tmp_path, "--train.steps=2"))
    batches = list(heldout_caption_loader(trainer.cfg.data, trainer.tokenizer, trainer.model_cfg))
    full = batches[0]
    assert full.n_images > 1
    k = int(full.image_mask.sum()) - 1  # keep the first image only
    one = dataclasses.replace(full, images=full.images.clone(), image_mask=full.image_mask.clone(),
                              image_slots=full.image_slots.clone(), reg_images=full.reg_images[:0],
                              reg_positions=full.reg_positions[:0])
    first, last = full.images[0].clone(), full.images[k].clone()  # (the check swaps in place)
    one.image_mask[1:] = False
    one.image_slots[1:] = -1
    seen = []
    trainer.model.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].images[args[0].image_mask].clone()))
    monkeypatch.setattr(trainer_module, "heldout_caption_loader", lambda *a: iter([one, full, one]))
    out = trainer.evaluate_grounding(5)
    assert out["heldout_caption_batches"] == 2  # the leading one-image batch is skipped
    # calls: full right, full wrong, one right, one wrong
    assert len(seen) == 4
    assert torch.equal(seen[2][0], first) and torch.equal(seen[3][0], last)
    assert out["heldout_caption_ce"] != out["heldout_caption_ce_wrong_images"]
    # only one-image batches: every one but the first is scored against the one before it
    seen.clear()
    monkeypatch.setattr(trainer_module, "heldout_caption_loader", lambda *a: iter([one, one, one]))
    out = trainer.evaluate_grounding(5)
    assert out["heldout_caption_batches"] == 2 and len(seen) == 4
    # a single image in all: nothing to compare, the check says so instead of failing the run
    monkeypatch.setattr(trainer_module, "heldout_caption_loader", lambda *a: iter([one]))
    assert trainer.evaluate_grounding(5) == {}


def _step_grads(run_dir, batches, *extra) -> tuple[list[torch.Tensor], float]:
    """The gradients AdamW steps with (and the norm the step reports) for one step of a fresh
    trainer (same seed, same initial weights) on `batches`."""
    trainer = Trainer(tiny_config(run_dir, "--train.steps=1", "--optim.warmup_steps=0", "--data.prefetch=0",
                                  f"--parallel.microbatches={len(batches)}", *extra))
    grads, step = [], trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: grads.extend(
        p.grad.clone() for p in trainer.model.parameters() if p.grad is not None) or step(*a, **k)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*optimizer.step\\(\\)` has been overridden")
        result = trainer.step(batches)
    return grads, result.grad_norm


def test_a_step_steps_with_the_micro_batches_mean_gradient_clipped_once(tmp_path):
    """The gradient of a step is the mean over its micro-batches (one batch twice = that batch
    once), and clipping scales that accumulated gradient once, after the last micro-batch (a
    clip per micro-batch would change its direction)."""
    source = Trainer(tiny_config(tmp_path / "src", "--data.prefetch=0"))
    b1, b2 = next(source.loader), next(source.loader)
    once, norm_once = _step_grads(tmp_path / "once", [b1], "--optim.grad_clip=0")
    twice, norm_twice = _step_grads(tmp_path / "twice", [b1, copy.deepcopy(b1)], "--optim.grad_clip=0")
    assert norm_twice == pytest.approx(norm_once, rel=1e-5) and len(once) == len(twice) > 0
    for a, b in zip(once, twice):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * norm_once)
    free, norm = _step_grads(tmp_path / "free", [b1, b2], "--optim.grad_clip=0")
    clip = norm / 7
    clipped, reported = _step_grads(tmp_path / "clipped", [b1, b2], f"--optim.grad_clip={clip}")
    assert reported == pytest.approx(norm, rel=1e-5)   # the norm before clipping
    for a, b in zip(free, clipped):
        torch.testing.assert_close(b, a * (clip / norm), rtol=1e-4, atol=1e-7 * norm)


def test_frozen_components_cost_no_weight_gradients_in_the_flop_count(tmp_path):
    """A step's FLOPs as the trainer counts them for MFU: 3x the forward when everything trains;
    a frozen encoder counts its forward only; a frozen LLM (optim.lr = 0) counts no weight
    gradients for its linear layers and heads (2x), its attention still 3x."""
    from emu2_engine.models.flops import batch_flops

    source = Trainer(tiny_config(tmp_path / "src", "--data.prefetch=0"))
    batch = next(source.loader)
    fwd = batch_flops(source.model_cfg, batch)
    assert fwd["vit"] > 0 and fwd["llm_linear"] > 0 and fwd["heads"] > 0
    assert source.batch_flops(batch) == 3 * fwd["total"]
    no_vision = Trainer(tiny_config(tmp_path / "nv", "--optim.lr_vision=0"))
    assert no_vision.batch_flops(batch) == 3 * fwd["total"] - 2 * fwd["vit"]
    no_llm = Trainer(tiny_config(tmp_path / "nl", "--optim.lr=0"))
    assert no_llm.batch_flops(batch) == (3 * fwd["total"] - fwd["llm_linear"] - fwd["heads"])
