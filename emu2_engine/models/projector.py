"""The projector between the vision encoder and the LLM (EMU2_FACTS.md): the patch grid is
average-pooled to n_query tokens, which `project_up` maps to the LLM width. The pooled
features before `project_up` are what the LLM regresses (through `project_down`).

`pool_project` runs pool and projection as one op (fused kernel on CUDA) and also returns the
pooled features, detached: the regression targets, at no extra cost."""

from __future__ import annotations

import torch
import torch.nn as nn

from emu2_engine.ops import pool_patches, pool_project


class Projector(nn.Module):
    def __init__(self, vision_width: int, llm_hidden: int):
        super().__init__()
        self.project_up = nn.Linear(vision_width, llm_hidden, bias=False)
        nn.init.normal_(self.project_up.weight, std=0.02)

    @staticmethod
    def pool(features: torch.Tensor, n_query: int) -> torch.Tensor:
        """(N, P, C) patch features -> (N, n_query, C) pooled visual embeddings."""
        return pool_patches(features, n_query)

    def pool_project(self, features: torch.Tensor, n_query: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, P, C) patch features -> ((N, n_query, hidden) LLM input rows, (N, n_query, C)
        pooled embeddings, detached)."""
        return pool_project(features, self.project_up.weight, n_query, return_pooled=True)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, n_query, C) pooled embeddings -> (N, n_query, hidden) LLM input rows."""
        return self.project_up(pooled)
