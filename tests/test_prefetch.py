"""The background prefetcher: the same batches as the plain loader, the consumer's position for
exact resume while the producer runs ahead, restarts (load_state_dict, close), producer errors
raised in the consumer, the end of a finite loader, prompt shutdown (close, garbage collection,
interpreter exit), and the trainer with prefetching on against off."""

import gc
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections import Counter
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from emu2_engine.data.batch import PackedBatch
from emu2_engine.data.loader import build_loader
from emu2_engine.data.prefetch import Prefetcher, pin_batch
from emu2_engine.data.shards import DataError
from emu2_engine.data.tokenizer import Emu2Tokenizer
from emu2_engine.train.config import JobConfig

REPO = Path(__file__).resolve().parent.parent
# the debug model on the shapes world, with rows small enough that a batch takes milliseconds
TINY = ["--data.seq_len=128", "--data.rows=2", "--data.max_images=8", "--data.text_len=128",
        "--data.interleaved_len=128"]


@pytest.fixture(scope="module")
def job():
    return JobConfig.load(None, TINY)


@pytest.fixture(scope="module")
def tok():
    return Emu2Tokenizer()


@pytest.fixture(scope="module")
def reference(job, tok):
    """The first 8 batches of the plain loader."""
    loader = build_loader(job.data, tok, job.model.build_config())
    return [next(loader) for _ in range(8)]


def new_loader(job, tok):
    return build_loader(job.data, tok, job.model.build_config())


def assert_same_batch(got: PackedBatch, want: PackedBatch) -> None:
    for f in fields(PackedBatch):
        a, b = getattr(got, f.name), getattr(want, f.name)
        assert (a is None and b is None) or torch.equal(a, b), f.name


def wait_until(condition, what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds} s"
        time.sleep(0.005)


def producer_is_ahead(prefetcher: Prefetcher) -> bool:
    """The queue is full: the producer has built `depth` batches the consumer has not taken."""
    return prefetcher._queue is not None and prefetcher._queue.full()


class CountingLoader:
    """An endless loader of 1-element tensors 0, 1, 2, ... with a position and statistics
    (one "odd" skip per odd batch, one truncation per batch); `fail_at` raises there, `end_at`
    ends there, and each batch takes `seconds`."""

    def __init__(self, fail_at: int | None = None, end_at: int | None = None, seconds: float = 0.0):
        self.position, self.fail_at, self.end_at, self.seconds = 0, fail_at, end_at, seconds
        self.odd = 0

    def __next__(self) -> torch.Tensor:
        time.sleep(self.seconds)
        if self.position == self.end_at:
            raise StopIteration
        if self.position == self.fail_at:
            raise_bad_shard(self.position)
        batch = torch.tensor([self.position])
        self.odd += self.position % 2
        self.position += 1
        return batch

    @property
    def truncated(self) -> int:
        return self.position

    def skip_counts(self) -> Counter:
        return Counter({"odd": self.odd})

    def state_dict(self) -> dict:
        return {"position": self.position, "odd": self.odd}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.odd = state["position"], state["odd"]


def raise_bad_shard(position: int):
    raise ValueError(f"shard 7 is not a tar (at batch {position})")


def test_prefetched_batches_equal_the_loaders(job, tok, reference):
    """depth 1 and 3: every field of every batch equals the plain loader's."""
    for depth in (1, 3):
        with Prefetcher(new_loader(job, tok), depth=depth) as prefetcher:
            for want in reference:
                assert_same_batch(next(prefetcher), want)


def test_state_after_k_batches_resumes_at_k_plus_1(job, tok, reference):
    """The consumer takes k = 3 batches while the producer fills its queue beyond them: the
    prefetcher's state (not the loader's, which is 3 batches further) restores a fresh loader
    that yields batch k + 1 onward. Before any batch the state is the construction state."""
    k = 3
    loader = new_loader(job, tok)
    prefetcher = Prefetcher(loader, depth=2)
    fresh = new_loader(job, tok)
    fresh.load_state_dict(prefetcher.state_dict())
    assert_same_batch(next(fresh), reference[0])

    for want in reference[:k]:
        assert_same_batch(next(prefetcher), want)
    wait_until(lambda: producer_is_ahead(prefetcher), "the producer filling its queue")
    state = prefetcher.state_dict()
    prefetcher.close()
    assert not prefetcher._thread.is_alive()
    assert state != loader.state_dict()  # the loader itself has read ahead

    fresh = new_loader(job, tok)
    fresh.load_state_dict(state)
    for want in reference[k:]:
        assert_same_batch(next(fresh), want)


def test_load_state_dict_while_running_and_iterating_after_close(job, tok, reference):
    """load_state_dict with the producer ahead restarts it from the loaded state; close()
    drops the read-ahead batches but iterating again continues with the next batch."""
    prefetcher = Prefetcher(new_loader(job, tok), depth=2)
    saved = None
    for i, want in enumerate(reference[:5]):
        assert_same_batch(next(prefetcher), want)
        if i == 1:
            saved = prefetcher.state_dict()
    wait_until(lambda: producer_is_ahead(prefetcher), "the producer filling its queue")
    prefetcher.load_state_dict(saved)  # back to after batch 2
    assert_same_batch(next(prefetcher), reference[2])
    assert_same_batch(next(prefetcher), reference[3])
    wait_until(lambda: producer_is_ahead(prefetcher), "the producer filling its queue")
    prefetcher.close()
    assert not prefetcher._thread.is_alive()
    for want in reference[4:]:
        assert_same_batch(next(prefetcher), want)
    prefetcher.close()


def test_statistics_are_those_of_the_consumed_batches():
    """Skip counts and truncations as of the last batch taken, though the producer has built
    more; and in PackedLoader's summary format."""
    loader = CountingLoader()
    prefetcher = Prefetcher(loader, depth=3)
    assert prefetcher.skip_counts() == Counter({"odd": 0}) and prefetcher.truncated == 0
    assert [next(prefetcher).item() for _ in range(4)] == [0, 1, 2, 3]
    wait_until(lambda: producer_is_ahead(prefetcher), "the producer filling its queue")
    assert loader.position >= 7
    assert prefetcher.skip_counts() == Counter({"odd": 2}) and prefetcher.truncated == 4
    assert prefetcher.skip_summary() == "skipped samples: odd=2; 4 samples truncated to fit"
    prefetcher.close()


def test_a_producer_exception_reaches_the_consumer_with_its_traceback():
    """The batches before the failure arrive, then next() raises the loader's own exception,
    whose traceback holds the producer's frames, and raises it again on every later call."""
    prefetcher = Prefetcher(CountingLoader(fail_at=2), depth=2)
    assert [next(prefetcher).item() for _ in range(2)] == [0, 1]
    with pytest.raises(ValueError, match=r"shard 7 is not a tar \(at batch 2\)") as caught:
        next(prefetcher)
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert "raise_bad_shard" in frames and "__next__" in frames
    assert not prefetcher._thread.is_alive()
    with pytest.raises(ValueError, match="shard 7"):
        next(prefetcher)


def test_a_broken_shard_set_raises_in_the_consumer(job, tok, tmp_path):
    """A real configuration error that only shows when data is read (the one shard is not a
    tar, so the epoch gives no sample): the loader's DataError reaches the trainer's side."""
    (tmp_path / "a.tar").write_bytes(bytes(range(256)) * 12)
    data = JobConfig.load(None, TINY + ['--data.datasets=["image_text"]', "--data.weights=[1.0]",
                                        f'--data.paths=["{tmp_path}"]']).data
    prefetcher = Prefetcher(build_loader(data, tok, job.model.build_config()))
    with pytest.raises(DataError, match=r"gave no usable sample \(skipped samples: truncated_tar=1\)"):
        next(prefetcher)


def test_a_finite_loader_ends_the_prefetcher():
    prefetcher = Prefetcher(CountingLoader(end_at=3), depth=2)
    assert [b.item() for b in prefetcher] == [0, 1, 2]
    with pytest.raises(StopIteration):
        next(prefetcher)


def test_close_and_garbage_collection_stop_the_thread_quickly():
    """A producer blocked on its full queue stops within a fraction of a second after close();
    so does one whose prefetcher is garbage collected without close()."""
    prefetcher = Prefetcher(CountingLoader(), depth=2)
    next(prefetcher)
    wait_until(lambda: producer_is_ahead(prefetcher), "the producer filling its queue")
    start = time.monotonic()
    prefetcher.close()
    assert time.monotonic() - start < 1.0 and not prefetcher._thread.is_alive()

    prefetcher = Prefetcher(CountingLoader(), depth=2)
    next(prefetcher)
    thread = prefetcher._thread
    del prefetcher
    gc.collect()
    thread.join(2.0)
    assert not thread.is_alive()


def test_a_producer_stuck_in_the_loader_does_not_hang_the_interpreter_exit():
    """The loader blocks forever while the program ends: the exit-time close waits
    close_timeout (0.2 s), warns, and the process exits with status 0."""
    program = textwrap.dedent("""
        import threading
        from emu2_engine.data.prefetch import Prefetcher

        entered = threading.Event()

        class Stuck:
            def __next__(self):
                entered.set()
                threading.Event().wait()
            def state_dict(self):
                return {}
            def load_state_dict(self, state):
                pass

        prefetcher = Prefetcher(Stuck(), close_timeout=0.2)
        threading.Thread(target=next, args=(prefetcher,), daemon=True).start()
        entered.wait()
        print("started", flush=True)
    """)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "started\n"
    assert "still building a batch" in proc.stderr
    assert time.monotonic() - start < 30


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"prefetch depth must be an integer >= 1, got 0"):
        Prefetcher(CountingLoader(), depth=0)
    with pytest.raises(ValueError, match=r"close_timeout must be a positive number of seconds, got 0"):
        Prefetcher(CountingLoader(), close_timeout=0)
    with pytest.raises(ValueError, match=r"list has no state_dict\(\)"):
        Prefetcher([1, 2, 3])
    with pytest.raises(ValueError, match=r"data.prefetch must be >= -1 \(-1 = auto, 0 = off\), got -2"):
        JobConfig.load(None, ["--data.prefetch=-2"]).validate(world_size=1)


def test_auto_depth_is_on_for_cuda_only():
    """-1 (the default): read ahead on a GPU, not on the CPU, where the thread slows the model."""
    from emu2_engine.data.prefetch import AUTO_DEPTH, prefetch_depth

    assert prefetch_depth(-1, torch.device("cuda")) == AUTO_DEPTH == 2
    assert prefetch_depth(-1, torch.device("cpu")) == 0
    assert prefetch_depth(3, torch.device("cpu")) == 3 and prefetch_depth(0, torch.device("cuda")) == 0
    assert JobConfig.load(None).data.prefetch == -1


def test_trainer_with_prefetching_matches_without(tmp_path):
    """Three steps of two micro-batches with data.prefetch = 2 and = 0: the same losses and
    gradient norms bit for bit, and the prefetching trainer leaves no thread running."""
    from emu2_engine.train.trainer import Trainer

    def run(name: str, prefetch: int) -> tuple[list, Trainer]:
        cfg = JobConfig.load(None, TINY + [
            f"--train.run_dir={tmp_path / name}", "--train.steps=3", "--parallel.microbatches=2",
            "--optim.warmup_steps=1", "--train.eval_batches=0", "--metrics.tensorboard=false",
            "--metrics.log_interval=1", f"--data.prefetch={prefetch}"])
        trainer = Trainer(cfg)
        records = trainer.train(progress=False)
        return [(r["loss"], r["grad_norm"]) for r in records if "loss" in r], trainer

    with_prefetch, trainer = run("on", 2)
    without, _ = run("off", 0)
    assert isinstance(trainer.loader, Prefetcher) and len(with_prefetch) == 3
    assert with_prefetch == without
    assert not trainer.loader._thread.is_alive()


def test_a_close_that_times_out_is_waited_out_before_the_loader_is_touched(caplog):
    """close() gives up on a producer busy in a slow batch (and says so); the next
    load_state_dict waits for that producer to finish before loading, so the loader ends up
    exactly at the loaded state, and iteration goes on from it."""
    loader = CountingLoader(seconds=0.5)
    prefetcher = Prefetcher(loader, depth=1, close_timeout=0.02)
    assert next(prefetcher).item() == 0
    prefetcher.close()  # the producer is in the middle of batch 1 or 2
    assert prefetcher._thread.is_alive() and "still building a batch" in caplog.text
    prefetcher.load_state_dict({"position": 5, "odd": 2})
    assert not prefetcher._thread.is_alive() and loader.position == 5
    assert next(prefetcher).item() == 5
    prefetcher.close()


@pytest.mark.gpu
def test_batches_are_pinned_for_a_cuda_device(job, tok, reference):
    """With a CUDA device every tensor of a batch is page-locked, with the same values."""
    with Prefetcher(new_loader(job, tok), device="cuda") as prefetcher:
        batch = next(prefetcher)
    assert_same_batch(batch, reference[0])
    assert all(getattr(batch, f.name).is_pinned() for f in fields(PackedBatch)
               if getattr(batch, f.name) is not None)
    assert pin_batch(torch.ones(2)).is_pinned()
