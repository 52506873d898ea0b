"""The training data loader: a weighted blend of record streams -> Emu2 sequences -> packed,
fixed-shape micro-batches, with exact resume.

One micro-batch: samples already drawn but not yet placed (the pool) are topped up by drawing
records, dataset by dataset as the `Blend` schedule says (it counts the samples each record
gives), until the pool holds 1.5 micro-batches' worth of tokens; each record becomes one or
more `Sample`s (`SampleBuilder`; a record it cannot lay out is skipped and counted, a sample
longer than a row or with more than `max_images` images is truncated or dropped as
`data.too_long` says); `select_rows` packs the pool
best-fit into `rows` rows under the image cap, and `collate_packed` lays them out, padding the
images to `max_images`. Samples left out wait in the pool for the next micro-batch.

State and resume. The layout of a sample is a function of (seed, dataset, key) and each record
stream resumes exactly from its `state_dict`, so the loader's state is: the blend's counts, each
stream's state, and, for the samples still in the pool, which record (and which of its samples)
each one is, plus the stream state just before the oldest such record. Restoring replays each
stream from that point to its last pooled record (rebuilding the pooled samples), then sets it
to its saved state. Images are never stored in the state. The number of data-parallel ranks
is part of the state: a stream split among R ranks cannot be continued by R' ranks without
repeating or skipping samples, so loading under another world size raises an error.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from emu2_engine.data.batch import PackedBatch
from emu2_engine.data.blend import Blend
from emu2_engine.data.decode import Decoder
from emu2_engine.data.make_shapes import ensure_shapes_world
from emu2_engine.data.packing import collate_packed, select_rows
from emu2_engine.data.records import Record, SkipStats
from emu2_engine.data.sequences import RecordError, Sample, SampleBuilder, truncate_sample
from emu2_engine.data.shards import DataError, ShardStream
from emu2_engine.models.config import Emu2Config
from emu2_engine.train.config import DATASET_KINDS, DataSection

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Samples are drawn until the pool holds this many micro-batches' worth of tokens; best-fit then
# has enough choice to fill the rows almost completely.
_POOL_FACTOR = 1.5
# A dataset that yields this many records in a row without one usable sample is broken (counted
# per dataset: a healthy one in the same blend must not hide it).
_MAX_BARREN_DRAWS = 10_000


class RecordStream(Protocol):
    """An endless iterator of decoded records that can save and restore its position exactly
    (`shards.ShardStream`)."""

    def __next__(self) -> Record: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    # Optional: `epoch`, the pass over the data the last record came from (layouts are drawn
    # afresh each epoch; a stream without it counts as epoch 0).


@dataclass
class _Pooled:
    """A sample drawn but not yet packed, and where it came from."""

    dataset: int
    record: int
    """Ordinal of its record among the records this loader read from the dataset's stream."""
    part: int
    """Index of the sample among those its record gave (text records give several)."""
    sample: Sample


class PackedLoader:
    """An endless iterator of `PackedBatch` over a weighted blend of datasets.

    `streams[d]` yields the records of dataset `cfg.datasets[d]`, already split for this
    data-parallel `rank` of `world_size` (the loader only records the split for resume checks).
    """

    def __init__(self, tokenizer, model_cfg: Emu2Config, cfg: DataSection,
                 streams: list[RecordStream], rank: int = 0, world_size: int = 1):
        # A model may have more embedding rows than the tokenizer has tokens (a real-size
        # preset trained on the shapes world): the extra rows are never used. Fewer is an error.
        if tokenizer.vocab_size > model_cfg.llm.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocabulary is only {model_cfg.llm.vocab_size}")
        if len(streams) != len(cfg.datasets):
            raise ValueError(f"one record stream per dataset: {len(cfg.datasets)} datasets, "
                             f"{len(streams)} streams")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size = {world_size}), got {rank}")
        unknown = sorted(set(cfg.datasets + cfg.regress) - set(DATASET_KINDS))
        if unknown:
            raise ValueError(f"unknown dataset kinds {unknown}")
        self.cfg, self.ids = cfg, tokenizer.ids
        self.n_query, self.image_size = model_cfg.n_query, model_cfg.vision.image_size
        self.frame_n_query = model_cfg.frame_queries
        self.streams, self.rank, self.world_size = streams, rank, world_size
        # A dataset's name seeds its samples' layouts: its position and kind in the blend.
        self.names = [f"{d}:{kind}" for d, kind in enumerate(cfg.datasets)]
        self.regress = [kind in cfg.regress for kind in cfg.datasets]
        self.builder = SampleBuilder(
            tokenizer, model_cfg.n_query, seed=cfg.seed, image_first_prob=cfg.image_first_prob,
            phrase_first_prob=cfg.phrase_first_prob, interleaved_images=cfg.interleaved_images,
            interleaved_len=cfg.interleaved_len, text_len=cfg.text_len,
            bidirectional=cfg.bidirectional, frame_n_query=model_cfg.frame_queries,
            template=cfg.template, grounded_image_first_prob=cfg.grounded_image_first)
        self.blend = Blend(cfg.weights)
        self.stats = SkipStats()
        self.truncated = 0
        self._pool: list[_Pooled] = []
        self._reads = [0] * len(streams)
        self._barren = [0] * len(streams)  # records in a row that gave no usable sample
        self._last_drawn = 0
        # per dataset: record ordinal -> stream state just before it was read, while a sample
        # of that record is in the pool
        self._before: list[dict[int, dict]] = [{} for _ in streams]

    def _layout(self) -> dict:
        """The settings that decide which samples a record gives and how they are cut."""
        c = self.cfg
        return {"seq_len": c.seq_len, "max_images": c.max_images, "too_long": c.too_long,
                "text_len": c.text_len, "interleaved_len": c.interleaved_len,
                "interleaved_images": c.interleaved_images, "image_first_prob": c.image_first_prob,
                "phrase_first_prob": c.phrase_first_prob, "bidirectional": c.bidirectional,
                "regress": list(c.regress), "seed": c.seed, "n_query": self.n_query,
                # only where they differ from the defaults: states saved before these keys
                # existed still match
                **({"frame_n_query": self.frame_n_query} if self.frame_n_query != self.n_query else {}),
                **({"template": c.template} if c.template != "pretrain" else {}),
                **({"text_loss": False} if not c.text_loss else {}),
                **({"grounded_image_first": c.grounded_image_first} if c.grounded_image_first != 1.0 else {})}

    # -- samples --------------------------------------------------------------------------
    def _samples_of(self, d: int, record: Record) -> list[Sample]:
        """The samples of one record, truncated or dropped to fit a row and the image cap."""
        try:
            # the epoch the stream read the record in (streams without epochs: always 0)
            epoch = getattr(self.streams[d], "epoch", 0)
            built = self.builder.build(record, self.names[d], regress=self.regress[d], epoch=epoch)
        except RecordError as e:
            self.stats.skip("unbuildable", record.key, str(e), log=log.warning)
            return []
        S, M = self.cfg.seq_len, self.cfg.max_images
        out = []
        for sample in built:
            if not self.cfg.text_loss:  # Emu2-Gen: the image loss only
                sample.text_target = np.zeros_like(sample.text_target)
            cut = sample
            if len(sample) > S or len(sample.images) > M:
                cut = None
                if self.cfg.too_long == "truncate":
                    limit = S if len(sample.images) <= M else min(S, sample.image_starts[M] + 1)
                    cut = truncate_sample(sample, limit, self.ids.eos, self.n_query)
                if cut is None:
                    self.stats.skip("too_long", record.key,
                                    f"{len(sample)} tokens and {len(sample.images)} images for rows of "
                                    f"{S} and at most {M} images per micro-batch (data.too_long = "
                                    f"{self.cfg.too_long})", log=log.warning)
                    continue
                self.truncated += 1
            if not (cut.text_target.any() or any(cut.regress)):
                # nothing to learn: a conversation cut before its first answer, an image-first
                # caption under data.text_loss = false
                self.stats.skip("no_loss", record.key, "no text target and no regressed image "
                                "(after any truncation)", log=log.warning)
                continue
            out.append(cut)
        return out

    def _draw(self) -> list[_Pooled]:
        """Read the next record of the dataset the blend picks; its usable samples."""
        d = self._last_drawn = self.blend.next()
        stream = self.streams[d]
        before = stream.state_dict()
        record = next(stream)
        r = self._reads[d]
        self._reads[d] += 1
        samples = self._samples_of(d, record)
        self.blend.credit(d, len(samples))  # the weights count samples, not records
        # per dataset, across batches: another dataset's samples must not hide one that gives none
        self._barren[d] = 0 if samples else self._barren[d] + 1
        if samples:
            self._before[d][r] = before
        return [_Pooled(d, r, k, s) for k, s in enumerate(samples)]

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        S, R, M = self.cfg.seq_len, self.cfg.rows, self.cfg.max_images
        pool = list(self._pool)
        tokens = sum(len(p.sample) for p in pool)
        while tokens < _POOL_FACTOR * R * S:
            try:
                drawn = self._draw()
            except StopIteration:  # a stream of finite epochs (a held-out pass) has ended:
                break              # what waits is packed, and an empty pool ends the loader
            if not drawn and self._barren[self._last_drawn] >= _MAX_BARREN_DRAWS:
                d = self._last_drawn
                raise DataError(f"{_MAX_BARREN_DRAWS} records in a row of dataset {self.names[d]} "
                                   f"({self.cfg.paths[d] or 'the shapes world'}) gave no usable sample; "
                                   f"{self.skip_summary()}")
            pool += drawn
            tokens += sum(len(p.sample) for p in drawn)
        if not pool:
            raise StopIteration
        rows = select_rows([len(p.sample) for p in pool], [len(p.sample.images) for p in pool],
                           R, S, M)
        used = {i for row in rows for i in row}
        self._pool = [p for i, p in enumerate(pool) if i not in used]
        waiting = {(p.dataset, p.record) for p in self._pool}
        for d, before in enumerate(self._before):
            self._before[d] = {r: s for r, s in before.items() if (d, r) in waiting}
        return collate_packed([p.sample for p in pool], rows, S, self.ids, self.n_query,
                              self.image_size, max_images=M)

    # -- statistics -----------------------------------------------------------------------
    def skip_counts(self) -> Counter:
        """Samples skipped so far, by kind: by the streams (bad files, bad text, ...) and by the
        loader (records it could not lay out, samples too long to keep)."""
        counts = Counter(self.stats.counts)
        for stream in self.streams:
            stats = getattr(stream, "stats", None)
            if stats is not None:
                counts.update(stats.counts)
        return counts

    def skip_summary(self) -> str:
        """One line: the skip totals and how many samples were truncated."""
        counts = self.skip_counts()
        skipped = SkipStats(counts).summary()
        return f"{skipped}; {self.truncated} samples truncated to fit"

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue with exactly the batches this loader would yield."""
        streams = []
        for d, stream in enumerate(self.streams):
            pooled = [p.record for p in self._pool if p.dataset == d]
            first = min(pooled, default=None)
            stats = getattr(stream, "stats", None)
            streams.append({"state": stream.state_dict(), "reads": self._reads[d],
                            "replay_from": None if first is None else self._before[d][first],
                            "replay_first": first,
                            "skipped": None if stats is None else dict(stats.counts)})
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "datasets": list(self.cfg.datasets), "layout": self._layout(), "blend": self.blend.state_dict(),
                "streams": streams,
                "pool": [[p.dataset, p.record, p.part] for p in self._pool],
                "skipped": dict(self.stats.counts), "truncated": self.truncated}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s point: the next batches are those the saving loader
        would have yielded next."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["world_size"] != self.world_size or state["rank"] != self.rank:
            raise ValueError(
                f"the data loader state was saved by rank {state['rank']} of {state['world_size']} "
                f"data-parallel ranks, and is loaded by rank {self.rank} of {self.world_size}: each "
                f"rank reads its own share of every dataset, so a different number of ranks would "
                f"repeat or skip samples. Resume with {state['world_size']} data-parallel ranks, or "
                f"start the data from scratch (do not load the loader state)")
        if list(state["datasets"]) != list(self.cfg.datasets):
            raise ValueError(f"the data loader state is for datasets {state['datasets']}, this loader "
                             f"reads {list(self.cfg.datasets)}")
        self.blend.load_state_dict(state["blend"])
        wanted = [(int(d), int(r), int(k)) for d, r, k in state["pool"]]
        saved_layout = state.get("layout")  # absent in states saved before it was
        layout = self._layout()
        changed = {}
        if saved_layout:  # a key only one side has (frame_n_query) differs too
            keys = sorted(saved_layout.keys() | layout.keys())
            changed = {k: (saved_layout.get(k), layout.get(k)) for k in keys
                       if saved_layout.get(k) != layout.get(k)}
        rebuilt: dict[tuple[int, int], list[Sample]] = {}
        self._before = [{} for _ in self.streams]
        for d, (stream, saved) in enumerate(zip(self.streams, state["streams"])):
            records = sorted({r for dd, r, _ in wanted if dd == d})
            if records:
                stream.load_state_dict(saved["replay_from"])
                for r in range(int(saved["replay_first"]), records[-1] + 1):
                    before = stream.state_dict()
                    record = next(stream)
                    if r in records:
                        rebuilt[(d, r)] = self._samples_of(d, record)
                        self._before[d][r] = before
            stream.load_state_dict(saved["state"])
            self._reads[d] = int(saved["reads"])
            if saved["skipped"] is not None:  # the replay counted its bad samples again
                stream.stats.counts = Counter(saved["skipped"])
        # a record that now gives fewer samples than it did when saved (an engine change in what
        # is kept: samples with nothing to learn are skipped since) takes the same path
        fewer = [(d, r) for d, r, k in wanted if k >= len(rebuilt[(d, r)])]
        if changed or fewer:
            # the waiting records give other samples now: all of each, laid out anew
            records = list(dict.fromkeys((d, r) for d, r, _ in wanted))
            why = (", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) if changed else
                   f"{len(set(fewer))} of them now give fewer samples")
            log.warning("data settings changed since the checkpoint (%s): the %d records waiting in "
                        "its pool are laid out again with the new settings (whole: one partly packed before "
                        "the save gives all its parts again)", why, len(records))
            wanted = [(d, r, k) for d, r in records for k in range(len(rebuilt[(d, r)]))]
        self._pool = [_Pooled(d, r, k, rebuilt[(d, r)][k]) for d, r, k in wanted]
        # the replay counted its records' skips and truncations again: the saved totals
        self.stats = SkipStats(Counter(state["skipped"]))
        self.truncated = int(state["truncated"])



def shapes_world_root(cfg: DataSection) -> Path:
    """The shapes world of `cfg.seed` and `cfg.shapes_scale` under `cfg.cache_dir`, generated
    there on first use."""
    return ensure_shapes_world(Path(cfg.cache_dir).expanduser(), seed=cfg.seed, scale=cfg.shapes_scale)


def build_loader(cfg: DataSection, tokenizer, model_cfg: Emu2Config, rank: int = 0,
                 world_size: int = 1, split: str = "train", epochs: int | None = None) -> PackedLoader:
    """The loader of `cfg` for one data-parallel rank: a `ShardStream` per dataset (its path,
    or for an empty path the shapes world's `split` of its kind), shuffled when training.
    With `epochs` the streams end after that many passes, and the loader once it has packed
    what they gave (StopIteration)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout, got {split!r}")
    if epochs is not None and len(cfg.datasets) != 1:
        # a blend would keep drawing the ended dataset (each draw ending the pool's fill)
        raise ValueError(f"epochs= reads one dataset to its end (a held-out split); got "
                         f"{len(cfg.datasets)} datasets")
    root = shapes_world_root(cfg) if not all(cfg.paths) else None
    streams = []
    for kind, path in zip(cfg.datasets, cfg.paths):
        decoder = Decoder(kind, model_cfg.vision.image_size, n_frames=cfg.video_frames,
                          log=log.warning)
        streams.append(ShardStream(path or root / kind / split, decoder, rank=rank,
                                   world_size=world_size, seed=cfg.seed,
                                   shuffle=split == "train", log=log.warning, epochs=epochs))
    return PackedLoader(tokenizer, model_cfg, cfg, streams, rank=rank, world_size=world_size)


def heldout_caption_loader(cfg: DataSection, tokenizer, model_cfg: Emu2Config) -> PackedLoader:
    """Held-out image-caption pairs (`data.heldout_path`, or the shapes world's held-out
    split), every image before its caption and nothing regressed, each read once (the loader
    ends after one pass): the data of the end-of-run check that the model reads its images."""
    held_out = replace(cfg, datasets=["image_text"], weights=[1.0], paths=[cfg.heldout_path],
                       image_first_prob=1.0, regress=[], text_loss=True)
    return build_loader(held_out, tokenizer, model_cfg, split="heldout", epochs=1)
