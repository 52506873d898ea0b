"""The training loop: build, then step, with a progress bar and a metrics file.

One process, one device for now. The parallel trainer grows this in place: `Trainer.build`
is where parallel plans are applied (TP, activation checkpointing, compile, FSDP, in that
order), `Trainer.step` where gradient accumulation and pipelining go.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from emu2_engine.data.batch import PackedBatch
from emu2_engine.data.loader import build_loader, heldout_caption_loader
from emu2_engine.data.tokenizer import Emu2Tokenizer
from emu2_engine.models import Emu2Config, Emu2Model
from emu2_engine.models.flops import batch_flops, training_flops
from emu2_engine.train.config import JobConfig
from emu2_engine.train.metrics import ThroughputMeter
from emu2_engine.train.optim import build_optimizer, build_scheduler



@dataclass
class StepResult:
    loss: float
    ce: float
    mse: float
    grad_norm: float
    tokens: int
    images: int


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = cuda, but no CUDA device is visible")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: JobConfig):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != 1:
            raise ValueError(f"this trainer runs one process (WORLD_SIZE={world}); data, tensor and "
                             f"pipeline parallelism come with the parallel trainer. Use "
                             f"--nproc_per_node=1")
        self.cfg = cfg
        self.device = pick_device(cfg.train.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dtype = cfg.train.dtype
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if dtype == "bf16" else None

        self.model_cfg: Emu2Config = replace(Emu2Config.from_preset(cfg.model.preset),
                                             regression_weight=cfg.model.regression_weight)
        torch.manual_seed(cfg.train.seed)
        self.model = Emu2Model(self.model_cfg).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.steps, cfg.optim)
        self.tokenizer = Emu2Tokenizer(chat=self.model_cfg.chat)
        self.loader = build_loader(cfg.data, self.tokenizer, self.model_cfg)
        self.step_count = 0
        self.run_dir = Path(cfg.train.run_dir)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self, batch: PackedBatch) -> StepResult:
        """One optimiser step on one micro-batch."""
        self.model.train()
        batch = batch.to(self.device, non_blocking=True)
        with self.autocast():
            out = self.model(batch)
        out.total.backward()
        clip = self.cfg.optim.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step_count += 1
        return StepResult(loss=out.total.item(), ce=out.ce.item(), mse=out.mse.item(),
                          grad_norm=norm.item(), tokens=batch.n_tokens, images=batch.n_images)

    def train(self, progress: bool = True) -> list[dict]:
        """Run `train.steps` steps; return the metric records (also in run_dir/metrics.jsonl)."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(self.run_dir / "config.toml")
        metrics_path = self.run_dir / "metrics.jsonl"
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        meter = ThroughputMeter(device_name)
        records: list[dict] = []
        bar = tqdm(total=cfg.train.steps, disable=not progress, dynamic_ncols=True,
                   desc=f"{self.model_cfg.name} on {device_name or 'cpu'}", mininterval=0.5)
        vision_trainable = any(p.requires_grad for p in self.model.visual.parameters())
        with open(metrics_path, "w") as metrics_file:
            while self.step_count < cfg.train.steps:
                start = time.perf_counter()
                batch = next(self.loader)
                batch.validate(self.model_cfg.llm.vocab_size, self.model_cfg.n_query,
                               self.model_cfg.vision.image_size)
                flops = training_flops(batch_flops(self.model_cfg, batch), vision_trainable)
                result = self.step(batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                meter.update(tokens=result.tokens, images=result.images, flops=flops, seconds=elapsed)
                bar.update(1)
                rates = meter.report()
                bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{rates['tokens_per_s']:,.0f}",
                                img_s=f"{rates['images_per_s']:,.0f}", refresh=False)
                if self.step_count % cfg.train.log_every == 0 or self.step_count == cfg.train.steps:
                    record = {"step": self.step_count, "loss": result.loss, "ce": result.ce,
                              "mse": result.mse, "grad_norm": result.grad_norm,
                              "lr": self.scheduler.get_last_lr()[0], **rates}
                    records.append(record)
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    meter.reset()
        bar.close()
        data = {"step": self.step_count, "skipped": dict(self.loader.skip_counts()),
                "truncated": self.loader.truncated}
        records.append(data)
        with open(metrics_path, "a") as metrics_file:
            metrics_file.write(json.dumps(data) + "\n")
        if cfg.train.eval_batches:
            record = {"step": self.step_count, **self.evaluate_grounding(cfg.train.eval_batches)}
            records.append(record)
            with open(metrics_path, "a") as metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
        return records

    @torch.no_grad()
    def evaluate_grounding(self, n_batches: int) -> dict:
        """Caption loss on held-out image-caption pairs (`heldout_caption_loader`), image
        first, with each sample's own image and with another sample's image. A model that
        reads its images does better with the right ones; a captioner that ignores them
        scores the same on both."""
        loader = heldout_caption_loader(self.cfg.data, self.tokenizer, self.model_cfg)
        self.model.eval()
        right = wrong = 0.0
        for _ in range(n_batches):
            batch = next(loader).to(self.device)
            with self.autocast():
                right += self.model(batch).ce.item()
                # every real image moves to another sample (padding images stay padding)
                real = batch.image_mask.nonzero().squeeze(1)
                batch.images[real] = batch.images[real.roll(1)]
                wrong += self.model(batch).ce.item()
        self.model.train()
        return {"heldout_caption_ce": right / n_batches, "heldout_caption_ce_wrong_images": wrong / n_batches}
