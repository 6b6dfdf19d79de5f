"""Optional mixed precision: float32 parameters, bfloat16 matrix products (DESIGN §5; issue 3)."""

import jax
import jax.numpy as jnp
import numpy as np

from macfw.nn.mlp import MLP


def test_bfloat16_products_keep_float32_params_and_track_float32_outputs():
    key = jax.random.PRNGKey(0)
    f32 = MLP(12, 4, (64, 64), key=key)
    bf16 = MLP(12, 4, (64, 64), key=key, compute_dtype="bfloat16")
    assert all(lin.weight.dtype == jnp.float32 for lin in bf16.layers)  # parameters stay float32
    x = jax.random.normal(jax.random.PRNGKey(1), (256, 12))
    y32 = jax.vmap(f32)(x)
    y16 = jax.vmap(bf16)(x)
    assert y16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
    assert 0.0 < rel < 3e-2  # bfloat16 rounding is visible but small
    # gradients flow to the float32 parameters
    g = jax.grad(lambda m: jnp.sum(jax.vmap(m)(x) ** 2))(bf16)
    assert np.isfinite(np.asarray(g.layers[0].weight)).all() and g.layers[0].weight.dtype == jnp.float32
