"""Shard listing, safe tar reading grouped by key, and ShardStream: epochs, rank splits,
determinism and exact resume (of the records and of the skip counts)."""

import gzip
import io
import itertools
import tarfile
from collections import Counter

import pytest

from emu2_engine.data.decode import Decoder
from emu2_engine.data.make_shapes import write_tar
from emu2_engine.data.records import SkipStats
from emu2_engine.data.shards import (DataError, ShardStream, iter_records, iter_tar_samples, list_shards,
                                     split_key, unsafe_name)


def _text_shards(folder, n_shards, per_shard, prefix="s"):
    """n_shards tars of per_shard text samples; keys `<prefix><shard><index>` are unique."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(n_shards):
        samples = [(f"{prefix}{shard:02d}{i:03d}", {"txt": f"text {shard} {i}".encode()})
                   for i in range(per_shard)]
        path = folder / f"{prefix}-{shard:05d}.tar"
        write_tar(path, samples)
        paths.append(str(path))
    return paths


def _keys(stream, n):
    return [r.key for r in itertools.islice(stream, n)]


def _stream(paths, **kwargs):
    return ShardStream(paths, Decoder("text", 8, backend="pil", log=None), log=None, **kwargs)


# -- listing -------------------------------------------------------------------------------------

def test_list_shards_directory_glob_braces_and_lists(tmp_path):
    paths = _text_shards(tmp_path / "d", 4, 1)
    (tmp_path / "d" / "notes.txt").write_text("not a shard")
    assert list_shards(tmp_path / "d") == paths
    assert list_shards(str(tmp_path / "d" / "*.tar")) == paths
    assert list_shards(str(tmp_path / "d" / "s-{00001..00003}.tar")) == paths[1:]
    assert list_shards(str(tmp_path / "d" / "s-0000{3,0}.tar")) == [paths[3], paths[0]]
    assert list_shards([paths[2], str(tmp_path / "d" / "s-{00000..00001}.tar")]) == [paths[2]] + paths[:2]
    assert list_shards(paths[1]) == [paths[1]]


@pytest.mark.parametrize("spec, message", [
    ("{dir}/missing-{{00000..00002}}.tar", "is not a file"),
    ("{dir}/nothing-*.tar", "matches no file"),
    ("{dir}/s-{{00003..00001}}.tar", "runs backwards"),
    ("{dir}/s-{{x}}.tar", "neither a range"),
    ("{dir}", "has no \\*.tar files"),
])
def test_list_shards_errors_name_the_spec(tmp_path, spec, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=message):
        list_shards(spec.format(dir=tmp_path / "empty"))
    with pytest.raises(ValueError, match="empty"):
        list_shards([])


def test_webdataset_key_rules():
    assert split_key("000010003.jpg") == ("000010003", "jpg")
    assert split_key("a/b/000010003.0.JPG") == ("a/b/000010003", "0.jpg")
    assert split_key("README") is None and split_key("dir/.hidden") is None
    assert all(unsafe_name(n) for n in ("../x.jpg", "a/../../x.txt", "/etc/x.txt", "\\x.txt",
                                        "C:evil.txt", "a\\..\\x.txt"))
    assert not any(unsafe_name(n) for n in ("a/b.txt", "a..b.txt", "x.tar..gz"))


# -- reading -------------------------------------------------------------------------------------

def _member(tar, name, data=b"", kind=tarfile.REGTYPE, size=None):
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    info.size = len(data) if size is None else size
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_groups_members_by_key_in_tar_order(tmp_path):
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("dir/", b""), ("k1.jpg", b"J1"), ("k1.txt", b"T1"), ("k1.0.jpg", b"I0"),
                           ("sub/k2.TXT", b"T2"), ("k3.json", b"{}")]:
            if name.endswith("/"):
                _member(tar, name, kind=tarfile.DIRTYPE)
            else:
                _member(tar, name, data)
    stats = SkipStats()
    samples = list(iter_tar_samples(str(path), stats, log=None))
    assert samples == [("k1", {"jpg": b"J1", "txt": b"T1", "0.jpg": b"I0"}),
                       ("sub/k2", {"txt": b"T2"}), ("k3", {"json": b"{}"})]
    assert not stats.counts


def test_refused_members_drop_their_sample_and_are_counted(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        _member(tar, "good1.txt", b"a")
        _member(tar, "../evil.txt", b"x")
        _member(tar, "/abs/evil.txt", b"x")
        _member(tar, "link.jpg", b"", kind=tarfile.SYMTYPE)
        _member(tar, "link.txt", b"linked caption")
        _member(tar, "dev.jpg", b"", kind=tarfile.CHRTYPE)
        _member(tar, "dup.txt", b"1")
        _member(tar, "dup.txt", b"2")
        _member(tar, "README", b"stray")
        _member(tar, "good2.txt", b"b")
    logged = []
    stats = SkipStats()
    samples = list(iter_tar_samples(str(path), stats, log=logged.append))
    assert samples == [("good1", {"txt": b"a"}), ("good2", {"txt": b"b"})]
    assert stats.counts == {"unsafe_path": 2, "special_member": 2, "duplicate_member": 1, "stray_member": 1}
    assert len(logged) == 4  # once per kind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar"]  # nothing extracted
    assert not (tmp_path.parent / "evil.txt").exists()


def test_oversized_member_is_skipped_unread(tmp_path, monkeypatch):
    monkeypatch.setattr("emu2_engine.data.shards.MAX_MEMBER_BYTES", 100)
    path = tmp_path / "big.tar"
    write_tar(path, [("a", {"txt": b"small"}), ("b", {"jpg": b"x" * 101, "txt": b"c"}), ("c", {"txt": b"ok"})])
    stats = SkipStats()
    assert [k for k, _ in iter_tar_samples(str(path), stats, log=None)] == ["a", "c"]
    assert stats.counts == {"oversized_member": 1}


@pytest.mark.parametrize("cut", ["header_boundary", "inside_data", "inside_header", "empty", "garbage"])
def test_truncated_tar_keeps_complete_samples_and_counts_once(tmp_path, cut):
    (path,) = _text_shards(tmp_path, 1, 10)
    data = open(path, "rb").read()
    # each text sample is one 512-byte header + one 512-byte data block
    cuts = {"header_boundary": 5 * 1024, "inside_data": 5 * 1024 + 512 + 100,
            "inside_header": 5 * 1024 + 100, "empty": 0}
    damaged = b"this is not a tar file at all" * 40 if cut == "garbage" else data[:cuts[cut]]
    open(path, "wb").write(damaged)
    stats = SkipStats()
    keys = [k for k, _ in iter_tar_samples(path, stats, log=None)]
    # the sample being read when the damage shows is dropped too: it may be incomplete
    expected = {"header_boundary": 4, "inside_data": 5, "inside_header": 4, "empty": 0, "garbage": 0}[cut]
    assert keys == [f"s00{i:03d}" for i in range(expected)]
    assert stats.counts == {"truncated_tar": 1}


@pytest.mark.parametrize("compress", [False, True])
def test_corrupt_member_header_drops_rest_of_shard_and_is_counted(tmp_path, compress):
    # tarfile stops quietly at a header with a bad checksum, as at the end-of-archive block:
    # the half-read sample "b" (its .txt header is the garbage one) must not come out whole
    # or partial, and the damage must be counted.
    path = tmp_path / "corrupt.tar"
    write_tar(path, [("a", {"jpg": b"x" * 10, "txt": b"cap a"}), ("b", {"jpg": b"y" * 10, "txt": b"cap b"}),
                     ("c", {"jpg": b"z", "txt": b"c"})])
    data = bytearray(path.read_bytes())
    header = 3 * 1024  # each member: one 512-byte header + one 512-byte data block
    assert data[header:header + 5] == b"b.txt"
    data[header + 100:header + 108] = b"garbage!"  # the mode field: the checksum no longer matches
    path.write_bytes(gzip.compress(bytes(data), mtime=0) if compress else bytes(data))
    stats = SkipStats()
    assert list(iter_tar_samples(str(path), stats, log=None)) == [("a", {"jpg": b"x" * 10, "txt": b"cap a"})]
    assert stats.counts == {"corrupt_tar": 1}


def test_complete_tars_plain_padded_and_gzipped_are_not_truncated(tmp_path):
    (path,) = _text_shards(tmp_path, 1, 10)
    data = open(path, "rb").read()
    variants = {"plain": data, "no_record_padding": data[:10 * 1024 + 1024],
                "gzip": gzip.compress(data, mtime=0)}
    for name, content in variants.items():
        target = tmp_path / f"{name}.tar"
        target.write_bytes(content)
        stats = SkipStats()
        assert len(list(iter_tar_samples(str(target), stats, log=None))) == 10, name
        assert not stats.counts, name
    stats = SkipStats()
    assert list(iter_tar_samples(str(tmp_path / "gone.tar"), stats, log=None)) == []
    assert stats.counts == {"unreadable_shard": 1}


# -- streaming -----------------------------------------------------------------------------------

def test_one_epoch_reads_every_sample_once_then_the_next_epoch_reshuffles(tmp_path):
    paths = _text_shards(tmp_path, 5, 4)
    stream = _stream(paths, seed=1, batch_size=3)
    epoch0, epoch1 = _keys(stream, 20), _keys(stream, 20)
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"s{s:02d}{i:03d}" for s in range(5) for i in range(4))
    shard_order = lambda keys: [k[:3] for k in keys[::4]]  # noqa: E731
    assert shard_order(epoch0) != shard_order(epoch1)
    assert shard_order(epoch0) == [f"s{int(p[-9:-4]):02d}" for p in stream.epoch_shards(0)]
    # records know their shard; in-shard order is tar order
    record = next(iter(_stream(paths, shuffle=False)))
    assert record.source == paths[0] and record.key == "s00000"
    assert _keys(_stream(paths, shuffle=False), 6) == ["s00000", "s00001", "s00002", "s00003", "s01000", "s01001"]


def test_same_arguments_same_records(tmp_path):
    paths = _text_shards(tmp_path, 3, 5)
    assert _keys(_stream(paths, seed=7), 40) == _keys(_stream(paths, seed=7, batch_size=2), 40)
    assert _keys(_stream(paths, seed=7), 40) != _keys(_stream(paths, seed=8), 40)


@pytest.mark.parametrize("n_shards, world_size", [(4, 2), (5, 2), (6, 3), (1, 2), (2, 3)])
def test_ranks_read_disjoint_samples_that_cover_the_epoch(tmp_path, n_shards, world_size):
    per_shard = 6
    paths = _text_shards(tmp_path, n_shards, per_shard)
    everything = {f"s{s:02d}{i:03d}" for s in range(n_shards) for i in range(per_shard)}
    seen = []
    for rank in range(world_size):
        stream = _stream(paths, rank=rank, world_size=world_size, seed=3, batch_size=4)
        if n_shards >= world_size:  # whole shards per rank
            n = per_shard * len(stream.epoch_shards(0))
        else:  # samples strided across ranks
            n = n_shards * len(range(rank, per_shard, world_size))
        seen.append(set(_keys(stream, n)))
        assert len(seen[-1]) == n
    assert set().union(*seen) == everything
    assert sum(len(s) for s in seen) == len(everything)


@pytest.mark.parametrize("n_shards, world_size", [(5, 2), (5, 3), (5, 4), (6, 3)])
def test_ranks_advance_together_when_the_shards_do_not_divide_evenly(tmp_path, n_shards, world_size):
    """Over several epochs, the ranks read the same number of samples each before any sample is
    read a second time: rank r's j-th shard is the (j x world_size + r)-th of the sequence of
    every epoch's shards. (Every world_size-th shard of each epoch gave 5 shards to 2 ranks as
    3 + 2: after 2,000 records, 200 had been read twice and 200 not at all.)"""
    per_shard = 3
    paths = _text_shards(tmp_path, n_shards, per_shard)
    streams = [_stream(paths, rank=r, world_size=world_size, seed=3) for r in range(world_size)]
    order = [list(map(str, _stream(paths, seed=3).epoch_shards(e))) for e in range(3)]  # one rank: all
    sequence = [shard for epoch in order for shard in epoch]
    rounds = len(sequence) // world_size
    for r, stream in enumerate(streams):
        mine = [shard for e in range(3) for shard in stream.epoch_shards(e)]
        assert mine[:rounds] == sequence[r::world_size][:rounds], r
    # what the ranks read first, together, is every sample once
    keys = [k for stream in streams for k in _keys(stream, per_shard * (n_shards // world_size))]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1), (3, 2)])
@pytest.mark.parametrize("taken", [0, 1, 5, 7, 8, 23, 31])
def test_restored_stream_yields_exactly_what_the_original_would(tmp_path, taken, world_size, rank):
    paths = _text_shards(tmp_path, 2 if world_size == 3 else 4, 8)  # 2 shards < 3 ranks: strided
    original = _stream(paths, rank=rank, world_size=world_size, seed=5, batch_size=3)
    _keys(original, taken)
    state = original.state_dict()
    expected = _keys(original, 30)
    restored = _stream(paths, rank=rank, world_size=world_size, seed=5, batch_size=3)
    restored.load_state_dict(state)
    assert _keys(restored, 30) == expected


def test_state_from_another_layout_is_refused(tmp_path):
    paths = _text_shards(tmp_path, 4, 3)
    state = _stream(paths, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        _stream(paths, world_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="rank=0"):
        _stream(paths, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="another shard list"):
        _stream(paths[:3], world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="another shard list"):
        _stream(paths[::-1], world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0"):
        _stream(paths, world_size=2, seed=1).load_state_dict(state)


def test_an_epoch_with_no_usable_sample_raises_instead_of_spinning(tmp_path):
    bad = tmp_path / "bad.tar"
    write_tar(bad, [(f"k{i}", {"txt": b"\xff\xfe"}) for i in range(3)])
    stream = _stream([str(bad)])
    with pytest.raises(DataError, match="gave no usable sample.*bad_utf8=3"):
        next(stream)
    with pytest.raises(ValueError, match="rank < world_size"):
        _stream([str(bad)], rank=2, world_size=2)


def test_iter_records_is_one_pass_in_file_order(tmp_path):
    paths = _text_shards(tmp_path, 3, 4)
    decoder = Decoder("text", 8, backend="pil", log=None)
    keys = [r.key for r in iter_records(paths, decoder, batch_size=5, log=None)]
    assert keys == [f"s{s:02d}{i:03d}" for s in range(3) for i in range(4)]


def _shards_with_refusals(folder):
    """Two shards of text samples with bad ones after good ones, where a stream that re-read
    its shard from the start would count them again: tar-level refusals (a stray member, an
    unsafe name, a duplicate member, a garbage header ending the second shard early) and
    samples the decoder skips (bad UTF-8). Returns the paths and the usable keys."""
    folder.mkdir()
    layout = [
        ["a0", "a1", "stray", "a2", "unsafe", "a3", "utf8", "a4", "dup", "a5", "a6", "utf8", "a7"],
        ["b0", "b1", "stray", "b2", "utf8", "b3", "b4", "unsafe", "b5", "b6", "garbage_header", "b7"],
    ]
    paths, good = [], []
    for shard, entries in enumerate(layout):
        path = folder / f"r-{shard}.tar"
        with tarfile.open(path, "w") as tar:
            for i, entry in enumerate(entries):
                if entry == "stray":
                    _member(tar, f"README{i}", b"no extension")
                elif entry == "unsafe":
                    _member(tar, f"../evil{shard}{i}.txt", b"x")
                elif entry == "dup":
                    _member(tar, f"dup{shard}{i}.txt", b"1")
                    _member(tar, f"dup{shard}{i}.txt", b"2")
                elif entry == "utf8":
                    _member(tar, f"bad{shard}{i}.txt", b"\xff\xfe")
                elif entry == "garbage_header":
                    _member(tar, f"cut{shard}{i}.txt", b"lost")
                else:
                    _member(tar, f"{entry}.txt", f"text {entry}".encode())
                    good.append(entry)
        if "garbage_header" in entries:  # break the header of the member "cut...": the rest is lost
            data = bytearray(path.read_bytes())
            at = data.index(b"cut")
            data[at + 100:at + 108] = b"garbage!"
            path.write_bytes(bytes(data))
            good.remove("b7")
        paths.append(str(path))
    return paths, good


@pytest.mark.parametrize("world_size, rank", [(1, 0), (3, 1)])  # 3 ranks, 2 shards: strided
@pytest.mark.parametrize("taken", [1, 3, 4, 6, 9, 11, 12, 17])
def test_skip_counts_after_a_resume_equal_the_uninterrupted_runs(tmp_path, taken, world_size, rank):
    """k records, save (the owner keeps the counts, as ShardData and PackedLoader do), a fresh
    stream loads the state and the counts, m more records: the same records and the same skip
    totals as k + m records of one stream, after every record. The restored stream re-reads
    the consumed part of its shard, whose refusals the saved stream had already counted."""
    paths, good = _shards_with_refusals(tmp_path / "shards")
    kinds = {"stray_member", "unsafe_path", "duplicate_member", "bad_utf8", "corrupt_tar"}

    def stream():
        return _stream(paths, rank=rank, world_size=world_size, seed=2, batch_size=2)

    whole = stream()
    expected = []
    for _ in range(30):
        expected.append((next(whole).key, dict(whole.stats.counts)))
    assert set(expected[-1][1]) == kinds, "the test needs every kind counted"
    assert {key for key, _ in expected} <= set(good)
    first = stream()
    for _ in range(taken):
        next(first)
    state, counts = first.state_dict(), dict(first.stats.counts)
    resumed = stream()
    resumed.load_state_dict(state)
    assert not resumed.stats.counts, "loading a state counts nothing by itself"
    resumed.stats.counts = Counter(counts)
    got = [(next(resumed).key, dict(resumed.stats.counts)) for _ in range(30 - taken)]
    assert got == expected[taken:]


def test_a_state_without_batch_start_resumes_the_same_records(tmp_path):
    """A state saved before the stream kept `batch_start` re-reads from its first sample not
    returned: the records are the same (only its skip totals may differ)."""
    paths, _ = _shards_with_refusals(tmp_path / "shards")
    original = _stream(paths, seed=2, batch_size=3)
    _keys(original, 5)
    state = original.state_dict()
    assert state.pop("batch_start") < state["consumed"]  # the record came from a batch begun before it
    restored = _stream(paths, seed=2, batch_size=3)
    restored.load_state_dict(state)
    assert _keys(restored, 20) == _keys(original, 20)


def test_a_state_without_batch_start_resumes_at_the_end_of_an_epoch(tmp_path):
    """An old state whose last record was the epoch's last sample: the restored stream goes on
    to the next epoch instead of finding the re-read empty and calling the epoch unusable."""
    paths = _text_shards(tmp_path / "d", 1, 3)
    original = _stream(paths, seed=4, batch_size=2)
    _keys(original, 3)  # the whole epoch
    state = original.state_dict()
    del state["batch_start"]
    restored = _stream(paths, seed=4, batch_size=2)
    restored.load_state_dict(state)
    assert _keys(restored, 5) == _keys(original, 5)


@pytest.mark.parametrize("saved_batch, new_batch", [(3, 1), (4, 2), (2, 5)])
def test_resuming_with_another_batch_size_gives_the_same_records(tmp_path, saved_batch, new_batch):
    """The records after a resume do not depend on the stream's batch size (the decoder
    trainer's per-rank batch): no record comes back twice, none is lost."""
    paths = _text_shards(tmp_path / "d", 2, 7)
    original = _stream(paths, seed=5, batch_size=saved_batch)
    _keys(original, 5)
    restored = _stream(paths, seed=5, batch_size=new_batch)
    restored.load_state_dict(original.state_dict())
    assert _keys(restored, 12) == _keys(original, 12)
