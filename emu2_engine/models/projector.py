"""The projector between the vision encoder and the LLM (EMU2_FACTS.md): the patch grid is
average-pooled to n_query tokens, which `project_up` maps to the LLM width. The pooled
features before `project_up` are what the LLM regresses (through `project_down`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from emu2_engine.ops import pool_patches


class Projector(nn.Module):
    def __init__(self, vision_width: int, llm_hidden: int):
        super().__init__()
        self.project_up = nn.Linear(vision_width, llm_hidden, bias=False)
        nn.init.normal_(self.project_up.weight, std=0.02)

    @staticmethod
    def pool(features: torch.Tensor, n_query: int) -> torch.Tensor:
        """(N, P, C) patch features -> (N, n_query, C) pooled visual embeddings."""
        return pool_patches(features, n_query)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, n_query, C) pooled embeddings -> (N, n_query, hidden) LLM input rows."""
        return self.project_up(pooled)
