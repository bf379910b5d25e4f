"""Stage 2: critic geometry by HVPs, the paper's traceback, contagion weights, occupancy."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.networks import Critic, init_stacked
from forensics.stage1 import NO_DETECTION, detect_onsets, patient_zero_candidate
from forensics.stage2 import (
    contagion_weights,
    critic_geometry,
    edge_evidence,
    instability_occupancy,
    step_deviation,
    traceback,
)

N, OBS, ACT = 3, 4, 3


class SmoothCritic(nn.Module):
    """networks.Critic's layout with tanh units: a ReLU critic has zero Hessian a.e."""

    @nn.compact
    def __call__(self, obs: jax.Array, act: jax.Array) -> jax.Array:
        x = jnp.concatenate([obs.reshape(-1), act.reshape(-1)])
        x = nn.tanh(nn.Dense(16)(x))
        x = nn.tanh(nn.Dense(16)(x))
        return nn.Dense(1)(x)[0]


def _batch(key, e=2, t=3):
    k1, k2 = jax.random.split(key)
    obs = jax.random.normal(k1, (e, t, N, OBS))
    act = jax.nn.softmax(jax.random.normal(k2, (e, t, N, ACT)))
    return obs, act


@pytest.mark.parametrize("wrt", ["act", "obs"])
def test_hvp_terms_match_full_hessian_and_finite_differences(wrt):
    """G, D, S, X from one linearisation + HVPs equal a materialised jax.hessian and central FD."""
    with jax.enable_x64(True):
        critic = SmoothCritic()
        params = init_stacked(
            critic, jax.random.PRNGKey(0), N, jnp.zeros((N, OBS)), jnp.zeros((N, ACT))
        )
        params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        obs, act = _batch(jax.random.PRNGKey(1))
        geom = critic_geometry(critic.apply, params, obs, act, wrt=wrt)
        x_all = act if wrt == "act" else obs
        delta = step_deviation(x_all)

        @jax.jit
        def reference(p_j, o, a, d, j):
            q = (
                (lambda x: critic.apply(p_j, o, x))
                if wrt == "act"
                else (lambda x: critic.apply(p_j, x, a))
            )
            x = a if wrt == "act" else o
            g = jax.grad(q)(x)
            hess = jax.hessian(q)(x)  # [N, K, N, K]
            idx = jnp.arange(N)
            h_ii = hess[idx, :, idx, :]  # [i, K, K]
            u_j = g[j] / jnp.linalg.norm(g[j])
            D = -jnp.einsum("ik,ikl,il->i", g, h_ii, g)
            X = jnp.einsum("ik,ikm,m->i", d, hess[:, :, j, :], u_j)  # δ_iᵀ H_ij u_j
            # central second difference of Q along the unit block tangent ĝ_i, times ‖g_i‖²:
            # −‖g_i‖² d²/ds² Q(x + s ĝ_i) = −g_iᵀ H_ii g_i
            h = 1e-3
            g_norm = jnp.linalg.norm(g, axis=-1)
            v = jnp.eye(N)[:, :, None] * (g / g_norm[:, None])[None]  # [i, N, K]
            q_pm = jax.vmap(lambda vi: q(x + h * vi) - 2 * q(x) + q(x - h * vi))(v)
            return g_norm, D, jnp.sum(g * d, -1), X, -(g_norm**2) * q_pm / h**2

        for e in range(obs.shape[0]):
            for t in range(obs.shape[1]):
                for j in range(N):
                    p_j = jax.tree.map(lambda x, j=j: x[j], params)
                    G, D, S, X, D_fd = reference(p_j, obs[e, t], act[e, t], delta[e, t], j)
                    np.testing.assert_allclose(geom.G[e, t, j], G, rtol=1e-10)
                    np.testing.assert_allclose(geom.D[e, t, j], D, rtol=1e-8, atol=1e-14)
                    np.testing.assert_allclose(geom.S[e, t, j], S, rtol=1e-8, atol=1e-14)
                    np.testing.assert_allclose(geom.X[e, t, j], X, rtol=1e-8, atol=1e-14)
                    np.testing.assert_allclose(geom.D[e, t, j], D_fd, rtol=1e-5)
    assert float(jnp.abs(geom.D).max()) > 1e-6 and float(jnp.abs(geom.X).max()) > 1e-6


def test_relu_critic_gradient_is_right_and_its_curvature_is_exactly_zero():
    """networks.Critic (ReLU) is piecewise linear: G matches central FD, D and X vanish."""
    with jax.enable_x64(True):
        critic = Critic(hidden=(16, 16))
        params = init_stacked(
            critic, jax.random.PRNGKey(2), N, jnp.zeros((N, OBS)), jnp.zeros((N, ACT))
        )
        params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        obs, act = _batch(jax.random.PRNGKey(3), e=1, t=2)
        geom = critic_geometry(critic.apply, params, obs, act)

        @jax.jit
        def fd_grad_norms(p_j, o, a, h=1e-6):
            basis = jnp.eye(N * ACT).reshape(N * ACT, N, ACT)
            q = lambda x: critic.apply(p_j, o, x)
            dq = jax.vmap(lambda b: (q(a + h * b) - q(a - h * b)) / (2 * h))(basis)
            return jnp.linalg.norm(dq.reshape(N, ACT), axis=-1)

        for t in range(2):
            for j in range(N):
                p_j = jax.tree.map(lambda x, j=j: x[j], params)
                np.testing.assert_allclose(
                    geom.G[0, t, j], fd_grad_norms(p_j, obs[0, t], act[0, t]), rtol=1e-6
                )
    assert float(jnp.abs(geom.G).min()) > 0
    assert float(jnp.abs(geom.D).max()) == 0.0 and float(jnp.abs(geom.X).max()) == 0.0


# --------------------------------------------------------------------------- known chains

T_CHAIN = 12


def quadratic_critic(params_j, obs, act):
    """Q_j = Σ_i c_ji ‖a_i − b_i‖², c_ji = obs[j, i] (j from the one-hot params_j["me"]).

    Curvature of −Q_j in a_i: D_ji = −8 c_ji³ ‖a_i − b_i‖², positive iff c_ji < 0; G_ji =
    2|c_ji| ‖a_i − b_i‖. The episode's observations therefore set the influence structure.
    """
    c = params_j["me"] @ obs[:, : obs.shape[0]]
    return jnp.sum(c * jnp.sum((act - params_j["b"]) ** 2, axis=-1))


def _chain_system():
    """Five episodes, three agents; returns (obs, act, z) with their intended answers."""
    coef = np.full((5, T_CHAIN, N, N), 0.5)  # [e, t, j, i] = c_ji
    coef[0, :, 1, 0] = -1.0  # 0 → 1
    coef[0, :, 2, 1] = -1.0  # 1 → 2 ...
    coef[0, [3, 5], 2, 1] = 0.5  # ... on 3 of the 5 window steps (rate 0.6)
    coef[2, :, 2, 0] = -2.0  # 0 → 2 and 1 → 2 both at rate 1; 0 has the larger G
    coef[2, :, 2, 1] = -1.0
    coef[3, :, 2, 1] = -1.0  # a cycle 1 ⇄ 2
    coef[3, :, 1, 2] = -1.0
    obs = np.zeros((5, T_CHAIN, N, OBS))
    obs[..., :N] = coef
    act = np.asarray(jax.nn.one_hot(np.arange(5 * T_CHAIN * N).reshape(5, T_CHAIN, N) % ACT, ACT))
    z = np.zeros((5, T_CHAIN, N))
    z[:4, 6, 2] = 5.0  # agent 2 (downstream) crosses first at t = 6 ...
    z[:4, 8:, 1] = 5.0  # ... agent 1 later; agent 0 (the source) never does
    return jnp.asarray(obs), jnp.asarray(act), jnp.asarray(z)


def test_traceback_walks_a_downstream_first_flag_back_to_the_source():
    obs, act, z = _chain_system()
    params = {"me": jnp.eye(N), "b": jnp.zeros((N, N, ACT))}
    onsets = detect_onsets(z, 2.0)
    candidate, t_det = patient_zero_candidate(onsets.t_det, onsets.z_at_det)
    np.testing.assert_array_equal(candidate, [2, 2, 2, 2, NO_DETECTION])  # downstream-first
    np.testing.assert_array_equal(t_det, [6, 6, 6, 6, NO_DETECTION])

    geom = critic_geometry(quadratic_critic, params, obs, act)
    ev = edge_evidence(geom, t_det, window=5)
    np.testing.assert_allclose(ev.rate[0, 2, 1], 0.6)
    np.testing.assert_allclose(ev.rate[0, 1, 0], 1.0)
    np.testing.assert_array_equal(ev.steps, [5, 5, 5, 5, 0])
    tb = traceback(ev, candidate)

    np.testing.assert_array_equal(tb.patient_zero, [0, 2, 0, 1, NO_DETECTION])
    np.testing.assert_array_equal(
        tb.chain,
        [[2, 1, 0], [2, -1, -1], [2, 0, -1], [2, 1, -1], [-1, -1, -1]],
    )
    np.testing.assert_array_equal(tb.hops, [2, 0, 1, 1, 0])


def test_contagion_weights_and_occupancy_match_their_definitions():
    rng = np.random.default_rng(0)
    G = rng.normal(size=(3, 9, N, N))
    t_det = np.array([2, -1, 8])
    C = np.asarray(contagion_weights(jnp.asarray(G), jnp.asarray(t_det), decay=0.3))
    for e in range(3):
        for t in range(9):
            want = (
                sum(
                    np.exp(-0.3 * (tau - t_det[e])) * np.abs(G[e, tau])
                    for tau in range(t_det[e], t + 1)
                )
                if t_det[e] >= 0
                else 0.0
            )
            np.testing.assert_allclose(C[e, t], want * np.ones((N, N)), rtol=1e-5, atol=1e-7)

    z = rng.normal(size=(3, 9, N))
    watch = np.array([0.0, 0.5, -0.5])
    io = np.asarray(instability_occupancy(jnp.asarray(z), jnp.asarray(watch), jnp.asarray(t_det)))
    for e in range(3):
        steps = [t for t in range(t_det[e] - 4, t_det[e] + 1) if t >= 0] if t_det[e] >= 0 else []
        want = np.mean(z[e, steps] > watch, axis=0) if steps else np.zeros(N)
        np.testing.assert_allclose(io[e], want)


def test_bad_shapes_raise_clear_errors():
    params = {"me": jnp.eye(N), "b": jnp.zeros((N, N, ACT))}
    with pytest.raises(ValueError, match="matching E, T, N"):
        critic_geometry(
            quadratic_critic, params, jnp.zeros((1, 2, N, OBS)), jnp.zeros((1, 3, N, ACT))
        )
    with pytest.raises(ValueError, match="wrt"):
        critic_geometry(
            quadratic_critic,
            params,
            jnp.zeros((1, 2, N, OBS)),
            jnp.zeros((1, 2, N, ACT)),
            wrt="state",
        )
