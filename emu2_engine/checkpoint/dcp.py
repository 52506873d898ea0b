"""Training checkpoints with torch.distributed.checkpoint (DCP): everything that has state.

A checkpoint is one folder per step, ``<dir>/step-000123``, holding DCP's files (one or more
``.distcp`` data files per rank and the ``.metadata`` index, written last). It contains:

- ``model`` and ``optimizer``: through `get_state_dict` / `set_state_dict`
  (torch.distributed.checkpoint.state_dict), so FSDP2 / DTensor parameters are saved as
  shards and load into any sharding of the same model; optimiser states and the
  parameter groups' settings are keyed by parameter name, not by position (pipeline ranks
  hold different groups);
- ``scheduler``: any object with ``state_dict``/``load_state_dict`` (an LR scheduler);
- ``dataloader``: one entry per data-parallel rank (``dp0of2``: the ranks of one tensor- or
  pipeline-parallel group read the same batches), or per rank without a `data_rank`;
- ``rng``: one entry per rank: Python's, NumPy's and torch's CPU generator, and every CUDA
  device's when CUDA is initialised;
- ``train``: the step and the world size that saved it;
- any `extra` entries (the trainer's count of non-finite steps).

Writes are atomic: every rank writes into ``step-000123.tmp``; once DCP has written the index
(its last collective has returned on every rank) and a barrier has passed, rank 0 renames the
folder. `latest` therefore never sees a half-written checkpoint, and a crash leaves only a
``.tmp`` folder, which the next save removes. After each rename, rank 0 deletes the oldest
complete checkpoints beyond the newest `keep`. All ranks must see one shared filesystem.

A run resumed from an older checkpoint (load step 100 while step 200 exists) starts a new
history: when it saves step s, the complete checkpoints of steps after s belong to the
abandoned one. They are renamed ``abandoned-step-000200`` (kept on disk, never deleted by
retention, ignored by `latest` so ``resume=auto`` continues the new history), and retention
counts only steps up to s, so it never deletes the checkpoint just written.

With ``async_save=True``, `save` returns once the state is staged in host memory and a
background thread writes it (over a separate gloo group, so it never interleaves with the
training's collectives); the next `save` (or `wait`) waits for it first, and rank 0 renames
the folder as soon as its write completes.

Resume is exact when the layout is unchanged: the next steps see the same parameters,
optimiser moments, learning rate, batches and random numbers as an uninterrupted run. Another
layout restores the model, optimiser, scheduler and step (DCP reshards them); the data
position too when the data-parallel degree is the same (each rank then reads on from where
its data-parallel rank stopped), and the RNG states when the world size is the same. What is
not restored is named in a warning.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import threading
import warnings
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from emu2_engine.checkpoint.released import grow_rows, may_grow

log = logging.getLogger(__name__)

_STEP = re.compile(r"^step-(\d+)$")
_TMP = ".tmp"
_INDEX = ".metadata"  # DCP's index, written after every rank's data
_ABANDONED = "abandoned-"  # prefix of checkpoints of steps after the one a run resumed from
RESUMED_FROM = "resumed_from.json"
"""In a checkpoint directory: the named checkpoint (checkpoint.resume = <folder>) that the run
saving into it started from, written with the first checkpoint the run completes after it."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not match what loads it."""


class HasState(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def step_folder(directory: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lives (``step-000123``)."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return Path(directory) / f"step-{step:06d}"


def complete_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in `directory`, oldest first: folders named
    ``step-<n>`` that hold DCP's index. Temporary folders of unfinished saves are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _STEP.match(path.name)
        if match and path.is_dir() and (path / _INDEX).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in `directory`, or None if there is none."""
    found = complete_checkpoints(directory)
    return found[-1][1] if found else None


def _set_aside(path: Path) -> Path:
    """Rename the checkpoint folder ``step-000200`` to ``abandoned-step-000200`` (or
    ``abandoned-step-000200-2``, ... if that name is taken): `latest` and retention no longer
    see it, and its data stays on disk for whoever wants it back (rename it, or delete it)."""
    target = path.with_name(_ABANDONED + path.name)
    copy = 2
    while target.exists():
        target = path.with_name(f"{_ABANDONED}{path.name}-{copy}")
        copy += 1
    log.warning("checkpoint %s is newer than the step being saved (the run resumed from an "
                "older checkpoint): moved aside to %s", path, target.name)
    path.rename(target)
    return target


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier(group: dist.ProcessGroup | None = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized, assuming")
"""DCP warns on every call made without a process group, an asynchronous save's writer thread
too (outside any `_single_process_ok`); one process saving is intended here."""


@contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns on every call made without a process group; here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized, assuming")
        yield


_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
"""Optimiser entries keyed by parameter name, the parameter groups' settings included
(``param_groups.<name>.lr``). Unflattened, the groups are a list saved by position: pipeline
ranks hold different groups at the same positions, DCP keeps one rank's copy of each key, and
after a resume the other ranks' groups lack their settings (AdamW's first step then fails with
KeyError: 'betas')."""


_GROUPS_BY_POSITION = re.compile(r"^app\.optimizer\.param_groups\.\d+\.params$")
"""The list of a group's parameters, which checkpoints written before `_FLAT` hold for each
group (by position); flattened groups have none (their entries are per parameter name, which
may start with a digit: ``param_groups.0.weight.lr`` of an nn.Sequential)."""


def _placed_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full`, which every rank read whole, laid out as `like` is: each rank cuts its own part
    out (``src_data_rank=None``: no scatter, which also fails for uneven strided shards, as a
    vocabulary's under TP x FSDP)."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


class _ModelAndOptimizer(Stateful):
    """Model and optimiser state as DCP sees them: named, and sharded where the parameters are.

    A DTensor split by `_StridedShard` (the ViT's fused qkv under tensor parallelism: each rank
    holds a third of q, of k and of v; under FSDP too, which then splits dim 1) is not one
    contiguous chunk, which DCP's save plan cannot describe (with FSDP's Shard(1) beside it,
    DCP wrote overlapping chunks and loaded rows into the wrong places); it is saved whole
    (gathered, one tensor at a time, onto the CPU) and each rank cuts its part out again when
    it is loaded."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 grow: dict[str, int] | None = None):
        self.model, self.optimizer = model, optimizer
        self.options = _FLAT  # `Checkpointer.load` reads checkpoints of the earlier layout unflattened
        self._gathered: dict[tuple[str, ...], DTensor] = {}  # path -> the DTensor it came from
        # model entries read with fewer rows than the model's (saved rows), grown when loaded
        self.grow = grow or {}
        self._grown: dict[str, torch.Tensor] = {}  # name -> the model's tensor it fills

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            state = {"model": get_model_state_dict(self.model)}
        else:
            model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.options)
            state = {"model": model_state, "optimizer": optim_state}
        self._gathered.clear()
        self._grown.clear()
        for name, rows in self.grow.items():
            if name in state["model"]:  # a pipeline rank may not hold it
                like = self._grown[name] = state["model"][name]
                state["model"][name] = torch.empty((rows, *like.shape[1:]), dtype=like.dtype)
        return self._gather_strided(state, ())

    def _gather_strided(self, node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: self._gather_strided(v, path + (k,)) for k, v in node.items()}
        if isinstance(node, DTensor) and any(isinstance(p, _StridedShard) for p in node.placements):
            self._gathered[path] = node
            return node.full_tensor().cpu()  # every rank the same: DCP writes it once
        return node

    def _split_gathered(self, state: dict[str, Any]) -> dict[str, Any]:
        for path, like in self._gathered.items():
            parent = state
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = _placed_like(parent[path[-1]], like)
        return state

    def _grow(self, state: dict[str, Any]) -> dict[str, Any]:
        """The entries read with fewer rows, grown (`grow_rows`) and placed as the model's are."""
        for name, like in self._grown.items():
            state["model"][name] = _placed_like(grow_rows(state["model"][name], like.shape[0]), like)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = self._grow(self._split_gathered(state))
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=self.options)


def rng_state() -> dict[str, Any]:
    """This process's random generators: Python, NumPy, torch CPU and (if initialised) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _PerRank(Stateful):
    """One entry per rank under a shared key: DCP keeps one copy of entries that every rank
    saves under the same name, so per-rank state (RNG, the rank's data position) is named by
    rank. Each entry is one pickled blob: DCP loads into a template of the same structure,
    and a data loader's state may change shape from step to step."""

    def __init__(self, get, put, key: str | None = None):
        self.get, self.put, self.key = get, put, key

    def name(self) -> str:
        """This rank's entry: `key`, or ``rank<r>``."""
        return self.key or f"rank{_rank()}"

    def state_dict(self) -> dict[str, bytes]:
        return {self.name(): pickle.dumps(self.get())}

    def load_state_dict(self, state: dict[str, bytes]) -> None:
        self.put(pickle.loads(state[self.name()]))


class Checkpointer:
    """Saves and restores the whole training state under one directory.

    Call `save(step)` on every rank, `load()` on every rank to resume from the newest complete
    checkpoint (or `load(step)` / `load(path)` for a given one), and `wait()` before exiting
    when saving asynchronously."""

    def __init__(self, directory: str | Path, model: nn.Module,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: HasState | None = None,
                 dataloader: HasState | None = None, keep: int = 3, async_save: bool = False,
                 data_rank: tuple[int, int] | None = None, extra: dict[str, HasState] | None = None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the newest checkpoint is always kept), got {keep}")
        if data_rank is not None and not 0 <= data_rank[0] < data_rank[1]:
            raise ValueError(f"data_rank must be (dp_rank, dp) with 0 <= dp_rank < dp, got {data_rank}")
        extra = dict(extra or {})
        taken = {"app", "train", "rng", "scheduler", "dataloader"} & set(extra)
        if taken:
            raise ValueError(f"extra state names {sorted(taken)} are the checkpoint's own entries")
        for name, obj in (("scheduler", scheduler), ("dataloader", dataloader), *extra.items()):
            if obj is not None and not (callable(getattr(obj, "state_dict", None))
                                        and callable(getattr(obj, "load_state_dict", None))):
                raise ValueError(f"{name} must have state_dict() and load_state_dict(), "
                                 f"got {type(obj).__name__}")
        self.directory = Path(directory)
        self.model, self.optimizer = model, optimizer
        self.scheduler, self.dataloader = scheduler, dataloader
        # The data position is per data-parallel rank (the ranks of one tensor- or pipeline-
        # parallel group read the same batches), so a checkpoint restores it into any layout
        # with the same data-parallel degree.
        self._data_key = None if data_rank is None else f"dp{data_rank[0]}of{data_rank[1]}"
        self.extra = extra
        self.keep, self.async_save = keep, async_save
        self.resumed_from: Path | None = None
        """The named checkpoint this run loaded (`load(path)`), until its first save here records
        it (`RESUMED_FROM`)."""
        self._pending: tuple[Future, Path] | None = None
        self._published = threading.Event()  # rank 0: the pending save is renamed (or failed)
        self._failed: BaseException | None = None
        # Async writes run their collectives in a background thread: on their own gloo group,
        # so they never interleave with the training's NCCL (or gloo) collectives.
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    # -- the state ------------------------------------------------------------------------
    def _state(self, step: int) -> dict[str, Any]:
        state: dict[str, Any] = {"app": _ModelAndOptimizer(self.model, self.optimizer),
                                 "train": {"step": step, "world_size": _world()},
                                 "rng": _PerRank(rng_state, set_rng_state)}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler
        if self.dataloader is not None:
            state["dataloader"] = _PerRank(self.dataloader.state_dict, self.dataloader.load_state_dict,
                                           key=self._data_key)
        state.update(self.extra)
        return state

    # -- saving ---------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        """Write the checkpoint of `step` (on every rank); returns its final folder. With async
        saving the folder appears when the background write completes."""
        self.wait()
        final = step_folder(self.directory, step)
        tmp = final.with_name(final.name + _TMP)
        if _rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(f"step-*{_TMP}"):  # unfinished saves (a crash)
                shutil.rmtree(stale)
        _barrier()
        kwargs = {"checkpoint_id": str(tmp), "no_dist": not dist.is_initialized()}
        if self.async_save:
            with _single_process_ok():
                response = dcp.async_save(self._state(step), process_group=self._group, **kwargs)
            future = getattr(response, "upload_completion", response)  # AsyncSaveResponse or Future
            self._published.clear()
            self._pending = (future, tmp)
            if _rank() == 0:
                future.add_done_callback(lambda f: self._finish_async(f, tmp, final))
            return final
        try:
            with _single_process_ok():
                dcp.save(self._state(step), **kwargs)
        except (Exception, dcp.CheckpointException) as err:  # the latter is a BaseException
            raise CheckpointError(f"saving the checkpoint of step {step} to {tmp} failed: {_reason(err)}") from err
        _barrier()  # every rank has written, and DCP's index exists
        if _rank() == 0:
            self._finalize(tmp, final)
        _barrier()  # nobody goes on before the folder has its final name
        return final

    def _finalize(self, tmp: Path, final: Path) -> None:
        """Rank 0: publish a written checkpoint, set aside those of later steps (a run resumed
        from an older checkpoint abandoned them), then drop the oldest beyond `keep`; the
        folder just written is never dropped. A checkpoint of the same step saved earlier is
        replaced only now that the new one is complete."""
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        step = int(_STEP.match(final.name).group(1))
        kept = []
        for saved_step, path in complete_checkpoints(self.directory):
            if saved_step > step:
                _set_aside(path)
            else:
                kept.append(path)
        for old in kept[:-self.keep]:  # `final` is the newest of `kept`: never dropped
            shutil.rmtree(old)
        if self.resumed_from is not None:  # this directory's checkpoints now continue that one
            marker = self.directory / RESUMED_FROM
            tmp_marker = marker.with_name(marker.name + _TMP)
            tmp_marker.write_text(json.dumps({"resumed_from": str(self.resumed_from)}) + "\n")
            os.replace(tmp_marker, marker)
            self.resumed_from = None

    def _finish_async(self, future: Future, tmp: Path, final: Path) -> None:
        # Rank 0's write completes only after DCP's coordinator (rank 0) has gathered every
        # rank's write results and written the index: the checkpoint is whole.
        try:
            future.result()
            self._finalize(tmp, final)
        except BaseException as err:  # reported by wait(), in the training thread
            self._failed = err
        finally:
            self._published.set()

    def wait(self, barrier: bool = True) -> None:
        """Block until the pending asynchronous save (if any) is written and published; raise
        CheckpointError if it failed. `barrier=False` when this rank is leaving on an error:
        its own write still completes (every rank started it), but it does not wait for ranks
        that may be stuck in a training collective waiting for it (the job would hang instead
        of ending, and torchrun could not restart it)."""
        if self._pending is None:
            return
        future, tmp = self._pending
        self._pending = None
        error = future.exception()
        if _rank() == 0:
            self._published.wait()
            error = error or self._failed
            self._failed = None
        if barrier:
            _barrier(self._group)
        if error is not None:
            raise CheckpointError(f"asynchronous save to {tmp} failed: {error}") from error

    # -- loading --------------------------------------------------------------------------
    def continues(self, named: str | Path) -> Path | None:
        """This directory's newest complete checkpoint when a run that started from the named
        checkpoint `named` has saved here since (`RESUMED_FROM` names it): running the same
        command again (a torchrun restart, a requeue, after a SIGTERM stop) goes on from there,
        not back to `named`. None otherwise."""
        try:
            recorded = json.loads((self.directory / RESUMED_FROM).read_text())["resumed_from"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        newest = latest(self.directory)
        return newest if newest is not None and Path(recorded) == Path(named).resolve() else None

    def load(self, checkpoint: int | str | Path | None = None) -> int | None:
        """Restore the state from a checkpoint and return its step.

        checkpoint: a step of this directory, a checkpoint folder, or None for the newest
        complete checkpoint of this directory (returns None when there is none: a fresh run)."""
        self.wait()
        if checkpoint is None:
            path = latest(self.directory)
            if path is None:
                return None
        elif isinstance(checkpoint, int):
            path = step_folder(self.directory, checkpoint)
        else:
            path = Path(checkpoint)
            self.resumed_from = path.resolve()
        if not (path / _INDEX).is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {_INDEX}: missing, or "
                                  f"its save did not finish)")
        keys = self._saved_keys(path)  # (first: an unreadable index fails here without DCP's logging)
        saved = self._saved_world_size(path)
        state = self._state(step=-1)
        if any(_GROUPS_BY_POSITION.match(k) for k in keys):  # saved before the groups were keyed by name
            state["app"].options = StateDictOptions()
        not_restored = []
        if saved != _world() or f"rng.{state['rng'].name()}" not in keys:
            state.pop("rng")
            not_restored.append(f"the RNG states (saved by {saved} rank{'s' if saved != 1 else ''}, "
                                f"loaded by {_world()})")
        data = state.get("dataloader")
        if data is not None and f"dataloader.{data.name()}" not in keys:
            if data.key is not None and saved == _world() and f"dataloader.rank{_rank()}" in keys:
                data.key = None  # saved per rank (before the positions were per data-parallel rank)
            else:
                state.pop("dataloader")
                saved_data = sorted(k.split(".", 1)[1] for k in keys if k.startswith("dataloader."))
                not_restored.append(f"the data position (this rank reads {data.name()}, the checkpoint "
                                    f"holds {', '.join(saved_data) or 'none'}: another data-parallel "
                                    f"degree, so samples may repeat or be skipped)")
        for name in self.extra:
            if not any(k.startswith(f"{name}.") for k in keys):
                state.pop(name)
                not_restored.append(f"{name!r} (not in the checkpoint)")
        if not_restored:
            log.warning("checkpoint %s: the model, optimiser, scheduler and step are restored; not "
                        "restored: %s. The run continues, but not bit for bit as the saved one would.",
                        path, "; ".join(not_restored))
        try:
            with _single_process_ok():
                dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        except (Exception, dcp.CheckpointException) as err:  # the latter is a BaseException
            reason = _reason(err)
            hint = ""
            if "app.optimizer." in reason:  # the weights match, the optimiser's parameters do not
                hint = (" (the optimiser of the checkpoint holds other parameters than this run trains, "
                        "e.g. a frozen encoder: to start from its weights alone with a fresh optimiser, "
                        "use checkpoint.init_from)")
            raise CheckpointError(f"cannot load checkpoint {path} into this model: {reason}{hint}") from err
        return int(state["train"]["step"])

    @staticmethod
    def _saved_keys(path: Path) -> set[str]:
        """The flattened names of the entries the checkpoint holds (``dataloader.dp0of2``)."""
        try:
            return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        except Exception as err:  # noqa: BLE001 - any unreadable index is the same problem
            raise CheckpointError(f"cannot read checkpoint {path} (corrupt, or not written by this engine): "
                                  f"its index: {_reason(err)}") from err

    @staticmethod
    def _saved_world_size(path: Path) -> int:
        probe = {"train": {"step": -1, "world_size": -1}}
        try:
            with _single_process_ok():  # every rank reads the small entry by itself
                dcp.load(probe, checkpoint_id=str(path), no_dist=True)
        except (Exception, dcp.CheckpointException) as err:
            raise CheckpointError(f"cannot read checkpoint {path} (corrupt, or not written by "
                                  f"this engine): {_reason(err)}") from err
        return int(probe["train"]["world_size"])


def _reason(err: BaseException) -> str:
    """The line that says what went wrong: DCP wraps each rank's exception with its whole
    traceback, whose last "...Error: ..." line is the message."""
    lines = [line.strip() for line in (str(err).strip() or type(err).__name__).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line]
    return (errors or lines)[-1][:500]


def is_checkpoint_folder(path: str | Path) -> bool:
    """Whether `path` is a complete checkpoint folder (DCP's index written: its save finished)."""
    return (Path(path) / _INDEX).is_file()


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The model entries of the complete checkpoint folder `path`, by name, with their global
    shapes (DCP's metadata alone; no tensor is read)."""
    path = Path(path)
    if not (path / _INDEX).is_file():
        what = ("does not exist" if not path.exists() else
                f"has no {_INDEX} (not a checkpoint, or its save did not finish)")
        raise CheckpointError(f"{path} is not a complete checkpoint folder: it {what}")
    prefix = "app.model."
    try:
        return {key[len(prefix):]: tuple(meta.size) for key, meta in
                dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata.items()
                if key.startswith(prefix) and hasattr(meta, "size")}
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt, or not written by this "
                              f"engine): {_reason(err)}") from err


def load_model_weights(path: str | Path, model: nn.Module, strict: bool = True,
                       grow: dict[str, int] | None = None) -> int:
    """Load only the model entries of the complete checkpoint folder `path` (``step-000123``,
    as `Checkpointer.save` or `save_model_weights` writes it) into `model`, and return the
    checkpoint's step: for sampling or evaluating a trained model, or for starting a new run
    from one (`checkpoint.init_from`), with no optimiser, schedule or data state.

    `model` may be plain in one process, or sharded or one pipeline rank's stages under torch
    distributed (call it on every rank then): DCP reshards the saved tensors into it. The
    entries are the ``app.model.*`` keys of `_ModelAndOptimizer(model, None)`, the names the
    Checkpointer saved. Every key and (global) shape of `model` is compared with the checkpoint
    first; with `strict`, tensors the checkpoint holds beyond `model`'s are refused too (a
    pipeline rank holds only its stages: pass strict=False). A missing or incomplete folder,
    or a checkpoint of another model (one CheckpointError listing the missing, unexpected and
    wrongly shaped tensors), loads nothing.

    `grow` maps a model name to the row count the checkpoint may hold for it when the model
    has more (a vocabulary grown by tokens appended at its end, as Emu2-Chat's two over
    Emu2's): every rank reads those rows whole and takes its shard of them grown by
    `grow_rows`."""
    path = Path(path)
    saved = checkpoint_shapes(path)
    # global shapes (a DTensor's .shape) without `app.state_dict()`'s gathers: DCP's load
    # builds that once itself
    want = {name: tuple(t.shape) for name, t in get_model_state_dict(model).items()}
    grown = {name: saved[name][0] for name, shape in want.items()
             if name in saved and may_grow(name, saved[name], shape, grow)}
    app = _ModelAndOptimizer(model, None, grow=grown)
    problems = {
        "missing": [f"{name} {shape}" for name, shape in want.items() if name not in saved],
        "unexpected": [name for name in saved if name not in want] if strict else [],
        "wrong shape": [f"{name}: saved {saved[name]}, model {shape}" for name, shape in want.items()
                        if name in saved and saved[name] != shape and name not in grown]}
    message = ""
    if any(problems.values()):
        listed = "".join(f"\n  {kind} ({len(items)}): " + ", ".join(items[:6])
                         + (" ..." if len(items) > 6 else "") for kind, items in problems.items() if items)
        message = (f"checkpoint {path} holds another model ({len(saved)} tensors; this "
                   f"{type(model).__name__} has {len(want)}); nothing was loaded:{listed}")
    if dist.is_initialized():  # ranks holding other stages may all match: every rank stops, or none
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        first = next((m for m in messages if m), "")
        message = message or (f"rank {messages.index(first)}: {first}" if first else "")
    if message:
        raise CheckpointError(message)
    state = {"app": app, "train": {"step": -1, "world_size": -1}}
    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (Exception, dcp.CheckpointException) as err:
        raise CheckpointError(f"cannot load the model of checkpoint {path}: {_reason(err)}") from err
    return int(state["train"]["step"])


def save_model_weights(model: nn.Module, path: str | Path, step: int = 0) -> Path:
    """Write `model`'s weights alone (one process, no optimiser) as a checkpoint folder that
    `load_model_weights` and a run's `checkpoint.init_from` read in any parallel layout: into
    ``<path>.tmp``, renamed to `path` once complete. An existing `path` is refused."""
    path = Path(path)
    if dist.is_initialized():
        raise ValueError("save_model_weights writes from one process; a run saves with its Checkpointer")
    if path.exists():
        raise FileExistsError(f"{path} exists: choose a new folder for the checkpoint")
    tmp = path.with_name(path.name + _TMP)
    if tmp.exists():
        shutil.rmtree(tmp)
    state = {"app": _ModelAndOptimizer(model, None), "train": {"step": step, "world_size": 1}}
    with _single_process_ok():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=True)
    tmp.rename(path)
    return path
