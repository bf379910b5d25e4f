"""Calibration: the paper's μ/σ band and our false-alarm budget, checked on held-out clean data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.networks import Actor, init_stacked
from forensics.calibration import (
    SIGMA_FLOOR,
    budget_calibration,
    false_alarm_rate,
    fit_normaliser,
    normalise,
    paper_calibration,
)
from forensics.stage1 import Stage1Config, detect_onsets, rolling_mean, stage1_scores


def _clean_like(key, episodes, steps=25, agents=3):
    """Heavy-tailed, agent-correlated, time-smoothed positive scores (like Stage-1 output)."""
    k1, k2 = jax.random.split(key)
    own = jnp.exp(0.7 * jax.random.normal(k1, (episodes, steps, agents)))
    shared = jnp.exp(0.5 * jax.random.normal(k2, (episodes, steps, 1)))
    return rolling_mean(own * shared * jnp.array([1.0, 2.0, 0.5]), 5)


def test_normaliser_matches_numpy_with_floor_and_valid_mask():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, size=(40, 6, 2)).astype(np.float32)
    x[:, 3, 1] = 0.7  # constant column → σ floored
    valid = np.ones((40, 6), bool)
    valid[30:, 4:] = False  # ten short episodes, padded with NaN
    x[30:, 4:] = np.nan
    norm = fit_normaliser(jnp.asarray(x), jnp.asarray(valid))
    for t in range(6):
        rows = valid[:, t]
        np.testing.assert_allclose(norm.mu[t], x[rows, t].mean(0), rtol=1e-5)
        np.testing.assert_allclose(
            norm.sigma[t], np.maximum(x[rows, t].std(0), SIGMA_FLOOR), rtol=1e-4
        )
    np.testing.assert_array_equal(norm.count, [40, 40, 40, 40, 30, 30])
    assert float(norm.sigma[3, 1]) == pytest.approx(SIGMA_FLOOR)


def test_paper_band_flags_exactly_outside_k_sigma():
    rng = np.random.default_rng(1)
    clean = rng.gamma(2.0, size=(100, 10, 3)).astype(np.float32)
    test = rng.gamma(2.0, size=(50, 10, 3)).astype(np.float32) * 1.5
    cal = paper_calibration(jnp.asarray(clean), k=2.0)
    mu, sd = clean.mean(0), clean.std(0)
    outside = np.abs(test - mu) > 2.0 * sd
    t_first = np.where(outside.any(1), outside.argmax(1), -1)
    onsets = detect_onsets(normalise(jnp.asarray(test), cal.norm), cal.threshold)
    # z sits within float rounding of K only with probability ~0; compare decisions directly
    np.testing.assert_array_equal(onsets.t_det, t_first)
    assert cal.kind == "paper" and np.all(np.asarray(cal.watch) == 2.0)


@pytest.mark.parametrize("method,debounce", [("joint", 1), ("joint", 2), ("bonferroni", 1)])
def test_budget_false_alarm_rate_on_held_out_clean_episodes(method, debounce):
    """Calibrated on 4,000 clean episodes, the rate on 20,000 fresh ones is ≈ α (joint) or ≤ α."""
    alpha = 0.05
    clean = _clean_like(jax.random.PRNGKey(0), 4000)
    held_out = _clean_like(jax.random.PRNGKey(1), 20000)
    cal = budget_calibration(clean, alpha, debounce=debounce, method=method)
    fpr = false_alarm_rate(normalise(held_out, cal.norm), cal.threshold, debounce)
    assert cal.calib_fpr <= alpha
    if method == "joint":
        assert abs(fpr - alpha) < 0.012, fpr  # ≈ 3 s.d. of the threshold's sampling error
    else:
        assert 0.5 * alpha / 3 < fpr <= alpha + 0.01, fpr  # union bound: between α/N and α
    # the paper's K = 2 band on the same data: no control at all
    band = paper_calibration(clean, k=2.0)
    assert false_alarm_rate(normalise(held_out, band.norm), band.threshold) > 0.5


def test_budget_on_real_stage1_scores_and_watch_level():
    """End to end on Stage-1 scores of a random actor over random-walk observations."""
    n_agents, obs_dim = 3, 6
    actor = Actor(hidden=(16, 16), action_dim=4, discrete=True)
    params = init_stacked(actor, jax.random.PRNGKey(0), n_agents, jnp.zeros(obs_dim))
    steps = jax.random.normal(jax.random.PRNGKey(1), (2000, 25, n_agents, obs_dim))
    obs = jnp.cumsum(0.3 * steps, axis=1)
    smooth = stage1_scores(actor.apply, params, obs, cfg=Stage1Config()).smooth
    cal = budget_calibration(smooth[:1000], 0.05, watch_quantile=0.9)
    z_held = normalise(smooth[1000:], cal.norm)
    fpr = false_alarm_rate(z_held, cal.threshold)
    assert abs(fpr - 0.05) < 0.035, fpr
    above_watch = np.mean(np.asarray(z_held) > np.asarray(cal.watch), axis=(0, 1))
    np.testing.assert_allclose(above_watch, 0.1, atol=0.03)
    assert np.all(np.asarray(cal.watch) < np.asarray(cal.threshold))


def test_bad_calibration_input_raises_clear_errors():
    clean = _clean_like(jax.random.PRNGKey(2), 30)
    with pytest.raises(ValueError, match="need ≥ 2 to fit μ, σ and ≥ 19"):
        budget_calibration(clean, 0.05)  # 15 threshold episodes cannot support α = 5 %
    with pytest.raises(ValueError, match="alpha"):
        budget_calibration(clean, 1.5)
    with pytest.raises(ValueError, match="method"):
        budget_calibration(clean, 0.2, method="sidak")
    with pytest.raises(ValueError, match="NaN"):
        fit_normaliser(clean.at[0, 0, 0].set(jnp.nan))
    norm = fit_normaliser(clean)
    with pytest.raises(ValueError, match="not covered by the calibration"):
        normalise(jnp.zeros((2, 30, 3)), norm)
    with pytest.raises(ValueError, match="1 NaN/inf values at valid steps"):
        normalise(clean.at[3, 4, 1].set(jnp.inf), norm)
    padded = clean.at[3, 20:].set(jnp.nan)  # NaN only after episode 3 ended: fine
    valid = jnp.ones(clean.shape[:2], bool).at[3, 20:].set(False)
    assert float(jnp.abs(normalise(padded, norm, valid)[3, 20:]).max()) == 0.0


def test_one_sided_normaliser_ignores_the_lower_tail():
    """Clean log-costs with a heavy lower tail (a confident policy: −100…0) and an upper tail
    near 0: one-sided, values are clipped at the clean median before μ, σ, so a value 2 above
    the clean maximum stands out; without the clip σ ≈ 30 would drown it."""
    rng = np.random.default_rng(0)
    clean = np.where(rng.random((400, 5, 2)) < 0.5, -rng.uniform(0, 100, (400, 5, 2)),
                     rng.uniform(-1.0, 0.0, (400, 5, 2))).astype(np.float32)  # fmt: skip
    one = fit_normaliser(jnp.asarray(clean), two_sided=False)
    two = fit_normaliser(jnp.asarray(clean), two_sided=True)
    median = np.median(clean, axis=0)
    np.testing.assert_allclose(one.floor, median, rtol=1e-6)
    clipped = np.maximum(clean, median)
    np.testing.assert_allclose(one.mu, clipped.mean(0), rtol=1e-5)
    np.testing.assert_allclose(one.sigma, clipped.std(0), rtol=1e-4)
    assert np.all(np.isneginf(two.floor))
    attacked = np.full((1, 5, 2), 2.0, np.float32)  # 2 above every clean value
    z_one = normalise(jnp.asarray(attacked), one)
    margin = (z_one[0] - normalise(jnp.asarray(clean), one).max(axis=0)).min()
    unclipped = lambda x: (x - two.mu) / two.sigma  # the same z without the clip
    margin_unclipped = (unclipped(attacked[0]) - unclipped(clean).max(axis=0)).min()
    assert float(margin) > 0.3 and float(margin) > 5 * float(margin_unclipped) > 0
    # below the median, all values are equally unsuspicious
    low = normalise(jnp.asarray(np.stack([median - 50, median - 1])), one)
    np.testing.assert_array_equal(low[0], low[1])
