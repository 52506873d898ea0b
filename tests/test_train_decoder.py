"""Decoder training on the CPU: the loss falls, resume repeats the uninterrupted run exactly,
checkpoints (DCP) are atomic and pruned, SIGTERM stops with a checkpoint, the prefetch thread
gives the unprefetched losses and ends with the run however it ends, CFG dropout and the
noise offset do what they say, the video decoder trains, and bad configs are refused in one
line. Two gloo ranks (one spawn, `tests/decoder_worker.py`) train with the UNet sharded by
FSDP2 like one process, stop together when one of them is signalled, and resume exactly."""

import json
import math
import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from torch.distributed.tensor import Shard

import decoder_worker as worker
from emu2_engine import train_decoder
from emu2_engine.checkpoint.dcp import complete_checkpoints
from emu2_engine.data.prefetch import Prefetcher
from emu2_engine.models.unet3d import VideoUNet
from emu2_engine.train.decoder import (DecoderJobConfig, DecoderTrainer, build_vae, offset_noise,
                                       unet_units)
from emu2_engine.train.optim import lr_factor
from emu2_engine.train.decoder_data import HELD_OUT_SEED_OFFSET, InMemoryData, make_batch, moving_shapes_clip
from emu2_engine.train.trainer import STOPPED_FILE

pytest.importorskip("diffusers")
REPO = Path(__file__).resolve().parent.parent


def _cfg(tmp_path, *overrides) -> DecoderJobConfig:
    return DecoderJobConfig.load(None, [f"--train.run_dir={tmp_path}", "--train.log_every=1",
                                        "--optim.warmup_steps=2", *overrides])


def test_loss_falls_on_the_debug_config(tmp_path, capsys):
    """30 steps of the default run at batch 4 (a few seconds): the held-out denoising loss,
    measured with fixed noise and timesteps before and after, falls by a fifth at least (1.07 ->
    0.38 on our machine)."""
    rc = train_decoder.main(["--no-progress", "--train.steps=30", "--train.log_every=1",
                             "--data.batch_size=4", "--train.eval_batches=1", "--train.save_every=30",
                             f"--train.run_dir={tmp_path}"])
    assert rc == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    before, steps, after = lines[0], lines[1:-1], lines[-1]
    assert before["step"] == 0 and after["step"] == 30 and [r["step"] for r in steps] == list(range(1, 31))
    losses = [r["loss"] for r in steps]
    assert all(math.isfinite(x) for x in losses)
    assert after["heldout_loss"] < 0.8 * before["heldout_loss"], (before, after)
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5, losses
    assert all(r["grad_norm"] > 0 for r in steps)
    cfg = DecoderJobConfig.load(tmp_path / "config.toml")
    assert cfg.train.steps == 30
    # each step logs the learning rate its update used: warm-up, then linear decay that reaches 0
    # one step after the last, so the last update still moves the weights
    want = [cfg.optim.lr * lr_factor(k, 30, cfg.optim) for k in range(30)]
    assert [r["lr"] for r in steps] == pytest.approx(want, rel=1e-12)
    assert steps[0]["lr"] < steps[cfg.optim.warmup_steps - 1]["lr"] == cfg.optim.lr and steps[-1]["lr"] > 0
    assert [s for s, _ in complete_checkpoints(tmp_path / "checkpoints")] == [30]
    assert "held-out denoising loss" in capsys.readouterr().out


def test_resume_repeats_the_uninterrupted_losses(tmp_path):
    whole = DecoderTrainer(_cfg(tmp_path / "a", "--train.steps=6", "--train.save_every=3",
                                "--train.eval_batches=0", "--data.batch_size=2"))
    want = [r["loss"] for r in whole.train(progress=False)]
    cfg = _cfg(tmp_path / "b", "--train.steps=6", "--train.save_every=3", "--train.eval_batches=0",
               "--data.batch_size=2")
    first = DecoderTrainer(cfg).train(progress=False, stop_at=4)  # saved at step 3, then "crashes"
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    resumed = DecoderTrainer(cfg)  # a new process: fresh model, optimiser and schedule
    records = resumed.train(progress=False)
    assert records[0] == {"resumed_from": 3}
    got = [r["loss"] for r in records[1:]]
    assert [r["step"] for r in records[1:]] == [4, 5, 6]
    assert got == want[3:]  # bit-identical: data and noise are functions of the step
    for (k, v), w in zip(resumed.unet.state_dict().items(), whole.unet.state_dict().values()):
        assert torch.equal(v, w), k


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    import torch.distributed.checkpoint as dcp

    args = ["--train.steps=5", "--train.save_every=2", "--train.keep=2", "--train.eval_batches=0",
            "--data.batch_size=1", "--data.image_size=32"]
    trainer = DecoderTrainer(_cfg(tmp_path, *args))
    trainer.train(progress=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000005"]  # every 2 steps and the last; newest 2 kept
    saved = dcp.FileSystemReader(str(tmp_path / "checkpoints" / "step-000005")).read_metadata()
    keys = set(saved.state_dict_metadata)
    assert {k.split(".")[0] for k in keys} == {"app", "train", "rng", "scheduler", "nonfinite"}
    assert {f"app.model.{n}" for n, _ in trainer.unet.named_parameters()} <= keys
    assert any(k.startswith("app.optimizer.state.") and k.endswith("exp_avg_sq") for k in keys)
    assert not any("encoder" in k or "vae" in k for k in keys)  # the frozen parts are not saved
    # A half-written checkpoint (a crash before the rename) is never picked up.
    (tmp_path / "checkpoints" / "step-000009.tmp").mkdir()
    (tmp_path / "checkpoints" / "step-000009").mkdir()  # a folder without DCP's index
    assert [p.name for _, p in complete_checkpoints(tmp_path / "checkpoints")] == names
    again = DecoderTrainer(_cfg(tmp_path, *args))  # the run is complete: resumes at 5, trains nothing
    assert again.train(progress=False) == [{"resumed_from": 5}]
    for (name, a), b in zip(trainer.unet.state_dict().items(), again.unet.state_dict().values()):
        assert torch.equal(a, b), name
    assert again.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path, monkeypatch, capsys):
    """SIGTERM arriving during step 2 (sent by the process to itself, as a scheduler would):
    step 2 finishes, its checkpoint is written, run_dir/stopped.json says so (as pretraining's
    does), `main` prints where and returns 0; the same command resumes at step 3 and removes
    stopped.json when it starts."""
    args = ["--no-progress", "--train.steps=4", "--train.log_every=1", "--train.eval_batches=0",
            "--data.batch_size=1", "--data.image_size=32", "--optim.warmup_steps=1",
            f"--train.run_dir={tmp_path}"]
    real = DecoderTrainer.step

    def step_with_signal(self):
        if self.step_count == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(DecoderTrainer, "step", step_with_signal)
    assert train_decoder.main(args) == 0
    out = capsys.readouterr().out
    assert ("train_decoder: received SIGTERM: saving a checkpoint of step 2\n"
            f"train_decoder: received SIGTERM: checkpoint of step 2 saved in {tmp_path / 'checkpoints'}; "
            f"run the same command to resume") in out and "done:" not in out
    assert [s for s, _ in complete_checkpoints(tmp_path / "checkpoints")] == [2]
    assert json.loads((tmp_path / STOPPED_FILE).read_text()) == {
        "step": 2, "reason": "received SIGTERM", "checkpoint": str(tmp_path / "checkpoints")}
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is given back

    monkeypatch.setattr(DecoderTrainer, "step", real)
    assert train_decoder.main(args) == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[2] == {"resumed_from": 2} and [r["step"] for r in lines[3:]] == [3, 4]
    assert "done: step 4" in capsys.readouterr().out
    assert not (tmp_path / STOPPED_FILE).exists()


@pytest.mark.parametrize("end", ["finished", "error", "signal"])
def test_the_prefetch_thread_gives_the_same_run_and_ends_with_it(tmp_path, end):
    """In-memory batches are prefetched too: the losses equal a run with data.prefetch = 0 bit
    for bit, and the thread is stopped when train() returns, raises (a step fails), or stops
    on SIGTERM (with its checkpoint)."""
    args = ["--train.steps=3", "--train.eval_batches=0", "--data.batch_size=1", "--data.image_size=32"]
    trainer = DecoderTrainer(_cfg(tmp_path / "prefetched", *args, "--data.prefetch=2"))
    assert isinstance(trainer.batches, Prefetcher) and trainer.batches.depth == 2
    real_step = trainer.step

    def step():
        if trainer.step_count == 1:  # the thread runs: step 1 took its first batch
            assert trainer.batches._thread.is_alive()
            if end == "error":
                raise RuntimeError("a step failed")
            if end == "signal":
                os.kill(os.getpid(), signal.SIGTERM)
        return real_step()

    trainer.step = step
    if end == "error":
        with pytest.raises(RuntimeError, match="a step failed"):
            trainer.train(progress=False)
    else:
        records = trainer.train(progress=False)
        plain = DecoderTrainer(_cfg(tmp_path / "plain", *args, "--data.prefetch=0"))
        assert not isinstance(plain.batches, Prefetcher)
        want = plain.train(progress=False, stop_at=len(records))
        assert [(r["step"], r["loss"], r["grad_norm"]) for r in records] == \
            [(r["step"], r["loss"], r["grad_norm"]) for r in want] and len(records) == (3 if end == "finished" else 2)
    assert not trainer.batches._thread.is_alive()


def test_a_rank_slice_draws_what_one_process_draws(tmp_path):
    """Rank 1 of 2 (global batch 4) reads samples 2 and 3 of the step and draws their latents,
    noise and timesteps exactly as one process does for them; the evaluation's "wrong"
    embeddings give rank 0 those of held-out samples 1 and 2 (each sample the next one's)."""
    cfg = _cfg(tmp_path, "--data.batch_size=4", "--data.image_size=32")
    trainer = DecoderTrainer(cfg)
    whole = trainer.data.train_batch(5)
    latents, cond = trainer.conditions(whole, trainer.generators(5))
    trainer.rank, trainer.local_batch = 1, 2  # what the trainer sets on rank 1 of 2
    trainer.data = InMemoryData(cfg, 64, trainer._positions())
    part = trainer.data.train_batch(5)
    assert torch.equal(part.vae_pixels, whole.vae_pixels[2:])
    part_latents, part_cond = trainer.conditions(part, trainer.generators(5))
    assert torch.equal(part_latents, latents[2:]) and torch.equal(part_cond, cond[2:])
    (heldout, other), = InMemoryData(cfg, 64, range(4)).heldout(1)
    (rank0, other0), = InMemoryData(cfg, 64, range(2)).heldout(1)
    (rank1, other1), = InMemoryData(cfg, 64, range(2, 4)).heldout(1)
    assert torch.equal(rank0.vae_pixels, heldout.vae_pixels[:2])
    assert torch.equal(torch.cat([other0, other1]), other)
    assert torch.equal(other0, heldout.encoder_pixels[[1, 2]])
    sample_4 = make_batch(cfg, 64, [4], cfg.data.seed + HELD_OUT_SEED_OFFSET).encoder_pixels  # the next batch's first
    assert torch.equal(other1, torch.cat([heldout.encoder_pixels[3:], sample_4]))


@pytest.mark.parametrize("video", [False, True])
def test_heldout_wrong_condition_is_another_sample_at_batch_1(tmp_path, video):
    """At batch size 1 (one clip per step is the video recipe's) each held-out sample still
    gets another sample's embeddings -- the next one's, across batches -- so the evaluation's
    wrong-condition loss differs from the right one, and only by the condition."""
    args = ["--data.batch_size=1", "--data.image_size=32", "--model.video=true", "--data.frames=2"]
    cfg = _cfg(tmp_path, *(args if video else args[:2]), "--train.eval_batches=2")
    (first, other_first), (second, other_second) = InMemoryData(cfg, 64, range(1)).heldout(2)
    assert torch.equal(other_first, second.encoder_pixels)
    assert not torch.equal(first.encoder_pixels, other_first)
    assert not torch.equal(second.encoder_pixels, other_second)
    if not video:
        trainer = DecoderTrainer(cfg)
        losses = trainer.evaluate(1)
        assert losses["heldout_loss"] != losses["heldout_loss_wrong_cond"], losses
        # the two passes see the same latents, noise and timesteps: given each sample's own
        # embeddings as the "wrong" ones, the two losses are equal
        heldout = trainer.data.heldout
        trainer.data.heldout = lambda n: ((batch, batch.encoder_pixels) for batch, _ in heldout(n))
        same = trainer.evaluate(1)
        assert same["heldout_loss"] == same["heldout_loss_wrong_cond"] == losses["heldout_loss"], same


def test_micro_batches_accumulate_the_whole_batch_gradient(tmp_path):
    """train.microbatches = 2 runs the slice's forward and backward in two halves: the step's
    loss, gradient norm and the gradients the optimiser steps with equal one micro-batch's (fp32,
    up to summation order)."""
    results = []
    for n in (1, 2):
        trainer = DecoderTrainer(_cfg(tmp_path / str(n), "--data.batch_size=4", "--data.image_size=32",
                                      f"--train.microbatches={n}", "--data.prefetch=0"))
        grads, step = [], trainer.optimizer.step

        def capture(*args, **kwargs):
            grads.extend(p.grad.clone() for p in trainer.unet.parameters())
            return step(*args, **kwargs)

        trainer.optimizer.step = capture
        sizes, loss = [], trainer.loss
        trainer.loss = lambda batch, generators, **kw: (sizes.append(len(generators))
                                                        or loss(batch, generators, **kw))
        out = trainer.step()
        assert sizes == [4 // n] * n  # the slice really ran in n parts
        results.append((out.loss, out.grad_norm, grads))
    (loss1, norm1, grads1), (loss2, norm2, grads2) = results
    assert loss2 == pytest.approx(loss1, rel=1e-5) and norm2 == pytest.approx(norm1, rel=1e-5)
    assert len(grads1) == len(grads2) > 0
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * norm1)


def test_a_trained_decoder_loads_for_sampling(tmp_path):
    """2 steps on the CPU, then `load_trained_decoder` from the run folder, its checkpoints
    folder or the step folder: a fresh UNet gets the trained weights bit for bit, the returned
    negative is the run's null embedding (saved before the first step, the same after a
    resume), and decode_images samples with it. Another model, or no checkpoint, is refused."""
    from safetensors.torch import load_file

    from emu2_engine.checkpoint.dcp import CheckpointError
    from emu2_engine.inference.decode import NULL_EMBEDDING_FILE, decode_images, load_trained_decoder
    from emu2_engine.models.unet import UNet

    cfg = _cfg(tmp_path, "--train.steps=2", "--optim.warmup_steps=1", "--train.eval_batches=0",
               "--data.batch_size=1", "--data.image_size=32")
    trainer = DecoderTrainer(cfg)
    trainer.train(progress=False, stop_at=0)  # no step: the null embedding is already there
    null = load_file(tmp_path / NULL_EMBEDDING_FILE)["null_embedding"]
    assert torch.equal(null, trainer.null_embedding) and null.shape == (16, 64) and null.abs().sum() > 0
    trainer.train(progress=False)
    for where in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "step-000002"):
        unet = UNet(trainer.unet_cfg)
        negative = load_trained_decoder(where, unet)
        for (name, got), want in zip(unet.state_dict().items(), trainer.unet.state_dict().values()):
            assert torch.equal(got, want), (where, name)
        assert torch.equal(negative, trainer.null_embedding)
    emb = trainer.encoder(trainer.data.train_batch(0).encoder_pixels)
    images = decode_images(emb, unet=unet.eval(), vae=trainer.vae, steps=2, height=32, width=32, negative=negative)
    assert len(images) == 1 and images[0].size == (32, 32)

    assert DecoderTrainer(cfg).train(progress=False) == [{"resumed_from": 2}]  # a resumed start
    assert torch.equal(load_file(tmp_path / NULL_EMBEDDING_FILE)["null_embedding"], null)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(CheckpointError, match=r"holds another model \(212 tensors; this VideoUNet has 244\); "
                                              r"nothing was loaded:\n  missing \(32\): down_blocks.0.resnets.0.temporal"):
        load_trained_decoder(tmp_path, VideoUNet(trainer.unet_cfg))
    with pytest.raises(CheckpointError, match="holds no complete decoder checkpoint"):
        load_trained_decoder(tmp_path / "elsewhere", UNet(trainer.unet_cfg))
    with pytest.raises(CheckpointError, match="step-000001 is not a complete checkpoint folder: it does not exist"):
        load_trained_decoder(tmp_path / "checkpoints" / "step-000001", UNet(trainer.unet_cfg))
    (tmp_path / NULL_EMBEDDING_FILE).unlink()  # a run from before the trainer saved it
    assert load_trained_decoder(tmp_path, UNet(trainer.unet_cfg)) is None


def test_cfg_dropout_uses_the_null_condition(tmp_path, monkeypatch):
    trainer = DecoderTrainer(_cfg(tmp_path, "--diffusion.cfg_drop=1.0", "--data.batch_size=3"))
    seen = []
    forward = trainer.unet.forward
    monkeypatch.setattr(trainer.unet, "forward", lambda x, t, c, ids: seen.append(c) or forward(x, t, c, ids))
    batch = trainer.data.train_batch(0)
    trainer.loss(batch, trainer.generators(0))
    null = trainer.encoder(torch.zeros(1, 3, 64, 64))[0]  # the zero-image embedding
    assert torch.allclose(seen[-1], null.expand(3, -1, -1))
    trainer.loss(batch, trainer.generators(0), drop=False)
    _, cond = trainer.conditions(batch, trainer.generators(0))
    assert torch.equal(seen[-1], cond) and not torch.allclose(cond, null.expand(3, -1, -1))

    zeros = DecoderTrainer(_cfg(tmp_path / "z", "--diffusion.null_condition=\"zeros\""))
    assert not zeros.null_embedding.any()


def test_cfg_dropout_rate(tmp_path):
    """About 10 % of samples are dropped (the draw is the first uniform after the timesteps)."""
    trainer = DecoderTrainer(_cfg(tmp_path, "--data.batch_size=1"))
    g = torch.Generator().manual_seed(0)
    assert abs((torch.rand(20000, generator=g) < trainer.cfg.diffusion.cfg_drop).float().mean() - 0.1) < 0.01


def test_offset_noise():
    shape = (3, 4, 2, 5, 6)  # a video batch: the offset is shared by frames and pixels
    plain = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    noise = offset_noise(shape, 0.1, torch.Generator().manual_seed(5))
    shift = noise - plain
    assert torch.allclose(shift, shift[:, :, :1, :1, :1].expand(shape), atol=1e-6)
    assert shift[:, :, 0, 0, 0].abs().min() > 0 and shift.abs().max() < 0.6
    torch.testing.assert_close(offset_noise(shape, 0.0, torch.Generator().manual_seed(5)), plain)


def test_video_decoder_trains(tmp_path):
    trainer = DecoderTrainer(_cfg(tmp_path, "--model.video=true", "--data.batch_size=2", "--data.frames=3",
                                  "--train.steps=3", "--train.eval_batches=0"))
    assert isinstance(trainer.unet, VideoUNet)
    latents, cond = trainer.conditions(trainer.data.train_batch(0), trainer.generators(0))
    assert latents.shape == (2, 4, 3, 16, 16) and cond.shape == (2, 3, 16, 64)
    records = trainer.train(progress=False)
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    temporal = [v for k, v in trainer.unet.state_dict().items()
                if "temporal_conv" in k and k.endswith("weight")]
    assert temporal and all(w.abs().sum() > 0 for w in temporal)  # the temporal convs learnt


@pytest.mark.slow
def test_compiled_unet_blocks_train_like_eager(tmp_path):
    """`train.compile` compiles every resnet and transformer (the units FSDP shards), keeps the
    state dict's keys, and 3 steps of the (2D, debug) UNet give eager's losses within fp32
    rounding. (The video UNet compiles the same way; its units are slower to compile here.)"""
    args = ("--data.batch_size=2", "--train.steps=3", "--train.eval_batches=0", "--train.save_every=10")
    eager = DecoderTrainer(_cfg(tmp_path / "eager", *args))
    compiled = DecoderTrainer(_cfg(tmp_path / "compiled", *args, "--train.compile=true"))
    units = unet_units(compiled.unet)
    assert units and all(u._compiled_call_impl is not None for u in units)
    assert list(compiled.unet.state_dict()) == list(eager.unet.state_dict())
    want = [r["loss"] for r in eager.train(progress=False)]
    got = [r["loss"] for r in compiled.train(progress=False)]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_moving_shapes_clip_moves():
    clip = moving_shapes_clip(seed=3, index=7, frames=4, size=32)
    assert len(clip) == 4 and clip[0].size == (32, 32)
    arrays = [np.asarray(f) for f in clip]
    assert not np.array_equal(arrays[0], arrays[-1])
    again = moving_shapes_clip(seed=3, index=7, frames=4, size=32)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(arrays, again))


def test_tiny_vae_latents_carry_the_image():
    """The CPU's random VAE: narrow posterior (samples are the mean, as with a trained VAE) and
    unit-variance scaled latents on shapes-world images."""
    vae = build_vae("tiny-random", 64, seed=0)
    pixels = make_batch(DecoderJobConfig.load(None), 64, range(100, 108), 99).vae_pixels
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    assert posterior.std.max() < 1e-3
    assert 0.7 < (posterior.mean * vae.config.scaling_factor).std() < 1.3


def test_batches_are_deterministic(tmp_path):
    cfg = _cfg(tmp_path, "--data.batch_size=2")
    a, b = make_batch(cfg, 64, [4, 5], 1234), make_batch(cfg, 64, [4, 5], 1234)
    assert torch.equal(a.encoder_pixels, b.encoder_pixels) and torch.equal(a.vae_pixels, b.vae_pixels)
    assert a.vae_pixels.min() >= -1 and a.vae_pixels.max() <= 1 and a.encoder_pixels.shape == (2, 3, 64, 64)


# -- configs and refusals -----------------------------------------------------------------------
def test_unused_sections_are_not_written_but_old_configs_with_their_defaults_load(tmp_path):
    cfg = DecoderJobConfig.load(None)
    sections = [line for line in cfg.to_toml().splitlines() if line.startswith("[")]
    assert not {"[parallel]", "[checkpoint]", "[metrics]"} & set(sections)
    old = tmp_path / "config.toml"  # as runs before this change wrote it: the defaults included
    old.write_text(cfg.to_toml() + "\n[parallel]\ntp = 1\n\n[metrics]\nlog_interval = 10\n")
    assert DecoderJobConfig.load(old) == cfg


def test_decoder_debug_toml_is_the_default():
    assert DecoderJobConfig.load(REPO / "configs" / "decoder_debug.toml") == DecoderJobConfig.load(None)


@pytest.mark.parametrize("name", ["decoder_video_debug", "decoder_emu2_gen", "decoder_video"])
def test_recipe_configs_load(name):
    cfg = DecoderJobConfig.load(REPO / "configs" / f"{name}.toml")
    assert cfg.optim.grad_clip == 1.0 and cfg.diffusion.cfg_drop == 0.1 and cfg.diffusion.noise_offset == 0.1


@pytest.mark.parametrize("override, message", [
    ("--model.encoder=emu2-37b", "attends to embeddings of width 64"),
    ("--model.unet=nope", "model.unet must be one of"),
    ("--diffusion.cfg_drop=1.5", "cfg_drop"),
    ("--diffusion.null_condition=\"empty\"", "null_condition"),
    ("--data.frames=0", "data.frames"),
    ("--data.prefetch=-2", "data.prefetch must be >= -1"),
    ("--optim.warmup_steps=400", "warmup_steps"),
    ("--diffusion.beta_schedule=\"cosine\"", "beta_schedule"),
    ("--train.unknown=1", "unknown key train.unknown"),
    ("--train.microbatches=0", "train.microbatches must be >= 1, got 0"),
    ("--train.microbatches=3", r"train.microbatches \(3\) must divide each rank's 8 sample\(s\)"),
    # pretraining sections the decoder config inherits but its trainer does not read
    ("--parallel.tp=2", r"train_decoder does not read \[parallel\]: it shards the UNet with FSDP"),
    ("--checkpoint.keep=5", r"does not read \[checkpoint\]: its checkpoints are set by train.save_every"),
    ("--metrics.log_interval=3", r"does not read \[metrics\]: it logs every train.log_every steps"),
])
def test_bad_config_refused(override, message):
    with pytest.raises(ValueError, match=message):
        DecoderJobConfig.load(None, [override])


@pytest.mark.parametrize("override, message", [
    ("--optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
    ("--optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
    ("--optim.betas=[0.9, 1.0]", r"optim.betas must each lie in \[0, 1\), got \[0.9, 1.0\]"),
    ("--optim.betas=[-0.1, 0.999]", r"optim.betas must each lie in \[0, 1\), got \[-0.1, 0.999\]"),
    ("--optim.betas=[nan, 0.999]", r"optim.betas must each lie in \[0, 1\), got \[nan, 0.999\]"),
    ("--optim.weight_decay=-0.01", "optim.weight_decay must be a finite number >= 0, got -0.01"),
    ("--optim.weight_decay=inf", "optim.weight_decay must be a finite number >= 0, got inf"),
    ("--optim.eps=0", "optim.eps must be a finite number > 0, got 0.0"),
    ("--optim.eps=nan", "optim.eps must be a finite number > 0, got nan"),
    ("--optim.grad_clip=inf", r"optim.grad_clip must be a finite number >= 0 \(0 turns clipping off\), got inf"),
    ("--optim.grad_clip=-1", r"optim.grad_clip must be a finite number >= 0 \(0 turns clipping off\), got -1.0"),
    ("--diffusion.cfg_drop=nan", r"diffusion.cfg_drop must lie in \[0, 1\], got nan"),
    ("--diffusion.noise_offset=inf", "diffusion.noise_offset must be a finite number >= 0, got inf"),
    ("--diffusion.noise_offset=-0.1", "diffusion.noise_offset must be a finite number >= 0, got -0.1"),
    ("--train.run_dir=\"\"", "train.run_dir must name a folder .* got ''"),
    ("--train.run_dir=\"  \"", "train.run_dir must name a folder .* got '  '"),
])
def test_out_of_range_numbers_refused_in_one_line(override, message):
    """NaN, infinities and out-of-range optimiser and diffusion numbers are refused when the
    config loads (NaN passed every `x > 0` check and trained into NaN weights; an empty run_dir
    wrote into the current folder), in one line saying what was expected and what came; the
    shipped configs still load (`test_recipe_configs_load`, `test_decoder_debug_toml_is_the_default`)."""
    with pytest.raises(ValueError, match=message) as refused:
        DecoderJobConfig.load(None, [override])
    assert "\n" not in str(refused.value)


def test_heldout_paths_need_eval_batches():
    """Held-out shards with train.eval_batches = 0 would be read by nothing: refused in one line."""
    with pytest.raises(ValueError, match=r"data.heldout_paths \('/data/heldout'\) is set but train.eval_batches "
                                         r"= 0 skips the held-out evaluation: set train.eval_batches >= 1"):
        DecoderJobConfig.load(None, ["--data.paths=/data/train", "--data.heldout_paths=/data/heldout",
                                     "--train.eval_batches=0"])


def test_documented_commands_give_configs_that_work():
    """Every `torchrun -m emu2_engine.train_decoder` command of docs/decoders.md resolves to a
    valid config (the file's paths are placeholders: only `validate` runs); the one with held-out
    shards evaluates on them."""
    import shlex

    text = (REPO / "docs" / "decoders.md").read_text().replace("\\\n", " ")
    commands = [line.split("emu2_engine.train_decoder", 1)[1].split("#")[0]
                for line in text.splitlines() if "-m emu2_engine.train_decoder" in line]
    assert len(commands) >= 4
    heldout = 0
    for command in commands:
        args = shlex.split(command)
        config = next((a.split("=", 1)[1] if "=" in a else args[i + 1] for i, a in enumerate(args)
                       if a.startswith("--config")), None)
        overrides = [a for a in args if a.startswith("--") and not a.startswith("--config")
                     and a != "--no-progress" and "=" in a]
        cfg = DecoderJobConfig.load(REPO / config if config else None, overrides)
        if cfg.data.heldout_paths:
            heldout += 1
            assert cfg.train.eval_batches > 0, command
    assert heldout >= 1


def test_base_weights_start_the_trainer_and_exclude_unet_weights(tmp_path, capsys):
    """model.unet_base_weights: a UNet conditioned on other widths initialises the trainer's UNet
    (the condition projections fresh, the rest loaded); with unet_weights too it is refused."""
    import dataclasses

    from safetensors.torch import save_file

    from emu2_engine.models.config import UNetConfig
    from emu2_engine.models.unet import UNet

    base = UNet(dataclasses.replace(UNetConfig.from_preset("debug"), cross_attention_dim=48))
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, path)
    trainer = DecoderTrainer(_cfg(tmp_path / "run", f"--model.unet_base_weights=\"{path}\""))
    assert "projection(s) that read the condition start fresh" in capsys.readouterr().out
    assert torch.equal(trainer.unet.conv_in.weight.cpu(), base.conv_in.weight)
    with pytest.raises(ValueError, match="both give the initial UNet: set one"):
        DecoderJobConfig.load(None, [f"--model.unet_base_weights=\"{path}\"", f"--model.unet_weights=\"{path}\""])


def test_cli_reports_bad_config(capsys):
    assert train_decoder.main(["--model.unet=nope"]) == 2
    assert "model.unet must be one of" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["another model", "corrupt"])
def test_cli_reports_a_checkpoint_that_cannot_resume_in_one_line(tmp_path, capsys, problem):
    """A checkpoint found once training starts that cannot load (one of the image UNet resumed
    by the video trainer, or one whose index is not DCP's) ends `main` with one line on stderr
    and exit status 2, as a bad config does (`main` let the CheckpointError out: a traceback on
    every rank)."""
    args = ["--no-progress", f"--train.run_dir={tmp_path}", "--train.steps=2", "--optim.warmup_steps=1",
            "--train.eval_batches=0", "--data.batch_size=1", "--data.image_size=32"]
    if problem == "another model":
        assert train_decoder.main(args + ["--train.steps=1", "--optim.warmup_steps=0"]) == 0
        args.append("--model.video=true")
        expected = f"train_decoder: cannot load checkpoint {tmp_path / 'checkpoints' / 'step-000001'} into this model"
    else:
        (tmp_path / "checkpoints" / "step-000001").mkdir(parents=True)
        (tmp_path / "checkpoints" / "step-000001" / ".metadata").write_bytes(b"not an index")
        expected = f"train_decoder: cannot read checkpoint {tmp_path / 'checkpoints' / 'step-000001'}"
    capsys.readouterr()
    assert train_decoder.main(args) == 2
    err = capsys.readouterr().err  # (DCP's own logger may say more before it, for a corrupt index)
    ours = [line for line in err.splitlines() if line.startswith("train_decoder:")]
    assert len(ours) == 1 and ours[0].startswith(expected) and err.endswith(ours[0] + "\n"), err


def test_global_batch_not_divisible_by_the_ranks_refused(tmp_path, monkeypatch, capsys):
    """Refused before any process group or model is built (torchrun sets WORLD_SIZE)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    message = ("data.batch_size is the global batch and must divide by the number of ranks "
               "(WORLD_SIZE = 2); got 3, which leaves 1 over")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DecoderTrainer(_cfg(tmp_path, "--data.batch_size=3"))
    assert train_decoder.main(["--data.batch_size=3", f"--train.run_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == f"train_decoder: {message}"


def test_missing_vae_folder_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="AutoencoderKL folder"):
        DecoderTrainer(_cfg(tmp_path, f"--model.vae={tmp_path / 'nowhere'}"))


@pytest.mark.parametrize("field", ["encoder_weights", "unet_weights", "unet_base_weights", "vae", "vae-file"])
def test_missing_weight_paths_refused_before_anything_is_built(tmp_path, monkeypatch, capsys, field):
    """A typo in any configured path is one line (exit status 2) before the frozen encoder, the
    data or anything else heavy is built; a VAE path that is a file is no folder."""
    import emu2_engine.train.decoder as decoder

    built = []
    monkeypatch.setattr(decoder, "FrozenEncoder", lambda cfg: built.append("encoder"))
    monkeypatch.setattr(decoder, "InMemoryData", lambda *a: built.append("data"))
    wrong = tmp_path / "sdxl-vea"
    problem = "no such file or folder"
    if field == "vae-file":
        field, problem = "vae", "is not a folder"
        wrong.write_text("")
    elif field == "vae":
        problem = "no such folder"
    args = [f"--model.{field}={wrong}", f"--train.run_dir={tmp_path / 'run'}"]
    with pytest.raises(FileNotFoundError, match=f"model.{field} = '{wrong}': {problem}"):
        DecoderTrainer(_cfg(tmp_path, *args))
    assert train_decoder.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train_decoder: model.{field} = '{wrong}': {problem} (expected ") and err.count("\n") == 1
    assert built == []


# -- two ranks (one spawn of 2 gloo processes) ----------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    return {**worker.launch(str(out)), "dir": out}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The workers' run in this process, on the whole global batch."""
    trainer = DecoderTrainer(worker.config(tmp_path_factory.mktemp("one_process")))
    initial = {n: p.detach().clone() for n, p in trainer.unet.named_parameters()}
    records = trainer.train(progress=False)
    return {"records": records, "initial": initial,
            "params": {n: p.detach().clone() for n, p in trainer.unet.named_parameters()}}


def test_two_ranks_train_like_one_process(two_ranks, one_process):
    """fp32: every step's loss (the mean over both ranks' halves) and the held-out losses before
    and after within 1e-5 of one process on the whole batch, the gradient norm (over the FSDP
    shards) within 1e-5 relative, and every UNet parameter after 3 steps within 1e-5 (AdamW
    moves them by ~1e-3 per step, so a wrong gradient average would show)."""
    want = one_process["records"]
    assert any(r["grad_norm"] > 1.0 for r in want if "grad_norm" in r)  # clipping at 1.0 acts
    for rank, r in enumerate(two_ranks["ranks"]):
        assert r["world"] == 2 and r["local_batch"] == 2
        got = r["whole"]
        assert [x["step"] for x in got] == [x["step"] for x in want] == [0, 1, 2, 3, 3]
        for g, w in zip(got, want):
            assert g.keys() == w.keys()
            for key in ("loss", "heldout_loss", "heldout_loss_wrong_cond"):
                if key in w:
                    assert abs(g[key] - w[key]) <= 1e-5, (rank, key, g, w)
            if "grad_norm" in w:
                assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), (rank, g, w)
                assert g["lr"] == w["lr"]
    params = two_ranks["whole_params"]
    assert params.keys() == one_process["params"].keys()
    for name, p in one_process["params"].items():
        assert (params[name] - p).abs().max().item() <= 1e-5, name
    assert max((p - one_process["initial"][n]).abs().max().item()
               for n, p in one_process["params"].items()) > 1e-3


def test_two_ranks_with_micro_batches_train_like_one_process(two_ranks, one_process):
    """Each rank's slice in two micro-batches under FSDP (the reduce-scatter only after the
    second): every step's loss within 1e-5 of one process on the whole batch, the parameters
    after 3 steps within 1e-5."""
    want = [r for r in one_process["records"] if "loss" in r]
    for r in two_ranks["ranks"]:
        got = [x for x in r["micro"] if "loss" in x]
        assert [x["step"] for x in got] == [x["step"] for x in want] and got
        for g, w in zip(got, want):
            assert abs(g["loss"] - w["loss"]) <= 1e-5 and g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5)
    for name, p in one_process["params"].items():
        assert (two_ranks["micro_params"][name] - p).abs().max().item() <= 1e-5, name


def test_two_ranks_train_the_video_unet_like_one_process(two_ranks, tmp_path):
    """The inflated video UNet (temporal convs inside the sharded resnets), one clip per rank:
    the losses of both steps within 1e-5 of one process on both clips."""
    want = DecoderTrainer(worker.config(tmp_path, *worker.VIDEO_ARGS)).train(progress=False)
    for r in two_ranks["ranks"]:
        assert [x["step"] for x in r["video"]] == [x["step"] for x in want] == [1, 2]
        for g, w in zip(r["video"], want):
            assert abs(g["loss"] - w["loss"]) <= 1e-5, (g, w)
            assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), (g, w)


def test_two_ranks_shard_the_unet_and_replicate_the_frozen_parts(two_ranks):
    """Every UNet parameter is a DTensor split on dim 0 over the 2 ranks (each holds half of the
    rows, rounded up); the frozen encoder and VAE are plain tensors on each rank, without grads."""
    for r in two_ranks["ranks"]:
        lay = r["layout"]
        assert not lay["frozen_sharded"] and not lay["frozen_trainable"]
        for name, held in lay["unet"].items():
            assert held is not None, f"{name} is not sharded"
            placements, local = held
            assert placements == (Shard(0),), (name, placements)
            full = two_ranks["whole_params"][name].shape
            assert local[0] in ((full[0] + 1) // 2, full[0] // 2) and local[1:] == tuple(full[1:]), name


def test_two_ranks_stop_together_on_one_signal_and_resume_exactly(two_ranks):
    """Rank 1 alone gets SIGTERM during step 2: both ranks finish step 2, save it (the only
    checkpoint: save_every is 100) and stop; rank 0 says a rank was signalled. A fresh pair of
    trainers resumes from step 2; its step 3 and final evaluation equal the uninterrupted run's
    bit for bit, and so do the parameters."""
    for r in two_ranks["ranks"]:
        assert [x["step"] for x in r["first"]] == [0, 1, 2]  # the evaluation before, steps 1 and 2
        assert r["after_signal"] == [2]
        resumed, whole = r["resumed"], r["whole"]
        assert resumed[0] == {"resumed_from": 2} and [x["step"] for x in resumed[1:]] == [3, 3]
        for key in ("loss", "grad_norm", "lr"):
            assert resumed[1][key] == whole[3][key], key
        assert resumed[2] == whole[4]  # the held-out losses after step 3
    checkpoints = two_ranks["dir"] / "split" / "checkpoints"
    assert two_ranks["ranks"][0]["first_stdout"] == (
        "train_decoder: data: in-memory shapes-world images (data.paths is empty)\n"
        "train_decoder: a signal on another rank: saving a checkpoint of step 2\n"
        f"train_decoder: a signal on another rank: checkpoint of step 2 saved in {checkpoints}; "
        "run the same command to resume\n")
    assert two_ranks["ranks"][1]["first_stdout"] == ""  # only rank 0 prints
    for r in two_ranks["ranks"]:  # rank 0 wrote it once the checkpoint was complete
        assert r["stopped"] == {"step": 2, "reason": "a signal on another rank", "checkpoint": str(checkpoints)}
        assert not r["stopped_after_resume"]  # a run that starts removes it
    assert two_ranks["checkpoints"] == [2, 3]
    for name, p in two_ranks["whole_params"].items():
        assert torch.equal(two_ranks["resumed_params"][name], p), name


def test_two_ranks_read_their_own_shards_count_skips_together_and_resume_exactly(two_ranks):
    """On shards each rank reads its own samples: the logged loss (the mean over the ranks)
    and the skip counts (the sum) are the same on both; the last counts are the sum of the
    ranks' own; a run checkpointed at step 2 (each rank's stream position) that dies after
    step 3 resumes with the uninterrupted run's steps 3 and 4 bit for bit."""
    ranks = two_ranks["ranks"]
    same = ("step", "loss", "grad_norm", "lr", "skipped")  # samples_per_s is each rank's clock
    assert [[{k: x[k] for k in same} for x in r["shards_whole"]] for r in ranks] == \
        [[{k: x[k] for k in same} for x in ranks[0]["shards_whole"]]] * 2
    whole = ranks[0]["shards_whole"]
    assert [r["step"] for r in whole] == [1, 2, 3, 4]
    own = [Counter(r["shards_own_skips"]) for r in ranks]
    assert whole[-1]["skipped"] == dict(sorted((own[0] + own[1]).items())) and all(own)
    for r in ranks:
        assert r["shards_resumed"][0] == {"resumed_from": 2}
        assert [(x["step"], x["loss"], x["grad_norm"]) for x in r["shards_resumed"][1:]] == \
            [(x["step"], x["loss"], x["grad_norm"]) for x in whole[2:]]


def test_two_rank_checkpoint_loads_in_one_process(two_ranks, one_process, tmp_path):
    """The 2-rank checkpoint of step 3 holds the whole UNet: one process loads it (DCP joins the
    shards; the RNG state is left, with a warning) and gets the one-process run's parameters
    within 1e-5."""
    trainer = DecoderTrainer(worker.config(tmp_path))
    assert trainer.checkpointer.load(two_ranks["dir"] / "split" / "checkpoints" / "step-000003") == 3
    for name, p in trainer.unet.named_parameters():
        assert (p.detach() - one_process["params"][name]).abs().max().item() <= 1e-5, name


def test_two_rank_shard_checkpoint_resumes_in_one_process_with_the_data_from_the_start(
        two_ranks, tmp_path, caplog):
    """Each rank's shard position is saved under its data-parallel rank (`dataloader.dp0of2`,
    `dataloader.dp1of2`). One process resuming the 2-rank run's checkpoint gets the model and
    step, and reads the shards from their start, with the checkpointer's warning that the data
    position was not restored (each of the 2 ranks read its own half: neither position fits one
    reader). Keyed per rank (`dataloader.rank0`) the checkpoint handed rank 0's position to the
    single reader, whose stream refused it and the whole load failed."""
    import logging

    import torch.distributed.checkpoint as dcp

    step4 = two_ranks["dir"] / "shards_whole" / "checkpoints" / "step-000004"
    keys = set(dcp.FileSystemReader(str(step4)).read_metadata().state_dict_metadata)
    assert {k for k in keys if k.startswith("dataloader.")} == {"dataloader.dp0of2", "dataloader.dp1of2"}
    trainer = DecoderTrainer(worker.config(tmp_path, *worker.SHARD_ARGS,
                                           f"--data.paths={two_ranks['dir'] / 'shards'}"))
    fresh_position = trainer.batches.state_dict()
    before = {n: p.detach().clone() for n, p in trainer.unet.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="emu2_engine.checkpoint.dcp"):
        assert trainer.checkpointer.load(step4) == 4
    assert "not restored: the RNG states" in caplog.text and "the data position" in caplog.text
    assert trainer.batches.state_dict() == fresh_position
    assert any(not torch.equal(p, before[n]) for n, p in trainer.unet.named_parameters())


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch, capsys):
    """An inf gradient norm at step 2 leaves the UNet as it was (clipping by an inf norm would
    have scaled every gradient into NaN) and is counted; train.max_nonfinite in a row stop the
    run, which `train_decoder` turns into exit status 1 with one line."""
    from emu2_engine.train.trainer import NonFiniteError

    trainer = DecoderTrainer(_cfg(tmp_path / "one", "--train.steps=4", "--train.eval_batches=0",
                                  "--train.save_every=100"))
    real, seen = trainer.clip_grad_norm, []

    def inf_at_step_2():
        seen.append({n: p.detach().clone() for n, p in trainer.unet.named_parameters()})
        norm = real()
        return float("inf") if trainer.step_count == 1 else norm

    monkeypatch.setattr(trainer, "clip_grad_norm", inf_at_step_2)
    records = [r for r in trainer.train(progress=False) if "loss" in r]
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in records)
    for name, before in seen[1].items():  # seen[k]: the parameters before step k + 1
        assert torch.equal(before, seen[2][name]), name
    assert any(not torch.equal(seen[0][n], seen[1][n]) for n in seen[0])

    monkeypatch.setattr(DecoderTrainer, "clip_grad_norm", lambda self: float("nan"))
    with pytest.raises(NonFiniteError, match=r"2 steps in a row \(up to step 2\) had a non-finite"):
        DecoderTrainer(_cfg(tmp_path / "two", "--train.steps=5", "--train.max_nonfinite=2",
                            "--train.eval_batches=0")).train(progress=False)
    rc = train_decoder.main(["--no-progress", f"--train.run_dir={tmp_path / 'three'}", "--train.steps=5",
                             "--optim.warmup_steps=1", "--train.max_nonfinite=2", "--train.eval_batches=0",
                             "--data.batch_size=2"])
    assert rc == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("train_decoder: 2 steps in a row")


def test_nonfinite_counts_survive_a_resume(tmp_path, monkeypatch):
    """Steps 2-4 non-finite with train.max_nonfinite = 3: the run stops at step 4, also when it
    was interrupted after step 3 and resumed from that step's checkpoint (the counts are in it:
    a restart under torchrun --max-restarts would otherwise count from 0 and never stop)."""
    from emu2_engine.train.trainer import NonFiniteError

    real = DecoderTrainer.clip_grad_norm
    monkeypatch.setattr(DecoderTrainer, "clip_grad_norm",
                        lambda self: float("nan") if self.step_count in (1, 2, 3) else real(self))
    args = ["--train.steps=6", "--train.max_nonfinite=3", "--train.save_every=3", "--train.eval_batches=0",
            "--data.batch_size=1", "--data.image_size=32"]
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(up to step 4\)"):
        DecoderTrainer(_cfg(tmp_path / "whole", *args)).train(progress=False)
    DecoderTrainer(_cfg(tmp_path / "split", *args)).train(progress=False, stop_at=3)  # saved step 3
    resumed = DecoderTrainer(_cfg(tmp_path / "split", *args))
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(up to step 4\)"):
        resumed.train(progress=False)
    assert (resumed.nonfinite_in_a_row, resumed.nonfinite_total) == (3, 3)


def _strict_json(line: str) -> dict:
    """One metrics line, parsed as strict JSON (NaN and Infinity refused)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON: {line!r}")
    return json.loads(line, parse_constant=refuse)


def test_metrics_file_is_strict_json(tmp_path, monkeypatch):
    """An inf gradient norm (a skipped step) is written as null in metrics.jsonl: NaN and
    Infinity are not JSON, and strict readers (jq, JavaScript, pandas with a strict parser)
    refuse the whole file. The records `train` returns keep the float."""
    real = DecoderTrainer.clip_grad_norm
    monkeypatch.setattr(DecoderTrainer, "clip_grad_norm",
                        lambda self: float("inf") if self.step_count == 1 else real(self))
    records = DecoderTrainer(_cfg(tmp_path, "--train.steps=3", "--train.eval_batches=0", "--data.batch_size=1",
                                  "--data.image_size=32")).train(progress=False)
    assert records[1]["grad_norm"] == float("inf")
    lines = [_strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert lines[1]["grad_norm"] is None and lines[1]["nonfinite_steps"] == 1
    assert math.isfinite(lines[0]["grad_norm"]) and lines[1]["loss"] == records[1]["loss"]


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    """A kill during the write of step 4's record leaves a line cut short, with no newline: the
    resumed run drops it with a warning on stderr (appending to it would glue its first record
    onto the fragment, one bad line in the middle of the file), and every line is JSON."""
    args = ["--train.steps=5", "--train.save_every=2", "--train.eval_batches=0", "--data.batch_size=1",
            "--data.image_size=32"]
    DecoderTrainer(_cfg(tmp_path, *args)).train(progress=False, stop_at=3)
    metrics = tmp_path / "metrics.jsonl"
    torn = '{"step": 4, "loss": 0.2'
    metrics.write_text(metrics.read_text() + torn)
    capsys.readouterr()
    DecoderTrainer(_cfg(tmp_path, *args)).train(progress=False)
    err = capsys.readouterr().err
    assert f"train_decoder: dropping the last line of {metrics}" in err and repr(torn) in err
    lines = [_strict_json(line) for line in metrics.read_text().splitlines()]
    assert [r.get("step", r.get("resumed_from")) for r in lines] == [1, 2, 3, 2, 3, 4, 5]
    assert lines[3] == {"resumed_from": 2}
    # a whole record without its newline (the kill came between the two) is kept
    metrics.write_text(metrics.read_text().rstrip("\n"))
    DecoderTrainer(_cfg(tmp_path, *args)).train(progress=False)
    lines = [_strict_json(line) for line in metrics.read_text().splitlines()]
    assert [r.get("step", r.get("resumed_from")) for r in lines] == [1, 2, 3, 2, 3, 4, 5, 5]
    assert "dropping" not in capsys.readouterr().err


def test_the_loss_feeds_the_unet_as_sdxl_training_does(tmp_path):
    """What one training loss hands the UNet, spied over 4 x 64 samples (the UNet replaced by a
    recorder, so this is cheap): latents are a posterior sample x the VAE's scaling factor;
    timesteps cover 0..999; about 10 % of the conditions are the null embedding (per sample);
    the noise carries a per-(sample, channel) offset (large here, 4.0, so it shows) and is the
    target; the size ids are (R, R, 0, 0, R, R); and clipping hands AdamW gradients of norm
    grad_clip. (A review's mutations of each of these passed the earlier tests.)"""
    from emu2_engine.inference.decode import size_ids

    cfg = _cfg(tmp_path, "--data.batch_size=64", "--data.image_size=32", "--diffusion.noise_offset=4.0",
               "--data.prefetch=0", "--optim.grad_clip=0.05")
    trainer = DecoderTrainer(cfg)
    seen, fed = [], []
    add_noise = trainer.noise.add_noise
    trainer.noise.add_noise = lambda latents, noise, t: seen.append((latents, noise, t)) or add_noise(latents, noise, t)
    unet_forward = trainer.unet.forward

    class Recorder(torch.nn.Module):
        def forward(self, noisy, t, cond, time_ids):
            fed.append((cond, time_ids))
            return torch.zeros_like(noisy)

    trainer.unet.forward = Recorder().forward
    batches = []
    for step in range(4):
        batch = next(trainer.batches)
        batches.append(batch)
        loss = trainer.loss(batch, trainer.generators(step))
        latents, noise, t = seen[-1]
        assert loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)   # the target is the noise
    latents = torch.cat([s[0] for s in seen])
    noise = torch.cat([s[1] for s in seen])
    t = torch.cat([s[2] for s in seen])
    assert 0 <= t.min() < 50 and 950 < t.max() <= 999 and t.float().std() > 250           # uniform on 0..999
    # latents: (posterior mean + std x eps) x scaling_factor, so eps is standard normal
    with torch.no_grad():
        posterior = trainer.vae.encode(torch.cat([b.vae_pixels for b in batches])).latent_dist
    eps = (latents / trainer.vae.config.scaling_factor - posterior.mean) / posterior.std
    assert abs(eps.mean().item()) < 0.05 and 0.95 < eps.std().item() < 1.05
    # the offset: each (sample, channel) mean of the noise is about 4 x N(0, 1); within a channel ~ N(0, 1)
    means = noise.mean(dim=(2, 3))
    assert 3.0 < means.std().item() < 5.0 and 0.9 < (noise - means[..., None, None]).std().item() < 1.1
    null = trainer.null_embedding
    dropped = torch.cat([(cond == null).flatten(1).all(1) for cond, _ in fed])
    assert 0.05 < dropped.float().mean().item() < 0.16, dropped.float().mean()           # 10 %, per sample
    R = cfg.data.image_size
    assert all(torch.equal(ids, size_ids(R, R, 64, "cpu")) for _, ids in fed)
    # clipping: the optimiser steps with gradients of global norm grad_clip
    trainer.unet.forward = unet_forward
    norms, step = [], trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: norms.append(torch.nn.utils.get_total_norm(
        [p.grad for p in trainer.unet.parameters() if p.grad is not None]).item()) or step(*a, **k)
    out = trainer.step()
    assert out.grad_norm > 0.05 and norms == [pytest.approx(0.05, rel=1e-4)]
