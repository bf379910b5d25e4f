"""Per-step, per-agent scores of the log-only instruments, and the CUSUM over each.

Shapes: B episodes, T steps, N agents, O observation features, A actions. ``obs`` is what each
agent perceived (``obs_perceived``: all a deployment log has), ``actions`` what it executed.

Instruments (each a score s_{b,t,i} ≥ 0, large = suspicious; 0 at invalid steps):

* **crossagent** — teammates observe the same world. For every ordered pair (i ← j) a linear
  model f_ij predicts o_i^t from x_ij^t = [o_j^t, o_j^{t−1}, onehot(a_i^{t−1})] (j's view now
  and a step ago gives i's position and previous velocity; i's own logged action closes the
  velocity update). Residual standardised per feature, d_ij^t = max_f |o_i,f − f_ij,f| / σ_ij,f;
  agent i's score is  s_i = min_{j≠i} d_ij : i is flagged only when *every* teammate's view
  disagrees with i's, so one faulty teammate j (large d_ij for all i) cannot frame i.
* **dynamics** — an agent's own readings follow its dynamics: g_i predicts o_i^t from
  [o_i^{t−1}, onehot(a_i^{t−1})]; s_i^t = max_f |o_i,f^t − g_i,f| / σ_i,f (0 at t = 0, the
  first step with no past). Scored at the step whose reading is inconsistent.
* **decision** — a greedy executor takes argmax π_i(·|o_i). s = max_a log π_i(a|o_i) −
  log π_i(a_taken|o_i) ≥ 0 in nats: 0 iff taken = argmax, and the margin grows with the rank
  of the taken action (a near-miss second-best costs its gap, the worst action the range).
  Continuous actors: s = ‖a_taken − μ_i(o_i)‖₂. Legal actions only where the store has masks.
* **teammate** — Kazari, Shereen & Dán (IJCAI 2023; arXiv 2508.15764): a classifier
  p̂_i(a | o_{−i}) of agent i's action from its teammates' observations, fitted on clean
  episodes; s = −log p̂_i(a_taken | o_{−i}). Discrete actions only.

Sequential test (``cusum``): per agent, the one-sided upper CUSUM
  C_i^t = max(0, C_i^{t−1} + s_i^t − κ_i),  C_i^{−1} = 0,
with the reference value κ_i a clean quantile of s_i (``models``); a small deviation that
persists accumulates, one that is as large as clean steps' does not. Invalid steps carry C.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

INSTRUMENTS = ("crossagent", "dynamics", "decision", "teammate")
FUSED = ("crossagent", "dynamics", "decision")  # the verdict's family; teammate is the peer
KINDS = ("step", "cusum")


class Teammate(nn.Module):
    """p̂_i(a | o_{−i}): an MLP from the teammates' concatenated observations to action logits."""

    hidden: tuple[int, ...]
    action_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden:
            x = nn.silu(nn.Dense(width)(x))
        return nn.Dense(self.action_dim)(x)


@dataclass(frozen=True)
class Statics:
    """What the jitted scorer specialises on (hashable)."""

    actor_apply: Callable[[Any, jax.Array], jax.Array]
    discrete: bool
    action_dim: int
    instruments: tuple[str, ...]  # the available ones, in INSTRUMENTS order
    teammate_hidden: tuple[int, ...] = (64, 64)


# --------------------------------------------------------------------------- features


def previous(x: jax.Array, axis: int = 1) -> jax.Array:
    """x^{t−1} along ``axis`` with x^{−1} := x^0 (the first step has no past)."""
    x = jnp.moveaxis(x, axis, 0)
    return jnp.moveaxis(jnp.concatenate([x[:1], x[:-1]]), 0, axis)


def previous_action(actions: jax.Array, discrete: bool, action_dim: int) -> jax.Array:
    """The action encoding of a^{t−1} [B, T, N, A] (one-hot when discrete), zeros at t = 0."""
    enc = jax.nn.one_hot(actions, action_dim) if discrete else actions.astype(jnp.float32)
    zero = jnp.zeros_like(enc[:, :1])
    return jnp.concatenate([zero, enc[:, :-1]], axis=1)


def cross_inputs(obs: jax.Array, prev_act: jax.Array) -> jax.Array:
    """x_ij^t = [o_j^t, o_j^{t−1}, a_i^{t−1}] for every ordered pair: [B, T, N(i), N(j), D]."""
    n = obs.shape[2]
    view = jnp.concatenate([obs, previous(obs)], axis=-1)  # [B, T, N(j), 2O]
    view = jnp.broadcast_to(view[:, :, None], (*obs.shape[:2], n, *view.shape[2:]))
    act = jnp.broadcast_to(prev_act[:, :, :, None], (*obs.shape[:2], n, n, prev_act.shape[-1]))
    return jnp.concatenate([view, act], axis=-1)


def dynamics_inputs(obs: jax.Array, prev_act: jax.Array) -> jax.Array:
    """x_i^t = [o_i^{t−1}, a_i^{t−1}]: [B, T, N, O + A]."""
    return jnp.concatenate([previous(obs), prev_act], axis=-1)


def others(n: int) -> jax.Array:
    """[N, N−1] the teammates of each agent, ascending."""
    idx = jnp.arange(n)
    return jnp.stack([jnp.concatenate([idx[:i], idx[i + 1 :]]) for i in range(n)])


def teammate_inputs(obs: jax.Array) -> jax.Array:
    """[B, T, N, (N−1)·O]: each agent's teammates' observations, concatenated."""
    tm = obs[:, :, others(obs.shape[2])]  # [B, T, N, N−1, O]
    return tm.reshape(*tm.shape[:3], -1)


# --------------------------------------------------------------------------- scores


def standardised_max(residual: jax.Array, sigma: jax.Array) -> jax.Array:
    """max_f |r_f| / σ_f over the last axis: the worst-disagreeing feature (a fault usually
    hits a feature group, which a mean over all features would dilute)."""
    return jnp.max(jnp.abs(residual) / sigma, axis=-1)


def crossagent_score(m: Mapping[str, jax.Array], obs: jax.Array, prev_act: jax.Array):
    """s_i = min_{j≠i} d_ij (module doc); also returns d [B, T, N(i), N(j)] (inf on i = j)."""
    x = cross_inputs(obs, prev_act)
    pred = jnp.einsum("btijd,ijdo->btijo", x, m["cross_w"]) + m["cross_b"]
    d = standardised_max(obs[:, :, :, None] - pred, m["cross_sigma"])
    n = obs.shape[2]
    d = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, d)
    return jnp.min(d, axis=-1), d


def dynamics_score(m: Mapping[str, jax.Array], obs: jax.Array, prev_act: jax.Array) -> jax.Array:
    """s_i^t = max_f |o_i^t − g_i(o_i^{t−1}, a_i^{t−1})|_f / σ_i,f, 0 at t = 0."""
    x = dynamics_inputs(obs, prev_act)
    pred = jnp.einsum("btid,ido->btio", x, m["dyn_w"]) + m["dyn_b"]
    s = standardised_max(obs - pred, m["dyn_sigma"])
    return s.at[:, 0].set(0.0)


def decision_score(
    st: Statics, actor_params: Any, obs: jax.Array, actions: jax.Array, avail: jax.Array | None
) -> jax.Array:
    """Greedy decision gap: max_a log π(a|o) − log π(a_taken|o) (discrete), ‖a − μ(o)‖₂."""
    per_agent = jax.vmap(st.actor_apply, in_axes=(0, 0))  # stacked params, obs [N, O]
    out = jax.vmap(jax.vmap(per_agent, in_axes=(None, 0)), in_axes=(None, 0))(actor_params, obs)
    if not st.discrete:
        return jnp.linalg.norm(actions - out, axis=-1)
    if avail is not None:
        out = jnp.where(avail, out, -jnp.inf)
    logp = jax.nn.log_softmax(out, axis=-1)
    taken = jnp.take_along_axis(logp, actions[..., None], axis=-1)[..., 0]
    return jnp.max(logp, axis=-1) - taken


def teammate_score(st: Statics, params: Any, obs: jax.Array, actions: jax.Array) -> jax.Array:
    """−log p̂_i(a_taken | o_{−i}) with the teammate model's stacked per-agent params."""
    net = Teammate(st.teammate_hidden, st.action_dim)
    x = teammate_inputs(obs)  # [B, T, N, D]
    logits = jax.vmap(net.apply, in_axes=(0, 2), out_axes=2)(params, x)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, actions[..., None], axis=-1)[..., 0]


def cusum(s: jax.Array, kappa: jax.Array, valid: jax.Array) -> jax.Array:
    """One-sided upper CUSUM along time: C^t = max(0, C^{t−1} + s^t − κ), carried unchanged
    at invalid steps. s [B, T, N], κ [N] (broadcast), valid [B, T] → C [B, T, N]."""

    def step(c, inp):
        x, v = inp
        c = jnp.where(v[:, None], jnp.maximum(0.0, c + x - kappa), c)
        return c, c

    _, out = jax.lax.scan(
        step, jnp.zeros_like(s[:, 0]), (jnp.swapaxes(s, 0, 1), jnp.swapaxes(valid, 0, 1))
    )
    return jnp.swapaxes(out, 0, 1)


def step_scores(
    st: Statics,
    actor_params: Any,
    models: Mapping[str, Any],
    obs: jax.Array,
    actions: jax.Array,
    valid: jax.Array,
    avail: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Every available instrument's per-step score [B, T, N], 0 at invalid steps."""
    prev_act = previous_action(actions, st.discrete, st.action_dim)
    out = {}
    for name in st.instruments:  # a static handful of instruments, not a loop over data
        if name == "crossagent":
            out[name] = crossagent_score(models, obs, prev_act)[0]
        elif name == "dynamics":
            out[name] = dynamics_score(models, obs, prev_act)
        elif name == "decision":
            out[name] = decision_score(st, actor_params, obs, actions, avail)
        elif name == "teammate":
            out[name] = teammate_score(st, models["teammate"], obs, actions)
    return {k: jnp.where(valid[..., None], v, 0.0) for k, v in out.items()}


@partial(jax.jit, static_argnames=("st",))
def statistics(
    st: Statics,
    actor_params: Any,
    models: Mapping[str, Any],
    obs: jax.Array,
    actions: jax.Array,
    valid: jax.Array,
    avail: jax.Array | None = None,
) -> jax.Array:
    """X [B, T, F]: for each available instrument (in order), its step score then its CUSUM,
    each over the N agents — F = 2·K·N columns, named by ``statistic_names``."""
    s = step_scores(st, actor_params, models, obs, actions, valid, avail)
    cols = []
    for name in st.instruments:
        cols += [s[name], cusum(s[name], models["kappa"][name], valid)]
    return jnp.concatenate(cols, axis=-1)


def statistic_names(instruments: tuple[str, ...], n: int) -> list[tuple[str, str, int]]:
    """(instrument, kind, agent) of each column of ``statistics``."""
    return [(name, kind, i) for name in instruments for kind in KINDS for i in range(n)]


def availability(
    n_agents: int,
    episode_length: int,
    discrete: bool,
    columns: set[str],
    fitted: set[str] | None,
) -> dict[str, str | None]:
    """Per instrument: None if it can run, else the reason it cannot (one line).

    ``columns``: the store's columns; ``fitted``: the instruments the loaded models hold
    (None: no models were given). Every instrument needs the perceived observations and the
    actions; crossagent and teammate need teammates (N ≥ 2); dynamics needs next observations
    (T ≥ 2); teammate needs discrete actions; all need their fitted models (and κ)."""
    out: dict[str, str | None] = {}
    for name in INSTRUMENTS:
        missing = [c for c in ("obs_perceived", "actions", "valid") if c not in columns]
        if missing:
            out[name] = f"the store has no {', '.join(missing)}"
        elif name in ("crossagent", "teammate") and n_agents < 2:
            out[name] = "needs teammates' observations (the store has one agent)"
        elif name == "dynamics" and episode_length < 2:
            out[name] = "needs next observations (episodes of one step)"
        elif name == "teammate" and not discrete:
            out[name] = "needs discrete actions (a classifier of the taken action)"
        elif fitted is None:
            out[name] = "no fitted models (run `forensics fit-models RUN -c CLEAN_STORE`)"
        elif name not in fitted:
            out[name] = "not in the fitted models"
        else:
            out[name] = None
    return out
