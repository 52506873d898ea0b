"""WebDataset shards: listing them, reading samples out of a tar safely, and the endless,
resumable, rank-disjoint stream of decoded records of one dataset.

A shard is a tar in img2dataset's webdataset layout: a sample is the run of consecutive
members sharing a key, where the key is the member's path up to the first dot of its file
name and the rest is the member's extension (`a/000010003.0.jpg` -> key `a/000010003`,
extension `0.jpg`; extensions are lower-cased), as `webdataset` groups them.

Reading never extracts anything to disk: members are read into memory one sample at a time.
What the reader refuses, each skipped and counted by kind in a `SkipStats`:

| kind | what |
|---|---|
| `unsafe_path` | a member name that is absolute or has a `..` component |
| `special_member` | a symbolic or hard link, device, FIFO |
| `oversized_member` | a member larger than MAX_MEMBER_BYTES (read nothing of it) |
| `duplicate_member` | a sample with two members of the same extension |
| `stray_member` | a member with no extension (not part of any sample) |
| `truncated_tar` | the shard ends before its end-of-archive block, or is not a tar: counted once, the samples read before stay, the rest of the shard is skipped |
| `corrupt_tar` | a member header inside the shard is not a tar header (bad checksum, garbage): counted once like `truncated_tar` (the sample being read when it shows is dropped) |
| `unreadable_shard` | the shard cannot be opened |

A sample with a refused member is dropped whole (counted once, as the first reason), so a
half sample never reaches the decoder. Directory entries are ignored without counting.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import os
import re
import tarfile
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from emu2_engine.data.records import Record, SkipStats

MAX_MEMBER_BYTES = 256 << 20  # 256 MiB: far above any sample member, far below memory
_BRACES = re.compile(r"\{([^{}]*)\}")


def _expand_braces(pattern: str) -> list[str]:
    """`x-{00000..00003}.tar` -> x-00000.tar .. x-00003.tar (zero padding kept);
    `{a,b}` -> a, b; several groups expand as a product, left to right."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        lo, hi = numbers.groups()
        if int(hi) < int(lo):
            raise ValueError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"shard pattern {pattern!r}: {{{body}}} is neither a range like "
                         "{00000..00009} nor a list like {a,b}")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [expanded for option in options for expanded in _expand_braces(head + option + tail)]


def list_shards(spec: str | os.PathLike | list | tuple) -> list[str]:
    """The shard paths a spec names, in order.

    A spec is a directory (its `*.tar` files, sorted), a glob (`data/*.tar`, sorted), a brace
    pattern (`data/x-{00000..00003}.tar`, in pattern order), a path to one tar, or a list of
    any of these (concatenated). Raises ValueError naming the spec when something in it
    matches no file."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError("no shards: the shard list is empty")
        return [path for item in spec for path in list_shards(item)]
    text = os.fspath(spec)
    if os.path.isdir(text):
        found = sorted(str(p) for p in Path(text).glob("*.tar"))
        if not found:
            raise ValueError(f"no shards: directory {text!r} has no *.tar files")
        return found
    paths = []
    for pattern in _expand_braces(text):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise ValueError(f"no shards: {pattern!r} matches no file")
            paths += matches
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise ValueError(f"no shards: {pattern!r} (from {text!r}) is not a file")
    return paths


class DataError(ValueError):
    """Data that cannot train anything: shards that are not tar files, an epoch or a long
    run of records in which no sample was usable."""


TAR_PROBES = 3
"""How many of a spec's first shards `check_shard_spec` opens to see that they are tar files."""


def check_shard_spec(spec: str, key: str) -> list[str]:
    """The shards `spec` names (`list_shards`), checked before a run starts: something must
    match, and at least one of the first `TAR_PROBES` must open as a tar file (a spec that
    names, say, a text file or a zip would otherwise be found only when the first epoch gives
    no sample). Bad shards among good ones are left to the stream, which skips and counts
    them. ValueError (DataError) in one line naming the config key `key`."""
    try:
        shards = list_shards(spec)
    except ValueError as e:
        raise DataError(f"{key} = {spec!r}: {e}") from None
    probed = shards[:TAR_PROBES]
    if not any(_is_tar(path) for path in probed):
        what = (f"{probed[0]} is not a tar file" if len(probed) == 1 else
                f"none of its first {len(probed)} shards ({', '.join(probed)}) is a tar file")
        raise DataError(f"{key} = {spec!r}: {what} (WebDataset shards are tar files)")
    return shards


def _is_tar(path: str) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name by the webdataset rule, or None when the file name
    has no dot."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def unsafe_name(name: str) -> bool:
    """True for a member name that could point outside an extraction directory: absolute
    (`/x`, `\\x`, `C:x`) or with a `..` component (either separator)."""
    parts = re.split(r"[/\\]", name)
    return name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None or ".." in parts


class _HeaderRecordingTarInfo(tarfile.TarInfo):
    """TarInfo that remembers on its `_ShardTar` why reading a header failed: tarfile ends
    the member iteration quietly on a garbage header just as on the end-of-archive block of
    zeros, and only this tells the two apart."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.header_error = e
            raise


class _ShardTar(tarfile.TarFile):
    """A TarFile whose `header_error` is the error of the last header that failed to read:
    EOFHeaderError after a complete archive (its zero block), another HeaderError when the
    shard is cut short (EmptyHeaderError, TruncatedHeaderError) or corrupt."""

    tarinfo = _HeaderRecordingTarInfo
    header_error: tarfile.HeaderError | None = None


def iter_tar_samples(path: str, stats: SkipStats, log: Callable[[str], None] | None = print
                     ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of one shard, in tar order: (key, {extension: bytes}).

    Reads the tar as a stream and never writes anything. Members refused (see the module
    docstring) are counted in `stats` by kind, the first of each kind logged through `log`;
    a truncated or corrupt tar yields the samples complete before the damage (not the one
    being read when it shows: it may lack members), is counted once as `truncated_tar` (cut
    short, or not a tar) or `corrupt_tar` (a garbage member header inside it), and ends."""
    try:
        file = open(path, "rb")
    except OSError as e:
        stats.skip("unreadable_shard", path, str(e), log)
        return
    with file:
        key, members, refused = None, {}, None

        def finished():
            if key is None:
                return None
            if refused is not None:
                stats.skip(refused[0], key, refused[1], log)
                return None
            return key, members

        try:
            tar = _ShardTar.open(fileobj=file, mode="r|*")
            for info in tar:
                if info.isdir():
                    continue
                parts = split_key(info.name)
                if parts is None:
                    stats.skip("stray_member", info.name, "a member name with no extension", log)
                    continue
                if parts[0] != key:
                    sample = finished()
                    if sample is not None:
                        yield sample
                    key, members, refused = parts[0], {}, None
                ext = parts[1]
                if refused is not None:
                    continue
                if unsafe_name(info.name):
                    refused = ("unsafe_path", f"member name {info.name!r} is absolute or has '..'")
                elif not info.isfile():
                    refused = ("special_member", f"member {info.name!r} is a link or device, not a file")
                elif info.size > MAX_MEMBER_BYTES:
                    refused = ("oversized_member", f"member {info.name!r} has {info.size} bytes, "
                               f"more than {MAX_MEMBER_BYTES}")
                elif ext in members:
                    refused = ("duplicate_member", f"two members named {info.name!r}")
                else:
                    members[ext] = tar.extractfile(info).read()
            # The loop ends quietly at a plain end of file and at a garbage header too; only a
            # complete tar ends at its end-of-archive block of zeros.
            end = tar.header_error
            if isinstance(end, tarfile.InvalidHeaderError):
                stats.skip("corrupt_tar", path, f"member header at byte {tar.offset} is not a tar header "
                           f"({end}); rest of the shard skipped", log)
                return
            if not isinstance(end, tarfile.EOFHeaderError):
                raise tarfile.ReadError(f"no end-of-archive block ({end})")
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            stats.skip("truncated_tar", path, f"{type(e).__name__}: {e}; rest of the shard skipped", log)
            return
        sample = finished()
        if sample is not None:
            yield sample


class _StatsSwitch:
    """Where `iter_tar_samples` counts a shard's refusals: into `target`, or nowhere while it is
    None. A reader is a generator that keeps the object it was given, so a stream that must
    not count the first samples of a reader (they were counted before a save) switches this."""

    def __init__(self, target: SkipStats):
        self.target: SkipStats | None = target

    def skip(self, kind: str, key: str, why: str, log=None) -> None:
        if self.target is not None:
            self.target.skip(kind, key, why, log)


def _fingerprint(shards: list[str]) -> str:
    return hashlib.sha256("\n".join(shards).encode("utf-8")).hexdigest()


class ShardStream:
    """An endless iterator of decoded records of one dataset, epoch after epoch.

    - Order: each epoch walks the shards in an order drawn from (seed, epoch) when `shuffle`
      (the file order otherwise), and each shard's samples in tar order; records come out
      in a deterministic order.
    - Ranks: with at least `world_size` shards, rank r reads shards r, r + world_size, ...
      of the sequence of every epoch's order (`epoch_shards`); with fewer, every rank reads every shard and keeps the samples
      whose index in the shard is r modulo world_size. Either way the ranks' records are
      disjoint within an epoch.
    - Decoding: `batch_size` samples of this rank at a time go to `decoder.decode_batch`
      (a `decode.Decoder`, or anything with that method and a `stats` SkipStats);
      skipped samples are counted in `stats`, which the stream shares with the decoder.
    - State: `state_dict()` is (epoch, position in the epoch's shard order, samples of that
      shard consumed up to the last record returned, and where in the shard the decoded batch
      that record came from began); `load_state_dict` re-reads that shard up to the batch,
      reads and decodes the batch again and drops its records already returned: the stream
      is then where the saved one was, down to the records it had decoded ahead, and returns
      exactly the records the saved one would have returned next. A state saved with another
      shard list, world size, rank, seed or shuffle raises ValueError: resuming with a
      different layout would silently repeat or skip data.
    - Skip counts: `stats` counts what the reading has met so far, the decoded-ahead batch
      included. Re-reading after `load_state_dict` counts nothing (the saved stream counted
      it), so an owner that saves `stats.counts` with the state and puts them back after
      loading it (`PackedLoader`, the decoder trainer's `ShardData`) has, after any number of
      saves and resumes, the uninterrupted run's totals.
    - A whole epoch that gives this rank no record raises DataError instead of spinning.
    - `epochs` (None: endless) ends the stream after that many epochs (StopIteration): one
      pass over a held-out split reads each of its samples once.
    """

    STATE_VERSION = 1

    def __init__(self, shards, decoder, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, batch_size: int = 32, log: Callable[[str], None] | None = print,
                 epochs: int | None = None):
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be None (endless) or >= 1, got {epochs}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.shards = list_shards(shards)
        # Computed once: the loader asks for the state before every record it takes.
        self._fingerprint = _fingerprint(self.shards)
        self._epoch_order: tuple[int, list[str]] | None = None
        self.decoder, self.rank, self.world_size = decoder, rank, world_size
        self.seed, self.shuffle, self.batch_size, self.log = seed, shuffle, batch_size, log
        self.epochs = epochs
        stats = getattr(decoder, "stats", None)
        self.stats: SkipStats = stats if stats is not None else SkipStats()
        self._strided = len(self.shards) < world_size
        # what the tar reader counts into: `stats`, or nothing while a restored stream re-reads
        # what the saved one had counted
        self._tar_stats = _StatsSwitch(self.stats)
        self._position = (0, 0, 0)  # (epoch, shard position, samples consumed) of the last record
        self._batch_start = 0  # the shard's sample index where the last record's batch began
        self._start_reading(*self._position)

    def epoch_shards(self, epoch: int) -> list[str]:
        """This rank's shards in epoch `epoch`, in reading order (the last epoch's is cached)."""
        if self._epoch_order is not None and self._epoch_order[0] == epoch:
            return self._epoch_order[1]
        n = len(self.shards)
        order = np.arange(n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        if not self._strided:
            # every world_size-th shard of the endless sequence epoch 0's shards, epoch 1's, ...:
            # rank r's j-th shard is the sequence's (j x world_size + r)-th, so the ranks advance
            # together. (Taking every world_size-th shard of each epoch alone gave the ranks
            # epochs of different lengths when n is not a multiple of world_size: those with
            # fewer shards began re-reading before the others had read everything once.)
            order = order[(self.rank - epoch * n) % self.world_size::self.world_size]
        self._epoch_order = (epoch, [self.shards[i] for i in order])
        return self._epoch_order[1]

    def _start_reading(self, epoch: int, shard_pos: int, first: int) -> None:
        """Read on from sample `first` of shard `shard_pos` of `epoch`, nothing decoded yet."""
        self._read_epoch, self._read_pos, self._next_index = epoch, shard_pos, first
        self._reader = None
        self._pending: deque = deque()  # (epoch, shard position, sample index, batch start, record)
        self._epoch_had_records = False

    def __iter__(self) -> ShardStream:
        return self

    @property
    def epoch(self) -> int:
        """The epoch of the last record returned (0 before any)."""
        return self._position[0]

    def __next__(self) -> Record:
        while not self._pending:
            if self.epochs is not None and self._read_epoch >= self.epochs:
                raise StopIteration
            self._read_batch()
        epoch, shard_pos, index, self._batch_start, record = self._pending.popleft()
        self._position = (epoch, shard_pos, index + 1)
        return record

    def _read_batch(self) -> None:
        """Read up to batch_size of this rank's samples from the current shard and decode
        them into _pending; move to the next shard (or epoch) when the shard is done."""
        shards = self.epoch_shards(self._read_epoch)
        if self._read_pos >= len(shards):
            if not self._epoch_had_records:
                raise DataError(
                    f"rank {self.rank}/{self.world_size}: epoch {self._read_epoch} over "
                    f"{len(shards)} shard(s) gave no usable sample ({self.stats.summary()})")
            self._start_reading(self._read_epoch + 1, 0, 0)
            return
        shard_pos, start = self._read_pos, self._next_index
        path = shards[shard_pos]
        if self._reader is None:
            samples = enumerate(iter_tar_samples(path, self._tar_stats, self.log))
            self._reader = itertools.islice(samples, start, None)
        batch = []
        for index, (key, members) in self._reader:
            self._next_index = index + 1
            if self._strided and index % self.world_size != self.rank:
                continue
            batch.append((index, key, members))
            if len(batch) == self.batch_size:
                break
        else:
            self._reader, self._read_pos, self._next_index = None, shard_pos + 1, 0
        if not batch:
            return
        records = self.decoder.decode_batch([(key, members) for _, key, members in batch])
        for (index, _, _), record in zip(batch, records):
            if record is not None:
                record.source = path
                self._pending.append((self._read_epoch, shard_pos, index, start, record))
                self._epoch_had_records = True

    def state_dict(self) -> dict:
        """Where the stream is: enough for `load_state_dict` to continue exactly here."""
        epoch, shard_pos, consumed = self._position
        return {"version": self.STATE_VERSION, "epoch": epoch, "shard_position": shard_pos,
                "consumed": consumed, "batch_start": self._batch_start,
                "rank": self.rank, "world_size": self.world_size,
                "seed": self.seed, "shuffle": self.shuffle, "n_shards": len(self.shards),
                "shards_sha256": self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict`). Raises ValueError if it was saved by a
        stream over other shards or with another rank layout, seed or shuffle."""
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"shard stream state version {state.get('version')!r}, expected {self.STATE_VERSION}")
        if state["n_shards"] != len(self.shards) or state["shards_sha256"] != self._fingerprint:
            raise ValueError(f"shard stream state was saved over another shard list ({state['n_shards']} "
                             f"shards) than this stream's ({len(self.shards)} shards); resuming would "
                             "repeat or skip data")
        for field in ("world_size", "rank", "seed", "shuffle"):
            if state[field] != getattr(self, field):
                raise ValueError(f"shard stream state was saved with {field}={state[field]!r}, this stream "
                                 f"has {field}={getattr(self, field)!r}; resuming would repeat or skip data")
        epoch, shard_pos, consumed = state["epoch"], state["shard_position"], state["consumed"]
        self._position = (epoch, shard_pos, consumed)
        if consumed == 0:  # no record returned yet: nothing was read
            self._batch_start = 0
            self._start_reading(epoch, shard_pos, 0)
            return
        # A state saved before batch_start was kept re-reads from the first sample not returned:
        # the same records; its skip totals may differ by that batch's bad samples.
        self._batch_start = state.get("batch_start", consumed)
        self._start_reading(epoch, shard_pos, self._batch_start)
        self._epoch_had_records = True  # the saved stream returned a record of this epoch
        with self._counting_nothing():
            # The batch the last record came from, as the saved stream read it; with a smaller
            # batch_size than the saved stream's, the batches up to the first sample not returned
            # (then the records are exact, the skip totals off by what the saved stream had
            # decoded ahead).
            while (self._read_epoch, self._read_pos) == (epoch, shard_pos) and self._next_index < consumed:
                self._read_batch()
        while self._pending and self._pending[0][2] < consumed:
            self._pending.popleft()

    @contextlib.contextmanager
    def _counting_nothing(self):
        """Skips met inside are not counted (in `stats`, by the tar reader or the decoder): the
        saved stream counted them. The decoder's `stats` is swapped for a scratch one."""
        own = getattr(self.decoder, "stats", None)
        self._tar_stats.target = None
        if own is not None:
            self.decoder.stats = SkipStats()
        try:
            yield
        finally:
            self._tar_stats.target = self.stats
            if own is not None:
                self.decoder.stats = own


def iter_records(shards, decoder, batch_size: int = 32, log: Callable[[str], None] | None = print
                 ) -> Iterator[Record]:
    """One pass over every sample of `shards` in file order, decoded (e.g. a held-out split)."""
    for path in list_shards(shards):
        samples = iter_tar_samples(path, decoder.stats, log)
        while batch := list(itertools.islice(samples, batch_size)):
            for record in decoder.decode_batch(batch):
                if record is not None:
                    record.source = path
                    yield record
