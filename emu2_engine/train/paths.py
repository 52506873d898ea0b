"""The folders a training run writes into (run_dir, checkpoints, profiles): checked when the
trainer is built and created before anything is written, so that a folder that cannot exist
stops the run at once, in one line, instead of at the first checkpoint hundreds of steps
later, and a refused run leaves nothing behind."""

from __future__ import annotations

import os
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
"""In a run folder while a run uses it: "<pid> <host>" of its rank 0."""


def claim_run_folder(run_dir: str | Path) -> Path:
    """Rank 0: mark `run_dir` as used by this process (run_dir/.lock) and return the mark, which
    `release_run_folder` removes at the run's end. FolderError when a live process of this host
    holds it: two runs in one folder would delete each other's unfinished checkpoints and
    interleave their metrics. A mark left by a process that is gone (killed, or restarted by
    torchrun --max-restarts) or by this process is taken over; one from another host cannot be
    checked and is taken over with a warning (a restarted job's rank 0 may land elsewhere)."""
    import socket
    import warnings

    lock = Path(run_dir) / LOCK_FILE
    host, pid = socket.gethostname(), os.getpid()
    mark = f"{pid} {host}\n"
    try:  # no mark yet: made in one step, so that of two runs starting together one sees the other's
        with os.fdopen(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as f:
            f.write(mark)
        return lock
    except FileExistsError:
        pass
    try:
        held = lock.read_text().split()
    except (FileNotFoundError, UnicodeDecodeError):
        held = []
    if len(held) == 2 and held[0].isdigit():
        other_pid, other_host = int(held[0]), held[1]
        if other_host != host:
            warnings.warn(f"{lock} says a run of host {other_host} (process {other_pid}) uses {run_dir}; "
                          f"taking it over (from here it cannot be checked whether that run is alive)",
                          stacklevel=2)
        elif other_pid != pid and _alive(other_pid):
            raise FolderError(f"train.run_dir = {str(run_dir)!r} is in use by process {other_pid} (its "
                              f"{LOCK_FILE}): two runs in one folder overwrite each other's checkpoints "
                              f"and metrics; if no run uses it, delete {lock}")
    tmp = lock.with_name(f"{LOCK_FILE}.{pid}")
    tmp.write_text(mark)
    os.replace(tmp, lock)
    return lock


def release_run_folder(lock: Path) -> None:
    """Remove the mark `claim_run_folder` made, if it is still this process's."""
    try:
        if lock.read_text().split()[:1] == [str(os.getpid())]:
            lock.unlink()
    except (FileNotFoundError, IndexError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
