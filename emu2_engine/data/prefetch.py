"""Building the next batches in a background thread while the model trains on this one.

`PackedLoader` reads shards, decodes images, lays out sequences, packs and collates in the
process that trains: without a prefetcher the accelerator idles for all of it (the metrics'
``data_wait``). `Prefetcher(loader, depth)` runs the loader in a daemon thread that keeps up to
`depth` finished batches in a bounded queue (and builds one more while the queue is full), so
the training step only waits when the loader is slower than the step. A thread rather than
processes: the loader's heavy parts (tar reading, DALI and PIL decoding, the C++ packer, torch
collation) release the GIL, and one loader object keeps its exact-resume state in one place.

Exact resume. The loader runs ahead of the consumer, so its own `state_dict()` would skip the
batches read ahead but not yet trained on. After each batch the producer therefore snapshots
the loader's state (a deep copy) and queues it with the batch; `Prefetcher.state_dict()` is the
snapshot of the last batch the consumer took (before any, the state at construction or at the
last `load_state_dict`). The skip statistics are snapshotted the same way, so a run's totals do
not depend on how far the producer had got.

Lifecycle. The thread starts at the first `next()`. `load_state_dict` may be called at any time:
it stops the producer (waiting for the batch it is building), drops what was read ahead, loads
the state into the loader, and the next `next()` starts a new producer from there. `close()`
stops the producer and drops the read-ahead batches; the consumer's position is kept, so
iterating again restarts from exactly the next batch (the loader is first reloaded from that
position). `close()` runs on garbage collection and at interpreter exit too, and never waits
longer than its timeout: a producer stuck in a slow read is left to die with the process.

Errors. An exception raised by the loader in the producer (a bad shard list, a broken dataset,
anything) is raised again by the consumer's `next()`, the same exception object with the
producer's frames in its traceback, and again by every later `next()`. A loader that ends
(StopIteration) ends the prefetcher after the batches before it.

Pinning. Given a CUDA `device`, batches are copied to page-locked memory in the producer, so
the trainer's ``.to(device, non_blocking=True)`` runs as an asynchronous copy; the producer
thread makes `device` its current device first (a new thread starts on GPU 0, and pinning there
would create a CUDA context on another rank's GPU).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Iterator, Protocol

import torch

from emu2_engine.data.records import SkipStats

log = logging.getLogger(__name__)

# How often a producer blocked on a full queue checks whether it should stop (seconds).
_POLL_SECONDS = 0.05


class ResumableLoader(Protocol):
    """An iterator of batches that saves and restores its position (`PackedLoader`). A loader
    with `skip_counts()` gets them snapshotted with each batch, and its `truncated` count too
    when it has one."""

    def __next__(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class _Position:
    """Where the loader stood right after building one batch."""

    state: dict
    skipped: Counter | None
    """The loader's skip counts by kind (None for a loader that keeps none)."""
    truncated: int | None


@dataclass(frozen=True)
class _Failure:
    """The producer's exception, to be raised in the consumer."""

    error: BaseException


_END = object()  # queued when the loader raises StopIteration


def _position(loader: ResumableLoader) -> _Position:
    """A deep copy of the loader's state and statistics: the producer goes on mutating them."""
    has_stats = callable(getattr(loader, "skip_counts", None))
    truncated = getattr(loader, "truncated", None)
    return _Position(state=copy.deepcopy(loader.state_dict()),
                     skipped=Counter(loader.skip_counts()) if has_stats else None,
                     truncated=None if truncated is None else int(truncated))


AUTO_DEPTH = 2
"""What `data.prefetch = -1` (auto, the default) means on a GPU."""


def prefetch_depth(setting: int, device: torch.device) -> int:
    """The read-ahead depth for a `data.prefetch` setting: itself when >= 0; for -1 (auto)
    AUTO_DEPTH on CUDA and 0 elsewhere. On a CPU the producer thread competes with the model
    for the same cores: the debug run on our 2-core machine trained at 12,300-13,200 tokens/s
    with it and 15,500-17,700 without (two runs each, 200 steps), while on a GPU the training
    thread mostly waits for kernels and the cores are free for the data."""
    if setting < -1:
        raise ValueError(f"data.prefetch must be >= -1 (-1 = auto, 0 = off), got {setting}")
    if setting >= 0:
        return setting
    return AUTO_DEPTH if device.type == "cuda" else 0


def pin_batch(batch: Any) -> Any:
    """`batch` with its CPU tensors in page-locked memory: a tensor, or a dataclass of tensors
    (`PackedBatch`; fields that are not tensors are kept as they are)."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory() if batch.device.type == "cpu" else batch
    if is_dataclass(batch) and not isinstance(batch, type):
        pinned = {f.name: pin_batch(getattr(batch, f.name)) for f in fields(batch)
                  if isinstance(getattr(batch, f.name), torch.Tensor)}
        return replace(batch, **pinned)
    raise ValueError(f"pin_batch takes a tensor or a dataclass of tensors, got {type(batch).__name__}")


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Queue `item`, waiting while the queue is full unless told to stop; False if stopped."""
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False


def _produce(loader: ResumableLoader, out: queue.Queue, stop: threading.Event,
             device: torch.device | None) -> None:
    """The producer thread: batches and their positions into `out` until stopped, the loader
    ends, or it raises. It holds no reference to the `Prefetcher`, which can therefore be
    garbage collected (and its finaliser stop this thread) while the thread runs."""
    try:
        if device is not None:
            torch.cuda.set_device(device)
        while not stop.is_set():
            try:
                batch = next(loader)
            except StopIteration:
                _put(out, _END, stop)
                return
            if device is not None:
                batch = pin_batch(batch)
            if not _put(out, (batch, _position(loader)), stop):
                return
    except BaseException as error:  # every error (SystemExit too) is the consumer's to raise
        _put(out, _Failure(error), stop)


def _halt(stop: threading.Event, thread: threading.Thread, timeout: float | None) -> None:
    """Tell the producer to stop and wait up to `timeout` seconds for it (the finaliser of a
    running producer: called by `close()`, on garbage collection, or at interpreter exit)."""
    stop.set()
    if thread is threading.current_thread():  # collected on the producer itself: it sees the flag
        return
    thread.join(timeout)
    if thread.is_alive():
        log.warning("the data prefetch thread is still building a batch after %.0f s; it is left "
                    "to finish on its own (a daemon thread: it does not keep the process alive)",
                    timeout)


class Prefetcher:
    """Iterates `loader`'s batches, built up to `depth` ahead in a background thread, with the
    consumer's position for checkpoints (see the module docstring).

    loader: an iterator of batches with `state_dict` / `load_state_dict` (`PackedLoader`); the
        prefetcher owns it from now on: nothing else may call it while a producer runs.
    depth: finished batches kept ready (>= 1); the producer builds one more while they wait.
    device: where the batches will be moved; a CUDA device pins them (see `pin_batch`).
    close_timeout: how long `close()` (and garbage collection) waits for the producer to
        finish the batch it is building, in seconds.
    """

    def __init__(self, loader: ResumableLoader, depth: int = 2, device: torch.device | str | None = None,
                 close_timeout: float = 10.0):
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"prefetch depth must be an integer >= 1, got {depth!r}")
        if not close_timeout > 0:
            raise ValueError(f"close_timeout must be a positive number of seconds, got {close_timeout!r}")
        for method in ("state_dict", "load_state_dict"):
            if not callable(getattr(loader, method, None)):
                raise ValueError(f"the loader must have state_dict() and load_state_dict() for "
                                 f"exact resume; {type(loader).__name__} has no {method}()")
        device = None if device is None else torch.device(device)
        if device is not None and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.loader, self.depth, self.close_timeout = loader, depth, close_timeout
        self._pin_device = device if device is not None and device.type == "cuda" else None
        self._position = _position(loader)
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._finalizer: weakref.finalize | None = None
        self._loader_ahead = False  # a stopped producer left the loader past the consumer
        self._finished: BaseException | None = None  # the loader's error, or StopIteration

    # -- the producer -------------------------------------------------------------------------
    def _start(self) -> None:
        """A new producer from the consumer's position."""
        self._stop(wait=True)  # a producer that close() did not wait out
        if self._loader_ahead:
            self.loader.load_state_dict(copy.deepcopy(self._position.state))
            self._loader_ahead = False
        self._queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        self._thread = threading.Thread(target=_produce, name="emu2-data-prefetch", daemon=True,
                                        args=(self.loader, self._queue, stop, self._pin_device))
        self._finalizer = weakref.finalize(self, _halt, stop, self._thread, self.close_timeout)
        self._thread.start()

    def _stop(self, wait: bool) -> None:
        """Stop the producer and drop its read-ahead batches; `wait`: until it has stopped
        (before anyone touches the loader), else at most `close_timeout`."""
        if self._queue is not None:
            self._finalizer()
            self._queue = None
            self._loader_ahead = True
        if wait and self._thread is not None:
            self._thread.join()

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._finished is not None:
            raise self._finished
        if self._queue is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, _Failure) or item is _END:
            self._finished = StopIteration() if item is _END else item.error
            self._stop(wait=True)
            self._loader_ahead = False  # nothing follows an error or the end
            raise self._finished
        batch, self._position = item
        return batch

    def close(self) -> None:
        """Stop the producer thread and drop the batches it read ahead. The position stays
        the consumer's: `state_dict()` is unchanged and iterating again goes on from the
        next batch. Waits at most `close_timeout` seconds."""
        self._stop(wait=False)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The loader's state right after the last batch the consumer took: a loader restored
        from it yields the batch after that one."""
        return copy.deepcopy(self._position.state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (a `state_dict()` of this prefetcher or of the loader): a
        running producer is stopped first and its read-ahead batches dropped."""
        self._stop(wait=True)
        self.loader.load_state_dict(copy.deepcopy(state))
        self._loader_ahead = False
        self._finished = None
        self._position = _position(self.loader)

    # -- statistics, as of the last batch taken -------------------------------------------------
    def skip_counts(self) -> Counter:
        """The loader's `skip_counts()` right after the last batch the consumer took."""
        if self._position.skipped is None:
            raise ValueError(f"{type(self.loader).__name__} keeps no skip statistics "
                             f"(it has no skip_counts())")
        return Counter(self._position.skipped)

    @property
    def truncated(self) -> int:
        """Samples truncated to fit a row, up to the last batch the consumer took."""
        if self._position.truncated is None:
            raise ValueError(f"{type(self.loader).__name__} keeps no skip statistics "
                             f"(it has no truncated count)")
        return self._position.truncated

    def skip_summary(self) -> str:
        """One line, as `PackedLoader.skip_summary`, as of the last batch the consumer took."""
        return f"{SkipStats(self.skip_counts()).summary()}; {self.truncated} samples truncated to fit"
