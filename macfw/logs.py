"""Run-folder logging: append-only CSV logs, JSON written atomically, versions, progress messages."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
from pathlib import Path
from typing import Any


class CSVLog:
    """Append-only CSV with a fixed header; on resume, rows after the resumed step are dropped, and so is a
    last row that a crash or a full disk cut in half (no final newline, or fewer fields than the header).
    A row whose write fails (a full disk) is taken back at once: the file ends with whole rows."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.fields: list[str] | None = None
        if path.exists():
            text = path.read_text()
            if text and not text.endswith("\n"):
                text = text[: text.rfind("\n") + 1]  # the row being written when the run stopped
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
            fields = list(rows[0].keys()) if rows else None
            rows = [r for r in rows if None not in r.values() and None not in r]  # whole rows only
            if resume_step is None:
                rows = []
            else:
                rows = [r for r in rows if int(float(r["step"])) <= resume_step]
            self.fields = fields if rows else None
            tmp = path.with_suffix(".csv.tmp")
            try:
                with open(tmp, "w", newline="") as f:
                    if rows and fields:
                        w = csv.DictWriter(f, fieldnames=fields)
                        w.writeheader()
                        w.writerows(rows)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)

    def write(self, row: dict) -> None:
        if self.fields is None:
            self.fields = list(row.keys())
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writeheader()
        size = self.path.stat().st_size
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerow(
                    {k: row.get(k, "") for k in self.fields}
                )
        except OSError as e:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)  # never half a row (truncating needs no space)
            if e.filename is None:
                raise OSError(e.errno, e.strerror or str(e), str(self.path)) from e
            raise


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("macfw", "jax", "jaxlib", "equinox", "optax", "diffrax", "orbax-checkpoint", "ogbench", "gin-config"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _umask() -> int:
    """This process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file of its own in the same folder and a rename: a
    reader sees the old file or the new one (or none), never half of one, also with several writers.
    The file gets the permissions of a plain ``open(path, "w")`` (``0o666`` less the umask), not
    ``mkstemp``'s ``0o600``, so others who may read the run folder (a shared cluster) can read it.

    Raises:
      OSError: the folder cannot be written (the temporary file is removed).
    """
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`write_text_atomic`): a reader sees the old
    file or the new one, never half of one, also with several writers.

    Raises:
      OSError: the folder cannot be written (the temporary file is removed).
    """
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def tqdm_write(pbar, msg: str) -> None:
    if pbar is not None:
        pbar.write(msg)
    else:
        print(msg, flush=True)


def json_scaler(scaler) -> dict:
    """:meth:`Scaler.to_dict` as JSON lists (checkpoint meta)."""
    return {k: v.tolist() for k, v in scaler.to_dict().items()}
