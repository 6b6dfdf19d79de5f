"""MOPO against the authors' ``agents/mopo.py`` (``MOPOAgent``), single-task and goal-conditioned: the
same initial parameters, the same mixed batches (half real, half model transitions, one batch fed to
both), the same random draws, every metric of their ``total_loss`` after 1 and after
``opts.updates`` updates, the parameters after ``opts.updates``; one model-rollout round (the
buffer's new transitions from the same start states and draws); and the speed of both updates.
MOBILE's case (``parity_cases/mobile.py``) is this module with ``agents/mobile.py``.

Parameters: macfw's networks mapped into the authors' ``ModuleDict`` tree (:func:`to_flax`):
``modules_dynamics`` (``Dynamics``, 7 members: ``dynamics_net`` stacked, :func:`ensemble_to_flax`),
``modules_critic`` / ``modules_target_critic`` (``GCValue``, 2 members), ``modules_actor``
(``GCActor``: ``actor_net`` = the hidden layers, ``mean_net`` / ``log_std_net`` = the first / last
``act_dim`` outputs of macfw's final layer), ``modules_success`` / ``modules_reward`` (``GCValue``,
one member), ``modules_lam`` (``LogParam``: ``log_value`` = ``log_alpha``). Goal-conditioned macfw
has no reward head; the authors' is left at its own initialisation (defect
``gc_reward_head_trained_unused``).

Batches: synthetic transitions (cube-single's shapes, ob_dim 28, act_dim 5; goal-conditioned with
a 3-d goal), ``B = 32`` of which the first 16 are the real batch (the authors' ``real_batch``, the
models' batch) and the last 16 the model batch (their ``fake_batch``, sampled from the buffer in
``main_mbpo.py``). Both get the same arrays: macfw through ``MOPO.update_on(state, real, mixed,
is_model, noise)`` (the update after the buffer draw), the authors through ``update(real_batch,
fake_batch)``. Masks mix 0 and 1 so that every success metric is defined.

Random draws: method (b) then (a). macfw's update draws every noise at batch level
(``MOPO.draw_noise``: the dynamics samples of the ``dynamics_mse`` metric ``(k, 16, 28)``; MOBILE's
penalty samples ``s'_ij (k, J, 16, 28)`` and ``a'_ij (k, J, 16, 5)``; the actor's ``(32, 5)``; the
target's ``a' (32, 5)``) and computes deterministically from them; the same arrays are replayed into
the authors' ``jax.random.normal`` calls in the order they make them (distrax draws at batch level),
each checked by element count. The rollout round likewise (``MOPO.rollout_noise``: per step the
actions' normals, the chosen member's normals and the member indices; the authors draw all ``k``
members' normals and ``jax.random.choice`` the member: the replay puts macfw's normals at the chosen
member, and their ``lax.scan`` runs as a Python loop while traced).

Defects (DESIGN §9 and one more), listed with each side's value: ``mopo_gc_rollout_unset_key``
(their goal-conditioned MOPO rollout reads ``rollout_data['rewards']``, never set: KeyError; the
rollout terms compare with MOBILE's copy of the same function, which sets it);
``mbpo_prefill_untrained_and_normalised_twice`` (``main_mbpo.py`` fills the buffer before the first
update and passes it through ``Dataset.create(scale=...)``, which rescales the keys containing
``observations`` a second time); ``data_pipeline_not_checkpointed`` (their checkpoint is the agent
alone; the fake buffer and the loop's RNGs are lost; macfw's buffer is in the state);
``gc_reward_head_trained_unused`` (goal-conditioned, they train a reward head that no rollout reads:
its ``reward/*`` metrics have no macfw counterpart).

Metrics (the authors' name -> macfw's): :data:`METRICS` (``actor/total_loss`` is macfw's
``actor/loss + temperature/loss``). The authors' ``grad/*`` (from ``TrainState.apply_loss_fn``,
outside ``total_loss``) are not compared; the parameters after ``opts.updates`` Adam steps compare
the gradients' effect in full.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from parity_cases.common import (
    Options,
    agent_result,
    ensemble_to_flax,
    macfw_update,
    mlp_to_flax,
    mlp_to_flax_split,
    rel_err,
    replay,
    time_updates,
    tree_rel_err,
    unjitted,
    xla_flops,
)

#: the authors' jitted methods traced inline (by one outer jit) while their draws are replayed
JITTED = ("update", "total_loss", "rollout", "sample_actions")

#: the authors' metric -> macfw's metric (a tuple: their sum)
METRICS = {
    "dynamics/dynamics_loss": "dynamics/loss",
    "dynamics/dynamics_mse": "dynamics/sample_mse",
    "success/success_loss": "success/loss",
    "success/success_mean": "success/prob",
    "success/success_max": "success/prob_max",
    "success/success_min": "success/prob_min",
    "success/accuracy_0.5": "success/accuracy",
    "success/accuracy_0.7": "success/accuracy_0.7",
    "success/accuracy_0.9": "success/accuracy_0.9",
    "success/pos_acc": "success/pos_accuracy",
    "success/neg_acc": "success/neg_accuracy",
    "success/data_success_mean": "success/label_mean",
    "reward/reward_loss": "reward/loss",
    "reward/reward_mean": "reward/pred",
    "reward/reward_max": "reward/pred_max",
    "reward/reward_min": "reward/pred_min",
    "reward/data_reward_mean": "reward/target_mean",
    "preprocess/penalty": "penalty/mean",
    "actor/total_loss": ("actor/loss", "temperature/loss"),
    "actor/actor_loss": "actor/loss",
    "actor/lam_loss": "temperature/loss",
    "actor/lam": "temperature/alpha",
    "actor/entropy": "temperature/entropy",
    "actor/std": "actor/std_mean",
    "actor/q": "actor/q_mean",
    "critic/critic_loss": "critic/loss",
    "critic/q_mean": "critic/q_mean",
    "critic/q_max": "critic/q_max",
    "critic/q_min": "critic/q_min",
}

OB_DIM, ACT_DIM, GOAL_DIM = 28, 5, 3  # cube-single's observation and action; a 3-d oracle goal
NUM_DYNAMICS, NUM_QS, ROLLOUT_STEPS = 7, 2, 5
SMALL: dict[str, Any] = dict(hidden=(64, 64), batch=32, starts=64)
ROLLOUT_FIELDS = ("observations", "actions", "next_observations", "rewards", "masks", "value_goals", "actor_goals")
MACFW_FIELD = {"observations": "obs", "next_observations": "next_obs"}


# ------------------------------------------------------------------------------ both agents
def macfw_agent(name: str, hidden, num_starts: int = 64, capacity_rounds: int = 1):
    """macfw's MOPO or MOBILE as ``gin/baselines/<name>.gin`` builds it, at ``hidden`` sizes."""
    from macfw.agents.mbpo import ModelRollouts
    from macfw.agents.mobile import MOBILE
    from macfw.agents.mopo import MOPO
    from macfw.nn.actors import TanhGaussianActor, Temperature
    from macfw.nn.ensemble import Ensemble
    from macfw.nn.models import GaussianDynamics, QCritic, RewardModel, SuccessModel

    P = functools.partial
    kw: dict[str, Any] = dict(
        dynamics=P(
            Ensemble,
            member=P(GaussianDynamics, hidden_dims=hidden, log_std_min=-5.0, log_std_max=1.0),
            num=NUM_DYNAMICS,
        ),
        critic=P(Ensemble, member=P(QCritic, hidden_dims=hidden), num=NUM_QS),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        actor=P(
            TanhGaussianActor,
            hidden_dims=hidden,
            final_init_scale=0.01,
            log_std_min=-5.0,
            log_std_max=2.0,
            log_std_bound="clip",
        ),
        success=P(SuccessModel, hidden_dims=hidden),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        reward=P(RewardModel, hidden_dims=hidden),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        temperature=Temperature,
        rollouts=ModelRollouts(
            rollout_freq=1000,
            rollout_length=ROLLOUT_STEPS,
            num_starts=num_starts,
            retain_rounds=capacity_rounds,
            real_ratio=0.5,
        ),
        gamma=0.999,
        beta=0.003,
        tau=0.005,
        learning_rate=3e-4,
        target_entropy_scale=0.5,
        q_agg="min",
    )
    return MOBILE(**kw, num_samples=5) if name == "mobile" else MOPO(**kw)


def reference_config(mod, hidden, batch_size: int):
    cfg = mod.get_config()
    cfg.actor_hidden_dims = cfg.value_hidden_dims = cfg.dynamics_hidden_dims = tuple(hidden)
    cfg.batch_size = batch_size
    cfg.num_dynamics, cfg.num_qs, cfg.rollout_steps = NUM_DYNAMICS, NUM_QS, ROLLOUT_STEPS
    return cfg


def to_flax(nets, target_critic, like: dict) -> dict:
    """macfw's networks as the authors' ``network.params`` (``like``: theirs, for the parts macfw lacks)."""
    import jax.numpy as jnp

    A = nets.actor.chunk_dim
    hidden, last = mlp_to_flax_split(nets.actor.net)
    out = dict(like)
    out.update(
        {
            "modules_dynamics": {"dynamics_net": ensemble_to_flax(nets.dynamics.members.net)},
            "modules_critic": {"value_net": ensemble_to_flax(nets.critic.members.net)},
            "modules_target_critic": {"value_net": ensemble_to_flax(target_critic.members.net)},
            "modules_actor": {
                "actor_net": hidden,
                "mean_net": {"kernel": last["kernel"][:, :A], "bias": last["bias"][:A]},
                "log_std_net": {"kernel": last["kernel"][:, A:], "bias": last["bias"][A:]},
            },
            "modules_success": {"value_net": mlp_to_flax(nets.success.net)},
            "modules_lam": {"log_value": jnp.asarray(nets.temperature.log_alpha)},
        }
    )
    if nets.reward is not None:
        out["modules_reward"] = {"value_net": mlp_to_flax(nets.reward.net)}
    return out


def build(ref, name: str, hidden, batch_size: int, gc: bool, seed: int, num_starts: int = 64, capacity_rounds: int = 1):
    """``(agent, spec, state, theirs)``: macfw's agent and state, and the authors' agent holding the
    same parameters."""
    import jax

    from macfw.spec import Spec

    mod = ref.agent(name)
    agent = macfw_agent(name, hidden, num_starts, capacity_rounds)
    spec = Spec(ob_dim=OB_DIM, act_dim=ACT_DIM, goal_dim=GOAL_DIM if gc else 0, chunk_len=1)
    state = agent.init(spec, jax.random.PRNGKey(seed))
    ex = {"observations": np.zeros((1, OB_DIM), np.float32), "actions": np.zeros((1, ACT_DIM), np.float32)}
    if gc:
        ex.update(value_goals=np.zeros((1, GOAL_DIM), np.float32), actor_goals=np.zeros((1, GOAL_DIM), np.float32))
    cls = mod.MOBILEAgent if name == "mobile" else mod.MOPOAgent
    theirs = cls.create(seed, ex, reference_config(mod, hidden, batch_size))
    params = to_flax(state.nets, state.target_critic, theirs.network.params)
    theirs = theirs.replace(network=theirs.network.replace(params=params))
    return agent, spec, state, theirs


# ------------------------------------------------------------------------------ batches
def make_batch(spec, batch_size: int, seed: int) -> tuple[dict, dict, dict]:
    """``(real, model, loop_batch)``: the real and model halves with macfw's field names (``masks``
    mixing 0 and 1), and the loop's batch whose first half is ``real`` (for the speed part)."""
    rng = np.random.default_rng(seed)
    n = batch_size // 2

    def half(m):
        s = rng.uniform(-1, 1, (m, spec.ob_dim)).astype(np.float32)
        success = (rng.uniform(size=m) < 0.3).astype(np.float32)
        success[:2] = (1.0, 0.0)
        out = {
            "obs": s,
            "actions": rng.uniform(-0.99, 0.99, (m, spec.act_dim)).astype(np.float32),
            "next_obs": (s + 0.1 * rng.normal(size=s.shape)).astype(np.float32),
            "masks": 1.0 - success,
            "rewards": (success - 1.0 if spec.goal_conditioned else rng.normal(size=m)).astype(np.float32),
            "value_goals": rng.uniform(-1, 1, (m, spec.goal_dim)).astype(np.float32),
            "actor_goals": rng.uniform(-1, 1, (m, spec.goal_dim)).astype(np.float32),
        }
        return out

    real, model = half(n), half(batch_size - n)
    loop = {k: np.concatenate([real[k], model[k]]) for k in real}
    loop["success"] = 1.0 - loop.pop("masks")
    return real, model, loop


def reference_batch(b: dict, gc: bool) -> dict:
    """macfw's transition fields under the authors' key names (no goals single-task)."""
    out = {
        "observations": b["obs"],
        "actions": b["actions"],
        "next_observations": b["next_obs"],
        "rewards": b["rewards"],
        "masks": b["masks"],
    }
    if gc:
        out.update(value_goals=b["value_goals"], actor_goals=b["actor_goals"])
    return out


# ------------------------------------------------------------------------------ the authors' code, traced
def update_tape(noise: dict, gc: bool) -> list:
    """macfw's draws of one update (``MOPO.draw_noise``) in the order the authors' ``total_loss`` draws."""
    tape = [("normal", noise["dynamics"])]  # dynamics_loss: the sample of dynamics_mse
    if "penalty/next_obs" in noise:  # MOBILE's compute_penalty (in preprocess)
        tape += [("normal", noise["penalty/next_obs"]), ("normal", noise["penalty/next_actions"])]
    return tape + [("normal", noise["actions"]), ("normal", noise["next_actions"])]  # actor_loss, critic_loss


def rollout_tape(noise: dict, num_dynamics: int, seed: int) -> list:
    """macfw's rollout draws (``MOPO.rollout_noise``) as the authors' ``rollout`` draws them: per step
    the actions' normals, all members' normals (macfw's at the chosen member, filler elsewhere) and
    the member indices."""
    rng = np.random.default_rng(seed)
    tape = []
    for t in range(noise["members"].shape[0]):
        eps, idx = np.asarray(noise["dynamics"][t]), np.asarray(noise["members"][t])
        full = rng.normal(size=(num_dynamics, *eps.shape)).astype(np.float32)
        full[idx, np.arange(eps.shape[0])] = eps
        tape += [("normal", np.asarray(noise["actions"][t])), ("normal", full), ("choice", idx)]
    return tape


def reference_update_fn(cls):
    """``(agent, real_batch, fake_batch, tape) -> (agent, info)``: the authors' ``update`` with the
    draws of ``tape``, jitted (their inner jits traced inline)."""
    import jax

    def step(agent, real, fake, arrays, names):
        with unjitted(cls, JITTED), replay(list(zip(names, arrays))) as left:
            out = cls.update(agent, real, fake)
            if left:
                raise RuntimeError(f"{len(left)} tape entries were not drawn by the reference")
        return out

    jitted = jax.jit(step, static_argnums=4)
    return lambda agent, real, fake, tape: jitted(agent, real, fake, [a for _, a in tape], tuple(n for n, _ in tape))


# ------------------------------------------------------------------------------ comparisons
def macfw_terms(metrics: dict) -> dict:
    """macfw's metrics under the authors' names (:data:`METRICS`)."""
    out = {}
    for theirs, mine in METRICS.items():
        names = mine if isinstance(mine, tuple) else (mine,)
        if all(n in metrics for n in names):
            out[theirs] = float(sum(float(metrics[n]) for n in names))
    return out


def compare(mine: dict, theirs: dict, prefix: str, skip: set) -> tuple[dict, dict]:
    """``(terms, skipped)`` for every metric the authors log: compared, or skipped when in ``skip``
    (named defects); a metric neither mapped nor skipped raises (nothing is dropped silently)."""
    terms, skipped = {}, {}
    for k, v in theirs.items():
        if k.startswith("grad/"):
            continue
        if k in skip:
            skipped[f"{prefix}/{k}"] = "gc_reward_head_trained_unused"
            continue
        if k not in mine:
            raise RuntimeError(f"the authors' metric {k!r} has no macfw counterpart in METRICS")
        terms[f"{prefix}/{k}"] = {"macfw": mine[k], "reference": float(v), "rel_err": rel_err(mine[k], v)}
    return terms, skipped


def compare_updates(ref, name: str, gc: bool, opts: Options) -> dict:
    """One mode (single-task or goal-conditioned): terms after 1 and ``opts.updates`` updates,
    parameters after ``opts.updates``, skipped terms and defects."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    prefix = "goal" if gc else "singletask"
    agent, spec, state, theirs = build(ref, name, SMALL["hidden"], SMALL["batch"], gc, opts.seed)
    cls = type(theirs)
    ref_step = reference_update_fn(cls)
    my_step = eqx.filter_jit(agent.update_on)
    B = SMALL["batch"]
    n_real = B - agent.rollouts.model_batch_size(B)
    is_model = jnp.concatenate([jnp.zeros(n_real), jnp.ones(B - n_real)])
    key = jax.random.PRNGKey(opts.seed + 1)
    skip = (
        {
            k
            for k in (
                "reward/reward_loss",
                "reward/reward_mean",
                "reward/reward_max",
                "reward/reward_min",
                "reward/data_reward_mean",
            )
        }
        if gc
        else set()
    )
    out: dict[str, Any] = {"terms_1": {}, "terms_n": {}, "skipped": {}, "defects": {}}
    for i in range(opts.updates):
        real, model, _ = make_batch(spec, B, opts.seed * 1000 + i)
        mixed = {k: np.concatenate([real[k], model[k]]) for k in real}
        noise = agent.draw_noise(state.nets, jax.random.fold_in(key, i), n_real, B - n_real)
        state, m = my_step(state, real, mixed, is_model, noise)
        theirs, info = ref_step(theirs, reference_batch(real, gc), reference_batch(model, gc), update_tape(noise, gc))
        if i in (0, opts.updates - 1):
            terms, skipped = compare(macfw_terms(m), jax.device_get(info), prefix, skip)
            out["terms_1" if i == 0 else "terms_n"].update(terms)
            out["skipped"].update(skipped)
            if gc and i == 0:
                out["defects"]["gc_reward_head_trained_unused"] = {
                    "macfw": None,
                    "reference": float(info["reward/reward_loss"]),
                    "reason": "goal-conditioned, the authors train a reward head (its loss added to the total) that "
                    "their rollout never reads (rewards c - 1 from the success head); macfw builds none. "
                    "Its parameters are separate, so no other term moves (Adam is per parameter).",
                }
    mine = to_flax(state.nets, state.target_critic, theirs.network.params)
    if gc:  # the authors' unused reward head has no macfw counterpart
        mine = {k: v for k, v in mine.items() if k != "modules_reward"}
    theirs_p = {k: v for k, v in theirs.network.params.items() if k in mine}
    out["params"] = tree_rel_err(mine, theirs_p)
    out["terms_n"][f"{prefix}/params"] = {"macfw": None, "reference": None, "rel_err": out["params"]}
    return out


def compare_rollout(ref, name: str, gc: bool, opts: Options) -> dict:
    """One rollout round from the same start states with the same draws: each field of the new
    transitions (macfw's ``MOPO.rollout`` against the authors' ``rollout``)."""
    import jax

    prefix = "goal" if gc else "singletask"
    N = SMALL["starts"]
    agent, spec, state, theirs = build(ref, name, SMALL["hidden"], SMALL["batch"], gc, opts.seed)
    starts, _, _ = make_batch(spec, 2 * N, opts.seed + 7)
    noise = agent.rollout_noise(state.nets, jax.random.PRNGKey(opts.seed + 2), N)
    mine = jax.jit(agent.rollout)(state.nets, starts, noise)
    tape = rollout_tape(noise, NUM_DYNAMICS, opts.seed)
    out = {"terms": {}, "skipped": {}, "defects": {}}

    def reference(cls, agent_):
        def f(a, batch, arrays, names):
            with unjitted(cls, JITTED), replay(list(zip(names, arrays)), unroll_scan=True) as left:
                r = cls.rollout(a, batch, jax.random.PRNGKey(0))
                if left:
                    raise RuntimeError(f"{len(left)} rollout tape entries were not drawn by the reference")
            return r

        return jax.device_get(
            jax.jit(f, static_argnums=3)(
                agent_, reference_batch(starts, gc), [a for _, a in tape], tuple(n for n, _ in tape)
            )
        )

    cls = type(theirs)
    try:
        theirs_out = reference(cls, theirs)
    except KeyError as e:  # the authors' goal-conditioned MOPO rollout (DESIGN §9)
        mob = ref.agent("mobile").MOBILEAgent
        stand_in = mob(theirs.rng, network=theirs.network, config=theirs.config)
        theirs_out = reference(mob, stand_in)
        out["defects"]["mopo_gc_rollout_unset_key"] = {
            "macfw": float(np.mean(np.asarray(mine["rewards"]))),
            "reference": f"KeyError: {e}",
            "reason": "the authors' goal-conditioned MOPO rollout reads rollout_data['rewards'], which it never "
            "sets (and leaves the goals unflattened); the rollout terms compare with their MOBILE copy "
            "of the same function (which sets rewards = success - 1), run with MOPO's parameters. "
            "Values: macfw's mean model reward; the authors' MOPO raises.",
        }
    for f in ROLLOUT_FIELDS:
        if f not in theirs_out:
            continue
        a, b = (
            np.asarray(mine[MACFW_FIELD.get(f, f)]),
            np.asarray(theirs_out[f]).reshape(mine[MACFW_FIELD.get(f, f)].shape),
        )
        out["terms"][f"{prefix}/rollout/{f}"] = {
            "macfw": float(np.mean(a)),
            "reference": float(np.mean(b)),
            "rel_err": tree_rel_err(a, b),
        }
    # main_mbpo.py's prefill: the same round passed through Dataset.create(scale=...), which rescales
    # every key containing 'observations' (normalize: (x - mid) / (half range + 1e-3)) once more
    lo, hi = np.min(starts["obs"], axis=0), np.max(starts["obs"], axis=0)
    twice = (np.asarray(theirs_out["observations"]) - (hi + lo) / 2) / ((hi - lo) / 2 + 1e-3)
    out["defects"]["mbpo_prefill_untrained_and_normalised_twice"] = {
        "macfw": {
            "first_round_step": agent.rollouts.first_rollout_step,
            "obs_abs_mean": float(np.mean(np.abs(np.asarray(mine["obs"])))),
        },
        "reference": {"first_round_step": 0, "obs_abs_mean": float(np.mean(np.abs(twice)))},
        "reason": "main_mbpo.py fills the buffer with mb_retain_epoch rounds before the first update (untrained "
        "models) and builds it with Dataset.create(scale=scale), which normalises 'observations' and "
        "'next_observations' again (values: the mean |s| of this round's states as each buffer holds them, "
        "the authors' with the start states' min/max as the scale); later rounds (add_batch) are not "
        "rescaled. macfw's first round is at step ModelRollouts.first_rollout_step, after training.",
    }
    return out


def data_pipeline_defect() -> dict:
    import dataclasses

    from macfw.agents.mopo import MOPOState

    return {
        "macfw": [f.name for f in dataclasses.fields(MOPOState)],
        "reference": ["agent (rng, network)"],
        "reason": "the authors' save_agent writes the agent alone: the fake buffer, the numpy RNG of their "
        "dataset sampling and main_mbpo's rollout key are lost on restore (a resumed run re-fills the "
        "buffer from scratch). macfw's buffer and key are state fields, checkpointed. Not a compared "
        "term (the update takes the batch).",
    }


# ------------------------------------------------------------------------------ speed
def measure_speed(ref, name: str, opts: Options) -> dict:
    """Each side's jitted update at ``opts.speed_sizes`` (cpu-small: 2 x 256, batch 256: 128 real + 128 model),
    single-task, alternated in one process. macfw's is the loop's ``update`` compiled as its
    training step compiles it (:func:`macfw_update`: the state donated; the buffer, full, on the
    device); the authors' is ``update(real_batch,
    fake_batch)`` with both halves on the device (their buffer is sampled on the host, outside)."""
    import equinox as eqx
    import jax

    B = opts.speed_batch
    agent, spec, state, theirs = build(
        ref, name, opts.speed_hidden, B, False, opts.seed, num_starts=50_000, capacity_rounds=5
    )
    real, model, loop = make_batch(spec, B, opts.seed)
    fill: dict[str, Any] = {  # numpy arrays: the buffer stores them as it stores jax arrays
        k: np.tile(v, (state.buffer.capacity // v.shape[0] + 1,) + (1,) * (v.ndim - 1))[: state.buffer.capacity]
        for k, v in model.items()
    }
    state = eqx.tree_at(lambda s: s.buffer, state, state.buffer.add(fill))
    b = jax.device_put(loop)
    rb, fb = jax.device_put(reference_batch(real, False)), jax.device_put(reference_batch(model, False))
    step, arrays = macfw_update(agent, state)  # as macfw's TrainStep compiles it (state donated)
    ref_step = type(theirs).update
    flops = {"macfw": xla_flops(step, arrays, b), "reference": xla_flops(ref_step, theirs, rb, fb)}
    box = {"r": theirs}

    def reference_update():
        box["r"], out = ref_step(box["r"], rb, fb)
        return out

    return time_updates(agent, state, b, reference_update, flops, opts)


# ------------------------------------------------------------------------------ the case
def run_agent(ref, opts: Options, name: str) -> dict:
    terms_1, terms_n, skipped, defects, params = {}, {}, {}, {}, []
    for gc in (False, True):
        u = compare_updates(ref, name, gc, opts)
        terms_1.update(u["terms_1"])
        terms_n.update(u["terms_n"])
        skipped.update(u["skipped"])
        defects.update(u["defects"])
        params.append(u["params"])
        r = compare_rollout(ref, name, gc, opts)
        terms_1.update(r["terms"])
        defects.update(r["defects"])
    defects["data_pipeline_not_checkpointed"] = data_pipeline_defect()
    speed = measure_speed(ref, name, opts) if opts.speed else None
    # the per-mode parameter terms are in terms_n; the combined figure is the worse of the two
    terms_n = {k[: -len("/params")] + "/params" if k.endswith("/params") else k: v for k, v in terms_n.items()}
    return agent_result(
        terms_1, terms_n, max(params), skipped=skipped, defects=defects, speed=speed, updates=opts.updates
    )


def run(ref, opts: Options) -> dict:
    return run_agent(ref, opts, "mopo")
