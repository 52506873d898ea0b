"""Packed image-caption micro-batches drawn from the procedural shapes world.

This is the first data path of `pretrain`: samples are generated in memory (no shards yet),
laid out with the Emu2 image-caption layout, packed best-fit into rows with the C++ packer and
collated into the `PackedBatch` contract. Everything about sample i (its picture, its caption,
whether the image goes first) is a function of (seed, i), so the loader's whole state is the
next sample index plus the indices of samples drawn but not yet placed in a row.
"""

from __future__ import annotations

import numpy as np

from emu2_engine.data.batch import PackedBatch
from emu2_engine.data.packing import pack_sequences
from emu2_engine.data.sequences import Sample, build_image_caption, collate_packed, to_pixels
from emu2_engine.data.shapes import ShapesWorld
from emu2_engine.data.tokenizer import Emu2Tokenizer
from emu2_engine.models.config import Emu2Config
from emu2_engine.train.config import DataSection

# Samples are drawn until the pool holds this many rows' worth of tokens; best-fit then has
# enough choice to fill the first `rows` rows almost completely.
_POOL_FACTOR = 1.5


class ShapesCaptionLoader:
    """An endless iterator of `PackedBatch` for image-caption pretraining on the shapes world."""

    def __init__(self, tokenizer: Emu2Tokenizer, model_cfg: Emu2Config, cfg: DataSection):
        if tokenizer.vocab_size != model_cfg.llm.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocabulary is {model_cfg.llm.vocab_size}")
        self.tok, self.model_cfg, self.cfg = tokenizer, model_cfg, cfg
        self.world = ShapesWorld(cfg.seed)
        self.next_index = 0
        self.pending: list[int] = []
        self._cache: dict[int, Sample] = {}

    # -- samples --------------------------------------------------------------------------
    def _sample(self, index: int) -> Sample:
        if index not in self._cache:
            size = self.model_cfg.vision.image_size
            item = self.world.sample(index, image_size=size)
            image_first = bool(np.random.default_rng((self.cfg.seed, index, 1)).random()
                               < self.cfg.image_first_prob)
            self._cache[index] = build_image_caption(
                self.tok, to_pixels(item.image, size), item.caption, self.model_cfg.n_query,
                image_first=image_first, regress=self.cfg.regress_images and not image_first)
        return self._cache[index]

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> "ShapesCaptionLoader":
        return self

    def __next__(self) -> PackedBatch:
        S, rows = self.cfg.seq_len, self.cfg.rows
        pool = list(self.pending)
        tokens = sum(len(self._sample(i)) for i in pool)
        while tokens < _POOL_FACTOR * rows * S:
            sample = self._sample(self.next_index)
            if len(sample) > S:
                raise ValueError(f"a shapes-world sample has {len(sample)} tokens, longer than "
                                 f"data.seq_len = {S}; raise data.seq_len")
            pool.append(self.next_index)
            tokens += len(sample)
            self.next_index += 1
        packed = pack_sequences([len(self._sample(i)) for i in pool], S)[:rows]
        used = {j for row in packed for j in row}
        self.pending = [i for j, i in enumerate(pool) if j not in used]
        samples = [self._sample(i) for i in pool]
        self._cache = {i: self._cache[i] for i in self.pending}
        return collate_packed(samples, packed, S, self.tok.ids, self.model_cfg.n_query,
                              self.model_cfg.vision.image_size)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"next_index": self.next_index, "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.next_index = int(state["next_index"])
        self.pending = [int(i) for i in state["pending"]]
        self._cache = {}
