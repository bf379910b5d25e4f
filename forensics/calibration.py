"""Thresholds for the Stage-1 statistic, fitted on clean episodes only.

Both calibrations normalise a statistic x (normally the smoothed Stage-1 score) per agent i
and step t with clean-episode moments,

  z_{e,t,i} = |x_{e,t,i} − μ_{t,i}| / σ_{t,i}      (two-sided, the paper's band)
           or (x_{e,t,i} − μ_{t,i}) / σ_{t,i}      (one-sided: only growth is suspicious)

with σ floored at 1e-6, and flag agent i at t when z > c_i (see stage1.detect_onsets).

One-sided (ours): only growth is evidence, so clean values below the clean median m_{t,i} carry
none, yet a heavy lower tail would dominate σ — e.g. the log-cost of a near-deterministic
policy's greedy action spans −100…0 on clean steps, σ ≈ 30, and an attacked step 2 log-units
above the clean maximum is then 0.07σ away. So the one-sided normaliser clips from below at
the clean median first: x' = max(x, m_{t,i}), μ and σ are the moments of the clipped clean x',
and z = (max(x, m) − μ)/σ. Two-sided (the paper's band) uses x unclipped.

* **paper** — μ, σ over the clean rollouts (population std), c_i = K for every agent
  (K = 2 MADDPG, 3 HATRPO). No control of the false-alarm rate.
* **budget** (ours) — a per-episode false-alarm budget α: choose c_i so that the share of clean
  episodes with *any* flag (any agent, any step, after debouncing) is at most α. The clean set is
  split: the first ``fit_fraction`` fixes μ, σ; the rest ("threshold split", n episodes) fixes c.
  Per episode and agent, m_{e,i} = max_t min_{s∈(t−k, t]} z_{e,s,i} is the largest level that a
  k-debounced detector would still cross, so episode e raises a flag iff ∃i: m_{e,i} > c_i.
  With S_i the ascending order statistics of m_{·,i} and a common rank r, c_i = S_i[r].
  ``joint``: the smallest common rank whose *joint* flag count F satisfies (F + 1)/(n + 1) ≤ α
  (the split-conformal correction, so a fresh exchangeable clean episode is flagged with
  probability ≈ α, not the in-sample F/n). ``bonferroni``: each agent alone
  at α/N (valid for any dependence, conservative when agents co-vary).
  The watch level (for instability occupancy) is the per-agent ``watch_quantile`` of clean
  per-step z — a lower bar that a clean agent exceeds on 1 − watch_quantile of its steps.

Shapes: E_c clean episodes, T steps, N agents. ``valid`` [E, T] bool marks real steps
(episodes of different lengths padded to T); None means every step is real.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import struct

from forensics.stage1 import detect_onsets

SIGMA_FLOOR = 1e-6


@struct.dataclass
class Normaliser:
    mu: jax.Array  # [T, N]
    sigma: jax.Array  # [T, N] (≥ SIGMA_FLOOR)
    floor: jax.Array  # [T, N] clip level of x: the clean median (one-sided), −inf (two-sided)
    count: jax.Array  # [T] clean episodes that reach step t
    two_sided: bool = struct.field(pytree_node=False, default=True)


@struct.dataclass
class Calibration:
    """What detection needs: z = normalise(x, norm); flag z > threshold; watch for occupancy."""

    norm: Normaliser
    threshold: jax.Array  # [N]
    watch: jax.Array  # [N] lower watch level on z (instability occupancy)
    kind: str = struct.field(pytree_node=False, default="paper")  # "paper" | "budget"
    debounce: int = struct.field(pytree_node=False, default=1)
    alpha: float | None = struct.field(pytree_node=False, default=None)
    calib_fpr: float | None = struct.field(pytree_node=False, default=None)  # in-sample, ≤ α


def _check_stat(x: jax.Array, name: str) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name}: expected [E, T, N], got shape {x.shape}")


def _valid_or_all(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    if valid is None:
        return jnp.ones(x.shape[:2], bool)
    if valid.shape != x.shape[:2]:
        raise ValueError(f"valid: expected shape {x.shape[:2]}, got {valid.shape}")
    return valid


def fit_normaliser(
    clean: jax.Array, valid: jax.Array | None = None, *, two_sided: bool = True
) -> Normaliser:
    """Per-(step, agent) mean and population std of ``clean`` [E_c, T, N] over valid episodes,
    of the values clipped from below at their median when one-sided (module docstring)."""
    _check_stat(clean, "clean calibration scores")
    valid = _valid_or_all(clean, valid)
    if not bool(jnp.all(jnp.isfinite(clean) | ~valid[..., None])):
        raise ValueError("clean calibration scores: contain NaN or inf at valid steps")
    floor = jnp.full(clean.shape[1:], -jnp.inf, clean.dtype)
    if not two_sided:
        median = jnp.nanmedian(jnp.where(valid[..., None], clean, jnp.nan), axis=0)
        floor = jnp.where(jnp.isfinite(median), median, -jnp.inf)  # no clean episode: no clip
        clean = jnp.maximum(clean, floor)
    w = valid.astype(clean.dtype)[..., None]
    clean = jnp.where(valid[..., None], clean, 0.0)
    count = jnp.sum(w[..., 0], axis=0)
    n = jnp.maximum(count, 1.0)[:, None]
    mu = jnp.sum(w * clean, axis=0) / n
    var = jnp.sum(w * (clean - mu) ** 2, axis=0) / n
    return Normaliser(
        mu, jnp.maximum(jnp.sqrt(var), SIGMA_FLOOR), floor, count.astype(jnp.int32), two_sided
    )


def normalise(
    x: jax.Array, norm: Normaliser, valid: jax.Array | None = None, min_count: int = 2
) -> jax.Array:
    """z [E, T, N] of ``x`` [E, T, N]; z = 0 at invalid steps and at steps with < ``min_count``
    clean episodes. A NaN/inf at a valid step is an error, never a silent "no flag"."""
    _check_stat(x, "scores")
    valid = _valid_or_all(x, valid)
    bad = int(jnp.sum(~jnp.isfinite(x) & valid[..., None]))
    if bad:
        raise ValueError(f"scores: {bad} NaN/inf values at valid steps")
    t_cal, n_cal = norm.mu.shape
    if x.shape[1] > t_cal or x.shape[2] != n_cal:
        raise ValueError(
            f"scores: shape {x.shape} is not covered by the calibration (T ≤ {t_cal}, N = {n_cal})"
        )
    return standardise(x, norm, valid, min_count)


def standardise(x: jax.Array, norm: Normaliser, valid: jax.Array, min_count: int = 2) -> jax.Array:
    """``normalise`` without its checks (traceable: no host sync): for callers that have
    already removed non-finite episodes from ``valid`` and fixed the shapes."""
    t = x.shape[1]
    dev = jnp.maximum(x, norm.floor[:t]) - norm.mu[:t]
    z = (jnp.abs(dev) if norm.two_sided else dev) / norm.sigma[:t]
    ok = (norm.count[:t] >= min_count)[None, :, None] & valid[..., None]
    return jnp.where(ok, z, 0.0)


def paper_calibration(clean: jax.Array, k: float, valid: jax.Array | None = None) -> Calibration:
    """The paper's band: flag when |x − μ_{t,i}| > K σ_{t,i}; watch level = K as well."""
    norm = fit_normaliser(clean, valid, two_sided=True)
    level = jnp.full(clean.shape[2], k, clean.dtype)
    return Calibration(norm, level, level, kind="paper")


@partial(jax.jit, static_argnames=("debounce",))
def debounced_max(z: jax.Array, valid: jax.Array, debounce: int) -> jax.Array:
    """m [E, N] = max over t of min(z over the ``debounce`` steps ending at t), valid runs only."""
    z = jnp.where(valid[..., None], z, -jnp.inf)
    pad = jnp.full((z.shape[0], debounce - 1, z.shape[2]), -jnp.inf, z.dtype)
    zp = jnp.concatenate([pad, z], axis=1)
    t = z.shape[1]
    run_min = jnp.min(jnp.stack([zp[:, s : s + t] for s in range(debounce)]), axis=0)
    return jnp.max(run_min, axis=1)


def _threshold_at_budget(m: jax.Array, budget: int, joint: bool) -> jax.Array:
    """Per-agent thresholds c [N] from debounced maxima m [n, N] flagging ≤ ``budget`` episodes.

    With S_i = sort(m[:, i]) and cnt_{e,i} = #{k : S_i[k] < m_{e,i}}, the threshold S_i[r] flags
    (e, i) iff cnt_{e,i} > r. Joint: episode e is flagged at common rank r iff max_i cnt_{e,i} > r,
    so the smallest admissible r is the (budget+1)-th largest of max_i cnt. Bonferroni: the same
    per agent on cnt_{·,i}.
    """
    s = jnp.sort(m, axis=0)
    cnt = jax.vmap(lambda col, x: jnp.searchsorted(col, x, side="left"), in_axes=1, out_axes=1)(
        s, m
    )
    by = jnp.max(cnt, axis=1, keepdims=True) if joint else cnt
    rank = -jnp.sort(-by, axis=0)[budget]  # [1] or [N]
    rank = jnp.broadcast_to(rank, (m.shape[1],))
    return s[rank, jnp.arange(m.shape[1])]


def budget_calibration(
    clean: jax.Array,
    alpha: float,
    *,
    debounce: int = 1,
    fit_fraction: float = 0.5,
    watch_quantile: float = 0.9,
    two_sided: bool = True,
    method: str = "joint",
    valid: jax.Array | None = None,
    norm: Normaliser | None = None,
) -> Calibration:
    """Per-agent thresholds with an episode-level false-alarm budget α (see module doc).

    ``norm``: a fixed normaliser (e.g. ``identity_normaliser`` for a statistic that is
    already a residual against its own reference); then no μ, σ are fitted and every clean
    episode sets the threshold."""
    _check_stat(clean, "clean calibration scores")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"forensics.calibration.alpha: expected in (0, 1), got {alpha}")
    if method not in ("joint", "bonferroni"):
        raise ValueError(
            f"forensics.calibration.method: expected 'joint' or 'bonferroni', got {method!r}"
        )
    valid = _valid_or_all(clean, valid)
    e_c, _, n_agents = clean.shape
    n_fit = int(round(fit_fraction * e_c)) if norm is None else 0
    n_thr = e_c - n_fit
    level = alpha / n_agents if method == "bonferroni" else alpha
    need = math.ceil(1.0 / level) - 1  # smallest n with (0 + 1)/(n + 1) ≤ level
    if (norm is None and n_fit < 2) or n_thr < need:
        raise ValueError(
            f"clean calibration set: {e_c} episodes split {n_fit}/{n_thr}; need ≥ 2 "
            f"to fit μ, σ and ≥ {need} to set a {method} threshold at α = {alpha}"
        )
    if norm is None:
        norm = fit_normaliser(clean[:n_fit], valid[:n_fit], two_sided=two_sided)
    v = valid[n_fit:]
    z = normalise(clean[n_fit:], norm, v)
    m = debounced_max(z, v, debounce)  # [n, N]
    budget = math.floor(level * (n_thr + 1) + 1e-9) - 1  # largest F with (F + 1)/(n + 1) ≤ level
    threshold = _threshold_at_budget(m, budget, joint=method == "joint")
    fpr = float(jnp.mean(jnp.any(m > threshold, axis=1)))
    zv = jnp.where(v[..., None], z, jnp.nan).reshape(-1, n_agents)
    watch = jnp.nanquantile(zv, watch_quantile, axis=0)
    return Calibration(
        norm, threshold, watch, kind="budget", debounce=debounce, alpha=alpha, calib_fpr=fpr
    )


def identity_normaliser(num_steps: int, num_agents: int, two_sided: bool = False) -> Normaliser:
    """z = x (μ = 0, σ = 1, no clip): for a statistic already referenced per (seed, step, agent),
    e.g. a residual against the same seed's clean replays, where a per-step σ fitted on a
    few clean episodes of other seeds would only re-inject their heavy tails."""
    shape = (num_steps, num_agents)
    return Normaliser(
        jnp.zeros(shape), jnp.ones(shape), jnp.full(shape, -jnp.inf),
        jnp.full((num_steps,), jnp.iinfo(jnp.int32).max, jnp.int32), two_sided,
    )  # fmt: skip


def false_alarm_rate(
    z: jax.Array, threshold: jax.Array, debounce: int = 1, valid: jax.Array | None = None
) -> float:
    """Share of episodes in ``z`` [E, T, N] with any confirmed flag (evaluate on held-out clean)."""
    onsets = detect_onsets(z, threshold, valid, debounce=debounce)
    return float(jnp.mean(jnp.any(onsets.t_det >= 0, axis=1)))
