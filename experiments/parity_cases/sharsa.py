"""SHARSA against the authors' ``agents/sharsa.py`` (``SHARSAAgent``, ``value_loss='bce'``,
``q_agg='min'``): the same initial parameters, the same batches and flow-matching draws, every logged
metric after 1 and after ``opts.updates`` updates, the parameters after ``opts.updates``, and the speed
of both updates.

Parameters: macfw's networks mapped into the authors' ``ModuleDict`` tree: ``modules_high_value``
(``GCValue``, one member: ``value_net``), ``modules_high_critic`` / ``modules_target_high_critic``
(``GCValue``, 2 members stacked: :func:`ensemble_to_flax`), ``modules_high_actor_flow`` /
``modules_low_actor_flow`` (``ActorVectorField``: ``mlp`` = the velocity field's MLP on
``[s, g, x, u]``, the same input order as :class:`~macfw.nn.flow.FlowPolicy`).

Batches: macfw's sampler (``sample_batch``, ``chunk_len = n``) on synthetic goal-conditioned data;
the authors' batch is built by their own ``HGCDataset.sample`` on the same arrays (``terminals`` at
each trajectory's last index, ``oracle_reps`` the goals) at macfw's indices ``idx``, with their goal
sampler replaced by macfw's value- and actor-goal indices; so their subgoal steps, rewards, masks,
``high_value_actions``, ``high_actor_actions`` and ``low_actor_goals`` come from their code. The actor
goals are drawn uniformly over the rest of the trajectory (``GoalSampling(actor_geom_sample=False)``)
so that about a third of them fall inside the ``n`` steps, where the high-level flow's target is the
actor goal itself (a difference this case found).

Random draws (method (b) then (a)): macfw's update takes the flow-matching noise at batch level
(:meth:`SHARSA.noise`: ``z_high (B, goal_dim)``, ``u_high (B,)``, ``z_low (B, act_dim)``,
``u_low (B,)``); the same arrays are replayed into the authors' ``high_actor_loss`` and
``low_actor_loss`` (:func:`replay`: ``normal``, ``uniform``, ``normal``, ``uniform``, in their order)
inside one outer jit of their unjitted ``update`` (:func:`unjitted`).

Metrics (the authors' name -> macfw's): :data:`METRICS`. The authors' ``grad/*`` (from
``apply_loss_fn``, outside ``total_loss``) are not compared; the parameters after ``opts.updates``
Adam steps compare the gradients' effect.
"""

from __future__ import annotations

import functools

import numpy as np

from parity_cases.common import (Options, agent_result, alternate, compare_terms, ensemble_to_flax, macfw_update,
                                 matmul_peak, mlp_to_flax, replay, tree_rel_err, unjitted, xla_flops)

#: the authors' metric -> macfw's metric
METRICS = {
    "high_value/value_loss": "value/loss",
    "high_value/v_mean": "value/v_mean",
    "high_value/v_max": "value/v_max",
    "high_value/v_min": "value/v_min",
    "high_critic/critic_loss": "critic/loss",
    "high_critic/q_mean": "critic/target_mean",  # the authors' q is the TD target
    "high_critic/q_max": "critic/target_max",
    "high_critic/q_min": "critic/target_min",
    "high_actor/actor_loss": "high_actor/loss",
    "low_actor/actor_loss": "low_actor/loss",
}

OB_DIM, ACT_DIM, GOAL_DIM = 28, 5, 3  # cube-single's observation and action; a 3-d oracle goal
N = 25  # subgoal steps (the authors' default)


def _config(mod, hidden, batch_size):
    cfg = mod.get_config()
    cfg.actor_hidden_dims = tuple(hidden)
    cfg.value_hidden_dims = tuple(hidden)
    cfg.batch_size = batch_size
    cfg.subgoal_steps = N
    return cfg


def _macfw_agent(hidden):
    from macfw.agents.sharsa import SHARSA
    from macfw.data.goals import GoalSampling
    from macfw.nn.ensemble import Ensemble
    from macfw.nn.flow import FlowPolicy
    from macfw.nn.models import QCritic, StateValue

    flow = functools.partial(FlowPolicy, hidden_dims=hidden, distill=False, flow_steps=10, solver="euler")
    return SHARSA(high_actor=flow, low_actor=flow,
                  critic=functools.partial(Ensemble, num=2, member=functools.partial(QCritic, hidden_dims=hidden)),
                  value=functools.partial(StateValue, hidden_dims=hidden), n=N, gamma=0.999, tau=0.005,
                  learning_rate=3e-4, q_agg="min", value_loss="bce", num_samples=32,
                  goal_sampling=GoalSampling(actor_geom_sample=False))


def to_flax(nets, target_critic) -> dict:
    """macfw's SHARSA networks as the authors' ``network.params``."""
    return {
        "modules_high_value": {"value_net": mlp_to_flax(nets.value.net)},
        "modules_high_critic": {"value_net": ensemble_to_flax(nets.critic.members.net)},
        "modules_target_high_critic": {"value_net": ensemble_to_flax(target_critic.members.net)},
        "modules_high_actor_flow": {"mlp": mlp_to_flax(nets.high_actor.field)},
        "modules_low_actor_flow": {"mlp": mlp_to_flax(nets.low_actor.field)},
    }


def reference_batch(ref, dataset_class: str, data, batch: dict, config) -> dict:
    """The authors' batch (``utils.datasets.<dataset_class>.sample``) at macfw's indices: their dataset
    on ``data``'s arrays (a macfw ``ChunkData``; ``terminals`` at each trajectory's last index,
    ``oracle_reps`` = the goals), their goal sampler replaced by macfw's ``value_goal_idx`` (first
    call) and ``actor_goal_idx`` (second call)."""
    import importlib

    datasets = importlib.import_module("utils.datasets")
    n = data.observations.shape[0]
    fields = {"observations": np.asarray(data.observations), "actions": np.asarray(data.actions),
              "terminals": (np.asarray(data.traj_end) == np.arange(n)).astype(np.float32),
              "oracle_reps": np.asarray(data.goals)}
    ds = getattr(datasets, dataset_class)(datasets.Dataset.create(**fields), config)
    goal_idxs = [np.asarray(batch["value_goal_idx"]), np.asarray(batch["actor_goal_idx"])]
    ds.sample_goals = lambda idxs, *a, **k: goal_idxs.pop(0)
    idx = np.asarray(batch["idx"])
    out = ds.sample(len(idx), idxs=idx)
    if goal_idxs:
        raise AssertionError(f"{dataset_class}.sample drew {2 - len(goal_idxs)} goal sets, expected 2")
    return {k: np.asarray(v, np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v) for k, v in out.items()}


def batches(ref, agent, spec, num: int, batch_size: int, seed: int, config):
    """``num`` macfw batches (``chunk_len = n``, goal-conditioned) and the authors' ``HGCDataset`` batches."""
    import jax

    from macfw.bench import synthetic_data
    from macfw.data.batches import sample_for

    data = synthetic_data(spec, num_episodes=8, episode_length=101, seed=seed)
    sample = jax.jit(lambda k: sample_for(agent.batch_spec, data, k, batch_size, goal_conditioned=True))
    out = []
    for k in jax.random.split(jax.random.PRNGKey(seed + 1), num):
        b = sample(k)
        out.append((b, reference_batch(ref, "HGCDataset", data, b, config)))
    return out


def build(ref, hidden, batch_size, seed):
    """Both agents with macfw's initial parameters: ``(macfw agent, spec, macfw state, authors' agent, config)``."""
    import equinox as eqx
    import jax

    from macfw.spec import Spec

    mod = ref.agent("sharsa")
    agent = _macfw_agent(hidden)
    spec = Spec(ob_dim=OB_DIM, act_dim=ACT_DIM, goal_dim=GOAL_DIM, chunk_len=N)
    state = eqx.filter_jit(agent.init)(spec, jax.random.PRNGKey(seed))
    config = _config(mod, hidden, batch_size)
    _, ex = batches(ref, agent, spec, 1, batch_size, seed, config)[0]
    theirs = mod.SHARSAAgent.create(seed, ex, config)
    params = to_flax(state.nets, state.target_critic)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, theirs.network.params)
    if jax.tree_util.tree_map(lambda x: x.shape, params) != shapes:
        raise AssertionError(f"parameter trees differ:\n{jax.tree_util.tree_map(lambda x: x.shape, params)}\n{shapes}")
    network = theirs.network.replace(params=params, opt_state=theirs.network.tx.init(params))
    return agent, spec, state, theirs.replace(network=network), config


def reference_update_with(mod):
    """The authors' ``update`` in one jit whose flow-matching draws are an argument (replayed)."""
    import jax

    cls = mod.SHARSAAgent

    def upd(agent, batch, noise):
        B = noise["u_high"].shape[0]
        tape = [("normal", noise["z_high"]), ("uniform", noise["u_high"].reshape(B, 1)),
                ("normal", noise["z_low"]), ("uniform", noise["u_low"].reshape(B, 1))]
        with unjitted(cls), replay(tape) as left:
            out = cls.update(agent, batch)
        if left:
            raise AssertionError(f"the authors' update drew less than the tape: {[(f, np.shape(a)) for f, a in left]}")
        return out

    return jax.jit(upd)


def run(ref, opts: Options) -> dict:
    import equinox as eqx
    import jax

    hidden, B = (64, 64), 32
    agent, spec, state, theirs, config = build(ref, hidden, B, opts.seed)
    step = eqx.filter_jit(agent.update)
    ref_step = reference_update_with(ref.agent("sharsa"))
    data = batches(ref, agent, spec, opts.updates, B, opts.seed, config)
    terms = {}
    for i, (b, rb) in enumerate(data):
        noise = agent.noise(jax.random.PRNGKey(1000 + i), B)
        state, m = step(state, b, noise)
        theirs, info = ref_step(theirs, rb, noise)
        if i == 0 or i == opts.updates - 1:
            mine = {k: m[v] for k, v in METRICS.items() if v in m}
            terms[i] = compare_terms(mine, {k: info[k] for k in METRICS})
            missing = sorted(set(METRICS) - set(terms[i]))
            if missing:
                raise AssertionError(f"macfw does not report {missing} (mapped to {[METRICS[k] for k in missing]})")
    params_err = tree_rel_err(to_flax(state.nets, state.target_critic), theirs.network.params)
    speed = measure_speed(ref, opts) if opts.speed else None
    return agent_result(terms[0], terms[opts.updates - 1], params_err, speed=speed, updates=opts.updates)


def measure_speed(ref, opts: Options) -> dict:
    """Each side's jitted update at cpu-small sizes (2 x 256, batch 256), alternated in one process:
    macfw's compiled as its training step compiles it (:func:`macfw_update`, drawing its own noise),
    the authors' ``update`` (drawing theirs)."""
    import jax

    agent, spec, state, theirs, config = build(ref, (256, 256), 256, opts.seed)
    b, rb = batches(ref, agent, spec, 1, 256, opts.seed, config)[0]
    b, rb = jax.device_put(b), jax.device_put(rb)
    step, arrays = macfw_update(agent, state)
    ref_step = type(theirs).update
    flops = {"macfw": xla_flops(step, arrays, b), "reference": xla_flops(ref_step, theirs, rb)}
    box = {"m": arrays, "r": theirs}

    def mine():
        for _ in range(opts.calls):
            box["m"], out = step(box["m"], b)
        return out

    def reference():
        for _ in range(opts.calls):
            box["r"], out = ref_step(box["r"], rb)
        return out

    t = alternate({"macfw": mine, "reference": reference}, pairs=opts.pairs)
    peak = matmul_peak()
    ups = {k: opts.calls / v for k, v in t.items()}
    return {"updates_per_s": ups, "flops_per_update": flops,
            "utilisation": {k: flops[k] * ups[k] / peak for k in ups}, "matmul_peak_flops": peak}
