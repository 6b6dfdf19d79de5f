"""The throughput benchmark: the command line writes consistent figures, and the FLOP count of an
update includes every step of the (unrolled) imagined rollout.

The command-line run (a subprocess, ``--preset tiny``: horizon 3) starts first so its compilation
overlaps the in-process horizon-1 run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT = float(os.environ.get("MACFW_TEST_SUBPROCESS_TIMEOUT", "480"))


class _CLI:
    def __init__(self, tmp: Path):
        self.json_path = tmp / "bench.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MACFW_")}
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device")]
        env["XLA_FLAGS"] = " ".join(flags)
        env["JAX_PLATFORMS"] = "cpu"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "macfw.bench",
                "--preset",
                "tiny",
                "--json",
                str(self.json_path),
                "--dispatches",
                "2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(Path(__file__).parents[1]),
        )
        self._done = None

    def result(self):
        if self._done is None:
            try:
                out, err = self.proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, err = self.proc.communicate()
                pytest.fail(
                    f"python -m macfw.bench timed out after {TIMEOUT:.0f} s\n{out}\n{err[-6000:]}", pytrace=False
                )
            self._done = (self.proc.returncode, out, err)
        rc, out, err = self._done
        if rc != 0:
            pytest.fail(
                f"python -m macfw.bench exited with {rc}\nstdout:\n{out}\nstderr:\n{err[-6000:]}", pytrace=False
            )
        return out, json.loads(self.json_path.read_text())


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    c = _CLI(tmp_path_factory.mktemp("bench"))
    yield c
    if c.proc.poll() is None:
        c.proc.kill()
        c.proc.wait()


@pytest.mark.slow
def test_flops_grow_with_every_rollout_step(cli, monkeypatch):
    """FLOPs(H=3) - FLOPs(H=1) must hold at least two more rollout steps (XLA counts a loop body once,
    so a rolled-up rollout would add only the H-proportional value-loss work)."""
    import equinox as eqx
    import jax

    from macfw import bench
    from macfw.spec import Spec

    tiny = bench.PRESETS["tiny"]
    h1 = dict(tiny, bindings={**tiny["bindings"], "MAC.horizon": 1})
    monkeypatch.setitem(bench.PRESETS, "tiny-h1", h1)
    monkeypatch.setattr(bench, "peak_meter", lambda *a, **k: lambda **kw: 1.0)  # the peak is checked on the CLI run
    out1 = bench.run("tiny-h1", dispatches=1, count_executed=False)
    assert out1["config"]["bindings"]["MAC.horizon"] == 1

    # FLOPs of one rollout step alone (horizon 1): every extra horizon step must add at least this
    agent = bench.build_agent(h1).for_flop_count()
    spec = Spec(ob_dim=28, act_dim=5, goal_dim=0, chunk_len=agent.chunk_len)
    state = agent.init(spec, jax.random.PRNGKey(0))
    data = bench.synthetic_data(spec)
    Br = h1["bindings"]["MAC.rollout_batch_size"]
    roll = eqx.filter_jit(lambda nets, s, g, k: agent.rollout(nets, s, g, k)["states"])
    roll_step = bench._flops(
        roll.lower(state.nets, data.observations[:Br], data.goals[:Br], jax.random.PRNGKey(1)).compile()
    )
    assert roll_step > 0

    _, out3 = cli.result()
    H3 = out3["config"]["bindings"]["MAC.horizon"]
    assert H3 == 3
    f1, f3 = out1["flops_per_update"], out3["flops_per_update"]
    assert f3 > f1 > 0, (f1, f3)
    assert f3 - f1 >= 0.95 * (H3 - 1) * roll_step, (
        f"FLOPs grew by {f3 - f1:.4g} from horizon 1 to {H3}, less than {H3 - 1} rollout steps of {roll_step:.4g}: "
        "the rollout is not counted per step"
    )


def test_cli_tiny(cli):
    out, r = cli.result()
    assert "utilisation" in out
    assert r["preset"] == "tiny" and r["agent"] == "MAC" and r["steps_per_dispatch"] == 2
    for k in ("updates_per_s", "flops_per_update", "matmul_peak_flops", "rollout_s", "sampler_s", "compile_s"):
        assert r[k] > 0, (k, r[k])
    assert r["achieved_flops"] == pytest.approx(r["flops_per_update"] * r["updates_per_s"], rel=1e-6)
    # utilisation: the median over dispatches of (achieved / peak) for each dispatch and the peak timed after it
    lo, hi = r["utilisation_range"]
    assert 0 < lo <= r["utilisation"] <= hi
    # the program shares products the reference computes in full: it executes fewer FLOPs
    assert 0 < r["executed_flops_per_update"] < r["flops_per_update"]
    assert r["hardware_utilisation"] == pytest.approx(
        r["utilisation"] * r["executed_flops_per_update"] / r["flops_per_update"], rel=1e-6
    )
    assert r["rollout_per_s"] == pytest.approx(1.0 / r["rollout_s"], rel=1e-6)
    # timed as python -m macfw.run trains: freed host memory kept mapped where the C library is glibc
    from macfw.memory import is_glibc

    assert r["retained_freed_memory"] is is_glibc()


def test_all_agents_lists_every_agent_and_its_data_mode():
    from macfw.bench import agent_gin_files, goal_conditioned_by_default

    files = agent_gin_files()
    baselines = {p.stem for p in (Path(__file__).resolve().parents[1] / "gin" / "baselines").glob("*.gin")}
    assert set(files) == {"mac"} | baselines and files["mac"] == "gin/mac.gin"
    assert goal_conditioned_by_default("gin/baselines/gciql.gin") and not goal_conditioned_by_default("gin/mac.gin")


def test_compile_times_runs_off_cold_warm_in_fresh_processes(tmp_path, monkeypatch):
    """--compile-time: three children (no cache, then the same folder twice), a refused non-empty folder."""
    import subprocess as sp

    from macfw import bench

    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        label = len(calls)
        line = json.dumps(
            {"first_dispatch_s": {1: 9.0, 2: 10.0, 3: 2.5}[label], "dispatch_s": 0.1, "steps_per_dispatch": 2}
        )
        return sp.CompletedProcess(cmd, 0, stdout="noise\n" + line + "\n", stderr="")

    monkeypatch.setattr(sp, "run", fake_run)
    r = bench.compile_times("tiny", cache_dir=tmp_path / "cache", extra_args=["--gin_file", "gin/mac.gin"])
    assert [("--_compilation-cache" in c) for c in calls] == [False, True, True]
    assert calls[1][calls[1].index("--_compilation-cache") + 1] == calls[2][calls[2].index("--_compilation-cache") + 1]
    assert all("--_first-dispatch" in c and "gin/mac.gin" in c for c in calls)
    assert (r["off_s"], r["cold_s"], r["warm_s"]) == (9.0, 10.0, 2.5) and r["cold_over_warm"] == pytest.approx(4.0)

    full = tmp_path / "full"
    full.mkdir()
    (full / "entry").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        bench.compile_times("tiny", cache_dir=full)

    monkeypatch.setattr(sp, "run", lambda cmd, **kw: sp.CompletedProcess(cmd, 1, stdout="", stderr="boom"))
    with pytest.raises(RuntimeError, match="boom"):
        bench.compile_times("tiny", cache_dir=tmp_path / "c2")
