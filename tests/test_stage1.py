"""Stage 1: the Taylor remainder, the probes, the vectorised score, smoothing and onsets."""

from __future__ import annotations

from collections import deque
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.networks import Actor, init_stacked
from forensics.stage1 import (
    NO_DETECTION,
    Stage1Config,
    commitment_cost,
    commitment_target,
    detect_onsets,
    patient_zero_candidate,
    quadratic_forms,
    rolling_mean,
    stage1_scores,
    taylor_remainders,
)

N, OBS, ACT = 3, 8, 5


def _actor(discrete: bool) -> Actor:
    return Actor(hidden=(32, 32), action_dim=ACT, discrete=discrete)


def _stacked(discrete: bool, seed: int = 0):
    return init_stacked(_actor(discrete), jax.random.PRNGKey(seed), N, jnp.zeros(OBS))


@pytest.mark.parametrize("discrete", [True, False])
def test_remainder_over_norm_squared_converges_to_half_curvature(discrete):
    """L(εu)/ε² → ½ uᵀ∇²J u with error O(ε) (checked against a full jax.hessian, float64)."""
    actor = _actor(discrete)
    eps = np.array([1e-2, 3e-3, 1e-3, 3e-4])  # ≤ 1e-2 stays inside one linear region of ReLU

    @jax.jit
    def measure(params, o, u, eps):
        avail = jnp.ones(ACT, bool)
        tau = commitment_target(actor.apply, params, o, avail, discrete)
        cost = lambda x: commitment_cost(actor.apply, params, x, tau, avail, discrete, 0.5)
        half_curv = 0.5 * u @ jax.hessian(cost)(o) @ u
        ratios = taylor_remainders(cost, o, eps[:, None] * u[None]) / eps**2
        return half_curv, quadratic_forms(cost, o, u[None])[0], ratios

    with jax.enable_x64(True):
        params = jax.tree.map(
            lambda x: x.astype(jnp.float64), actor.init(jax.random.PRNGKey(0), jnp.zeros(OBS))
        )
        o = jax.random.normal(jax.random.PRNGKey(1), (OBS,))
        u = jax.random.normal(jax.random.PRNGKey(2), (OBS,))
        half_curv, quad, ratios = measure(params, o, u / jnp.linalg.norm(u), jnp.asarray(eps))
    assert abs(half_curv) > 1e-4  # a non-degenerate check
    np.testing.assert_allclose(quad, half_curv, rtol=1e-10)
    err = np.abs(np.asarray(ratios) - half_curv)
    assert np.all(np.diff(err) < 0), err
    rates = err[:-1] / err[1:]  # third-order remainder: error ∝ ε
    assert np.all((rates > 0.5 * eps[:-1] / eps[1:]) & (rates < 2 * eps[:-1] / eps[1:])), rates
    assert err[-1] / abs(half_curv) < 1e-4


@partial(jax.jit, static_argnums=0)
def _paper_reference(apply, params_i, o, avail, eps=0.01):
    """The paper's code, written out independently: log π(a*|o), sign probe, |remainder|."""
    logp = lambda x: jax.nn.log_softmax(jnp.where(avail, apply(params_i, x), -1e9))
    a_star = jnp.argmax(jnp.where(avail, apply(params_i, o), -jnp.inf))
    f = lambda x: logp(x)[a_star]
    g = jax.grad(f)(o)
    eta = eps * jnp.sign(g) / jnp.maximum(jnp.linalg.norm(g), 1e-6)
    return jnp.abs(f(o + eta) - (f(o) + g @ eta))


def test_vectorised_paper_score_matches_per_sample_reference():
    """One jitted call over [E, T, N] equals the per-(e, t, i) computation with agent i's params."""
    actor, params = _actor(True), _stacked(True)
    E, T = 2, 2
    obs = jax.random.normal(jax.random.PRNGKey(3), (E, T, N, OBS))
    avail = jax.random.bernoulli(jax.random.PRNGKey(4), 0.7, (E, T, N, ACT)).at[..., 0].set(True)
    scores = stage1_scores(actor.apply, params, obs, avail, cfg=Stage1Config())
    ref = np.zeros((E, T, N))
    params, obs, avail = jax.tree.map(np.asarray, (params, obs, avail))  # cheap slicing below
    for e in range(E):
        for t in range(T):
            for i in range(N):
                p_i = jax.tree.map(lambda x, i=i: x[i], params)
                ref[e, t, i] = _paper_reference(actor.apply, p_i, obs[e, t, i], avail[e, t, i])
    np.testing.assert_allclose(scores.raw, ref, rtol=2e-3, atol=1e-8)
    assert ref.std() > 0  # agents and steps really differ


def test_cost_of_the_taken_action_is_its_surprise_and_greedy_logs_match_the_paper_target():
    """probe=cost, target=taken: J = −log π(a_taken|o); on greedy logs it equals target=greedy,
    and the agent whose logged action is its policy's worst pays the most."""
    actor, params = _actor(True), _stacked(True)
    obs = jax.random.normal(jax.random.PRNGKey(5), (2, 3, N, OBS))
    logits = jax.vmap(
        jax.vmap(jax.vmap(actor.apply, in_axes=(0, 0)), in_axes=(None, 0)), in_axes=(None, 0)
    )(params, obs)  # [E, T, N, A]
    greedy, worst = jnp.argmax(logits, -1), jnp.argmin(logits, -1)
    taken = greedy.at[:, 1, 2].set(worst[:, 1, 2])  # agent 2 acts worst at step 1
    cost = partial(stage1_scores, actor.apply, params, obs, cfg=Stage1Config(probe="cost"))
    as_greedy = cost()
    as_taken = stage1_scores(
        actor.apply, params, obs, None, None, taken, cfg=Stage1Config(probe="cost", target="taken")
    )
    logp = jax.nn.log_softmax(logits)
    expected = -jnp.take_along_axis(logp, taken[..., None], -1)[..., 0]
    np.testing.assert_allclose(as_taken.raw, expected, rtol=1e-5, atol=1e-6)
    same = np.ones((2, 3, N), bool)
    same[:, 1, 2] = False
    np.testing.assert_allclose(
        np.asarray(as_taken.raw)[same], np.asarray(as_greedy.raw)[same], rtol=1e-5, atol=1e-6
    )
    assert (as_taken.raw[:, 1, 2] > as_greedy.raw[:, 1, 2] + 1e-3).all()
    with pytest.raises(ValueError, match="target=taken needs the logged actions"):
        stage1_scores(actor.apply, params, obs, cfg=Stage1Config(target="taken"))


def test_random_probes_average_to_trace_of_curvature():
    """Mean |L|/ε² over many random unit probes → ½ tr(∇²J)/O (∇²J is PSD for a ReLU actor).

    Finite probes in float64 (in float32 |L| ~ 1e-8 at ε = 1e-3 drowns in rounding), and the
    exact ε → 0 form in the default float32.
    """
    actor = _actor(True)
    obs = jax.random.normal(jax.random.PRNGKey(5), (1, 1, N, OBS))
    finite = Stage1Config(probe="curvature", gradient_probe=False, num_random=4096, eps=1e-3)
    exact = Stage1Config(
        probe="curvature", gradient_probe=False, num_random=4096, exact_quadratic=True
    )
    key = jax.random.PRNGKey(6)
    params = _stacked(True, seed=1)
    got_exact = stage1_scores(actor.apply, params, obs, key=key, cfg=exact).raw[0, 0]
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        got_finite = stage1_scores(
            actor.apply, params64, obs.astype(jnp.float64), key=key, cfg=finite
        ).raw[0, 0]
    for i in range(N):
        p_i = jax.tree.map(lambda x, i=i: x[i], params)
        o = obs[0, 0, i]
        tau = commitment_target(actor.apply, p_i, o, jnp.ones(ACT, bool), True)
        hess = jax.hessian(
            lambda x, p_i=p_i, tau=tau: commitment_cost(
                actor.apply, p_i, x, tau, jnp.ones(ACT, bool), True
            )
        )(o)
        want = 0.5 * jnp.trace(hess) / OBS
        np.testing.assert_allclose(got_exact[i], want, rtol=0.06)
        np.testing.assert_allclose(got_finite[i], want, rtol=0.06)


def test_continuous_gradient_probe_follows_top_singular_direction():
    """Continuous: ∇J ≡ 0 at τ = μ(o); the probe uses the top singular direction of ∂μ/∂o."""
    actor, params = _actor(False), _stacked(False, seed=2)
    obs = jax.random.normal(jax.random.PRNGKey(7), (1, 1, N, OBS))
    sigma = 0.5
    cfg = Stage1Config(discrete=False, probe="curvature", eps=1e-3, sigma=sigma, power_iters=50)
    raw = stage1_scores(actor.apply, params, obs, cfg=cfg).raw[0, 0]
    for i in range(N):
        p_i = jax.tree.map(lambda x, i=i: x[i], params)
        s_max = jnp.linalg.svd(
            jax.jacfwd(lambda x, p_i=p_i: actor.apply(p_i, x))(obs[0, 0, i]), compute_uv=False
        )[0]
        np.testing.assert_allclose(raw[i], 0.5 * s_max**2 / sigma**2, rtol=1e-2)


def test_rolling_mean_matches_the_papers_deque():
    x = np.random.default_rng(0).random((2, 9, 3)).astype(np.float32)
    for window in (1, 5, 12):
        ref = np.zeros_like(x)
        for e in range(2):
            for i in range(3):
                d: deque = deque(maxlen=window)
                for t in range(9):
                    d.append(x[e, t, i])
                    ref[e, t, i] = np.mean(d)
        np.testing.assert_allclose(rolling_mean(jnp.asarray(x), window), ref, rtol=1e-5)


def test_onsets_debounce_valid_and_no_detection():
    z = np.zeros((3, 8, 2), np.float32)
    z[0, [2, 4, 5], 0] = 5.0  # single spike at 2, run of two from 4
    z[0, 6, 1] = 5.0
    z[1, 7, 0] = 5.0  # only after the episode ended (valid stops at 6)
    valid = np.ones((3, 8), bool)
    valid[1, 7] = False
    one = detect_onsets(jnp.asarray(z), 2.0, jnp.asarray(valid))
    np.testing.assert_array_equal(one.t_det, [[2, 6], [NO_DETECTION] * 2, [NO_DETECTION] * 2])
    two = detect_onsets(jnp.asarray(z), jnp.array([2.0, 2.0]), debounce=2)
    np.testing.assert_array_equal(two.onset[0], [4, NO_DETECTION])
    np.testing.assert_array_equal(two.t_det[0], [5, NO_DETECTION])
    np.testing.assert_allclose(two.z_at_det[0], [5.0, 0.0])
    np.testing.assert_array_equal(two.t_det[1], [NO_DETECTION, NO_DETECTION])  # valid=None


def test_patient_zero_candidate_earliest_then_largest_exceedance():
    t_det = jnp.array([[4, 2, 2], [-1, -1, -1], [-1, 7, 3]])
    tie = jnp.array([[9.0, 1.0, 3.0], [5.0, 5.0, 5.0], [0.0, 9.0, 0.5]])
    agent, t = patient_zero_candidate(t_det, tie)
    np.testing.assert_array_equal(agent, [2, NO_DETECTION, 2])
    np.testing.assert_array_equal(t, [2, NO_DETECTION, 3])


def test_bad_config_and_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="probe"):
        Stage1Config(probe="hessian")
    with pytest.raises(ValueError, match="curvature probe needs"):
        Stage1Config(probe="curvature", gradient_probe=False)
    actor, params = _actor(True), _stacked(True)
    with pytest.raises(ValueError, match=r"obs: expected \[E, T, N, O\]"):
        stage1_scores(actor.apply, params, jnp.zeros((2, N, OBS)), cfg=Stage1Config())
    with pytest.raises(ValueError, match="PRNG key"):
        stage1_scores(
            actor.apply,
            params,
            jnp.zeros((1, 1, N, OBS)),
            cfg=Stage1Config(probe="curvature", num_random=2),
        )
