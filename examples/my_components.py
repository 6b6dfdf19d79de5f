"""A user's own component, registered from outside the macfw package (see CONTRIBUTING.md).

Select it with::

    PYTHONPATH=examples python -m macfw.run --import my_components \
        --gin_file gin/mac.gin --gin_file examples/topk.gin --workdir runs/topk
"""

import equinox as eqx
import jax
import jax.numpy as jnp

import macfw
from macfw.samplers import Sampler, candidates


@macfw.register("sampler")
class TopKMeanSampler(Sampler):
    """Average the ``k`` candidates with the highest ``Q(s, g, A)`` instead of taking the argmax.

    ``s: (ob_dim,)``, ``g: (goal_dim,)`` -> ``A: (chunk_dim,)`` in [-1, 1].
    """

    k: int = eqx.field(static=True)
    num_train_candidates: int = eqx.field(static=True)
    num_act_candidates: int = eqx.field(static=True)

    def __init__(self, k: int = 4, num_train_candidates: int = 8, num_act_candidates: int = 32):
        if not 1 <= k <= min(num_train_candidates, num_act_candidates):
            raise ValueError(f"TopKMeanSampler.k must be in [1, number of candidates], got {k}.")
        self.k, self.num_train_candidates, self.num_act_candidates = k, num_train_candidates, num_act_candidates

    def __call__(self, policy, critic, s, g, *, key, acting=False):
        num = self.num_act_candidates if acting else self.num_train_candidates
        cands = candidates(policy, s, g, num, key)
        q = jax.vmap(lambda a: critic(s, g, a))(cands)
        _, top = jax.lax.top_k(q, self.k)
        return jnp.clip(cands[top].mean(axis=0), -1.0, 1.0)
