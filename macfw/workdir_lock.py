"""One writer per run folder: an exclusive lock on ``WORKDIR/.lock`` for the whole run.

A run (:func:`macfw.train.train`, so also ``python -m macfw.run``) takes ``fcntl.flock(LOCK_EX |
LOCK_NB)`` on ``WORKDIR/.lock`` before it reads or changes anything else in WORKDIR, then writes
its holder into the file (one JSON line: PID, host name, start time), and holds the lock until it
returns. The kernel drops the lock when the process ends, however it ends (``kill -9``, a node
failure's SIGKILL, a SLURM requeue), so a lock is never stale: the file stays behind, only the
flock counts, and the next run takes it at once. A second run on a folder that is in use gets
:class:`WorkdirBusyError`, naming the holder, having changed nothing (without the lock it would
resume from the first run's checkpoint, remove the first run's checkpoint in progress as an
"incomplete" one and append the same steps to ``train.csv`` again). In a multi-host run only the
lead process (``jax.process_index() == 0``) locks.

Readers take no lock and change nothing: ``python -m macfw.evaluate`` and a read-only
:class:`~macfw.checkpoint.Checkpointer` may run beside a training run. A writable Checkpointer
removes leftovers of interrupted saves at start only under this lock (:func:`cleanup_lock`).

Filesystems: flock works on local filesystems and on NFS (Linux maps it onto NFS byte-range locks,
which every client sees). Where the filesystem refuses locks (e.g. Lustre mounted without
``-o flock``) the run goes on without this protection, with a warning; on Lustre mounted with
``-o localflock`` a lock is seen on its own node only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path

LOCK_FILE = ".lock"

_HELD: dict[str, WorkdirLock] = {}  # real path of the workdir -> the lock this process holds on it
_HELD_GUARD = threading.Lock()
_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class WorkdirBusyError(RuntimeError):
    """Another process holds the run folder's lock (the message names it and the fix)."""


def _key(workdir) -> str:
    return os.path.realpath(os.fspath(workdir))


def read_holder(workdir) -> dict | None:
    """The holder record in ``WORKDIR/.lock`` (``pid``, ``host``, ``started``, ...), or None when the
    file is missing, empty or unreadable. The record says who took the lock last; whether the lock
    is held now only ``flock`` knows."""
    try:
        text = (Path(workdir) / LOCK_FILE).read_text()
        record = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "pid" in record else None


def _alive_here(record: dict) -> bool:
    """False only for a record of this host whose process does not exist (a stale record that the
    new holder has not overwritten yet)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError, TypeError):
        return True
    return True


def _describe_holder(workdir) -> str:
    """'process 123 on host h (started ...)', read from the lock file. A holder writes its record
    just after taking the lock, so an empty or stale record is read again for up to 2 s."""
    record = None
    for _ in range(40):
        record = read_holder(workdir)
        if record is not None and _alive_here(record):
            break
        time.sleep(0.05)
    if record is None:
        return "a process that has not written its name into the lock file"
    started = record.get("started")
    when = f" (started {started})" if started else ""
    return f"process {record.get('pid')} on host {record.get('host')!r}{when}"


class WorkdirLock:
    """The exclusive lock on ``WORKDIR/.lock`` (see the module doc); a context manager.

    Args:
      workdir: the run folder; it must exist.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir).absolute()
        self.path = self.workdir / LOCK_FILE
        self.enforced = False  # False: the filesystem refused locks, the run goes on unprotected
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> WorkdirLock:
        """Take the lock without waiting and write this process into the lock file.

        Returns:
          self.

        Raises:
          WorkdirBusyError: another process (or another lock object in this one) holds it; the
            message names the holder's PID and host (from the lock file) and the fix. Nothing in
            the folder was changed.
          OSError: the lock file cannot be created or opened (e.g. the folder is not writable).
        """
        if self.held:
            return self
        # O_CREAT without O_TRUNC: the file of a live holder is never touched before the lock is ours
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.enforced = True
            except BlockingIOError:
                raise WorkdirBusyError(
                    f"Workdir {str(self.workdir)!r} is in use by another run: {_describe_holder(self.workdir)} holds "
                    f"its lock {str(self.path)!r}. Wait for that run to finish or stop it (re-running the same "
                    "command afterwards resumes from its newest checkpoint), or pass a different --workdir."
                ) from None
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                warnings.warn(
                    f"The filesystem of {str(self.workdir)!r} refuses file locks ({e}): two runs started "
                    "on this workdir at once would not be stopped. Make sure only one run uses it.",
                    stacklevel=2,
                )
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "started_unix": time.time(),
            }
            data = (json.dumps(record) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            try:
                os.fsync(fd)
            except OSError:
                pass
        except BaseException:
            os.close(fd)  # drops the lock, if it was taken
            raise
        self._fd = fd
        with _HELD_GUARD:
            _HELD[_key(self.workdir)] = self
        return self

    def release(self) -> None:
        """Give the lock back (closing the file drops it); the file stays. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with _HELD_GUARD:
            if _HELD.get(_key(self.workdir)) is self:
                del _HELD[_key(self.workdir)]
        os.close(fd)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def held_here(workdir) -> bool:
    """Whether this process holds the lock of ``workdir`` (through a :class:`WorkdirLock`)."""
    with _HELD_GUARD:
        lock = _HELD.get(_key(workdir))
    return lock is not None and lock.held


@contextlib.contextmanager
def cleanup_lock(workdir):
    """For removing leftovers in ``workdir``: the lock this process holds on it, else the lock taken
    for the duration of the block (an existing ``workdir``).

    Raises:
      WorkdirBusyError: another process holds it (its save in progress would look like a leftover);
        the block does not run.
      OSError: the lock file cannot be created.
    """
    if held_here(workdir):
        yield
        return
    with WorkdirLock(workdir):
        yield
