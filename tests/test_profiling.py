"""`[profiling]`: profiler traces of fixed step numbers, per rank, through resumes; bad settings."""

import json

import pytest
import torch
from torch.profiler import ProfilerAction

from emu2_engine.train.config import JobConfig
from emu2_engine.train.profiling import StepProfiler, window_action
from emu2_engine.train.trainer import Trainer
from test_trainer_resume import tiny_config  # tests/ is on sys.path (pytest's prepend import mode)


def test_the_recorded_steps_are_fixed_step_numbers():
    """interval 5, active 2, warmup 1: steps 4-5, 9-10, ... recorded (saved after 5, 10, ...),
    steps 3, 8, ... warm the profiler up."""
    acts = [window_action(step, 5, 2, 1) for step in range(1, 11)]
    N, W, R, S = (ProfilerAction.NONE, ProfilerAction.WARMUP, ProfilerAction.RECORD,
                  ProfilerAction.RECORD_AND_SAVE)
    assert acts == [N, N, W, R, S, N, N, W, R, S]
    assert [window_action(step, 1, 1, 0) for step in (1, 2, 3)] == [S, S, S]


def _windows(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_run_records_the_same_steps_when_resumed(tmp_path):
    """interval 2, active 1, warmup 1: steps 2, 4 and 6 are recorded, by a run stopped after
    step 3 and resumed as by one that runs through; each window has rank 0's Chrome trace
    (with the model's operators) and its table, and nothing half-written."""
    run = tmp_path / "run"
    args = ["--train.steps=6", "--checkpoint.interval=3", "--profiling.enable=true",
            "--profiling.interval=2", "--profiling.warmup=1"]
    Trainer(tiny_config(run, *args)).train(progress=False, stop_at=3)
    assert _windows(run / "profile") == ["step-000002"]
    resumed = Trainer(tiny_config(run, *args))
    resumed.train(progress=False)
    assert resumed.step_count == 6
    assert _windows(run / "profile") == ["step-000002", "step-000004", "step-000006"]
    for window in (run / "profile").iterdir():
        assert sorted(p.name for p in window.iterdir()) == ["rank0.json", "rank0.txt"]
        trace = json.loads((window / "rank0.json").read_text())
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert any(n.startswith("aten::mm") or n.startswith("aten::addmm") for n in names)
        assert "Self CPU" in (window / "rank0.txt").read_text()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"profiling needs .* got interval 2, active 2, warmup 1"):
        JobConfig.load(None, ["--profiling.enable=true", "--profiling.interval=2", "--profiling.active=2"])
    with pytest.raises(ValueError, match=r"profiling needs .* got interval 0"):
        JobConfig.load(None, ["--profiling.enable=true", "--profiling.interval=0"])
    JobConfig.load(None, ["--profiling.interval=0"])  # not checked while profiling is off
    with pytest.raises(ValueError, match="memory_snapshot records the CUDA caching allocator; this run is on cpu"):
        StepProfiler(10, 1, 1, "unused", 0, torch.device("cpu"), 0, memory_snapshot=True)


def test_the_decoder_trainer_records_its_steps_too(tmp_path):
    """train_decoder shares the section: with interval 2, steps 2 and 4 are recorded; a bad
    setting is refused by its config as by the pretraining one."""
    from emu2_engine.train.decoder import DecoderTrainer
    from emu2_engine.train.decoder_config import DecoderJobConfig

    cfg = DecoderJobConfig.load(None, [f"--train.run_dir={tmp_path}", "--train.steps=4", "--train.eval_batches=0",
                                       "--data.batch_size=2", "--optim.warmup_steps=1", "--profiling.enable=true",
                                       "--profiling.interval=2", "--profiling.warmup=0"])
    DecoderTrainer(cfg).train(progress=False)
    assert _windows(tmp_path / "profile") == ["step-000002", "step-000004"]
    assert "traceEvents" in json.loads((tmp_path / "profile" / "step-000004" / "rank0.json").read_text())
    with pytest.raises(ValueError, match=r"profiling needs .* got interval 1, active 1, warmup 1"):
        DecoderJobConfig.load(None, ["--profiling.enable=true", "--profiling.interval=1"])
