"""Decoder training on the CPU: the loss falls, resume repeats the uninterrupted run exactly,
checkpoints are atomic and pruned, CFG dropout and the noise offset do what they say, the
video decoder trains, and bad configs are refused in one line."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from emu2_engine import train_decoder
from emu2_engine.models.unet3d import VideoUNet
from emu2_engine.train.decoder import (DecoderJobConfig, DecoderTrainer, build_vae, make_batch,
                                       moving_shapes_clip, offset_noise)

pytest.importorskip("diffusers")
REPO = Path(__file__).resolve().parent.parent


def _cfg(tmp_path, *overrides) -> DecoderJobConfig:
    return DecoderJobConfig.load(None, [f"--train.run_dir={tmp_path}", "--train.log_every=1",
                                        "--optim.warmup_steps=2", *overrides])


def test_loss_falls_on_the_debug_config(tmp_path, capsys):
    """30 steps of the default run at batch 4 (a few seconds): the held-out denoising loss,
    measured with fixed noise and timesteps before and after, falls by a fifth at least (1.09 ->
    0.33 on our machine)."""
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
    assert all(r["grad_norm"] > 0 for r in steps) and steps[-1]["lr"] == 0.0  # linear decay to 0
    assert (tmp_path / "checkpoints" / "step_00000030" / "state.pt").is_file()
    assert DecoderJobConfig.load(tmp_path / "config.toml").train.steps == 30
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
    trainer = DecoderTrainer(_cfg(tmp_path, "--train.steps=5", "--train.save_every=2", "--train.keep=2",
                                  "--train.eval_batches=0", "--data.batch_size=1"))
    trainer.train(progress=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000005"]  # every 2 steps and the last; newest 2 kept
    state = torch.load(tmp_path / "checkpoints" / "step_00000005" / "state.pt", weights_only=True)
    assert state["step"] == 5 and set(state) == {"step", "unet", "optimizer", "scheduler", "config"}
    # A half-written checkpoint (a crash before the rename) is never picked up.
    (tmp_path / "checkpoints" / ".tmp_step_00000009").mkdir()
    (tmp_path / "checkpoints" / "step_00000009").mkdir()  # a folder without state.pt
    assert [p.name for p in trainer.checkpoints()] == names


def test_cfg_dropout_uses_the_null_condition(tmp_path, monkeypatch):
    trainer = DecoderTrainer(_cfg(tmp_path, "--diffusion.cfg_drop=1.0", "--data.batch_size=3"))
    seen = []
    forward = trainer.unet.forward
    monkeypatch.setattr(trainer.unet, "forward", lambda x, t, c, ids: seen.append(c) or forward(x, t, c, ids))
    batch = trainer.batch(0)
    trainer.loss(batch, trainer._generator(0))
    null = trainer.encoder(torch.zeros(1, 3, 64, 64))[0]  # the zero-image embedding
    assert torch.allclose(seen[-1], null.expand(3, -1, -1))
    trainer.loss(batch, trainer._generator(0), drop=False)
    _, cond = trainer.conditions(batch, trainer._generator(0))
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
    latents, cond = trainer.conditions(trainer.batch(0), trainer._generator(0))
    assert latents.shape == (2, 4, 3, 16, 16) and cond.shape == (2, 3, 16, 64)
    records = trainer.train(progress=False)
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    temporal = [v for k, v in trainer.unet.state_dict().items()
                if "temporal_conv" in k and k.endswith("weight")]
    assert temporal and all(w.abs().sum() > 0 for w in temporal)  # the temporal convs learnt


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
    pixels = make_batch(DecoderJobConfig.load(None, ["--data.batch_size=8"]), 64, 100, 99).vae_pixels
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    assert posterior.std.max() < 1e-3
    assert 0.7 < (posterior.mean * vae.config.scaling_factor).std() < 1.3


def test_batches_are_deterministic(tmp_path):
    cfg = _cfg(tmp_path, "--data.batch_size=2")
    a, b = make_batch(cfg, 64, 4, 1234), make_batch(cfg, 64, 4, 1234)
    assert torch.equal(a.encoder_pixels, b.encoder_pixels) and torch.equal(a.vae_pixels, b.vae_pixels)
    assert a.vae_pixels.min() >= -1 and a.vae_pixels.max() <= 1 and a.encoder_pixels.shape == (2, 3, 64, 64)


# -- configs and refusals -----------------------------------------------------------------------
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
    ("--optim.warmup_steps=400", "warmup_steps"),
    ("--diffusion.beta_schedule=\"cosine\"", "beta_schedule"),
    ("--train.unknown=1", "unknown key train.unknown"),
])
def test_bad_config_refused(override, message):
    with pytest.raises(ValueError, match=message):
        DecoderJobConfig.load(None, [override])


def test_cli_reports_bad_config(capsys):
    assert train_decoder.main(["--model.unet=nope"]) == 2
    assert "model.unet must be one of" in capsys.readouterr().err


def test_world_size_above_one_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2.*FSDP"):
        DecoderTrainer(_cfg(tmp_path))


def test_missing_vae_folder_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="AutoencoderKL folder"):
        DecoderTrainer(_cfg(tmp_path, f"--model.vae={tmp_path / 'nowhere'}"))
