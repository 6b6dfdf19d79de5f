"""Tests for macfw.evaluate (CPU; OGBench cube-single plus tiny fake gymnasium envs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, cast

import gymnasium
import numpy as np
import pytest

from macfw.evaluation import EvalResult, evaluate

if TYPE_CHECKING:
    from gymnasium.envs.registration import EnvCreator

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Fake environments: success is 1 only on the last step, or only mid-episode.
# ----------------------------------------------------------------------------------------------


def _fake_env_class():
    """Defined in a function so that cloudpickle sends the class to evaluation workers by value (a worker
    then does not import this module, hence neither macfw nor JAX)."""

    class _FakeEnv(gymnasium.Env):
        """2-D env with a fixed horizon; info['success'] == 1 exactly at step ``success_step``."""

        metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

        def __init__(self, horizon=10, success_step=10, render_mode=None):
            self.horizon, self.success_step = horizon, success_step
            self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (2,), np.float64)
            self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)
            self.render_mode = render_mode
            self.reset_seeds: list = []
            self.actions: list = []
            self.t = 0

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.reset_seeds.append(seed)
            self.t = 0
            return np.zeros(2), {}

        def step(self, action):
            self.t += 1
            self.actions.append(np.asarray(action))
            info = {"success": float(self.t == self.success_step)}
            return np.full(2, float(self.t)), 1.0, False, False, info

        def render(self):
            return np.full((8, 8, 3), self.t, np.uint8)

    return _FakeEnv


# gymnasium types entry_point as a callable taking **kwargs; an Env class is a valid one at runtime
_FakeEnv = cast("EnvCreator", _fake_env_class())

_FAKE_ENVS = {
    "macfw-test-fake": dict(horizon=10, success_step=10),
    "macfw-test-fakemid": dict(horizon=10, success_step=5),
}
for _name, _kw in _FAKE_ENVS.items():
    _id = f"{_name}-singletask-task1-v0"
    if _id not in gymnasium.registry:
        gymnasium.register(id=_id, entry_point=_FakeEnv, max_episode_steps=_kw["horizon"], kwargs=_kw)


class _Counter:
    """Actor returning random (n, act_dim) chunks; records calls, goals and seeds."""

    def __init__(self, n=1, act_dim=5):
        self.n, self.act_dim = n, act_dim
        self.calls = 0
        self.goals: list = []
        self.seeds: list = []

    def __call__(self, obs, goal, seed):
        self.calls += 1
        self.goals.append(goal)
        self.seeds.append(seed)
        assert isinstance(seed, int)
        return np.random.default_rng(seed).uniform(-1, 1, (self.n, self.act_dim))


# ----------------------------------------------------------------------------------------------
# OGBench cube-single
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_random_actor_cube_single_singletask():
    actor = _Counter(n=1)
    res = evaluate(actor, "cube-single", task_ids=(1,), episodes_per_task=2, seed=0)
    assert isinstance(res, EvalResult)
    assert res.episodes == 2
    assert 0.0 <= res.success <= 1.0
    assert set(res.per_task_success) == {"task1"}
    assert res.mean_length == 200  # cube-single episodes are 200 steps; random never succeeds
    assert actor.calls == 400
    assert all(g is None for g in actor.goals)
    assert len(set(actor.seeds)) == len(actor.seeds)  # a different seed every decision
    d = res.to_dict()
    assert d["episodes"] == 2 and "per_task_success" in d
    json.dumps(d)


@pytest.mark.slow
@pytest.mark.parametrize("execute_steps,calls", [(5, 40), (1, 200)])
def test_execute_steps_counts_decisions(execute_steps, calls):
    actor = _Counter(n=5)
    res = evaluate(actor, "cube-single", task_ids=(1,), episodes_per_task=1, execute_steps=execute_steps)
    assert res.mean_length == 200
    assert actor.calls == calls


@pytest.mark.slow
def test_oraclerep_passes_goal():
    actor = _Counter(n=5)
    res = evaluate(actor, "cube-single", task_mode="oraclerep", task_ids=(1, 2), episodes_per_task=1, execute_steps=5)
    assert res.episodes == 2 and set(res.per_task_success) == {"task1", "task2"}
    assert all(g is not None and np.shape(g) == (3,) for g in actor.goals)
    # the two tasks have different goals
    assert not np.allclose(actor.goals[0], actor.goals[-1])


# ----------------------------------------------------------------------------------------------
# Success read at the episode's end (fake envs)
# ----------------------------------------------------------------------------------------------


def test_success_is_read_at_episode_end():
    res = evaluate(_Counter(act_dim=2), "macfw-test-fake", task_ids=(1,), episodes_per_task=3)
    assert res.success == 1.0 and res.per_task_success == {"task1": 1.0}
    assert res.mean_length == 10 and res.mean_return == 10.0


def test_success_mid_episode_does_not_count():
    res = evaluate(_Counter(act_dim=2), "macfw-test-fakemid", task_ids=(1,), episodes_per_task=3)
    assert res.success == 0.0


def test_chunk_execution_stops_at_episode_end_and_clips():
    # horizon 10, chunks of 4 executed whole: decisions at steps 0, 4, 8 -> 3 calls, 10 steps.
    actor = lambda obs, goal, seed: np.full((4, 2), 3.0)  # noqa: E731
    calls = []
    res = evaluate(
        lambda o, g, s: calls.append(s) or actor(o, g, s),
        "macfw-test-fake",
        task_ids=(1,),
        episodes_per_task=1,
        execute_steps=4,
    )
    assert len(calls) == 3 and res.mean_length == 10


def test_seeds_reproducible_and_distinct():
    a, b = _Counter(act_dim=2), _Counter(act_dim=2)
    evaluate(a, "macfw-test-fake", task_ids=(1,), episodes_per_task=2, seed=3)
    evaluate(b, "macfw-test-fake", task_ids=(1,), episodes_per_task=2, seed=3)
    assert a.seeds == b.seeds
    assert len(set(a.seeds)) == len(a.seeds) == 20
    c = _Counter(act_dim=2)
    evaluate(c, "macfw-test-fake", task_ids=(1,), episodes_per_task=2, seed=4)
    assert c.seeds != a.seeds


def test_progress_bar_runs():
    res = evaluate(_Counter(act_dim=2), "macfw-test-fake", task_ids=(1,), episodes_per_task=2, progress=True)
    assert res.episodes == 2


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_bad_task_mode():
    with pytest.raises(ValueError, match="bogus") as e:
        evaluate(_Counter(), "cube-single", task_mode="bogus")
    assert "singletask" in str(e.value) and "oraclerep" in str(e.value)


def test_unknown_env():
    with pytest.raises(ValueError, match="cube-singel-singletask-task1-v0") as e:
        evaluate(_Counter(), "cube-singel", task_ids=(1,), episodes_per_task=1)
    assert "cube-single-singletask-task1-v0" in str(e.value)  # lists similar registered ids


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(episodes_per_task=0), "episodes_per_task"),
        (dict(execute_steps=0), "execute_steps"),
        (dict(task_ids=()), "task_ids"),
        (dict(task_ids=(0,)), "0"),
    ],
)
def test_bad_counts(kw, needle):
    with pytest.raises(ValueError, match=needle) as e:
        evaluate(_Counter(act_dim=2), "macfw-test-fake", **kw)
    if "episodes_per_task" in kw or "execute_steps" in kw:
        assert "got 0" in str(e.value)


def test_execute_steps_longer_than_chunk():
    with pytest.raises(ValueError, match=r"execute_steps=5.*n=2"):
        evaluate(_Counter(n=2, act_dim=2), "macfw-test-fake", task_ids=(1,), episodes_per_task=1, execute_steps=5)


def test_bad_chunk_shape():
    with pytest.raises(ValueError, match=r"\(3, 7\)"):
        evaluate(lambda o, g, s: np.zeros((3, 7)), "macfw-test-fake", task_ids=(1,), episodes_per_task=1)


def test_bad_video_suffix(tmp_path):
    with pytest.raises(ValueError, match="avi"):
        evaluate(_Counter(act_dim=2), "macfw-test-fake", task_ids=(1,), video_path=tmp_path / "v.avi")


# ----------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------


def test_video_fake_env(tmp_path):
    import imageio.v3 as iio

    res = evaluate(
        _Counter(act_dim=2),
        "macfw-test-fake",
        task_ids=(1,),
        episodes_per_task=3,
        video_path=tmp_path / "fake.gif",
        video_episodes=2,
    )
    assert res.episodes == 3 and res.video_paths == [str(tmp_path / "fake.gif")]
    frames = iio.imread(res.video_paths[0], index=None)
    assert frames.shape[0] == 2 * 11  # 2 episodes x (reset + 10 steps)


_VIDEO_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np
    from macfw.evaluation import evaluate
    actor = lambda o, g, s: np.random.default_rng(s).uniform(-1, 1, (5, 5))
    try:
        # Software EGL renders ~0.4 s/frame here, so keep the episode to 5 steps.
        res = evaluate(actor, 'cube-single', task_ids=(1,), episodes_per_task=1, execute_steps=5,
                       video_path=sys.argv[1], env_kwargs=dict(width=64, height=64, max_episode_steps=5))
    except RuntimeError as e:
        print(json.dumps({'error': str(e)})); sys.exit(0)
    print(json.dumps(res.to_dict()))
""")


def _run_video(tmp_path, gl):
    env = dict(os.environ, MUJOCO_GL=gl, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DISPLAY", None)
    out = subprocess.run(
        [sys.executable, "-c", _VIDEO_SCRIPT, str(tmp_path / "cube.mp4")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_video_cube_single_egl(tmp_path):
    import imageio.v3 as iio

    d = _run_video(tmp_path, "egl")
    if "error" in d:
        pytest.skip(f"MuJoCo EGL rendering is unavailable on this machine: {d['error']}")
    assert d["episodes"] == 1 and len(d["video_paths"]) == 1
    path = d["video_paths"][0]
    assert Path(path).exists() and path.endswith((".mp4", ".gif"))
    frames = iio.imread(path, index=None)
    assert d["mean_length"] == 5
    assert frames.shape[0] == 6 and frames.shape[1:3] == (64, 64)
    assert frames.std() > 0


@pytest.mark.slow
def test_video_bad_backend_raises_clear_error(tmp_path):
    d = _run_video(tmp_path, "glfw")  # GLFW needs a display; DISPLAY is removed
    if "error" not in d:
        pytest.skip("MUJOCO_GL=glfw renders without a display on this machine; nothing to check")
    assert "MUJOCO_GL" in d["error"] and "egl" in d["error"]
