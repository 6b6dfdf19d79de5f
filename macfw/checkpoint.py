"""Orbax checkpoints of a whole training run: one folder per step under ``WORKDIR/checkpoints``.

A checkpoint holds the train state's arrays (parameters, optimiser state, target network, RNG
key data, step) and a JSON ``meta`` item (scaling statistics, sizes, the operative Gin config,
versions). Steps are counted in gradient steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the configured model (names the differing component)."""


def _leaves_with_names(tree) -> tuple[list[str], list[Any], Any]:
    arrays, static = eqx.partition(tree, eqx.is_array)
    flat, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    names = [jax.tree_util.keystr(p) for p, _ in flat]
    return names, [x for _, x in flat], (treedef, static)


def state_to_items(state) -> tuple[dict[str, Any], list[str]]:
    """Flatten a train state into ``{'a00000': array, ...}`` and the list of leaf names."""
    names, leaves, _ = _leaves_with_names(state)
    return {f"a{i:05d}": leaf for i, leaf in enumerate(leaves)}, names


def items_to_state(items: dict, template):
    """Inverse of :func:`state_to_items` onto ``template``'s structure."""
    _, leaves, (treedef, static) = _leaves_with_names(template)
    new = [items[f"a{i:05d}"] for i in range(len(leaves))]
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, new), static)


def _component(name: str) -> str:
    """'.nets.dynamics.net.layers[0].weight' -> 'nets.dynamics'."""
    parts = name.lstrip(".").split(".")
    return ".".join(parts[:2]) if parts and parts[0] in ("nets",) else parts[0]


class Checkpointer:
    """Save and restore train states with an Orbax ``CheckpointManager``.

    Args:
      directory: the checkpoints folder (created).
      max_to_keep: newest steps kept (None keeps all).
      async_save: write in a background thread; :meth:`wait` blocks until done.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, meta: dict, *, force: bool = True) -> bool:
        items, names = state_to_items(state)
        meta = dict(meta, leaf_names=names, leaf_shapes=[list(np.shape(x)) for x in items.values()],
                    leaf_dtypes=[str(x.dtype) for x in items.values()])
        return self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, template, step: int | None = None) -> tuple[Any, dict]:
        """Restore ``step`` (default: newest) onto ``template``'s structure and shardings.

        Raises:
          FileNotFoundError: no checkpoint.
          CheckpointMismatchError: array names or shapes differ from the template (the message
            names the first differing component and both shapes).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        meta = self.read_meta(step)
        items, names = state_to_items(template)
        saved_names, saved_shapes = meta.get("leaf_names", []), meta.get("leaf_shapes", [])
        if saved_names != names or [list(np.shape(x)) for x in items.values()] != saved_shapes:
            raise CheckpointMismatchError(_describe_mismatch(names, items, saved_names, saved_shapes, step, self.directory))
        abstract = {
            k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=getattr(v, "sharding", None)) for k, v in items.items()
        }
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return items_to_state(dict(out["state"]), template), dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _describe_mismatch(names, items, saved_names, saved_shapes, step, directory) -> str:
    shapes = [list(np.shape(x)) for x in items.values()]
    cur = dict(zip(names, shapes))
    old = dict(zip(saved_names, saved_shapes))
    for n in names:
        if n not in old:
            return (f"Checkpoint step {step} in {directory} has no array {n!r} (component {_component(n)!r}): the "
                    "configured model differs from the saved one. Use the original config or a new --workdir.")
        if old[n] != cur[n]:
            return (f"Checkpoint step {step} in {directory}: component {_component(n)!r} array {n!r} has shape "
                    f"{tuple(old[n])} in the checkpoint but {tuple(cur[n])} in the configured model. Resume with the "
                    "original shapes (network sizes, chunk length, dataset) or start a new --workdir.")
    for n in saved_names:
        if n not in cur:
            return (f"Checkpoint step {step} in {directory} holds {n!r} (component {_component(n)!r}) which the "
                    "configured model lacks. Use the original config or a new --workdir.")
    return f"Checkpoint step {step} in {directory} does not match the configured model."
