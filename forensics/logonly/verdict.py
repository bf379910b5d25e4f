"""Calibration on clean episodes and the one fused log-only verdict per episode.

Statistics: ``instruments.statistics`` gives F = 2·K·N per-step statistics x_{f,t} (each
available instrument's step score and its CUSUM, per agent). A *group* is a set of them with a
verdict of its own: ``verdict`` = every statistic of the FUSED instruments (the tool's
default decision), and each instrument alone.

Calibration (clean episodes of the calibration store only, seeds disjoint from the models' fit
seeds and from the scored store's). Per clean episode e and statistic f, M_{e,f} = max_t x_{e,t,f}
over valid steps. A group with thresholds h_f raises an alarm on e iff ∃f: M_{e,f} > h_f. The
thresholds are the per-statistic order statistics at one common rank r, h_f = S_f[r]
(S_f = sorted M_{·,f}), with r the smallest rank whose joint alarm count F_r on the n clean
episodes satisfies (F_r + 1)/(n + 1) ≤ α (``calibration._threshold_at_budget``, joint). That is
the min-p rule with its cut-off calibrated on clean episodes: a statistic's empirical p-value
is its rank, the common rank is a common p cut-off, and the family-wise false-alarm rate of a
fresh exchangeable clean episode is held at ≈ α whatever the dependence between statistics
(Bonferroni at α/F would hold it too, but throws away power when statistics co-vary, as a
step score and its own CUSUM do).

Decision per group and episode: t_f = first valid t with x_{f,t} > h_f; agent i's detection
t_i = min over its statistics; t_det = min_i t_i; Patient-0 = the agent with t_i = t_det and the
largest exceedance ratio max_f x_{f,t_det}/h_f (h floored at ``EPS``); no crossing → −1, "no
failure found". The episode score (for ROC curves) is max_{f,t} x_{f,t}/h_f: an alarm iff > 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from forensics.calibration import _threshold_at_budget
from forensics.logonly import instruments as I
from forensics.store import StoreError, pad_batch

EPS = 1e-6  # floor of a threshold in the exceedance ratio (a decision gap's threshold is 0)
VERDICT = "verdict"


def groups(available: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Group name → its instruments: the fused verdict, then each instrument alone."""
    fused = tuple(k for k in I.FUSED if k in available)
    out = {VERDICT: fused} if fused else {}
    out.update({k: (k,) for k in available})
    return out


def group_columns(names: list[tuple[str, str, int]], members: tuple[str, ...]) -> np.ndarray:
    return np.asarray([f for f, (inst, _, _) in enumerate(names) if inst in members])


@jax.jit
def episode_max(x: jax.Array, valid: jax.Array) -> jax.Array:
    """M [B, F] = max over valid steps of x [B, T, F] (−inf for an episode with none)."""
    return jnp.max(jnp.where(valid[..., None], x, -jnp.inf), axis=1)


def thresholds(m: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Common-rank thresholds h [F] for clean maxima m [n, F] at family-wise budget α (module
    doc); returns (h, in-sample alarm share)."""
    n = m.shape[0]
    need = math.ceil(1.0 / alpha) - 1
    if n < need:
        raise StoreError(
            f"calibration: {n} clean episodes; need ≥ {need} to calibrate at α = {alpha}"
        )
    budget = math.floor(alpha * (n + 1) + 1e-9) - 1
    h = np.asarray(_threshold_at_budget(jnp.asarray(m), budget, joint=True))
    return h, float(np.mean(np.any(m > h, axis=1)))


@partial(jax.jit, static_argnames=("n_agents",))
def decide(x, h, agent_of, valid, *, n_agents: int):
    """(candidate [B], t_det [B], score [B], agent_t [B, N]) of one group (module doc).
    x [B, T, F], h [F], agent_of [F] int, valid [B, T]."""
    t_len = x.shape[1]
    cross = (x > h) & valid[..., None]
    t_f = jnp.where(jnp.any(cross, 1), jnp.argmax(cross, 1), t_len)  # [B, F]
    member = jax.nn.one_hot(agent_of, n_agents, dtype=bool)  # [F, N]
    t_i = jnp.min(jnp.where(member[None], t_f[..., None], t_len), axis=1)  # [B, N]
    t_det = jnp.min(t_i, axis=1)
    ratio = jnp.where(valid[..., None], x / jnp.maximum(h, EPS), 0.0)  # [B, T, F]
    at = jnp.take_along_axis(ratio, jnp.minimum(t_det, t_len - 1)[:, None, None], 1)[:, 0]
    per_agent = jnp.max(jnp.where(member[None], at[..., None], -jnp.inf), axis=1)  # [B, N]
    tied = jnp.where(t_i == t_det[:, None], per_agent, -jnp.inf)
    found = t_det < t_len
    return (
        jnp.where(found, jnp.argmax(tied, 1), -1),
        jnp.where(found, t_det, -1),
        jnp.max(ratio, axis=(1, 2)),
        jnp.where(t_i < t_len, t_i, -1),
    )


def measure_all(
    st: I.Statics,
    actor_params: Any,
    models: Mapping[str, Any],
    batches: Iterator[Mapping[str, np.ndarray]],
    size: int,
) -> Iterator[tuple[jax.Array, jax.Array, Mapping[str, np.ndarray], int]]:
    """(X, valid, padded batch, n_real) per fixed-size batch: one compilation."""
    for b in batches:
        n = len(b["valid"])
        p = pad_batch(b, size)
        x = I.statistics(
            st, actor_params, models, p["obs_perceived"], p["actions"], p["valid"], p.get("avail")
        )
        yield x, jnp.asarray(p["valid"]), p, n


class Calibrated:
    """Thresholds per group, fitted on clean episodes (module doc)."""

    def __init__(self, names, m: np.ndarray, alpha: float, available: tuple[str, ...]):
        self.names, self.alpha = names, alpha
        self.groups = groups(available)
        self.columns = {g: group_columns(names, mem) for g, mem in self.groups.items()}
        self.h, self.calib_fpr = {}, {}
        for g, cols in self.columns.items():
            self.h[g], self.calib_fpr[g] = thresholds(m[:, cols], alpha)
        self.agent_of = np.asarray([i for _, _, i in names])
        self.clean_episodes = int(m.shape[0])

    def to_json(self) -> dict[str, Any]:
        return {
            g: {
                "instruments": list(self.groups[g]),
                "statistics": [list(self.names[f]) for f in self.columns[g]],
                "thresholds": self.h[g].tolist(),
                "calib_fpr": self.calib_fpr[g],
            }
            for g in self.groups
        }


def calibrate(st, actor_params, models, clean_batches, size, alpha) -> Calibrated:
    """Measure the clean calibration episodes and fit every group's thresholds."""
    ms = []
    for x, valid, _, n in measure_all(st, actor_params, models, clean_batches, size):
        ms.append(np.asarray(episode_max(x, valid))[:n])
    m = np.concatenate(ms)
    n_agents = int(models["kappa"][st.instruments[0]].shape[0])
    return Calibrated(I.statistic_names(st.instruments, n_agents), m, alpha, st.instruments)


def score(
    st, actor_params, models, cal: Calibrated, batches, size: int, explain=None
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every group's verdict for every episode: {"<group>_candidate"|"_t_det"|"_score"|
    "_agent_t_det": array} plus the episode ids; and the timings. ``explain(x, valid, batch,
    n, candidate, t_det)`` (optional; ``batch`` padded to ``size``) adds host columns from the
    fused verdict's decision (``fault_class``)."""
    out: dict[str, list[np.ndarray]] = {}
    n_agents = int(cal.agent_of.max()) + 1
    timings = {"first_batch_s": 0.0, "steady_s": 0.0, "batches": 0}
    t0 = time.perf_counter()
    for x, valid, b, n in measure_all(st, actor_params, models, batches, size):
        host = {"episode_id": b["episode_id"][:n]}
        for g, cols in cal.columns.items():
            res = decide(x[..., cols], cal.h[g], cal.agent_of[cols], valid, n_agents=n_agents)
            for key, v in zip(("candidate", "t_det", "score", "agent_t_det"), res, strict=True):
                host[f"{g}_{key}"] = np.asarray(v)[:n]
            if g == VERDICT and explain is not None:
                host.update(explain(x, valid, b, n, res[0], res[1]))
        elapsed = time.perf_counter() - t0
        timings["first_batch_s" if timings["batches"] == 0 else "steady_s"] += elapsed
        timings["batches"] += 1
        for k, v in host.items():
            out.setdefault(k, []).append(v)
        t0 = time.perf_counter()
    return {k: np.concatenate(v) for k, v in out.items()}, timings
