"""AdamW with Emu2's parameter groups and the warm-up + decay schedule.

Emu2's stage 1 trains the encoder, the projection and the LLM with separate peak learning
rates (1e-4, 3e-5 and 5e-5 for the projection, the LLM and the encoder in the paper), so parameters are grouped by
component, and within each by whether weight decay applies: matrices decay; norms, biases,
q/v biases and the ViT's CLS and position embeddings do not. A group whose learning rate is 0
is frozen (requires_grad off) instead of being stepped, and so is any parameter named in
`frozen` (the LM head when nothing is a text target: AdamW would still decay it).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from emu2_engine.train.config import OptimSection

_NO_DECAY_NAMES = ("cls_token", "pos_embed", "q_bias", "v_bias")


def _component(name: str) -> str:
    if name.startswith("visual."):
        return "vision"
    if name.startswith(("projector.", "project_down.")):
        return "projector"
    return "llm"


def build_optimizer(model: nn.Module, cfg: OptimSection, frozen: tuple[str, ...] = ()) -> torch.optim.AdamW:
    lrs = {"vision": cfg.lr_vision, "projector": cfg.lr_projector, "llm": cfg.lr}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        comp = _component(name)
        if lrs[comp] == 0.0 or name in frozen:
            p.requires_grad_(False)
            continue
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2 and not name.endswith(_NO_DECAY_NAMES)
        groups.setdefault((comp, decay), []).append(p)
    param_groups = [
        {"params": params, "lr": lrs[comp], "name": f"{comp}{'' if decay else '_no_decay'}",
         "weight_decay": cfg.weight_decay if decay else 0.0}
        for (comp, decay), params in sorted(groups.items())
    ]
    if not param_groups:
        raise ValueError("every learning rate is 0: nothing to train")
    fused = all(p.is_cuda for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, total_steps: int, cfg: OptimSection) -> float:
    """Multiplier of each group's peak LR for the update of `step` (0-based, of total_steps):
    linear warm-up to the peak at step warmup_steps - 1, then cosine or linear decay from the
    peak that reaches `min_lr_ratio` at step total_steps, one past the last: the last update
    still moves the weights where the floor is 0 (the decoder's), as in Megatron-LM."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


class WarmupDecay(torch.optim.lr_scheduler.LambdaLR):
    """`lr_factor` as a LambdaLR whose state is only its step: the peak of each group comes
    from the config, not the checkpoint, so a checkpoint loads whatever groups this rank's
    optimiser has (a pipeline rank holds only some components; DCP keeps one copy of the
    scheduler state for all ranks)."""

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = int(state["last_epoch"])
        for group, base, factor in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            group["lr"] = base * factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimSection) -> WarmupDecay:
    return WarmupDecay(optimizer, lambda step: lr_factor(step, total_steps, cfg))
