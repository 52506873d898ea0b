"""One training step (forward + backward) of the video decoder: the UNet inflated to 3D.

    python -m benchmarks.run --suite gpu-quick --only video_unet

Providers (the same model under different `EMU2_KERNELS` settings and layouts, so each op is
A/B'd alone):
- "kernels" (`auto`, the default): the body channels-last (`UNet.channels_last`, the default on
  CUDA); `spatiotemporal_conv` for every resnet conv with its temporal conv (on a GPU the
  fastest of its cuDNN / cuBLAS paths, timed once per shape), the `group_norm` kernel for every
  norm;
  the spatial-temporal self-attention has no mask, so it runs SDPA's fused kernels (flash /
  cuDNN attention; `ops.backend`, dense_attention);
- "reference" (`reference`, body NCHW): plain PyTorch as a user would write it: cuDNN conv2d +
  conv1d per resnet conv, PyTorch's GroupNorm, the same SDPA attention (session 4's
  "reference", before the body could run channels-last);
- "reference-cl" (`reference`, body channels-last): the same ops on channels-last activations;
  PyTorch's CUDA GroupNorm copies them to NCHW and back;
- "kernels-gn-reference" (`auto,group_norm=reference`): as "kernels" but PyTorch's GroupNorm:
  against "kernels" only the norm differs;
- "triton-attention" (`auto,dense_attention=triton`): as "kernels" but the attention on the
  engine's Triton kernel: against "kernels" only the attention differs;
- "kernels-compiled" (asked for by name, see below): as "kernels" with every resnet and
  transformer compiled (`compile_unet_blocks`, what the decoder trainer's `train.compile` does);
  its warm-up runs absorb the compilation. It runs after the eager providers, since it compiles
  the model in place.
- "kernels-cudagraphs" (asked for by name): as "kernels" with the whole UNet compiled with
  `mode="reduce-overhead"` and static shapes, so Inductor replays the forward and the backward
  as CUDA graphs: at batch 1 the step is bound by kernel launches (session 4: 75 ms of kernels
  in a 187 ms step), which a graph replay removes. Compiled and recorded before the timing (the
  log says how long that took), on a model of the same weights built again if kernels-compiled
  ran before it; not used by the trainer yet (this is the A/B that would justify it). It runs
  last of all: never yet run on a GPU, its compilation may outlast the module's cap, which then
  costs only it.
Both compiled providers differ from "kernels" in more than the compilation. Inside a trace the
conv's `auto` cannot time its paths (`tuned_choice` returns the `LIBRARY_BELOW` rule: GEMMs from
16,384 pixel rows, conv3d below), and `group_norm` leaves the norm to Inductor instead of its
kernel. On a GPU the log says, after each eager `auto` provider, which paths the tuner chose and
for how many shapes that differs from the rule.
`VIDEO_UNET_PROVIDERS` (comma-separated) picks the providers on a GPU; the default is
"kernels,reference,reference-cl,kernels-gn-reference".
On a GPU each provider's step is also profiled once: the top kernels by device time and the time
per family (conv, attention, gemm, norm, copy, other) go to `kernels.md` in the output folder,
the families into the report as `family_ms`. Each provider's numbers are printed as soon as
they are measured, so a run stopped by a cap keeps them in its log.

- cpu: the `debug` UNet inflated (8 frames of 16x16 latents), fp32, reference only (the Triton
  path runs on a CPU only in the interpreter), profiled on the CPU (aten ops).
- gpu-quick: `emu2-video` (320/640/1280/1280 channels) on 16 frames of 32x32 latents (256 px
  through the VAE), batch 1, bf16 weights and activations; gpu-full adds 64x64 latents.
FLOPs are counted once per case with FlopCounterMode on the reference path. History: the H200
run of 2026-11-27 (run3, commit 2a00336) ran the attention on the Triton kernel under
"kernels" (197 ms against 120 ms for "reference"), and counted FLOPs on the kernels path, which
left attention out (its TFLOP/s are ~1.6x low; its times are right).
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import BenchResult, profile_kernels, time_cpu, time_cuda
from emu2_engine.models.config import UNetConfig
from emu2_engine.models.unet3d import VideoUNet

ops_stc = importlib.import_module("emu2_engine.ops.spatiotemporal_conv")  # the module, not the op

SUITES = ("cpu", "gpu-quick", "gpu-full")


@contextmanager
def _backend(name: str):
    old = os.environ.get("EMU2_KERNELS")
    os.environ["EMU2_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("EMU2_KERNELS", None)
        else:
            os.environ["EMU2_KERNELS"] = old


def _inputs(cfg: UNetConfig, batch: int, frames: int, side: int, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(batch, cfg.in_channels, frames, side, side, generator=g, device=device, dtype=dtype)
    cond = torch.randn(batch, 1, cfg.cond_tokens, cfg.cross_attention_dim, generator=g, device=device,
                       dtype=dtype)
    t = torch.randint(0, 1000, (batch,), generator=g, device=device)
    time_ids = torch.randn(batch, 6, generator=g, device=device, dtype=dtype) if cfg.text_time else None
    return latents, t, cond, time_ids


def _case(result: BenchResult, preset: str, batch: int, frames: int, side: int, dtype, device,
          providers, timer, out_dir: Path) -> None:
    cfg = UNetConfig.from_preset(preset)

    def build() -> VideoUNet:
        torch.manual_seed(0)  # the same weights every time
        return VideoUNet(cfg).to(device=device, dtype=dtype)

    model = build()
    latents, t, cond, time_ids = _inputs(cfg, batch, frames, side, dtype, device)
    target = torch.randn_like(latents)
    case = f"{preset} B{batch} F{frames} {side}x{side}"
    params = {"preset": preset, "batch": batch, "frames": frames, "side": side}

    run = model  # what `step` calls: the model, or a compiled wrapper of it

    def step():
        model.zero_grad(set_to_none=True)
        if run is not model:
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new training iteration
        out = run(latents, t, cond, time_ids)
        torch.nn.functional.mse_loss(out.float(), target.float()).backward()

    # FLOPs are counted on the reference path: the attention custom ops carry no FLOP formula
    # (theirs depends on the mask), so a count under the kernels would leave attention out.
    with _backend("reference"), FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    print(f"[video_unet] {case}: {flops / 1e12:.3g} TFLOP per forward + backward", flush=True)
    for provider in _in_running_order(providers):
        done = len(result.measurements)
        model.channels_last = provider_layout.get(provider, True)
        if provider == "kernels-compiled":
            from emu2_engine.train.decoder import compile_unet_blocks
            run = model
            compile_unet_blocks(model)
        elif provider == "kernels-cudagraphs":
            if "kernels-compiled" in providers:  # its blocks were compiled in place: a plain model again
                model = run = None
                torch._dynamo.reset()
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                model = build()
            print(f"[video_unet] {case} {provider}: compiling the whole UNet and recording its graphs ...",
                  flush=True)
            start = time.perf_counter()
            run = torch.compile(model, mode="reduce-overhead", dynamic=False)
            try:
                with _backend(provider_backend[provider]):
                    for _ in range(3):  # compile, then record the CUDA graphs, outside the timing
                        step()
            except Exception as e:  # noqa: BLE001 - a compilation failure: keep the others
                _note_failure(result, case, provider, e)
                continue
            print(f"[video_unet] {case} {provider}: compiled and recorded in {time.perf_counter() - start:.0f} s",
                  flush=True)
        with _backend(provider_backend[provider]):
            try:
                ms = timer(step)
            except Exception as e:  # noqa: BLE001 - out of memory or a missing kernel: keep the others
                _note_failure(result, case, provider, e)
                continue
        result.add(benchmark="video_unet", case=f"{case} fwd+bwd", provider=provider, metric="time",
                   value=ms, unit="ms", params=params)
        result.add(benchmark="video_unet", case=f"{case} fwd+bwd", provider=provider, metric="tflops",
                   value=flops / (ms * 1e-3) / 1e12, unit="TFLOP/s", params=params)
        print(f"[video_unet] {case} fwd+bwd {provider}: step {ms:.1f} ms, {flops / (ms * 1e-3) / 1e12:.1f} TFLOP/s",
              flush=True)
        if device == "cuda" and provider in _EAGER_TUNED:
            print(f"[video_unet] {case} {provider}: {_conv_paths()}", flush=True)
        try:
            with _backend(provider_backend[provider]):
                families = profile_kernels(step, out_dir / "kernels.md", f"{case} fwd+bwd, {provider}", device)
        except Exception as e:  # noqa: BLE001 - a profiler failure must not cost the timings
            result.skipped.append(f"{case} {provider} profile: {type(e).__name__}: {str(e)[:200]}")
            print(f"[video_unet] {case} {provider} profile: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        for family, fms in families.items():
            result.add(benchmark="video_unet", case=f"{case} {family}", provider=provider,
                       metric="family_ms", value=fms, unit="ms", params=params)
        print(f"[video_unet] {case} {provider} profiled, ms by family: "
              + ", ".join(f"{m.case[len(case) + 1:]} {m.value:.2f}" for m in result.measurements[done:]
                          if m.metric == "family_ms"), flush=True)
    del model, run
    if device == "cuda":
        torch.cuda.empty_cache()


_COMPILED = ("kernels-compiled", "kernels-cudagraphs")
"""The providers that compile, in the order they run after all the others: kernels-compiled
compiles the blocks in place; kernels-cudagraphs last of all, since its whole-UNet compile and
graph recording (never yet run on a GPU) may outlast the module's cap, which then costs only it."""

_EAGER_TUNED = ("kernels", "kernels-gn-reference", "triton-attention")
"""The providers whose convolutions `auto`'s tuner chooses by timing (eager, under `auto`)."""


def _in_running_order(providers) -> list[str]:
    return sorted(providers, key=lambda p: _COMPILED.index(p) + 1 if p in _COMPILED else 0)


def _note_failure(result: BenchResult, case: str, provider: str, e: Exception) -> None:
    line = f"{case} {provider}: {type(e).__name__}: {str(e)[:200]}"
    result.skipped.append(line)
    print(f"[video_unet] {line}", flush=True)


def _conv_paths() -> str:
    """The conv paths `auto`'s tuner chose by timing for the training shapes seen so far,
    against the `LIBRARY_BELOW` rule that compiled code runs instead (`tuned_choice` cannot time
    inside a trace), so that "kernels" and the compiled providers can be told apart."""
    chosen = [(key[0], name) for key, name in ops_stc._TUNED.items() if key[-1]]  # (training signatures)
    counts = Counter(name for _, name in chosen)
    differ = sum(name != ops_stc._static_choice(torch.empty(shape, device="meta")) for shape, name in chosen)
    return (f"conv paths timed and chosen for {len(chosen)} shapes: "
            + ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
            + f"; {differ} differ from the static rule the compiled providers run")


provider_backend = {"kernels": "auto", "reference": "reference", "reference-cl": "reference",
                    "kernels-gn-reference": "auto,group_norm=reference",
                    "triton-attention": "auto,dense_attention=triton", "kernels-compiled": "auto",
                    "kernels-cudagraphs": "auto"}
provider_layout = {"reference": False}
"""`UNet.channels_last` per provider (True where not listed)."""


def _gpu_providers() -> list[str]:
    chosen = os.environ.get("VIDEO_UNET_PROVIDERS", "kernels,reference,reference-cl,kernels-gn-reference")
    names = [n.strip() for n in chosen.split(",") if n.strip()]
    unknown = [n for n in names if n not in provider_backend]
    if unknown or not names:
        raise ValueError(f"VIDEO_UNET_PROVIDERS must name some of {sorted(provider_backend)}, got {chosen!r}")
    return names


def run(suite: str, out_dir: Path) -> BenchResult:
    """The `suite` measurements; the kernel profiles go to out_dir/kernels.md."""
    result = BenchResult(ours="kernels")
    if suite == "cpu":
        result.skipped.append("kernels: the Triton ops run on a CPU only in the interpreter")
        _case(result, "debug", 1, 8, 16, torch.float32, "cpu", ["reference"],
              lambda step: time_cpu(step, warmup=1, repeats=3), out_dir)
    elif not torch.cuda.is_available():
        result.skipped.append(f"{suite}: no CUDA device on this machine")
    else:
        sides = [32] if suite == "gpu-quick" else [32, 64]
        for side in sides:
            _case(result, "emu2-video", 1, 16, side, torch.bfloat16, "cuda",
                  _gpu_providers(), lambda step: time_cuda(step, warmup=2, repeats=5),
                  out_dir)
    return result


if __name__ == "__main__":
    from benchmarks.run import main

    sys.exit(main(["--suite", "cpu", "--only", "video_unet"]))
