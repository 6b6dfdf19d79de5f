"""Lambda-returns of an imagined rollout (DESIGN §2.4 step 3)."""

from __future__ import annotations

import numpy as np
import pytest

from macfw.agents.mac import lambda_returns

# H = 3 chunk steps, a terminal (mask 0) in the middle.
R = np.array([1.0, 2.0, 3.0], np.float32)
M = np.array([1.0, 0.0, 1.0], np.float32)
V = np.array([10.0, 20.0, 30.0, 40.0], np.float32)  # V'(s_0..s_3)
GAMMA = 0.5


@pytest.mark.parametrize(
    "lam,expected",
    [
        # lam = 1: G_2 = r_2 + G V_3 = 3 + 20 = 23; G_1 = r_1 (masked) = 2; G_0 = r_0 + G * G_1 = 1 + 1 = 2
        (1.0, [2.0, 2.0, 23.0]),
        # lam = .5: G_0 = r_0 + G ((1 - lam) V_1 + lam G_1) = 1 + .5 (10 + 1) = 6.5; G_1, G_2 as above
        (0.5, [6.5, 2.0, 23.0]),
        # lam = 0 (one-step TD): G_k = r_k + G m_k V_{k+1}
        (0.0, [11.0, 2.0, 23.0]),
    ],
)
def test_hand_computed(lam, expected):
    out = np.asarray(lambda_returns(R, M, V, discount=GAMMA, lam=lam))
    assert out.shape == (3,)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # same numbers with a batch axis (H, B)
    out_b = np.asarray(
        lambda_returns(
            R[:, None].repeat(2, 1), M[:, None].repeat(2, 1), V[:, None].repeat(2, 1), discount=GAMMA, lam=lam
        )
    )
    np.testing.assert_allclose(out_b, np.asarray(expected)[:, None].repeat(2, 1), rtol=1e-6)


def _reference(r, m, v, discount, lam):
    """Recursive definition: G_k = r_k + discount m_k ((1 - lam) V_{k+1} + lam G_{k+1}), G_H = V_H."""
    H = r.shape[0]
    G = np.zeros_like(r, dtype=np.float64)
    nxt = v[H].astype(np.float64)
    for k in reversed(range(H)):
        G[k] = r[k] + discount * m[k] * ((1.0 - lam) * v[k + 1] + lam * nxt)
        nxt = G[k]
    return G


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.95, 1.0])
def test_matches_python_loop(lam):
    rng = np.random.default_rng(int(lam * 100))
    H, B = 7, 5
    r = rng.normal(size=(H, B)).astype(np.float32)
    m = (rng.random((H, B)) > 0.3).astype(np.float32)
    v = rng.normal(size=(H + 1, B)).astype(np.float32)
    discount = 0.9**5
    out = np.asarray(lambda_returns(r, m, v, discount=discount, lam=lam))
    assert out.shape == (H, B)
    np.testing.assert_allclose(out, _reference(r, m, v, discount, lam), rtol=1e-5, atol=1e-5)


def test_monte_carlo_returns_equal_lambda_returns_at_lambda_one_from_the_last_value_alone():
    """Issue 12's ``lambda_one`` speed-up: at ``lambda = 1`` the returns need only ``V'(s_H)``; they
    equal :func:`lambda_returns` whatever the intermediate values, terminals included."""
    from macfw.agents.mac import monte_carlo_returns

    rng = np.random.default_rng(3)
    H, B = 6, 4
    r = rng.normal(size=(H, B)).astype(np.float32)
    m = (rng.random((H, B)) > 0.4).astype(np.float32)
    v = rng.normal(size=(H + 1, B)).astype(np.float32) * 10
    discount = 0.99**10
    out = np.asarray(monte_carlo_returns(r, m, v[-1], discount=discount))
    assert out.shape == (H, B)
    np.testing.assert_allclose(
        out, np.asarray(lambda_returns(r, m, v, discount=discount, lam=1.0)), rtol=1e-5, atol=1e-5
    )
    # other intermediate values: the same returns (they cancel); another last value: different ones
    v2 = v.copy()
    v2[:-1] = rng.normal(size=(H, B)) * 100
    np.testing.assert_allclose(
        out, np.asarray(lambda_returns(r, m, v2, discount=discount, lam=1.0)), rtol=1e-4, atol=1e-4
    )
    assert not np.allclose(out, np.asarray(monte_carlo_returns(r, m, v[-1] + 1.0, discount=discount)))
    # hand computed (the case above): G_2 = 3 + .5 * 40 = 23, G_1 = 2, G_0 = 1 + .5 * 2 = 2
    np.testing.assert_allclose(
        np.asarray(monte_carlo_returns(R, M, V[-1], discount=GAMMA)), [2.0, 2.0, 23.0], rtol=1e-6
    )
