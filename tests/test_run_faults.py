"""What a run does around its faults: a run folder another live run uses, an error while an
asynchronous save is pending, a signal while the last one is written, a torchrun restart of a
run that resumed from a named checkpoint, a checkpoint whose index is garbage."""

import logging
import signal
import subprocess
import sys

import pytest
import torch

from emu2_engine import pretrain
from emu2_engine.checkpoint.dcp import Checkpointer, CheckpointError, complete_checkpoints
from emu2_engine.train.config import JobConfig
from emu2_engine.train.paths import LOCK_FILE, FolderError, claim_run_folder, release_run_folder
from emu2_engine.train.trainer import Trainer

TINY = ["--data.seq_len=128", "--data.rows=2", "--data.max_images=8", "--data.text_len=128",
        "--data.interleaved_len=128", "--optim.warmup_steps=0", "--train.eval_batches=0",
        "--metrics.tensorboard=false", "--data.prefetch=0", "--train.steps=3"]


def tiny(run_dir, *extra: str) -> JobConfig:
    return JobConfig.load(None, TINY + [f"--train.run_dir={run_dir}", *extra])


@pytest.fixture
def other_process():
    """A live process of this host that is not this one (its pid)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_run_folder_in_use_by_a_live_run_is_refused(tmp_path, capsys, other_process):
    """Two runs in one folder deleted each other's unfinished checkpoints and interleaved their
    metrics; now the second is refused in one line, and the first's mark stays."""
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(f"{other_process} {__import__('socket').gethostname()}\n")
    rc = pretrain.main(["--no-progress", *TINY, f"--train.run_dir={run}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err
    assert err == (f"pretrain: train.run_dir = {str(run)!r} is in use by process {other_process} (its .lock): "
                   f"two runs in one folder overwrite each other's checkpoints and metrics; if no run uses "
                   f"it, delete {run / LOCK_FILE}")
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]


def test_a_mark_of_a_gone_process_is_taken_over_and_released(tmp_path):
    """A run killed (or restarted by torchrun) leaves its mark: the next run takes it over."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / LOCK_FILE).write_text(f"{gone} {__import__('socket').gethostname()}\n")
    lock = claim_run_folder(tmp_path)
    assert lock.read_text().split()[0] == str(__import__("os").getpid())
    assert claim_run_folder(tmp_path) == lock  # this process again (a second train() call)
    release_run_folder(lock)
    assert not lock.exists()


def test_release_leaves_another_run_s_mark(tmp_path, other_process):
    lock = tmp_path / LOCK_FILE
    lock.write_text(f"{other_process} somewhere\n")
    release_run_folder(lock)
    assert lock.exists()
    with pytest.raises(FolderError, match="in use by process"):  # same host: checked, alive
        lock.write_text(f"{other_process} {__import__('socket').gethostname()}\n")
        claim_run_folder(tmp_path)


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


def test_a_restart_of_a_run_resumed_from_a_named_checkpoint_takes_its_own_newest(tmp_path, monkeypatch):
    """checkpoint.resume = <folder>: torchrun --max-restarts runs the same command, which went
    back to that folder and redid every step since. Now a restart takes the run's own newest
    checkpoint; and the first start sets aside the run's checkpoints after the named one (as
    its first save would), so a restart never takes those for its progress."""
    source = tmp_path / "source"
    Trainer(tiny(source, "--train.steps=2")).train(progress=False)
    named = source / "checkpoints" / "step-000002"
    run = tmp_path / "run"
    Trainer(tiny(run, "--train.steps=6", "--checkpoint.interval=6")).train(progress=False, stop_at=5)
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [5]  # an older attempt's

    cfg = tiny(run, "--train.steps=6", "--checkpoint.interval=1", f"--checkpoint.resume={named}")
    first = Trainer(cfg)
    first.train(progress=False, stop_at=4)
    assert first.step_count == 4
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [3, 4]
    assert (run / "checkpoints" / "abandoned-step-000005").is_dir()

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = Trainer(cfg)
    assert again.resume() == 4


def test_a_checkpoint_with_a_garbage_index_is_one_error_without_dcp_s_tracebacks(tmp_path, caplog):
    model = torch.nn.Linear(3, 2)
    folder = Checkpointer(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1)).save(1)
    (folder / ".metadata").write_bytes(b"\x00garbage")
    with caplog.at_level(logging.ERROR):
        with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*step-000001 \(corrupt, or not "
                                                  r"written by this engine\): its index: "):
            Checkpointer(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1)).load()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records
