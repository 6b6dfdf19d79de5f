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

Acting: ``act`` (32 subgoal candidates, argmax of min-Q, the low-level flow) against their
``sample_actions`` with the same key (the same noise: both split it into a high and a low key and
draw ``(32, goal_dim)`` and ``(act_dim,)`` normals from them), ``act@N``.

Metrics (the authors' name -> macfw's): :data:`METRICS`. The authors' ``grad/*`` (from
``apply_loss_fn``, outside ``total_loss``) are not compared; the parameters after ``opts.updates``
Adam steps compare the gradients' effect.
"""

from __future__ import annotations

import functools

import numpy as np

from parity_cases.common import (
    Options,
    agent_result,
    compare_terms,
    ensemble_to_flax,
    jax_threefry,
    macfw_update,
    mlp_to_flax,
    replay,
    time_updates,
    tree_rel_err,
    unjitted,
    xla_flops,
)

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

#: the authors' defects this case shows (listed in ``defects`` with both values)
REASONS = {
    "window_cut_by_trajectory_end_counts_as_success": (
        "HGCDataset clips the n-step window at the trajectory's final index (with OGBench's compact layout, the "
        "authors' loader, the second-to-last state) and scores any shorter window as reaching the goal (steps < n: "
        "reward gamma^steps, mask 0); a window ending at the last state (t + n = traj_end, a valid start for macfw) "
        "is cut by one step and scored a success whatever the goal. These rows were given to the authors' update "
        "uncut (their HGCDataset with terminals at the last index only), as macfw scores them."
    ),
    "window_cut_by_trajectory_end_subgoal": (
        "The same cut window makes the high-level flow's target and the low-level flow's goal s_{t+n-1}'s goal "
        "representation instead of s_{t+n}'s (the last state is never a subgoal). These rows were given to the "
        "authors' update uncut, as macfw builds them."
    ),
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
    return SHARSA(
        high_actor=flow,
        low_actor=flow,
        critic=functools.partial(Ensemble, num=2, member=functools.partial(QCritic, hidden_dims=hidden)),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        value=functools.partial(StateValue, hidden_dims=hidden),
        n=N,
        gamma=0.999,
        tau=0.005,
        learning_rate=3e-4,
        q_agg="min",
        value_loss="bce",
        num_samples=32,
        goal_sampling=GoalSampling(actor_geom_sample=False),
    )


def to_flax(nets, target_critic) -> dict:
    """macfw's SHARSA networks as the authors' ``network.params``."""
    return {
        "modules_high_value": {"value_net": mlp_to_flax(nets.value.net)},
        "modules_high_critic": {"value_net": ensemble_to_flax(nets.critic.members.net)},
        "modules_target_high_critic": {"value_net": ensemble_to_flax(target_critic.members.net)},
        "modules_high_actor_flow": {"mlp": mlp_to_flax(nets.high_actor.field)},
        "modules_low_actor_flow": {"mlp": mlp_to_flax(nets.low_actor.field)},
    }


def dataset_arrays(data, compact: bool = True) -> dict:
    """A macfw ``ChunkData`` as the arrays the authors' datasets read: ``oracle_reps`` = the goals and,
    with ``compact``, ``terminals`` and ``valids`` as OGBench's compact loader sets them (the
    authors' setting: ``terminals`` 1 at each trajectory's last two indices, ``valids`` 0 at the
    last); without, ``terminals`` 1 at the last index only (a trajectory's final index is then its
    last state, as macfw's ``traj_end``)."""
    end = np.asarray(data.traj_end)
    i = np.arange(len(end))
    out = {
        "observations": np.asarray(data.observations),
        "actions": np.asarray(data.actions),
        "oracle_reps": np.asarray(data.goals),
    }
    if compact:
        out.update(terminals=(i >= end - 1).astype(np.float32), valids=(i < end).astype(np.float32))
    else:
        out.update(terminals=(i == end).astype(np.float32))
    return out


def reference_batch(ref, dataset_class: str, arrays: dict, batch: dict, config) -> dict:
    """The authors' batch (``utils.datasets.<dataset_class>.sample`` on ``arrays``, see
    :func:`dataset_arrays`) at macfw's indices ``batch['idx']``, their goal sampler replaced by macfw's
    ``value_goal_idx`` (first call) and ``actor_goal_idx`` (second call)."""
    import importlib

    datasets = importlib.import_module("utils.datasets")
    ds = getattr(datasets, dataset_class)(datasets.Dataset.create(**arrays), config)
    goal_idxs = [np.asarray(batch["value_goal_idx"]), np.asarray(batch["actor_goal_idx"])]
    ds.sample_goals = lambda idxs, *a, **k: goal_idxs.pop(0)
    idx = np.asarray(batch["idx"])
    out = ds.sample(len(idx), idxs=idx)
    if goal_idxs:
        raise AssertionError(f"{dataset_class}.sample drew {2 - len(goal_idxs)} goal sets, expected 2")
    return {k: np.array(v, np.float32) if np.asarray(v).dtype.kind == "f" else np.array(v) for k, v in out.items()}


#: the authors' batch fields the cut window changes, per defect (see :func:`batches`)
CUT_VALUE = (
    "high_value_subgoal_steps",
    "high_value_rewards",
    "high_value_masks",
    "high_value_actions",
    "high_value_next_observations",
)
CUT_SUBGOAL = ("high_actor_actions", "low_actor_goals")


def batches(ref, agent, spec, num: int, batch_size: int, seed: int, config):
    """``num`` pairs (macfw batch, the authors' ``HGCDataset`` batch at the same indices and goals) and
    the rows the authors' compact-layout window cut changes: ``{defect name: [rows]}``.

    Their batch is sampled twice, on the compact arrays (their setting) and with ``terminals`` at the
    last index only; the two differ only in samples whose window ends at the trajectory's last state
    (``t + n = traj_end``): their final index is the second-to-last state, so the window is cut to
    ``n - 1`` steps, scored a success whatever the goal (``steps < n``), and the subgoals are
    ``s_{t+n-1}``'s goal. The comparison gives their update the uncut batch (macfw's scoring); the
    rows' values on both sides are returned."""
    import jax

    from macfw.bench import synthetic_data
    from macfw.data.batches import sample_for

    data = synthetic_data(spec, num_episodes=8, episode_length=101, seed=seed)
    compact, uncut = dataset_arrays(data, compact=True), dataset_arrays(data, compact=False)
    sample = jax.jit(lambda k: sample_for(agent.batch_spec, data, k, batch_size, goal_conditioned=True))
    out, cut = [], {"window_cut_by_trajectory_end_counts_as_success": [], "window_cut_by_trajectory_end_subgoal": []}
    for k in jax.random.split(jax.random.PRNGKey(seed + 1), num):
        b = jax.device_get(sample(k))
        theirs, fixed = (reference_batch(ref, "HGCDataset", a, b, config) for a in (compact, uncut))
        for name, fields in zip(cut, (CUT_VALUE, CUT_SUBGOAL)):
            rows = sorted(
                {
                    int(r)
                    for f in fields
                    for r in np.nonzero(np.any((theirs[f] != fixed[f]).reshape(batch_size, -1), axis=1))[0]
                }
            )
            for r in rows:
                if b["idx"][r] + agent.n != b["traj_end"][r]:
                    raise AssertionError(f"row {r}: the compact layout changed a window inside the trajectory")
                keep = [f for f in fields if f not in ("high_value_actions", "high_value_next_observations")]
                row = lambda d: {f: np.asarray(d[f][r]).tolist() for f in keep}  # noqa: E731,B023,B023
                cut[name].append(
                    {
                        "idx": int(b["idx"][r]),
                        "traj_end": int(b["traj_end"][r]),
                        "macfw": row(fixed),
                        "reference": row(theirs),
                    }
                )
        out.append((b, fixed))
    return out, cut


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
    _, ex = batches(ref, agent, spec, 1, batch_size, seed, config)[0][0]
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
        tape = [
            ("normal", noise["z_high"]),
            ("uniform", noise["u_high"].reshape(B, 1)),
            ("normal", noise["z_low"]),
            ("uniform", noise["u_low"].reshape(B, 1)),
        ]
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
    data, cut = batches(ref, agent, spec, opts.updates, B, opts.seed, config)
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
    terms[opts.updates - 1]["act"] = compare_acting(agent, state, theirs, data[-1][0], opts.seed)
    defects = {
        name: {
            "macfw": [dict(c["macfw"], idx=c["idx"], traj_end=c["traj_end"]) for c in rows],
            "reference": [dict(c["reference"], idx=c["idx"], traj_end=c["traj_end"]) for c in rows],
            "reason": REASONS[name],
        }
        for name, rows in cut.items()
        if rows
    }
    speed = measure_speed(ref, opts) if opts.speed else None
    return agent_result(
        terms[0], terms[opts.updates - 1], params_err, defects=defects, speed=speed, updates=opts.updates
    )


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
    macfw's compiled as its training step compiles it (:func:`macfw_update`, drawing its own noise),
    the authors' ``update`` (drawing theirs, compiled with JAX's own threefry: :func:`jax_threefry`)."""
    import jax

    agent, spec, state, theirs, config = build(ref, opts.speed_hidden, opts.speed_batch, opts.seed)
    b, rb = batches(ref, agent, spec, 1, opts.speed_batch, opts.seed, config)[0][0]
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
