"""The packed loader: fixed shapes with an image cap, blending, truncate-or-drop, bad records,
exact resume (in-memory streams and the shapes-world shards; skip totals on shards with bad
members), rank checks, the data config, and the model ignoring padding images."""

import io
import tarfile
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from emu2_engine.data import loader as loader_module
from emu2_engine.data.decode import Decoder
from emu2_engine.data.loader import PackedLoader, build_loader, heldout_caption_loader
from emu2_engine.data.packing import collate_packed, select_rows
from emu2_engine.data.records import Grounded, ImageText, Interleaved, Phrase, SkipStats, Text, VideoText
from emu2_engine.data.shards import DataError, ShardStream
from emu2_engine.data.tokenizer import Emu2Tokenizer
from emu2_engine.models import Emu2Config, Emu2Model
from emu2_engine.train.config import DataSection, JobConfig

MODEL = Emu2Config.from_preset("debug")  # 64 px images, 16 visual tokens
NQ, SIZE = MODEL.n_query, MODEL.vision.image_size
WORDS = "a red circle at the top left and two blue squares on the right".split()


@pytest.fixture(scope="module")
def tok():
    return Emu2Tokenizer()


def image(value: float) -> torch.Tensor:
    return torch.full((3, SIZE, SIZE), float(value))


class ListStream:
    """An endless, resumable stream over a list of records (what ShardStream is, in memory)."""

    def __init__(self, records):
        self.records, self.position, self.stats = records, 0, SkipStats()

    def __next__(self):
        record = self.records[self.position % len(self.records)]
        self.position += 1
        return record

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def caption(i: int) -> str:
    return " ".join(WORDS[: 3 + i % 9])


def pairs(n: int, offset: int = 0) -> list[ImageText]:
    """Image-caption records whose image is filled with its index: batches say who arrived."""
    return [ImageText(f"p{i}", image(offset + i), caption(i)) for i in range(n)]


def documents(n: int) -> list[Interleaved]:
    return [Interleaved(f"d{i}", [caption(i + j) for j in range(4)],
                        [image(1000 + 10 * i + j) for j in range(1 + i % 4)], list(range(1 + i % 4)))
            for i in range(n)]


def make(tok, streams, **data) -> PackedLoader:
    kinds = data.pop("datasets", ["image_text"] * len(streams))
    cfg = DataSection(datasets=kinds, weights=data.pop("weights", [1.0] * len(kinds)),
                      paths=[""] * len(kinds), **{"seq_len": 128, "rows": 2, "max_images": 6,
                                                  "interleaved_len": 128, "text_len": 64, **data})
    return PackedLoader(tok, MODEL, cfg, streams)


def image_values(batch) -> list[float]:
    return batch.images[batch.image_mask][:, 0, 0, 0].tolist()


def assert_same(a, b):
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert (x is None and y is None) if x is None or y is None else torch.equal(x, y), f.name


def test_batches_have_fixed_shapes_and_every_sample_arrives_once(tok):
    loader = make(tok, [ListStream(pairs(500))], max_images=5)
    seen = []
    for _ in range(12):
        batch = next(loader)
        batch.validate(tok.vocab_size, NQ, SIZE)
        assert batch.input_ids.shape == (2, 128) and batch.images.shape == (5, 3, SIZE, SIZE)
        assert batch.image_slots.shape == (5, NQ) and batch.image_mask.shape == (5,)
        real = int(batch.image_mask.sum())
        assert batch.image_mask.tolist() == [True] * real + [False] * (5 - real)
        assert (batch.images[real:] == 0).all() and (batch.image_slots[real:] == -1).all()
        seen += image_values(batch)
    # nothing twice, nothing lost: what arrived plus what waits is every record read
    assert len(seen) == len(set(seen)) and len(seen) == 12 * 5  # the cap binds, rows have room
    waiting = [p.sample.images[0][0, 0, 0].item() for p in loader._pool]
    assert sorted(seen + waiting) == list(range(loader._reads[0]))


def test_select_rows_defers_samples_over_the_image_cap():
    rows = select_rows([50, 40, 30, 20, 10], [3, 2, 2, 1, 0], rows=2, row_len=60, max_images=4)
    # best fit: row 0 = [0 (50), 4 (10)], row 1 = [1 (40), 3 (20)], row 2 = [2 (30)] (not taken);
    # images: 3 + 0, then sample 1 (2 more) passes the cap, sample 3 (1 more) fits
    assert rows == [[0, 4], [3]]
    assert select_rows([5], [0], rows=3, row_len=8, max_images=1) == [[0], [], []]
    with pytest.raises(ValueError, match="sample 0 has 3 images, more than max_images = 2"):
        select_rows([5], [3], rows=1, row_len=8, max_images=2)


def test_blend_proportions_and_kinds(tok):
    streams = [ListStream(pairs(300)), ListStream(documents(50)),
               ListStream([Text(f"t{i}", caption(i)) for i in range(50)])]
    loader = make(tok, streams, datasets=["image_text", "interleaved", "text"], weights=[6, 3, 1],
                  max_images=16)
    for _ in range(6):
        next(loader).validate(tok.vocab_size, NQ, SIZE)
    reads = loader._reads
    assert abs(reads[0] / sum(reads) - 0.6) < 0.02 and abs(reads[2] / sum(reads) - 0.1) < 0.02


def test_too_long_samples_are_truncated_or_dropped(tok):
    # 6 images of 18 tokens: over the 2-image cap, and (without the builder's own budget)
    # over a 64-token row
    doc = Interleaved("long", [caption(8)] * 6, [image(i) for i in range(6)], list(range(6)))
    truncating = make(tok, [ListStream([doc])], datasets=["interleaved"], max_images=2, rows=1)
    batch = next(truncating)
    assert truncating.truncated >= 1 and batch.n_images == 2
    first = batch.input_ids[0][batch.doc_ids[0] == 0]
    # cut just before the third image: two whole images, then </s>
    assert first[-1] == tok.ids.eos and first[-2] != tok.ids.img_end
    assert (first == tok.ids.img).sum() == 2 and (first == tok.ids.img_end).sum() == 2
    short_rows = make(tok, [ListStream([doc])], datasets=["interleaved"], seq_len=64, max_images=6,
                      interleaved_len=128 * 4, rows=1)  # interleaved_len > seq_len: the loader cuts
    first = next(short_rows).input_ids[0]
    assert (first == tok.ids.img).sum() == 2 and short_rows.truncated >= 1

    dropping = make(tok, [ListStream([doc] + pairs(40))], datasets=["interleaved"], max_images=2,
                    too_long="drop")
    next(dropping)
    assert dropping.skip_counts()["too_long"] >= 1 and dropping.truncated == 0


def test_bad_records_are_skipped_and_counted(tok):
    bad = Grounded("bad-box", image(0), "a cat", [Phrase(0, 5, [(0.5, 0.5, 0.2, 0.9)])])
    good = [Grounded(f"g{i}", image(i + 1), "a cat", [Phrase(0, 5, [(0.1, 0.1, 0.9, 0.9)])]) for i in range(30)]
    stream = ListStream([bad] + good)
    stream.stats.skip("corrupt_image", "x", "as a shard stream would count it")
    loader = make(tok, [stream], datasets=["grounded"])
    batch = next(loader)
    assert 0.0 not in image_values(batch)
    assert loader.skip_counts() == Counter({"unbuildable": 1, "corrupt_image": 1})
    assert loader.skip_summary() == ("skipped samples: corrupt_image=1, unbuildable=1; "
                                     "0 samples truncated to fit")


def test_a_dataset_with_no_usable_sample_raises_instead_of_hanging(tok, monkeypatch):
    monkeypatch.setattr(loader_module, "_MAX_BARREN_DRAWS", 20)
    bad = Grounded("bad", image(0), "a cat", [Phrase(0, 5, [])])
    with pytest.raises(DataError, match="20 records in a row of dataset 0:grounded .* gave no usable sample"):
        next(make(tok, [ListStream([bad])], datasets=["grounded"]))
    # blended with a healthy dataset, it is still found (the count is per dataset and spans
    # batches: the healthy one's samples used to reset it, and the blend silently lost the other)
    blended = make(tok, [ListStream(pairs(50)), ListStream([bad])], datasets=["image_text", "grounded"])
    with pytest.raises(DataError, match="20 records in a row of dataset 1:grounded"):
        for _ in range(200):
            next(blended)


def test_resume_under_changed_layout_settings_lays_the_waiting_records_out_again(tok, caplog):
    """A resume after data.text_len changed (the saved pool held the 5th chunk of a text): the
    waiting records are rebuilt whole under the new setting, with a warning, instead of an
    IndexError on a chunk that no longer exists."""
    from emu2_engine.data.records import Text

    texts = [Text(f"t{i}", " ".join(f"word{i}x{j}" for j in range(120))) for i in range(9)]

    def fresh(text_len=40):
        return make(tok, [ListStream(pairs(40)), ListStream(texts)], datasets=["image_text", "text"],
                    rows=1, max_images=8, text_len=text_len)

    a = fresh()
    for _ in range(3):
        next(a)
    state = a.state_dict()
    assert any(d == 1 and k > 0 for d, _, k in state["pool"]), "the test needs a later chunk waiting"
    b = fresh(text_len=128)
    with caplog.at_level("WARNING", logger="emu2_engine.data.loader"):
        b.load_state_dict(state)
    assert "data settings changed since the checkpoint (text_len 40 -> 128)" in caplog.text
    waiting = {(d, r) for d, r, _ in state["pool"]}
    assert {(p.dataset, p.record) for p in b._pool} == waiting
    assert all(len(p.sample) <= 128 for p in b._pool)
    next(b)  # and it runs on
    same = fresh()  # unchanged settings: exact, as before
    same.load_state_dict(state)
    assert [p.part for p in same._pool] == [k for _, _, k in state["pool"]]


def test_resume_is_exact_with_pending_samples(tok):
    def fresh():
        streams = [ListStream(pairs(97)), ListStream(documents(31)),
                   ListStream([VideoText(f"v{i}", torch.stack([image(500 + i)] * 3), caption(i))
                               for i in range(13)])]
        return make(tok, streams, datasets=["image_text", "interleaved", "video_text"],
                    weights=[5, 2, 1], max_images=8, regress=["interleaved"])

    a = fresh()
    for _ in range(3):
        next(a)
    state = a.state_dict()
    assert state["pool"], "the test needs samples waiting in the pool at the save"
    expected = [next(a) for _ in range(4)]
    b = fresh()
    b.load_state_dict(state)
    for want in expected:
        assert_same(next(b), want)
    assert b.state_dict() == a.state_dict()


def _text_shard_with_bad_members(path, shard: int, n: int) -> None:
    """n text samples with, after every third, something the reading refuses or the decoder
    skips: a stray member, an unsafe name, or text that is not UTF-8 (in turn)."""
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i in range(n):
            add(f"t{shard}-{i:02d}.txt", caption(i + shard).encode())
            if i % 3 == 2:
                bad = [("README", b"stray"), (f"../evil{i}.txt", b"x"), (f"bad{i}.txt", b"\xff\xfe")][i // 3 % 3]
                add(*bad)


def test_skip_totals_after_a_resume_on_shards_equal_the_uninterrupted_runs(tok, tmp_path):
    """A loader over text shards with bad members, saved after k batches and resumed by a fresh
    one: m more batches equal the uninterrupted run's, and so do the skip totals after each.
    Resuming re-reads the saved position's shard; what it meets again is not counted again."""
    for shard in range(2):
        _text_shard_with_bad_members(tmp_path / f"t-{shard}.tar", shard, 14)

    def fresh():
        stream = ShardStream(str(tmp_path), Decoder("text", SIZE, backend="pil", log=None), seed=4,
                             batch_size=4, log=None)
        return make(tok, [stream], datasets=["text"])

    whole = fresh()
    expected = [(next(whole), whole.skip_counts()) for _ in range(8)]
    assert set(expected[-1][1]) == {"stray_member", "unsafe_path", "bad_utf8"}
    for k in (1, 2, 3, 5):
        first = fresh()
        for _ in range(k):
            next(first)
        resumed = fresh()
        resumed.load_state_dict(first.state_dict())
        assert resumed.skip_counts() == expected[k - 1][1]
        for want, counts in expected[k:]:
            assert_same(next(resumed), want)
            assert resumed.skip_counts() == counts, k


def test_resume_refuses_another_rank_layout(tok):
    a = make(tok, [ListStream(pairs(20))])
    next(a)
    state = a.state_dict()
    other = PackedLoader(tok, MODEL, a.cfg, [ListStream(pairs(20))], rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"saved by rank 0 of 1 data-parallel ranks, and is loaded "
                                         r"by rank 1 of 2.*Resume with 1 data-parallel ranks"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="state is for datasets"):
        make(tok, [ListStream(pairs(5))], datasets=["text"]).load_state_dict(state)


@pytest.fixture(scope="module")
def shapes_cfg(tmp_path_factory):
    """The debug data config over a shapes world generated into a fresh cache (as in CI)."""
    cfg = JobConfig.load(None).data
    return replace(cfg, cache_dir=str(tmp_path_factory.mktemp("cache")),
                   datasets=["image_text", "video_text", "interleaved", "grounded", "text"],
                   weights=[4.0, 1.0, 1.0, 1.0, 1.0], paths=[""] * 5, regress=["image_text"])


def test_shapes_world_shards_resume_exactly(tok, shapes_cfg):
    a = build_loader(shapes_cfg, tok, MODEL)
    for _ in range(3):
        next(a).validate(tok.vocab_size, NQ, SIZE)
    state = a.state_dict()
    expected = [next(a) for _ in range(3)]
    assert any(b.reg_images.numel() for b in expected)
    kinds = torch.cat([b.input_ids.flatten() for b in expected])
    assert (kinds == tok.ids.video).any() and (kinds == tok.token_to_id("<phrase>")).any()
    b = build_loader(shapes_cfg, tok, MODEL)
    b.load_state_dict(state)
    for want in expected:
        assert_same(next(b), want)
    # two data-parallel ranks read different samples
    rank1 = build_loader(shapes_cfg, tok, MODEL, rank=1, world_size=2)
    assert not torch.equal(next(rank1).input_ids, next(build_loader(shapes_cfg, tok, MODEL)).input_ids)
    with pytest.raises(ValueError, match="data-parallel ranks"):
        rank1.load_state_dict(state)


def test_heldout_loader_reads_captions_after_images(tok, shapes_cfg):
    batch = next(heldout_caption_loader(shapes_cfg, tok, MODEL))
    starts = (batch.input_ids == tok.ids.bos).nonzero()
    # every document is <s>[IMG]...: the image first, nothing regressed
    assert (batch.input_ids[starts[:, 0], starts[:, 1] + 1] == tok.ids.img).all()
    assert batch.reg_images.numel() == 0 and batch.n_images == len(starts)


def test_padding_images_change_nothing_in_the_model(tok):
    torch.manual_seed(0)
    model = Emu2Model(MODEL)
    loader = make(tok, [ListStream(pairs(40)), ListStream(documents(9))], datasets=["image_text", "interleaved"],
                  weights=[3, 1], max_images=6, regress=["image_text", "interleaved"])
    batch = next(loader)
    assert batch.reg_images.numel() and batch.n_images == 6
    results = []
    for b in (batch, _with_padding(batch, 5), _without_padding(batch)):
        model.zero_grad()
        out = model(b)
        out.total.backward()
        results.append((out.total.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss, grads), others = results[0], results[1:]
    for other_loss, other_grads in others:
        torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=1e-6)
        for g, h in zip(grads, other_grads):
            torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-6)


def _with_padding(batch, extra: int):
    """The same batch with `extra` more padding images, random rather than zero."""
    return replace(batch, images=torch.cat([batch.images, torch.randn(extra, *batch.images.shape[1:])]),
                   image_slots=torch.cat([batch.image_slots, torch.full((extra, NQ), -1)]),
                   image_mask=torch.cat([batch.image_mask, torch.zeros(extra, dtype=torch.bool)]))


def _without_padding(batch):
    """The same batch with its real images only and no mask (as a hand-built batch)."""
    real = batch.image_mask
    return replace(batch, images=batch.images[real], image_slots=batch.image_slots[real], image_mask=None)


def test_data_config_lists_and_checks():
    cfg = JobConfig.load(None, ['--data.datasets=["image_text", "text"]', "--data.weights=[3, 1]",
                                '--data.paths=["/data/laion", ""]', '--data.regress=["image_text"]'])
    assert cfg.data.datasets == ["image_text", "text"] and cfg.data.weights == [3.0, 1.0]
    assert cfg.data.paths == ["/data/laion", ""] and cfg.data.regress == ["image_text"]
    assert JobConfig.load(None).data == DataSection()
    for override, message in [
        ('--data.datasets=["image_text", "audio"]', r"kinds among .* got \['audio'\]"),
        ("--data.weights=[1, 2]", r"one entry per dataset \(3\), got 2 and 3"),
        ("--data.weights=[0, 0, 0]", "not all 0"),
        ("--data.too_long=cut", "truncate or drop"),
        ("--data.text_len=300", r"data.text_len \(300\) must lie in \[3, data.seq_len = 256\]"),
        ("--data.max_images=0", "max_images must be positive"),
        ("--data.shapes_scale=0", "shapes_scale must be positive"),
        ("--data.datasets=image_text", "data.datasets must be a list"),
    ]:
        with pytest.raises(ValueError, match=message):
            JobConfig.load(None, [override])


def test_stage2_config_blends_every_kind_with_regression(tok, shapes_cfg):
    cfg = JobConfig.load(Path(__file__).resolve().parent.parent / "configs" / "stage2_debug.toml",
                         [f"--data.cache_dir={shapes_cfg.cache_dir}"])
    assert cfg.optim.lr_vision == 0.0  # stage 2 freezes the encoder
    loader = build_loader(cfg.data, tok, MODEL)
    batches = [next(loader) for _ in range(3)]
    for b in batches:
        b.validate(tok.vocab_size, NQ, SIZE)
        assert b.images.shape[0] == 32 and b.reg_images.numel() > 0
    reads = np.array(loader._reads)
    assert reads.sum() > 30 and abs(reads[0] / reads.sum() - 9600 / 23200) < 0.05


def test_model_vocabulary_may_exceed_the_tokenizer_but_not_the_reverse(tok):
    """A real-size preset (vocabulary 32,272) trains on the shapes world's 784-token
    tokenizer: the extra embedding rows are unused. A tokenizer larger than the model is refused."""
    data = make(tok, [ListStream([])]).cfg
    big = replace(MODEL, llm=replace(MODEL.llm, vocab_size=tok.vocab_size + 100))
    batch = next(PackedLoader(tok, big, data, [ListStream(pairs(4))]))
    batch.validate(big.llm.vocab_size, NQ, SIZE)
    assert int(batch.input_ids.max()) < tok.vocab_size
    small = replace(MODEL, llm=replace(MODEL.llm, vocab_size=tok.vocab_size - 1))
    with pytest.raises(ValueError, match=f"tokenizer has {tok.vocab_size} tokens but the model's "
                                         f"vocabulary is only {tok.vocab_size - 1}"):
        PackedLoader(tok, small, data, [ListStream(pairs(4))])


def test_layouts_are_drawn_again_each_epoch(tok, tmp_path, monkeypatch):
    """The builder gets the epoch the stream read each record in: a one-shard dataset of 2
    samples gives epochs 0, 0, 1, 1, 2, 2 (so an image-text pair is not laid out the same way
    in every epoch). The loader's exact-resume tests replay records through the same path."""
    _text_shard_with_bad_members(tmp_path / "t-0.tar", 0, 2)  # 2 good text samples, no bad one
    from emu2_engine.data.sequences import SampleBuilder
    seen, build = [], SampleBuilder.build

    def recording(self, record, dataset, regress=False, epoch=0):
        seen.append((record.key, epoch))
        return build(self, record, dataset, regress, epoch)

    monkeypatch.setattr(SampleBuilder, "build", recording)

    def fresh():
        stream = ShardStream(str(tmp_path), Decoder("text", SIZE, backend="pil", log=None), seed=4,
                             batch_size=4, log=None)
        return stream, make(tok, [stream], datasets=["text"])

    stream, loader = fresh()
    for _ in range(5):
        next(stream)
    assert stream.epoch == 2  # 2 samples per epoch: the fifth record is in epoch 2
    seen.clear()
    _, loader = fresh()
    while len(seen) < 6:
        next(loader)
    assert [e for _, e in seen[:6]] == [0, 0, 1, 1, 2, 2]
    assert sorted(k for k, e in seen[:6] if e == 1) == sorted(k for k, e in seen[:6] if e == 0)


def test_heldout_loader_reads_its_split_once_then_ends(tok, shapes_cfg):
    """The end-of-run check reads each held-out pair at most once: the loader ends (StopIteration)
    after one pass, having packed every pair of the split (the shapes world's 200) exactly once;
    it used to wrap into a second epoch and count some pairs twice."""
    from emu2_engine.data.decode import Decoder
    from emu2_engine.data.loader import shapes_world_root
    from emu2_engine.data.shards import ShardStream, iter_records

    root = shapes_world_root(shapes_cfg) / "image_text" / "heldout"
    keys = [r.key for r in iter_records(root, Decoder("image_text", SIZE, log=None), log=None)]
    assert len(keys) == len(set(keys)) == 200
    loader = heldout_caption_loader(shapes_cfg, tok, MODEL)
    batches = list(loader)
    assert sum(b.n_images for b in batches) == len(keys)
    with pytest.raises(StopIteration):
        next(loader)
    # the stream alone: `epochs` passes, then StopIteration; 0 is refused
    one = ShardStream(root, Decoder("image_text", SIZE, log=None), shuffle=False, log=None, epochs=1)
    assert [r.key for r in one] == keys
    two = ShardStream(root, Decoder("image_text", SIZE, log=None), shuffle=False, log=None, epochs=2)
    assert [r.key for r in two] == keys * 2
    with pytest.raises(ValueError, match=r"epochs must be None \(endless\) or >= 1, got 0"):
        ShardStream(root, Decoder("image_text", SIZE, log=None), epochs=0)
    # a blend would keep drawing the ended dataset: epochs= reads one dataset
    with pytest.raises(ValueError, match=r"epochs= reads one dataset to its end .* got 5 datasets"):
        build_loader(shapes_cfg, tok, MODEL, split="heldout", epochs=1)


def test_blend_weights_count_samples_not_records(tok):
    """A text record longer than data.text_len gives several chunks; the blend counts them, so
    at weights [1, 1] the batches hold as many text chunks as image-caption pairs (counting
    records gave the texts `chunks` times their share)."""
    long_text = " ".join(WORDS * 6)
    chunks = len(SampleBuilder_for(tok).build(Text("t", long_text), "x"))
    assert chunks >= 3
    loader = make(tok, [ListStream(pairs(50)), ListStream([Text(f"t{i}", long_text) for i in range(50)])],
                  datasets=["image_text", "text"], weights=[1.0, 1.0], text_len=24, max_images=16)
    n_pairs = n_chunks = 0
    for _ in range(30):
        batch = next(loader)
        n_pairs += batch.n_images  # one image per pair; the chunks have none
        n_chunks += int((batch.input_ids == tok.ids.bos).sum()) - batch.n_images
    waiting = len(loader._pool)
    assert n_pairs > 100 and abs(n_pairs - n_chunks) <= waiting + 3, (n_pairs, n_chunks, waiting)
    assert loader.blend.taken.tolist()[1] % chunks == 0  # whole records of `chunks` samples


def SampleBuilder_for(tok):
    from emu2_engine.data.sequences import SampleBuilder
    return SampleBuilder(tok, NQ, text_len=24)
