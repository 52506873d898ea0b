"""The metrics file across restarts: a write cut short by a kill, strict JSON for non-finite
numbers, and the TensorBoard purge step of a resumed run."""

import json
import sys
import types

import pytest

from emu2_engine.train.metrics import MetricsWriter


def _strict(line: str) -> dict:
    """json.loads that refuses NaN and Infinity, as strict JSON readers (jq, JavaScript) do."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=refuse)


def _lines(path):
    return path.read_text().splitlines()


def test_a_torn_last_line_is_dropped_with_a_warning_and_later_appends_are_clean(tmp_path, capsys):
    """SIGKILL during a write leaves half a line at the end; the restart must not fail on it
    (under torchrun --max-restarts every restart would), and its appends start a new line."""
    whole = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    torn = '{"step": 4, "loss": 0.2'  # no closing brace, no newline
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in whole) + torn)
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, keep_until=3)
    assert "dropping the last line of" in capsys.readouterr().err
    writer.write({"step": 4, "loss": 0.25})
    assert [_strict(line) for line in _lines(path)] == whole + [{"step": 4, "loss": 0.25}]
    MetricsWriter(tmp_path, enabled=True, tensorboard=False, keep_until=4)  # and again: no warning
    assert capsys.readouterr().err == ""


def test_a_bad_line_before_the_last_is_an_error_naming_its_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a JSON record"):
        MetricsWriter(tmp_path, enabled=True, tensorboard=False, keep_until=3)
    path.write_text('{"step": 1, "loss": 1.0}\n[1, 2]\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(ValueError, match=r"line 2 must be a JSON object with an integer \"step\""):
        MetricsWriter(tmp_path, enabled=True, tensorboard=False, keep_until=3)


def test_non_finite_numbers_are_written_as_null_and_read_back_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    # a file of an older version, with a bare NaN: read, kept, and rewritten as strict JSON
    path.write_text('{"step": 1, "loss": NaN, "grad_norm": 2.0}\n')
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, keep_until=1)
    writer.write({"step": 2, "loss": float("nan"), "grad_norm": float("inf"), "mfu": None,
                  "skipped": {"a": float("-inf")}, "lr": 1e-3})
    writer.write({"step": 3, "loss": 0.5, "grad_norm": 1.0})
    assert [_strict(line) for line in _lines(path)] == [
        {"step": 1, "loss": None, "grad_norm": 2.0},
        {"step": 2, "loss": None, "grad_norm": None, "mfu": None, "skipped": {"a": None}, "lr": 1e-3},
        {"step": 3, "loss": 0.5, "grad_norm": 1.0}]
    MetricsWriter(tmp_path, enabled=True, tensorboard=False, keep_until=2)  # resume reads nulls
    assert [_strict(line)["step"] for line in _lines(path)] == [1, 2]


def test_tensorboard_purges_only_the_steps_after_the_checkpoint(tmp_path, monkeypatch):
    """SummaryWriter drops the events of steps >= purge_step; a run resumed from the checkpoint
    of step 4 keeps step 4's events and runs step 5 again, so purge_step is 5."""
    made = []

    class FakeSummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            made.append((log_dir, purge_step))

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    MetricsWriter(tmp_path, enabled=True, tensorboard=True, keep_until=4).close()
    MetricsWriter(tmp_path, enabled=True, tensorboard=True, keep_until=None).close()
    assert made == [(str(tmp_path / "tensorboard"), 5), (str(tmp_path / "tensorboard"), None)]
