"""Exact resume, SIGTERM and non-finite steps of the pretraining trainer, on the CPU."""

import json
import math
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from emu2_engine.checkpoint.dcp import complete_checkpoints
from emu2_engine.train.config import JobConfig
from emu2_engine.train.trainer import NonFiniteError, Trainer

TINY = ["--data.seq_len=128", "--data.rows=2", "--data.max_images=8", "--data.text_len=128",
        "--data.interleaved_len=128", "--optim.warmup_steps=1", "--train.eval_batches=0",
        "--metrics.log_interval=1", "--metrics.tensorboard=false", "--checkpoint.interval=0",
        "--data.prefetch=2"]  # the resume tests run with the read-ahead, as on a GPU


def tiny_config(run_dir, *extra: str) -> JobConfig:
    return JobConfig.load(None, TINY + [f"--train.run_dir={run_dir}", *extra])


def losses(run_dir) -> dict[int, tuple[float, float, float, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["ce"], r["mse"], r["grad_norm"]) for r in lines if "loss" in r}


def test_resume_is_bit_exact(tmp_path):
    """2k steps in one go against k steps, a checkpoint, and a fresh trainer resuming to 2k
    (microbatches = 2, so the loader position inside a step and the pool matter): the losses
    and gradient norms of every step agree bit for bit, and so do the final parameters."""
    k = 3
    extra = [f"--train.steps={2 * k}", "--parallel.microbatches=2"]
    whole = Trainer(tiny_config(tmp_path / "whole", *extra))
    whole.train(progress=False)

    first = Trainer(tiny_config(tmp_path / "split", *extra))
    first.train(progress=False, stop_at=k)
    assert [s for s, _ in complete_checkpoints(tmp_path / "split" / "checkpoints")] == [k]
    assert sorted(losses(tmp_path / "split")) == list(range(1, k + 1))
    second = Trainer(tiny_config(tmp_path / "split", *extra))
    second.train(progress=False)
    assert second.step_count == 2 * k

    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert sorted(losses(tmp_path / "whole")) == list(range(1, 2 * k + 1))
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    # the last step is always checkpointed; keep = 2 leaves the newest two
    assert [s for s, _ in complete_checkpoints(tmp_path / "split" / "checkpoints")] == [k, 2 * k]
    # run again: already complete, nothing trained, the metrics of the run kept
    again = Trainer(tiny_config(tmp_path / "split", *extra))
    assert not any("loss" in r for r in again.train(progress=False)) and again.step_count == 2 * k
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


def test_nonfinite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    """A NaN loss at step 2 leaves the parameters as they were (no update), is counted in the
    metrics, and the run goes on."""
    trainer = Trainer(tiny_config(tmp_path, "--train.steps=4"))
    real = trainer.forward_backward
    seen = []

    def nan_at_step_2(batches, timeline=None):
        out = real(batches, timeline)
        seen.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
        return out * float("nan") if trainer.step_count == 1 else out

    monkeypatch.setattr(trainer, "forward_backward", nan_at_step_2)
    trainer.train(progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["nonfinite_steps"] for r in steps] == [0, 1, 1, 1]
    assert steps[1]["loss"] is None  # NaN is written as null (strict JSON)
    assert all(math.isfinite(r["loss"]) for r in steps[2:])
    # parameters before step 3 (after skipped step 2) equal those before step 2
    for name, before in seen[1].items():
        assert torch.equal(before, seen[2][name]), name
    assert any(not torch.equal(seen[0][n], seen[1][n]) for n in seen[0])  # step 1 did update


def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys):
    """A NaN gradient every step: after train.max_nonfinite = 3 of them the run stops with a
    message; `pretrain` turns that into exit status 1 and one line on stderr."""
    from emu2_engine import pretrain

    original = Trainer.clip_grad_norm
    monkeypatch.setattr(Trainer, "clip_grad_norm", lambda self: original(self) * float("nan"))
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(up to step 3\) had a non-finite"):
        Trainer(tiny_config(tmp_path / "a", "--train.steps=10", "--train.max_nonfinite=3")).train(progress=False)
    rc = pretrain.main(["--no-progress", *TINY, f"--train.run_dir={tmp_path / 'b'}", "--train.steps=10",
                        "--train.max_nonfinite=2"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pretrain: 2 steps in a row (up to step 2) had a non-finite loss or gradient norm")


def test_nonfinite_counts_survive_a_resume(tmp_path):
    """Steps 2-4 non-finite with train.max_nonfinite = 3: the run stops at step 4, also when it
    was interrupted after step 3 and resumed (the counts are in the checkpoint; a restart under
    torchrun --max-restarts would otherwise count from 0 and never stop)."""
    def trainer(run):
        t = Trainer(tiny_config(tmp_path / run, "--train.steps=5", "--train.max_nonfinite=3",
                                "--checkpoint.interval=0"))
        real = t.forward_backward
        t.forward_backward = lambda b, tl=None: real(b, tl) * (float("nan") if t.step_count in (1, 2, 3) else 1.0)
        return t

    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(up to step 4\)"):
        trainer("whole").train(progress=False)
    trainer("split").train(progress=False, stop_at=3)
    resumed = trainer("split")
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(up to step 4\)"):
        resumed.train(progress=False)
    assert resumed.nonfinite_total == 3


def test_sigterm_saves_a_checkpoint_and_exits_0_then_resume_continues(tmp_path):
    """SIGTERM to `python -m emu2_engine.pretrain` mid-run: the step under way finishes, its
    checkpoint is written, the exit status is 0 with a message; a new trainer resumes from it
    and its first record is the next step."""
    run = tmp_path / "run"
    args = TINY + [f"--train.run_dir={run}", "--train.steps=500", "--optim.warmup_steps=5"]
    proc = subprocess.Popen([sys.executable, "-m", "emu2_engine.pretrain", "--no-progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not reach step 2 in 120 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    saved = [s for s, _ in complete_checkpoints(run / "checkpoints")]
    assert len(saved) == 1 and 2 <= saved[0] < 500
    assert (f"pretrain: received SIGTERM: checkpoint of step {saved[0]} saved in "
            f"{run / 'checkpoints'}; run the same command to resume") in out
    assert max(losses(run)) == saved[0]  # every finished step was logged, none after
    stopped = json.loads((run / "stopped.json").read_text())  # what a job script checks
    assert stopped == {"step": saved[0], "reason": "received SIGTERM", "checkpoint": str(run / "checkpoints")}

    resumed = Trainer(JobConfig.load(None, args))
    records = resumed.train(progress=False, stop_at=saved[0] + 2)
    assert not (run / "stopped.json").exists()  # a new run removes it
    assert [r["step"] for r in records] == [saved[0] + 1, saved[0] + 2]
    assert sorted(losses(run)) == list(range(1, saved[0] + 3))


def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_and_a_second_launch_finishes(tmp_path):
    """SIGTERM to `torchrun --nproc_per_node=2` (gloo; dp_shard = 2, so each rank reads its own
    data, prefetched) mid-run. The agent forwards it to both workers; they finish the step under
    way, agree through the all-reduced stop flag, and save one checkpoint of that step: both
    ranks' shards, each rank's data position after the batches it trained on (not the
    prefetcher's read-ahead), no .tmp folder, and no worker killed by the agent. torchrun itself
    exits 1: its agent re-raises the signal it forwarded (SignalException) whatever the workers
    did (torch 2.13; docs/multinode.md). A second launch resumes from the step and finishes."""
    import pickle
    import re

    import torch.distributed.checkpoint as dcp

    from emu2_engine.data.loader import build_loader
    from emu2_engine.data.tokenizer import Emu2Tokenizer

    run = tmp_path / "run"
    args = TINY + [f"--train.run_dir={run}", "--train.steps=20", "--parallel.dp_shard=2",
                   "--parallel.param_dtype=float32"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "emu2_engine.pretrain", "--no-progress", *args]
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not reach step 2 in 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "got signal: 15" in err, err[-4000:]
    assert "forcefully exiting" not in err  # the agent had to SIGKILL no worker
    saved = [s for s, _ in complete_checkpoints(run / "checkpoints")]
    assert len(saved) == 1 and 2 <= saved[0] < 20, (saved, out, err[-4000:])
    step = saved[0]
    assert not list((run / "checkpoints").glob("*.tmp"))
    said = r"pretrain: (received SIGTERM|a signal on another rank): "
    assert re.search(said + f"saving a checkpoint of step {step}\n", out), out
    assert re.search(said + f"checkpoint of step {step} saved in ", out), out
    assert max(losses(run)) == step
    assert json.loads((run / "stopped.json").read_text())["step"] == step  # torchrun's 1 notwithstanding

    folder = run / "checkpoints" / f"step-{step:06d}"
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    with warnings.catch_warnings():  # DCP warns when loading without a process group
        warnings.simplefilter("ignore")
        state = {"dataloader": {"dp0of2": b"", "dp1of2": b""}, "train": {"step": -1}}
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    assert state["train"]["step"] == step
    cfg = JobConfig.load(None, args)
    for rank in range(2):
        loader = build_loader(cfg.data, Emu2Tokenizer(), cfg.model.build_config(), rank=rank, world_size=2)
        for _ in range(step):
            next(loader)
        assert pickle.loads(state["dataloader"][f"dp{rank}of2"]) == loader.state_dict(), rank

    second = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, timeout=300)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"resumed from step {step} " in second.stdout and "done: 20 steps" in second.stdout
    assert sorted(losses(run)) == list(range(1, 21))
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [step, 20]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _refused_and_unchanged(trainer: Trainer, error: type, match: str) -> None:
    """`trainer.resume()` raises `error` (matching `match`) and leaves every weight as it was."""
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(error, match=match):
        trainer.resume()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_a_new_run_starts_from_another_runs_weights(tmp_path, capsys):
    """checkpoint.init_from: a new run takes the weights of an engine checkpoint folder, of
    engine weights (a state dict file) or of released Emu2 weights, and nothing else: its step,
    optimiser, schedule and data start fresh. Once the new run has its own checkpoint, that is
    what it resumes from. Weights of another model load nothing and say why."""
    from emu2_engine.checkpoint.released import WeightsError, export_released_weights

    first = Trainer(tiny_config(tmp_path / "first", "--train.steps=2"))
    first.train(progress=False)
    folder = tmp_path / "first" / "checkpoints" / "step-000002"
    torch.save(first.model.state_dict(), tmp_path / "engine.pt")
    export_released_weights(first.model, tmp_path / "released")
    for source, what in ((folder, "an engine checkpoint"), (tmp_path / "engine.pt", "engine weights"),
                         (tmp_path / "released", "released Emu2 weights")):
        run = tmp_path / f"from-{Path(source).name}"
        second = Trainer(tiny_config(run, "--train.steps=3", f"--checkpoint.init_from={source}"))
        assert not _same_weights(first.model, second.model)
        assert second.resume() is None and second.step_count == 0
        assert _same_weights(first.model, second.model), what
        assert not second.optimizer.state and second.scheduler.last_epoch == 0
        assert f"weights from {source} ({what})" in capsys.readouterr().out
    # resume = none starts afresh from init_from as well; a missing source is said where it is read
    afresh = Trainer(tiny_config(tmp_path / "afresh", "--train.steps=3", "--checkpoint.resume=none",
                                 f"--checkpoint.init_from={folder}"))
    assert afresh.resume() is None and _same_weights(first.model, afresh.model)
    with pytest.raises(FileNotFoundError, match="checkpoint.init_from = .*nowhere' does not exist"):
        Trainer(tiny_config(tmp_path / "lost", "--train.steps=3",
                            f"--checkpoint.init_from={tmp_path / 'nowhere'}")).resume()
    # its own checkpoint wins over init_from once it has one
    second.train(progress=False, stop_at=1)
    again = Trainer(tiny_config(run, "--train.steps=3", f"--checkpoint.init_from={folder}"))
    assert again.resume() == 1 and _same_weights(second.model, again.model)
    # weights of another model: nothing is loaded
    other = Trainer(tiny_config(tmp_path / "other", "--train.steps=3", "--model.llm_layers=3",
                                f"--checkpoint.init_from={tmp_path / 'engine.pt'}"))
    _refused_and_unchanged(other, WeightsError, r"(?s)does not match the model; nothing was loaded.*missing: 9\s+llm.layers.2")
    deep = Trainer(tiny_config(tmp_path / "deep", "--train.steps=3", "--model.llm_layers=3",
                               f"--checkpoint.init_from={folder}"))
    with pytest.raises(ValueError, match=r"(?s)holds another model .* missing \(9\): llm.layers.2"):
        deep.resume()


def test_a_chat_run_starts_from_emu2_weights_with_two_more_tokens(tmp_path, capsys):
    """Emu2-Chat is tuned from Emu2, whose vocabulary lacks [USER] and [ASSISTANT]: a chat
    model's init_from takes such weights (an engine checkpoint folder, engine weights, released
    weights), copies the saved rows of the embedding and the LM head and starts the two new
    rows at the mean of the saved ones; every other tensor is copied as it is. Other vocabulary
    sizes, or a non-chat model, still load nothing."""
    from emu2_engine.checkpoint.released import WeightsError, export_released_weights

    base = Trainer(tiny_config(tmp_path / "base", "--train.steps=2", "--checkpoint.interval=1"))
    base.train(progress=False, stop_at=1)
    folder = tmp_path / "base" / "checkpoints" / "step-000001"
    torch.save(base.model.state_dict(), tmp_path / "engine.pt")
    export_released_weights(base.model, tmp_path / "released")
    want = base.model.state_dict()
    rows = base.model_cfg.llm.vocab_size
    for source in (folder, tmp_path / "engine.pt", tmp_path / "released"):
        chat = Trainer(tiny_config(tmp_path / f"chat-{Path(source).name}", "--model.preset=debug-chat",
                                   "--train.steps=3", f"--checkpoint.init_from={source}"))
        assert chat.model_cfg.llm.vocab_size == rows + 2
        assert chat.resume() is None
        got = chat.model.state_dict()
        for name, value in want.items():
            if name in ("llm.embed_tokens.weight", "lm_head.weight"):
                assert got[name].shape == (rows + 2, value.shape[1])
                assert torch.equal(got[name][:rows], value), name
                mean = value.double().mean(0).float()
                assert torch.allclose(got[name][rows:], mean.expand(2, -1), rtol=0, atol=1e-6), name
            else:
                assert torch.equal(got[name], value), name
        assert (f"weights from {source} (" in (out := capsys.readouterr().out)
                and "vocabulary grown from 784 to 786 tokens: [USER] and [ASSISTANT] start at the mean" in out)
    # the chat model's own weights load as they are (nothing grown, nothing said of it)
    torch.save(chat.model.state_dict(), tmp_path / "chat.pt")
    again = Trainer(tiny_config(tmp_path / "again", "--model.preset=debug-chat", "--train.steps=3",
                                f"--checkpoint.init_from={tmp_path / 'chat.pt'}"))
    again.resume()
    assert _same_weights(chat.model, again.model) and "grown" not in capsys.readouterr().out
    # chat weights into the base model: two rows too many, refused; the base model never grows
    back = Trainer(tiny_config(tmp_path / "back", "--train.steps=3", f"--checkpoint.init_from={tmp_path / 'chat.pt'}"))
    with pytest.raises(WeightsError, match=r"(?s)wrong shape.*checkpoint \(786, 128\), model \(784, 128\)"):
        back.resume()
    # a vocabulary one token short of the chat one is not Emu2's: refused, nothing loaded
    short = {k: (v[:-1] if k in ("llm.embed_tokens.weight", "lm_head.weight") else v)
             for k, v in chat.model.state_dict().items()}
    torch.save(short, tmp_path / "short.pt")
    odd = Trainer(tiny_config(tmp_path / "odd", "--model.preset=debug-chat", "--train.steps=3",
                              f"--checkpoint.init_from={tmp_path / 'short.pt'}"))
    _refused_and_unchanged(odd, WeightsError, r"(?s)nothing was loaded.*checkpoint \(785, 128\), model \(786, 128\)")


def test_resuming_a_frozen_encoder_run_with_the_encoder_trained_points_to_init_from(tmp_path):
    """A checkpoint whose optimiser never held the encoder (lr_vision = 0) cannot resume a run
    that trains it: refused, and the message names the way to start from its weights."""
    from emu2_engine.checkpoint.dcp import CheckpointError

    frozen = Trainer(tiny_config(tmp_path / "frozen", "--train.steps=2", "--optim.lr_vision=0"))
    frozen.train(progress=False)
    folder = tmp_path / "frozen" / "checkpoints" / "step-000002"
    trained = Trainer(tiny_config(tmp_path / "trained", "--train.steps=3", f"--checkpoint.resume={folder}"))
    with pytest.raises(CheckpointError, match=r"app\.optimizer\..*optimiser of the checkpoint holds other "
                                              r"parameters.*use checkpoint.init_from"):
        trained.resume()
    fresh = Trainer(tiny_config(tmp_path / "fresh", "--train.steps=3", f"--checkpoint.init_from={folder}"))
    assert fresh.resume() is None and _same_weights(frozen.model, fresh.model)
