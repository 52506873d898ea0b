"""Throughput, MFU and the metrics file of the trainer (hand-computed values)."""

import json

import pytest

from emu2_engine.train.metrics import MetricsWriter, ThroughputMeter


def test_meter_rates_are_the_jobs_and_mfu_is_per_device():
    meter = ThroughputMeter("NVIDIA H100 80GB HBM3", devices=8)
    meter.update(tokens=4000, images=40, flops=8 * 989e12, seconds=1.5, data_seconds=0.25)
    meter.update(tokens=2000, images=20, flops=8 * 989e12 * 0.5, seconds=0.5, data_seconds=0.25)
    report = meter.report()
    assert report["tokens_per_s"] == pytest.approx(3000) and report["images_per_s"] == pytest.approx(30)
    # 1.5 x 8 x 989 TFLOP over 2 s on 8 devices: 741.75 TFLOP/s each, 75% of the H100 SXM's 989
    assert report["tflops"] == pytest.approx(741.75) and report["mfu"] == pytest.approx(0.75)
    assert report["data_wait"] == pytest.approx(0.25)
    meter.reset()
    assert meter.report()["tokens_per_s"] == 0
    assert ThroughputMeter(None).report()["mfu"] is None  # a CPU: no peak, MFU not applicable


def test_writer_keeps_records_up_to_the_resumed_step_and_says_once_without_tensorboard(tmp_path, capsys):
    lines = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)] + [{"step": 6, "skipped": {}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=True, keep_until=4)
    writer.write({"step": 5, "loss": 0.5})
    writer.close()
    got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert got == lines[:4] + [{"step": 5, "loss": 0.5}]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert capsys.readouterr().err.count("the tensorboard package is not installed") == 1
    fresh = MetricsWriter(tmp_path, enabled=True, tensorboard=False, keep_until=None)
    assert (tmp_path / "metrics.jsonl").read_text() == "" and fresh.tb is None
    MetricsWriter(tmp_path / "other", enabled=False, tensorboard=True, keep_until=None).write({"step": 1})
    assert not (tmp_path / "other").exists()  # ranks other than 0 write nothing
