"""End to end on a directory of shards (issue 11): ``python -m macfw.data.generate --shards`` (killed
with SIGKILL and re-run: the same files), a smoke run sampled from the memory-mapped shards on the host
that is SIGKILLed right after its first checkpoint and re-run ends with the checksum of an
uninterrupted run, and two ``jax.distributed`` processes each gather only their rows of the batch.

Subprocesses share the session's dataset and compilation caches (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BASE = "cube-single-play-v0"
pytestmark = pytest.mark.slow


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MACFW_DEBUG",)}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    return env


def _gen_cmd(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "macfw.data.generate",
        "--dataset",
        BASE,
        "--shards",
        "3",
        "--episodes",
        "2",
        "--episode-length",
        "101",
        "--workers",
        "1",
        "--seed",
        "5",
        "--no-progress",
        "--out",
        str(out),
    ]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900, **kw)


def _ok(r, what):
    assert r.returncode == 0, f"{what}: exit code {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "shards"
    _ok(_run(_gen_cmd(out)), "generate --shards")
    return out


@pytest.mark.slow
def test_generation_killed_and_rerun_gives_the_same_shards(shards, tmp_path):
    out = tmp_path / "killed"
    p = subprocess.Popen(_gen_cmd(out), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / f"{BASE}-000.npz"
    t0 = time.time()
    while not first.exists() and p.poll() is None and time.time() - t0 < 600:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert first.exists() and not (out / f"{BASE}-002.npz").exists(), "the kill came too late to test resuming"
    r = _run(_gen_cmd(out))
    _ok(r, "generate --shards, re-run")
    assert "already in" in r.stdout
    names = sorted(p.name for p in shards.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names and len(names) == 6
    for name in names:
        with np.load(out / name) as a, np.load(shards / name) as b:
            for k in b.files:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")


def _train_cmd(shards: Path, workdir: Path, *bindings: str) -> list[str]:
    cmd = [sys.executable, "-m", "macfw.run", "--gin_file", "gin/smoke.gin", "--workdir", str(workdir)]
    for b in (
        "train.progress = False",
        f"OGBenchDataset.dataset_path = '{shards}'",
        "train.data_on_device = False",
        *bindings,
    ):
        cmd += ["--gin_bindings", b]
    return cmd


@pytest.mark.slow
def test_sharded_smoke_run_resumes_after_sigkill_to_the_same_checksum(shards, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    with ThreadPoolExecutor(max_workers=2) as pool:
        f_ref = pool.submit(_run, _train_cmd(shards, ref))
        f_k1 = pool.submit(_run, _train_cmd(shards, killed, "train.debug_sigkill_after_save = 20"))
        r_ref, r_k1 = f_ref.result(), f_k1.result()
    _ok(r_ref, "uninterrupted sharded run")
    assert r_k1.returncode == -9, (r_k1.returncode, r_k1.stderr[-3000:])
    assert not (killed / "summary.json").exists()
    r_k2 = _run(_train_cmd(shards, killed))
    _ok(r_k2, "resumed sharded run")
    assert "resuming from step 20" in r_k2.stdout, r_k2.stdout[-2000:]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, killed))
    assert a["data"]["sampler"] == "host-shards" and a["data"]["num_shards"] == 3, a["data"]
    assert a["num_transitions"] == 3 * 2 * 101
    assert b["param_checksum"] == a["param_checksum"]
    from macfw.checkpoint import Checkpointer

    meta = Checkpointer(killed / "checkpoints", read_only=True).read_meta(20)
    s = meta["sampler"]
    assert s["mode"] == "host-shards" and s["state"]["step"] == 20 and len(s["shards"]) == 3, s
    # resuming on other shards is refused (the data stream would change)
    fewer = _run(
        _train_cmd(shards, killed, "OGBenchDataset.max_shards = 2", "train.num_steps = 60", "train.eval_interval = 60")
    )
    assert fewer.returncode != 0 and "shard" in fewer.stderr, fewer.stderr[-2000:]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_gather_only_their_rows(shards, tmp_path):
    """2 processes x 1 CPU device: each converts (concurrently, into one cache) and gathers rows
    [4 i, 4 i + 4) of the 8-row batch; those equal the same rows of a one-process batch."""
    import jax

    from macfw.agents.base import BatchSpec
    from macfw.data.host_sampler import ShardSampler
    from macfw.data.ogbench_data import OGBenchDataset

    port, out, cache = _free_port(), tmp_path / "out", tmp_path / "cache"
    procs = []
    for i in range(2):
        env = _env(MACFW_COORDINATOR=f"127.0.0.1:{port}", MACFW_NUM_PROCESSES="2", MACFW_PROCESS_ID=str(i))
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "tests" / "_scripts" / "shard_worker.py"),
                    "--shards",
                    str(shards),
                    "--cache",
                    str(cache),
                    "--out",
                    str(out),
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    loaded = OGBenchDataset(
        env_name="cube-single", task_mode="oraclerep", dataset_path=str(shards), cache_dir=str(tmp_path / "cache1")
    ).load(5, 5)
    smp = ShardSampler(
        loaded.data, batch_spec=BatchSpec(chunk_len=5, gamma=0.99), goal_conditioned=True, key=jax.random.PRNGKey(3)
    )
    whole = [smp.stack(10 + 2 * d, 2, 8) for d in range(2)]
    for i in range(2):
        info = json.loads((out / f"p{i}.json").read_text())
        assert info["count"] == 2 and info["rows"] == [4 * i, 4 * i + 4], info
        assert info["shapes"]["obs"] == [2, 8, loaded.spec.ob_dim]
        with np.load(out / f"p{i}.npz") as z:
            for d in range(2):
                for k, v in whole[d].items():
                    np.testing.assert_array_equal(z[f"{d}/{k}"], v[:, 4 * i : 4 * i + 4], err_msg=f"p{i} {d}/{k}")
