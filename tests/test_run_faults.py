"""What a run does around its faults: a run folder another live run uses, an error while an
asynchronous save is pending, a signal while the last one is written, the same command run
again after it resumed from a named checkpoint, a checkpoint whose index is garbage."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from emu2_engine import pretrain
from emu2_engine.checkpoint.dcp import RESUMED_FROM, Checkpointer, CheckpointError, complete_checkpoints
from emu2_engine.train.config import JobConfig
from emu2_engine.train.paths import LOCK_FILE, claim_run_folder
from emu2_engine.train.trainer import Trainer

TINY = ["--data.seq_len=128", "--data.rows=2", "--data.max_images=8", "--data.text_len=128",
        "--data.interleaved_len=128", "--optim.warmup_steps=0", "--train.eval_batches=0",
        "--metrics.tensorboard=false", "--data.prefetch=0", "--train.steps=3"]


def tiny(run_dir, *extra: str) -> JobConfig:
    return JobConfig.load(None, TINY + [f"--train.run_dir={run_dir}", *extra])


def test_a_run_folder_in_use_by_a_live_run_is_refused(tmp_path, capsys):
    """Two runs in one folder deleted each other's unfinished checkpoints and interleaved their
    metrics; now the second is refused in one line (the first holds the folder's lock)."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from emu2_engine.train.paths import claim_run_folder; "
        f"lock = claim_run_folder({str(run)!r}); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = pretrain.main(["--no-progress", *TINY, f"--train.run_dir={run}"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "Traceback" not in err
        assert err == (f"pretrain: train.run_dir = {str(run)!r} is in use by process {holder.pid} on "
                       f"{socket.gethostname()} (it holds {run / LOCK_FILE}): two runs in one folder "
                       f"overwrite each other's checkpoints and metrics")
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: the kernel dropped its lock, and the folder can be used again
    lock = claim_run_folder(run)
    assert (run / LOCK_FILE).read_text().split() == [str(os.getpid()), socket.gethostname()]
    lock.release()
    claim_run_folder(run).release()  # (released: taken again)


def test_two_runs_sharing_a_checkpoint_dir_are_refused(tmp_path, capsys):
    shared = tmp_path / "shared_checkpoints"
    shared.mkdir()
    lock = claim_run_folder(shared, key="checkpoint.dir")  # (as another run's rank 0 holds it)
    try:
        holder = subprocess.run([sys.executable, "-m", "emu2_engine.pretrain", "--no-progress", *TINY,
                                 f"--train.run_dir={tmp_path / 'b'}", f"--checkpoint.dir={shared}"],
                                capture_output=True, text=True)
    finally:
        lock.release()
    assert holder.returncode == 2, holder.stderr
    assert holder.stderr.strip().splitlines()[-1].startswith(
        f"pretrain: checkpoint.dir = {str(shared)!r} is in use by process {os.getpid()} on")
    assert not any((tmp_path / "b").glob("*.toml"))


def test_the_lock_is_released_when_a_run_ends_or_fails(tmp_path, monkeypatch):
    trainer = Trainer(tiny(tmp_path, "--train.steps=1"))
    trainer.train(progress=False)
    claim_run_folder(tmp_path).release()  # free after a normal end
    trainer = Trainer(tiny(tmp_path, "--train.steps=2"))
    monkeypatch.setattr(trainer, "step", lambda batches: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train(progress=False)
    claim_run_folder(tmp_path).release()  # and after an error


def test_an_error_with_an_async_save_pending_does_not_wait_for_the_other_ranks(tmp_path, monkeypatch):
    """With async_save, a rank that failed waited at a barrier for ranks stuck in a training
    collective waiting for it: the job hung (30 min gloo timeout) instead of ending so that
    torchrun could restart it. On an error the pending save completes without the barrier."""
    calls = []
    wait = Checkpointer.wait

    def recording_wait(self, barrier=True):
        calls.append((self._pending is not None, barrier))
        return wait(self, barrier)

    monkeypatch.setattr(Checkpointer, "wait", recording_wait)
    trainer = Trainer(tiny(tmp_path, "--checkpoint.async_save=true", "--checkpoint.interval=1"))
    step = trainer.step

    def failing_step(batches):
        if trainer.step_count == 2:
            raise RuntimeError("out of memory on this rank")
        return step(batches)

    monkeypatch.setattr(trainer, "step", failing_step)
    with pytest.raises(RuntimeError, match="out of memory on this rank"):
        trainer.train(progress=False)
    assert calls[-1] == (True, False)  # step 2's save was pending: completed, no barrier
    assert [s for s, _ in complete_checkpoints(tmp_path / "checkpoints")] == [1, 2]


def test_the_last_async_save_completes_under_the_run_s_signal_handlers(tmp_path, monkeypatch):
    """The handlers were put back before waiting for the last asynchronous write: a SIGTERM
    then killed the process and lost the final checkpoint. The wait now runs under them."""
    handlers = []
    wait = Checkpointer.wait

    def recording_wait(self, barrier=True):
        if self._pending is not None:
            handlers.append(signal.getsignal(signal.SIGTERM))
        return wait(self, barrier)

    monkeypatch.setattr(Checkpointer, "wait", recording_wait)
    trainer = Trainer(tiny(tmp_path, "--checkpoint.async_save=true"))
    trainer.train(progress=False)
    assert handlers and all(getattr(h, "__func__", None) is Trainer._on_signal for h in handlers), handlers
    assert [s for s, _ in complete_checkpoints(tmp_path / "checkpoints")] == [3]


def test_the_same_command_goes_on_from_the_run_s_own_checkpoints(tmp_path):
    """checkpoint.resume = <folder> started the run. Running the same command again (torchrun
    --max-restarts does, so does a requeue or a rerun after a SIGTERM stop) went back to that
    folder and redid every step since; now, once the run has saved, it continues from its own
    newest checkpoint. Before its first save it still starts from the named folder (a leftover
    checkpoint of an older attempt in the run's directory is not taken for its progress, and
    that first save sets the leftover aside)."""
    source = tmp_path / "source"
    Trainer(tiny(source, "--train.steps=2")).train(progress=False)
    named = source / "checkpoints" / "step-000002"
    run = tmp_path / "run"
    Trainer(tiny(run, "--train.steps=6", "--checkpoint.interval=6")).train(progress=False, stop_at=5)
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [5]  # an older attempt's

    cfg = tiny(run, "--train.steps=6", "--checkpoint.interval=1", f"--checkpoint.resume={named}")
    assert Trainer(cfg).resume() == 2  # died before its first save: the named folder again
    first = Trainer(cfg)
    first.train(progress=False, stop_at=4)
    assert first.step_count == 4
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [3, 4]
    assert (run / "checkpoints" / "abandoned-step-000005").is_dir()
    assert json.loads((run / "checkpoints" / RESUMED_FROM).read_text()) == {"resumed_from": str(named.resolve())}

    assert Trainer(cfg).resume() == 4  # the same command again: its own newest
    other = tiny(run, "--train.steps=6", f"--checkpoint.resume={run / 'checkpoints' / 'step-000003'}")
    assert Trainer(other).resume() == 3  # another named folder is obeyed


def test_a_checkpoint_with_a_garbage_index_is_one_error_without_dcp_s_tracebacks(tmp_path, caplog):
    model = torch.nn.Linear(3, 2)
    folder = Checkpointer(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1)).save(1)
    (folder / ".metadata").write_bytes(b"\x00garbage")
    with caplog.at_level(logging.ERROR):
        with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*step-000001 \(corrupt, or not "
                                                  r"written by this engine\): its index: "):
            Checkpointer(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1)).load()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records
