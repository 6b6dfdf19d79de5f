"""Data-parallel training: 4 forced host CPU devices and two jax.distributed processes give the
parameters of one device (same global batch and seed); the batch really is sharded; host-batch
mode; checkpoints move between device counts; mesh/batch-size errors.

The device count must be fixed before jax is imported, so every multi-device case runs
``tests/_scripts/par_worker.py`` in a subprocess. All workers start together (one module fixture)
so their XLA compilations overlap; the 1- and 4-device workers restore each other's checkpoint.
``MACFW_TEST_SUBPROCESS_TIMEOUT`` (seconds, default 480) bounds each worker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "_scripts" / "par_worker.py"
TIMEOUT = float(os.environ.get("MACFW_TEST_SUBPROCESS_TIMEOUT", "480"))
RTOL, ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, dist: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACFW_")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(dist or {})
    return env


class Workers:
    """Started worker subprocesses; :meth:`result` waits for one (failing fast if a peer failed)."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, tuple[subprocess.Popen, float]] = {}
        self.peers: dict[str, list[str]] = {}

    def start(self, name: str, args: list[str], devices: int, dist: dict | None = None, peers=()):
        log = self.root / f"{name}.log"
        f = open(log, "w")
        p = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            env=_env(devices, dist),
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=str(Path(__file__).parents[1]),
        )
        f.close()
        self.procs[name] = (p, time.time())
        self.peers[name] = list(peers)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()[-6000:]

    def _fail(self, msg: str, names):
        for n in names:
            p, _ = self.procs[n]
            if p.poll() is None:
                p.kill()
                p.wait()
        pytest.fail(
            msg + "".join(f"\n----- {n} (rc {self.procs[n][0].returncode}) output:\n{self.log(n)}" for n in names),
            pytrace=False,
        )

    def result(self, name: str) -> Path:
        p, t0 = self.procs[name]
        group = [name, *self.peers[name]]
        while p.poll() is None:
            for peer in self.peers[name]:
                if self.procs[peer][0].poll() not in (None, 0):
                    self._fail(f"worker {name!r}: its peer {peer!r} failed", group)
            if time.time() - t0 > TIMEOUT:
                self._fail(f"worker {name!r} timed out after {TIMEOUT:.0f} s", group)
            time.sleep(0.25)
        if p.returncode != 0:
            self._fail(f"worker {name!r} exited with {p.returncode}", group)
        return self.root / name

    def close(self):
        for p, _ in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    w = Workers(root)
    ck1, ck4 = str(root / "ck1"), str(root / "ck4")
    wait = ["--wait-s", str(TIMEOUT)]
    w.start(
        "d4",
        ["--out", str(root / "d4"), "--host", "--errors", "--ckpt-save", ck4, "--ckpt-restore", ck1, *wait],
        devices=4,
        peers=["d1"],
    )
    w.start(
        "d1", ["--out", str(root / "d1"), "--ckpt-save", ck1, "--ckpt-restore", ck4, *wait], devices=1, peers=["d4"]
    )
    port = _free_port()
    for i in range(2):
        dist = {"MACFW_COORDINATOR": f"127.0.0.1:{port}", "MACFW_NUM_PROCESSES": "2", "MACFW_PROCESS_ID": str(i)}
        w.start(f"dist{i}", ["--out", str(root / "dist")], devices=2, dist=dist, peers=[f"dist{1 - i}"])
    yield w
    w.close()


def _info(d: Path, sfx: str = "") -> dict:
    return json.loads((d / f"info{sfx}.json").read_text())


def _load(path: Path) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _assert_trees_close(actual, desired, what: str, exact: bool = False):
    assert len(actual) == len(desired), f"{what}: {len(actual)} leaves vs {len(desired)}"
    for i, (a, d) in enumerate(zip(actual, desired)):
        assert a.shape == d.shape and a.dtype == d.dtype, f"{what}: leaf {i} {a.shape} {a.dtype} vs {d.shape} {d.dtype}"
        if exact:
            np.testing.assert_array_equal(a, d, err_msg=f"{what}: leaf {i}")
        else:
            np.testing.assert_allclose(a, d, rtol=RTOL, atol=ATOL, err_msg=f"{what}: leaf {i}")


def _max_change(a_leaves, b_leaves) -> float:
    return max(
        float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) for a, b in zip(a_leaves, b_leaves) if a.size
    )


# ----------------------------------------------------------------------------- 1. 4 devices == 1 device
def test_four_devices_match_one_device(workers):
    d4, d1 = workers.result("d4"), workers.result("d1")
    i4, i1 = _info(d4), _info(d1)
    assert (i4["device_count"], i4["mesh_shape"]) == (4, {"data": 4})
    assert (i1["device_count"], i1["mesh_shape"]) == (1, {"data": 1})
    assert i4["step"] == i1["step"] == 3 * i1["K"]
    assert all(i4["finite"]) and all(i1["finite"])
    p4, p1 = _load(d4 / "params.npz"), _load(d1 / "params.npz")
    assert _max_change(p1, _load(d1 / "init_params.npz")) > 1e-4, "training did not change the parameters"
    _assert_trees_close(p4, p1, "params, 4 devices vs 1")
    # the rest of the state too: target value, Adam moments, step, key
    _assert_trees_close(_load(d4 / "state.npz"), _load(d1 / "state.npz"), "train state, 4 devices vs 1")
    np.testing.assert_allclose(i4["losses"], i1["losses"], rtol=RTOL)


def test_four_device_step_is_partitioned(workers):
    """The batch is split over the devices: the compiled 4-device program is SPMD-partitioned 4 ways
    and all-reduces (the gradient of the per-device batch shards), the 1-device program does not;
    state and dataset stay replicated on every device."""
    i4, i1 = _info(workers.result("d4")), _info(workers.result("d1"))
    assert i4["hlo_num_partitions"] == 4, i4
    assert i4["hlo_all_reduce"] > 0, "no all-reduce in the 4-device step: the batch is not sharded"
    assert i1["hlo_num_partitions"] == 1 and i1["hlo_all_reduce"] == 0, i1
    assert i4["state_replicated"] and i4["data_replicated"]


# ----------------------------------------------------------------------------- 2. host-batch mode
def test_host_batches_four_devices(workers):
    d4 = workers.result("d4")
    info = _info(d4)
    K, B, ob = info["K"], info["batch"], info["ob_dim"]
    # HostBatches delivers (K, B, ...) stacks sharded along the batch axis over the 4 devices
    assert info["host_batch_obs_shape"] == [K, B, ob]
    assert info["host_batch_num_shards"] == 4
    assert info["host_batch_shard_shapes"] == [[K, B // 4, ob]]
    a, b = _load(d4 / "host_a.npz"), _load(d4 / "host_b.npz")
    assert info["host_a_step"] == info["host_b_step"] == 3 * K
    assert all(info["host_a_finite"]) and all(info["host_b_finite"])
    assert [list(x.shape) for x in a] == info["params_shapes"]
    assert all(np.all(np.isfinite(x)) for x in a)
    assert _max_change(a, _load(d4 / "init_params.npz")) > 1e-4, "host-batch training did not change the parameters"
    _assert_trees_close(a, b, "two host-batch runs with the same key", exact=True)


# ----------------------------------------------------------------------------- 3. two processes
def test_two_processes_match_single_process(workers):
    workers.result("dist0")
    dist = workers.result("dist1").parent / "dist"  # both processes write into one folder
    ref = _load(workers.result("d1") / "params.npz")
    for i in range(2):
        info = _info(dist, f"_p{i}")
        assert (info["process_count"], info["process_index"], info["device_count"], info["local_device_count"]) == (
            2,
            i,
            4,
            2,
        ), info
        assert info["mesh_shape"] == {"data": 4}
        assert info["hlo_num_partitions"] == 4 and info["hlo_all_reduce"] > 0, info
        assert all(info["finite"]) and info["step"] == 3 * info["K"]
        _assert_trees_close(_load(dist / f"params_p{i}.npz"), ref, f"params of process {i} (2 x 2 devices) vs 1 device")


# ----------------------------------------------------------------------------- 4. checkpoints across device counts
@pytest.mark.parametrize("saver,restorer", [("d4", "d1"), ("d1", "d4")], ids=["4to1", "1to4"])
def test_checkpoint_across_device_counts(workers, saver, restorer):
    ds, dr = workers.result(saver), workers.result(restorer)
    info_s, info_r = _info(ds), _info(dr)
    assert info_r["restored_meta_devices"] == info_s["device_count"]
    assert info_r["restored_replicated"], f"restored state is not replicated over {info_r['device_count']} devices"
    saved, restored, template = _load(ds / "state.npz"), _load(dr / "restored.npz"), _load(dr / "init.npz")
    assert any(not np.array_equal(r, t) for r, t in zip(restored, template)), "restore returned the template"
    _assert_trees_close(
        restored,
        saved,
        f"state saved with {info_s['device_count']} devices, restored with {info_r['device_count']}",
        exact=True,
    )


# ----------------------------------------------------------------------------- 5. argument errors
def test_make_mesh_shape_error(workers):
    import jax

    from macfw.parallel import make_mesh

    with pytest.raises(ValueError, match=r"\(2,\)"):
        make_mesh(mesh_shape=(2,), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        make_mesh(mesh_shape=(2, 2), axis_names=("data", "model"), devices=jax.devices()[:1])
    err = _info(workers.result("d4"))["errors"]["mesh"]
    assert err is not None and "(3,)" in err, f"make_mesh((3,)) on 4 devices: {err!r}"


def test_batch_size_not_divisible_by_data_axis(workers):
    info = _info(workers.result("d4"))
    err, bad = info["errors"]["batch"], str(info["batch"] - 2)
    assert err is not None, f"TrainStep accepted batch_size={bad} on a 4-device data axis"
    assert bad in err and "4" in err, err
