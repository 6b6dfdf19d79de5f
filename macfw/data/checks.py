"""Checks of OGBench-format dataset files, before anything reads them (no JAX, no OGBench imports).

A damaged file gives one :class:`~macfw.data.errors.DatasetError` naming the file, the problem and
the fix (delete it to have it regenerated, or point ``OGBenchDataset.dataset_path`` at a good copy),
never a traceback from deep in a loader or a silently wrong batch. Used for a single ``.npz``
(:meth:`macfw.data.ogbench_data.OGBenchDataset.resolve_path`) and for every shard before it is
converted (:func:`macfw.data.shards.convert_shard`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from macfw.data.errors import DatasetError, DatasetNotFoundError

#: Arrays every OGBench dataset file holds (one row per transition).
REQUIRED_KEYS = ("observations", "actions", "terminals")
#: Extra keys OGBench's loader reads in these task modes (reward relabelling / oracle goals).
INFO_KEYS = {"singletask": ("qpos",), "oraclerep": ("qpos",)}


def check_dataset_file(path: str | os.PathLike, task_mode: str | None = None) -> None:
    """Fail early, clearly, on a missing, truncated or foreign dataset file.

    Checks ``path`` and its ``-val.npz`` companion: both exist, are readable ``.npz`` archives
    whose required arrays (``observations``, ``actions``, ``terminals``, plus ``qpos`` for the
    ``singletask``/``oraclerep`` modes) can be read in full, with 2-D observations and actions and
    one row per transition in each array, and finite (no NaN or infinity) observations and actions.

    Raises:
      DatasetNotFoundError (a FileNotFoundError): a file does not exist.
      DatasetError (a ValueError): not a readable ``.npz``, truncated, a required key missing,
        inconsistent array shapes, or a NaN/infinity in ``observations`` or ``actions`` (names the
        file, the key, the first bad row and the fix).
    """
    path = Path(path)
    if not str(path).endswith(".npz"):
        raise DatasetError(
            f"Dataset file {str(path)!r} must end in '.npz' (OGBench finds the validation file by "
            "replacing '.npz' with '-val.npz'). Fix OGBenchDataset.dataset_path."
        )
    required = REQUIRED_KEYS + INFO_KEYS.get(task_mode or "", ())
    for p in (path, Path(str(path).replace(".npz", "-val.npz"))):
        if not p.is_file():
            raise DatasetNotFoundError(
                f"Dataset file {str(p)!r} does not exist. OGBench expects NAME.npz and NAME-val.npz side by side; "
                "fix OGBenchDataset.dataset_path, or leave it unset to generate the data into the cache."
            )
        fix = "Delete it to have it regenerated (cached data), or point OGBenchDataset.dataset_path at a good copy."
        try:
            with np.load(p, allow_pickle=False) as f:
                keys = set(f.files)
                missing = [k for k in required if k not in keys]
                if missing:
                    raise DatasetError(
                        f"Dataset file {str(p)!r} lacks the required key(s) {missing} (has {sorted(keys)}). An OGBench "
                        f"dataset needs {list(REQUIRED_KEYS)} (and qpos for singletask/oraclerep). {fix}"
                    )
                arrays = {k: f[k] for k in required}  # reads every member in full: catches truncation
        except DatasetError:
            raise
        except Exception as e:  # BadZipFile, zlib.error, EOFError, pickle refusal (not an npz), ...
            raise DatasetError(
                f"Dataset file {str(p)!r} is not a readable .npz ({type(e).__name__}: {e}). It may be truncated or "
                f"not an OGBench dataset. {fix}"
            ) from e
        n = len(arrays["observations"])
        for k in ("observations", "actions"):
            if arrays[k].ndim < 2:
                raise DatasetError(
                    f"Dataset file {str(p)!r}: {k!r} has shape {arrays[k].shape}, expected "
                    f"(transitions, size...). {fix}"
                )
        bad = {k: len(v) for k, v in arrays.items() if len(v) != n}
        if bad:
            raise DatasetError(
                f"Dataset file {str(p)!r}: arrays differ in length ({n} observations but {bad}); "
                f"the file is damaged. {fix}"
            )
        check_finite(p, arrays, fix)


def check_finite(path: str | os.PathLike, arrays: dict[str, np.ndarray], fix: str) -> None:
    """Raise a DatasetError naming ``path``, the key and the first row when ``observations`` or
    ``actions`` hold a NaN or an infinity (a damaged file; scaling would spread it to every batch)."""
    for k in ("observations", "actions"):
        a = arrays.get(k)
        if a is None or not np.issubdtype(a.dtype, np.floating):
            continue
        finite = np.isfinite(a).reshape(len(a), -1).all(axis=1)
        if not finite.all():
            rows = np.flatnonzero(~finite)
            raise DatasetError(
                f"Dataset file {str(path)!r}: {k!r} holds NaN or infinity in {len(rows)} row(s), the first at row "
                f"{int(rows[0])}; the file is damaged. {fix}"
            )
