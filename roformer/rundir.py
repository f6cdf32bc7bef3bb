"""A run directory is owned by one job: a lock file names the owner (host, pid), and what a finished or started
run made (final/, results, metrics, checkpoints) is never overwritten unless the user says so.

The lock is a file created with O_EXCL, so two jobs cannot both take it. A lock whose owner is a process of this
host that no longer exists is stale (a killed job) and is taken over; a lock from another host cannot be checked
from here, so it is refused with the file to delete if that job is known to be dead.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from roformer.errors import UserError

LOCK_FILE = ".lock"
RUN_OUTPUTS = ("checkpoints", "final", "best", "eval_results.json", "metrics.jsonl", "config.yaml", "tokenizer")
"""What a run writes into its directory; `overwrite=true` removes these and nothing else."""
FINISHED = ("final", "eval_results.json")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


class RunLock:
    """`with RunLock(run_dir):` holds `run_dir/.lock` for the duration; refuses if a live job holds it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
        self.held = False

    def acquire(self) -> None:
        run_dir = self.path.parent
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"output_dir={run_dir}: is a file, not a directory")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"output_dir={run_dir}: cannot be created ({err.strerror})") from None
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise UserError(f"output_dir={run_dir}: not writable")
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            self.held = True
            return
        raise UserError(f"{self.path}: could not take the run directory's lock")

    def _clear_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            owner = {}
        host, pid = owner.get("host"), owner.get("pid")
        if host == self.owner["host"] and isinstance(pid, int) and not _alive(pid):
            # its owner was killed: a stale lock. Read again just before removing it, so that a job which took
            # it over meanwhile keeps its lock (the window left is a few microseconds).
            try:
                if json.loads(self.path.read_text() or "{}") == owner:
                    self.path.unlink()
            except (OSError, ValueError):
                pass
            return
        if not owner:  # unreadable: half-written by a job killed while taking it, or edited by hand
            raise UserError(f"{self.path}: an unreadable lock file; delete it if no job uses {self.path.parent}")
        raise UserError(
            f"{self.path.parent}: in use by process {pid} on {host} (lock file {self.path}); "
            "wait for it, choose another output_dir, or delete the lock file if that job is dead"
        )

    def release(self) -> None:
        if not self.held:
            return
        try:
            if json.loads(self.path.read_text()) == self.owner:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def check_run_dir(run_dir: Path, resuming: bool, has_checkpoint: bool, overwrite: bool) -> None:
    """Refuse to start a run over another's outputs. `overwrite=true` removes them first (only them)."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise UserError(f"output_dir={run_dir}: is a file, not a directory")
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"output_dir={run_dir}: not writable")
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if overwrite:
        for name in found:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        return
    if resuming and has_checkpoint:
        return
    if resuming:  # resume_from=latest with nothing saved yet: starts afresh, unless that would destroy a result
        finished = [name for name in FINISHED if name in found]
        if finished:
            raise UserError(
                f"output_dir={run_dir}: holds a finished run ({', '.join(finished)}) but no checkpoint to resume "
                "from; choose a new output_dir, or overwrite=true to replace it"
            )
        return
    if found:
        hint = "continue it with train.resume_from=latest, " if "checkpoints" in found else ""
        raise UserError(
            f"output_dir={run_dir}: already holds a run ({', '.join(found)}); {hint}choose a new output_dir, "
            "or overwrite=true to replace it"
        )


def check_writable_file(path: str | Path, flag: str) -> None:
    """Fail now, not after hours of work, if `path` cannot be written: a directory, or a read-only place."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory")
    parent = path.parent
    while not parent.exists():  # it will be created: the first existing ancestor must be writable
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise UserError(f"{flag} {path}: {target} is not writable")


def check_model_dir(path: str | Path, flag: str = "") -> None:
    """A directory a command will write a model or tokenizer into (convert, average-checkpoints, train-tokenizer):
    not a file, in a writable place, and not already holding one, which writing would replace."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{where}: is a file, not a directory")
    saved = ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json")
    held = [name for name in saved if (path / name).exists()]
    if held:
        raise UserError(f"{where}: already holds a model or tokenizer ({', '.join(held)}); choose a new directory")
    existing = path
    while not existing.exists():  # it will be created: the first existing ancestor must be writable
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{where}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{where}: {existing} is not writable")
