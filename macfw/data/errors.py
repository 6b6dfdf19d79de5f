"""Errors of macfw's data layer, in a module that imports nothing heavy.

:mod:`macfw.data.generate` (imported by spawned generation workers, which must not import JAX) and
:mod:`macfw.data.ogbench_data` (which re-exports these classes under the same names) raise them;
``python -m macfw.run`` prints a :class:`DatasetError` as one ``macfw: error:`` line (exit code 2).
"""

from __future__ import annotations

__all__ = ["DatasetError", "DatasetNotFoundError", "UnknownEnvironmentError"]


class DatasetError(ValueError):
    """A dataset file or dataset setting that cannot work (the message names the value and the fix)."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset file (or its ``-val`` companion) does not exist."""


class UnknownEnvironmentError(DatasetError):
    """``OGBenchDataset.env_name`` is not an OGBench environment."""
