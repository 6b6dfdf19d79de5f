"""Devices, meshes and multi-host setup for data-parallel training.

The batch is sharded along the mesh's ``data`` axis; parameters, optimiser state and the
on-device dataset are replicated. Multi-host runs call :func:`initialize_distributed` first.
"""

from __future__ import annotations

import os

import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from macfw.errors import check

DATA_AXIS = "data"


@gin.configurable
def make_mesh(
    mesh_shape: tuple[int, ...] | None = None, axis_names: tuple[str, ...] = (DATA_AXIS,), devices=None
) -> Mesh:
    """A mesh over all (global) devices; by default one ``data`` axis of every device.

    Args:
      mesh_shape: e.g. ``(4,)`` or ``(2, 2)`` with ``axis_names=('data', 'model')``; ``-1`` fills.
      axis_names: names of the mesh axes; must include ``'data'``.

    Raises:
      ConfigError (a ValueError): no ``'data'`` axis, or a shape that does not use every device
        or has not one entry per axis name.
    """
    devices = np.array(jax.devices() if devices is None else devices)
    check("make_mesh.axis_names", axis_names, DATA_AXIS in axis_names, f"names that include {DATA_AXIS!r}")
    shape = (devices.size,) if mesh_shape is None else tuple(mesh_shape)
    try:
        arr = devices.reshape(shape) if len(shape) == len(axis_names) else None
    except (ValueError, TypeError):
        arr = None
    check(
        "make_mesh.mesh_shape",
        mesh_shape,
        arr is not None,
        f"a shape covering the {devices.size} device(s) "
        f"(-1 fills) with one entry per name in make_mesh.axis_names = {tuple(axis_names)}",
    )
    assert arr is not None  # check refused a shape that does not fit
    return Mesh(arr, axis_names)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def data_axis_size(mesh: Mesh) -> int:
    return int(mesh.shape[DATA_AXIS])


def put_replicated(tree, mesh: Mesh):
    """Place every array leaf of ``tree`` on every device of ``mesh`` (works multi-host)."""
    sharding = replicated(mesh)

    def put(x):
        if not isinstance(x, (jax.Array, np.ndarray)):
            return x
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        host = np.asarray(x) if not isinstance(x, jax.Array) or x.is_fully_addressable else to_host(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(put, tree)


def to_host(x):
    """A numpy copy of a (replicated) array, also when it spans several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Start ``jax.distributed`` from arguments or ``MACFW_COORDINATOR`` / ``MACFW_NUM_PROCESSES`` /
    ``MACFW_PROCESS_ID``. Returns True when a multi-process run was initialised.

    On CPU the cross-process collectives use gloo.
    """
    coordinator_address = coordinator_address or os.environ.get("MACFW_COORDINATOR")
    if num_processes is None and os.environ.get("MACFW_NUM_PROCESSES"):
        num_processes = int(os.environ["MACFW_NUM_PROCESSES"])
    if process_id is None and os.environ.get("MACFW_PROCESS_ID"):
        process_id = int(os.environ["MACFW_PROCESS_ID"])
    if coordinator_address is None:
        return False
    if num_processes is None or process_id is None:
        raise ValueError(
            f"A coordinator address ({coordinator_address!r}) needs num_processes and process_id too "
            f"(got {num_processes!r}, {process_id!r}); pass --num_processes/--process_id or set "
            "MACFW_NUM_PROCESSES/MACFW_PROCESS_ID."
        )
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # pragma: no cover - option absent in some versions
        pass
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return True
