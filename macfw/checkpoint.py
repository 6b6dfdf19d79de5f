"""Orbax checkpoints of a whole training run: one folder per step under ``WORKDIR/checkpoints``.

A checkpoint holds the train state's arrays and a JSON ``meta`` item; together they are all a
resume needs:

* ``state``: parameters (``nets``), optimiser state, target network (``target_value``), the RNG
  key as raw ``uint32`` key data (``key``; in device-sampling mode this is also the data sampler's
  state, since batches are drawn from it), and ``step``;
* ``meta``: the data sizes (``spec``), the observation/goal scaling statistics, the dataset and
  evaluation environment, the sampler mode (device: the key above; host: batches are drawn from
  ``fold_in(PRNGKey(seed + 7919), step)``, so the step *is* the sampler's state; host-sampled
  shards: the key data, sampling mode, the shards and the scaling statistics' source, plus the
  sampler ``state``, the step and grain's iterator state, see :mod:`macfw.data.host_sampler`), the operative
  Gin config (``gin_config``), the versions of macfw, jax, equinox, orbax and ogbench, and the
  names, shapes and dtypes of every saved array (to name a mismatching component on restore).

Steps are counted in gradient steps.

Complete or invisible. Orbax writes a step into ``<step>.orbax-checkpoint-tmp*`` and renames it
when done. On top of that, once a save has finished, a manifest ``macfw_manifest.json`` listing
every file of the step folder and its size is written into it atomically (temporary file, fsync,
``os.replace``). :meth:`Checkpointer.all_steps` lists only steps whose manifest exists and matches
the files on disk, so a step being written, half deleted or damaged is never listed or restored.
Old steps (beyond ``max_to_keep``) are deleted by this class, never by Orbax, and only after the
newer step's manifest is written: the manifest first (the step disappears at once), then the folder
is renamed into ``.macfw-trash`` and removed. On start (unless read-only), leftover temporary
folders, the trash and step folders without a valid manifest are removed, under the run folder's
lock (:mod:`macfw.workdir_lock`; another run's save in progress looks exactly like a leftover); a
valid step is never touched. Errors of asynchronous saves are raised by the next
:meth:`Checkpointer.save`, :meth:`Checkpointer.wait` or :meth:`Checkpointer.close`, and a step
whose save failed never becomes visible. :meth:`Checkpointer.restore` of the newest step falls
back to the next older valid one (with a warning naming the broken step) if the newest cannot be
read.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from macfw.fsync import fsync_path
from macfw.workdir_lock import cleanup_lock

MANIFEST = "macfw_manifest.json"
TRASH = ".macfw-trash"
TMP_MARK = ".orbax-checkpoint-tmp"
MANIFEST_FORMAT = 1


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the configured model (names the differing component)."""


class CheckpointSaveError(RuntimeError):
    """A save did not complete (the step stays invisible; older steps are kept)."""


class NonFiniteStateError(FloatingPointError):
    """Refused to save a state with NaN/Inf values (names the step and the first bad array)."""


def _leaves_with_names(tree) -> tuple[list[str], list[Any], Any]:
    arrays, static = eqx.partition(tree, eqx.is_array)
    flat, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    names = [jax.tree_util.keystr(p) for p, _ in flat]
    return names, [x for _, x in flat], (treedef, static)


def state_to_items(state) -> tuple[dict[str, Any], list[str]]:
    """Flatten a train state into ``{'a00000': array, ...}`` and the list of leaf names."""
    names, leaves, _ = _leaves_with_names(state)
    return {f"a{i:05d}": leaf for i, leaf in enumerate(leaves)}, names


def _size(x) -> int:
    return int(np.prod(np.shape(x), dtype=np.int64))


def items_to_state(items: dict, template):
    """Inverse of :func:`state_to_items` onto ``template``'s structure."""
    _, leaves, (treedef, static) = _leaves_with_names(template)
    new = [items[f"a{i:05d}"] for i in range(len(leaves))]
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, new), static)


def _component(name: str) -> str:
    """'.nets.dynamics.net.layers[0].weight' -> 'nets.dynamics'."""
    parts = name.lstrip(".").split(".")
    return ".".join(parts[:2]) if parts and parts[0] in ("nets",) else parts[0]


# ------------------------------------------------------------------------------- manifests
def _files_on_disk(folder: Path) -> dict[str, int]:
    out = {}
    for root, _dirs, files in os.walk(folder):
        for f in files:
            p = Path(root) / f
            rel = p.relative_to(folder).as_posix()
            if rel == MANIFEST:
                continue
            out[rel] = p.stat().st_size
    return out


def manifest_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is not a complete step (None when its manifest matches the files on disk)."""
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return "no manifest (the save or a deletion did not finish)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    try:
        files = {str(k): int(v) for k, v in manifest["files"].items()}
        if int(manifest["step"]) != int(folder.name):
            return f"manifest names step {manifest['step']}"
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"malformed manifest ({e!r})"
    try:
        disk = _files_on_disk(folder)
    except OSError as e:
        return f"unreadable folder ({e})"
    if disk != files:
        missing = sorted(set(files) - set(disk))
        extra = sorted(set(disk) - set(files))
        resized = sorted(k for k in set(files) & set(disk) if files[k] != disk[k])
        parts = [
            f"{label} {names[:3]}{'...' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", extra), ("wrong size", resized))
            if names
        ]
        return "files differ from the manifest: " + "; ".join(parts)
    return None


def write_manifest(folder: str | os.PathLike) -> None:
    """List every file of a finished step folder with its size, atomically (tmp + fsync + replace)."""
    folder = Path(folder)
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": int(folder.name),
        "files": _files_on_disk(folder),
        "written_at": time.time(),
    }
    tmp = folder / f"{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    fsync_path(folder)


def _is_primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _host_bool(x) -> bool:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return bool(np.asarray(x))


class _quiet_absl:
    def __init__(self, active: bool):
        self.active, self.old = active, None

    def __enter__(self):
        if self.active:
            from absl import logging as absl_logging

            self.old = absl_logging.get_verbosity()
            absl_logging.set_verbosity(absl_logging.ERROR)

    def __exit__(self, *exc):
        if self.old is not None:
            from absl import logging as absl_logging

            absl_logging.set_verbosity(self.old)


@jax.jit
def _finite_flags(leaves):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


class Checkpointer:
    """Save and restore train states with an Orbax ``CheckpointManager`` (see the module doc).

    Args:
      directory: the checkpoints folder (created unless ``read_only``).
      max_to_keep: newest steps kept (None keeps all).
      async_save: write in a background thread; :meth:`wait` blocks until done (and raises the
        error of a failed save).
      read_only: list and restore only; nothing in ``directory`` is changed and no lock is taken
        (for evaluation, also beside a training run).

    Unless ``read_only``, the primary process removes leftovers of interrupted saves at start (see
    the module doc) under the lock of the run folder, ``directory``'s parent: the lock this process
    holds (:func:`macfw.train.train` takes it first), else the lock taken for the clean-up only.

    Raises:
      WorkdirBusyError: (unless ``read_only``) another process holds the run folder's lock, e.g. a
        training run: nothing is removed.
      FileNotFoundError: (``read_only``) ``directory`` does not exist.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self.read_only = read_only
        self.async_save = async_save
        self._pending: int | None = None
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
            if _is_primary():
                with cleanup_lock(self.directory.parent):  # never beside another writer
                    self._sanitize()
            _sync("macfw_checkpointer_sanitized")
        elif not self.directory.is_dir():
            raise FileNotFoundError(f"No checkpoint folder {str(self.directory)!r}.")
        with _quiet_absl(read_only):  # Orbax logs warnings about read-only options and managers
            read_only_options: dict[str, Any] = {"save_interval_steps": 0} if read_only else {}
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None,  # deletion is ours: only after the newer step's manifest exists
                create=not read_only,
                # Leftover temporary folders are removed by _sanitize above, synchronously. Orbax's own
                # clean-up runs in a background thread that close() does not join: a process stopping
                # right after start-up (SIGTERM) then dies with that thread's traceback.
                cleanup_tmp_directories=False,
                enable_async_checkpointing=async_save,
                read_only=read_only,
                **read_only_options,
            )
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    # ------------------------------------------------------------------ housekeeping
    def _remove(self, folder: Path) -> None:
        """Make ``folder`` invisible at once (manifest first, then a rename), then delete it."""
        try:
            (folder / MANIFEST).unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass
        trash = self.directory / TRASH
        trash.mkdir(exist_ok=True)
        target = trash / f"{folder.name}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(folder, target)
        except FileNotFoundError:
            return
        shutil.rmtree(target, ignore_errors=True)
        try:
            trash.rmdir()  # only when empty
        except OSError:
            pass

    def _sanitize(self) -> None:
        """Remove leftovers of interrupted saves and deletions; never touches a valid step. Only under
        the run folder's lock (:func:`macfw.workdir_lock.cleanup_lock`)."""
        for entry in sorted(self.directory.iterdir()):
            name = entry.name
            if name == TRASH:
                shutil.rmtree(entry, ignore_errors=True)
            elif TMP_MARK in name:
                warnings.warn(
                    f"Removing the unfinished save {str(entry)!r} (a run was interrupted while saving).", stacklevel=2
                )
                self._remove(entry)
            elif name.isdigit() and entry.is_dir():
                problem = manifest_problem(entry)
                if problem is not None:
                    warnings.warn(
                        f"Removing incomplete checkpoint step {int(name)} ({str(entry)!r}): {problem}.", stacklevel=2
                    )
                    self._remove(entry)

    def _quarantine(self, step: int, reason: str) -> None:
        """Rename an unreadable step to ``<step>.broken-<time>`` (kept for inspection, never listed)."""
        if self.read_only or not _is_primary():
            return
        src = self.directory / str(step)
        dst = self.directory / f"{step}.broken-{int(time.time())}"
        try:
            (src / MANIFEST).unlink()
            os.rename(src, dst)
            warnings.warn(f"Moved the unreadable checkpoint step {step} to {str(dst)!r} ({reason}).", stacklevel=2)
        except OSError:
            pass
        self.manager.reload()

    def _collect_garbage(self, keep_step: int) -> None:
        if self.max_to_keep is None or not _is_primary():
            return
        steps = self.all_steps()
        old = [s for s in steps if s != keep_step][: max(0, len(steps) - self.max_to_keep)]
        for s in old:
            self._remove(self.directory / str(s))

    # ------------------------------------------------------------------ listing
    def all_steps(self) -> list[int]:
        """Steps whose manifest exists and matches the files on disk, oldest first."""
        steps = []
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.name.isdigit() and entry.is_dir() and manifest_problem(entry) is None:
                steps.append(int(entry.name))
        return sorted(steps)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ saving
    def _save_finished(self) -> bool:
        try:
            return not self.manager.is_saving_in_progress()
        except Exception:  # pragma: no cover - older/newer Orbax without the method
            return False

    def _finish_pending(self) -> None:
        """Wait for the pending save, check it, write its manifest, delete old steps."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        final = self.directory / str(step)
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            raise CheckpointSaveError(
                f"Saving checkpoint step {step} in {str(self.directory)!r} failed ({type(e).__name__}: {e}). "
                "The step was not committed; older steps are intact. Check the disk (space, permissions) and "
                "re-run the same command to resume."
            ) from e
        if _is_primary():
            if not ((final / "state").is_dir() and (final / "meta").is_dir()):
                raise CheckpointSaveError(
                    f"Saving checkpoint step {step} in {str(self.directory)!r} did not complete (no committed "
                    f"folder {str(final)!r}); older steps are intact. Re-run the same command to resume."
                )
            write_manifest(final)
            self._collect_garbage(step)
        self.manager.reload()

    def poll(self) -> None:
        """Non-blocking: if the pending asynchronous save has finished, make it visible."""
        if self._pending is not None and self._save_finished():
            self._finish_pending()

    def save(self, step: int, state, meta: dict, *, force: bool = True, check_finite: bool = True) -> bool:
        """Start saving ``state`` as ``step`` (asynchronously unless ``async_save=False``).

        The previous save is finished first (its error, if any, is raised here). Returns False when
        ``step`` is already saved (nothing is written).

        Raises:
          NonFiniteStateError: a floating-point array holds NaN/Inf (nothing is written).
          CheckpointSaveError: this or the previous save failed.
        """
        if self.read_only:
            raise PermissionError(f"Checkpointer for {str(self.directory)!r} is read-only.")
        self._finish_pending()
        step = int(step)
        items, names = state_to_items(state)
        if check_finite:
            inexact = [
                (n, x)
                for n, x in zip(names, items.values())
                if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.inexact)
            ]
            if inexact:
                flags = _finite_flags([x for _, x in inexact])
                if not _host_bool(jnp.all(flags)):
                    bad = [n for (n, _), ok in zip(inexact, np.asarray(jax.device_get(flags)).reshape(-1)) if not ok]
                    raise NonFiniteStateError(
                        f"Refusing to save checkpoint step {step}: {len(bad)} array(s) hold NaN/Inf, first "
                        f"{bad[0]!r} (component {_component(bad[0])!r}). Nothing was written; older steps are "
                        "intact. Lower the learning rate, set MAC.grad_clip, or check the data for NaN/Inf."
                    )
        existing = self.directory / str(step)
        if existing.is_dir() and manifest_problem(existing) is None:  # already saved
            return False
        if existing.exists() and _is_primary():  # a stale, invalid folder of this step
            self._remove(existing)
        _sync(f"macfw_checkpointer_presave_{step}")
        self.manager.reload()
        meta = dict(
            meta,
            leaf_names=names,
            leaf_shapes=[list(np.shape(x)) for x in items.values()],
            leaf_dtypes=[str(x.dtype) for x in items.values()],
        )
        # Zero-size arrays (e.g. the goals of single-task data, (N, 0)) hold no data and Orbax refuses
        # them: they are left out and rebuilt from the template's shapes on restore.
        items = {k: v for k, v in items.items() if _size(v) > 0}
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)),
                force=force,
            )
        except Exception as e:
            raise CheckpointSaveError(
                f"Saving checkpoint step {step} in {str(self.directory)!r} failed ({type(e).__name__}: {e}). "
                "Older steps are intact."
            ) from e
        if saved:
            self._pending = step
            if not self.async_save:
                self._finish_pending()
        return bool(saved)

    def wait(self) -> None:
        """Block until the last save is complete and visible (raises its error, if any)."""
        self._finish_pending()
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    # ------------------------------------------------------------------ restoring
    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No complete checkpoint in {str(self.directory)!r}.")
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(
        self, template, step: int | None = None, *, check_meta: Callable[[dict, int], None] | None = None
    ) -> tuple[Any, dict]:
        """Restore ``step`` (default: the newest valid one) onto ``template``'s structure and shardings.

        With ``step=None``, a newest step that cannot be read (or holds NaN/Inf) is skipped with a
        warning naming it (and, unless read-only, renamed to ``<step>.broken-<time>``), and the
        next older valid step is restored. ``check_meta(meta, step)`` may raise to refuse a step
        (e.g. :class:`CheckpointMismatchError`); such errors are never skipped.

        Array leaves of ``template`` without a sharding get the sharding of the other leaves
        (e.g. the RNG key), so a restored state never lands on a single device by accident.

        Raises:
          FileNotFoundError: no (readable) checkpoint.
          CheckpointMismatchError: array names or shapes differ from the template (the message
            names the first differing component and both shapes).
        """
        if step is not None:
            return self._restore_step(template, int(step), check_meta)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"No complete checkpoint in {str(self.directory)!r}.")
        errors = []
        for s in reversed(steps):
            try:
                return self._restore_step(template, s, check_meta)
            except (CheckpointMismatchError, KeyboardInterrupt):
                raise
            except Exception as e:  # unreadable: fall back to the next older step
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                errors.append(f"step {s}: {msg}")
                older = [x for x in steps if x < s]
                warnings.warn(
                    f"Checkpoint step {s} in {str(self.directory)!r} cannot be restored ({msg}); "
                    + (f"falling back to step {older[-1]}." if older else "no older step is left."),
                    stacklevel=2,
                )
                self._quarantine(s, msg)
        raise FileNotFoundError(f"No readable checkpoint in {str(self.directory)!r}: " + "; ".join(errors))

    def _restore_step(self, template, step: int, check_meta) -> tuple[Any, dict]:
        meta = self.read_meta(step)
        if check_meta is not None:
            check_meta(meta, step)
        items, names = state_to_items(template)
        saved_names, saved_shapes = meta.get("leaf_names", []), meta.get("leaf_shapes", [])
        if saved_names != names or [list(np.shape(x)) for x in items.values()] != saved_shapes:
            raise CheckpointMismatchError(
                _describe_mismatch(names, items, saved_names, saved_shapes, step, self.directory)
            )
        shardings = [getattr(v, "sharding", None) for v in items.values()]
        default = next((s for s in shardings if s is not None), None)
        if default is None:
            default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = {
            k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=s if s is not None else default)
            for (k, v), s in zip(items.items(), shardings)
        }
        empty = {k: a for k, a in abstract.items() if _size(a) == 0}  # not saved (see save)
        abstract = {k: a for k, a in abstract.items() if k not in empty}
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        restored = dict(out["state"])
        restored.update({k: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding) for k, a in empty.items()})
        inexact = [x for x in restored.values() if jnp.issubdtype(x.dtype, jnp.inexact)]
        if inexact and not _host_bool(jnp.all(_finite_flags(inexact))):
            raise FloatingPointError(f"checkpoint step {step} holds NaN/Inf values")
        return items_to_state(restored, template), dict(out["meta"])


def _describe_mismatch(names, items, saved_names, saved_shapes, step, directory) -> str:
    shapes = [list(np.shape(x)) for x in items.values()]
    cur = dict(zip(names, shapes))
    old = dict(zip(saved_names, saved_shapes))
    for n in names:
        if n not in old:
            return (
                f"Checkpoint step {step} in {str(directory)!r} has no array {n!r} (component {_component(n)!r}): "
                "the configured model differs from the saved one. Use the original config or a new --workdir."
            )
        if old[n] != cur[n]:
            return (
                f"Checkpoint step {step} in {str(directory)!r}: component {_component(n)!r} array {n!r} has shape "
                f"{tuple(old[n])} in the checkpoint but {tuple(cur[n])} in the configured model. Resume with the "
                "original shapes (network sizes, chunk length, dataset) or start a new --workdir."
            )
    for n in saved_names:
        if n not in cur:
            return (
                f"Checkpoint step {step} in {str(directory)!r} holds {n!r} (component {_component(n)!r}) which "
                "the configured model lacks. Use the original config or a new --workdir."
            )
    return f"Checkpoint step {step} in {str(directory)!r} does not match the configured model."
