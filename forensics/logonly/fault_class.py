"""What kind of fault it was: sensor side or action side, and for a sensor fault which readings.

The log-only instruments leave a pattern (DESIGN.md, "Faults are classes"):

* a **sensor** fault (the agent acts greedily on a wrong view õ_i) makes its readings disagree
  with its teammates' (``crossagent``) and with its own dynamics (``dynamics``) while its
  action stays consistent with what it perceived (``decision`` ≈ 0);
* an **action-side** fault (an actuator executing the wrong command, or corrupted policy
  parameters) leaves its readings consistent — the next reading follows the executed command —
  but puts the logged action off the checkpoint's greedy choice (``decision`` > 0).

Per verdict (Patient-0 p, detection step t_det of the fused log-only verdict), over the
window W = [t_det, t_det + ``window``) of valid steps, with the verdict's clean-calibrated
thresholds h_f (``verdict.Calibrated``):

  e_k = max_{t ∈ W, f ∈ k, agent(f) = p} x_{f,t} / h_f      for each instrument k,
  sensor = max(e_crossagent, e_dynamics),   action = e_decision,

class = sensor if sensor > action, else action side ("none" without a detection). Confidence
= the margin log10(max / min side ratio), and ``clean`` = whether the losing side stayed
within its clean range (ratio ≤ 1): a clear call has one side over its threshold and the
other inside it.

Readings (sensor calls): per feature group g of the env (``envs.layout``) two group
residuals, the cross-agent c_{i,g}^t = min_{j≠i} max_{f∈g} |o_i,f − f_ij,f| / σ_ij,f and the
own-dynamics d_{i,g}^t = max_{f∈g} |o_i,f − g_i,f| / σ_i,f, each with its own threshold: the
(1 − α/G) quantile of its clean per-episode maximum over agents (Bonferroni over the G groups;
the calibration store's clean episodes only). The cross-agent one is read over the window W:
its inputs are the teammates' readings and i's logged action, never i's own readings, so a
fault on one group of i's sensors moves that group alone. The own-dynamics one is read at
t_det only: it takes o_i^{t−1} as input, so once a biased velocity is an input it spoils the
predicted position and landmark offsets too (read over the whole window, a velocity bias on
the demo policy came out as "own_position; landmarks" in 1,183 of 1,199 verdicts), but at the
first inconsistent step its input is still the clean reading. A group's ratio is the larger
of max_{t ∈ W} c_{p,g}^t / h^c_g and d_{p,g}^{t_det} / h^d_g; groups with ratio > 1 are
inconsistent, listed by ratio, and the top one is the answer for "which readings".

Actuator vs policy parameters is not told apart: both move only the action, and from the log
alone an executed command that is "wrong for the checkpoint" looks the same whether the
actuator or the weights changed it (results say how often the action-side class is right for
each).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from forensics.logonly import instruments as I
from forensics.logonly import models as M

SENSOR, ACTION = ("crossagent", "dynamics"), ("decision",)
CLASSES = ("none", "sensor", "action")  # index = the class code of ``side``


def window_max(r: jax.Array, t_det: jax.Array, valid: jax.Array, window: int) -> jax.Array:
    """max over t ∈ [t_det, t_det + window) ∩ valid of r [B, T, ...] (−inf if empty or
    t_det < 0) → [B, ...]."""
    t = jnp.arange(r.shape[1])[None]
    inside = (t >= t_det[:, None]) & (t < t_det[:, None] + window) & valid & (t_det[:, None] >= 0)
    inside = inside.reshape(inside.shape + (1,) * (r.ndim - 2))
    return jnp.max(jnp.where(inside, r, -jnp.inf), axis=1)


@partial(jax.jit, static_argnames=("window",))
def side(
    x: jax.Array,
    h: jax.Array,
    inst_of: jax.Array,
    agent_of: jax.Array,
    candidate: jax.Array,
    t_det: jax.Array,
    valid: jax.Array,
    *,
    window: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(class code [B] into CLASSES, margin [B], sensor ratio [B], action ratio [B]).

    x [B, T, F] the verdict's statistics, h [F] their thresholds, inst_of [F] the index of each
    statistic's instrument in ``kinds`` order (0 = sensor side, 1 = action side, −1 = neither),
    agent_of [F], candidate / t_det [B] the verdict."""
    ratio = x / jnp.maximum(h, 1e-6)  # [B, T, F]
    mine = agent_of[None] == candidate[:, None]  # [B, F]
    peak = window_max(ratio, t_det, valid, window)  # [B, F]

    def best(code: int) -> jax.Array:
        keep = mine & (inst_of[None] == code)
        return jnp.max(jnp.where(keep, peak, -jnp.inf), axis=1)

    sensor, action = best(0), best(1)
    found = candidate >= 0
    code = jnp.where(found, jnp.where(sensor > action, 1, 2), 0)
    hi, lo = jnp.maximum(sensor, action), jnp.minimum(sensor, action)
    margin = jnp.log10(jnp.maximum(hi, 1e-6) / jnp.maximum(lo, 1e-6))
    return code, jnp.where(found, margin, 0.0), sensor, action


def group_residuals(
    models: Mapping[str, jax.Array], obs: jax.Array, prev_act: jax.Array, groups: jax.Array
) -> jax.Array:
    """[2, B, T, N, G]: the cross-agent and own-dynamics group residuals (module doc), a
    missing model's as zeros. ``groups`` bool [G, O]: which features each group holds."""
    in_g = groups[None, None, None]  # [1, 1, 1, G, O]
    b, t, n, _ = obs.shape
    out = jnp.zeros((2, b, t, n, groups.shape[0]), obs.dtype)
    if "cross_w" in models:
        target, pred = M.cross_residual(models, obs, prev_act)  # [B,T,N,1,O], [B,T,N,N,O]
        cross = jnp.abs(target - pred) / models["cross_sigma"]  # [B, T, N(i), N(j), O]
        cross_g = jnp.max(jnp.where(in_g[:, :, :, None], cross[..., None, :], 0.0), axis=-1)
        off = ~jnp.eye(n, dtype=bool)[None, None, :, :, None]
        out = out.at[0].set(jnp.min(jnp.where(off, cross_g, jnp.inf), axis=3))
    if "dyn_w" in models:
        target, pred = M.dynamics_residual(models, obs, prev_act)
        dyn = jnp.abs(target - pred) / models["dyn_sigma"]  # [B, T, N, O]
        dyn_g = jnp.max(jnp.where(in_g, dyn[..., None, :], 0.0), axis=-1)
        out = out.at[1].set(dyn_g.at[:, 0].set(0.0))  # no past at t = 0
    return out


@partial(jax.jit, static_argnames=("discrete", "action_dim"))
def group_scores(models, obs, actions, valid, groups, *, discrete: bool, action_dim: int):
    """``group_residuals`` from logged obs/actions, 0 at invalid steps: [2, B, T, N, G]."""
    prev_act = I.previous_action(actions, discrete, action_dim)
    z = group_residuals(models, obs, prev_act, groups)
    return jnp.where(valid[None, ..., None, None], z, 0.0)


def group_thresholds(clean_max: np.ndarray, alpha: float) -> np.ndarray:
    """h [2, G]: the (1 − α/G) quantile of clean per-episode maxima [E, 2, G] (Bonferroni)."""
    g = clean_max.shape[-1]
    return np.quantile(clean_max, 1.0 - alpha / g, axis=0)


@partial(jax.jit, static_argnames=("window",))
def inconsistent_groups(z, h, candidate, t_det, valid, *, window: int) -> jax.Array:
    """ratio [B, G] (module doc; 0 without a detection): the cross-agent residual's peak over
    the verdict's window and the own-dynamics residual at t_det, each over its threshold."""
    zp = jnp.take_along_axis(z, jnp.maximum(candidate, 0)[None, :, None, None, None], axis=3)
    zp = zp[:, :, :, 0] / jnp.maximum(h, 1e-6)[:, None, None]  # [2, B, T, G]
    cross = window_max(zp[0], t_det, valid, window)
    dyn = window_max(zp[1], t_det, valid, 1)
    r = jnp.maximum(cross, dyn)
    return jnp.where((candidate >= 0)[:, None], jnp.maximum(r, 0.0), 0.0)


def side_codes(names: list[tuple[str, str, int]], columns: np.ndarray) -> np.ndarray:
    """inst_of for the verdict's columns: 0 sensor side, 1 action side, −1 neither."""
    code = {**{k: 0 for k in SENSOR}, **{k: 1 for k in ACTION}}
    return np.asarray([code.get(names[f][0], -1) for f in columns], np.int32)


def group_masks(layout, obs_dim: int) -> tuple[list[str], np.ndarray]:
    """(names, bool [G, O]) of the env's feature groups."""
    names = list(layout.feature_groups)
    return names, np.stack([layout.mask([g], obs_dim) for g in names])


def readings(ratio: np.ndarray, names: list[str]) -> list[list[str]]:
    """Per episode the inconsistent groups (ratio > 1), most inconsistent first."""
    order = np.argsort(-ratio, axis=1)
    return [[names[g] for g in row if r[g] > 1.0] for row, r in zip(order, ratio, strict=True)]
