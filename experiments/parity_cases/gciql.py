"""GCIQL against the authors' ``agents/gciql.py`` (``GCIQLAgent``, ``actor_loss='ddpgbc'``,
``const_std=True``): the same initial parameters, the same batches, every logged metric after 1 and
after ``opts.updates`` updates, the parameters after ``opts.updates``, and the speed of both updates.

Parameters: macfw's networks mapped into the authors' ``ModuleDict`` tree: ``modules_value``
(``GCValue``, one member: ``value_net`` = the MLP), ``modules_critic`` / ``modules_target_critic``
(``GCValue`` with 2 members: ``value_net`` stacked on a leading axis, :func:`ensemble_to_flax`),
``modules_actor`` (``GCActor``: ``actor_net`` = the hidden layers with their LayerNorms,
``mean_net`` = the final Dense, :func:`mlp_to_flax_split`).

Batches: macfw's own sampler (``macfw.data.batches.sample_batch``, ``chunk_len = 1``) on synthetic
goal-conditioned data; the authors' batch is built by their own ``GCDataset.sample`` on the same
arrays in OGBench's compact layout (their loader's; ``oracle_reps`` the goals) at macfw's indices,
their goal sampler replaced by macfw's value- and actor-goal indices
(:func:`parity_cases.sharsa.reference_batch`): their ``next_observations``, rewards
(``success - 1``, ``gc_negative``) and masks come from their code.

Random draws: none. With ``const_std`` the authors' DDPG+BC acts with ``clip(dist.mode())`` and
draws nothing; macfw's update is deterministic.

Acting: ``act`` against their ``sample_actions`` at temperature 0 (their evaluation's), ``act@N``.

Metrics (the authors' name -> macfw's): see :data:`METRICS`. The authors' ``grad/*`` (from
``TrainState.apply_loss_fn``, outside ``total_loss``) are not compared; the parameters after
``opts.updates`` Adam steps compare the gradients' effect in full.
"""

from __future__ import annotations

import functools

from parity_cases.common import (
    Options,
    agent_result,
    compare_terms,
    ensemble_to_flax,
    jax_threefry,
    macfw_update,
    mlp_to_flax,
    mlp_to_flax_split,
    time_updates,
    tree_rel_err,
    xla_flops,
)
from parity_cases.sharsa import dataset_arrays, reference_batch

#: the authors' metric -> macfw's metric
METRICS = {
    "value/value_loss": "value/loss",
    "value/v_mean": "value/v_mean",
    "value/v_max": "value/v_max",
    "value/v_min": "value/v_min",
    "critic/critic_loss": "critic/loss",
    "critic/q_mean": "critic/target_mean",  # the authors' q is the TD target r + gamma m V(s')
    "critic/q_max": "critic/target_max",
    "critic/q_min": "critic/target_min",
    "actor/actor_loss": "actor/loss",
    "actor/q_loss": "actor/q_loss",
    "actor/bc_loss": "actor/bc_loss",
    "actor/q_mean": "actor/q_mean",
    "actor/q_abs_mean": "actor/q_abs_mean",
    "actor/bc_log_prob": "actor/bc_log_prob",
    "actor/mse": "actor/mse",
    "actor/std": "actor/std",
}

OB_DIM, ACT_DIM, GOAL_DIM = 28, 5, 3  # cube-single's observation and action; a 3-d oracle goal


def _config(ref_mod, hidden, batch_size):
    cfg = ref_mod.get_config()
    cfg.actor_hidden_dims = tuple(hidden)
    cfg.value_hidden_dims = tuple(hidden)
    cfg.batch_size = batch_size
    return cfg


def _macfw_agent(hidden):
    from macfw.agents.gciql import GCIQL, ClippedMeanActor
    from macfw.nn.ensemble import Ensemble
    from macfw.nn.models import QCritic, StateValue

    return GCIQL(
        value=functools.partial(StateValue, hidden_dims=hidden),
        critic=functools.partial(Ensemble, num=2, member=functools.partial(QCritic, hidden_dims=hidden)),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        actor=functools.partial(ClippedMeanActor, hidden_dims=hidden, final_init_scale=0.01),
        gamma=0.999,
        expectile=0.9,
        alpha=1.0,
        tau=0.005,
        learning_rate=3e-4,
    )


def to_flax(nets, target_critic) -> dict:
    """macfw's GCIQL networks as the authors' ``network.params``."""
    body, head = mlp_to_flax_split(nets.actor.net)
    return {
        "modules_value": {"value_net": mlp_to_flax(nets.value.net)},
        "modules_critic": {"value_net": ensemble_to_flax(nets.critic.members.net)},
        "modules_target_critic": {"value_net": ensemble_to_flax(target_critic.members.net)},
        "modules_actor": {"actor_net": body, "mean_net": head},
    }


def batches(ref, spec, num: int, batch_size: int, seed: int, config):
    """``num`` pairs (macfw batch, one-step and goal-conditioned; the authors' ``GCDataset`` batch on the
    same arrays in OGBench's compact layout at the same indices and goals)."""
    import jax

    from macfw.bench import synthetic_data
    from macfw.data.batches import sample_batch

    data = synthetic_data(spec, num_episodes=8, episode_length=101, seed=seed)
    arrays = dataset_arrays(data, compact=True)
    sample = jax.jit(lambda k: sample_batch(data, k, batch_size, chunk_len=1, gamma=0.999, goal_conditioned=True))
    out = []
    for k in jax.random.split(jax.random.PRNGKey(seed + 1), num):
        b = jax.device_get(sample(k))
        out.append((b, reference_batch(ref, "GCDataset", arrays, b, config)))
    return out


def build(ref, hidden, batch_size, seed):
    """Both agents with macfw's initial parameters: ``(macfw agent, spec, macfw state, authors' agent, config)``."""
    import equinox as eqx
    import jax

    from macfw.spec import Spec

    mod = ref.agent("gciql")
    agent = _macfw_agent(hidden)
    spec = Spec(ob_dim=OB_DIM, act_dim=ACT_DIM, goal_dim=GOAL_DIM, chunk_len=1)
    state = eqx.filter_jit(agent.init)(spec, jax.random.PRNGKey(seed))
    config = _config(mod, hidden, batch_size)
    _, ex = batches(ref, spec, 1, batch_size, seed, config)[0]
    theirs = mod.GCIQLAgent.create(seed, ex, config)
    params = to_flax(state.nets, state.target_critic)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, theirs.network.params)
    if jax.tree_util.tree_map(lambda x: x.shape, params) != shapes:
        raise AssertionError(f"parameter trees differ:\n{jax.tree_util.tree_map(lambda x: x.shape, params)}\n{shapes}")
    network = theirs.network.replace(params=params, opt_state=theirs.network.tx.init(params))
    return agent, spec, state, theirs.replace(network=network), config


def run(ref, opts: Options) -> dict:
    import equinox as eqx

    hidden, B = (64, 64), 32
    agent, spec, state, theirs, config = build(ref, hidden, B, opts.seed)
    step = eqx.filter_jit(agent.update)
    data = batches(ref, spec, opts.updates, B, opts.seed, config)
    terms = {}
    for i, (b, rb) in enumerate(data):
        state, m = step(state, b)
        theirs, info = theirs.update(rb)
        if i == 0 or i == opts.updates - 1:
            mine = {k: m[v] for k, v in METRICS.items() if v in m}
            terms[i] = compare_terms(mine, {k: info[k] for k in METRICS})
            missing = sorted(set(METRICS) - set(terms[i]))
            if missing:
                raise AssertionError(f"macfw does not report {missing} (mapped to {[METRICS[k] for k in missing]})")
    params_err = tree_rel_err(to_flax(state.nets, state.target_critic), theirs.network.params)
    terms[opts.updates - 1]["act"] = compare_acting(agent, state, theirs, data[-1][0], opts.seed)
    speed = measure_speed(ref, opts) if opts.speed else None
    return agent_result(terms[0], terms[opts.updates - 1], params_err, speed=speed, updates=opts.updates)


def compare_acting(agent, state, theirs, batch: dict, seed: int, num: int = 8) -> dict:
    """macfw's ``act`` and the authors' ``sample_actions`` (their evaluation's temperature 0) on the
    first ``num`` states and actor goals of ``batch``, each with the same key: a term whose ``rel_err``
    is the largest action difference over the largest action magnitude."""
    import jax

    keys = jax.random.split(jax.random.PRNGKey(seed + 7), num)
    s, g = batch["obs"][:num], batch["actor_goals"][:num]
    mine = jax.jit(jax.vmap(lambda s, g, k: agent.act(state.nets, s, g, key=k)[0]))(s, g, keys)
    ref = jax.vmap(lambda s, g, k: type(theirs).sample_actions(theirs, s, g, seed=k, temperature=0.0)[0])(s, g, keys)
    return {"macfw": None, "reference": None, "rel_err": tree_rel_err(mine, ref)}


def measure_speed(ref, opts: Options) -> dict:
    """Each side's jitted update at ``opts.speed_sizes`` (cpu-small: 2 x 256, batch 256), alternated in one process:
    macfw's compiled as its training step compiles it (:func:`macfw_update`), the authors' ``update``
    compiled with JAX's own threefry (:func:`jax_threefry`)."""
    import jax

    agent, spec, state, theirs, config = build(ref, opts.speed_hidden, opts.speed_batch, opts.seed)
    b, rb = batches(ref, spec, 1, opts.speed_batch, opts.seed, config)[0]
    b, rb = jax.device_put(b), jax.device_put(rb)
    step, arrays = macfw_update(agent, state)
    ref_step = type(theirs).update
    flops = {"macfw": xla_flops(step, arrays, b)}
    with jax_threefry():  # the authors' update compiled as their code compiles it
        flops["reference"] = xla_flops(ref_step, theirs, rb)
    box = {"r": theirs}

    def reference_update():
        box["r"], out = ref_step(box["r"], rb)
        return out

    return time_updates(agent, state, b, reference_update, flops, opts)
