"""One training step of a whole model: time per phase, throughput, TFLOP/s and MFU.

- cpu: the `debug` preset on the shapes world (fp32), as `make run` trains it.
- gpu-quick / gpu-full: `proxy-1b` (and, in gpu-full, `emu2-37b-slice`) in bf16 autocast;
  gpu-quick times proxy-1b twice, eager and with every block compiled (`parallel.compile`;
  the three warm-up steps, one per batch, absorb the compilation).

Batches are built before timing and reused, so the numbers are the step's alone (the data
loader has its own benchmark). Per component: the ViT's forward + backward is timed alone on the
same images (every image slot, padding included, as the step runs it), with its TFLOP/s over the
real images; `image_fill` is the share of image slots holding real images. One more step is
profiled: the top kernels go to `kernels.md` in the output folder, the time per kernel family
(`benchmarks.common.kernel_family`) into the report as `family_ms`. FLOPs come from `emu2_engine.models.flops` (ViT per image, LLM
per token over the real document lengths, heads; backward = 2x forward); MFU is reported only
for a device in the peak table.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import BenchResult, device_name, profile_kernels, time_cpu, time_cuda
from emu2_engine.models.flops import batch_flops, mfu, training_flops
from emu2_engine.train.config import JobConfig
from emu2_engine.train.trainer import Trainer

SUITES = ("cpu", "gpu-quick", "gpu-full")

# (preset, data overrides, steps timed). GPU sizes keep the ViT's activations (one 448 px
# image is about 1 GB of saved bf16 activations in ViT-L) well inside 80 GB.
_CASES = {
    "cpu": [("debug", ["--data.seq_len=256", "--data.rows=4"], 10)],
    "gpu-quick": [("proxy-1b", ["--data.seq_len=2048", "--data.rows=1"], 10),
                  ("proxy-1b", ["--data.seq_len=2048", "--data.rows=1", "--parallel.compile=true"], 10)],
    "gpu-full": [("proxy-1b", ["--data.seq_len=2048", "--data.rows=2"], 20),
                 ("emu2-37b-slice", ["--data.seq_len=2048", "--data.rows=1"], 10)],
}


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
    batches = [b.to(device) for b in batches]
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}
    tokens = images = train_flops = 0
    for i in range(steps + 3):  # a warm-up step on each of the three batches
        batch, fwd = batches[i % 3], flops[i % 3]
        _sync(device)
        t0 = time.perf_counter()
        with trainer.autocast():
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
            images += batch.images.shape[0]
            train_flops += training_flops(fwd)
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
    achieved = mfu(train_flops / seconds, device_name() if device.type == "cuda" else None)
    if achieved is None:
        result.skipped.append(f"{case}: MFU not applicable on {device_name()} (no peak rate)")
    else:
        result.add(benchmark="train_step", case=case, provider="engine", metric="mfu",
                   value=100 * achieved, unit="%", params=params)
    _components(trainer, batches, flops, case, params, result, out_dir)
    total = sum(flops[0][k] for k in ("vit", "projector", "llm_linear", "llm_attention", "heads"))
    for k in ("vit", "projector", "llm_linear", "llm_attention", "heads"):
        result.add(benchmark="train_step", case=case, provider=k, metric="flops_share",
                   value=100 * flops[0][k] / total, unit="% of forward FLOPs", params=params)
    del trainer, model, opt, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _components(trainer: Trainer, batches, flops, case: str, params: dict, result: BenchResult,
                out_dir: Path) -> None:
    """The ViT's share of the step, image-slot fill, and the step's kernel profile."""
    model, device, batch = trainer.model, trainer.device, batches[0]
    images = batch.images
    slots = images.shape[0]
    result.add(benchmark="train_step", case=case, provider="engine", metric="image_fill",
               value=100 * batch.n_images / max(slots, 1), unit="% of image slots", params=params)
    if slots and model.visual is not None:
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
        ms = timer(vit_step)
        model.zero_grad(set_to_none=True)
        result.add(benchmark="train_step", case=case, provider="vit", metric="time", value=ms, unit="ms",
                   params=params)
        result.add(benchmark="train_step", case=case, provider="vit", metric="tflops",
                   value=3 * flops[0]["vit"] / (ms * 1e-3) / 1e12, unit="TFLOP/s", params=params)

    def train_step():
        with trainer.autocast():
            out = model(batch)
        out.total.backward()
        model.zero_grad(set_to_none=True)

    try:
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
    for preset, overrides, steps in _CASES[suite]:
        measure(preset, overrides, steps, result, out_dir)
    return result


if __name__ == "__main__":
    from benchmarks.report import markdown
    from benchmarks.run import run_suite

    print(markdown(run_suite("cpu", Path("/tmp"), only=["train_step"])))
