"""Every ablation of the paper is a Gin swap (DESIGN §2.7), and every file in gin/ablations/ trains and
evaluates end to end at the smoke budget; the MAC-Gau policy, the MAC-FQL actor loss and the direct
(no-candidate) sampler do what they claim.

The end-to-end test runs each ``gin/ablations/*.gin`` (a glob: new files are covered) followed by
``gin/smoke_budget.gin`` (sizes and steps only, so the ablation's own change survives) in worker
processes that train every file in-process one after another (``gin.clear_config()`` between runs):
one Python start-up, one set of imports and one dataset generation for all of them.

Run this file as a script (``python tests/test_ablations.py --worker ...``) to be such a worker.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = sorted((REPO / "gin" / "ablations").glob("*.gin"))
BUDGET = REPO / "gin" / "smoke_budget.gin"
#: On top of the smoke budget: one compiled call of 2 gradient steps, one checkpoint, one evaluation.
E2E_BINDINGS = (
    "train.num_steps = 2",
    "train.steps_per_dispatch = 2",
    "train.log_interval = 2",
    "train.eval_interval = 2",
    "train.save_interval = 2",
    "train.progress = False",
)
#: Cheaper XLA CPU compilation for the end-to-end workers (tiny networks: compile time dominates).
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# ============================================================================================ worker
def _claim(claims: Path, name: str) -> bool:
    try:
        os.close(os.open(claims / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def worker(files: list[str], out_dir: Path, bindings: list[str]) -> None:
    """Train each not-yet-claimed file of ``files`` in this process; write ``out_dir/<stem>.json``."""
    import gin

    import macfw.run

    claims = out_dir / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    for f in files:
        stem = Path(f).stem
        if not _claim(claims, stem):
            continue
        workdir = out_dir / "runs" / stem
        t0 = time.time()
        result: dict[str, Any] = {"file": f, "workdir": str(workdir)}
        try:
            gin.clear_config()
            rc = macfw.run.main(
                [
                    "--gin_file",
                    f,
                    "--gin_file",
                    str(BUDGET),
                    "--workdir",
                    str(workdir),
                    *[x for b in bindings for x in ("--gin_bindings", b)],
                ]
            )
            result.update(rc=rc, ok=rc == 0)
        except BaseException:  # noqa: BLE001 - reported to the test
            result.update(rc=None, ok=False, error=traceback.format_exc())
        finally:
            gin.clear_config()
        result["wall_s"] = time.time() - t0
        print(f"[ablation worker] {stem}: ok={result['ok']} in {result['wall_s']:.1f} s", flush=True)
        (out_dir / f"{stem}.json").write_text(json.dumps(result))


# ============================================================================================ tests
if __name__ != "__main__":
    import equinox as eqx
    import gin
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import pytest
    from gin.config import ConfigurableReference

    import macfw.run
    from macfw import registry
    from macfw.agents.fql import MACFQL, DirectSampler, FQLActor
    from macfw.agents.mac import MAC
    from macfw.nn.flow import FlowPolicy
    from macfw.nn.gaussian import GaussianPolicy
    from macfw.nn.models import QCritic
    from macfw.spec import Spec

    HID = (32, 32)
    OB, ACT, N = 7, 3, 4
    B = 16

    @pytest.fixture(autouse=True)
    def _clean_gin():
        gin.clear_config()
        yield
        gin.clear_config()

    def _spec(goal_dim=4, chunk_len=N, act_dim=ACT):
        return Spec(ob_dim=OB, act_dim=act_dim, goal_dim=goal_dim, chunk_len=chunk_len)

    def _batch(spec, key, batch=B):
        ks = jax.random.split(key, 6)
        u = lambda k, shape: jax.random.uniform(k, shape, minval=-1.0, maxval=1.0)  # noqa: E731
        success = (jax.random.uniform(ks[5], (batch,)) < 0.3).astype(jnp.float32)
        return {
            "obs": u(ks[0], (batch, spec.ob_dim)),
            "actions": u(ks[1], (batch, spec.chunk_dim)) * 0.9,
            "next_obs": u(ks[2], (batch, spec.ob_dim)),
            "value_goals": u(ks[3], (batch, spec.goal_dim)),
            "actor_goals": u(ks[4], (batch, spec.goal_dim)),
            "success": success,
            "rewards": success - 1.0,
            "masks": 1.0 - success,
        }

    def _tiny(cls, **kw):
        """A class with tiny networks (factories are called as ``Cls(spec, key=...)``)."""
        return lambda spec, *, key: cls(spec, key=key, hidden_dims=HID, **kw)

    def _fql(alpha=0.3, policy=None, **kw):
        from macfw.nn.models import ChunkDynamics, RewardModel, StateValue, SuccessModel

        return MACFQL(
            dynamics=_tiny(ChunkDynamics),
            policy=policy or _tiny(FlowPolicy, flow_steps=3, distill=False),
            critic=_tiny(QCritic),
            value=_tiny(StateValue),
            success=_tiny(SuccessModel),
            reward=_tiny(RewardModel),
            actor=_tiny(FQLActor),
            sampler=DirectSampler(),
            horizon=2,
            rollout_batch_size=8,
            alpha=alpha,
            **kw,
        )

    # -------------------------------------------------------------------------- GaussianPolicy
    def test_gaussian_registered_and_sample_shapes_bounds():
        assert registry.get("policy", "GaussianPolicy") is GaussianPolicy
        spec = _spec()
        pi = GaussianPolicy(spec, key=jax.random.PRNGKey(0), hidden_dims=HID)
        # push the mean far out so that the squashing is exercised
        bias = pi.net.layers[-1].bias
        assert bias is not None
        pi = eqx.tree_at(lambda p: p.net.layers[-1].bias, pi, bias.at[: spec.chunk_dim].set(8.0))
        b = _batch(spec, jax.random.PRNGKey(1))
        keys = jax.random.split(jax.random.PRNGKey(2), B)
        # targets at +-1 exactly are clipped before atanh: finite loss and gradient
        A = jnp.ones((spec.chunk_dim,)).at[0].set(-1.0)

        @eqx.filter_jit
        def run(pi, s, g, keys):
            out = jax.vmap(lambda a, b_, c: pi.sample(a, b_, key=c))(s, g, keys)
            mean, log_std = pi.mean_log_std(s[0], g[0])
            (loss, metrics), grads = eqx.filter_value_and_grad(lambda p: p.loss(s[0], g[0], A), has_aux=True)(pi)
            return out, mean, log_std, loss, metrics, grads

        out, mean, log_std, loss, metrics, grads = run(pi, b["obs"], b["actor_goals"], keys)
        out = np.asarray(out)
        assert out.shape == (B, spec.chunk_dim)
        assert np.all(np.isfinite(out)) and out.min() >= -1.0 and out.max() <= 1.0
        assert out.max() > 0.99  # squashed, not clipped: the mean is at +8
        assert mean.shape == log_std.shape == (spec.chunk_dim,)
        assert float(log_std.min()) >= -5.0 and float(log_std.max()) <= 2.0
        assert np.isfinite(float(loss)) and all(k.startswith("policy/") for k in metrics)
        assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(eqx.filter(grads, eqx.is_array)))

    def test_gaussian_density_integrates_to_one():
        spec = Spec(ob_dim=2, act_dim=1, goal_dim=0, chunk_len=1)
        pi = GaussianPolicy(spec, key=jax.random.PRNGKey(3), hidden_dims=(8,))
        s, g = jnp.array([0.3, -0.2]), jnp.zeros((0,))
        grid = np.linspace(-1 + 1e-6, 1 - 1e-6, 40001)
        dens = np.exp(np.asarray(jax.jit(jax.vmap(lambda a: pi.log_prob(s, g, a[None])))(jnp.asarray(grid))))
        assert abs(np.trapezoid(dens, grid) - 1.0) < 2e-3

    def test_gaussian_nll_decreases_fitting_a_fixed_chunk():
        spec = _spec(goal_dim=0)
        pi = GaussianPolicy(spec, key=jax.random.PRNGKey(4), hidden_dims=HID)
        b = _batch(spec, jax.random.PRNGKey(5), batch=4)
        target = b["actions"][0]
        params, static = eqx.partition(pi, eqx.is_inexact_array)
        opt = optax.adam(1e-2)

        @jax.jit
        def fit(params):
            def nll(p):
                return eqx.combine(p, static).loss(b["obs"][0], b["value_goals"][0], target)[0]

            def step(carry, _):
                p, st = carry
                loss, gr = jax.value_and_grad(nll)(p)
                upd, st = opt.update(gr, st, p)
                return (optax.apply_updates(p, upd), st), loss

            (p, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=150)
            return losses

        losses = np.asarray(fit(params))
        assert np.all(np.isfinite(losses))
        # windowed means (the last tenth against the first tenth), not one noisy value: the NLL of
        # one chunk drops by tens of nats as the policy sharpens around it (per-dim std -> e^-5)
        first, last = losses[:15].mean(), losses[-15:].mean()
        assert last < first - 20.0, (first, last)
        # and it stays down: no spike in the last tenth reaches the start (log-std rescaled smoothly)
        assert losses[-15:].max() < first, (first, losses[-15:])

    # -------------------------------------------------------------------------- DirectSampler / FQLActor
    def test_direct_sampler_is_clipped_actor_without_candidates():
        spec = _spec()
        actor = FQLActor(spec, key=jax.random.PRNGKey(6), hidden_dims=HID)
        # scale the output so that clipping matters
        actor = eqx.tree_at(lambda a: a.net.layers[-1].weight, actor, actor.net.layers[-1].weight * 20.0)
        b = _batch(spec, jax.random.PRNGKey(7))
        s, g, k = b["obs"][0], b["actor_goals"][0], jax.random.PRNGKey(8)
        z = jax.random.normal(k, (spec.chunk_dim,))
        raw = np.asarray(actor(s, g, z))
        assert np.abs(raw).max() > 1.0
        for acting in (False, True):  # critic=None: a critic is never called, there are no candidates
            got = np.asarray(DirectSampler()(actor, None, s, g, key=k, acting=acting))
            np.testing.assert_array_equal(got, np.clip(raw, -1.0, 1.0))
        assert registry.get("sampler", "DirectSampler") is DirectSampler
        assert registry.get("actor", "FQLActor") is FQLActor

    # -------------------------------------------------------------------------- MACFQL
    def test_macfql_gin_selectable_and_inherits_mac_bindings():
        gin.parse_config("train.agent = @MACFQL()\nMAC.sampler = @DirectSampler()\nMAC.horizon = 4\nMACFQL.alpha = 0.5")
        assert gin.query_parameter("train.agent").selector == "MACFQL"
        agent = MACFQL()
        assert isinstance(agent, MAC)
        assert agent.horizon == 4 and agent.alpha == 0.5 and type(agent.sampler) is DirectSampler

    @pytest.fixture(scope="module")
    def fql():
        spec = _spec()
        a3, a0 = _fql(alpha=0.3), _fql(alpha=0.0)
        state = a3.init(spec, jax.random.PRNGKey(0))
        a0.spec = spec
        return spec, a3, a0, state, _batch(spec, jax.random.PRNGKey(1))

    def test_macfql_update_and_act_use_the_actor(fql):
        spec, agent, _, state, batch = fql
        assert isinstance(state.nets.actor, FQLActor)
        H, Br = agent.horizon, agent.rollout_batch_size

        @eqx.filter_jit
        def run(state, batch):
            new, metrics = agent.update(state, batch)
            chunk = agent.act(new.nets, batch["obs"][0], batch["value_goals"][0], key=jax.random.PRNGKey(3))
            roll = agent.rollout(new.nets, batch["obs"][:Br], batch["value_goals"][:Br], jax.random.PRNGKey(4))
            return new, metrics, chunk, roll

        new, metrics, chunk, roll = run(state, batch)
        assert int(new.step) == 1
        for k in ("actor/loss", "actor/q_loss", "actor/distill_loss", "critic/loss", "flow/loss"):
            assert np.isfinite(float(metrics[k])), k
        moved = jax.tree_util.tree_map(
            lambda a, b_: float(jnp.abs(a - b_).max()),
            eqx.filter(state.nets.actor, eqx.is_array),
            eqx.filter(new.nets.actor, eqx.is_array),
        )
        assert max(jax.tree_util.tree_leaves(moved)) > 0  # the optimiser trains the actor
        actor = new.nets.actor
        # acting: exactly the clipped actor chunk for the key's noise
        s, g, k = batch["obs"][0], batch["value_goals"][0], jax.random.PRNGKey(3)
        want = np.clip(np.asarray(actor(s, g, jax.random.normal(k, (spec.chunk_dim,)))), -1, 1)
        assert chunk.shape == (spec.chunk_len, spec.act_dim)
        np.testing.assert_allclose(np.asarray(chunk), want.reshape(spec.chunk_len, spec.act_dim), rtol=1e-5, atol=1e-5)
        # rollouts take their chunks from the actor too (MAC's key layout: split by step, then by state)
        k0 = jax.random.split(jax.random.split(jax.random.PRNGKey(4), H)[0], Br)[0]
        want0 = np.clip(
            np.asarray(actor(batch["obs"][0], batch["value_goals"][0], jax.random.normal(k0, (spec.chunk_dim,)))), -1, 1
        )
        np.testing.assert_allclose(np.asarray(roll["actions"][0, 0]), want0, rtol=1e-5, atol=1e-5)

    def test_macfql_loss_adds_alpha_times_distillation_and_spares_the_critic(fql):
        spec, a3, a0, state, batch = fql
        key = jax.random.PRNGKey(5)

        @eqx.filter_jit
        def run(nets, target_value, batch):
            roll = a3.rollout(nets, batch["obs"][:8], batch["value_goals"][:8], jax.random.PRNGKey(2))
            roll["goals"] = batch["value_goals"][:8]
            l3, m3 = a3.loss(nets, target_value, batch, roll, key)
            l0, m0 = a0.loss(nets, target_value, batch, roll, key)
            # gradients of the actor loss alone
            params, static = eqx.partition(nets, eqx.is_inexact_array)
            grads = jax.grad(lambda p: a3.actor_loss(eqx.combine(p, static), batch, key)[0])(params)
            norms = {k: optax.tree.norm(getattr(grads, k)) for k in ("actor", "critic", "policy")}
            return l3, m3, l0, m0, norms

        l3, m3, l0, m0, norms = run(state.nets, state.target_value, batch)
        distill = float(m3["actor/distill_loss"])
        assert distill > 0
        np.testing.assert_allclose(float(l3 - l0), 0.3 * distill, rtol=1e-4)
        np.testing.assert_allclose(float(m3["actor/loss"]), float(m3["actor/q_loss"]) + 0.3 * distill, rtol=1e-5)
        np.testing.assert_allclose(float(m3["actor/q_loss"]), float(m0["actor/q_loss"]), rtol=1e-6)
        # the actor loss trains the actor only: not the critic (Q under stop-gradient), not the flow policy
        assert float(norms["actor"]) > 0
        assert float(norms["critic"]) == 0.0
        assert float(norms["policy"]) == 0.0

    def test_macfql_distillation_target_is_the_flow_solution_clipped_to_the_action_range(fql):
        """The authors' mbfql.py clips the ODE solution before distilling: with a flow whose solution
        leaves [-1, 1], the loss must equal the distance to the clipped solution."""
        spec, a3, a0, state, batch = fql
        key = jax.random.PRNGKey(5)
        nets = state.nets
        big = eqx.tree_at(
            lambda n: n.policy,
            nets,
            jax.tree_util.tree_map(lambda x: 4.0 * x if eqx.is_inexact_array(x) else x, nets.policy),
        )  # a flow with large velocities
        s, g = batch["obs"], batch[a3.actor_goals]
        z = jax.vmap(big.actor.noise)(jax.random.split(key, s.shape[0]))
        solved = jax.vmap(big.policy.solve)(s, g, z)
        assert float(jnp.max(jnp.abs(solved))) > 1.0  # the case where clipping matters
        A = jax.vmap(big.actor)(s, g, z)
        _, m = a3.actor_loss(big, batch, key)
        np.testing.assert_allclose(
            float(m["actor/distill_loss"]), float(jnp.mean((A - jnp.clip(solved, -1, 1)) ** 2)), rtol=1e-5
        )

    def test_macfql_requires_a_flow_policy():
        agent = _fql(policy=_tiny(GaussianPolicy))
        with pytest.raises(ValueError, match="solve"):
            agent.init(_spec(), jax.random.PRNGKey(0))

    # -------------------------------------------------------------------------- the Gin files
    def _bindings_of(path: Path) -> dict[str, str]:
        """``name -> value text`` of the top-level bindings written in a Gin file (includes excluded)."""
        out = {}
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.match(r"^([\w./%]+)\s*=\s*(.+)$", line)
            if m:
                out[m.group(1)] = m.group(2).strip()
        return out

    def _query(name: str):
        if "." not in name:  # a macro
            return gin.query_parameter("%" + name)
        v = gin.query_parameter(name)
        return repr(v) if isinstance(v, ConfigurableReference) else v

    def test_ablation_files_exist():
        names = {p.stem for p in ABLATIONS}
        assert {
            "chunk1",
            "chunk5",
            "chunk25",
            "mac_gau",
            "mac_fql",
            "no_distill",
            "candidates_n1",
            "candidates_n64",
            "open_loop",
        } <= names
        for p in ABLATIONS:
            text = p.read_text()
            assert text.startswith("# Ablation"), p.name  # the comment header
            includes = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("include")]
            assert includes == ["include 'gin/mac.gin'"], (p.name, includes)  # the base config, nothing else

    @pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
    def test_ablation_change_survives_the_smoke_budget(path):
        """Every binding an ablation file writes has the same value with gin/smoke_budget.gin after it."""
        own = _bindings_of(path)
        assert own, f"{path.name} binds nothing"
        macfw.run.parse_gin([str(path)], [])
        alone = {k: _query(k) for k in own}
        gin.clear_config()
        macfw.run.parse_gin([str(path), str(BUDGET)], list(E2E_BINDINGS))
        assert {k: _query(k) for k in own} == alone

    def test_smoke_budget_binds_no_method_choice():
        budget = _bindings_of(BUDGET)
        assert not {
            "CHUNK",
            "GAMMA",
            "MAC.policy",
            "MAC.sampler",
            "train.agent",
            "train.execute_steps",
            "train.chunk_len",
            "FlowPolicy.distill",
        } & set(budget)
        assert not any(k.startswith(("RejectionSampler.", "MACFQL.", "GaussianPolicy.")) for k in budget)
        assert not [ln for ln in BUDGET.read_text().splitlines() if ln.strip().startswith("include")]

    def test_smoke_config_unchanged():
        """gin/smoke.gin = mac.gin + smoke_budget.gin + its own settings keeps the documented values."""
        macfw.run.parse_gin([str(REPO / "gin" / "smoke.gin")], [])
        q = gin.query_parameter
        assert q("%CHUNK") == 5 and q("%HIDDEN") == (32, 32)
        assert (q("train.num_steps"), q("train.save_interval"), q("train.steps_per_dispatch")) == (40, 20, 10)
        assert q("OGBenchDataset.env_name") == "cube-single"
        with pytest.raises(ValueError, match="task_mode"):  # the budget leaves the task mode to the agent
            q("OGBenchDataset.task_mode")
        assert (q("OGBenchDataset.num_episodes"), q("OGBenchDataset.episode_length")) == (4, 101)
        assert (q("RejectionSampler.num_train_candidates"), q("RejectionSampler.num_act_candidates")) == (2, 4)
        assert q("FlowPolicy.flow_steps") == 3 and q("train.eval_episodes") == 1

    # -------------------------------------------------------------------------- end to end
    def _selected_files(request) -> list[str]:
        """The ablation files of the end-to-end tests selected in this session (all of them by default)."""
        files = []
        for item in request.session.items:
            if getattr(item, "originalname", None) == "test_ablation_end_to_end":
                files.append(str(item.callspec.params["path"]))
        return files or [str(p) for p in ABLATIONS]

    @pytest.fixture(scope="module")
    def e2e(request, tmp_path_factory):
        """Run every selected ablation at the smoke budget in worker processes; ``stem -> result``."""
        root = tmp_path_factory.mktemp("ablations")
        env = dict(os.environ)
        env["MACFW_CACHE_DIR"] = str(root / "cache")
        env.setdefault("JAX_PLATFORMS", "cpu")
        env["XLA_FLAGS"] = FAST_COMPILE_XLA_FLAGS
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        env["PYTHONUNBUFFERED"] = "1"
        files = _selected_files(request)
        t0 = time.time()
        # the tiny dataset, generated once for all workers
        gen = subprocess.run(
            [
                sys.executable,
                "-c",
                "import macfw.run, macfw.data.ogbench_data as d; "
                f"macfw.run.parse_gin([{str(BUDGET)!r}], []); print(d.OGBenchDataset().resolve_path())",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert gen.returncode == 0, gen.stdout[-3000:] + gen.stderr[-3000:]
        n_workers = int(os.environ.get("MACFW_ABLATION_WORKERS", min(2, os.cpu_count() or 1, len(files))))
        procs = []
        for i in range(max(1, n_workers)):
            log = open(root / f"worker{i}.log", "w")
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--out",
                str(root),
                *[b for b in E2E_BINDINGS for b in ("--binding", b)],
                *files,
            ]
            procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        for p, log in procs:
            try:
                p.wait(timeout=1800)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.close()
        logs = "\n".join((root / f"worker{i}.log").read_text()[-4000:] for i in range(len(procs)))
        results = {}
        for f in files:
            r = root / f"{Path(f).stem}.json"
            results[Path(f).stem] = json.loads(r.read_text()) if r.exists() else None
        print(
            f"\n[test_ablations] {len(files)} ablations in {time.time() - t0:.0f} s with {len(procs)} workers: "
            + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in results.items() if v)
        )
        return results, logs

    @pytest.mark.slow
    @pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
    def test_ablation_end_to_end(path, e2e):
        results, logs = e2e
        r = results[path.stem]
        assert r is not None, f"{path.name}: the worker wrote no result.\n{logs}"
        assert r["ok"], f"{path.name} failed:\n{r.get('error') or ''}\n{logs}"
        summary = json.loads((Path(r["workdir"]) / "summary.json").read_text())
        assert summary["step"] == 2
        assert math.isfinite(summary["success"]) and 0.0 <= summary["success"] <= 1.0
        assert summary["episodes"] == 1
        # the ablation's change reached the run (CHUNK -> the data's chunk length, the agent class)
        gin.clear_config()
        macfw.run.parse_gin([str(path)], [])
        assert summary["spec"]["chunk_len"] == gin.query_parameter("%CHUNK")
        operative = (Path(r["workdir"]) / "config.gin").read_text()
        for name, value in _bindings_of(path).items():
            if "." in name and value.startswith("@"):
                assert value.rstrip("()").lstrip("@") in operative, (name, value)


# ============================================================================================ script
if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Train ablation Gin files in one process (worker of test_ablations).")
    ap.add_argument("--worker", action="store_true", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--binding", action="append", default=[])
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    worker(a.files, Path(a.out), a.binding)
