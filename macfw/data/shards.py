"""Sharded OGBench datasets on disk: each shard converted once into memory-mappable columns (DESIGN §10).

OGBench's large datasets are directories of shards ``<env>-<type>-v0-000.npz``, ``-001.npz``, ...,
each with a ``-val`` sibling (``<env>-<type>-v0-000-val.npz``), written with ``savez_compressed``:
a zipped array cannot be memory-mapped. :func:`open_sharded` converts every shard once, through
OGBench's own loader (``ogbench.make_env_and_datasets(..., compact_dataset=True)``, so single-task
rewards/masks and oracle goals are exactly OGBench's), into a *store*: one folder of uncompressed
``.npy`` columns per shard, memory-mapped afterwards, so a dataset of any size is read without
being loaded.

Store layout (``<cache>/shard-stores/<shard stem>-<hash of its path>/``):

* ``base/``: ``observations.npy (N, ob_dim)`` float32 (unscaled), ``actions.npy (N, act_dim)``
  float32 clipped to ``[-1 + 1e-5, 1 - 1e-5]`` (as :meth:`OGBenchDataset.prepare`), and
  ``trajectories.npy (T, 2)`` int64: each trajectory's first and final row (the final observation,
  OGBench's ``valids == 0``). Valid chunk starts for a window ``w`` are, per trajectory, the
  closed range ``[first, final - w]``, so they are index arithmetic on this table (a few KB)
  instead of a column of N indices per window; see :meth:`ShardedData.index_tables`.
* ``<dataset name>/`` (one per OGBench variant, e.g. ``cube-double-play-singletask-task2-v0/``):
  ``rewards.npy``, ``masks.npy (N,)`` float32 (single-task), or ``oracle_reps.npy (N, goal_dim)``
  float32 (``oraclerep``). The plain goal-conditioned dataset needs none.
* each folder has ``manifest.json``: format, the source files' sizes and modification times,
  every column's file size, shape and dtype, and the min/max statistics of the train and
  validation splits (for [-1, 1] scaling without reading the data again).

Complete or invisible: a folder is written under a temporary name (``*.tmp-<host>-<pid>-<ns>``),
its files fsynced, its manifest written last, then renamed into place in one atomic step. A folder
is used only when its manifest exists and matches the files on disk and the source shard (size and
modification time); anything else is removed and converted again. So a conversion interrupted at
any moment is redone on the next start (leftover temporary folders of dead processes are deleted),
and two processes converting the same shard at once both end with the one that was renamed first.

Units: rows are environment steps (transitions) in OGBench's compact layout; indices are global
over the shards in index order (shard ``k``'s row ``i`` is ``row_offsets[k] + i``).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from macfw.data.batches import ChunkData, Scaler, trajectory_ends, valid_starts
from macfw.data.checks import check_dataset_file
from macfw.data.errors import DatasetError, DatasetNotFoundError
from macfw.fsync import fsync_path

STORE_FORMAT = 1
MANIFEST = "manifest.json"
TMP_MARK = ".tmp-"
TRASH = ".trash"
ACTION_CLIP = 1.0 - 1e-5  # == macfw.data.ogbench_data.ACTION_CLIP
#: ``<base>-<index>.npz`` with an OGBench base name (``<env>-<type>-v<k>``); no dots in the base, so
#: temporary files (``...-000.npz.tmp-12.npz``) never look like shards.
_SHARD_RE = re.compile(r"^(?P<base>[A-Za-z0-9][A-Za-z0-9-]*-v\d+)-(?P<index>\d+)\.npz$")


# ------------------------------------------------------------------------------------- shard files
def val_path(shard: Path) -> Path:
    """``X-000.npz`` -> ``X-000-val.npz`` (OGBench's rule)."""
    return Path(str(shard)[: -len(".npz")] + "-val.npz")


def parse_shard_name(name: str) -> tuple[str, int] | None:
    """``('cube-double-play-v0', 3)`` for ``'cube-double-play-v0-003.npz'``; None for anything else
    (validation files, temporary files, other names)."""
    m = _SHARD_RE.match(name)
    if m is None:
        return None
    return m.group("base"), int(m.group("index"))


def list_shards(directory: str | os.PathLike, base_name: str, max_shards: int | None = None) -> list[Path]:
    """The training shards of ``base_name`` in ``directory``, by index (first ``max_shards`` of them).

    Raises:
      DatasetNotFoundError: the directory does not exist, holds no shard of ``base_name``, or a
        shard lacks its ``-val`` sibling.
      DatasetError: two shards share an index (``-001`` and ``-0001``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetNotFoundError(
            f"Dataset directory {str(directory)!r} does not exist. Fix OGBenchDataset.dataset_path."
        )
    found: dict[int, Path] = {}
    others: set[str] = set()
    for p in directory.iterdir():
        parsed = parse_shard_name(p.name)
        if parsed is None or not p.is_file():
            continue
        base, index = parsed
        if base != base_name:
            others.add(base)
            continue
        if index in found:
            raise DatasetError(
                f"Dataset directory {str(directory)!r} has two shards with index {index} "
                f"({found[index].name!r} and {p.name!r}); remove one."
            )
        found[index] = p
    if not found:
        hint = (
            f" It holds shards of {sorted(others)}: fix OGBenchDataset.env_name (or dataset_type)."
            if others
            else f" Expected {base_name}-000.npz, {base_name}-001.npz, ... (each with a -val sibling)."
        )
        raise DatasetNotFoundError(f"Dataset directory {str(directory)!r} holds no shard of {base_name!r}.{hint}")
    shards = [found[i] for i in sorted(found)]
    if max_shards is not None:
        shards = shards[:max_shards]
    for s in shards:
        if not val_path(s).is_file():
            raise DatasetNotFoundError(
                f"Shard {str(s)!r} has no validation file {val_path(s).name!r} beside it (OGBench shards come in "
                "pairs). Restore it, or remove the shard."
            )
    return shards


def _source_info(path: Path) -> dict:
    st = path.stat()
    return {"name": path.name, "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _sources(shard: Path) -> dict:
    return {"train": _source_info(shard), "val": _source_info(val_path(shard))}


def store_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where shard stores live: ``<cache>/shard-stores`` (cache: :func:`macfw.data.generate.default_cache_dir`)."""
    from macfw.data.generate import default_cache_dir

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "shard-stores"


def store_dir(shard: Path, cache_dir=None) -> Path:
    """The store folder of one shard file (keyed by its name and its absolute path)."""
    digest = hashlib.sha1(str(Path(shard).resolve()).encode()).hexdigest()[:12]
    return store_root(cache_dir) / f"{Path(shard).stem}-{digest}"


# ------------------------------------------------------------------------------------- atomic folders
def _remove_tree(folder: Path) -> None:
    """Make ``folder`` disappear at once (manifest first, then a rename into the trash), then delete it."""
    try:
        (folder / MANIFEST).unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass
    trash = folder.parent / TRASH
    trash.mkdir(parents=True, exist_ok=True)
    target = trash / f"{folder.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(folder, target)
    except FileNotFoundError:
        return
    shutil.rmtree(target, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(folder: Path, max_age_s: float = 7 * 86400) -> None:
    """Delete temporary folders of dead conversions next to ``folder`` (same host: pid not alive;
    any host: older than ``max_age_s``) and the trash."""
    parent = folder.parent
    if not parent.is_dir():
        return
    host = socket.gethostname()
    for entry in parent.iterdir():
        if entry.name == TRASH:
            shutil.rmtree(entry, ignore_errors=True)
            continue
        if not entry.name.startswith(folder.name + TMP_MARK):
            continue
        tag = entry.name[len(folder.name + TMP_MARK) :]
        parts = tag.rsplit("-", 2)
        try:
            age = time.time() - entry.stat().st_mtime
        except FileNotFoundError:
            continue
        dead = len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _pid_alive(int(parts[1]))
        if dead or age > max_age_s:
            shutil.rmtree(entry, ignore_errors=True)


def _write_columns(final: Path, columns: dict[str, np.ndarray], manifest: dict) -> None:
    """Write ``columns`` as ``.npy`` files and ``manifest`` into ``final``, atomically (see the module doc)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(final)
    tmp = final.parent / f"{final.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        files = {}
        for name, arr in columns.items():
            p = tmp / f"{name}.npy"
            try:
                with open(p, "wb") as f:
                    np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:  # name the file (numpy's short-write error does not): a full disk says where
                if e.filename is None:
                    raise OSError(e.errno, e.strerror or str(e), str(p)) from e
                raise
            files[name] = {"file": p.name, "bytes": p.stat().st_size, "shape": list(arr.shape), "dtype": str(arr.dtype)}
        manifest = dict(manifest, format=STORE_FORMAT, columns=files, written_at=time.time())
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if manifest_problem(final, manifest["sources"]) is None:  # another process finished it first
                shutil.rmtree(tmp, ignore_errors=True)
                return
            _remove_tree(final)
            os.rename(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype in an ``.npy`` file's header (reads a few hundred bytes).

    Raises:
      ValueError: not an ``.npy`` file (a damaged column).
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), dtype


def manifest_problem(folder: Path, sources: dict | None = None) -> str | None:
    """Why ``folder`` is not a complete, current store folder (None when it is)."""
    try:
        m = json.loads((Path(folder) / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (the conversion did not finish)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    try:
        if m["format"] != STORE_FORMAT:
            return f"store format {m['format']} (this macfw writes {STORE_FORMAT})"
        if sources is not None and m["sources"] != sources:
            return "the source shard changed since it was converted"
        for name, c in m["columns"].items():
            p = Path(folder) / c["file"]
            if not p.is_file() or p.stat().st_size != int(c["bytes"]):
                return f"column {name!r} missing or of the wrong size"
            shape, dtype = _npy_header(p)
            if list(shape) != list(c["shape"]) or str(dtype) != c["dtype"]:
                return f"column {name!r} holds {dtype}{list(shape)}, its manifest says {c['dtype']}{c['shape']}"
            if name != "trajectories" and shape[:1] != (int(m["rows"]),):
                return f"column {name!r} has {shape[:1]} rows, the manifest {m['rows']}"
    except (KeyError, TypeError, ValueError) as e:
        return f"malformed manifest ({e!r})"
    return None


# ------------------------------------------------------------------------------------- conversion
def _minmax(x: np.ndarray) -> dict:
    x = np.asarray(x, np.float32)
    return {"lo": x.min(axis=0).tolist(), "hi": x.max(axis=0).tolist()}


def trajectory_table(valids: np.ndarray) -> np.ndarray:
    """``(T, 2)`` int64 first and final row of each trajectory from OGBench's compact ``valids``
    (0 exactly at each trajectory's final observation); consistent with :func:`trajectory_ends`."""
    n = len(valids)
    ends = np.where(np.asarray(valids) < 0.5)[0]
    if len(ends) == 0 or ends[-1] != n - 1:
        ends = np.concatenate([ends, [n - 1]])
    firsts = np.concatenate([[0], ends[:-1] + 1])
    return np.stack([firsts, ends], axis=1).astype(np.int64)


def variant_name(dataset_name: str, base_name: str) -> str | None:
    """The store sub-folder of an OGBench variant (None for the plain dataset, which needs none)."""
    return None if dataset_name == base_name else dataset_name


@dataclass
class ShardStore:
    """One converted shard: memory-mapped columns and the manifests' statistics."""

    shard: Path
    folder: Path
    base: dict  # base manifest
    variant: dict | None  # variant manifest
    columns: dict  # name -> read-only np.ndarray view of a memory map
    maps: list  # the np.memmap objects (for madvise)
    convert_s: float = 0.0  # seconds spent converting now (0: reused)

    @property
    def rows(self) -> int:
        return int(self.base["rows"])

    @property
    def nbytes(self) -> int:
        return int(sum(c.nbytes for c in self.columns.values()))

    @property
    def disk_bytes(self) -> int:
        total = 0
        for m in (self.base, self.variant):
            if m:
                total += sum(int(c["bytes"]) for c in m["columns"].values())
        return total


def _split_stats(store: ShardStore, key: str, split: str) -> dict:
    """Column ``key``'s min/max statistics on ``split`` (``'train'`` or ``'val'``): the observations'
    from the base manifest, the others' from the variant's."""
    if key == "observations":
        return store.base["stats"][key][split]
    assert store.variant is not None, f"column {key!r} of {store.shard.name} has no variant manifest"
    return store.variant["stats"][key][split]


def _open_columns(folder: Path, manifest: dict) -> tuple[dict, list]:
    cols, maps = {}, []
    for name, c in manifest["columns"].items():
        mm = np.load(folder / c["file"], mmap_mode="r", allow_pickle=False)
        if isinstance(mm, np.memmap):
            maps.append(mm)
            try:  # no read-ahead: rows are read at random (numpy's private mmap handle: not in its stubs)
                mm._mmap.madvise(mmap.MADV_RANDOM)  # noqa: SLF001  # pyright: ignore[reportAttributeAccessIssue]
            except (AttributeError, OSError, ValueError):
                pass
        cols[name] = np.asarray(mm)  # a plain ndarray view (no np.memmap overhead per index)
    return cols, maps


def convert_shard(shard: Path, *, base_name: str, dataset_name: str, env=None, cache_dir=None) -> ShardStore:
    """The store of ``shard`` for ``dataset_name``, converting what is missing or stale first.

    ``env`` is the OGBench environment OGBench's loader relabels with (needed for single-task
    and ``oraclerep`` variants; see ``ogbench.make_env_and_datasets(..., cur_env=env)``).

    Raises:
      DatasetError: OGBench's loader cannot read the shard (names it).
    """
    shard = Path(shard)
    folder = store_dir(shard, cache_dir)
    sources = _sources(shard)
    variant = variant_name(dataset_name, base_name)
    base_dir, var_dir = folder / "base", (folder / variant if variant else None)
    need_base = manifest_problem(base_dir, sources) is not None
    need_var = var_dir is not None and manifest_problem(var_dir, sources) is not None
    t0 = time.perf_counter()
    if need_base or need_var:
        check_dataset_file(shard)  # a damaged shard: one DatasetError naming it, never a half-read store
        for d, need in ((base_dir, need_base), (var_dir, need_var)):
            if need and d is not None and d.exists():  # replaced by _write_columns, not removed here: another
                # process may finish it while this one converts (removing it then broke that process's read)
                warnings.warn(
                    f"Re-converting the shard store {str(d)!r} ({manifest_problem(d, sources)}).", stacklevel=2
                )
        import ogbench

        name = dataset_name if need_var else base_name
        try:
            train, val = cast(
                "tuple[dict, dict]",  # dataset_only: the two splits (its return type covers every mode)
                ogbench.make_env_and_datasets(
                    name, dataset_path=str(shard), compact_dataset=True, dataset_only=True, cur_env=env
                ),
            )
        except Exception as e:
            raise DatasetError(
                f"OGBench could not load the shard {str(shard)!r} as {name!r} ({type(e).__name__}: "
                f"{e}). It may be truncated or belong to another environment: delete it and regenerate it "
                "(python -m macfw.data.generate --shards ...), or restore a good copy."
            ) from e
        if need_base:
            obs = np.asarray(train["observations"], np.float32)
            acts = np.clip(np.asarray(train["actions"], np.float32), -ACTION_CLIP, ACTION_CLIP)
            stats = {"observations": {"train": _minmax(obs), "val": _minmax(val["observations"])}}
            _write_columns(
                base_dir,
                {"observations": obs, "actions": acts, "trajectories": trajectory_table(train["valids"])},
                {"sources": sources, "rows": len(obs), "stats": stats, "shard": shard.name},
            )
            del obs, acts
        if need_var:
            assert var_dir is not None  # need_var: the dataset has a variant folder
            cols, stats = {}, {}
            if "oracle_reps" in train:
                cols["oracle_reps"] = np.asarray(train["oracle_reps"], np.float32)
                stats["oracle_reps"] = {"train": _minmax(train["oracle_reps"]), "val": _minmax(val["oracle_reps"])}
            if "rewards" in train:
                cols["rewards"] = np.asarray(train["rewards"], np.float32)
                cols["masks"] = np.asarray(train["masks"], np.float32)
            _write_columns(
                var_dir,
                cols,
                {
                    "sources": sources,
                    "rows": len(train["observations"]),
                    "stats": stats,
                    "dataset_name": dataset_name,
                    "shard": shard.name,
                },
            )
        del train, val
    convert_s = time.perf_counter() - t0 if (need_base or need_var) else 0.0
    base = json.loads((base_dir / MANIFEST).read_text())
    cols, maps = _open_columns(base_dir, base)
    var = None
    if var_dir is not None:
        var = json.loads((var_dir / MANIFEST).read_text())
        vc, vm = _open_columns(var_dir, var)
        cols.update(vc)
        maps += vm
    return ShardStore(shard=shard, folder=folder, base=base, variant=var, columns=cols, maps=maps, convert_s=convert_s)


# ------------------------------------------------------------------------------------- the dataset
class ShardedData:
    """A sharded dataset, memory-mapped: what :class:`~macfw.data.ogbench_data.LoadedData` holds for a
    directory of shards (host sampling: :class:`macfw.data.host_sampler.ShardSampler`).

    Attributes:
      stores: the converted shards, in index order.
      row_offsets: ``(S + 1,)`` int64; shard ``k`` holds global rows ``[row_offsets[k], row_offsets[k+1])``.
      traj: ``(T, 2)`` int64 global first and final row of every trajectory, in order.
      obs_scaler, goal_scaler: the [-1, 1] scalers (``goal_scaler`` None for single-task).
      task_mode, singletask_masks: as :class:`~macfw.data.ogbench_data.OGBenchDataset`.
      sampling: ``'uniform'`` over all shards or ``'shard_rotation'`` (one shard at a time, the
        next every ``rotation_interval`` gradient steps; the authors' scheme).
      scaler_source: which split the scaling statistics came from (words).

    Column arrays are read-only views of memory maps; nothing is loaded until rows are gathered.
    """

    def __init__(
        self,
        stores: list[ShardStore],
        *,
        task_mode: str,
        singletask_masks: str,
        scale_with: str,
        sampling: str = "uniform",
        rotation_interval: int = 1000,
        release_mib: int = 256,
    ):
        self.stores = stores
        self.task_mode, self.singletask_masks = task_mode, singletask_masks
        self.sampling, self.rotation_interval = sampling, int(rotation_interval)
        rows = [s.rows for s in stores]
        self.row_offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        if self.row_offsets[-1] >= 2**31 - 1:
            raise DatasetError(
                f"{int(self.row_offsets[-1])} rows: sampling indices are int32, so at most 2**31 - 1 "
                "rows are supported. Use OGBenchDataset.max_shards to use fewer shards."
            )
        self.traj = np.concatenate([s.columns["trajectories"] + off for s, off in zip(stores, self.row_offsets)])
        self.traj_offsets = np.concatenate([[0], np.cumsum([len(s.columns["trajectories"]) for s in stores])])
        dims = {(s.columns["observations"].shape[1:], s.columns["actions"].shape[1:]) for s in stores}
        if len(dims) != 1:
            raise DatasetError(
                f"The shards differ in observation/action sizes ({sorted(dims)}): they belong to "
                "different environments. Keep one dataset per directory."
            )
        gkey = "oracle_reps" if task_mode == "oraclerep" else None
        if scale_with == "val":
            pick = lambda st, k: _split_stats(st, k, "val")  # noqa: E731
            self.obs_scaler = Scaler(
                *(np.asarray(pick(stores[0], "observations")[w], np.float32) for w in ("lo", "hi"))
            )
            self.scaler_source = f"the validation file of the first shard ({val_path(stores[0].shard).name})"
            gsc = Scaler(*(np.asarray(pick(stores[0], gkey)[w], np.float32) for w in ("lo", "hi"))) if gkey else None
        else:

            def fit(k):
                ss = [_split_stats(st, k, "train") for st in stores]
                return Scaler(
                    lo=np.min([np.asarray(s["lo"], np.float32) for s in ss], axis=0),
                    hi=np.max([np.asarray(s["hi"], np.float32) for s in ss], axis=0),
                )

            self.obs_scaler = fit("observations")
            self.scaler_source = f"the training split of all {len(stores)} shards"
            gsc = fit(gkey) if gkey else None
        self.goal_scaler = gsc if task_mode == "oraclerep" else (self.obs_scaler if task_mode == "goal" else None)
        self.release_bytes = int(release_mib) * 2**20
        self._read_since_release = 0
        self._rss_base: int | None = _file_rss()
        self._release_lock = threading.Lock()
        self.releases = 0  # how often mapped pages were released (maybe_release)

    # -- sizes ---------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return len(self.stores)

    @property
    def size(self) -> int:
        """Rows (transitions) over all shards."""
        return int(self.row_offsets[-1])

    @property
    def ob_dim(self) -> int:
        return int(self.stores[0].columns["observations"].shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.stores[0].columns["actions"].shape[1])

    @property
    def goal_dim(self) -> int:
        if self.task_mode == "oraclerep":
            return int(self.stores[0].columns["oracle_reps"].shape[1])
        return self.ob_dim if self.task_mode == "goal" else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the dataset materialised as a :class:`ChunkData` (what device mode would hold)."""
        per_row = 4 * (self.ob_dim + self.act_dim + self.goal_dim + 2 + 2)  # + rewards, masks, traj_end, starts
        return self.size * per_row

    @property
    def disk_bytes(self) -> int:
        return int(sum(s.disk_bytes for s in self.stores))

    @property
    def convert_s(self) -> float:
        return float(sum(s.convert_s for s in self.stores))

    def describe(self) -> list[dict]:
        """Every shard by name, rows and source size/time (what a checkpoint records of the data)."""
        return [
            {
                "name": s.shard.name,
                "rows": s.rows,
                "size": s.base["sources"]["train"]["size"],
                "mtime_ns": s.base["sources"]["train"]["mtime_ns"],
            }
            for s in self.stores
        ]

    # -- index space -----------------------------------------------------------------------
    def index_tables(self, window: int) -> dict[str, np.ndarray]:
        """int32 tables for drawing valid starts ``t`` (``t + window <= final row of t's trajectory``).

        ``traj_first, traj_final (T,)``: global rows; ``start_cum (T + 1,)``: valid starts before each
        trajectory (the ``r``-th valid start overall, ascending, lies in trajectory ``j`` with
        ``start_cum[j] <= r < start_cum[j+1]`` at row ``traj_first[j] + r - start_cum[j]``: exactly
        ``valid_starts(traj_end, window)[r]`` of the concatenated data); ``shard_start_cum (S + 1,)``
        and ``row_offsets (S + 1,)``: the same per shard (for shard rotation).

        Raises:
          ConfigError: no trajectory of some shard is longer than ``window`` (names
            ``train.chunk_len``).
        """
        from macfw.errors import check

        first, final = self.traj[:, 0], self.traj[:, 1]
        counts = np.maximum(final - window - first + 1, 0)
        start_cum = np.concatenate([[0], np.cumsum(counts)])
        shard_start_cum = start_cum[self.traj_offsets]
        longest = int(np.max(final - first)) if len(first) else 0
        per_shard = np.diff(shard_start_cum)
        check(
            "train.chunk_len",
            window,
            bool(np.all(per_shard > 0)),
            f"at most {longest}, the longest chunk inside one trajectory of the data (or use longer episodes)",
        )
        return {
            "traj_first": first.astype(np.int32),
            "traj_final": final.astype(np.int32),
            "start_cum": start_cum.astype(np.int32),
            "shard_start_cum": shard_start_cum.astype(np.int32),
            "row_offsets": self.row_offsets.astype(np.int32),
        }

    # -- reading rows ------------------------------------------------------------------------
    def column(self, name: str) -> list[np.ndarray]:
        return [s.columns[name] for s in self.stores]

    def take(self, name: str, rows: np.ndarray, shard: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (global, any shape ``(F, ...)``) of column ``name``: ``(F, ..., dim...)``.

        ``shard (F,)``: the shard of every row of ``rows[i]`` when known (a window inside one
        trajectory); otherwise each row's shard is looked up. Shards are read one after the other
        with one vectorised gather each.
        """
        rows = np.asarray(rows)
        cols = self.column(name)
        if len(cols) == 1:
            out = cols[0][rows]
        else:
            if shard is None:
                flat = rows.reshape(-1)
                sh = np.searchsorted(self.row_offsets, flat, side="right") - 1
                out = self._take_grouped(cols, flat[:, None], sh).reshape(rows.shape + cols[0].shape[1:])
            else:
                flat = rows.reshape(rows.shape[0], -1)
                out = self._take_grouped(cols, flat, np.asarray(shard)).reshape(rows.shape + cols[0].shape[1:])
        self._read_since_release += rows.size * mmap.PAGESIZE  # pages a read may map (no /proc: see maybe_release)
        self.maybe_release()
        return out

    def _take_grouped(self, cols, rows2d: np.ndarray, sh: np.ndarray) -> np.ndarray:
        out = np.empty((rows2d.shape[0], rows2d.shape[1]) + cols[0].shape[1:], cols[0].dtype)
        order = np.argsort(sh, kind="stable")
        bounds = np.searchsorted(sh[order], np.arange(len(cols) + 1))
        for k in range(len(cols)):
            lo, hi = bounds[k], bounds[k + 1]
            if lo == hi:
                continue
            sel = order[lo:hi]
            out[sel] = cols[k][rows2d[sel] - self.row_offsets[k]]
        return out

    def maybe_release(self) -> None:
        """Drop this process's mapping of the pages read so far once they add ``release_mib`` MiB to
        its resident size.

        Pages of a memory-mapped file count in the process's resident size once touched (and the
        kernel maps up to 16 cached neighbours per fault); reading rows at random over many GB would
        grow it towards the dataset's size. ``MADV_DONTNEED`` unmaps them (the kernel's page cache
        keeps them; the next read maps them back), so the resident size stays within about
        ``release_mib`` (plus one gather) of what it was; checked after every gather. The growth is read from
        ``/proc/self/statm`` (file-backed resident pages); elsewhere it is estimated as 16 pages per row read.
        """
        now = _file_rss()
        if now is None:
            now = self._read_since_release * 16
        if self._rss_base is None:
            self._rss_base = now
        if now - self._rss_base < self.release_bytes:
            return
        with self._release_lock:  # prefetch threads: one release at a time
            now = _file_rss()
            if now is not None and now - self._rss_base < self.release_bytes:
                return  # another thread released meanwhile
            for s in self.stores:
                for mm in s.maps:
                    try:
                        mm._mmap.madvise(mmap.MADV_DONTNEED)  # noqa: SLF001
                    except (AttributeError, OSError, ValueError):
                        pass
            self._read_since_release = 0
            self._rss_base = _file_rss() if _file_rss() is not None else 0
            self.releases += 1

    # -- the whole dataset in memory -----------------------------------------------------------
    def to_chunk_data(self, window: int):
        """All shards concatenated and scaled into a :class:`ChunkData` (device mode; needs
        :attr:`nbytes` of memory): the arrays :meth:`OGBenchDataset.prepare` makes of one file
        holding the same rows."""
        import jax.numpy as jnp

        obs = np.concatenate(self.column("observations"))
        scaled = self.obs_scaler(obs)
        del obs
        n = self.size
        if self.task_mode == "oraclerep":
            assert self.goal_scaler is not None  # oraclerep: fitted on the oracle goals in __init__
            goals = self.goal_scaler(np.concatenate(self.column("oracle_reps")))
        elif self.task_mode == "goal":
            goals = scaled
        else:
            goals = np.zeros((n, 0), np.float32)
        if self.task_mode == "singletask":
            rewards = np.concatenate(self.column("rewards"))
            masks = np.ones(n, np.float32) if self.singletask_masks == "ones" else np.concatenate(self.column("masks"))
        else:
            rewards, masks = np.zeros(n, np.float32), np.ones(n, np.float32)
        valids = np.ones(n, np.float32)
        valids[self.traj[:, 1]] = 0.0
        traj_end = trajectory_ends(valids)
        return ChunkData(
            observations=jnp.asarray(scaled),
            actions=jnp.asarray(np.concatenate(self.column("actions"))),
            goals=jnp.asarray(goals),
            rewards=jnp.asarray(rewards),
            masks=jnp.asarray(masks),
            traj_end=jnp.asarray(traj_end),
            starts=jnp.asarray(valid_starts(traj_end, window)),
        )


def _file_rss() -> int | None:
    """Bytes of this process's resident shared (file-backed) pages, from ``/proc/self/statm``; None
    where there is no such file."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[2]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return None


def open_sharded(
    directory: str | os.PathLike,
    *,
    base_name: str,
    dataset_name: str,
    task_mode: str,
    singletask_masks: str = "ogbench",
    scale_with: str = "val",
    env=None,
    cache_dir=None,
    max_shards: int | None = None,
    sampling: str = "uniform",
    rotation_interval: int = 1000,
    release_mib: int = 256,
    progress: bool = True,
) -> ShardedData:
    """Convert (once) and memory-map every shard of ``base_name`` in ``directory`` (see the module doc).

    Raises:
      DatasetNotFoundError / DatasetError: see :func:`list_shards` and :func:`convert_shard`.
    """
    shards = list_shards(directory, base_name, max_shards)
    stores = []
    todo = [s for s in shards if _needs_conversion(s, base_name, dataset_name, cache_dir)]
    if todo and progress:
        print(
            f"macfw: converting {len(todo)} of {len(shards)} shard(s) of {dataset_name} in {str(directory)!r} "
            f"into memory-mappable stores under {str(store_root(cache_dir))!r} (once)",
            flush=True,
        )
    for s in shards:
        st = convert_shard(s, base_name=base_name, dataset_name=dataset_name, env=env, cache_dir=cache_dir)
        if st.convert_s and progress:
            print(f"macfw: converted {s.name} ({st.rows} rows) in {st.convert_s:.1f} s", flush=True)
        stores.append(st)
    return ShardedData(
        stores,
        task_mode=task_mode,
        singletask_masks=singletask_masks,
        scale_with=scale_with,
        sampling=sampling,
        rotation_interval=rotation_interval,
        release_mib=release_mib,
    )


def _needs_conversion(shard: Path, base_name: str, dataset_name: str, cache_dir) -> bool:
    folder = store_dir(shard, cache_dir)
    sources = _sources(shard)
    variant = variant_name(dataset_name, base_name)
    return manifest_problem(folder / "base", sources) is not None or (
        variant is not None and manifest_problem(folder / variant, sources) is not None
    )
