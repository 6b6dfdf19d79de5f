"""n-step SAC+BC against the authors' ``agents/ngcsacbc.py`` (``NGCSACBCAgent``, goal-conditioned, BCE
critics, the paper's only setting for it): the same initial parameters, the same batches, the same
random draws, every metric their ``total_loss`` logs after 1 and after ``opts.updates`` updates, the
parameters after ``opts.updates``, and the speed of both updates.

Parameters: macfw's networks mapped into the authors' ``ModuleDict`` tree: ``modules_critic`` /
``modules_target_critic`` (``GCValue`` with 2 members, :func:`ensemble_to_flax`), ``modules_actor``
(``GCActor``: ``actor_net`` = the hidden layers with their LayerNorms; macfw's final layer, which
outputs ``[mean, raw log-std]``, split into ``mean_net`` and ``log_std_net``), ``modules_lam``
(``LogParam``: ``log_value`` = macfw's ``log_alpha``). The authors' Adam state is built fresh on them.

Batches: macfw's own sampler (``sample_batch`` with ``chunk_len = n``) on synthetic goal-conditioned
data in OGBench's compact layout; the authors' batch is built by *their* ``HGCDataset.sample`` on the
same arrays (``terminals`` as OGBench's compact loader sets them, 1 at each trajectory's last two
indices) at macfw's indices ``t``, with their ``sample_goals`` returning macfw's value- and
actor-goal indices. So their n-step reward, mask, ``discount ** subgoal_steps`` and ``s_{t+n}``
come from their code, not from a copy of it.

Random draws (the issue's method (b) + (a)): ``NStepSACBC.update(state, batch, noise)`` takes the
batch-level standard normals of its two reparameterised actor samples (``NStepSACBC.draw_noise``:
``next_actions`` for ``a' ~ pi(s_{t+n})``, ``actions`` for ``a ~ pi(s_t)``); :func:`replay` hands the
same arrays to the authors' ``jax.random.normal`` calls (distrax's ``MultivariateNormalDiag``
sample: critic loss first, then actor loss), inside one outer ``jax.jit`` with their inner jits
traced inline (:func:`unjitted`).

Metrics (the authors' name -> macfw's): :data:`METRICS`. Their ``grad/*`` (from
``TrainState.apply_loss_fn``, outside ``total_loss``) are not compared; the parameters after
``opts.updates`` Adam steps compare the gradients' effect in full.

The authors' defect shown here (listed in ``defects`` with both values; the comparison feeds them
the uncut window instead): ``window_cut_by_trajectory_end_counts_as_success``. ``HGCDataset``
clips the n-step window at the trajectory's final index (``min(n, final - t)``) and counts any
window shorter than n as reaching the goal (reward ``gamma^steps``, mask 0), whatever the goal. With
OGBench's compact layout their final index is the second-to-last state, so a window that ends at the
trajectory's last state (``t = end - n``, a valid start for macfw) is cut by one step and scored as a
success; their own sampler draws ``t`` up to ``end - 1``, so ``n`` starts per trajectory (2.5% of
samples at n = 25 with 1001-step episodes) are scored so. macfw samples only windows inside the
trajectory (``t + n <= end``) and scores the goal alone.
"""

from __future__ import annotations

import functools
import importlib

import numpy as np

from parity_cases.common import (
    Options,
    agent_result,
    compare_terms,
    ensemble_to_flax,
    mlp_to_flax_split,
    rel_err,
    replay,
    time_updates,
    tree_rel_err,
    unjitted,
    xla_flops,
)

#: the authors' metric -> macfw's metric (a name, or a function of macfw's metrics)
METRICS = {
    "critic/critic_loss": "critic/loss",
    "critic/q_mean": "critic/q_mean",
    "critic/q_max": "critic/q_max",
    "critic/q_min": "critic/q_min",
    "critic/q_logit_mean": "critic/q_logit_mean",
    "critic/q_logit_max": "critic/q_logit_max",
    "critic/q_logit_min": "critic/q_logit_min",
    "actor/total_loss": lambda m: m["actor/loss"] + m["temperature/loss"],  # theirs sums actor and lam losses
    "actor/actor_loss": "actor/sac_loss",
    "actor/lam_loss": "temperature/loss",
    "actor/bc_loss": "actor/bc_loss",
    "actor/scaled_bc_loss": "actor/scaled_bc_loss",
    "actor/lam": "temperature/alpha",
    "actor/entropy": "temperature/entropy",
    "actor/std": "actor/std",
    "actor/mse": "actor/mse",
    "actor/q": "actor/q_mean",
}

OB_DIM, ACT_DIM, GOAL_DIM = 28, 5, 3  # cube-single's observation and action; a 3-d oracle goal
N_STEPS, GAMMA = 25, 0.999  # the authors' subgoal_steps and discount
EPISODES, EPISODE_LENGTH = 8, 101


# ------------------------------------------------------------------------------ the two agents
def _config(mod, hidden, batch_size):
    cfg = mod.get_config()
    cfg.actor_hidden_dims = tuple(hidden)
    cfg.value_hidden_dims = tuple(hidden)
    cfg.batch_size = batch_size
    cfg.subgoal_steps = N_STEPS
    cfg.discount = GAMMA
    return cfg


def macfw_agent(hidden):
    from macfw.agents.nstep_sacbc import NStepSACBC
    from macfw.nn.actors import TanhGaussianActor, Temperature
    from macfw.nn.ensemble import Ensemble
    from macfw.nn.models import QCritic

    return NStepSACBC(
        actor=functools.partial(
            TanhGaussianActor,
            hidden_dims=hidden,
            final_init_scale=0.01,
            log_std_min=-5.0,
            log_std_max=2.0,
            state_dependent_std=True,
        ),
        critic=functools.partial(Ensemble, num=2, member=functools.partial(QCritic, hidden_dims=hidden)),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        temperature=Temperature,
        n=N_STEPS,
        gamma=GAMMA,
        alpha=0.1,
        tau=0.005,
        learning_rate=3e-4,
        target_entropy_scale=0.5,
        q_agg="min",
        value_loss="bce",
    )


def to_flax(nets, target_critic) -> dict:
    """macfw's n-step SAC+BC networks as the authors' ``network.params``."""
    body, head = mlp_to_flax_split(nets.actor.net)
    d = nets.actor.chunk_dim
    return {
        "modules_critic": {"value_net": ensemble_to_flax(nets.critic.members.net)},
        "modules_target_critic": {"value_net": ensemble_to_flax(target_critic.members.net)},
        "modules_actor": {
            "actor_net": body,
            "mean_net": {"kernel": head["kernel"][:, :d], "bias": head["bias"][:d]},
            "log_std_net": {"kernel": head["kernel"][:, d:], "bias": head["bias"][d:]},
        },
        "modules_lam": {"log_value": nets.temperature.log_alpha},
    }


def map_params(theirs, params):
    """The authors' agent with ``params`` (same tree shapes) and a fresh Adam state."""
    import jax

    want = jax.tree_util.tree_map(lambda x: x.shape, theirs.network.params)
    got = jax.tree_util.tree_map(lambda x: x.shape, params)
    if want != got:
        raise AssertionError(f"parameter trees differ:\n{got}\n{want}")
    network = theirs.network.replace(params=params, opt_state=theirs.network.tx.init(params))
    return theirs.replace(network=network)


# ------------------------------------------------------------------------------ data
def compact_arrays(data) -> dict:
    """A macfw :class:`ChunkData` as the dict OGBench's compact loader returns (``terminals`` 1 at each
    trajectory's last two indices, ``valids`` 0 at the last), with ``oracle_reps`` = the goals."""
    end = np.asarray(data.traj_end)
    idx = np.arange(len(end))
    return {
        "observations": np.asarray(data.observations),
        "actions": np.asarray(data.actions),
        "oracle_reps": np.asarray(data.goals),
        "rewards": np.asarray(data.rewards),
        "terminals": (idx >= end - 1).astype(np.float32),
        "valids": (idx < end).astype(np.float32),
    }


def reference_sample(dataset, batch_size: int, idx, goal_idxs: list):
    """``dataset.sample(batch_size, idxs=idx)`` (the authors' dataset class) with their ``sample_goals``
    returning ``goal_idxs`` in order (macfw's value goals, then actor goals)."""
    queue = [np.asarray(g) for g in goal_idxs]
    dataset.sample_goals = lambda *a, **k: queue.pop(0)
    try:
        out = dataset.sample(batch_size, idxs=np.asarray(idx))
    finally:
        del dataset.sample_goals
    if queue:
        raise AssertionError(f"the authors' sampler drew {len(goal_idxs) - len(queue)} goal sets, not {len(goal_idxs)}")
    return out


def batches(agent, data, hgc, num: int, batch_size: int, seed: int):
    """``num`` pairs (macfw batch, the authors' HGCDataset batch at the same indices and goals), and
    the rows where their cut window scored a success that macfw's does not (corrected in their batch)."""
    import jax

    from macfw.data.batches import goal_indices, sample_batch

    bs = agent.batch_spec
    sample = jax.jit(
        lambda k: sample_batch(
            data,
            k,
            batch_size,
            chunk_len=bs.chunk_len,
            gamma=bs.gamma,
            goal_conditioned=True,
            normalize_reward=bs.normalize_reward,
            goals=bs.goals,
        )
    )
    goals = jax.jit(lambda k, t, end: goal_indices(jax.random.split(k, 8), t, end, data.size, bs.gamma, goals=bs.goals))
    obs = np.asarray(data.observations)
    out, cut = [], []
    for k in jax.random.split(jax.random.PRNGKey(seed + 1), num):
        b = jax.device_get(sample(k))
        vg, ag = goals(k, b["idx"], b["traj_end"])
        if not (np.array_equal(vg, b["value_goal_idx"])):
            raise AssertionError("goal_indices does not reproduce sample_batch's value goals")
        rb = reference_sample(hgc, batch_size, b["idx"], [vg, ag])
        rb = {k2: np.array(v) for k2, v in rb.items()}
        # the defect: a window that reaches their final index (the second-to-last state) counts as a success
        _, mask = agent.rewards_and_masks(b)
        rows = np.nonzero((rb["high_value_masks"] == 0.0) & (np.asarray(mask) == 1.0))[0]
        for r in rows:
            cut.append(
                {
                    "idx": int(b["idx"][r]),
                    "traj_end": int(b["traj_end"][r]),
                    "reference": {
                        "reward": float(rb["high_value_rewards"][r]),
                        "mask": float(rb["high_value_masks"][r]),
                        "steps": int(rb["high_value_subgoal_steps"][r]),
                    },
                }
            )
            t = int(b["idx"][r])
            rb["high_value_subgoal_steps"][r] = N_STEPS
            rb["high_value_rewards"][r] = 0.0
            rb["high_value_masks"][r] = 1.0
            rb["high_value_next_observations"][r] = obs[t + N_STEPS]
        keep = (
            "observations",
            "actions",
            "high_value_goals",
            "high_value_next_observations",
            "high_value_rewards",
            "high_value_masks",
            "high_value_subgoal_steps",
            "high_actor_goals",
        )
        out.append((b, {k2: rb[k2] for k2 in keep}))
    return out, cut


def build(ref, hidden, batch_size: int, seed: int):
    """Both agents with macfw's initial parameters, the data and the authors' dataset:
    ``(agent, state, theirs, data, hgc)``."""
    import equinox as eqx
    import jax

    from macfw.bench import synthetic_data
    from macfw.spec import Spec

    mod = ref.agent("ngcsacbc")
    datasets = importlib.import_module("utils.datasets")
    agent = macfw_agent(hidden)
    spec = Spec(ob_dim=OB_DIM, act_dim=ACT_DIM, goal_dim=GOAL_DIM, chunk_len=N_STEPS)
    state = eqx.filter_jit(agent.init)(spec, jax.random.PRNGKey(seed))
    data = synthetic_data(spec, num_episodes=EPISODES, episode_length=EPISODE_LENGTH, seed=seed)
    cfg = _config(mod, hidden, batch_size)
    hgc = datasets.HGCDataset(datasets.Dataset.create(**compact_arrays(data)), cfg)
    pairs, _ = batches(agent, data, hgc, 1, batch_size, seed)
    ex = pairs[0][1]
    theirs = mod.NGCSACBCAgent.create(seed, ex, cfg)
    theirs = map_params(theirs, to_flax(state.nets, state.target_critic))
    return agent, state, theirs, data, hgc


def reference_step(cls):
    """``(agent, batch, noise) -> (agent, info)``: the authors' ``update`` with macfw's draws, jitted."""
    import jax

    def step(agent, batch, noise):
        tape = [("normal", noise["next_actions"]), ("normal", noise["actions"])]  # critic_loss, then actor_loss
        with unjitted(cls), replay(tape) as left:
            out = cls.update(agent, batch)
        if left:
            raise RuntimeError(f"{len(left)} draws of the tape were not used by the authors' update")
        return out

    return jax.jit(step)


def array_term(mine, theirs) -> dict:
    """A term over arrays: both sides' means and the elementwise :func:`rel_err`."""
    return {"macfw": float(np.mean(mine)), "reference": float(np.mean(theirs)), "rel_err": rel_err(mine, theirs)}


def macfw_terms(m: dict) -> dict:
    out = {}
    for k, v in METRICS.items():
        out[k] = v(m) if callable(v) else m[v]
    return out


def run(ref, opts: Options) -> dict:
    import equinox as eqx
    import jax

    hidden, B = (64, 64), 32
    agent, state, theirs, data, hgc = build(ref, hidden, B, opts.seed)
    step = eqx.filter_jit(agent.update)
    ref_step = reference_step(type(theirs))
    pairs, cut = batches(agent, data, hgc, opts.updates, B, opts.seed)
    keys = jax.random.split(jax.random.PRNGKey(opts.seed + 2), opts.updates)
    terms = {}
    for i, ((b, rb), k) in enumerate(zip(pairs, keys)):
        noise = agent.draw_noise(k, B)
        state, m = step(state, b, noise)
        theirs, info = ref_step(theirs, rb, noise)
        if i == 0 or i == opts.updates - 1:
            terms[i] = compare_terms(macfw_terms(jax.device_get(m)), {k2: info[k2] for k2 in METRICS})
            # the batch both sides trained on: n-step reward and mask (theirs after the cut-window correction)
            r, msk = agent.rewards_and_masks(b)
            terms[i]["batch/rewards"] = array_term(r, rb["high_value_rewards"])
            terms[i]["batch/masks"] = array_term(msk, rb["high_value_masks"])
    params_err = tree_rel_err(to_flax(state.nets, state.target_critic), theirs.network.params)
    defects = {}
    if cut:
        defects["window_cut_by_trajectory_end_counts_as_success"] = {
            "macfw": [
                {"idx": c["idx"], "traj_end": c["traj_end"], "reward": 0.0, "mask": 1.0, "steps": N_STEPS} for c in cut
            ],
            "reference": [dict(c["reference"], idx=c["idx"], traj_end=c["traj_end"]) for c in cut],
            "reason": (
                "HGCDataset clips the n-step window at the trajectory's final index (with OGBench's compact "
                "layout the second-to-last state) and scores any shorter window as reaching the goal; these "
                "rows were given to the authors' update uncut (reward 0, mask 1, s_{t+n}), as macfw scores them"
            ),
        }
    speed = measure_speed(ref, opts) if opts.speed else None
    return agent_result(
        terms[0], terms[opts.updates - 1], params_err, defects=defects, speed=speed, updates=opts.updates
    )


def measure_speed(ref, opts: Options) -> dict:
    """Each side's jitted update at ``opts.speed_sizes`` (cpu-small: 2 x 256, batch 256; n 25), alternated in
    one process."""
    hidden, batch_size = opts.speed_hidden, opts.speed_batch
    agent, state, theirs, data, hgc = build(ref, hidden, batch_size, opts.seed)
    b, rb = batches(agent, data, hgc, 1, batch_size, opts.seed)[0][0]
    return measure_updates(agent, state, b, theirs, rb, opts)


def measure_updates(agent, state, b: dict, theirs, rb: dict, opts: Options) -> dict:
    """The speed entry (:func:`~parity_cases.common.time_updates`) of macfw's ``agent.update`` and the
    authors' jitted ``update`` on the batches ``b`` and ``rb``. FLOPs: XLA's count, both programs
    with macfw's written-out threefry (the random bits count alike); the authors' timed update is
    compiled with JAX's own threefry."""
    import jax

    ref_update = type(theirs).update
    # FLOPs with one threefry lowering for both (macfw's written-out one: JAX's CPU lowering is a loop
    # whose body XLA counts once), so that the random bits count the same on both sides
    flops = {"macfw": xla_flops(jax.jit(agent.update), state, b), "reference": xla_flops(ref_update, theirs, rb)}
    jax.clear_caches()  # the timed programs are compiled afresh, the authors' with their threefry
    box = {"r": theirs}
    rb = jax.device_put(rb)

    def reference_update():
        box["r"], out = ref_update(box["r"], rb)
        return out

    return time_updates(agent, state, b, reference_update, flops, opts)
