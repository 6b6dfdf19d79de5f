"""FMPC against the authors' ``agents/fmpc.py`` (``FMPCAgent``), goal-conditioned (``gc/``, their
``ACGCDataset``) and single-task (``st/``, their ``ACDataset``), as the paper runs it in both tables:
the same initial parameters, the same batches, the same random draws, every metric their
``total_loss`` logs after 1 and after ``opts.updates`` updates, the parameters after
``opts.updates``, and the speed of both updates.

Parameters: macfw's networks mapped into the authors' ``ModuleDict`` tree: ``modules_dynamics_flow``
(``DynamicsVectorField``: ``mlp`` = the future model's velocity MLP on ``[s, a, x, u]``),
``modules_actor_flow`` (``ActorVectorField``: ``mlp`` = the policy's velocity MLP on ``[s, g, x, u]``),
``modules_value`` and ``modules_critic`` (``GCValue`` with one member: ``value_net`` = the MLP; the
critic reads ``[X, g, a]``). The authors' Adam state is built fresh on them. macfw's EMA value
``V'`` (single-task only) has no counterpart and is not compared.

Batches: macfw's own sampler (``sample_batch`` with ``chunk_len = future_len = 32``) on synthetic data
in OGBench's compact layout; the authors' batch is built by *their* dataset class on the same arrays
(``terminals`` 1 at each trajectory's last two indices, as OGBench's compact loader sets them) at
macfw's indices, with their ``sample_goals`` returning macfw's value- and actor-goal indices: their
flattened 32-step future, window reward (single-task: the mean over the window of ``gamma^i r``),
mask and ``returns_to_go`` come from their code.

Random draws (the issue's method (b) + (a)): ``FMPC.update(state, batch, noise)`` takes the
batch-level flow-matching noise and flow times of the future model and the policy
(``FMPC.draw_noise``); :func:`replay` hands the same arrays to the authors' ``jax.random.normal`` /
``uniform`` calls (``dynamics_loss``'s ``x_0``, ``t``, then ``bc_actor_loss``'s), inside one outer
``jax.jit`` with their inner jits traced inline.

Metrics (the authors' name -> macfw's): :data:`METRICS`, plus ``batch/*`` (the window reward and mask
and the flattened future each side trained on). Their ``grad/*`` (outside ``total_loss``) are not
compared; the parameters after ``opts.updates`` Adam steps compare the gradients' effect in full.

The authors' defects shown here (each in ``defects`` with both sides' values):

* ``critic_target_bootstraps_value_logit`` (goal-conditioned): their critic target is
  ``clip(r + gamma^32 m V(s_{t+32}, g), 0, 1)`` with ``V`` the value network's raw output, which their
  BCE value loss makes a *logit*; macfw bootstraps the probability ``sigmoid(V)``. The ``gc/`` terms
  are compared with their ``critic_loss`` patched at that one line (``jax.nn.sigmoid`` of ``next_v``,
  their source otherwise unchanged); the defect entry gives their unpatched critic terms and
  parameters beside macfw's.
* ``return_to_go_excludes_the_trajectory_end`` (goal-conditioned): their value label is
  ``1[t <= g_idx < final]`` with ``final`` their trajectory end (with OGBench's compact layout the
  second-to-last state), so a goal at one of the trajectory's last two states is labelled "not later
  in this trajectory"; macfw labels ``1[t <= g_idx <= end]``. Such rows get macfw's label in their batch.
* ``singletask_value_target_is_a_clipped_return_to_go`` (single-task): their value target is the
  undiscounted sum of rewards to the trajectory's end (shape ``(33, B)``, broadcast against ``V``'s
  ``(B,)``) clipped to [0, 1], identically 0 for OGBench's non-positive rewards, and their critic
  bootstraps that value's logit; macfw's single-task V and Q are regressions (a deliberate deviation,
  ``macfw.agents.fmpc``'s docstring). The ``st/`` comparison covers the future model and the policy
  (terms and parameters: their losses do not reach the other networks); the value and critic terms
  and parameters are listed in the defect entry with both sides' values.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import textwrap
from typing import Any

import numpy as np

from parity_cases.common import (
    Options,
    agent_result,
    compare_terms,
    mlp_to_flax,
    replay,
    tree_rel_err,
    unjitted,
)
from parity_cases.nstep_sacbc import array_term, compact_arrays, map_params, measure_updates, reference_sample

#: the authors' metric -> macfw's metric
METRICS = {
    "dynamics/flow_loss": "dynamics/loss",
    "dynamics/vel": "dynamics/vel",
    "bc_actor/flow_loss": "flow/loss",
    "bc_actor/vel": "flow/vel",
    "value/value_loss": "value/loss",
    "value/v_mean": "value/v_mean",
    "value/v_max": "value/v_max",
    "value/v_min": "value/v_min",
    "critic/critic_loss": "critic/loss",
    "critic/q_mean": "critic/q_mean",
    "critic/q_max": "critic/q_max",
    "critic/q_min": "critic/q_min",
}
#: the networks each task's comparison covers (single-task: the value and critic are a named defect)
COMPARED = {
    True: ("modules_dynamics_flow", "modules_actor_flow", "modules_value", "modules_critic"),
    False: ("modules_dynamics_flow", "modules_actor_flow"),
}

OB_DIM, ACT_DIM, GOAL_DIM = 28, 5, 3  # cube-single's observation and action; a 3-d oracle goal
FUTURE, GAMMA = 32, 0.999  # the authors' action_chunking and discount
EPISODES, EPISODE_LENGTH = 8, 101
#: the one line of the authors' critic_loss the critic_target_bootstraps_value_logit comparison patches
LOGIT_LINE = "next_v = self.network.select('value')(batch['next_observations'][:, -ob_dim:], batch['value_goals'])"


# ------------------------------------------------------------------------------ the two agents
def _config(mod, hidden, batch_size):
    cfg = mod.get_config()
    cfg.actor_hidden_dims = tuple(hidden)
    cfg.value_hidden_dims = tuple(hidden)
    cfg.dynamics_hidden_dims = tuple(hidden)
    cfg.batch_size = batch_size
    cfg.action_chunking = FUTURE
    cfg.discount = GAMMA
    return cfg


def macfw_agent(hidden):
    from macfw.agents.fmpc import FMPC, FutureFlow
    from macfw.nn.flow import FlowPolicy
    from macfw.nn.models import QCritic, StateValue

    return FMPC(
        model=functools.partial(FutureFlow, hidden_dims=hidden, flow_steps=10),
        policy=functools.partial(FlowPolicy, hidden_dims=hidden, flow_steps=10, distill=False),
        critic=functools.partial(QCritic, hidden_dims=hidden),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        value=functools.partial(StateValue, hidden_dims=hidden),
        future_len=FUTURE,
        num_samples=64,
        gamma=GAMMA,
        tau=0.005,
        learning_rate=3e-4,
        value_loss="bce",
        normalize_reward=True,
    )


def to_flax(nets) -> dict:
    """macfw's FMPC networks as the authors' ``network.params``."""
    return {
        "modules_dynamics_flow": {"mlp": mlp_to_flax(nets.model.field)},
        "modules_value": {"value_net": mlp_to_flax(nets.value.net)},
        "modules_critic": {"value_net": mlp_to_flax(nets.critic.net)},
        "modules_actor_flow": {"mlp": mlp_to_flax(nets.policy.field)},
    }


def _logit_fixed_critic_loss(cls):
    """The authors' ``critic_loss`` with ``sigmoid`` applied to the bootstrapped value (their source,
    that one line changed; raises if the line is not there)."""
    src = textwrap.dedent(inspect.getsource(cls.critic_loss))
    if src.count(LOGIT_LINE) != 1:
        raise AssertionError("the authors' critic_loss no longer has the line the logit-bootstrap patch changes")
    src = src.replace(LOGIT_LINE, LOGIT_LINE.replace("next_v = ", "next_v = jax.nn.sigmoid(") + ")")
    namespace = dict(vars(inspect.getmodule(cls)))
    exec(compile(src, f"<patched {cls.__name__}.critic_loss>", "exec"), namespace)  # noqa: S102
    return namespace["critic_loss"]


# ------------------------------------------------------------------------------ data
def batches(agent, data, ds, num: int, batch_size: int, seed: int, gc: bool):
    """``num`` pairs (macfw batch, the authors' ACGCDataset / ACDataset batch at the same indices and
    goals) and the rows whose value label their code sets otherwise (given macfw's label)."""
    import jax

    from macfw.data.batches import goal_indices, sample_for

    bs = agent.batch_spec
    sample = jax.jit(lambda k: sample_for(bs, data, k, batch_size, goal_conditioned=gc))
    goals = jax.jit(lambda k, t, end: goal_indices(jax.random.split(k, 8), t, end, data.size, bs.gamma, goals=bs.goals))
    out, relabelled = [], []
    for k in jax.random.split(jax.random.PRNGKey(seed + 1), num):
        b = jax.device_get(sample(k))
        if gc:
            vg, ag = goals(k, b["idx"], b["traj_end"])
            if not np.array_equal(vg, b["value_goal_idx"]):
                raise AssertionError("goal_indices does not reproduce sample_batch's value goals")
            rb = reference_sample(ds, batch_size, b["idx"], [vg, ag])
        else:
            rb = reference_sample(ds, batch_size, b["idx"], [])
        rb: dict[str, Any] = {k2: (None if v is None else np.array(v)) for k2, v in rb.items()}
        if gc:
            label = np.asarray(agent.training_inputs(b)["value_label"])
            for r in np.nonzero(label != rb["returns_to_go"])[0]:
                relabelled.append(
                    {
                        "idx": int(b["idx"][r]),
                        "value_goal_idx": int(b["value_goal_idx"][r]),
                        "traj_end": int(b["traj_end"][r]),
                        "macfw": float(label[r]),
                        "reference": float(rb["returns_to_go"][r]),
                    }
                )
            rb["returns_to_go"] = label.astype(rb["returns_to_go"].dtype)
        keep = (
            "observations",
            "actions",
            "next_observations",
            "rewards",
            "masks",
            "value_goals",
            "actor_goals",
            "returns_to_go",
        )
        out.append((b, {k2: rb[k2] for k2 in keep}))
    return out, relabelled


def build(ref, hidden, batch_size: int, seed: int, gc: bool):
    """Both agents with macfw's initial parameters, the data and the authors' dataset:
    ``(agent, state, theirs, data, ds)``."""
    import equinox as eqx
    import jax

    from macfw.bench import synthetic_data
    from macfw.spec import Spec

    mod = ref.agent("fmpc")
    datasets = importlib.import_module("utils.datasets")
    agent = macfw_agent(hidden)
    spec = Spec(ob_dim=OB_DIM, act_dim=ACT_DIM, goal_dim=GOAL_DIM if gc else 0, chunk_len=FUTURE)
    state = eqx.filter_jit(agent.init)(spec, jax.random.PRNGKey(seed))
    data = synthetic_data(spec, num_episodes=EPISODES, episode_length=EPISODE_LENGTH, seed=seed)
    cfg = _config(mod, hidden, batch_size)
    arrays = compact_arrays(data)
    if not gc:
        del arrays["oracle_reps"]
    ds = (datasets.ACGCDataset if gc else datasets.ACDataset)(datasets.Dataset.create(**arrays), cfg)
    pairs, _ = batches(agent, data, ds, 1, batch_size, seed, gc)
    theirs = mod.FMPCAgent.create(seed, pairs[0][1], cfg)
    theirs = map_params(theirs, to_flax(state.nets))
    return agent, state, theirs, data, ds


def reference_step(cls, fix_logit: bool):
    """``(agent, batch, noise) -> (agent, info)``: the authors' ``update`` with macfw's draws, jitted;
    with ``fix_logit`` their ``critic_loss`` bootstraps ``sigmoid(V)`` (:func:`_logit_fixed_critic_loss`)."""
    import jax

    patched = _logit_fixed_critic_loss(cls) if fix_logit else None

    def step(agent, batch, noise):
        tape = [
            ("normal", noise["model_z"]),
            ("uniform", noise["model_u"]),  # dynamics_loss
            ("normal", noise["policy_z"]),
            ("uniform", noise["policy_u"]),
        ]  # bc_actor_loss
        saved = cls.critic_loss
        if patched is not None:
            cls.critic_loss = patched
        try:
            with unjitted(cls), replay(tape) as left:
                out = cls.update(agent, batch)
        finally:
            cls.critic_loss = saved
        if left:
            raise RuntimeError(f"{len(left)} draws of the tape were not used by the authors' update")
        return out

    return jax.jit(step)


def _macfw_terms(m: dict) -> dict:
    return {k: m[v] for k, v in METRICS.items()}


def _sub(tree: dict, names) -> dict:
    return {k: tree[k] for k in names}


def compare_task(ref, opts: Options, gc: bool) -> tuple[dict, dict, float, dict]:
    """One task's comparison: ``(terms after 1, terms after opts.updates, params rel. error, defects)``."""
    import equinox as eqx
    import jax

    hidden, B = (64, 64), 32
    agent, state, theirs, data, ds = build(ref, hidden, B, opts.seed, gc)
    raw = theirs  # gc: the authors' update unpatched, for the defect's values
    step = eqx.filter_jit(agent.update)
    ref_step = reference_step(type(theirs), fix_logit=gc)
    raw_step = reference_step(type(theirs), fix_logit=False)
    pairs, relabelled = batches(agent, data, ds, opts.updates, B, opts.seed, gc)
    keys = jax.random.split(jax.random.PRNGKey(opts.seed + 2), opts.updates)
    compared = METRICS if gc else {k: v for k, v in METRICS.items() if k.split("/")[0] in ("dynamics", "bc_actor")}
    terms, defect_terms = {}, {}
    for i, ((b, rb), k) in enumerate(zip(pairs, keys)):
        noise = agent.draw_noise(k, B)
        state, m = step(state, b, noise)
        theirs, info = ref_step(theirs, rb, noise)
        if gc:
            raw, raw_info = raw_step(raw, rb, noise)
        if i == 0 or i == opts.updates - 1:
            mine = jax.device_get(_macfw_terms(m))
            terms[i] = compare_terms({k2: mine[k2] for k2 in compared}, {k2: info[k2] for k2 in compared})
            inp = agent.training_inputs(b)
            terms[i]["batch/rewards"] = array_term(inp["reward"], rb["rewards"])
            terms[i]["batch/masks"] = array_term(inp["mask"], rb["masks"])
            terms[i]["batch/next_observations"] = array_term(inp["future"], rb["next_observations"])
            suffix = "" if i == 0 else f"@{opts.updates}"
            if gc:  # the unpatched critic's terms beside macfw's
                for k2 in ("critic/critic_loss", "critic/q_mean", "critic/q_max", "critic/q_min"):
                    defect_terms[k2 + suffix] = {"macfw": float(mine[k2]), "reference": float(raw_info[k2])}
            else:
                for k2 in METRICS:
                    if k2 not in compared:
                        defect_terms[k2 + suffix] = {"macfw": float(mine[k2]), "reference": float(info[k2])}
    ours, their_params = to_flax(state.nets), theirs.network.params
    params_err = tree_rel_err(_sub(ours, COMPARED[gc]), _sub(their_params, COMPARED[gc]))
    defects = {}
    if gc:
        defect_terms[f"params@{opts.updates}"] = {"rel_err": tree_rel_err(ours, raw.network.params)}
        defects["critic_target_bootstraps_value_logit"] = {
            "macfw": {k2: v.get("macfw") for k2, v in defect_terms.items()},
            "reference": {k2: v.get("reference", v.get("rel_err")) for k2, v in defect_terms.items()},
            "reason": (
                "their critic target clip(r + gamma^32 m V(s_{t+32}, g), 0, 1) reads the value network's raw "
                "output, a logit under their BCE value loss; macfw bootstraps sigmoid(V). The gc/ terms are "
                "compared with their critic_loss patched at that line; here their unpatched critic terms "
                f"and the relative error of all parameters after {opts.updates} updates against them"
            ),
        }
        if relabelled:
            defects["return_to_go_excludes_the_trajectory_end"] = {
                "macfw": [dict(r, label=r["macfw"]) for r in relabelled],
                "reference": [dict(r, label=r["reference"]) for r in relabelled],
                "reason": (
                    "their value label 1[t <= g_idx < final] with final their trajectory end (OGBench's compact "
                    "layout: the second-to-last state) says a goal at the trajectory's last two states is not "
                    "later in it; macfw labels 1[t <= g_idx <= end]; these rows got macfw's label in their batch"
                ),
            }
    else:
        other = [n for n in ours if n not in COMPARED[gc]]
        defect_terms[f"params@{opts.updates}"] = {"rel_err": tree_rel_err(_sub(ours, other), _sub(their_params, other))}
        defects["singletask_value_target_is_a_clipped_return_to_go"] = {
            "macfw": {k2: v.get("macfw") for k2, v in defect_terms.items()},
            "reference": {k2: v.get("reference", v.get("rel_err")) for k2, v in defect_terms.items()},
            "reason": (
                "their single-task value target is the undiscounted return to the trajectory's end (shape "
                "(33, B), broadcast against V's (B,)) clipped to [0, 1]: 0 for OGBench's non-positive rewards; "
                "their critic bootstraps its logit. macfw's single-task V and Q are regressions (V by TD "
                "against an EMA copy). The value and critic terms and parameters (relative error of those "
                f"networks after {opts.updates} updates) are listed, not compared"
            ),
        }
    return terms[0], terms[opts.updates - 1], params_err, defects


def run(ref, opts: Options) -> dict:
    terms_1, terms_n, errs, defects = {}, {}, {}, {}
    for gc, prefix in ((True, "gc/"), (False, "st/")):
        t1, tn, err, d = compare_task(ref, opts, gc)
        terms_1.update({prefix + k: v for k, v in t1.items()})
        terms_n.update({prefix + k: v for k, v in tn.items()})
        errs[prefix] = err
        defects.update({prefix + k: v for k, v in d.items()})
    terms_n.update({f"{p}params": {"macfw": None, "reference": None, "rel_err": e} for p, e in errs.items()})
    speed = measure_speed(ref, opts) if opts.speed else None
    return agent_result(terms_1, terms_n, max(errs.values()), defects=defects, speed=speed, updates=opts.updates)


def measure_speed(ref, opts: Options) -> dict:
    """Each side's jitted update at ``opts.speed_sizes`` (cpu-small: 2 x 256, batch 256; a 32-step future,
    goal-conditioned), alternated in one process."""
    hidden, batch_size = opts.speed_hidden, opts.speed_batch
    agent, state, theirs, data, ds = build(ref, hidden, batch_size, opts.seed, True)
    b, rb = batches(agent, data, ds, 1, batch_size, opts.seed, True)[0][0]
    return measure_updates(agent, state, b, theirs, rb, opts)
