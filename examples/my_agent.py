"""A user's own agent in one file (see CONTRIBUTING.md, "Adding an agent"): flow behaviour cloning of
action chunks, acting with one sample of the distilled one-step policy (no critic, no model).

Run it with its Gin file; nothing in macfw changes::

    PYTHONPATH=examples python -m macfw.run --import my_agent --gin_file examples/chunk_bc.gin \
        --gin_file gin/envs/cube-single.gin --workdir runs/chunk_bc
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import macfw
from macfw.agents.base import Agent, AgentState, BatchSpec
from macfw.data.goals import GoalSampling, goal_sampling_for
from macfw.nn.flow import FlowPolicy


@macfw.register("agent")
class ChunkBC(Agent):
    """Behaviour cloning of action chunks with a flow-matching policy (paper §4.2's behaviour policy alone).

    Args:
      policy: registered behaviour-policy class, built as ``policy(spec, key=...)``.
      chunk_len: n, environment steps per chunk.
      learning_rate: Adam step size.
      goal_sampling: hindsight goals of goal-conditioned data (None: the ``GoalSampling.*`` bindings).
    """

    acts_in_chunks = True

    def __init__(
        self,
        policy: Callable = FlowPolicy,
        *,
        chunk_len: int = 10,
        learning_rate: float = 3e-4,
        goal_sampling: GoalSampling | None = None,
    ):
        if chunk_len < 1:
            raise ValueError(
                f"ChunkBC.chunk_len = {chunk_len!r} is out of range: must be >= 1. "
                "Fix the Gin binding ChunkBC.chunk_len."
            )
        self.policy, self.n, self.tx = policy, int(chunk_len), optax.adam(learning_rate)
        self.goal_sampling = goal_sampling_for("ChunkBC", goal_sampling)

    @property
    def batch_spec(self) -> BatchSpec:
        return BatchSpec(chunk_len=self.n, goals=self.goal_sampling)

    def init(self, spec, key) -> AgentState:
        self.spec = spec
        key = jax.random.PRNGKey(key) if isinstance(key, int) else key
        key, k_pol = jax.random.split(key)
        nets = self.policy(spec, key=k_pol)
        return AgentState(
            step=jnp.zeros((), jnp.int32),
            key=key,
            nets=nets,
            opt_state=self.tx.init(eqx.filter(nets, eqx.is_inexact_array)),
        )

    def update(self, state: AgentState, batch):
        key, k_loss = jax.random.split(state.key)
        B = batch["obs"].shape[0]

        def loss_fn(nets):
            loss, m = jax.vmap(lambda s, g, A, k: nets.loss(s, g, A, key=k))(
                batch["obs"], batch["actor_goals"], batch["actions"], jax.random.split(k_loss, B)
            )
            return loss.mean(), {k: v.mean() for k, v in m.items()}

        (_, metrics), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(state.nets)
        updates, opt_state = self.tx.update(grads, state.opt_state, eqx.filter(state.nets, eqx.is_inexact_array))
        nets = eqx.apply_updates(state.nets, updates)
        return AgentState(step=state.step + 1, key=key, nets=nets, opt_state=opt_state), metrics

    def act(self, params, s, g, *, key):
        assert self.spec is not None, "ChunkBC.act before init(spec, key)"
        A = jnp.clip(params.sample(s, g, key=key), -1.0, 1.0)
        return A.reshape(self.n, self.spec.act_dim)
