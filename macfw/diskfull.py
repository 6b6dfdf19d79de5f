"""A full disk, reported as one line: the path that could not be written, the space left, the fix.

A full disk reaches a run in many shapes: ``OSError(ENOSPC)`` from a plain ``write`` (``train.csv``,
``summary.json``, a generated dataset), a ``ValueError("RESOURCE_EXHAUSTED: ... No space left on
device [os_error_code='28']")`` from TensorStore inside an asynchronous Orbax save (re-raised by
:class:`macfw.checkpoint.Checkpointer` as ``CheckpointSaveError``), or the death of a background
writer thread (tensorboardX's event writer). :func:`disk_full_error` recognises all of them by walking
an exception's causes, and builds one :class:`DiskFullError` whose message names the path, the free
space on that filesystem and what to do; ``python -m macfw.run`` and the dataset tools print it as
one line and exit 2.

What survives (docs/reliability.md): a checkpoint is written under a temporary name and renamed when
complete, so the newest complete checkpoint is intact and a re-run after space is freed resumes from
it (the temporary leftovers are removed under the workdir lock); CSV logs drop a row the disk cut in
half; generated datasets and shards are written under temporary names and removed on failure, so a
later run never reads half a file.

Background threads: :func:`install_thread_hook` (called by ``macfw.run``) keeps a full disk in a
background thread from printing a traceback; the error is kept and :func:`raise_pending` (called by
the loggers before they write) raises it in the main thread.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
from collections.abc import Iterator

#: errno values that mean "no space": ENOSPC, and EDQUOT (a user's quota is full)
CODES = frozenset({errno.ENOSPC, errno.EDQUOT})
_TS_CODE = re.compile(r"os_error_code='(\d+)'")
_TS_PATH = re.compile(r'(?:local file|Failed writing:|writing local file) "([^"]+)"')
_TEXT = ("No space left on device", "Disk quota exceeded")
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's ndarray.tofile/np.save on a full disk

_PENDING: list[BaseException] = []  # full-disk errors raised in background threads, oldest first
_PENDING_GUARD = threading.Lock()
_HOOK = None  # the hook install_thread_hook() set, once per process


class DiskFullError(OSError):
    """No space left where macfw writes; the message names the path, the free space and the fix.

    ``errno`` is ENOSPC and ``filename`` the path (or None); ``str()`` is the message alone.
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(errno.ENOSPC, message)
        self.message, self.filename = message, path

    def __str__(self) -> str:
        return self.message


def _causes(e: BaseException | None) -> Iterator[BaseException]:
    """``e``, then its causes and contexts, and the members of exception groups, each once."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo.extend(getattr(x, "exceptions", ()) or ())
        todo.extend((x.__cause__, x.__context__))


def _path_in(x: BaseException) -> str | None:
    if isinstance(x, OSError) and x.filename:
        return os.fsdecode(x.filename)
    m = _TS_PATH.search(str(x))
    return m.group(1) if m else None


def is_disk_full(e: BaseException | None) -> bool:
    """Whether ``e`` or one of its causes says the disk (or the quota) is full."""
    return find(e) is not None


def find(e: BaseException | None) -> tuple[BaseException, str | None] | None:
    """The first exception in ``e``'s causes that says "no space", and the path it names (or None)."""
    for x in _causes(e):
        text = str(x)
        code = _TS_CODE.search(text)
        if (
            (isinstance(x, OSError) and x.errno in CODES)
            or (code is not None and int(code.group(1)) in CODES)
            or any(t in text for t in _TEXT)
            or (isinstance(x, OSError) and x.errno is None and _SHORT_WRITE.search(text) is not None)
        ):
            path = _path_in(x)
            if path is None:  # a wrapper names the path, the innermost error the cause
                path = next((p for p in map(_path_in, _causes(e)) if p), None)
            return x, path
    return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_space(path: str | os.PathLike) -> str:
    """``'<free> free of <total>'`` on the filesystem that holds ``path`` (its nearest existing folder),
    or ``'free space unknown'``."""
    p = os.path.abspath(os.fspath(path))
    while p and not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return "free space unknown"
    return f"{_size(usage.free)} free of {_size(usage.total)}"


def disk_full_error(
    e: BaseException | None, *, fallback_path: str | os.PathLike | None = None, fix: str | None = None
) -> DiskFullError | None:
    """A :class:`DiskFullError` for ``e`` when one of its causes says "no space", else None.

    Args:
      e: the exception raised (any type; its causes are searched).
      fallback_path: the path to name when no error in the chain names one (e.g. the workdir).
      fix: what to do, at the end of the message (default: free space and run the same command again).
    """
    found = find(e)
    if found is None:
        return None
    path = found[1] or (os.fspath(fallback_path) if fallback_path is not None else None)
    where = f" writing {path}" if path else ""
    space = free_space(path) if path else "free space unknown"
    fix = fix or (
        "Free space there (or choose another --workdir) and run the same command again: it resumes "
        "from the newest complete checkpoint."
    )
    return DiskFullError(f"No space left on device{where} ({space} on that filesystem). {fix}", path)


def install_thread_hook() -> None:
    """Keep a full disk in a background thread (tensorboardX's writer, an Orbax save) quiet: the error
    is kept for :func:`raise_pending` instead of printing a traceback; other thread errors print as
    before. Installed once per process."""
    global _HOOK
    previous = threading.excepthook
    if _HOOK is not None and previous is _HOOK:
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and is_disk_full(args.exc_value):
            with _PENDING_GUARD:
                _PENDING.append(args.exc_value)
            return
        previous(args)

    _HOOK = hook
    threading.excepthook = hook


class _DiskFullRecords:
    """A logging filter that drops library records about a full disk (Orbax logs every failed write of an
    asynchronous save at ERROR level, with TensorStore's whole spec): macfw reports it once, as one line."""

    def filter(self, record) -> bool:
        if record.exc_info and is_disk_full(record.exc_info[1]):
            return False
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001  (a record that cannot format is not ours to judge)
            return True
        return not (any(t in text for t in _TEXT) or any(f"os_error_code='{c}'" in text for c in CODES))


def quiet_library_logs() -> None:
    """Drop the absl (Orbax) log records about a full disk; others are untouched. Once per process."""
    import logging

    logger = logging.getLogger("absl")
    if not any(isinstance(f, _DiskFullRecords) for f in logger.filters):
        logger.addFilter(_DiskFullRecords())


def clear() -> None:
    """Forget the full-disk errors kept so far: a run starts with none (``macfw.run.main`` calls this, so
    a later run in the same process never reports an earlier run's full disk)."""
    with _PENDING_GUARD:
        _PENDING.clear()


def note(e: BaseException) -> None:
    """Keep ``e`` (a full disk met while stopping, e.g. by the last checkpoint save) for :func:`pending`."""
    with _PENDING_GUARD:
        _PENDING.append(e)


def pending() -> BaseException | None:
    """The oldest full-disk error raised in a background thread since the process started, or None."""
    with _PENDING_GUARD:
        return _PENDING[0] if _PENDING else None


def raise_pending(fallback_path: str | os.PathLike | None = None) -> None:
    """Raise a :class:`DiskFullError` for a full disk met by a background thread, if there was one.

    Raises:
      DiskFullError: a background writer thread stopped because the disk is full.
    """
    e = pending()
    if e is not None:
        err = disk_full_error(e, fallback_path=fallback_path)
        if err is not None:
            raise err from e
