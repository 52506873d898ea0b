"""The benchmark harness on the CPU: the runner's skipping, the report files, the ratios, the
comparison. The numbers in the fixture are synthetic (its device field says so)."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "report_synthetic.json"

# benchmarks/ is not an installed package: import it from the repository root, then take the
# root off sys.path again so nothing else finds kernels/ as a top-level module.
sys.path.insert(0, str(REPO))
try:
    from benchmarks import compare, report, run  # noqa: E402
finally:
    sys.path.remove(str(REPO))


def test_ratios_always_mean_ours_is_better_above_one():
    bench = json.loads(FIXTURE.read_text())["benchmarks"]
    ratios = {(c, m, p): r for c, m, p, r in report.ratio_rows(bench["attention"])}
    assert ratios[("causal S=1024", "time", "sdpa")] == pytest.approx(1.5)       # 3 ms / 2 ms
    assert ratios[("causal S=1024", "tflops", "sdpa")] == pytest.approx(1.25)    # 400 / 320
    assert ratios[("causal S=2048", "tflops", "sdpa")] == pytest.approx(0.9)
    memory = report.ratio_rows(bench["head_loss"])
    assert memory == [("T=8192", "peak_memory", "eager", pytest.approx(10.0))]


def test_report_files_from_recorded_json(tmp_path):
    data = json.loads(FIXTURE.read_text())
    paths = report.write_report(data, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["attention-causal.png", "report.json", "report.md"]
    assert json.loads((tmp_path / "report.json").read_text()) == data
    md = (tmp_path / "report.md").read_text()
    assert "device: **fixture: synthetic numbers" in md
    assert "| causal S=1024 | time | sdpa | 1.50x |" in md
    assert "**failed**: `RuntimeError: boom`" in md
    assert "- skipped: flash-attn is not installed" in md
    png = (tmp_path / "attention-causal.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_runner_skips_with_reasons(tmp_path):
    result = run.run_suite("gpu-quick", tmp_path, only=["packer", "train_step"])
    packer, step = result["benchmarks"]["packer"], result["benchmarks"]["train_step"]
    assert packer["skipped"] == ["not part of the gpu-quick suite"] and not packer["measurements"]
    assert step["skipped"] == ["gpu-quick: no CUDA device on this machine"]
    assert "train_step: skipped (gpu-quick: no CUDA device" in run.summary(result)
    with pytest.raises(ValueError, match="unknown benchmark"):
        run.run_suite("cpu", tmp_path, only=["nonexistent"])
    with pytest.raises(ValueError, match="--suite must be one of"):
        run.run_suite("tpu", tmp_path)


def test_cpu_training_step_benchmark(tmp_path):
    result = run.run_suite("cpu", tmp_path, only=["train_step"])
    bench = result["benchmarks"]["train_step"]
    assert bench["error"] is None
    case = "debug S=256 rows=4"
    by = {(m["provider"], m["metric"]): m["value"] for m in bench["measurements"] if m["case"] == case}
    assert by[("step", "time")] > 0 and by[("engine", "throughput")] > 0
    assert by[("forward", "time")] + by[("backward", "time")] <= by[("step", "time")] * 1.01
    shares = [v for (p, m), v in by.items() if m == "flops_share"]
    assert sum(shares) == pytest.approx(100.0)
    assert any("MFU not applicable" in s for s in bench["skipped"])
    # components: the ViT alone, the image-slot fill, and one profiled step
    assert 0 < by[("vit", "time")] < by[("step", "time")] * 1.5 and by[("vit", "tflops")] > 0
    assert 0 < by[("engine", "image_fill")] <= 100
    families = {m["case"][len(case) + 1:]: m["value"] for m in bench["measurements"]
                if m["metric"] == "family_ms" and m["case"].startswith(case)}
    assert families["gemm"] > 0 and families["attention"] > 0
    # the host's wall time of the profiled call: on the CPU it holds the ops' own time
    assert families["host"] >= 0.5 * families["total"] > 0
    table = (tmp_path / "kernels.md").read_text()
    assert "Host: fn() returned after" in table
    # the ops that launched the work, with their input shapes
    assert "By op and input shapes" in table and "Input Shapes" in table and "aten::mm" in table
    assert "## train_step debug S=256 rows=4" in table and "| gemm | `aten::mm` |" in table
    # the recipe, whole optimiser steps through Trainer.step (configs/debug.toml, 2 micro-batches)
    recipe = {(m["provider"], m["metric"]): m["value"] for m in bench["measurements"]
              if m["case"] == "recipe debug 4x2"}
    assert recipe[("step", "time")] > 0 and recipe[("engine", "throughput")] > 0
    assert recipe[("engine", "tflops")] > 0 and 0 < recipe[("engine", "image_fill")] <= 100
    assert recipe[("vit", "time")] > 0
    assert any(s.startswith("recipe debug 4x2: MFU not applicable") for s in bench["skipped"])
    assert "## train_step recipe debug 4x2" in table
    # the recipe's step by phase (Trainer.step's timeline): every micro-batch, then the tail
    phases = {m["case"][len("recipe debug 4x2 "):]: m["value"] for m in bench["measurements"]
              if m["metric"] == "phase_ms" and m["case"].startswith("recipe debug 4x2 ")}
    assert list(phases) == ["weight cast", "micro-batch 1", "micro-batches 2+", "fp32 weights back", "clip",
                            "read-back", "optimizer", "zero_grad + schedule"]
    assert all(ms >= 0 for ms in phases.values()) and phases["micro-batch 1"] > 0 and phases["optimizer"] > 0
    # the phases partition the step: their sum is the step's time less what precedes the first mark
    assert 0.8 * recipe[("step", "time")] <= sum(phases.values()) <= recipe[("step", "time")] * 1.01
    assert "## train_step recipe debug 4x2: the step's phases (median of 2 steps)" in table
    # the tail (clipping + optimiser) profiled on its own
    tail = {m["case"][len("recipe debug 4x2 tail "):]: m["value"] for m in bench["measurements"]
            if m["metric"] == "family_ms" and m["case"].startswith("recipe debug 4x2 tail ")}
    assert tail["total"] > 0 and tail["host"] > 0
    assert "## train_step recipe debug 4x2: clipping + optimiser" in table


def test_kernel_families():
    from benchmarks.common import kernel_family
    names = {"sm90_xmma_fprop_implicit_gemm_bf16f32": "conv", "flash_fwd_kernel": "attention",
             "cudnn_generated_fort_native_sdpa_sm90_flash_fprop": "attention", "_bwd_dkdv_kernel": "attention",
             "_tap_conv_kernel": "conv", "nvjet_tst_256x128_64x4": "gemm", "aten::addmm": "gemm",
             "vectorized_layer_norm_kernel": "norm", "CatArrayBatchedCopy": "copy",
             "elementwise_kernel<gelu>": "other", "triton_poi_fused_convert_element_type_0": "other"}
    assert {n: kernel_family(n) for n in names} == names


def test_compare_reports(tmp_path):
    a = json.loads(FIXTURE.read_text())
    b = json.loads(FIXTURE.read_text())
    b["benchmarks"]["attention"]["measurements"][0]["value"] = 1.0  # triton causal S=1024: 2 -> 1 ms
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    lines = compare.compare(compare.load(tmp_path / "a.json"), compare.load(tmp_path / "b.json"))
    row = next(line for line in lines if "causal S=1024" in line and "triton" in line and " time " in line)
    assert row.rstrip().endswith("B/A    0.500")
    with pytest.raises(FileNotFoundError, match="no such report"):
        compare.load(tmp_path / "missing")


def test_environment_names_the_commit_given_in_emu2_commit(monkeypatch):
    """A copied tree with stale git metadata (the GPU machine's) reports the commit it is told."""
    from benchmarks.common import environment

    monkeypatch.setenv("EMU2_COMMIT", "0123abc")
    assert environment()["git_commit"] == "0123abc (EMU2_COMMIT)"
    monkeypatch.delenv("EMU2_COMMIT")
    assert environment()["git_commit"] != "0123abc (EMU2_COMMIT)"


def test_idle_gaps_of_a_timeline():
    """GPU idle = the uncovered stretches between the first start and the last end; overlapping
    events (two streams) leave no gap; each gap names the events on either side."""
    from benchmarks.common import _idle_gaps
    spans = [(0, 10, "a"), (5, 12, "b"), (20, 30, "c"), (31, 40, "d"), (32, 35, "e")]
    assert _idle_gaps(spans) == [(8, "b", "c"), (1, "c", "d")]
    assert _idle_gaps([]) == [] and _idle_gaps([(3, 4, "x")]) == []


def test_host_lines_rank_events_and_list_every_blocking_call():
    """The host table ranks CPU events by self time and, below it, names every runtime call
    that can block the host however small; with none, it says so."""
    from benchmarks.common import _host_lines
    host = {"aten::mm": [10, 4.0], "cudaLaunchKernel": [900, 9.0], "cudaStreamSynchronize": [2, 0.01],
            "cudaMemcpyAsync": [1, 0.02], "aten::add": [5, 0.5]}
    lines = _host_lines(host, top=2)
    assert lines[2:4] == ["| 9.000 | 900 | `cudaLaunchKernel` |", "| 4.000 | 10 | `aten::mm` |"]
    assert lines[-1] == ("Runtime calls that can block the host: `cudaMemcpyAsync` x1 (0.020 ms), "
                         "`cudaStreamSynchronize` x2 (0.010 ms).")
    assert _host_lines({"aten::mm": [1, 1.0]}, top=5)[-1] == "Runtime calls that can block the host: none."


def test_video_unet_providers_by_name(monkeypatch):
    from benchmarks import video_unet
    monkeypatch.delenv("VIDEO_UNET_PROVIDERS", raising=False)
    assert video_unet._gpu_providers() == ["kernels", "reference", "reference-cl", "kernels-gn-reference"]
    monkeypatch.setenv("VIDEO_UNET_PROVIDERS", "kernels, kernels-compiled")
    assert video_unet._gpu_providers() == ["kernels", "kernels-compiled"]
    monkeypatch.setenv("VIDEO_UNET_PROVIDERS", "kernels,fast")
    with pytest.raises(ValueError, match="VIDEO_UNET_PROVIDERS must name some of"):
        video_unet._gpu_providers()


def test_video_unet_runs_the_compiled_providers_last_and_names_the_conv_paths(monkeypatch):
    """kernels-cudagraphs runs last (a cap that stops its compilation costs only it), after
    kernels-compiled, after the eager providers in the order asked; the conv-path line counts
    the tuner's training choices and those that differ from the rule compiled code runs."""
    from benchmarks import video_unet
    asked = ["kernels-cudagraphs", "kernels", "kernels-compiled", "reference", "triton-attention"]
    assert video_unet._in_running_order(asked) == ["kernels", "reference", "triton-attention",
                                                   "kernels-compiled", "kernels-cudagraphs"]
    ops = video_unet.ops_stc
    assert ops.LIBRARY_BELOW == 16384  # (the shapes below sit on either side of it)
    big, small = (1, 320, 16, 32, 32), (1, 1280, 16, 4, 4)  # 16,384 and 256 pixel rows

    def key(shape, training):
        return (shape, (shape[1], shape[1], 3, 3), 3, True, True, "bf16", "cuda", training)

    monkeypatch.setattr(ops, "_TUNED", {key(big, True): "conv3d", key(small, True): "conv3d",
                                        key((1, 640, 16, 16, 16), True): "conv2d+conv1d",
                                        key(big, False): "gemm"})  # (inference: not counted)
    assert video_unet._conv_paths() == ("conv paths timed and chosen for 3 shapes: conv2d+conv1d 1, "
                                        "conv3d 2; 2 differ from the static rule the compiled providers run")


def test_train_step_case_fails_alone_and_each_case_is_gone_before_the_next(tmp_path, monkeypatch):
    """A case that raises mid-way (its trainer built and stepped) is noted as FAILED and the next
    case still runs; when `_fresh_start` runs after each case, a weak reference to the case's
    trainer is dead, so the memory it held can be given back before the next case starts."""
    import weakref

    from benchmarks import train_step

    trainers = []

    class Recorded(train_step.Trainer):
        def __init__(self, cfg):
            super().__init__(cfg)
            trainers.append(weakref.ref(self))

    alive = []  # at each _fresh_start: which trainers built so far are still reachable
    fresh_start = train_step._fresh_start

    def recording_fresh_start():
        fresh_start()
        alive.append([ref() is not None for ref in trainers])

    failures = iter([True, False])
    phases = train_step._phases

    def first_case_fails(*args):
        if next(failures):
            raise RuntimeError("simulated failure after the timed steps")
        phases(*args)

    monkeypatch.setattr(train_step, "Trainer", Recorded)
    monkeypatch.setattr(train_step, "_fresh_start", recording_fresh_start)
    monkeypatch.setattr(train_step, "_phases", first_case_fails)
    monkeypatch.setattr(train_step, "_components", lambda *args: None)  # (the costly parts)
    monkeypatch.setattr(train_step, "_tail", lambda *args: None)
    monkeypatch.setitem(train_step._RECIPES, "cpu", [
        ("configs/debug.toml", ["--train.device=cpu", "--data.rows=1"], 0, 1),
        ("configs/debug.toml", ["--train.device=cpu", "--data.rows=2"], 0, 1)])
    monkeypatch.setitem(train_step._CASES, "cpu", [])
    monkeypatch.delenv("TRAIN_STEP_CASES", raising=False)
    result = train_step.run("cpu", tmp_path)
    assert alive == [[False], [False, False]]
    failed = [s for s in result.skipped if ": FAILED " in s]
    assert failed == ["recipe configs/debug.toml --train.device=cpu --data.rows=1: FAILED "
                      "RuntimeError: simulated failure after the timed steps"]
    # the first case's numbers from before the failure stay, the second case's are all there
    steps = {m.case: m.value for m in result.measurements if m.metric == "time" and m.provider == "step"}
    assert set(steps) == {"recipe debug 1x1", "recipe debug 2x1"} and all(v > 0 for v in steps.values())
    assert any(m.case.startswith("recipe debug 2x1 ") and m.metric == "phase_ms" for m in result.measurements)
    assert not any(m.case.startswith("recipe debug 1x1 ") and m.metric == "phase_ms" for m in result.measurements)
    # the summary printed last names the failed case
    report = {"suite": "cpu", "environment": {"device": "cpu"},
              "benchmarks": {"train_step": {**result.to_dict(), "error": None}}}
    assert f"  train_step: {failed[0]}" in run.summary(report).splitlines()
