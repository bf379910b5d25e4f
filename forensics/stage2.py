"""Stage 2 — critic geometry, the paper's Patient-0 traceback, and contagion graphs.

Index convention (the paper's code: ``matrix[t][j][i]`` = influence of agent i on agent j):
every pairwise array here is [..., j, i] with j the *influenced* agent (whose critic C_j is
differentiated) and i the *influencer* (whose channel x_i is varied). Edge i → j.

Channel x_i: agent i's action a_i (``wrt="act"``, MADDPG's Q_j(o, a_1..a_N)) or its
observation o_i (``wrt="obs"``, a centralised value over the joint observation). With
g_ij = ∇_{x_i} C_j(z_t) and H the Hessian of C_j in x (never materialised):

  G_ij = ‖g_ij‖                                 (first-order influence magnitude)
  D_ij = g̃ᵀ H̃_ii g̃,  g̃ = ∇_{x_i}(−C_j), H̃_ii = ∇²_{x_i x_i}(−C_j)
       = −g_ijᵀ H_ii g_ij                        (the paper's directional curvature)
  S_ij = ⟨g_ij, δ_i⟩                             (first-order sensitivity to i's deviation)
  X_ij = ⟨∇_{x_j}(∇_{x_i} C_j · δ_i), u_j⟩ = δ_iᵀ H_ij u_j,  u_j = g_jj/‖g_jj‖
                                                (cross-curvature with j's own channel)

with δ_i^t = x_i^t − x_i^{t−1} (δ^0 = 0) unless the caller passes δ. Cost per (episode, step,
critic j): one forward-over-reverse linearisation of ∇C_j (``jax.linearize(jax.grad(C_j))``)
gives every g_ij at once; N Hessian-vector products with the block tangents g_ij·1[block i]
give every diagonal block's H_ii g_ij (a full-tangent HVP would mix blocks, Σ_k H_ik g_k); and
*one* more HVP with u_j in block j gives every X_ij by the symmetry of H (H_ij u_j for all i).

Note: a ReLU critic is piecewise linear in its inputs, so H ≡ 0 and D ≡ X ≡ 0 exactly; the
curvature terms need a smooth activation (tanh, softplus, GELU, …).

Traceback (the paper's, our reading of its code): at the current agent c, the candidate
upstream agents are u ≠ c; the critical rate of u is the share of steps τ in the causal window
[t_det − w + 1, t_det] ∩ [0, T) with D[τ, c, u] > 0 (u's action curves c's critic so that −Q_c
accelerates along u's gradient). Move to the best u by (rate, then mean G[c, u] over the window,
then G[c, u] at t_det); stop when the best rate is 0 or the best u is already on the chain;
the chain's head is Patient-0. (The paper's MAPPO variant scores Σ_{window, D>0} G at t_det;
DESIGN.md fixes the lexicographic order used here.)

Contagion weight of edge i → j after the detection at t_det:
  C_ij(t) = Σ_{τ=t_det}^{t} e^{−λ(τ − t_det)} |G_ij^τ|  for t ≥ t_det, 0 before.

Shapes: E episodes, T steps, N agents, O obs size, A action size.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from forensics.stage1 import NO_DETECTION

CriticApply = Callable[[Any, jax.Array, jax.Array], jax.Array]

_NORM_FLOOR = 1e-6


class CriticGeometry(NamedTuple):
    G: jax.Array  # [E, T, N(j), N(i)]
    D: jax.Array  # [E, T, N(j), N(i)]
    S: jax.Array  # [E, T, N(j), N(i)]
    X: jax.Array  # [E, T, N(j), N(i)]


class EdgeEvidence(NamedTuple):
    """Window aggregates per edge i → j, all [E, N(j), N(i)]; ``steps`` [E] window length."""

    rate: jax.Array  # share of window steps with D_ij > 0 (critical rate)
    mean_G: jax.Array
    G_det: jax.Array  # G_ij at t_det
    D_sum: jax.Array
    mean_S: jax.Array
    mean_X: jax.Array
    steps: jax.Array


class Traceback(NamedTuple):
    patient_zero: jax.Array  # [E] head of the chain (−1 when there was no detection)
    chain: jax.Array  # [E, N]: chain[0] = candidate, chain[k] = k-th hop upstream, −1 padded
    hops: jax.Array  # [E] number of hops taken


def step_deviation(x: jax.Array) -> jax.Array:
    """δ^t = x^t − x^{t−1} along axis 1 of [E, T, ...], with δ^0 = 0."""
    return jnp.concatenate([jnp.zeros_like(x[:, :1]), jnp.diff(x, axis=1)], axis=1)


def _one_critic(
    critic_apply: CriticApply,
    wrt: str,
    params_j: Any,
    j: jax.Array,
    obs: jax.Array,
    act: jax.Array,
    delta: jax.Array,
) -> tuple[jax.Array, ...]:
    """G, D, S, X rows [N(i)] for critic j at one step (obs [N, O], act [N, A])."""
    if wrt == "act":
        q = lambda x: critic_apply(params_j, obs, x)
        x = act
    else:
        q = lambda x: critic_apply(params_j, x, act)
        x = obs
    g, hvp = jax.linearize(jax.grad(q), x)  # g [N, K]; hvp: tangent [N, K] -> H·tangent
    n = x.shape[0]
    blocks = jnp.eye(n, dtype=x.dtype)[:, :, None]  # [i, k, 1] selects block i
    h_diag = jax.vmap(hvp)(blocks * g[None])  # [i, k, K] = (H · g_i 1[block i])_k
    h_ii_g = h_diag[jnp.arange(n), jnp.arange(n)]  # [i, K] = H_ii g_ij
    u_j = g[j] / jnp.maximum(jnp.linalg.norm(g[j]), _NORM_FLOOR)
    h_u = hvp(blocks[j] * u_j[None])  # [k, K] = H_kj u_j
    G = jnp.linalg.norm(g, axis=-1)
    D = -jnp.sum(g * h_ii_g, axis=-1)
    S = jnp.sum(g * delta, axis=-1)
    X = jnp.sum(delta * h_u, axis=-1)
    return G, D, S, X


@partial(jax.jit, static_argnames=("critic_apply", "wrt"))
def critic_geometry(
    critic_apply: CriticApply,
    critic_params: Any,
    obs: jax.Array,
    act: jax.Array,
    delta: jax.Array | None = None,
    *,
    wrt: str = "act",
) -> CriticGeometry:
    """G, D, S, X [E, T, N(j), N(i)] for every episode, step and ordered pair in one call.

    critic_params: stacked (leaf axis 0 = critic owner j); obs [E, T, N, O]; act [E, T, N, A]
    (discrete actions as one-hot / probability vectors); delta: the deviation of the channel
    (same shape as act or obs), default its step-to-step difference.
    """
    if wrt not in ("act", "obs"):
        raise ValueError(f"forensics.stage2.wrt: expected 'act' or 'obs', got {wrt!r}")
    if obs.ndim != 4 or act.ndim != 4 or obs.shape[:3] != act.shape[:3]:
        raise ValueError(
            f"critic_geometry: expected obs [E, T, N, O] and act [E, T, N, A] with "
            f"matching E, T, N; got {obs.shape} and {act.shape}"
        )
    channel = act if wrt == "act" else obs
    if delta is None:
        delta = step_deviation(channel)
    elif delta.shape != channel.shape:
        raise ValueError(
            f"critic_geometry delta: expected shape {channel.shape}, got {delta.shape}"
        )
    n = obs.shape[2]
    per_critic = partial(_one_critic, critic_apply, wrt)
    per_step = jax.vmap(per_critic, in_axes=(0, 0, None, None, None))  # over critics j
    per_step = jax.vmap(per_step, in_axes=(None, None, 0, 0, 0))  # over steps
    per_ep = jax.vmap(per_step, in_axes=(None, None, 0, 0, 0))  # over episodes
    return CriticGeometry(*per_ep(critic_params, jnp.arange(n), obs, act, delta))


def window_mask(num_steps: int, end: jax.Array, length: int) -> jax.Array:
    """[E, T] bool: steps in [end − length + 1, end] ∩ [0, T); all False where end < 0."""
    t = jnp.arange(num_steps)[None, :]
    end = end[:, None]
    return (t <= end) & (t > end - length) & (end >= 0)


@partial(jax.jit, static_argnames=("window",))
def edge_evidence(geom: CriticGeometry, t_det: jax.Array, window: int = 5) -> EdgeEvidence:
    """Aggregate the geometry over each episode's causal window ending at t_det [E]."""
    m = window_mask(geom.G.shape[1], t_det, window).astype(geom.G.dtype)
    steps = jnp.sum(m, axis=1)
    mean = lambda x: jnp.einsum("et,etji->eji", m, x) / jnp.maximum(steps, 1)[:, None, None]
    at_det = jnp.take_along_axis(geom.G, jnp.maximum(t_det, 0)[:, None, None, None], axis=1)[:, 0]
    return EdgeEvidence(
        rate=mean((geom.D > 0).astype(m.dtype)),
        mean_G=mean(geom.G),
        G_det=jnp.where((t_det >= 0)[:, None, None], at_det, 0.0),
        D_sum=jnp.einsum("et,etji->eji", m, geom.D),
        mean_S=mean(geom.S),
        mean_X=mean(geom.X),
        steps=steps,
    )


def _best_upstream(
    rate: jax.Array, mean_g: jax.Array, g_det: jax.Array, current: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Lexicographic argmax over u ≠ current of (rate, mean G, G at t_det) on row ``current``."""
    others = jnp.arange(rate.shape[0]) != current
    keys = (rate[current], mean_g[current], g_det[current])
    tied = others
    for key in keys:  # three static refinements of the tie set, not a loop over data
        best = jnp.max(jnp.where(tied, key, -jnp.inf))
        tied = tied & (key == best)
    u = jnp.argmax(tied)
    return u, rate[current, u]


def _trace_one(
    rate: jax.Array, mean_g: jax.Array, g_det: jax.Array, candidate: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    n = rate.shape[0]
    chain0 = jnp.full((n,), NO_DETECTION, jnp.int32).at[0].set(candidate)

    def hop(k, carry):
        current, chain, visited, done = carry
        u, r = _best_upstream(rate, mean_g, g_det, current)
        stop = done | (r <= 0) | visited[u]
        current = jnp.where(stop, current, u)
        chain = jnp.where(stop, chain, chain.at[k + 1].set(u))
        visited = visited.at[current].set(True)
        return current, chain, visited, stop

    visited0 = jnp.zeros((n,), bool).at[jnp.maximum(candidate, 0)].set(True)
    head, chain, _, _ = jax.lax.fori_loop(
        0, n - 1, hop, (jnp.maximum(candidate, 0), chain0, visited0, candidate < 0)
    )
    hops = jnp.sum(chain >= 0) - (candidate >= 0)
    return jnp.where(candidate >= 0, head, NO_DETECTION), chain, hops.astype(jnp.int32)


@jax.jit
def traceback(ev: EdgeEvidence, candidate: jax.Array) -> Traceback:
    """The paper's Patient-0 traceback from the Stage-1 candidate [E] (−1 = no detection)."""
    head, chain, hops = jax.vmap(_trace_one)(
        ev.rate, ev.mean_G, ev.G_det, candidate.astype(jnp.int32)
    )
    return Traceback(head, chain, hops)


@partial(jax.jit, static_argnames=("decay",))
def contagion_weights(G: jax.Array, t_det: jax.Array, decay: float = 0.3) -> jax.Array:
    """C [E, T, N(j), N(i)]: Σ_{τ=t_det}^{t} e^{−λ(τ−t_det)} |G^τ_ji| for t ≥ t_det, else 0."""
    lag = jnp.arange(G.shape[1])[None, :] - t_det[:, None]  # [E, T]
    w = jnp.where((lag >= 0) & (t_det[:, None] >= 0), jnp.exp(-decay * lag), 0.0)
    return jnp.cumsum(w[..., None, None] * jnp.abs(G), axis=1)


@partial(jax.jit, static_argnames=("length",))
def instability_occupancy(
    z: jax.Array, watch: jax.Array, end: jax.Array, length: int = 5
) -> jax.Array:
    """IO [E, N]: share of the window [end − length + 1, end] where z [E, T, N] > watch [N]."""
    m = window_mask(z.shape[1], end, length)
    above = (z > watch) & m[..., None]
    return jnp.sum(above, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)[:, None]
