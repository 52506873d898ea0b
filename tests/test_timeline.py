"""StepTimeline: where one optimiser step spends its time (emu2_engine/train/timeline.py)."""

import time

import pytest
import torch

from emu2_engine.train.timeline import StepTimeline


def test_phases_follow_the_marks_and_fold_the_micro_batches():
    t = StepTimeline(torch.device("cpu"))
    for name in ("weight cast", "micro-batch 1", "micro-batch 2", "micro-batch 3", "clip"):
        if name == "micro-batch 2":
            time.sleep(0.02)
        t.mark(name)
    phases = t.phases()
    assert [p.name for p in phases] == ["weight cast", "micro-batch 1", "micro-batch 2", "micro-batch 3", "clip"]
    assert all(p.device_ms is None and p.host_ms >= 0 for p in phases)
    assert phases[2].host_ms >= 20  # the sleep fell in micro-batch 2's phase, and only there
    summary = t.summary()
    assert list(summary) == ["weight cast", "micro-batch 1", "micro-batches 2+", "clip"]
    assert summary["micro-batches 2+"].host_ms == pytest.approx(phases[2].host_ms + phases[3].host_ms)


def test_a_timeline_without_a_phase_says_so():
    with pytest.raises(ValueError, match="no phase"):
        StepTimeline(torch.device("cpu")).phases()


@pytest.mark.gpu
def test_device_time_counts_the_work_queued_in_the_phase():
    torch.cuda.synchronize()
    t = StepTimeline(torch.device("cuda"))
    t.mark("empty")
    torch.cuda._sleep(50_000_000)  # tens of ms of device time, queued in no time
    t.mark("sleep")
    empty, sleep = t.phases()
    assert sleep.device_ms > 5 and sleep.device_ms > 10 * sleep.host_ms
    assert 0 <= empty.device_ms < 1
