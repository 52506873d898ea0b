"""`torchrun --nproc_per_node=2 -m emu2_engine.pretrain` end to end on the CPU (gloo): tensor
parallel against one process, pipeline parallel against one process and resumed by two ranks,
and sharded data parallel with two micro-batches per step and a checkpoint."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emu2_engine.checkpoint.dcp import complete_checkpoints
from emu2_engine.train.config import JobConfig
from emu2_engine.train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
TINY = ["--data.seq_len=128", "--data.rows=2", "--data.max_images=8", "--data.text_len=128",
        "--data.interleaved_len=128", "--optim.warmup_steps=1", "--train.eval_batches=0",
        "--metrics.log_interval=1", "--metrics.tensorboard=false", "--train.steps=3"]


def torchrun(run_dir: Path, *args: str, steps: int = 3) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "emu2_engine.pretrain", "--no-progress", *TINY, f"--train.run_dir={run_dir}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"done: {steps} steps" in proc.stdout
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tp2_matches_one_process(tmp_path):
    """tp = 2: both ranks read the same batches, so each step's loss and gradient norm match a
    one-process run of the same config (fp32 on the CPU; measured agreement about 1e-6)."""
    records = [r for r in torchrun(tmp_path / "tp2", "--parallel.tp=2") if "loss" in r]
    single = Trainer(JobConfig.load(None, TINY + [f"--train.run_dir={tmp_path / 'one'}"]))
    reference = [r for r in single.train(progress=False) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for got, want in zip(records, reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    assert records[-1]["mfu"] is None and records[-1]["tokens_per_s"] > 0
    # the job's tokens and images per step: both ranks hold the same batches, counted once
    assert [(r["tokens"], r["images"]) for r in records] == [(r["tokens"], r["images"]) for r in reference]
    assert [s for s, _ in complete_checkpoints(tmp_path / "tp2" / "checkpoints")] == [3]
    # a one-process run starts from the two ranks' weights (checkpoint.init_from), nothing else
    fresh = Trainer(JobConfig.load(None, TINY + [f"--train.run_dir={tmp_path / 'fresh'}", "--checkpoint.init_from="
                                                 f"{tmp_path / 'tp2' / 'checkpoints' / 'step-000003'}"]))
    assert fresh.resume() is None and fresh.step_count == 0 and not fresh.optimizer.state
    resumed = Trainer(JobConfig.load(None, TINY + [f"--train.run_dir={tmp_path / 'resumed'}", "--checkpoint.resume="
                                                   f"{tmp_path / 'tp2' / 'checkpoints' / 'step-000003'}"]))
    assert resumed.resume() == 3  # the whole state, through the Checkpointer: the same weights
    for name, a in resumed.model.state_dict().items():
        assert torch.equal(a, fresh.model.state_dict()[name]), name


def test_pp2_interleaved_matches_one_process_resumes_exactly_and_its_checkpoint_loads_anywhere(tmp_path):
    """pp = 2 with the interleaved 1F1B schedule (4 stages, two per rank, the debug model made
    4 layers deep): the same data as one process, so the same losses. Resumed by two ranks from
    step 2, it repeats steps 3 and 4 bit for bit (each rank's optimiser groups come back: saved
    by position they collided across ranks, and the resumed step failed). Each rank's two stages
    are checkpointed under the whole model's names, so one process resumes from it.

    Both runs start from the same weights of the base (non-chat) debug model, into the chat
    model (`checkpoint.init_from`, the vocabulary grown by two rows): the first pipeline stage
    takes the embedding's rows, the last the head's; the resumed run takes its own checkpoint."""
    from dataclasses import replace

    from emu2_engine.checkpoint.dcp import save_model_weights
    from emu2_engine.models import Emu2Config, Emu2Model

    base = Emu2Config.from_preset("debug")
    torch.manual_seed(123)  # not the runs' own initialisation
    save_model_weights(Emu2Model(replace(base, llm=replace(base.llm, layers=4))), tmp_path / "base")
    deep = ["--model.llm_layers=4", "--parallel.microbatches=2", "--train.steps=4",
            "--checkpoint.interval=2", "--checkpoint.keep=2", "--model.preset=debug-chat"]
    start = [f"--checkpoint.init_from={tmp_path / 'base'}"]
    pp = ["--parallel.pp=2", "--parallel.pp_schedule=interleaved-1f1b", "--parallel.stages_per_rank=2"]
    records = [r for r in torchrun(tmp_path / "pp2", *deep, *start, *pp, steps=4) if "loss" in r]
    single = Trainer(JobConfig.load(None, TINY + deep + start + [f"--train.run_dir={tmp_path / 'one'}"]))
    reference = [r for r in single.train(progress=False) if "loss" in r]
    for got, want in zip(records, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    assert single.model.lm_head.weight.shape[0] == base.llm.vocab_size + 2
    shutil.copytree(tmp_path / "pp2" / "checkpoints" / "step-000002",
                    tmp_path / "resumed" / "checkpoints" / "step-000002")
    resumed = [r for r in torchrun(tmp_path / "resumed", *deep, *start, *pp, steps=4) if "loss" in r]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in resumed] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in records[2:]]
    # the whole model's parameters and optimiser moments, from the two ranks' four stages
    reloaded = Trainer(JobConfig.load(None, TINY + deep + [
        f"--train.run_dir={tmp_path / 'reload'}",
        f"--checkpoint.resume={tmp_path / 'pp2' / 'checkpoints' / 'step-000004'}"]))
    assert reloaded.resume() == 4
    for (name, a), b in zip(single.model.state_dict().items(), reloaded.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    assert reloaded.scheduler.get_last_lr() == single.scheduler.get_last_lr()


def test_fsdp2_two_microbatches_meta_init_runs_and_checkpoints(tmp_path):
    """dp_shard = 2 with 2 micro-batches per rank, the model built on the meta device and each
    rank's shards initialised in place (as the 37B recipes do): the ranks read different data
    (so the loss differs from one process); the run completes, learns, logs every step and
    checkpoints the end."""
    records = torchrun(tmp_path, "--parallel.dp_shard=2", "--parallel.microbatches=2",
                       "--parallel.param_dtype=float32", "--parallel.meta_init=true")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert 0 <= steps[-1]["data_wait"] < 1
    assert [s for s, _ in complete_checkpoints(tmp_path / "checkpoints")] == [3]
    assert JobConfig.load(tmp_path / "config.toml").parallel.dp_shard == 2


def test_rank_killed_under_max_restarts_resumes_from_the_last_checkpoint(tmp_path):
    """SIGKILL to the worker of `torchrun --max-restarts=1` after step 5, checkpoints every 3
    steps: torchrun restarts it, it resumes from step 3 (resume = auto), finishes with exit
    status 0, and the per-step losses equal those of an uninterrupted run bit for bit."""
    import os
    import signal
    import time

    run = tmp_path / "killed"
    args = [*TINY[:-1], "--train.steps=10", "--checkpoint.interval=3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "--max-restarts=1", "-m", "emu2_engine.pretrain", "--no-progress", *args,
           f"--train.run_dir={run}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not reach step 5 in 120 s"
        time.sleep(0.05)
    worker = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(worker) == 1
    os.kill(int(worker[0]), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    resumed_at = int(out.split("resumed from step ")[1].split()[0])
    assert resumed_at in (3, 6)  # the newest complete checkpoint when the worker died
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    got = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(got) == list(range(1, 11))

    whole = Trainer(JobConfig.load(None, args + [f"--train.run_dir={tmp_path / 'whole'}"]))
    want = {r["step"]: r["loss"] for r in whole.train(progress=False) if "loss" in r}
    assert got == want
