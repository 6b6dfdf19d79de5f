"""Parallel evaluation (``evaluate(workers > 1)``: episodes in worker processes, one batched policy
call per decision round) gives the same per-episode success, return and length as the sequential
path (``workers=1``, in this process) for the same seeds and ``batch_size``; a plain (row by row)
actor gets the same results as one episode after the other. CPU only; tiny hand-made gymnasium
envs, a randomly initialised tiny MAC (its real ``act``: flow policy + rejection sampling,
seeded), and one short OGBench cube-single run."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, cast

import gin
import gymnasium
import numpy as np
import pytest

from macfw.errors import ConfigError
from macfw.evaluation import _episode_seeds, evaluate, make_actor, resolve_batch_size, resolve_workers

if TYPE_CHECKING:
    from gymnasium.envs.registration import EnvCreator

# ----------------------------------------------------------------------------------------------
# A goal-reaching point env. Defined inside a function so that cloudpickle sends the class to the
# workers by value: a worker does not import this module (nor macfw, nor JAX).
# ----------------------------------------------------------------------------------------------


def _point_env_class():
    class PointEnv(gymnasium.Env):
        """x in R^2, x' = x + 0.25 a + 0.02 noise (the env's seeded np_random); the goal of task i is
        0.6 (cos i, sin i); reward -|x - goal|; terminates (success 1) within R = 0.06 of the goal.
        ``probe``: the observation also holds whether jax / macfw are imported here, and the pid."""

        metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

        def __init__(
            self,
            task=1,
            render_mode=None,
            use_oracle_rep=False,
            fail_at=None,
            exit_at=None,
            kill_once_at=None,
            omit_success=False,
            omit_goal=False,
            probe=False,
        ):
            self.task, self.render_mode, self.probe = task, render_mode, probe
            self.fail_at, self.exit_at, self.omit_success, self.omit_goal = fail_at, exit_at, omit_success, omit_goal
            self.kill_once_at = kill_once_at
            self.num_tasks = 5
            self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (6 if probe else 3,), np.float64)
            self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)
            self.x, self.t, self.goal = np.zeros(2), 0, np.zeros(2)

        def _ob(self):
            ob = [self.x[0], self.x[1], self.t / 10.0]
            if self.probe:
                import sys

                ob += [float("jax" in sys.modules), float("macfw" in sys.modules), float(os.getpid())]
            return np.array(ob)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            if options and "task_id" in options:
                self.task = options["task_id"]
            self.x, self.t = self.np_random.uniform(-1.0, 1.0, 2), 0
            self.goal = 0.6 * np.array([np.cos(self.task), np.sin(self.task)])
            return self._ob(), ({} if self.omit_goal else {"goal": self.goal.copy()})

        def step(self, action):
            self.t += 1
            if self.fail_at is not None and self.t == self.fail_at:
                raise ValueError(f"PointEnv failed on purpose at step {self.t}")
            if self.exit_at is not None and self.t == self.exit_at:
                os._exit(3)
            marker = os.environ.get("MACFW_TEST_KILL_ONCE")
            if self.kill_once_at == self.t and marker and not os.path.exists(marker):
                open(marker, "w").close()  # once: the restarted worker runs on
                import signal

                os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9 of the worker, mid-episode
            self.x = self.x + 0.25 * np.asarray(action, np.float64) + 0.02 * self.np_random.normal(size=2)
            d, R = float(np.linalg.norm(self.x - self.goal)), 0.06
            info = {} if self.omit_success else {"success": float(d < R)}
            return self._ob(), -d, d < R, False, info

        def render(self):
            img = np.zeros((8, 8, 3), np.uint8)
            img[..., 0] = self.t
            return img

    return PointEnv


# gymnasium types entry_point as a callable taking **kwargs; an Env class is a valid one at runtime
_PointEnv = cast("EnvCreator", _point_env_class())
_VARIANTS = {
    "": {},
    "probe": dict(probe=True),
    "fail": dict(fail_at=5),
    "exit": dict(exit_at=4),
    "killonce": dict(kill_once_at=3),
    "nosuccess": dict(omit_success=True),
    "nogoal": dict(omit_goal=True),
}
for _v, _kw in _VARIANTS.items():
    _name = "macfw-test-point" + (f"{_v}" if _v else "")
    if f"{_name}-v0" not in gymnasium.registry:
        gymnasium.register(id=f"{_name}-v0", entry_point=_PointEnv, max_episode_steps=40, kwargs=_kw)
    for _t in (1, 2, 3):
        _id = f"{_name}-singletask-task{_t}-v0"
        if _id not in gymnasium.registry:
            gymnasium.register(id=_id, entry_point=_PointEnv, max_episode_steps=40, kwargs=dict(_kw, task=_t))


# ----------------------------------------------------------------------------------------------
# Hand-made actors
# ----------------------------------------------------------------------------------------------


def _seek(obs, goal, seed):
    """Deterministic: 4 actions toward the goal (singletask: toward task 1's goal), decaying."""
    target = np.asarray(goal, np.float64) if goal is not None else 0.6 * np.array([np.cos(1.0), np.sin(1.0)])
    a = np.clip(2.0 * (target - np.asarray(obs[:2], np.float64)), -1.0, 1.0)
    return np.stack([a * 0.9**j for j in range(4)])


def _noisy(obs, goal, seed):
    """Stochastic: the seek chunk plus N(0, 0.6) noise drawn from the decision's seed."""
    return np.clip(_seek(obs, goal, seed) + np.random.default_rng(seed).normal(0.0, 0.6, (4, 2)), -1.0, 1.0)


class _Recording:
    """A plain actor that records every call (obs, goal, seed)."""

    def __init__(self, f):
        self.f, self.calls = f, []

    def __call__(self, obs, goal, seed):
        self.calls.append((tuple(np.asarray(obs).tolist()), None if goal is None else tuple(goal), seed))
        return self.f(obs, goal, seed)


class _WithBatched(_Recording):
    """Also a batched form, each row computed like the single call; records the batch sizes."""

    def __init__(self, f):
        super().__init__(f)
        self.batch_sizes = []

    def batched(self, obs, goals, seeds):
        self.batch_sizes.append(len(obs))
        return np.stack([self.f(obs[i], None if goals is None else goals[i], int(seeds[i])) for i in range(len(obs))])


def _spread(res, both=True):
    """The episodes differ (lengths; successes and failures with ``both``): a meaningful comparison."""
    lengths = {r["length"] for r in res.per_episode}
    succ = {r["success"] for r in res.per_episode}
    return len(lengths) > 2 and (succ == {0.0, 1.0} or not both)


# ----------------------------------------------------------------------------------------------
# Parallel == sequential
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task_mode,task_ids,execute_steps,actor_fn,runs",
    [
        # stochastic, plain actor, chunks of 3 open-loop; (workers, batch_size) pairs
        ("goal", (1, 2, 3), 3, _noisy, [(2, 2), (3, 3), (2, 5)]),
        ("goal", (1, 2), 1, _seek, [(2, 2)]),  # deterministic, re-plans every step
        ("singletask", (1, 3), 2, _noisy, [(2, 3)]),  # one env id per task
    ],
)
def test_parallel_equals_sequential(task_mode, task_ids, execute_steps, actor_fn, runs):
    kw: dict[str, Any] = dict(
        task_mode=task_mode, task_ids=task_ids, episodes_per_task=5, execute_steps=execute_steps, seed=11
    )
    seq = _Recording(actor_fn)
    ref = evaluate(seq, "macfw-test-point", workers=1, batch_size=1, **kw)  # one episode after the other
    assert _spread(ref, both=actor_fn is _noisy)
    for w, b in runs:
        par = _Recording(actor_fn)
        res = evaluate(par, "macfw-test-point", workers=w, batch_size=b, **kw)
        assert res.per_episode == ref.per_episode
        assert res.to_dict() == ref.to_dict()
        assert sorted(par.calls, key=repr) == sorted(seq.calls, key=repr)  # the same decisions, other order
        local = evaluate(_Recording(actor_fn), "macfw-test-point", workers=1, batch_size=b, **kw)
        assert local.per_episode == ref.per_episode  # the same slots in this process


def test_batched_actor_called_once_per_decision_with_a_fixed_shape():
    kw: dict[str, Any] = dict(task_mode="goal", task_ids=(1, 2), episodes_per_task=4, execute_steps=2, seed=5)
    ref = evaluate(_Recording(_noisy), "macfw-test-point", workers=1, batch_size=1, **kw)
    actor = _WithBatched(_noisy)
    res = evaluate(actor, "macfw-test-point", workers=3, batch_size=3, **kw)
    assert res.per_episode == ref.per_episode
    assert not actor.calls  # the single form is not used
    assert set(actor.batch_sizes) == {3}  # finished rows padded: one compiled shape
    # one batched call per round: rounds = decisions of the longest chain of episodes per worker
    decisions = sum(-(-r["length"] // 2) for r in ref.per_episode)
    assert decisions / 3 <= len(actor.batch_sizes) < decisions


def test_decision_seeds_are_unchanged():
    """Episode (task i, j) resets with SeedSequence([seed, i, j]) word 0 and its decision d gets word 1 + d
    (mod 2**31) -- computed here with numpy, so `python -m macfw.evaluate` still reproduces old runs."""
    actor = _Recording(_noisy)
    res = evaluate(
        actor,
        "macfw-test-point",
        task_mode="goal",
        task_ids=(2,),
        episodes_per_task=2,
        execute_steps=4,
        seed=7,
        workers=2,
        batch_size=2,
    )
    want = []
    for j, ep in enumerate(res.per_episode):
        words = np.random.SeedSequence([7, 2, j]).generate_state(2)
        assert _episode_seeds(7, 2, j) == (int(words[0]) % 2**31, int(words[1]) % 2**31)
        want += [(int(words[1]) + d) % 2**31 for d in range(-(-ep["length"] // 4))]
    assert sorted(c[2] for c in actor.calls) == sorted(want)


def test_video_with_workers(tmp_path):
    import imageio.v3 as iio

    kw: dict[str, Any] = dict(task_mode="goal", task_ids=(1, 2), episodes_per_task=3, execute_steps=2, seed=3)
    ref = evaluate(_noisy, "macfw-test-point", workers=1, batch_size=1, video_path=tmp_path / "seq.gif", **kw)
    res = evaluate(_noisy, "macfw-test-point", workers=2, batch_size=3, video_path=tmp_path / "par.gif", **kw)
    assert res.per_episode == ref.per_episode
    assert res.per_episode == evaluate(_noisy, "macfw-test-point", workers=2, batch_size=3, **kw).per_episode
    frames = iio.imread(res.video_paths[0], index=None)
    recorded = [r for r in res.per_episode if r["episode"] == 0]  # the first episode of each task
    assert frames.shape[0] == sum(r["length"] + 1 for r in recorded)
    assert np.array_equal(frames, iio.imread(ref.video_paths[0], index=None))


def test_workers_run_apart_without_jax_and_follow_the_gin_binding():
    actor = _Recording(lambda o, g, s: np.zeros((1, 2)))
    gin.clear_config()
    try:
        gin.parse_config("evaluate.workers = 3\nevaluate.batch_size = 4")
        assert resolve_workers() == 3 and resolve_batch_size() == 4
        evaluate(actor, "macfw-test-pointprobe", task_mode="goal", task_ids=(1, 2), episodes_per_task=2)
    finally:
        gin.clear_config()
    obs = np.array([c[0] for c in actor.calls])
    assert set(obs[:, 3]) == {0.0} and set(obs[:, 4]) == {0.0}  # no jax, no macfw in the workers
    pids = set(obs[:, 5].astype(int))
    assert len(pids) == 3 and os.getpid() not in pids
    seq = _Recording(lambda o, g, s: np.zeros((1, 2)))
    evaluate(
        seq, "macfw-test-pointprobe", task_mode="goal", task_ids=(1,), episodes_per_task=2, workers=1, batch_size=2
    )
    assert {int(c[0][5]) for c in seq.calls} == {os.getpid()}


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_bad_workers():
    with pytest.raises(ConfigError, match=r"evaluate.workers = 0 .*integer >= 1"):
        evaluate(_seek, "macfw-test-point", task_mode="goal", workers=0)
    gin.clear_config()
    try:
        gin.parse_config("evaluate.workers = -2\nevaluate.batch_size = 0")
        with pytest.raises(ConfigError, match="evaluate.workers"):
            resolve_workers()
        with pytest.raises(ConfigError, match="evaluate.batch_size"):
            resolve_batch_size()
    finally:
        gin.clear_config()


@pytest.mark.parametrize(
    "variant,exc,match",
    [
        ("fail", ValueError, "failed on purpose at step 5"),  # the worker's exception, re-raised here
        ("nosuccess", ValueError, r"does not report info\['success'\]"),
        ("nogoal", ValueError, "has no 'goal'"),
        ("exit", RuntimeError, r"worker \d died \(exit code 3\)"),
    ],
)
def test_worker_errors(variant, exc, match):
    with pytest.raises(exc, match=match):
        evaluate(
            _seek,
            f"macfw-test-point{variant}",
            task_mode="goal",
            task_ids=(1, 2),
            episodes_per_task=2,
            workers=2,
            batch_size=2,
            execute_steps=1,
        )


def test_a_killed_worker_is_started_again_and_the_result_equals_a_run_without_the_fault(tmp_path, monkeypatch):
    """A worker killed with SIGKILL in the middle of an episode: the workers start again, the env's
    episodes run again with the same seeds, and every episode's result equals the undisturbed run's.
    A worker that dies every time fails the evaluation after WORKER_RESTARTS restarts."""
    kw: dict[str, Any] = dict(task_mode="goal", task_ids=(1, 2), episodes_per_task=3, workers=2, batch_size=4, seed=3)
    ref = evaluate(_noisy, "macfw-test-point", **kw)
    marker = tmp_path / "killed"
    monkeypatch.setenv("MACFW_TEST_KILL_ONCE", str(marker))
    with pytest.warns(UserWarning, match=r"worker \d died \(exit code -9\).*re-running the 6 episodes.*restart 1 of 2"):
        got = evaluate(_noisy, "macfw-test-pointkillonce", **kw)
    assert marker.exists()
    assert got.per_episode == ref.per_episode and got.to_dict() == ref.to_dict()
    with pytest.warns(UserWarning, match="restart 2 of 2"), pytest.raises(RuntimeError, match=r"worker \d died"):
        evaluate(_seek, "macfw-test-pointexit", **dict(kw, execute_steps=1))


def test_bad_actor_output_in_parallel():
    kw: dict[str, Any] = dict(task_mode="goal", task_ids=(1,), episodes_per_task=2, workers=2, batch_size=2)
    with pytest.raises(ValueError, match=r"execute_steps=5.*n=4"):
        evaluate(_seek, "macfw-test-point", execute_steps=5, **kw)
    bad = _WithBatched(_seek)
    bad.batched = lambda obs, goals, seeds: np.zeros((1, 4, 2))
    with pytest.raises(ValueError, match=r"batched actor returned an array of shape \(1, 4, 2\) for 2 episodes"):
        evaluate(bad, "macfw-test-point", **kw)
    with pytest.raises(ValueError, match=r"task_ids \[6\] out of range"):
        evaluate(
            _seek, "macfw-test-point", task_mode="goal", task_ids=(1, 6), episodes_per_task=1, workers=2, batch_size=2
        )


# ----------------------------------------------------------------------------------------------
# A real policy: MAC's act (flow policy + rejection sampling over seeded candidates), random weights
# ----------------------------------------------------------------------------------------------


def _agent_actor(ob_dim, goal_dim, act_dim=2, *, hidden=(32, 32), candidates=4, seed=0, gin_file="gin/mac.gin"):
    from macfw.bench import PRESETS, build_agent
    from macfw.data.batches import Scaler
    from macfw.spec import Spec
    from macfw.step import init_state

    preset = dict(PRESETS["tiny"], bindings=dict(PRESETS["tiny"]["bindings"], HIDDEN=hidden))
    try:  # (networks read their Gin bindings when the state is initialised)
        agent = build_agent(
            preset,
            gin_files=(gin_file, "gin/smoke_budget.gin"),
            gin_bindings=[f"RejectionSampler.num_act_candidates = {candidates}", "CHUNK = 4"],
        )
        spec = Spec(ob_dim=ob_dim, act_dim=act_dim, goal_dim=goal_dim, chunk_len=agent.batch_spec.chunk_len)
        state = init_state(agent, spec, seed)
    finally:
        gin.clear_config()
    lo, hi = -np.ones(ob_dim, np.float32), np.ones(ob_dim, np.float32)
    goal_scaler = Scaler(lo=-np.ones(goal_dim, np.float32), hi=np.ones(goal_dim, np.float32)) if goal_dim else None
    return make_actor(agent, agent.acting_params(state), Scaler(lo=lo, hi=hi), goal_scaler)


def test_policy_actor_single_is_the_batched_form():
    actor = _agent_actor(3, 2)
    rng = np.random.default_rng(0)
    obs, goals, seeds = rng.uniform(-1, 1, (3, 3)), rng.uniform(-1, 1, (3, 2)), np.array([5, 2**31 - 1, 0])
    out = actor.batched(obs, goals, seeds)
    assert out.shape == (3, 4, 2) and np.all(np.abs(out) <= 1.0)
    for i in range(3):  # a row does not depend on the others
        o, g, s = obs.copy(), goals.copy(), seeds.copy()
        o[i - 1], g[i - 1], s[i - 1] = 0.0, 0.0, 0
        assert np.array_equal(actor.batched(o, g, s)[i], out[i])
    one = actor(obs[0], goals[0], 5)
    assert np.array_equal(one, actor.batched(obs[:1], goals[:1], seeds[:1])[0])
    assert not np.array_equal(one, actor(obs[0], goals[0], 6))  # the seed matters
    with pytest.raises(ValueError, match=r"seeds must be 3 integers in \[0, 2\*\*31\)"):
        actor.batched(obs, goals, np.array([1, 2, 2**31]))


def test_policy_actor_keys_are_the_single_path_keys():
    import jax
    import jax.numpy as jnp

    seeds = [0, 1, 12345, 2**31 - 1]
    batched = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds, jnp.int32))
    for s, k in zip(seeds, np.asarray(batched)):
        assert np.array_equal(k, np.asarray(jax.random.PRNGKey(s)))


class _Tap:
    """Wraps a :class:`PolicyActor`; records every chunk it returns by decision seed (live rows only)."""

    def __init__(self, actor):
        self.actor, self.chunks = actor, {}

    def __call__(self, obs, goal, seed):
        out = self.actor(obs, goal, seed)
        self.chunks[seed] = out
        return out

    def batched(self, obs, goals, seeds):
        out = self.actor.batched(obs, goals, seeds)
        for i in np.flatnonzero(np.any(obs != 0, axis=1)):  # padded rows are all zeros
            self.chunks[int(seeds[i])] = out[i]
        return out


@pytest.mark.slow
@pytest.mark.parametrize("gin_file", ["gin/mac.gin", "gin/baselines/mopo.gin"])
def test_agent_parallel_equals_sequential_point_env(gin_file):
    """MAC (chunks, seeded candidates) and MOPO (one deterministic action, tanh of the mean: a vmapped
    product whose rounding depends on the batch size) give the same chunks in and out of workers."""
    actor = _agent_actor(3, 2, gin_file=gin_file)
    n = actor.agent.batch_spec.chunk_len
    kw: dict[str, Any] = dict(task_mode="goal", task_ids=(1, 2), episodes_per_task=3, execute_steps=min(2, n), seed=1)
    for batch_size, workers in ((2, 2), (4, 3)):  # (4, 3): two slots in one worker
        seq, par = _Tap(actor), _Tap(actor)
        ref = evaluate(seq, "macfw-test-point", workers=1, batch_size=batch_size, **kw)
        res = evaluate(par, "macfw-test-point", workers=workers, batch_size=batch_size, **kw)
        assert res.per_episode == ref.per_episode and res.to_dict() == ref.to_dict()
        # every decision got the same chunk, bit for bit (seeds are unique per decision)
        k = kw["execute_steps"]
        assert sorted(seq.chunks) == sorted(par.chunks) and len(seq.chunks) == sum(
            -(-r["length"] // k) for r in ref.per_episode
        )
        assert all(np.array_equal(seq.chunks[k], par.chunks[k]) for k in seq.chunks)


def test_mac_parallel_equals_sequential_cube_single():
    actor = _agent_actor(28, 3, 5)
    kw: dict[str, Any] = dict(
        task_mode="oraclerep",
        task_ids=(1, 2),
        episodes_per_task=2,
        execute_steps=2,
        seed=4,
        env_kwargs=dict(max_episode_steps=30),
    )
    seq, par = _Tap(actor), _Tap(actor)
    ref = evaluate(seq, "cube-single", workers=1, batch_size=2, **kw)
    res = evaluate(par, "cube-single", workers=2, batch_size=2, **kw)
    assert res.per_episode == ref.per_episode and all(r["length"] == 30 for r in ref.per_episode)
    assert sorted(seq.chunks) == sorted(par.chunks) and len(seq.chunks) == 4 * 15
    assert all(np.array_equal(seq.chunks[k], par.chunks[k]) for k in seq.chunks)
