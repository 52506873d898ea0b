"""Blending several datasets with weights: which dataset the next record comes from, so that
each dataset's share of the samples follows its weight.

Emu2's stage 2 fixes the number of samples of each data type in every global batch (12,800
image-text : 6,400 video-text : 3,200 interleaved : 800 language-only). A deterministic
schedule reproduces such fixed proportions at every scale, where independent random draws
would only match them on average: draw n goes to the dataset furthest behind its share,
i.e. the d maximising `weight[d] * (n + 1) - taken[d]` (weights normalised to sum to 1,
ties to the lower index), the scheme Megatron-LM's blended datasets use for their sample
index. After n draws each dataset has had about `weight[d] * n` samples: within one sample
for the paper's 4 weights at every n (tests/test_blend.py), within 1.2 for 200 random sets
of 2-8 weights over 3,000 draws.

`taken` counts samples, not records: a record may give several samples (a long text is cut into
`text_len` chunks) or none (dropped), and the loader reports how many (`credit`). Counting
records would give a dataset of long texts more than its weight of the samples (a Pile-like
dataset of 3-chunk documents at weight 800/23,200 would have had about 3 times its share).

The schedule does not depend on the seed. Data-parallel ranks read different records (the
shard streams split them by rank), which may give different sample counts, so their draws
differ; each rank keeps every dataset within one record's samples of its share. Ranks that
share a batch (a tensor- or pipeline-parallel group) read the same records and follow the same
schedule. Its whole state is `taken`.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


class Blend:
    """The dataset of each successive draw, by the schedule of the module docstring."""

    def __init__(self, weights: Sequence[float]):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0:
            raise ValueError(f"blend weights must be a non-empty list, got {list(weights)!r}")
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"blend weights must be finite, >= 0 and not all 0, got {list(weights)!r}")
        self.weights = w / w.sum()
        self.taken = np.zeros(w.size, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.weights.size)

    def next(self) -> int:
        """The dataset of the next draw (and count it)."""
        n = int(self.taken.sum())
        d = int(np.argmax(self.weights * (n + 1) - self.taken))  # first maximum on ties
        self.taken[d] += 1
        return d

    def credit(self, d: int, samples: int) -> None:
        """The record that `next` gave dataset d made `samples` samples (not 1): count those.
        A record that made none is not counted, so d stays behind and is drawn again."""
        if not 0 <= d < self.taken.size or samples < 0:
            raise ValueError(f"credit needs a dataset in [0, {self.taken.size}) and samples >= 0, "
                             f"got {d}, {samples}")
        self.taken[d] += samples - 1

    def state_dict(self) -> dict:
        return {"taken": self.taken.tolist(), "weights": self.weights.tolist(), "counts": "samples"}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved schedule. If the weights changed since (a new blend for the rest
        of a run), the schedule starts over with the new ones, from this draw: continuing the
        old counts under new weights would serve one dataset alone until they caught up."""
        taken = np.asarray(state["taken"], dtype=np.int64)
        if taken.shape != self.taken.shape:
            raise ValueError(f"the saved blend has {taken.size} datasets, this one {self.taken.size}; "
                             f"the data config changed since the checkpoint")
        saved = state.get("weights")  # absent in states saved before the weights were
        if saved is not None and not np.allclose(saved, self.weights, rtol=0, atol=1e-12):
            log.warning("data.weights changed since the checkpoint (%s, now %s): the blend's schedule "
                        "starts over with the new weights; each dataset reads on from where it was",
                        [round(w, 6) for w in saved], [round(float(w), 6) for w in self.weights])
            taken = np.zeros_like(taken)
        elif state.get("counts") != "samples" and taken.any():
            # saved when the schedule counted records: those counts would read as samples and
            # serve the datasets of several samples per record alone until they caught up
            log.warning("the checkpoint's blend counted records, this engine counts samples: the "
                        "blend's schedule starts over; each dataset reads on from where it was")
            taken = np.zeros_like(taken)
        self.taken = taken
