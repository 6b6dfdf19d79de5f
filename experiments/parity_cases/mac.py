"""MAC against the authors' ``agents/mac.py`` (``MACAgent``): the parity case of ``experiments/parity.py``.

Two sub-cases, each with its own networks, batches and draws (terms prefixed ``gc/`` and ``st/``):

* ``gc/``: goal-conditioned (``goal_dim`` 3, the cube-single oracle representation): value goals,
  the success head, rollout rewards ``c - 1`` and masks ``1 - c`` from the thresholded success head;
  the authors' batch as their ``ACGCDataset`` builds it (``masks = 1 - success``,
  ``rewards = success - 1``);
* ``st/``: single-task (no goals): the reward head, rollout masks from the success head; the batch
  as the authors' ``ACDataset`` builds it (chunk reward ``mean_i gamma^i r_{t+i}``, masks all 1,
  DESIGN §2.6), made by macfw's own sampler from synthetic data with OGBench masks all 1
  (``OGBenchDataset.singletask_masks = 'ones'``) and checked against the authors' formula
  (``st/loader/rewards``; ``gc/loader/masks``: their success rule on macfw's value-goal indices).

Sizes: cube-single shapes (``ob_dim`` 28, ``act_dim`` 5, chunk ``n`` 10: chunks of 50), networks
2 x 64, batch 32, rollout batch 16, ``H`` 10, ``N`` 8, 10 Euler flow steps, ``gamma`` 0.999,
``lambda`` 1, ``tau`` 0.005, Adam 3e-4. A third sub-case, ``gc_lam0.9/``, repeats the goal-conditioned
one at ``lambda`` 0.9: macfw's default ``lambda = 1`` needs ``V'`` on the last imagined state only
(:func:`macfw.agents.mac.monte_carlo_returns`), so this one compares the general lambda-returns
(``V'`` on every imagined state, :func:`macfw.agents.mac.lambda_returns`) with the authors'
``compute_gae``.

Parameters: macfw's networks are built (``MAC.init``) and mapped into the authors' Flax tree
(``modules_dynamics``, ``modules_actor_flow``, ``modules_actor_onestep_flow``, ``modules_critic``,
``modules_value``, ``modules_target_value``, ``modules_success``, ``modules_reward``); the authors'
Adam state is built fresh on them. Goal-conditioned, the authors also train a reward head that
nothing reads (their ``ACGCDataset`` batches carry ``rewards`` and ``total_loss`` trains the head
whenever a batch has them); macfw builds none: its terms are listed as the defect
``gc_unused_reward_head`` and its parameters are left out of the compared trees.

Random draws (the issue's method (a), a tape): the authors draw their noise at batch level
(``x_0``, ``t`` and the distillation noise in ``bc_actor_loss``; the ``(N, B_r, chunk)`` candidate
noise of every rollout step inside their ``lax.scan``); macfw draws per example under ``vmap`` from
keys split off ``state.key``. :func:`macfw_draws` computes macfw's draws from the state's key exactly
as ``MAC.update`` derives them, and :func:`~parity_cases.common.replay` hands them to the authors'
``jax.random.normal`` / ``uniform`` calls in order (checked by function and size) as inputs of one
jitted update, traced with their scans as Python loops so that every step's draw is its own call
(:func:`reference_fns`).
:func:`check_mirrored_draws` proves the copy right: every action of macfw's own rollout must be the
argmax-Q candidate of the mirrored noise (so a change of macfw's key derivation fails loudly here,
never silently). With the same noise the argmax agrees exactly (no flips were seen; a flip would
show in ``*/critic/*`` and ``*/params@10``).

Terms: every entry of the authors' ``update`` info (``total_loss``'s and ``grad/max``, ``grad/min``,
``grad/norm``) under their names, mapped to macfw's metrics (:data:`METRICS`), after 1 update and
after ``opts.updates`` (``name@10``); ``grads@1`` (the gradient trees of the first update),
``params@1`` and ``params@10`` (the updated parameters, the EMA target value included), each over the
networks both sides have; ``act/first_action`` (:func:`act_terms`: the chunk each side picks when
acting, N = 32, for 8 states with the same keys); ``rollout_argmax_flips`` (rollout rows whose
argmax differs, from :func:`check_mirrored_draws`: 0 is the reference value). The ``grad/*`` terms
are computed over those networks on both sides with the authors' formulas (max, min, and the L1
norm of the per-leaf L2 norms). The authors' defects (DESIGN §9 and new ones shown here) go to
``skipped`` and ``defects`` with both values: ``gc_unused_reward_head`` (above) and ``st/success/pos_acc`` (their 0/0
= NaN on batches without a positive label: every single-task batch; macfw reports 0).

Speed (``opts.speed``): each side's jitted update at ``opts.speed_sizes``: ``cpu-small`` (2 x 256, batch
256, rollout batch 256, n 10, H 10, N 8, 10 flow steps; single-task, as ``macfw.bench``'s ``cpu-small``)
or ``paper`` (4 x 1024, batch and rollout batch 1024, the rest the same), the
batch on the device, alternated (:func:`~parity_cases.common.time_updates`). macfw's update runs as
its training loop runs it, ``opts.steps_per_dispatch`` updates per compiled call (``jax.jit`` of a
``lax.scan`` over ``MAC.update``, the state donated, :func:`macfw.compiler.compiler_options`), and
also one per call; the authors' ``MACAgent.update``, one per call as their loop calls it, is compiled
with JAX's own threefry lowering (``import macfw`` registers a written-out one for the CPU, which
would also speed up the authors' program). FLOPs per update by XLA's count with every loop unrolled
(macfw: the reference computation of ``macfw.bench``, the authors' scans unrolled), utilisation
against the FLOP/s of a 2048 x 2048 matrix product timed in the same alternation (so that the
machine's drift hits all of them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import numpy as np

from parity_cases.common import (
    agent_result,
    mlp_to_flax,
    rel_err,
    replay,
    time_updates,
    tree_rel_err,
    unjitted,
    xla_flops,
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    hidden: tuple = (64, 64)
    batch: int = 32
    rollout_batch: int = 16
    ob_dim: int = 28
    act_dim: int = 5
    goal_dim: int = 3
    chunk_len: int = 10
    horizon: int = 10
    candidates: int = 8
    flow_steps: int = 10
    gamma: float = 0.999
    lam: float = 1.0
    tau: float = 0.005
    lr: float = 3e-4


SMALL = Sizes()

#: the authors' info key -> macfw's metric name
METRICS = {
    "dynamics/dynamics_loss": "dynamics/loss",
    "bc_actor/flow_loss": "flow/loss",
    "bc_actor/vel": "flow/vel",
    "bc_actor/distill_loss": "flow/distill_loss",
    "bc_actor/actor_loss": "policy/loss",
    "gae/return_mean": "value/return_mean",
    "gae/return_min": "value/return_min",
    "gae/return_max": "value/return_max",
    "gae/return_std": "value/return_std",
    "value/value_loss": "value/loss",
    "value/v_mean": "value/mean",
    "value/v_max": "value/max",
    "value/v_min": "value/min",
    "critic/critic_loss": "critic/loss",
    "critic/q_mean": "critic/q_mean",
    "critic/q_max": "critic/q_max",
    "critic/q_min": "critic/q_min",
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
}
GRAD_TERMS = ("grad/max", "grad/min", "grad/norm")


# ------------------------------------------------------------------------------ building both sides
def build_macfw(sz: Sizes, seed: int):
    """macfw's MAC at sizes ``sz`` and its initial state: ``(agent, spec, state)``."""
    import gin
    import jax

    from macfw.agents.mac import MAC
    from macfw.nn.flow import FlowPolicy
    from macfw.nn.models import ChunkDynamics, QCritic, RewardModel, StateValue, SuccessModel
    from macfw.samplers import RejectionSampler
    from macfw.spec import Spec

    gin.clear_config()
    h = dict(hidden_dims=sz.hidden)
    agent = MAC(
        dynamics=functools.partial(ChunkDynamics, **h),
        policy=functools.partial(FlowPolicy, flow_steps=sz.flow_steps, **h),
        critic=functools.partial(QCritic, **h),
        value=functools.partial(StateValue, **h),
        success=functools.partial(SuccessModel, **h),
        reward=functools.partial(RewardModel, **h),
        sampler=RejectionSampler(num_train_candidates=sz.candidates, num_act_candidates=32),
        chunk_len=sz.chunk_len,
        normalize_reward=True,
        gamma=sz.gamma,
        lam=sz.lam,
        horizon=sz.horizon,
        tau=sz.tau,
        learning_rate=sz.lr,
        rollout_batch_size=sz.rollout_batch,
    )
    spec = Spec(ob_dim=sz.ob_dim, act_dim=sz.act_dim, goal_dim=sz.goal_dim, chunk_len=sz.chunk_len)
    state = agent.init(spec, jax.random.PRNGKey(seed))
    return agent, spec, state


def reference_config(mod, sz: Sizes):
    cfg = mod.get_config()
    cfg.actor_hidden_dims = cfg.value_hidden_dims = cfg.dynamics_hidden_dims = tuple(sz.hidden)
    cfg.batch_size, cfg.rollout_batch_size, cfg.rollout_steps = sz.batch, sz.rollout_batch, sz.horizon
    cfg.lr, cfg.discount, cfg.tau, cfg.lam = sz.lr, sz.gamma, sz.tau, sz.lam
    cfg.flow_steps, cfg.num_samples_train, cfg.action_chunking = sz.flow_steps, sz.candidates, sz.chunk_len
    cfg.layer_norm, cfg.target_network, cfg.value_loss, cfg.gc_negative = True, True, "squared", True
    return cfg


def to_flax(nets, target_value=None) -> dict:
    """macfw's MAC networks (or a gradient tree of the same structure) as the authors' parameter tree,
    the modules both sides have (``modules_reward`` only where macfw has a reward head)."""
    out = {
        "modules_dynamics": {"dynamics_net": mlp_to_flax(nets.dynamics.net)},
        "modules_actor_flow": {"mlp": mlp_to_flax(nets.policy.field)},
        "modules_actor_onestep_flow": {"mlp": mlp_to_flax(nets.policy.one_step)},
        "modules_critic": {"value_net": mlp_to_flax(nets.critic.net)},
        "modules_value": {"value_net": mlp_to_flax(nets.value.net)},
        "modules_success": {"value_net": mlp_to_flax(nets.success.net)},
    }
    if nets.reward is not None:
        out["modules_reward"] = {"value_net": mlp_to_flax(nets.reward.net)}
    if target_value is not None:
        out["modules_target_value"] = {"value_net": mlp_to_flax(target_value.net)}
    return out


def build_reference(ref, sz: Sizes, seed: int, state=None):
    """The authors' ``MACAgent`` at sizes ``sz``; with ``state`` (macfw's) its parameters are macfw's
    (mapped) and its Adam state is built fresh on them."""
    import jax.numpy as jnp

    mod = ref.agent("mac")
    from utils.flax_utils import TrainState  # pyright: ignore[reportMissingImports]  (the authors' code: on sys.path at run time, load_reference)

    cfg = reference_config(mod, sz)
    gc = sz.goal_dim > 0
    ex = {
        "observations": np.zeros((sz.batch, sz.ob_dim), np.float32),
        "actions": np.zeros((sz.batch, sz.act_dim * sz.chunk_len), np.float32),
        "actor_goals": np.zeros((sz.batch, sz.goal_dim), np.float32) if gc else None,
    }
    agent = mod.MACAgent.create(seed, ex, cfg)
    if state is None:
        return agent
    params = dict(agent.network.params)
    mapped = to_flax(state.nets, state.target_value)
    for k, v in mapped.items():
        ref_shapes = {kk: np.shape(x) for kk, x in _flat(params[k]).items()}
        our_shapes = {kk: np.shape(x) for kk, x in _flat(v).items()}
        if ref_shapes != our_shapes:
            raise RuntimeError(f"parameter layout of {k} differs: reference {ref_shapes}, macfw {our_shapes}")
        params[k] = v
    params = {k: _tree_map(jnp.asarray, v) for k, v in params.items()}
    net = TrainState.create(agent.network.model_def, params, tx=agent.network.tx)
    return agent.replace(network=net)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _tree_map(f, tree):
    import jax

    return jax.tree_util.tree_map(f, tree)


# ------------------------------------------------------------------------------ batches
def make_data(spec, sz: Sizes, seed: int):
    """Synthetic data in macfw's layout: episodes of 201 steps, observations and goals in [-1, 1], step
    rewards in {-1, 0}; single-task OGBench masks all 1 (the authors' loader: ``masks`` all 1)."""
    import equinox as eqx
    import jax.numpy as jnp

    from macfw.bench import synthetic_data

    data = synthetic_data(spec, num_episodes=20, episode_length=201, seed=seed)
    return eqx.tree_at(lambda d: d.masks, data, jnp.ones_like(data.masks))


def macfw_batch(agent, data, key, sz: Sizes) -> dict:
    import jax

    from macfw.data.batches import sample_for

    b = sample_for(agent.batch_spec, data, key, sz.batch, goal_conditioned=sz.goal_dim > 0)
    return jax.device_get(b)


def reference_batch(b: dict, gc: bool) -> dict:
    """The authors' batch (``ACGCDataset`` / ``ACDataset`` keys) holding macfw's batch ``b``."""
    out = {
        "observations": b["obs"],
        "actions": b["actions"],
        "next_observations": b["next_obs"],
        "rewards": b["rewards"],
        "masks": b["masks"],
    }
    if gc:
        out.update(value_goals=b["value_goals"], actor_goals=b["actor_goals"])
    else:
        out.update(value_goals=None, actor_goals=None)
    return out


def loader_terms(data, b: dict, sz: Sizes, gc: bool) -> dict:
    """macfw's batch labels against the authors' loader formulas on the same indices: single-task
    ``rewards = mean_i gamma^i r_{t+i}`` and ``masks = 1`` (``ACDataset.sample``); goal-conditioned
    ``success = [t <= vg < t + n]``, ``masks = 1 - success``, ``rewards = success - 1``
    (``ACGCDataset.sample``)."""
    t = np.asarray(b["idx"])
    n = sz.chunk_len
    if gc:
        vg = np.asarray(b["value_goal_idx"])
        succ = np.logical_and(t <= vg, vg < t + n).astype(np.float32)
        ref = {"loader/masks": 1.0 - succ, "loader/rewards": succ - 1.0}
        ours = {"loader/masks": b["masks"], "loader/rewards": b["rewards"]}
    else:
        r = np.asarray(data.rewards)[t[None, :] + np.arange(n)[:, None]]  # (n, B)
        ref = {
            "loader/rewards": np.mean(r * np.power(sz.gamma, np.arange(n))[:, None], axis=0),
            "loader/masks": np.ones_like(t, np.float32),
        }
        ours = {"loader/rewards": b["rewards"], "loader/masks": b["masks"]}
    return {
        k: {"macfw": float(np.mean(ours[k])), "reference": float(np.mean(ref[k])), "rel_err": rel_err(ours[k], ref[k])}
        for k in ref
    }


# ------------------------------------------------------------------------------ the same draws
def macfw_draws(agent, state, batch: dict) -> list[tuple[str, tuple, np.ndarray]]:
    """Every random draw of ``agent.update(state, batch)``, derived from ``state.key`` as the update
    derives it, in the order and shapes the authors' ``total_loss`` draws its own:
    ``[("normal", (B, chunk), x_0), ("uniform", (B, 1), t), ("normal", (B, chunk), z_distill)]`` (the
    flow-matching noise and time and the distillation noise of ``FlowPolicy.loss``) then, per rollout
    step, ``("normal", (N, B_r, chunk), z)`` (the rejection sampler's candidate noise)."""
    import jax

    B = batch["obs"].shape[0]
    Br = agent.rollout_batch_size or B
    N, cd, H = agent.sampler.num_train_candidates, agent.spec.chunk_dim, agent.horizon
    _, k_roll, k_loss = jax.random.split(state.key, 3)  # MAC.update
    k_flow, _ = jax.random.split(k_loss)  # MAC.loss
    per = jax.vmap(lambda k: jax.random.split(k, 3))(jax.random.split(k_flow, B))  # FlowPolicy.loss: kz, ku, kd
    x0 = jax.vmap(lambda k: jax.random.normal(k, (cd,)))(per[:, 0])
    t = jax.vmap(lambda k: jax.random.uniform(k))(per[:, 1])[:, None]
    z2 = jax.vmap(lambda k: jax.random.normal(k, (cd,)))(per[:, 2])
    out = [("normal", (B, cd), x0), ("uniform", (B, 1), t), ("normal", (B, cd), z2)]
    for kh in jax.random.split(k_roll, H):  # macfw.rollout.imagine: one key per step
        z = jax.vmap(lambda k: jax.random.normal(k, (N, cd)))(jax.random.split(kh, Br))  # per state (sample_many)
        out.append(("normal", (N, Br, cd), np.asarray(z).transpose(1, 0, 2)))
    return [(f, s, np.asarray(a)) for f, s, a in out]


def check_mirrored_draws(agent, state, batch: dict, draws) -> int:
    """Proof that :func:`macfw_draws` is macfw's noise: every action of macfw's own rollout (its jitted
    ``MAC.rollout`` with the update's key) must be the argmax-Q candidate ``clip(mu(s, g, z_i))`` of the
    mirrored noise. Returns the number of (step, state) rows whose choice differs (near-ties); raises
    when most rows differ (the derivation in :func:`macfw_draws` is out of date)."""
    import jax
    import jax.numpy as jnp

    B = batch["obs"].shape[0]
    Br = agent.rollout_batch_size or B
    _, k_roll, _ = jax.random.split(state.key, 3)
    s0, g0 = jnp.asarray(batch["obs"][:Br]), jnp.asarray(batch["value_goals"][:Br])
    roll = jax.jit(agent.rollout)(state.nets, s0, g0, k_roll)
    nets = state.nets

    def choose(s, g, z):  # z: (N, chunk)
        c = jnp.clip(jax.vmap(lambda zi: nets.policy.distilled(s, g, zi))(z), -1.0, 1.0)
        q = jax.vmap(lambda a: nets.critic(s, g, a))(c)
        return c[jnp.argmax(q)]

    bad = 0
    for h, (_, _, z) in enumerate(draws[3:]):
        picked = jax.vmap(choose)(roll["states"][h], g0, jnp.asarray(z).transpose(1, 0, 2))
        bad += int(np.sum(np.max(np.abs(np.asarray(picked) - np.asarray(roll["actions"][h])), axis=1) > 1e-4))
    if bad > 0.5 * agent.horizon * Br:
        raise RuntimeError(
            f"{bad} of {agent.horizon * Br} rollout actions are not the argmax of the mirrored draws: "
            "macfw_draws no longer derives MAC.update's keys as the update does"
        )
    return bad


def reference_fns(mod, signature):
    """The authors' update and the gradient of their ``total_loss``, jitted with the draws as inputs:
    ``update(agent, batch, arrays)``, ``grads(agent, batch, arrays)``; ``signature`` is the draws'
    ``[(name, shape)]`` (the same at every update). Traced with their nested ``jax.jit`` methods
    inline and their scans as Python loops (:func:`~parity_cases.common.unjitted`,
    :func:`~parity_cases.common.replay`), so every rollout step's draw is its own replayed input."""
    import jax

    cls = mod.MACAgent
    names = ("update", "total_loss", "sample_actions", "sample_flow_actions")

    @contextlib.contextmanager
    def taped(arrays):
        with unjitted(cls, names), replay([(f, a) for (f, _), a in zip(signature, arrays)], unroll_scan=True) as left:
            yield
        if left:
            raise RuntimeError(
                f"the authors' update drew {len(signature) - len(left)} of the {len(signature)} recorded draws"
            )

    def update(agent, batch, arrays):
        with taped(arrays):
            return cls.update(agent, dict(batch))

    def grads(agent, batch, arrays):
        with taped(arrays):
            return jax.grad(lambda p: cls.total_loss(agent, dict(batch), p, rng=agent.rng)[0])(agent.network.params)

    return jax.jit(update), jax.jit(grads)


def macfw_grads(agent, state, batch: dict):
    """The gradient of ``MAC.loss`` as ``MAC.update`` takes it (its rollout, its keys)."""
    import equinox as eqx
    import jax

    def grads(state, batch):
        _, k_roll, k_loss = jax.random.split(state.key, 3)
        Br = agent.rollout_batch_size or batch["obs"].shape[0]
        s0, g0 = batch["obs"][:Br], batch["value_goals"][:Br]
        roll = agent.rollout(state.nets, s0, g0, k_roll)
        roll["goals"] = g0
        params, static = eqx.partition(state.nets, eqx.is_inexact_array)
        return jax.grad(lambda p: agent.loss(eqx.combine(p, static), state.target_value, batch, roll, k_loss)[0])(
            params
        )

    return jax.jit(grads)(state, batch)


def grad_stats(tree) -> dict:
    """The authors' ``grad/max``, ``grad/min`` and ``grad/norm`` (the L1 norm of the per-leaf L2 norms)."""
    import jax

    leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]
    return {
        "grad/max": max(float(x.max()) for x in leaves),
        "grad/min": min(float(x.min()) for x in leaves),
        "grad/norm": float(sum(np.linalg.norm(x.ravel()) for x in leaves)),
    }


def _subset(params: dict, like: dict) -> dict:
    return {k: params[k] for k in like}


def act_terms(agent, state, ragent, b: dict, gc: bool, num: int = 8) -> dict:
    """Acting: both sides pick a chunk for ``num`` states of the batch with the same keys. The authors'
    ``sample_actions(mode='test')`` and macfw's :meth:`~macfw.agents.mac.MAC.act` both draw the
    ``(32, chunk)`` candidate noise with one ``jax.random.normal`` call on the key they are given, so
    the same key is the same noise; the authors return the first ``action_chunking_test = 1`` action
    of the argmax-Q chunk, macfw the chunk (its first action compared)."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(11), num)
    act = jax.jit(lambda nets, s, g, k: agent.act(nets, s, g, key=k))
    ours, theirs = [], []
    for j in range(num):
        s, g = jnp.asarray(b["obs"][j]), jnp.asarray(b["value_goals"][j])
        ours.append(np.asarray(act(state.nets, s, g, keys[j])[0]))
        theirs.append(np.asarray(ragent.sample_actions(s, g if gc else None, seed=keys[j], mode="test")[0]))
    ours, theirs = np.stack(ours), np.stack(theirs)
    return {
        "act/first_action": {
            "macfw": float(np.mean(ours)),
            "reference": float(np.mean(theirs)),
            "rel_err": rel_err(ours, theirs, floor=1e-3),
        }
    }


# ------------------------------------------------------------------------------ one sub-case
def compare_case(ref, sz: Sizes, opts, prefix: str) -> tuple[dict, dict, dict, dict]:
    """One sub-case (``sz.goal_dim > 0``: goal-conditioned). Returns ``(terms_1, terms_n, skipped,
    defects)``, every name prefixed with ``prefix``."""
    import jax
    import jax.numpy as jnp

    gc = sz.goal_dim > 0
    agent, spec, state = build_macfw(sz, opts.seed)
    ragent = build_reference(ref, sz, opts.seed, state)
    data = make_data(spec, sz, opts.seed)
    update = jax.jit(agent.update)
    keys = jax.random.split(jax.random.PRNGKey(opts.seed + 1), opts.updates)
    terms_1, terms_n, skipped, defects = {}, {}, {}, {}
    flips = 0
    ref_update = ref_grads = None

    def metric_terms(m: dict, info: dict) -> dict:
        out = {}
        for rk, rv in info.items():
            if rk in GRAD_TERMS:
                continue
            if rk not in METRICS:
                raise KeyError(f"the authors log {rk!r}, which METRICS does not map to a macfw metric")
            if rk.startswith("reward/") and gc:  # the authors' unused goal-conditioned reward head
                name = f"{prefix}{rk}"
                skipped[name] = (
                    "gc_unused_reward_head: the authors train a reward head on goal-conditioned "
                    "batches (r = success - 1) that no loss or rollout reads; macfw builds none"
                )
                defects[name] = {"macfw": None, "reference": float(rv), "reason": skipped[name]}
                continue
            if METRICS[rk] not in m:  # macfw no longer logs it: a failing term, not an exception
                out[rk] = {"macfw": None, "reference": float(rv), "rel_err": float("inf")}
                continue
            mv, rv = float(m[METRICS[rk]]), float(rv)
            out[rk] = {"macfw": mv, "reference": rv, "rel_err": rel_err(mv, rv) if np.isfinite(rv) else 0.0}
            if not np.isfinite(rv):
                name = f"{prefix}{rk}"
                skipped[name] = (
                    "the authors' metric is 0/0 = NaN on a batch without a positive success label "
                    "(every single-task batch: masks all 1); macfw reports 0"
                )
                defects[name] = {"macfw": mv, "reference": rv, "reason": skipped[name]}
                out.pop(rk)
        return out

    for i in range(opts.updates):
        b = macfw_batch(agent, data, keys[i], sz)
        rb = reference_batch(b, gc)
        draws = macfw_draws(agent, state, b)
        if i == 0:
            flips += check_mirrored_draws(agent, state, b, draws)
            terms_1.update(act_terms(agent, state, ragent, b, gc))
            terms_1.update(loader_terms(data, b, sz, gc))
            g_ours = to_flax(macfw_grads(agent, state, jax.tree_util.tree_map(jnp.asarray, b)))
        if ref_update is None:
            ref_update, ref_grads = reference_fns(ref.agent("mac"), [(f, sh) for f, sh, _ in draws])
        arrays = [a for _, _, a in draws]
        if i == 0:
            assert ref_grads is not None  # set with ref_update at the first update
            g_ref = _subset(ref_grads(ragent, rb, arrays), g_ours)
            terms_1["grads"] = {"macfw": None, "reference": None, "rel_err": tree_rel_err(g_ours, g_ref)}
            go, gr = grad_stats(g_ours), grad_stats(g_ref)
            terms_1.update(
                {k: {"macfw": go[k], "reference": gr[k], "rel_err": rel_err(go[k], gr[k])} for k in GRAD_TERMS}
            )
        ragent, info = ref_update(ragent, rb, arrays)
        state, m = update(state, jax.tree_util.tree_map(jnp.asarray, b))
        info, m = jax.device_get(info), jax.device_get(m)
        if i == 0:
            terms_1.update(metric_terms(m, info))
            ours = to_flax(state.nets, state.target_value)
            terms_1["params"] = {
                "macfw": None,
                "reference": None,
                "rel_err": tree_rel_err(ours, _subset(ragent.network.params, ours)),
            }
        if i == opts.updates - 1:
            terms_n.update(metric_terms(m, info))
            ours = to_flax(state.nets, state.target_value)
            terms_n["params"] = {
                "macfw": None,
                "reference": None,
                "rel_err": tree_rel_err(ours, _subset(ragent.network.params, ours)),
            }
            terms_n["target_value"] = {
                "macfw": None,
                "reference": None,
                "rel_err": tree_rel_err(ours["modules_target_value"], ragent.network.params["modules_target_value"]),
            }
    terms_1["rollout_argmax_flips"] = {"macfw": float(flips), "reference": 0.0, "rel_err": 0.0}
    p = lambda d: {f"{prefix}{k}": v for k, v in d.items()}  # noqa: E731
    return p(terms_1), p(terms_n), skipped, defects


# ------------------------------------------------------------------------------ speed
@contextlib.contextmanager
def _unrolled_scans():
    """Every ``jax.lax.scan`` traced inside is unrolled (XLA's cost analysis counts a loop body once)."""
    import jax

    orig = jax.lax.scan
    jax.lax.scan = lambda *a, **k: orig(*a, **{**k, "unroll": True})
    try:
        yield
    finally:
        jax.lax.scan = orig


def speed(ref, opts) -> dict:
    """Both jitted updates at ``opts.speed_sizes`` (single-task, the rollout batch the batch), alternated;
    FLOPs and utilisation (module docstring)."""
    sz = Sizes(hidden=opts.speed_hidden, batch=opts.speed_batch, rollout_batch=opts.speed_batch, goal_dim=0)
    import jax
    import jax.numpy as jnp

    from macfw.reference import reference_computation

    gc = sz.goal_dim > 0
    agent, spec, state = build_macfw(sz, opts.seed)
    ragent = build_reference(ref, sz, opts.seed, state)
    data = make_data(spec, sz, opts.seed)
    b = macfw_batch(agent, data, jax.random.PRNGKey(opts.seed + 7), sz)
    batch = jax.device_put(jax.tree_util.tree_map(jnp.asarray, b))
    rbatch = jax.device_put(reference_batch(b, gc))
    mod = ref.agent("mac")

    # FLOPs (first: the unrolled traces must not be the ones the timed functions reuse)
    agent_c = agent.for_flop_count()
    agent_c.spec = spec
    with reference_computation(rolled_threefry=False):
        f = jax.jit(agent_c.update)
        flops_ours = xla_flops(f, state, batch) + agent_c.uncounted_flops(state, sz.batch)
    with _unrolled_scans():  # (macfw's written-out threefry for both: the random bits counted alike)
        flops_ref = xla_flops(jax.jit(mod.MACAgent.update.__wrapped__), ragent, rbatch)
    jax.clear_caches()

    box = {"ref": ragent}

    def reference_update():
        box["ref"], info = box["ref"].update(rbatch)
        return info

    out = time_updates(agent, state, batch, reference_update, {"macfw": flops_ours, "reference": flops_ref}, opts)
    out["speed_sizes"] = dataclasses.asdict(sz)
    return out


# ------------------------------------------------------------------------------ the case
def run(ref, opts) -> dict:
    terms_1, terms_n, skipped, defects = {}, {}, {}, {}
    cases = (
        ("gc/", SMALL),
        ("st/", dataclasses.replace(SMALL, goal_dim=0)),
        ("gc_lam0.9/", dataclasses.replace(SMALL, lam=0.9)),
    )  # lambda-returns on every V'(s_k)
    for prefix, sz in cases:
        t1, tn, sk, de = compare_case(ref, sz, opts, prefix)
        terms_1.update(t1)
        terms_n.update(tn)
        skipped.update(sk)
        defects.update(de)
    params = max(v["rel_err"] for k, v in terms_n.items() if k.endswith("/params"))
    return agent_result(
        terms_1,
        terms_n,
        params,
        skipped=skipped,
        defects=defects,
        speed=speed(ref, opts) if opts.speed else None,
        updates=opts.updates,
    )
