"""One training step of a whole model: time per phase, throughput, TFLOP/s and MFU.

- cpu: the `debug` preset on the shapes world (fp32), as `make run` trains it.
- gpu-quick / gpu-full: `proxy-1b` and `emu2-37b-slice` (through its recipe
  `configs/emu2_widths_slice.toml`) in bf16 autocast, with A/B cases for `train.fp32_residual`
  and `train.weight_cast = op` (autocast's per-use weight casts, as before the default "step").
  Two kinds of case:
  - per micro-batch (`proxy-1b S=2048 rows=1`): one micro-batch, then clipping and the
    optimiser, with a sync between phases to time each; the three warm-up steps, one per
    batch, absorb compilation.
  - the recipe (`recipe proxy_1b compiled`): `configs/proxy_1b.toml` as users run it (every
    block compiled), through `Trainer.step` (its micro-batches one after the other, then one
    optimiser step); and the same eager (`recipe proxy_1b`). This is the number issue 6's MFU
    target is read from. Each timed step carries a `StepTimeline`: the median time of each
    phase (the weights' cast, the first micro-batch, the rest, the fp32 weights' return, the
    clipping, the host's read-back, the optimiser, the reset) on the device and on the host
    goes into the report (`phase_ms`) and into `kernels.md`, and the clipping + optimiser are
    profiled on their own (`<case> tail <family>`).

Batches are built before timing and reused (pinned, as the prefetcher hands them over), so the
numbers are the step's alone (the data loader has its own benchmark). Each micro-batch is taken
as `Trainer.step` takes it (padding images dropped, text rows added); `image_fill` is the share
of the loader's image slots holding real images. Per component: the ViT's forward + backward is
timed alone on a micro-batch's real images, with its TFLOP/s. One micro-batch's forward +
backward is profiled: the top kernels go to `kernels.md` in the output folder, the time per
kernel family (`benchmarks.common.kernel_family`) into the report as `family_ms`. FLOPs come
from `emu2_engine.models.flops` (ViT per image, LLM per token over the real document lengths,
heads; backward = 2x forward); MFU is reported only for a device in the peak table.

Each case prints its line (step, throughput, MFU, peak GiB) as soon as it is timed, so a run
stopped mid-way keeps them in its log. A case that fails (out of memory, say) is noted in the
report's `skipped` as "<case>: FAILED <error>"; the cases after it still run, each from a fresh
start (`_fresh_start`).
"""

from __future__ import annotations

import gc
import os
import re
import statistics
import time
import traceback
from pathlib import Path

import torch

from benchmarks.common import BenchResult, device_name, profile_kernels, time_cpu, time_cuda
from emu2_engine.models.flops import batch_flops, mfu, training_flops
from emu2_engine.train.config import JobConfig
from emu2_engine.train.timeline import StepTimeline
from emu2_engine.train.trainer import Trainer

SUITES = ("cpu", "gpu-quick", "gpu-full")

# (preset, data overrides, steps timed). GPU sizes keep the ViT's activations (one 448 px
# image is about 0.8 GB of saved bf16 activations in ViT-L) well inside 80 GB.
_CASES = {
    "cpu": [("debug", ["--data.seq_len=256", "--data.rows=4"], 10)],
    "gpu-quick": [("proxy-1b", ["--data.seq_len=2048", "--data.rows=1", "--parallel.compile=true"], 10)],
    "gpu-full": [("proxy-1b", ["--data.seq_len=2048", "--data.rows=1"], 10),
                 ("proxy-1b", ["--data.seq_len=2048", "--data.rows=2"], 20)],
}
# (recipe file, overrides, warm-up steps, steps timed): whole optimiser steps through Trainer.step
_RECIPES = {
    "cpu": [("configs/debug.toml", ["--train.device=cpu", "--parallel.microbatches=2"], 1, 2)],
    "gpu-quick": [("configs/proxy_1b.toml", [], 2, 3),  # compiled, as the recipe says
                  # the weight gradients added into the fp32 accumulators inside their GEMMs
                  ("configs/proxy_1b.toml", ["--train.grad_accumulation_fusion=true"], 2, 3),
                  ("configs/proxy_1b.toml", ["--train.fp32_residual=true"], 2, 3),
                  ("configs/emu2_widths_slice.toml", [], 2, 3),  # issue 6's 55 % target
                  ("configs/emu2_widths_slice.toml", ["--train.weight_cast=op"], 2, 3),
                  ("configs/emu2_widths_slice.toml", ["--train.grad_accumulation_fusion=true"], 2, 3),
                  # 32 micro-batches per optimiser step, nearer what a 37B recipe's GPU accumulates
                  # (stage 1: 128 per step on a 16-way optimiser shard, docs/benchmarks.md): the
                  # recipe's 8 give the optimiser a share of the step no 37B run has
                  ("configs/emu2_widths_slice.toml", ["--train.global_batch=32",
                                                      "--parallel.microbatches=32"], 1, 2),
                  # the same 8 rows per step as 4 micro-batches of 2, with room for their images
                  # (69.6 GiB by the plan tool; session 6's run kept 24 image slots per micro-batch,
                  # so its rows held half the images and tokens: not comparable)
                  ("configs/emu2_widths_slice.toml", ["--data.rows=2", "--parallel.microbatches=4",
                                                      "--data.max_images=48"], 2, 3),
                  ("configs/emu2_widths_slice.toml", ["--data.rows=2", "--parallel.microbatches=4",
                                                      "--data.max_images=48",
                                                      "--train.grad_accumulation_fusion=true"], 2, 3),
                  ("configs/proxy_1b.toml", ["--train.weight_cast=op"], 2, 3),
                  ("configs/proxy_1b.toml", ["--parallel.compile=false"], 1, 3)],
    "gpu-full": [("configs/proxy_1b.toml", [], 2, 5),
                 ("configs/proxy_1b.toml", ["--train.fp32_residual=true"], 2, 5),
                 ("configs/emu2_widths_slice.toml", [], 2, 3),  # issue 6's 55 % target
                 ("configs/emu2_widths_slice.toml", ["--train.weight_cast=op"], 2, 3),
                 ("configs/emu2_widths_slice.toml", ["--train.grad_accumulation_fusion=true"], 2, 3),
                 ("configs/proxy_1b.toml", ["--train.weight_cast=op"], 2, 5),
                 ("configs/proxy_1b.toml", ["--train.grad_accumulation_fusion=true"], 2, 5),
                 ("configs/proxy_1b.toml", ["--parallel.compile=false"], 1, 5)],
}
ROOT = Path(__file__).resolve().parent.parent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(preset: str, overrides: list[str], steps: int, result: BenchResult, out_dir: Path) -> None:
    # prefetch 0: the batches are built before timing, and no loader thread may decode
    # during the timed steps
    cfg = JobConfig.load(None, [f"--model.preset={preset}", f"--train.steps={steps + 3}",
                                "--optim.warmup_steps=0", "--train.eval_batches=0", "--data.prefetch=0",
                                *overrides])
    trainer = Trainer(cfg)
    model, opt, device = trainer.model, trainer.optimizer, trainer.device
    batches = [next(trainer.loader) for _ in range(3)]
    flops = [batch_flops(trainer.model_cfg, b) for b in batches]
    fill = _image_fill(batches)
    batches = [_as_the_step_takes_it(trainer, b) for b in batches]
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}
    tokens = images = train_flops = 0
    for i in range(steps + 3):  # a warm-up step on each of the three batches
        batch, fwd = batches[i % 3], flops[i % 3]
        _sync(device)
        t0 = time.perf_counter()
        with trainer.compute():  # (train.weight_cast = step: the weights' cast counts as forward)
            out = model(batch)
            _sync(device)
            t1 = time.perf_counter()
            out.total.backward()
            _sync(device)
            t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t3 = time.perf_counter()
        if i >= 3:
            for name, dt in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2),
                             ("step", t3 - t0)):
                phases[name].append(dt * 1e3)
            tokens += batch.n_tokens
            images += batch.n_images
            train_flops += training_flops(fwd, cfg.optim.lr_vision > 0,  # as the trainer counts
                                          cfg.optim.lr_projector > 0, cfg.optim.lr > 0)
    peak = _peak_gib(device)
    seconds = sum(phases["step"]) / 1e3
    case = f"{preset} S={cfg.data.seq_len} rows={cfg.data.rows}" + (" compiled" if cfg.parallel.compile else "")
    params = {"seq_len": cfg.data.seq_len, "rows": cfg.data.rows}
    for name, values in phases.items():
        result.add(benchmark="train_step", case=case, provider=name, metric="time",
                   value=statistics.median(values), unit="ms", params=params)
    result.add(benchmark="train_step", case=case, provider="engine", metric="throughput",
               value=tokens / seconds, unit="tokens/s", params=params)
    result.add(benchmark="train_step", case=case, provider="engine", metric="images_per_s",
               value=images / seconds, unit="images/s", params=params)
    result.add(benchmark="train_step", case=case, provider="engine", metric="tflops",
               value=train_flops / seconds / 1e12, unit="TFLOP/s", params=params)
    if peak is not None:
        result.add(benchmark="train_step", case=case, provider="engine", metric="peak_memory",
                   value=peak, unit="GiB", params=params)
    achieved = mfu(train_flops / seconds, device_name() if device.type == "cuda" else None)
    if achieved is None:
        result.skipped.append(f"{case}: MFU not applicable on {device_name()} (no peak rate)")
    else:
        result.add(benchmark="train_step", case=case, provider="engine", metric="mfu",
                   value=100 * achieved, unit="%", params=params)
    result.add(benchmark="train_step", case=case, provider="engine", metric="image_fill",
               value=fill, unit="% of image slots", params=params)
    print(f"[train_step] {case}: step {statistics.median(phases['step']):.0f} ms, "
          f"{tokens / seconds:,.0f} tokens/s" + ("" if achieved is None else f", MFU {100 * achieved:.1f} %")
          + _peak_text(peak), flush=True)
    _components(trainer, batches[0], flops[0], case, params, result, out_dir)
    total = sum(flops[0][k] for k in ("vit", "projector", "llm_linear", "llm_attention", "heads"))
    for k in ("vit", "projector", "llm_linear", "llm_attention", "heads"):
        result.add(benchmark="train_step", case=case, provider=k, metric="flops_share",
                   value=100 * flops[0][k] / total, unit="% of forward FLOPs", params=params)


def _peak_gib(device: torch.device) -> float | None:
    """The case's peak of allocated device memory in GiB (`_fresh_start` resets it between
    cases), or None off a GPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _peak_text(peak: float | None) -> str:
    return "" if peak is None else f", peak {peak:.1f} GiB"


def _fusion_label(device: torch.device, dtype: torch.dtype | None) -> str:
    """The case-name suffix of train.grad_accumulation_fusion: the path the accumulation took
    when it is not the fused GEMM (a build whose addmm refuses an fp32 accumulator)."""
    from emu2_engine.models.block_linear import accumulation_path
    path = accumulation_path(device, dtype or torch.float32)
    fused = path == "addmm-fp32-epilogue" or device.type != "cuda"
    return " grad-acc-fusion" + ("" if fused else f" ({path})")


def _as_the_step_takes_it(trainer: Trainer, batch):
    """`batch` as `Trainer.step` hands it to the model: validated, padding images dropped (no
    pipeline here), text rows added, on the device, images in the autocast dtype."""
    (moved,) = trainer.micro_batches(iter([batch]), 1)
    return moved


def _image_fill(batches) -> float:
    slots = sum(b.images.shape[0] for b in batches)
    return 100 * sum(b.n_images for b in batches) / max(slots, 1)


def measure_recipe(path: str, overrides: list[str], warmup: int, steps: int, result: BenchResult,
                   out_dir: Path) -> None:
    """Whole optimiser steps of a recipe through `Trainer.step`: its `parallel.microbatches`
    micro-batches (built once, pinned, reused every step), clipping, the optimiser and the
    schedule, exactly as `Trainer.train` runs them minus the loader and the metrics."""
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = JobConfig.load(ROOT / path, [f"--train.steps={warmup + steps}", "--optim.warmup_steps=0",
                                           "--train.eval_batches=0", "--data.prefetch=0",
                                           f"--train.run_dir={run_dir}", *overrides])
        trainer = Trainer(cfg)
        device = trainer.device
        n = cfg.parallel.microbatches
        batches = [next(trainer.loader) for _ in range(n)]
        fill = _image_fill(batches)
        if device.type == "cuda":
            batches = [b.to("cpu") for b in batches]
            from emu2_engine.data.prefetch import pin_batch
            batches = [pin_batch(b) for b in batches]
        times, tokens, images, flops, timelines = [], 0, 0, 0, []
        for i in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            micro = trainer.micro_batches(iter(batches), n)
            timeline = StepTimeline(device) if i >= warmup else None
            out = trainer.step(micro, timeline)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                tokens, images, flops = tokens + out.tokens, images + out.images, flops + micro.flops
                timelines.append(timeline.summary())
        peak = _peak_gib(device)
        seconds = sum(times)
        name = (Path(path).stem + (" compiled" if cfg.parallel.compile else "")
                + (" fp32-residual" if cfg.train.fp32_residual else "")
                + ("" if cfg.train.weight_cast == "step" else f" weight-cast-{cfg.train.weight_cast}")
                + (_fusion_label(device, trainer.autocast_dtype) if cfg.train.grad_accumulation_fusion else "")
                + (f" {cfg.data.rows}x{n}" if any(o.startswith(("--data.rows", "--parallel.microbatches"))
                                                  for o in overrides) else ""))
        case = f"recipe {name}"
        params = {"seq_len": cfg.data.seq_len, "rows": cfg.data.rows, "microbatches": n}
        add = lambda metric, value, unit, provider="engine": result.add(  # noqa: E731
            benchmark="train_step", case=case, provider=provider, metric=metric, value=value, unit=unit,
            params=params)
        add("time", statistics.median(times) * 1e3, "ms", provider="step")
        add("throughput", tokens / seconds, "tokens/s")
        add("images_per_s", images / seconds, "images/s")
        add("tflops", flops / seconds / 1e12, "TFLOP/s")
        add("image_fill", fill, "% of image slots")
        if peak is not None:
            add("peak_memory", peak, "GiB")
        achieved = mfu(flops / seconds, device_name() if device.type == "cuda" else None)
        if achieved is None:
            result.skipped.append(f"{case}: MFU not applicable on {device_name()} (no peak rate)")
        else:
            add("mfu", 100 * achieved, "%")
        print(f"[train_step] {case}: step {statistics.median(times) * 1e3:.0f} ms, "
              f"{tokens / seconds:,.0f} tokens/s, {flops / seconds / 1e12:.0f} TFLOP/s"
              + ("" if achieved is None else f", MFU {100 * achieved:.1f} %") + _peak_text(peak), flush=True)
        _phases(timelines, case, params, result, out_dir)
        first = _as_the_step_takes_it(trainer, batches[0])
        first_flops = batch_flops(trainer.model_cfg, batches[0])
        _components(trainer, first, first_flops, case, params, result, out_dir)
        _tail(trainer, batches[0], case, params, result, out_dir)


def _phases(timelines: list[dict], case: str, params: dict, result: BenchResult, out_dir: Path) -> None:
    """The timed steps' phases (`StepTimeline.summary`), the median of each, into the report
    (`phase_ms`, providers "device" and "host") and as a table into `kernels.md`."""
    names = list(timelines[0])
    rows = []
    for name in names:
        host = statistics.median(t[name].host_ms for t in timelines)
        dev = None if timelines[0][name].device_ms is None else \
            statistics.median(t[name].device_ms for t in timelines)
        rows.append((name, dev, host))
        result.add(benchmark="train_step", case=f"{case} {name}", provider="host", metric="phase_ms",
                   value=host, unit="ms", params=params)
        if dev is not None:
            result.add(benchmark="train_step", case=f"{case} {name}", provider="device", metric="phase_ms",
                       value=dev, unit="ms", params=params)
    lines = [f"## train_step {case}: the step's phases (median of {len(timelines)} steps)", "",
             "Device: from the stream reaching the phase's start to finishing its work, idle "
             "included. Host: from the previous mark to this one (the read-back is the host "
             "waiting for the device).", "", "| phase | device ms | host ms |", "|---|---:|---:|"]
    lines += [f"| {name} | {'-' if dev is None else f'{dev:.2f}'} | {host:.2f} |" for name, dev, host in rows]
    devs = [dev for _, dev, _ in rows if dev is not None]
    lines += [f"| all | {sum(devs):.2f} | {sum(h for _, _, h in rows):.2f} |" if devs else
              f"| all | - | {sum(h for _, _, h in rows):.2f} |"]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "kernels.md", "a") as f:
        f.write("\n".join(lines) + "\n\n")


def _tail(trainer: Trainer, batch, case: str, params: dict, result: BenchResult, out_dir: Path) -> None:
    """The kernel profile of the step's tail, the clipping and the optimiser, on the gradients
    of one micro-batch (every parameter the step trains has one). After the timings: it
    updates the weights, which nothing measures afterwards."""
    device = trainer.device
    micro = trainer.micro_batches(iter([batch]), 1)
    trainer.forward_backward(micro)

    def tail():
        trainer.clip_grad_norm()
        trainer.optimizer.step()

    try:
        families = profile_kernels(tail, out_dir / "kernels.md", f"train_step {case}: clipping + optimiser",
                                   device.type)
    except Exception as e:  # noqa: BLE001 - a profiler failure must not cost the timings
        result.skipped.append(f"{case} tail profile: {type(e).__name__}: {str(e)[:200]}")
        return
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
    for family, ms in families.items():
        result.add(benchmark="train_step", case=f"{case} tail {family}", provider="engine", metric="family_ms",
                   value=ms, unit="ms", params=params)


def _fresh_start() -> None:
    """Between cases: the next case starts as in a fresh process. Its peak memory must not
    include this one's leftovers, and its blocks must compile for its own shapes.

    Called by `_run_case` once the case's function has returned or raised: inside it, its
    locals (the trainer, a `micro` holding the bound `trainer.batch_flops`, the step's output,
    the timelines) still hold the model, its gradients and optimiser state, which no
    `empty_cache` could then give back, and the next case's peak would sit on top of them.
    Compiled code is cached per code object, and every case's blocks share `VisionBlock.forward`
    and `LlamaDecoderLayer.forward`. Without the reset, a second case of other widths would
    recompile them with dynamic sizes (Dynamo's automatic dynamic shapes), and a long list of
    cases could reach Dynamo's recompile limit, after which blocks run eagerly."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _components(trainer: Trainer, batch, flops: dict, case: str, params: dict, result: BenchResult,
                out_dir: Path) -> None:
    """The ViT's forward + backward alone on `batch`'s images, and the kernel profile of one
    forward + backward of `batch` (on the device, padding images already dropped)."""
    model, device = trainer.model, trainer.device
    images = batch.images
    slots = images.shape[0]
    # a frozen encoder has no backward to time (nothing in it takes a gradient)
    if slots and model.visual is not None and trainer.cfg.optim.lr_vision > 0:
        grad = None

        def vit_step():
            nonlocal grad
            with trainer.autocast():
                out = model.visual(images)
            if grad is None:
                grad = torch.randn_like(out)
            out.backward(grad)

        timer = (lambda f: time_cuda(f, warmup=2, repeats=5)) if device.type == "cuda" else \
            (lambda f: time_cpu(f, warmup=1, repeats=3))
        with trainer.compute():  # weights as inside a step (cast once, before the timing)
            ms = timer(vit_step)
        model.zero_grad(set_to_none=True)
        result.add(benchmark="train_step", case=case, provider="vit", metric="time", value=ms, unit="ms",
                   params=params)
        result.add(benchmark="train_step", case=case, provider="vit", metric="tflops",
                   value=3 * flops["vit"] / (ms * 1e-3) / 1e12, unit="TFLOP/s", params=params)

    def train_step():
        with trainer.autocast():
            out = model(batch)
        out.total.backward()
        model.zero_grad(set_to_none=True)

    try:  # one micro-batch as in the middle of a step: weights already cast, gradients accumulated
        with trainer.compute():
            families = profile_kernels(train_step, out_dir / "kernels.md", f"train_step {case}", device.type)
    except Exception as e:  # noqa: BLE001 - a profiler failure must not cost the timings
        result.skipped.append(f"{case} profile: {type(e).__name__}: {str(e)[:200]}")
        return
    for family, ms in families.items():
        result.add(benchmark="train_step", case=f"{case} {family}", provider="engine", metric="family_ms",
                   value=ms, unit="ms", params=params)


def run(suite: str, out_dir: Path) -> BenchResult:
    result = BenchResult(plots=[
        {"name": "phases", "kind": "bar", "metric": "time",
         "providers": ["forward", "backward", "optimizer"], "title": "training step: time per phase"},
        {"name": "flops", "kind": "bar", "metric": "flops_share",
         "providers": ["vit", "projector", "llm_linear", "llm_attention", "heads"],
         "title": "training step: forward FLOPs by component"}])
    if suite != "cpu" and not torch.cuda.is_available():
        result.skipped.append(f"{suite}: no CUDA device on this machine")
        return result
    # TRAIN_STEP_CASES (a regular expression) keeps the cases whose description matches it, e.g.
    # "recipe configs/proxy_1b.toml$" for the recipe as it stands alone; the recipes run first.
    keep = re.compile(os.environ.get("TRAIN_STEP_CASES", ""))
    cases = [(" ".join(["recipe", path, *overrides]), measure_recipe, (path, overrides, warmup, steps))
             for path, overrides, warmup, steps in _RECIPES[suite]]
    cases += [(" ".join([preset, *overrides]), measure, (preset, overrides, steps))
              for preset, overrides, steps in _CASES[suite]]
    for description, measure_case, args in cases:
        if keep.search(description):
            _run_case(description, measure_case, args, result, out_dir)
    return result


def _run_case(description: str, measure_case, args: tuple, result: BenchResult, out_dir: Path) -> None:
    """`measure_case(*args, result, out_dir)`, then `_fresh_start`. A case that fails (out of
    memory, say) is noted in `result.skipped` as "<description>: FAILED <error>" and costs
    only itself: the measurements it added before failing stay, the cases after it still run.
    `_fresh_start` runs once the case's frames are gone (the exception and its traceback, which
    hold them, are cleared when the except clause ends), so its memory can be given back."""
    try:
        measure_case(*args, result, out_dir)
    except Exception as e:  # noqa: BLE001 - one case's failure must not cost the others' numbers
        error = f"{type(e).__name__}: {str(e)[:300]}"
        result.skipped.append(f"{description}: FAILED {error}")
        print(f"[train_step] {description}: FAILED {error}", flush=True)
        traceback.print_exc()
    _fresh_start()


if __name__ == "__main__":
    from benchmarks.report import markdown
    from benchmarks.run import run_suite

    print(markdown(run_suite("cpu", Path("/tmp"), only=["train_step"])))
