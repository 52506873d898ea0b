"""The folders a training run writes into (run_dir, checkpoints, profiles): checked when the
trainer is built and created before anything is written, so that a folder that cannot exist
stops the run at once, in one line, instead of at the first checkpoint hundreds of steps
later, and a refused run leaves nothing behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class FolderError(ValueError):
    """A folder of the run's config that cannot exist or cannot be written."""


def folder_problem(path: str | Path, key: str) -> str:
    """Why `path` cannot be (or become) a folder this process writes into, "" when nothing
    seen from here stops it: a file in its place or in the place of one of its parents, or a
    nearest existing folder this user may not write into. (Some refusals only show when the
    folder is made: `make_folders` says those.)"""
    nearest = Path(path)
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if nearest.exists() and not nearest.is_dir():
        where = "it is a file" if nearest == Path(path) else f"{nearest} is a file"
        return f"{key} = {str(path)!r} cannot be a folder: {where}"
    if nearest.exists() and not os.access(nearest, os.W_OK | os.X_OK):
        return f"{key} = {str(path)!r} cannot be written: {nearest} is not writable by this user"
    return ""


def check_folders(folders: dict[str, str | Path]) -> None:
    """Raise FolderError for the first of `folders` ({config key: path}) that `folder_problem`
    rules out."""
    for key, path in folders.items():
        if problem := folder_problem(path, key):
            raise FolderError(problem)


def make_folders(folders: dict[str, str | Path]) -> None:
    """Create `folders` ({config key: path}) in order. If one cannot be made, the ones this
    call created are removed again (they are still empty) and a FolderError naming the key is
    raised: a run refused here leaves no folder behind."""
    made: list[Path] = []
    try:
        for key, path in folders.items():
            missing = []
            folder = Path(path)
            while not folder.exists() and folder != folder.parent:
                missing.append(folder)
                folder = folder.parent
            try:
                Path(path).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise FolderError(f"{key} = {str(path)!r} cannot be made a folder: "
                                  f"{e.strerror or e}") from None
            made += reversed(missing)
    except FolderError:
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:
                pass  # something was written into it meanwhile: it stays
        raise


LOCK_FILE = ".lock"
"""In a run folder: locked (flock) by the run that uses it, and holding "<pid> <host>" of that
run's rank 0 for the error message."""


class RunFolderLock:
    """Rank 0's hold on its run folder (`claim_run_folder`), released by `release()` at the
    run's end, or by the kernel when the process dies (SIGKILL, a torchrun restart): a lock a
    dead run left cannot stop the next one, a recycled process id cannot fake a live one."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # (closing drops the lock)
            self._fd = None


def claim_run_folder(run_dir: str | Path, key: str = "train.run_dir") -> RunFolderLock:
    """Rank 0: lock `run_dir` for this run (an exclusive flock on run_dir/.lock, held until
    `release()`). FolderError, naming the config `key`, when another process holds it: two runs
    in one folder would delete each other's unfinished checkpoints and interleave their
    metrics. Where the file system has no locks, a warning says the folder is not guarded and
    the run goes on."""
    import fcntl
    import socket
    import warnings

    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        who = f"process {holder[0]} on {holder[1]}" if len(holder) == 2 else "another process"
        raise FolderError(f"{key} = {str(run_dir)!r} is in use by {who} (it holds {path}): two "
                          f"runs in one folder overwrite each other's checkpoints and metrics") from None
    except OSError as e:  # no locks on this file system
        os.close(fd)
        warnings.warn(f"{path} cannot be locked ({e.strerror or e}): nothing stops a second run from "
                      f"using {run_dir} at the same time", stacklevel=2)
        return RunFolderLock(path, None)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return RunFolderLock(path, fd)


@contextmanager
def hold_run_folders(folders: dict[str, Path], lead: bool) -> Iterator[None]:
    """A run's hold on its folders ({config key: path}, "train.run_dir" among them), on rank 0
    (`lead`): before anything is read or written, make the run folder and lock it (a run
    already using it stops this one), make the others, and lock a checkpoint.dir outside the
    run folder too; the locks are released when the block ends, however it ends."""
    locks: list[RunFolderLock] = []
    try:
        if lead:
            run_dir = folders["train.run_dir"]
            make_folders({"train.run_dir": run_dir})
            locks.append(claim_run_folder(run_dir))
            make_folders(folders)
            checkpoints = folders.get("checkpoint.dir")
            if checkpoints is not None and Path(run_dir).resolve() not in Path(checkpoints).resolve().parents:
                locks.append(claim_run_folder(checkpoints, key="checkpoint.dir"))
        yield
    finally:
        for lock in locks:
            lock.release()
