"""LEQ against the authors' ``agents/leq.py`` (``LEQAgent``), single-task and goal-conditioned: the same
initial parameters, the same batches, the same random draws, every metric of their ``total_loss``
after 1 and after ``opts.updates`` updates, the parameters after ``opts.updates``; and the speed of
both updates.

Parameters: macfw's networks mapped into the authors' ``ModuleDict`` tree (:func:`to_flax`):
``modules_dynamics`` (``Dynamics``, 7 Gaussian members: ``dynamics_net`` stacked,
:func:`~parity_cases.common.ensemble_to_flax`), ``modules_critic`` / ``modules_target_critic``
(``GCValue``, one member: ``value_net``), ``modules_actor`` (``GCDeterActor``: ``actor_net`` = the
hidden layers, ``mean_net`` = macfw's final layer), ``modules_success`` / ``modules_reward``
(``GCValue``). Goal-conditioned macfw has no reward head; the authors' keeps its own initialisation
(defect ``gc_reward_head_trained_unused``). The mapped tree is checked against the authors' own
initial tree (names and shapes) before it replaces it; Adam's state is re-initialised on it.

Sizes: cube-single's shapes (ob_dim 28, act_dim 5), 2 x 64 networks, batch 32, horizon 10, 7
members; goal-conditioned with a 3-d goal. Single-task runs the authors' defaults (expectile 0.5);
goal-conditioned runs expectile 0.3, so that the asymmetric weights of the actor and the model
critic term are exercised too (at 0.5 every weight is 0.5). Batches: synthetic transitions, a new
one per update (the same arrays to both); success labels mix 0 and 1 so that every success metric is
defined; goal-conditioned rewards are ``success - 1`` (the authors' ``gc_negative``).

Random draws: method (b), then a replay. macfw's update takes every draw as arrays
(``LEQ.draw_noise``: per rollout ``member (H, B)`` and ``eps (H, B, ob_dim)``, the member that
predicts step t of example b and its standard normals; ``dynamics (7, B, ob_dim)``, the sample of
the ``dynamics_mse`` metric). The authors' update is traced with (:func:`tape`):
``LEQAgent.sample_dynamics`` replaced by the same computation from the replayed arrays (their
distribution's ``loc + scale_diag * eps`` at the replayed member; steps counted per rollout in call
order; inside their per-example ``jax.vmap`` of the actor's rollout, the example's index rides along
as an extra mapped argument, so the replay picks example b's draws), and ``jax.random.normal``
(distrax's sample in ``dynamics_loss``, at batch level) returning the ``dynamics`` array (checked by
element count). Their jitted ``update``/``total_loss`` are traced unjitted inside one jitted function
that takes the draws as arguments.

Defects, listed with each side's value:

* ``critic_model_terms_untrained`` (new): their ``critic_loss`` evaluates ``Q`` on the imagined
  states without ``params=grad_params``, so the ``model_batch_ratio`` (0.95) weighted expectile and
  EMA terms on the model lambda-returns send no gradient: only the data terms (weight 0.05) train
  their critic, and LEQ's lower-expectile Q-learning on model returns does not happen. macfw
  trains the critic on them (the LEQ authors' ``lambda_update_q``). Value: the critic's gradient
  norm at update 1 (macfw; the authors' as is). Every compared term runs their code with the
  gradient restored (``Q`` on the imagined states with ``grad_params``; nothing else changes).
* ``actor_rollout_member_per_dimension`` (new): their actor's rollout calls ``sample_dynamics`` per
  example (inside ``jax.vmap``), where ``jax.random.choice(en_rng, 7, (next_obs.shape[1],))`` draws
  one member per *state dimension* (``shape[1]`` is ``ob_dim`` there, the batch in the critic's
  call), so each imagined state mixes up to 7 members' predictions. Value: member indices drawn per
  imagined state (macfw 1; theirs ob_dim), measured by tracing their ``sample_dynamics`` on one
  example. The replay gives both the same per-example member (one index for every dimension).
* ``gc_reward_head_trained_unused`` (goal-conditioned): they train a reward head that no rollout
  reads (``sample_reward`` returns ``success - 1``); macfw builds none. Their ``reward/*`` metrics
  are skipped and their reward parameters left out of the parameter comparison.

Metrics (the authors' name -> macfw's): :data:`METRICS`; :data:`CONSTANTS` are hyperparameters they
log (compared with macfw's settings). Their ``grad/*`` (``TrainState.apply_loss_fn``, outside
``total_loss``) are not compared; the parameters after ``opts.updates`` Adam steps compare the
gradients' effect in full.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any

import numpy as np

from parity_cases.common import (
    Options,
    agent_result,
    ensemble_to_flax,
    mlp_to_flax,
    mlp_to_flax_split,
    rel_err,
    time_updates,
    tree_rel_err,
    xla_flops,
)

#: the authors' metric -> macfw's metric
METRICS = {
    "dynamics/dynamics_loss": "dynamics/loss",
    "dynamics/dynamics_mse": "dynamics/sample_mse",
    "critic/critic_loss_data": "critic/data_loss",
    "critic/critic_loss_model": "critic/model_loss",
    "critic/q_data": "critic/q_data_mean",
    "critic/q_data_min": "critic/q_data_min",
    "critic/q_data_max": "critic/q_data_max",
    "critic/reward_data": "critic/reward_data_mean",
    "critic/reward_data_max": "critic/reward_data_max",
    "critic/reward_data_min": "critic/reward_data_min",
    "critic/q_model": "critic/q_model_mean",
    "critic/q_model_min": "critic/q_model_min",
    "critic/q_model_max": "critic/q_model_max",
    "critic/reward_model": "critic/reward_model_mean",
    "critic/reward_max": "critic/reward_model_max",
    "critic/reward_min": "critic/reward_model_min",
    "critic/critic_reg_loss": "critic/reg_loss",
    "critic/critic_reg_loss_data": "critic/reg_loss_data",
    "critic/critic_reg_loss_rollout": "critic/reg_loss_model",
    "critic/mask_weights": "critic/alive_mean",
    "critic/loss_weights": "critic/loss_weight_mean",
    "critic/state_max": "critic/state_abs_max",
    "actor/actor_loss": "actor/loss",
    "actor/q_rollout": "actor/lambda_return_mean",
    "actor/adv_weights": "actor/weight_mean",
    "actor/abs_actions": "actor/abs_action_mean",
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
#: the authors' logged hyperparameters -> macfw's LEQ attribute
CONSTANTS = {"critic/expectile": "expectile", "critic/model_batch_ratio": "model_weight", "actor/lambda_actor": "lam"}

OB_DIM, ACT_DIM, GOAL_DIM, NUM_DYNAMICS, HORIZON = 28, 5, 3, 7, 10
SMALL: dict[str, Any] = dict(hidden=(64, 64), batch=32)
EXPECTILE = {False: 0.5, True: 0.3}  # single-task: the authors' default; goal-conditioned: asymmetric weights


# ------------------------------------------------------------------------------ both agents
def macfw_agent(hidden, expectile: float = 0.5):
    """macfw's LEQ as ``gin/baselines/leq.gin`` builds it, at ``hidden`` sizes."""
    from macfw.agents.leq import LEQ, LEQActor
    from macfw.nn.ensemble import Ensemble
    from macfw.nn.models import GaussianDynamics, QCritic, RewardModel, SuccessModel

    P = functools.partial
    return LEQ(
        dynamics=P(
            Ensemble,
            member=P(GaussianDynamics, hidden_dims=hidden, log_std_min=-5.0, log_std_max=1.0),
            num=NUM_DYNAMICS,
        ),
        success=P(SuccessModel, hidden_dims=hidden),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        reward=P(RewardModel, hidden_dims=hidden),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        actor=P(LEQActor, hidden_dims=hidden, final_init_scale=0.01),
        critic=P(QCritic, hidden_dims=hidden),  # pyright: ignore[reportCallIssue]  (equinox: inherits the parent's __init__)
        gamma=0.999,
        lam=1.0,
        horizon=HORIZON,
        expectile=expectile,
        data_expectile=0.5,
        model_weight=0.95,
        tau=0.005,
        learning_rate=3e-4,
    )


def ref_config(mod, hidden, expectile: float = 0.5):
    cfg = mod.get_config()
    cfg.actor_hidden_dims = cfg.value_hidden_dims = cfg.dynamics_hidden_dims = tuple(hidden)
    cfg.rollout_steps, cfg.num_dynamics, cfg.expectile = HORIZON, NUM_DYNAMICS, expectile
    return cfg


def to_flax(nets, target_critic, theirs: dict) -> dict:
    """macfw's LEQ networks as the authors' ``network.params`` (``theirs``: their initial tree, whose
    reward head is kept where macfw has none)."""
    hidden, final = mlp_to_flax_split(nets.actor.net)
    out = {
        "modules_dynamics": {"dynamics_net": ensemble_to_flax(nets.dynamics.members.net)},
        "modules_critic": {"value_net": mlp_to_flax(nets.critic.net)},
        "modules_target_critic": {"value_net": mlp_to_flax(target_critic.net)},
        "modules_actor": {"actor_net": hidden, "mean_net": final},
        "modules_success": {"value_net": mlp_to_flax(nets.success.net)},
        "modules_reward": (
            {"value_net": mlp_to_flax(nets.reward.net)} if nets.reward is not None else theirs["modules_reward"]
        ),
    }
    return out


def _same_layout(a, b) -> None:
    import jax

    sa = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), a)
    sb = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), b)
    if sa != sb:
        raise AssertionError(f"the mapped parameters do not match the authors' tree:\n{sa}\n{sb}")


def build(ref, hidden, batch: int, gc: bool, seed: int, expectile: float = 0.5):
    """Both agents with the same initial parameters: ``(agent, spec, state, theirs)``."""
    import jax

    from macfw.spec import Spec

    mod = ref.agent("leq")
    agent = macfw_agent(hidden, expectile)
    spec = Spec(ob_dim=OB_DIM, act_dim=ACT_DIM, goal_dim=GOAL_DIM if gc else 0, chunk_len=1)
    state = agent.init(spec, jax.random.PRNGKey(seed))
    _, loop = make_batch(spec, batch, seed)
    theirs = mod.LEQAgent.create(seed, jax.device_put(reference_batch(loop, gc)), ref_config(mod, hidden, expectile))
    params = to_flax(state.nets, state.target_critic, theirs.network.params)
    _same_layout(params, theirs.network.params)
    params = jax.tree_util.tree_map(lambda x: jax.numpy.asarray(x), params)
    net = theirs.network.replace(params=params, opt_state=theirs.network.tx.init(params))
    return agent, spec, state, theirs.replace(network=net)


def make_batch(spec, batch: int, seed: int) -> tuple[dict, dict]:
    """A synthetic one-step batch: ``(fields, loop batch)``; fields in the authors' names, the loop
    batch in macfw's (``success`` = 1 - mask; goals ``(B, 0)`` single-task)."""
    rng = np.random.default_rng(seed)
    B, gc = batch, spec.goal_dim > 0
    obs = rng.uniform(-1, 1, (B, spec.ob_dim)).astype(np.float32)
    success = (rng.random(B) < 0.3).astype(np.float32)
    success[:2] = [0.0, 1.0]  # both labels present: every success metric is defined
    rewards = (success - 1.0) if gc else rng.uniform(-1, 0, B).astype(np.float32)
    f = {
        "observations": obs,
        "actions": rng.uniform(-1, 1, (B, spec.act_dim)).astype(np.float32),
        "next_observations": (obs + 0.1 * rng.normal(size=obs.shape)).astype(np.float32),
        "rewards": rewards.astype(np.float32),
        "masks": 1.0 - success,
        "value_goals": rng.uniform(-1, 1, (B, spec.goal_dim)).astype(np.float32),
        "actor_goals": rng.uniform(-1, 1, (B, spec.goal_dim)).astype(np.float32),
    }
    loop = {
        "obs": f["observations"],
        "actions": f["actions"],
        "next_obs": f["next_observations"],
        "rewards": f["rewards"],
        "success": success,
        "value_goals": f["value_goals"],
        "actor_goals": f["actor_goals"],
    }
    return f, loop


def reference_batch(loop: dict, gc: bool) -> dict:
    """The loop batch in the authors' keys (goals only goal-conditioned)."""
    out = {
        "observations": loop["obs"],
        "actions": loop["actions"],
        "next_observations": loop["next_obs"],
        "rewards": loop["rewards"],
        "masks": 1.0 - loop["success"],
    }
    if gc:
        out.update(value_goals=loop["value_goals"], actor_goals=loop["actor_goals"])
    return out


# ------------------------------------------------------------------------------ the replay of draws
_TAPE: dict = {}


def _indexed_vmap(fun, in_axes=0, out_axes=0, **kw):
    """``jax.vmap`` that also maps the example's index (``_TAPE['example']`` while ``fun`` is traced) and
    restarts the step count: the authors' per-example vmaps of the actor's rollout see the replayed
    draws of their example."""
    import jax
    import jax.numpy as jnp

    def mapped(*args):
        axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
        n = next(
            jax.tree_util.tree_leaves(a)[0].shape[ax]
            for a, ax in zip(args, axes)
            if ax is not None and jax.tree_util.tree_leaves(a)
        )

        def inner(*a):
            old = _TAPE.get("example"), _TAPE.get("step")
            _TAPE["example"], _TAPE["step"] = a[-1], 0
            try:
                return fun(*a[:-1])
            finally:
                _TAPE["example"], _TAPE["step"] = old

        return jax.vmap(inner, in_axes=tuple(axes) + (0,), out_axes=out_axes, **kw)(*args, jnp.arange(n))

    return mapped


def _taped_sample_dynamics(self, observations, actions, seed=None):
    """The authors' ``sample_dynamics`` with the replayed draws: ``loc + scale_diag * eps`` of the replayed
    member, per example (batched: the critic's rollout; one example: the actor's, inside the vmap)."""
    import jax.numpy as jnp

    dist = self.network.select("dynamics")(observations, actions)
    loc, scale = dist.loc, dist.scale_diag  # (k, B, ob_dim) or (k, ob_dim)
    if observations.ndim == 2:
        t = _TAPE["critic_step"]
        _TAPE["critic_step"] += 1
        member, eps = _TAPE["noise"]["critic"]["member"][t], _TAPE["noise"]["critic"]["eps"][t]
        rows = jnp.arange(observations.shape[0])
        return loc[member, rows] + scale[member, rows] * eps
    t, b = _TAPE["step"], _TAPE["example"]
    _TAPE["step"] += 1
    member, eps = _TAPE["noise"]["actor"]["member"][t, b], _TAPE["noise"]["actor"]["eps"][t, b]
    return loc[member] + scale[member] * eps


def _taped_normal(key, shape=(), dtype=None, *a, **k):
    import jax.numpy as jnp

    eps = _TAPE["noise"]["dynamics"]
    if int(np.prod(shape)) != eps.size or _TAPE.get("normal_used"):
        raise AssertionError(
            f"unexpected jax.random.normal{tuple(shape)} in the authors' update (replay holds "
            f"{eps.shape}, used: {bool(_TAPE.get('normal_used'))})"
        )
    _TAPE["normal_used"] = True
    return jnp.reshape(eps, shape).astype(dtype or eps.dtype)


class _CriticWithGrad:
    """The authors' ``network`` whose ``select('critic')`` uses ``grad_params`` where they call it on the
    stacked imagined steps (inputs ``(H, B, .)``) without parameters: the gradient their port drops
    (defect ``critic_model_terms_untrained``). Every other call is theirs unchanged."""

    def __init__(self, network, grad_params):
        self._net, self._grad = network, grad_params

    def select(self, name):
        fn = self._net.select(name)
        if name != "critic":
            return fn

        def critic(*args, params=None, **kw):
            if params is None and np.ndim(args[0]) == 3:
                params = self._grad
            return fn(*args, params=params, **kw)

        return critic

    def __getattr__(self, name):
        return getattr(self._net, name)


@functools.cache
def taped_class(mod):
    """A subclass of the authors' ``LEQAgent`` whose update replays :func:`tape`'s draws (their ``update``
    and ``total_loss`` unjitted, to trace inside one jitted function) and, with ``_TAPE['fix_critic']``,
    restores the critic's model-term gradient."""
    Base = mod.LEQAgent

    class Taped(Base):
        update = Base.update.__wrapped__
        total_loss = Base.total_loss.__wrapped__
        sample_dynamics = _taped_sample_dynamics

        def critic_loss(self, batch, grad_params, rng):
            _TAPE["critic_step"] = 0
            me = self.replace(network=_CriticWithGrad(self.network, grad_params)) if _TAPE["fix_critic"] else self
            return Base.critic_loss(me, batch, grad_params, rng)

    return Taped


@contextlib.contextmanager
def tape(mod, noise: dict, fix_critic: bool = True):
    """While tracing the authors' update: the replayed draws (module docstring) and the critic fix."""
    import jax

    proxy = types.SimpleNamespace(**{k: getattr(jax, k) for k in dir(jax) if not k.startswith("__")})
    proxy.vmap = _indexed_vmap
    old_jax, old_normal = mod.jax, jax.random.normal
    _TAPE.clear()
    _TAPE.update(noise=noise, fix_critic=fix_critic, critic_step=0)
    mod.jax, jax.random.normal = proxy, _taped_normal
    try:
        yield
    finally:
        mod.jax, jax.random.normal = old_jax, old_normal
        _TAPE.clear()


def reference_update(mod, fix_critic: bool = True):
    """The authors' update as ``f(agent, batch, noise) -> (agent, info)``, jitted, replaying ``noise``
    (macfw's ``LEQ.draw_noise`` dict)."""
    import jax

    Taped = taped_class(mod)

    def f(agent, batch, noise):
        with tape(mod, noise, fix_critic):
            new, info = Taped.update(Taped(rng=agent.rng, network=agent.network, config=agent.config), batch)
        return mod.LEQAgent(rng=new.rng, network=new.network, config=new.config), info

    return jax.jit(f)


def reference_grads(mod, agent, batch, noise, fix_critic: bool):
    """The gradient of the authors' total loss at ``agent``'s parameters (with the replayed draws)."""
    import jax

    Taped = taped_class(mod)

    def f(agent, batch, noise):
        with tape(mod, noise, fix_critic):
            me = Taped(rng=agent.rng, network=agent.network, config=agent.config)
            _, rng = jax.random.split(me.rng)
            return jax.grad(lambda p: me.total_loss(batch, p, rng=rng)[0])(me.network.params)

    return jax.jit(f)(agent, batch, noise)


# ------------------------------------------------------------------------------ comparisons
def macfw_params(state, theirs_params: dict) -> dict:
    return to_flax(state.nets, state.target_critic, theirs_params)


def _terms(ours: dict, theirs: dict, agent, gc: bool, tag: str) -> tuple[dict, dict]:
    """``(terms, skipped)`` for one update's metrics, names ``<mode>/<their name>``."""
    terms, skipped = {}, {}
    for name, v in theirs.items():
        key = f"{tag}/{name}"
        if name.startswith("reward/") and gc:
            skipped[key] = "gc_reward_head_trained_unused: their goal-conditioned reward head, read by no rollout"
            continue
        if name in CONSTANTS:
            m = getattr(agent, CONSTANTS[name])
        elif name in METRICS:
            m = ours[METRICS[name]]
        else:
            raise KeyError(f"the authors log {name!r}, which this case does not map (add it to METRICS)")
        terms[key] = {"macfw": float(m), "reference": float(v), "rel_err": rel_err(m, v)}
    return terms, skipped


def compare_updates(ref, gc: bool, opts: Options) -> dict:
    """``opts.updates`` updates of both from the same parameters, batches and draws."""
    import equinox as eqx
    import jax

    mod = ref.agent("leq")
    tag = "goal_conditioned" if gc else "single_task"
    agent, spec, state, theirs = build(ref, SMALL["hidden"], SMALL["batch"], gc, opts.seed, EXPECTILE[gc])
    step = eqx.filter_jit(agent.update)
    ref_step = reference_update(mod)
    B = SMALL["batch"]
    key = jax.random.PRNGKey(opts.seed + 1)
    terms_1, terms_n, skipped = {}, {}, {}
    defect = None
    for i in range(opts.updates):
        _, loop = make_batch(spec, B, opts.seed + 100 + i)
        noise = agent.draw_noise(state.nets, jax.random.fold_in(key, i), B)
        rb = reference_batch(loop, gc)
        if i == 0:
            defect = critic_defect(mod, agent, state, theirs, loop, rb, noise)
        state, ours = step(state, loop, noise)
        theirs, info = ref_step(theirs, rb, noise)
        info = {k: v for k, v in info.items() if not k.startswith("grad/")}
        if i == 0 or i == opts.updates - 1:
            t, s = _terms(jax.device_get(ours), jax.device_get(info), agent, gc, tag)
            (terms_1 if i == 0 else terms_n).update(t)
            skipped.update(s)
    mine = macfw_params(state, theirs.network.params)
    theirs_p = dict(theirs.network.params)
    if gc:  # no macfw counterpart (defect gc_reward_head_trained_unused)
        mine, theirs_p = dict(mine), dict(theirs_p)
        mine.pop("modules_reward")
        theirs_p.pop("modules_reward")
        skipped[f"{tag}/params/modules_reward"] = "gc_reward_head_trained_unused"
    params = tree_rel_err(mine, theirs_p)
    terms_n[f"{tag}/params"] = {"macfw": None, "reference": None, "rel_err": params}
    defects = {f"critic_model_terms_untrained ({tag})": defect}
    if gc:
        defects["gc_reward_head_trained_unused"] = {
            "macfw": None,
            "reference": {k: float(v) for k, v in jax.device_get(info).items() if k.startswith("reward/")},
            "reason": "goal-conditioned, their rollouts reward success - 1 and never read the reward head they train "
            "(its metrics after the last update above); macfw builds no reward head there.",
        }
    return {"terms_1": terms_1, "terms_n": terms_n, "skipped": skipped, "defects": defects, "params": params}


def critic_defect(mod, agent, state, theirs, loop, rb, noise) -> dict:
    """The critic's gradient norm at the first update: macfw's, the authors' as they are, and theirs
    with the model-term gradient restored (what every compared term runs)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from macfw.agents.mbpo import one_step_view

    _sg = jax.lax.stop_gradient

    def critic_grad(nets):
        real = one_step_view(loop)
        frozen, vg = _sg(nets), real["value_goals"]
        a_next = jax.vmap(frozen.actor)(real["next_obs"], vg)
        y = real["rewards"] + agent.gamma * real["masks"] * jax.vmap(frozen.critic)(real["next_obs"], vg, a_next)
        croll = _sg(agent.rollout(frozen, real["obs"], vg, noise["critic"]))
        aroll = agent.actor_rollout(nets, real["obs"], real["actor_goals"], noise["actor"])
        g = eqx.filter_grad(lambda n: agent.loss(n, state.target_critic, real, y, croll, aroll, noise["dynamics"])[0])(
            nets
        )
        return g.critic

    def norm(tree):
        return float(
            jnp.sqrt(
                sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array)))
            )
        )

    ours = norm(eqx.filter_jit(critic_grad)(state.nets))
    as_is = norm(reference_grads(mod, theirs, rb, noise, False)["modules_critic"])
    fixed = norm(reference_grads(mod, theirs, rb, noise, True)["modules_critic"])
    return {
        "macfw": ours,
        "reference": as_is,
        "reason": "their critic_loss calls Q on the imagined steps without grad_params: the 0.95-weighted model "
        "expectile and EMA terms send no gradient (values: the critic's gradient norm at update 1). With "
        f"the gradient restored theirs is {fixed:.6g} (rel. err to macfw {rel_err(ours, fixed):.1e}); "
        "every compared term runs it so.",
    }


def member_defect(ref) -> dict:
    """Member indices the authors' ``sample_dynamics`` draws per imagined state, on one example (the
    actor's rollout) and on a batch (the critic's), counted by tracing it."""
    import jax
    import jax.numpy as jnp

    mod = ref.agent("leq")
    agent, spec, state, theirs = build(ref, (8,), 4, False, 0)
    drawn = []
    real_choice = jax.random.choice

    def choice(key, a, shape=(), *args, **kw):
        drawn.append(tuple(shape))
        return real_choice(key, a, shape, *args, **kw)

    jax.random.choice = choice
    try:
        s, a = jnp.zeros((4, OB_DIM)), jnp.zeros((4, ACT_DIM))
        jax.eval_shape(lambda s, a: mod.LEQAgent.sample_dynamics(theirs, s, a, jax.random.PRNGKey(0)), s[0], a[0])
        jax.eval_shape(lambda s, a: mod.LEQAgent.sample_dynamics(theirs, s, a, jax.random.PRNGKey(0)), s, a)
    finally:
        jax.random.choice = real_choice
    per_state = int(np.prod(drawn[0]))
    return {
        "macfw": 1,
        "reference": per_state,
        "reason": f"their actor's rollout samples one example at a time (vmap), where jax.random.choice(en_rng, "
        f"{NUM_DYNAMICS}, (next_obs.shape[1],)) draws {per_state} = ob_dim member indices, one per state "
        f"dimension (the critic's batched call draws shape {drawn[1]}: one per example), so each imagined "
        f"state mixes up to {NUM_DYNAMICS} members' predictions "
        f"({NUM_DYNAMICS * (1 - (1 - 1 / NUM_DYNAMICS) ** OB_DIM):.2f} "
        "distinct on average). The compared terms replay one member per example to both.",
    }


# ------------------------------------------------------------------------------ speed
@contextlib.contextmanager
def jax_threefry():
    """Programs compiled inside use JAX's own CPU lowering of threefry, the authors' setting (``import
    macfw`` registers a written-out one, which would speed up their program too)."""
    from macfw import _threefry

    was = _threefry.is_unrolled()
    _threefry.unroll_threefry_on_cpu(False)
    try:
        yield
    finally:
        _threefry.unroll_threefry_on_cpu(was)


def measure_speed(ref, opts: Options, gc: bool = False) -> dict:
    """Each side's jitted update at ``opts.speed_sizes`` (cpu-small: 2 x 256, batch 256; H = 10, 7 members),
    single-task (as ``macfw.bench``), alternated in one process, the batch on the device. macfw's is
    the loop's ``update`` compiled as its training step compiles it (:func:`macfw_update`: draws from
    the state's key, the state donated, macfw's compiler options); the authors' is their jitted
    ``update(batch)``, compiled with JAX's own threefry. FLOPs: XLA's count of each program
    (macfw's of its reference computation, every same-result speed-up off, as ``macfw.bench`` counts,
    with the rollouts unrolled, ``LEQ.for_flop_count``, since XLA counts a loop body once; theirs
    unrolls in Python)."""

    import equinox as eqx
    import jax

    from macfw.reference import reference_computation

    B = opts.speed_batch
    agent, spec, state, theirs = build(ref, opts.speed_hidden, B, gc, opts.seed)
    _, loop = make_batch(spec, B, opts.seed)
    b, rb = jax.device_put(loop), jax.device_put(reference_batch(loop, gc))
    ref_step = type(theirs).update
    counted = agent.for_flop_count()
    with jax_threefry():
        flops_ref = xla_flops(ref_step, theirs, rb)
    with reference_computation(rolled_threefry=False):  # what the method computes, as macfw.bench counts
        flops = {"macfw": xla_flops(eqx.filter_jit(counted.update), state, b), "reference": flops_ref}
    box = {"r": theirs}

    def reference_update():
        box["r"], out = ref_step(box["r"], rb)
        return out

    return time_updates(agent, state, b, reference_update, flops, opts)


# ------------------------------------------------------------------------------ the case
def run(ref, opts: Options) -> dict:
    terms_1, terms_n, skipped, defects, params = {}, {}, {}, {}, []
    for gc in (False, True):
        u = compare_updates(ref, gc, opts)
        terms_1.update(u["terms_1"])
        terms_n.update(u["terms_n"])
        skipped.update(u["skipped"])
        defects.update(u["defects"])
        params.append(u["params"])
    defects["actor_rollout_member_per_dimension"] = member_defect(ref)
    speed = measure_speed(ref, opts) if opts.speed else None
    return agent_result(
        terms_1, terms_n, max(params), skipped=skipped, defects=defects, speed=speed, updates=opts.updates
    )
