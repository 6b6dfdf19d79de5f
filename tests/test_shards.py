"""Sharded datasets (issue 11, DESIGN §10): shard files, the memory-mapped stores and their conversion,
the host sampler against ``sample_batch``, shard rotation, resumable streams, per-process rows, bounded
resident memory, sharded generation, and the bench's pieces.

Data: three tiny cube-single shards made by ``generate_shards`` (2 episodes of 40 steps each, plus a
validation episode), generated once per session; each test converts them into its own store folder.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, cast

import jax
import numpy as np
import pytest

from macfw.agents.base import BatchSpec
from macfw.data.batches import sample_batch
from macfw.data.generate import generate_shards
from macfw.data.host_sampler import ShardedBatches, ShardSampler, process_rows
from macfw.data.ogbench_data import DatasetError, DatasetNotFoundError, OGBenchDataset
from macfw.data.shards import (
    MANIFEST,
    ShardedData,
    list_shards,
    manifest_problem,
    open_sharded,
    parse_shard_name,
    store_dir,
    val_path,
)
from macfw.errors import ConfigError

BASE = "cube-single-play-v0"
EPISODES, LENGTH = 2, 40
ROWS = EPISODES * LENGTH


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generate_shards(BASE, out, 3, EPISODES, episode_length=LENGTH, seed=3, workers=1, progress=False)
    return out


def _load(shard_dir, cache, task_mode="singletask", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = OGBenchDataset(
            env_name="cube-single", task_mode=task_mode, dataset_path=str(shard_dir), cache_dir=str(cache), **kw
        )
        return ds, ds.load(5, 5)


def _sample_batch(chunk, spec, gc, key, B):
    fn = functools.partial(
        sample_batch,
        batch_size=B,
        chunk_len=spec.chunk_len,
        gamma=spec.gamma,
        goal_conditioned=gc,
        normalize_reward=spec.normalize_reward,
        future_len=spec.future_len,
    )
    return jax.device_get(jax.jit(fn)(chunk, key))


def _assert_same_batch(a: dict, b: dict, what: str):
    assert set(a) == set(b), (what, set(a) ^ set(b))
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape, (what, k, x.dtype, y.dtype, x.shape, y.shape)
        np.testing.assert_array_equal(x, y, err_msg=f"{what}: field {k}")


# ------------------------------------------------------------------------------------- shard files
def test_shard_names():
    assert parse_shard_name("cube-double-play-v0-003.npz") == ("cube-double-play-v0", 3)
    assert parse_shard_name("cube-double-play-v0-1203.npz") == ("cube-double-play-v0", 1203)
    for name in (
        "cube-double-play-v0-003-val.npz",
        "cube-double-play-v0-003.npz.tmp-12.npz",
        "cube-double-play-v0.npz",
        "notes.txt",
    ):
        assert parse_shard_name(name) is None, name
    assert val_path(Path("/d/x-play-v0-001.npz")) == Path("/d/x-play-v0-001-val.npz")


def test_list_shards_order_and_errors(tmp_path):
    for i in (2, 0, 10):
        (tmp_path / f"{BASE}-{i:03d}.npz").write_bytes(b"x")
        (tmp_path / f"{BASE}-{i:03d}-val.npz").write_bytes(b"x")
    (tmp_path / f"{BASE}-001.npz.tmp-5.npz").write_bytes(b"x")  # a killed write: not a shard
    assert [p.name for p in list_shards(tmp_path, BASE)] == [f"{BASE}-000.npz", f"{BASE}-002.npz", f"{BASE}-010.npz"]
    assert len(list_shards(tmp_path, BASE, max_shards=2)) == 2
    with pytest.raises(DatasetNotFoundError, match="cube-single-play-v0"):
        list_shards(tmp_path, "cube-double-play-v0")  # names what the folder does hold
    (tmp_path / f"{BASE}-002-val.npz").unlink()
    with pytest.raises(DatasetNotFoundError, match="002-val.npz"):
        list_shards(tmp_path, BASE)
    (tmp_path / f"{BASE}-0000.npz").write_bytes(b"x")
    with pytest.raises(DatasetError, match="two shards with index 0"):
        list_shards(tmp_path, BASE)
    with pytest.raises(DatasetNotFoundError):
        list_shards(tmp_path / "missing", BASE)


# ------------------------------------------------------------------------------------- the store
@pytest.mark.slow
@pytest.mark.parametrize("task_mode", ["singletask", "oraclerep"])
def test_store_holds_what_ogbench_loader_gives(shard_dir, tmp_path, task_mode):
    """Columns of every converted shard == ogbench.make_env_and_datasets of that shard (rewards and
    masks relabelled, oracle goals added by OGBench), actions clipped as prepare() clips them."""
    import ogbench

    ds, loaded = _load(shard_dir, tmp_path, task_mode)
    data = loaded.data
    assert data.num_shards == 3 and data.size == 3 * ROWS and loaded.num_transitions == 3 * ROWS
    for k, st in enumerate(data.stores):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, train, val = cast(  # (ogbench's return type is a union over its env_only / dataset_only flags)
                "tuple[Any, dict, dict]",
                ogbench.make_env_and_datasets(ds.dataset_name, dataset_path=str(st.shard), compact_dataset=True),
            )
        np.testing.assert_array_equal(st.columns["observations"], train["observations"])
        np.testing.assert_array_equal(st.columns["actions"], np.clip(train["actions"], -1 + 1e-5, 1 - 1e-5))
        if task_mode == "singletask":
            np.testing.assert_array_equal(st.columns["rewards"], train["rewards"])
            np.testing.assert_array_equal(st.columns["masks"], train["masks"])
        else:
            np.testing.assert_array_equal(st.columns["oracle_reps"], train["oracle_reps"])
        ends = np.where(train["valids"] < 0.5)[0]
        np.testing.assert_array_equal(st.columns["trajectories"][:, 1], ends)
        np.testing.assert_array_equal(st.columns["trajectories"][:, 0], np.concatenate([[0], ends[:-1] + 1]))
        if k == 0:  # scaling statistics: the first shard's validation file (the authors' choice)
            np.testing.assert_array_equal(loaded.obs_scaler.lo, val["observations"].min(0))
            np.testing.assert_array_equal(loaded.obs_scaler.hi, val["observations"].max(0))
            if task_mode == "oraclerep":
                assert loaded.goal_scaler is not None
                np.testing.assert_array_equal(loaded.goal_scaler.hi, val["oracle_reps"].max(0))
        assert isinstance(st.columns["observations"].base, np.memmap)  # mapped, not loaded


def test_one_shard_directory_is_the_single_file(shard_dir, tmp_path):
    """A directory holding one shard gives exactly the arrays of loading that file alone."""
    one = tmp_path / "one"
    one.mkdir()
    for src in (shard_dir / f"{BASE}-001.npz", val_path(shard_dir / f"{BASE}-001.npz")):
        shutil.copy(src, one / src.name.replace("-001", "-000"))
    _, sharded = _load(one, tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = OGBenchDataset(env_name="cube-single", dataset_path=str(shard_dir / f"{BASE}-001.npz")).load(5, 5)
    chunk = sharded.data.to_chunk_data(5)
    for f in ("observations", "actions", "goals", "rewards", "masks", "traj_end", "starts"):
        np.testing.assert_array_equal(np.asarray(getattr(chunk, f)), np.asarray(getattr(single.data, f)), err_msg=f)
    np.testing.assert_array_equal(sharded.obs_scaler.lo, single.obs_scaler.lo)
    assert sharded.spec == single.spec


def test_scale_with_train_spans_all_shards(shard_dir, tmp_path):
    _, loaded = _load(shard_dir, tmp_path, scale_with="train")
    obs = np.concatenate(loaded.data.column("observations"))
    np.testing.assert_array_equal(loaded.obs_scaler.lo, obs.min(0))
    np.testing.assert_array_equal(loaded.obs_scaler.hi, obs.max(0))


def test_interrupted_or_stale_conversions_are_redone(shard_dir, tmp_path):
    """Whatever state a conversion was stopped in, the next start uses only complete, current stores."""
    shard_dir = shutil.copytree(shard_dir, tmp_path / "src")  # its files' times are changed below
    _, loaded = _load(shard_dir, tmp_path)
    ref = [np.array(s.columns["observations"]) for s in loaded.data.stores]
    folders = [store_dir(s.shard, tmp_path) for s in loaded.data.stores]
    # shard 0: killed before the rename: a temporary folder of a dead process, no final folder
    shutil.rmtree(folders[0] / "base")
    dead = folders[0] / "base.tmp-{}-999999999-1".format(__import__("socket").gethostname())
    dead.mkdir()
    (dead / "observations.npy").write_bytes(b"partial")
    # shard 1: a column cut short (the manifest no longer matches)
    obs1 = folders[1] / "base" / "observations.npy"
    obs1.write_bytes(obs1.read_bytes()[:-100])
    # shard 2: the source shard rewritten since it was converted
    src = loaded.data.stores[2].shard
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert manifest_problem(folders[2] / "base", None) is None  # complete, but
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = OGBenchDataset(env_name="cube-single", dataset_path=str(shard_dir), cache_dir=str(tmp_path)).load(5, 5)
    said = " ".join(str(w.message) for w in caught if "Re-converting" in str(w.message))
    assert "column 'observations' missing or of the wrong size" in said and "source shard changed" in said, said
    assert not dead.exists()
    assert [s.convert_s > 0 for s in again.data.stores] == [True, True, True]
    for r, s in zip(ref, again.data.stores):
        np.testing.assert_array_equal(np.asarray(s.columns["observations"]), r)
    # and a third start converts nothing
    _, third = _load(shard_dir, tmp_path)
    assert [s.convert_s for s in third.data.stores] == [0.0, 0.0, 0.0]
    assert json.loads((folders[0] / "base" / MANIFEST).read_text())["rows"] == ROWS


def test_out_of_range_settings(shard_dir, tmp_path):
    kw: dict[str, Any]
    for kw, binding in (
        (dict(sampling="random"), "OGBenchDataset.sampling"),
        (dict(rotation_interval=0), "OGBenchDataset.rotation_interval"),
        (dict(max_shards=0), "OGBenchDataset.max_shards"),
        (dict(prefetch=0), "OGBenchDataset.prefetch"),
    ):
        with pytest.raises(ConfigError, match=binding):
            OGBenchDataset(**kw)
    with pytest.raises(ConfigError, match="OGBenchDataset.sampling"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        OGBenchDataset(
            env_name="cube-single", sampling="shard_rotation", dataset_path=str(shard_dir / f"{BASE}-000.npz")
        ).load(5, 5)
    with pytest.raises(ConfigError, match="train.chunk_len"):
        _load(shard_dir, tmp_path)[0].load(LENGTH, LENGTH)  # no trajectory is longer than the window


def test_rotation_on_device_is_refused_before_anything_is_written(tmp_path):
    from macfw import registry
    from macfw.train import train

    agent = registry.get("agent", "MAC")()
    with pytest.raises(ConfigError, match="train.data_on_device"):
        train(
            tmp_path / "w",
            agent=agent,
            dataset=OGBenchDataset(sampling="shard_rotation"),
            data_on_device=True,
            num_steps=10,
            log_interval=10,
            eval_interval=10,
            save_interval=10,
            batch_size=8,
            steps_per_dispatch=1,
        )
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------- host sampler
SPECS = [
    BatchSpec(chunk_len=5, gamma=0.99, normalize_reward=True),
    BatchSpec(chunk_len=3, gamma=0.9, future_len=5),
    BatchSpec(chunk_len=1, gamma=1.0),
]


@pytest.mark.slow
@pytest.mark.parametrize("task_mode", ["singletask", "oraclerep", "goal"])
def test_host_batches_equal_sample_batch(shard_dir, tmp_path, task_mode):
    """On the concatenated shards, the host sampler's batch of a key is sample_batch's, bit for bit:
    every field, dtype and shape, for chunk, n-step, future-observation and one-step specs."""
    _, loaded = _load(shard_dir, tmp_path, task_mode)
    gc = loaded.spec.goal_conditioned
    for spec in SPECS:
        chunk = loaded.data.to_chunk_data(spec.window)
        smp = ShardSampler(loaded.data, batch_spec=spec, goal_conditioned=gc, key=jax.random.PRNGKey(0))
        for k in range(3):
            key = jax.random.PRNGKey(100 + k)
            _assert_same_batch(_sample_batch(chunk, spec, gc, key, 96), smp.sample(key, 96), f"{task_mode} {spec}")


@pytest.mark.slow
def test_step_stacks_and_seeds(shard_dir, tmp_path):
    """Stack of steps j..j+K-1 = sample_batch(fold_in(key, j)) per step; with seeds, split(., S)[i];
    refresh-style sampling with seeds = fold_in(key, i) per seed (macfw.step.Refresher)."""
    _, loaded = _load(shard_dir, tmp_path, "oraclerep")
    spec = SPECS[0]
    chunk = loaded.data.to_chunk_data(spec.window)
    base = jax.random.PRNGKey(7)
    smp = ShardSampler(loaded.data, batch_spec=spec, goal_conditioned=True, key=base)
    st = smp.stack(20, 3, 16)
    st2 = smp.stack(20, 3, 16, num_seeds=2)
    for i, j in enumerate(range(20, 23)):
        ref = _sample_batch(chunk, spec, True, jax.random.fold_in(base, j), 16)
        _assert_same_batch({k: v[i] for k, v in st.items()}, ref, f"step {j}")
        for s, kk in enumerate(jax.random.split(jax.random.fold_in(base, j), 2)):
            _assert_same_batch(
                {k: v[i, s] for k, v in st2.items()}, _sample_batch(chunk, spec, True, kk, 16), f"step {j} seed {s}"
            )
    rk = jax.random.PRNGKey(11)
    rs = smp.sample(rk, 8, num_seeds=3)
    for s in range(3):
        _assert_same_batch(
            {k: v[s] for k, v in rs.items()},
            _sample_batch(chunk, spec, True, jax.random.fold_in(rk, s), 8),
            f"refresh seed {s}",
        )


@pytest.mark.slow
def test_shard_rotation_one_shard_at_a_time(shard_dir, tmp_path):
    """shard_rotation: gradient step j samples shard (j // interval) % 3 only (starts and random goals),
    and that batch is sample_batch on that shard alone (indices shifted by the shard's first row)."""
    _, uni = _load(shard_dir, tmp_path, "goal")
    _, rot = _load(shard_dir, tmp_path, "goal", sampling="shard_rotation", rotation_interval=3)
    assert rot.data.sampling == "shard_rotation"
    spec = SPECS[0]
    key = jax.random.PRNGKey(5)
    smp = ShardSampler(rot.data, batch_spec=spec, goal_conditioned=True, key=key)
    st = smp.stack(0, 12, 64)
    off = rot.data.row_offsets
    full = open_sharded(
        shard_dir, base_name=BASE, dataset_name=BASE, task_mode="goal", cache_dir=tmp_path, progress=False
    )
    alones = [
        ShardedData(full.stores[k : k + 1], task_mode="goal", singletask_masks="ogbench", scale_with="val")
        for k in range(3)
    ]  # each shard as its own dataset
    chunks = [a.to_chunk_data(spec.window) for a in alones]
    for j in range(12):
        k = (j // 3) % 3
        for f in ("idx", "value_goal_idx", "actor_goal_idx", "traj_end"):
            v = st[f][j]
            assert np.all((v >= off[k]) & (v < off[k + 1])), (j, f, k)
        alone = alones[k]
        ref = _sample_batch(chunks[k], spec, True, jax.random.fold_in(key, j), 64)
        for f in ("idx", "value_goal_idx", "actor_goal_idx", "traj_end"):
            ref[f] = ref[f] + np.int32(off[k])
        got = {f: v[j] for f, v in st.items()}
        for f in ("obs", "next_obs", "value_goals", "actor_goals", "next_goals"):  # other scaler (shard 0's val)
            got[f], ref[f] = rot.data.obs_scaler.inverse(got[f]), alone.obs_scaler.inverse(ref[f])
            np.testing.assert_allclose(got[f], ref[f], rtol=1e-5, atol=1e-5, err_msg=f)
            del got[f], ref[f]
        _assert_same_batch(got, ref, f"rotation step {j}")
    # uniform mode mixes shards within one batch
    u = ShardSampler(uni.data, batch_spec=spec, goal_conditioned=True, key=key).stack(0, 1, 256)["idx"][0]
    assert len(np.unique(np.searchsorted(off, u, side="right") - 1)) == 3


def test_resumed_stream_is_the_same(shard_dir, tmp_path):
    """The stream is a function of (key, step): starting at step 30 gives the batches an uninterrupted
    run gets there, whatever steps_per_dispatch; the checkpointed state names the step."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from macfw.parallel import make_mesh

    _, loaded = _load(shard_dir, tmp_path, "singletask", sampling="shard_rotation", rotation_interval=20)
    smp = ShardSampler(loaded.data, batch_spec=SPECS[0], goal_conditioned=False, key=jax.random.PRNGKey(1))
    sh = NamedSharding(make_mesh(), P(None, "data"))
    a = ShardedBatches(smp, batch_size=8, K=10, sharding=sh)
    a.start(0, 10, 60)
    full = [jax.device_get(a.next()) for _ in range(6)]
    assert a.state(60)["step"] == 60 and a.state(60)["grain"]["next_index"] == 6
    b = ShardedBatches(smp, batch_size=8, K=10, sharding=sh)
    b.start(30, 10, 60)
    for d in range(3, 6):
        _assert_same_batch(jax.device_get(b.next()), full[d], f"dispatch {d}")
    c = ShardedBatches(smp, batch_size=8, K=5, sharding=NamedSharding(make_mesh(), P(None, "data")))
    c.start(30, 5, 40)
    got = [jax.device_get(c.next()) for _ in range(2)]
    _assert_same_batch({k: np.concatenate([g[k] for g in got]) for k in got[0]}, full[3], "K=5 vs K=10")
    for it in (a, b, c):
        it.close()


class _FakeSharding:
    def __init__(self, spans):
        self.spans = spans

    def addressable_devices_indices_map(self, shape):
        return {i: (slice(None), slice(lo, hi)) for i, (lo, hi) in enumerate(self.spans)}


def test_each_process_reads_only_its_rows(shard_dir, tmp_path):
    """A process gathers only its devices' rows of the global batch; they equal those rows of the whole."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from macfw.parallel import make_mesh

    _, loaded = _load(shard_dir, tmp_path, "oraclerep")
    smp = ShardSampler(loaded.data, batch_spec=SPECS[1], goal_conditioned=True, key=jax.random.PRNGKey(2))
    whole = smp.stack(40, 2, 16)
    part = smp.stack(40, 2, 16, rows=(4, 12))
    for k in whole:
        np.testing.assert_array_equal(part[k], whole[k][:, 4:12], err_msg=k)
    assert process_rows(NamedSharding(make_mesh(), P(None, "data")), (2, 16), 1) == (0, 16)
    assert process_rows(_FakeSharding([(8, 12), (12, 16)]), (2, 16), 1) == (8, 16)
    assert process_rows(_FakeSharding([(0, 4), (8, 12)]), (2, 16), 1) is None
    # the stack assembled from the local rows only (rows 8..16 here) has those rows in place
    hb = ShardedBatches(smp, batch_size=16, K=2, sharding=NamedSharding(make_mesh(), P(None, "data")))
    hb.rows = (0, 16)
    np.testing.assert_array_equal(np.asarray(hb.make(40)["obs"]), whole["obs"])


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc/self/statm")
def test_mapped_pages_are_released(tmp_path):
    """Random reads over a store larger than release_mib keep the file-backed resident size bounded."""
    from macfw.data.shards import ShardedData, ShardStore, _file_rss, _open_columns, trajectory_table

    rows = 400_000
    folder = tmp_path / "big"
    folder.mkdir()
    obs = np.lib.format.open_memmap(folder / "observations.npy", mode="w+", dtype=np.float32, shape=(rows, 64))
    obs[:] = 1.0
    del obs
    np.save(folder / "actions.npy", np.zeros((rows, 1), np.float32))
    np.save(folder / "trajectories.npy", trajectory_table(np.where(np.arange(rows) % 1000 == 999, 0.0, 1.0)))
    man = {"columns": {k: {"file": f"{k}.npy"} for k in ("observations", "actions", "trajectories")}}
    cols, maps = _open_columns(folder, man)
    stats = {"observations": {"val": {"lo": [0.0] * 64, "hi": [1.0] * 64}}}
    st = ShardStore(
        shard=folder / "x-play-v0-000.npz",
        folder=folder,
        base={"rows": rows, "stats": stats},
        variant=None,
        columns=cols,
        maps=maps,
    )
    data = ShardedData([st], task_mode="goal", singletask_masks="ogbench", scale_with="val", release_mib=8)
    start = _file_rss()
    assert start is not None  # /proc/self/statm exists (the skipif above)
    rng = np.random.default_rng(0)
    peak = 0
    for _ in range(100):  # 100 x 128 random rows: without releases, most of the 100 MB file gets mapped
        data.take("observations", rng.integers(0, rows, 128))
        data.maybe_release()
        now = _file_rss()
        assert now is not None
        peak = max(peak, now - start)
    assert data.releases > 0
    assert peak < 40 * 2**20, f"file-backed resident size grew by {peak / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------- generation
def test_generate_shards_resumes_and_is_reproducible(shard_dir, tmp_path):
    """A shard missing its training file (killed while collecting or writing) is redone, identical;
    finished shards are kept untouched; shard k depends only on (k, seed)."""
    out = tmp_path / "gen"
    shutil.copytree(shard_dir, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / f"{BASE}-001.npz").unlink()
    (out / f"{BASE}-001.npz.tmp-123.npz").write_bytes(b"partial")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = generate_shards(BASE, out, 3, EPISODES, episode_length=LENGTH, seed=3, workers=1, progress=False)
        two = generate_shards(
            BASE, tmp_path / "two", 2, EPISODES, episode_length=LENGTH, seed=3, workers=1, progress=False
        )
    assert [p.name for p in paths] == [f"{BASE}-{k:03d}.npz" for k in range(3)]
    assert not (out / f"{BASE}-001.npz.tmp-123.npz").exists()
    for name in (f"{BASE}-000.npz", f"{BASE}-002.npz", f"{BASE}-002-val.npz"):
        assert (out / name).stat().st_mtime_ns == before[name], name
    for p in [paths[1], val_path(paths[1]), *two, *map(val_path, two)]:
        with np.load(p) as a, np.load(shard_dir / p.name) as b:
            assert sorted(a.files) == sorted(b.files)
            for k in a.files:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{p.name}:{k}")
    with np.load(paths[0]) as a, np.load(paths[1]) as b:
        assert not np.array_equal(a["observations"], b["observations"])  # shards differ from each other


# ------------------------------------------------------------------------------------- the bench
def test_scale_bench_builds_and_converts(tmp_path):
    """The bench's synthetic shards load through OGBench's loader with the environment's shapes, and its
    conversion/sampler child reports the figures the JSON needs."""
    from macfw.data import scale_bench

    built = scale_bench.build_shards(tmp_path / "shards", 2500, 1001, "cube-single")
    assert built["num_shards"] == 3 and built["shard_rows"] == [1001, 1001, 498]
    ns = type(
        "A",
        (),
        dict(
            env="cube-single",
            shard_dir=tmp_path / "shards",
            cache=tmp_path / "cache",
            chunk_len=5,
            batch_size=8,
            steps_per_dispatch=2,
            sampler_seconds=0.2,
            sampler_configs="",
            child="convert",
            child_out=str(tmp_path / "c.json"),
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scale_bench.child_convert(ns)
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["rows"] == 2500 and c["disk_bytes"] > 2500 * (28 + 5) * 4
    assert c["convert_s"] > 0 and len(c["convert_s_per_shard"]) == 3
    assert c["sampler_batches_per_s"] > 0 and c["sampler_batches_per_s_sync"] > 0
