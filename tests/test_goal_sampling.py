"""Goal sampling as configuration (issue 28, item 4; DESIGN §2.1): :class:`macfw.data.goals.GoalSampling`.

* the defaults draw bit for bit the goals of macfw before the setting existed (a frozen copy of that
  ``goal_indices`` below), on the device path and on the host sampler, for both goal layouts
  (``'goal'``: goals are observations; ``'oraclerep'``: oracle representations);
* every agent's Gin file hands ``GoalSampling.*`` bindings to its batch spec;
* each setting does what it says (current / same-trajectory / random goals, uniform or geometric
  offsets); single-task batches ignore it; bad values are one ConfigError naming the binding;
* a goal-conditioned smoke run ends with the same ``param_checksum`` with the eight defaults bound
  explicitly, and with another one when a setting changes.

Data: a hand-built compact dataset whose observations and actions encode their own index (as in
tests/test_batches.py), and for the host sampler three tiny generated cube-single shards.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import re
import warnings
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import macfw  # noqa: F401  (registers every component)
from macfw import registry
from macfw.agents.base import BatchSpec
from macfw.data.batches import sample_batch, sample_for
from macfw.data.goals import DEFAULT_GOALS, GoalSampling, goal_sampling_for
from macfw.data.ogbench_data import OGBenchDataset
from macfw.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
LENGTHS = [40, 3, 70, 25, 90, 12, 55, 33]  # observations per trajectory
N = sum(LENGTHS)
BATCH = 8192
AUTHORS: dict[str, Any] = dict(
    value_p_curgoal=0.2,
    value_p_trajgoal=0.5,
    value_p_randomgoal=0.3,
    value_geom_sample=False,
    actor_p_curgoal=0.0,
    actor_p_trajgoal=0.5,
    actor_p_randomgoal=0.5,
    actor_geom_sample=True,
)
TRAJ_ACTOR: dict[str, Any] = dict(actor_p_trajgoal=1.0, actor_p_randomgoal=0.0)
BINDINGS = ["GoalSampling.actor_p_trajgoal = 1.0", "GoalSampling.actor_p_randomgoal = 0.0"]


# ------------------------------------------------------------------------------ the frozen reference
def _frozen_goal_indices(ks, t, end, num_rows, gamma, row_offset=0):
    """macfw's ``goal_indices`` at commit 976620a (before GoalSampling), verbatim but for the constants."""
    batch_size = t.shape[0]
    later = jax.random.randint(ks[1], (batch_size,), t + 1, end + 1)
    rand = jax.random.randint(ks[2], (batch_size,), row_offset, row_offset + num_rows)
    u = jax.random.uniform(ks[3], (batch_size,))
    vg = jnp.where(u < 0.2, t, jnp.where(u < 0.2 + 0.5, later, rand))
    offset = jax.random.geometric(ks[4], 1.0 - gamma, (batch_size,)) if gamma < 1.0 else end - t
    geo = jnp.minimum(t + offset.astype(t.dtype), end)
    rand2 = jax.random.randint(ks[5], (batch_size,), row_offset, row_offset + num_rows)
    ag = jnp.where(jax.random.uniform(ks[6], (batch_size,)) < 0.5, geo, rand2)
    return vg, ag


def _frozen_goal_fields(data, key, batch_size, n, gamma):
    """The goal fields of the old ``sample_batch`` (same key use: ``split(key, 8)``)."""
    ks = jax.random.split(key, 8)
    t = data.starts[jax.random.randint(ks[0], (batch_size,), 0, data.starts.shape[0])]
    end = data.traj_end[t]
    vg, ag = _frozen_goal_indices(ks, t, end, data.observations.shape[0], gamma)
    success = ((vg >= t) & (vg < t + n)).astype(jnp.float32)
    return dict(
        idx=t,
        traj_end=end,
        value_goal_idx=vg,
        value_goals=data.goals[vg],
        actor_goals=data.goals[ag],
        success=success,
        rewards=success - 1.0,
        masks=1.0 - success,
    )


# ------------------------------------------------------------------------------ data
def _dataset(with_oracle: bool):
    rng = np.random.default_rng(0)
    idx = np.arange(N, dtype=np.float32)
    tid = np.repeat(np.arange(len(LENGTHS)), LENGTHS).astype(np.float32)
    obs = np.stack([idx, tid, rng.normal(size=N).astype(np.float32)], axis=1)
    act = np.stack([(idx + 0.5) / N * 2 - 1, rng.uniform(-1, 1, N)], axis=1).astype(np.float32)
    terminals = np.zeros(N, np.float32)
    terminals[np.cumsum(LENGTHS) - 1] = 1.0
    d = {
        "observations": obs,
        "actions": act,
        "terminals": terminals,
        "valids": 1.0 - terminals,
        "rewards": rng.normal(size=N).astype(np.float32),
        "masks": (rng.random(N) > 0.1).astype(np.float32),
    }
    if with_oracle:
        d["oracle_reps"] = np.stack([idx * 2.0 + 1.0, -tid], axis=1).astype(np.float32)
    return d


@functools.cache
def _loaded(mode: str, n: int):
    d = _dataset(with_oracle=mode == "oraclerep")
    return OGBenchDataset(task_mode=mode, scale_with="train").prepare(d, d, n)


def _goal_index(loaded, x):
    """The dataset index a (scaled) goal vector encodes."""
    y = np.asarray(loaded.goal_scaler.inverse(np.asarray(x)))[..., 0]
    return np.rint((y - 1.0) / 2.0 if loaded.task_mode == "oraclerep" else y).astype(int)


@functools.cache
def _sampler(batch_size, n, gamma, goals, goal_conditioned):
    return jax.jit(
        functools.partial(
            sample_batch,
            batch_size=batch_size,
            chunk_len=n,
            gamma=gamma,
            goal_conditioned=goal_conditioned,
            goals=goals,
        )
    )


def _sample(loaded, key, *, n, gamma, goals, batch_size=BATCH, goal_conditioned=True):
    return jax.device_get(_sampler(batch_size, n, gamma, goals, goal_conditioned)(loaded.data, key))


def _goals(loaded, goals, gamma=0.9, n=3, key=0):
    """``(t, end, value goal index, actor goal index)`` of one big batch drawn with ``goals``."""
    b = _sample(loaded, jax.random.PRNGKey(key), n=n, gamma=gamma, goals=goals)
    t, end = b["idx"], b["traj_end"]
    vg = b["value_goal_idx"]
    np.testing.assert_array_equal(_goal_index(loaded, b["value_goals"]), vg)
    return t, end, vg, _goal_index(loaded, b["actor_goals"])


# ------------------------------------------------------------------------------ the class
def test_defaults_are_the_authors_and_registered():
    g = GoalSampling()
    assert dataclasses.asdict(g) == AUTHORS
    assert g == DEFAULT_GOALS and BatchSpec().goals == g
    assert [f.name for f in dataclasses.fields(GoalSampling)] == list(AUTHORS)
    assert "GoalSampling" in registry.registered("goals")
    assert registry.get("goals", "GoalSampling") is GoalSampling
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.actor_p_trajgoal = 1.0  # pyright: ignore[reportAttributeAccessIssue]  (frozen: what the test checks)
    # ints are accepted and stored as floats; rounding within 1e-6 of a sum of 1 is accepted
    g2 = GoalSampling(actor_p_trajgoal=1, actor_p_randomgoal=0)
    assert isinstance(g2.actor_p_trajgoal, float) and g2 == GoalSampling(**TRAJ_ACTOR)
    GoalSampling(value_p_curgoal=0.1, value_p_trajgoal=0.2, value_p_randomgoal=0.7)
    GoalSampling(actor_p_trajgoal=0.3, actor_p_randomgoal=0.7000005)


@pytest.mark.parametrize(
    "kwargs, binding, fix",
    [
        (
            dict(actor_p_trajgoal=1.0),
            "GoalSampling.actor_p_randomgoal = 0.5",
            r"must be 0 = 1 - GoalSampling\.actor_p_curgoal",
        ),
        (dict(value_p_randomgoal=0.5), "GoalSampling.value_p_randomgoal = 0.5", "must be 0.3 = 1 - GoalSampling"),
        (
            dict(actor_p_curgoal=0.6, actor_p_trajgoal=0.6, actor_p_randomgoal=0.0),
            "GoalSampling.actor_p_trajgoal = 0.6",
            "at most 0.4 = 1 - GoalSampling.actor_p_curgoal",
        ),
        (
            dict(actor_p_trajgoal=0.3, actor_p_randomgoal=0.70001),
            "GoalSampling.actor_p_randomgoal = 0.70001",
            "sum to 1",
        ),
        (dict(actor_p_randomgoal=1.5), "GoalSampling.actor_p_randomgoal = 1.5", r"in \[0.0, 1.0\]"),
        (dict(value_p_curgoal=-0.1), "GoalSampling.value_p_curgoal = -0.1", r"in \[0.0, 1.0\]"),
        (dict(value_p_trajgoal=float("nan")), "GoalSampling.value_p_trajgoal = nan", r"in \[0.0, 1.0\]"),
        (dict(value_p_trajgoal="0.5"), "GoalSampling.value_p_trajgoal = '0.5'", r"in \[0.0, 1.0\]"),
        (dict(actor_geom_sample="yes"), "GoalSampling.actor_geom_sample = 'yes'", "True or False"),
        (dict(value_geom_sample=1), "GoalSampling.value_geom_sample = 1", "True or False"),
    ],
    ids=[
        "actor-sum",
        "value-sum",
        "actor-sum-over",
        "tolerance",
        "above-1",
        "below-0",
        "nan",
        "string",
        "flag-str",
        "flag-int",
    ],
)
def test_bad_values_name_the_binding(kwargs, binding, fix):
    with pytest.raises(ConfigError) as e:
        GoalSampling(**kwargs)
    msg = str(e.value)
    b = binding.split(" = ")[0]
    assert msg.startswith(binding + " is out of range"), msg
    assert f"Fix the Gin binding {b}." in msg
    assert re.search(fix, msg), msg


def test_a_bad_binding_fails_when_the_agent_is_built(monkeypatch):
    """The usual slip (p_trajgoal raised, p_randomgoal left at its default) through Gin: one ConfigError."""
    from macfw.run import parse_gin

    monkeypatch.chdir(REPO)
    parse_gin(["gin/baselines/gciql.gin"], ["GoalSampling.actor_p_trajgoal = 1.0"])
    with pytest.raises(ConfigError, match=r"GoalSampling\.actor_p_randomgoal = 0\.5 is out of range: must be 0 "):
        gin.query_parameter("train.agent").scoped_configurable_fn()
    with pytest.raises(ConfigError, match=r"GCIQL\.goal_sampling = 3 is out of range"):
        goal_sampling_for("GCIQL", 3)


# ------------------------------------------------------------------------------ Gin reaches every agent
AGENT_FILES = ["gin/mac.gin", "gin/ablations/mac_fql.gin"] + sorted(
    str(Path(p).relative_to(REPO)) for p in glob.glob(str(REPO / "gin" / "baselines" / "*.gin"))
)


def _agent_from(gin_file: str, bindings):
    from macfw.run import parse_gin

    gin.clear_config()
    parse_gin([gin_file], list(bindings))
    return gin.query_parameter("train.agent").scoped_configurable_fn()


def test_bindings_reach_the_batch_spec_of_every_agent(monkeypatch):
    monkeypatch.chdir(REPO)
    want = GoalSampling(
        **TRAJ_ACTOR, actor_geom_sample=False, value_p_curgoal=0.1, value_p_trajgoal=0.6, value_geom_sample=True
    )
    bindings = BINDINGS + [
        "GoalSampling.actor_geom_sample = False",
        "GoalSampling.value_p_curgoal = 0.1",
        "GoalSampling.value_p_trajgoal = 0.6",
        "GoalSampling.value_geom_sample = True",
    ]
    built = set()
    for f in AGENT_FILES:
        agent = _agent_from(f, [])
        assert agent.batch_spec.goals == GoalSampling(), f  # whatever the file itself binds (today: the defaults)
        agent = _agent_from(f, bindings)
        assert agent.batch_spec.goals == want, (f, agent.batch_spec.goals)
        built.add(type(agent).__name__)
    assert {"GCIQL", "SHARSA", "NStepSACBC", "MAC"} <= built
    ours = {n for n in registry.registered("agent") if registry.get("agent", n).__module__.startswith("macfw.")}
    assert ours <= built, f"agents whose Gin file this test does not build: {sorted(ours - built)}"
    # the constructor argument wins over the bindings (a user's explicit instance)
    gin.clear_config()
    gin.parse_config(BINDINGS)
    own = GoalSampling(actor_p_curgoal=1.0, actor_p_trajgoal=0.0, actor_p_randomgoal=0.0)
    assert registry.get("agent", "MAC")(goal_sampling=own).batch_spec.goals == own
    assert registry.get("agent", "MAC")().batch_spec.goals == GoalSampling(**TRAJ_ACTOR)


def test_an_agent_whose_batches_ignore_the_bindings_is_refused(monkeypatch):
    """A user's agent written before GoalSampling (no goal_sampling, BatchSpec without goals) fails
    check_config when GoalSampling bindings change a default, instead of silently ignoring them."""
    from macfw.agents.base import Agent

    class OldAgent(Agent):
        batch_spec = property(lambda self: BatchSpec(chunk_len=2))

        def init(self, spec, key):
            raise NotImplementedError

        def update(self, state, batch):
            raise NotImplementedError

        def act(self, params, s, g, *, key):
            raise NotImplementedError

    OldAgent().check_config(8)  # no binding: nothing is ignored
    gin.parse_config(BINDINGS)
    with pytest.raises(ConfigError, match=r"OldAgent\.batch_spec\.goals = .* would ignore the GoalSampling bindings"):
        OldAgent().check_config(8)
    monkeypatch.chdir(REPO)
    _agent_from("gin/baselines/gciql.gin", BINDINGS).check_config(8)  # macfw's agents carry them


# ------------------------------------------------------------------------------ defaults = before
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["goal", "oraclerep"])
@pytest.mark.parametrize("gamma", [0.8, 0.999, 1.0])
def test_default_batches_equal_the_frozen_sampler(mode, gamma):
    n = 3
    loaded = _loaded(mode, n)
    frozen = jax.jit(functools.partial(_frozen_goal_fields, batch_size=512, n=n, gamma=gamma))
    spec = BatchSpec(chunk_len=n, gamma=gamma)
    via_spec = jax.jit(lambda d, k: sample_for(spec, d, k, 512, goal_conditioned=True))
    for i in range(5):
        key = jax.random.PRNGKey(1000 + i)
        ref = jax.device_get(frozen(loaded.data, key))
        for goals in (None, GoalSampling(), GoalSampling(**AUTHORS)):
            b = _sample(loaded, key, n=n, gamma=gamma, goals=goals, batch_size=512)
            for k, v in ref.items():
                np.testing.assert_array_equal(b[k], v, err_msg=f"{mode} gamma {gamma} key {i} {goals} {k}")
        b = jax.device_get(via_spec(loaded.data, key))
        for k, v in ref.items():
            np.testing.assert_array_equal(b[k], v, err_msg=f"sample_for {mode} {k}")
    # and the frozen sampler is not trivially matched: another setting draws other actor goals
    b = _sample(loaded, key, n=n, gamma=gamma, goals=GoalSampling(**TRAJ_ACTOR), batch_size=512)
    assert not np.array_equal(b["actor_goals"], ref["actor_goals"])
    np.testing.assert_array_equal(b["value_goal_idx"], ref["value_goal_idx"])  # value goals untouched


# ------------------------------------------------------------------------------ what each setting does
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["goal", "oraclerep"])
def test_trajectory_actor_goals_stay_in_the_trajectory(mode):
    loaded = _loaded(mode, 3)
    for geom in (True, False):
        t, end, _, ag = _goals(loaded, GoalSampling(**TRAJ_ACTOR, actor_geom_sample=geom))
        assert np.all((ag > t) & (ag <= end)), geom
    # the default sends half of them anywhere in the dataset
    t, end, _, ag = _goals(loaded, None)
    assert 0.3 < np.mean((ag < t) | (ag > end)) < 0.55


def test_uniform_and_geometric_offsets():
    """Uniform offsets over 1..L (L = end - t) have mean (L + 1) / 2; geometric ones clipped at L have
    mean (1 - gamma^L) / (1 - gamma): the two differ by far for gamma = 0.9 and L up to 89."""
    loaded = _loaded("goal", 3)
    gamma = 0.9

    def check_offsets(off, L, kind):
        assert np.all((off >= 1) & (off <= L)), kind
        want = (L + 1) / 2.0 if kind == "uniform" else (1 - gamma**L) / (1 - gamma)
        var = (L**2 - 1) / 12.0 if kind == "uniform" else gamma / (1 - gamma) ** 2
        se = np.sqrt(np.mean(var) / len(off))
        assert abs(off.mean() - want.mean()) < 5 * se + 0.02, (kind, off.mean(), want.mean())
        # and per sample: the offset over L is uniform on (0, 1] (mean 1/2 + 1/(2L)) or piles up near 0
        frac = off / L
        if kind == "uniform":
            assert abs(frac.mean() - np.mean(0.5 + 0.5 / L)) < 0.01, frac.mean()
            assert abs(np.mean(frac <= 0.5) - np.mean(np.floor(L / 2) / L)) < 0.015
        else:
            assert abs(np.mean(off == 1) - (1 - gamma)) < 0.015  # P(Geom = 1) = 1 - gamma (L >= 1)

    for geom, kind in ((False, "uniform"), (True, "geometric")):
        t, end, _, ag = _goals(loaded, GoalSampling(**TRAJ_ACTOR, actor_geom_sample=geom), gamma=gamma)
        check_offsets(ag - t, end - t, kind)
        t, end, vg, _ = _goals(
            loaded,
            GoalSampling(value_p_curgoal=0.0, value_p_trajgoal=1.0, value_p_randomgoal=0.0, value_geom_sample=geom),
            gamma=gamma,
        )
        check_offsets(vg - t, end - t, kind)
    # gamma = 1: a geometric later state is the trajectory's end
    t, end, vg, ag = _goals(
        loaded,
        GoalSampling(
            value_p_curgoal=0.0, value_p_trajgoal=1.0, value_p_randomgoal=0.0, value_geom_sample=True, **TRAJ_ACTOR
        ),
        gamma=1.0,
    )
    np.testing.assert_array_equal(vg, end)
    np.testing.assert_array_equal(ag, end)


def test_current_goals_succeed_at_once():
    loaded = _loaded("oraclerep", 3)
    g = GoalSampling(
        value_p_curgoal=1.0,
        value_p_trajgoal=0.0,
        value_p_randomgoal=0.0,
        actor_p_curgoal=1.0,
        actor_p_trajgoal=0.0,
        actor_p_randomgoal=0.0,
    )
    b = _sample(loaded, jax.random.PRNGKey(3), n=3, gamma=0.9, goals=g)
    t = b["idx"]
    np.testing.assert_array_equal(b["value_goal_idx"], t)
    np.testing.assert_array_equal(_goal_index(loaded, b["actor_goals"]), t)
    np.testing.assert_array_equal(b["success"], np.ones_like(b["success"]))
    np.testing.assert_array_equal(b["rewards"], np.zeros_like(b["rewards"]))
    np.testing.assert_array_equal(b["masks"], np.zeros_like(b["masks"]))


def test_random_goals_spread_over_the_dataset():
    loaded = _loaded("goal", 3)
    g = GoalSampling(
        value_p_curgoal=0.0,
        value_p_trajgoal=0.0,
        value_p_randomgoal=1.0,
        actor_p_curgoal=0.0,
        actor_p_trajgoal=0.0,
        actor_p_randomgoal=1.0,
    )
    rows = []
    for k in range(4):
        t, end, vg, ag = _goals(loaded, g, key=k)
        # independent of t: as often in t's own trajectory as its share of the dataset
        tid = np.repeat(np.arange(len(LENGTHS)), LENGTHS)
        share = np.mean(np.asarray(LENGTHS)[tid[t]] / N)
        assert abs(np.mean(tid[vg] == tid[t]) - share) < 0.02
        assert abs(np.mean(tid[ag] == tid[t]) - share) < 0.02
        rows += [vg, ag]
    counts = np.bincount(np.concatenate(rows), minlength=N)
    assert counts.shape == (N,) and counts.min() > 0  # every row of the dataset is drawn
    expected = 8 * BATCH / N
    assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected)), (counts.min(), counts.max(), expected)


def test_mixtures_follow_their_probabilities():
    loaded = _loaded("goal", 3)
    g = GoalSampling(
        value_p_curgoal=0.5,
        value_p_trajgoal=0.0,
        value_p_randomgoal=0.5,
        actor_p_curgoal=0.25,
        actor_p_trajgoal=0.75,
        actor_p_randomgoal=0.0,
    )
    t, end, vg, ag = _goals(loaded, g)
    assert abs(np.mean(vg == t) - (0.5 + 0.5 / N)) < 0.02
    assert np.mean((vg > t) & (vg <= end)) < 0.5 * np.mean((end - t) / N) + 0.02  # later only by chance
    assert abs(np.mean(ag == t) - 0.25) < 0.02
    assert np.all((ag >= t) & (ag <= end))


def test_singletask_batches_ignore_goal_sampling():
    n = 4
    d = _dataset(with_oracle=False)
    loaded = OGBenchDataset(task_mode="singletask", scale_with="train").prepare(d, d, n)
    key = jax.random.PRNGKey(9)
    ref = _sample(loaded, key, n=n, gamma=0.9, goals=None, goal_conditioned=False, batch_size=256)
    for g in (
        GoalSampling(**TRAJ_ACTOR, actor_geom_sample=False),
        GoalSampling(value_p_curgoal=1.0, value_p_trajgoal=0.0, value_p_randomgoal=0.0),
    ):
        b = _sample(loaded, key, n=n, gamma=0.9, goals=g, goal_conditioned=False, batch_size=256)
        assert set(b) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(b[k], ref[k], err_msg=k)


# ------------------------------------------------------------------------------ the host sampler
BASE = "cube-single-play-v0"


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    from macfw.data.generate import generate_shards

    out = tmp_path_factory.mktemp("goal-shards")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generate_shards(BASE, out, 3, 2, episode_length=40, seed=3, workers=1, progress=False)
    return out


def _load_shards(shard_dir, cache, task_mode, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return OGBenchDataset(
            env_name="cube-single", task_mode=task_mode, dataset_path=str(shard_dir), cache_dir=str(cache), **kw
        ).load(5, 5)


@pytest.mark.slow
@pytest.mark.parametrize("task_mode", ["goal", "oraclerep"])
def test_host_sampler_defaults_equal_the_frozen_sampler_and_honours_the_setting(shard_dir, tmp_path, task_mode):
    from macfw.data.host_sampler import ShardSampler

    gamma, B = 0.9, 64
    for sampling in ("uniform", "shard_rotation"):
        kw = dict(sampling="shard_rotation", rotation_interval=2) if sampling == "shard_rotation" else {}
        loaded = _load_shards(shard_dir, tmp_path / sampling, task_mode, **kw)
        key = jax.random.PRNGKey(5)
        smp = ShardSampler(loaded.data, batch_spec=BatchSpec(chunk_len=3, gamma=gamma), goal_conditioned=True, key=key)
        ind = smp.step_indices(3, 4, B)
        rows = smp._np_tables["space_rows"]
        frozen = jax.jit(_frozen_goal_indices, static_argnames=("gamma",))
        for i, j in enumerate(range(3, 7)):
            s = int(smp.space_of_steps(np.array([j]))[0])
            ks = jax.random.split(jax.random.fold_in(key, j), 8)
            vg, ag = frozen(
                ks,
                jnp.asarray(ind["t"][i]),
                jnp.asarray(ind["end"][i]),
                int(rows[s + 1] - rows[s]),
                gamma=gamma,
                row_offset=int(rows[s]),
            )
            np.testing.assert_array_equal(ind["vg"][i], np.asarray(vg), err_msg=f"{task_mode} {sampling} step {j}")
            np.testing.assert_array_equal(ind["ag"][i], np.asarray(ag), err_msg=f"{task_mode} {sampling} step {j}")
        if sampling == "shard_rotation":
            continue
        # a non-default setting: the host batch is sample_batch's with the same setting, bit for bit
        g = GoalSampling(
            value_p_curgoal=0.1,
            value_p_trajgoal=0.9,
            value_p_randomgoal=0.0,
            value_geom_sample=True,
            **TRAJ_ACTOR,
            actor_geom_sample=False,
        )
        spec = BatchSpec(chunk_len=3, gamma=gamma, goals=g)
        smp2 = ShardSampler(loaded.data, batch_spec=spec, goal_conditioned=True, key=key)
        chunk = loaded.data.to_chunk_data(spec.window)
        fn = jax.jit(lambda d, k: sample_for(spec, d, k, 96, goal_conditioned=True))  # noqa: B023  (called within this iteration)
        for k in range(3):
            kk = jax.random.PRNGKey(100 + k)
            host, dev = smp2.sample(kk, 96), jax.device_get(fn(chunk, kk))
            assert set(host) == set(dev)
            for f in dev:
                np.testing.assert_array_equal(host[f], np.asarray(dev[f]), err_msg=f"{task_mode} {f}")
            t, end, vg = host["idx"], host["traj_end"], host["value_goal_idx"]
            assert np.all((vg >= t) & (vg <= end))
            assert not np.array_equal(host["actor_goals"], smp.sample(kk, 96)["actor_goals"])


# ------------------------------------------------------------------------------ a training run
@pytest.mark.slow
def test_smoke_run_checksum_unchanged_by_explicit_defaults(tmp_path, monkeypatch):
    """gin/smoke.gin goal-conditioned (oraclerep), 20 gradient steps, in-process: the eight defaults
    bound explicitly give the very parameters of the plain run; another actor-goal setting changes
    them (the binding reaches training). At commit 976620a (before GoalSampling) the plain run's
    checksum is the plain run's here (the frozen-sampler tests above guarantee the batches)."""
    from macfw.run import parse_gin
    from macfw.train import train

    monkeypatch.chdir(REPO)
    base = [
        "OGBenchDataset.task_mode = 'oraclerep'",
        "train.eval_task_ids = (2,)",
        "train.progress = False",
        "train.num_steps = 20",
        "train.eval_interval = 20",
        "train.save_interval = 20",
    ]
    explicit = [f"GoalSampling.{k} = {v!r}" for k, v in AUTHORS.items()]

    def checksum(name, extra):
        gin.clear_config()
        parse_gin(["gin/smoke.gin"], base + extra)
        s = train(str(tmp_path / name))
        print(f"param_checksum {name}: {s['param_checksum']}")
        return s["param_checksum"]

    plain = checksum("plain", [])
    assert checksum("explicit", explicit) == plain
    assert checksum("traj", BINDINGS) != plain
