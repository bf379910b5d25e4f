"""Same-seed replay bands: R clean replays of one seed with tiny observation noise.

The paper's reference (its code's ``ReferenceTaylorManager``) is a counterfactual of the
scored episode itself: the environment is reset with the *same* seed R times (R = 100), the
attack is left out, and every agent acts greedily on its observation plus N(0, s²) noise
(s = 1e-4) drawn afresh per replay, step and agent. A per-step statistic x of those replays
gives, per (seed, step t, agent i),

  μ_{t,i} = (1/R_t) Σ_r x^r_{t,i},    σ_{t,i} = √((1/R_t) Σ_r (x^r_{t,i} − μ_{t,i})²)

(population std, over the R_t replays still running at t). The noise only keeps σ from being
exactly 0: with s = 0 every replay is the seed's clean episode, bit for bit.

Here a replay is ``_noisy_episode``: the same key streams as ``agents.rollout._episode``
(``streams(key).reset`` / ``.env``), so with ``noise = 0`` it reproduces the recorded clean
episode of that key exactly; the noise comes from a stream of its own, split per replay. It
is jitted and vmapped over replays and seeds (no Python loop over steps, agents, replays or
episodes), and ``replay_band`` reduces the replays to (μ, σ) on the device, so 500 seeds ×
100 replays are never held, let alone stored: memory is one chunk of seeds.

Shapes: S seeds, R replays, T steps, N agents, O observation size, A actions.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from agents.attacks import Params, Team
from agents.precision import float32_matmuls
from agents.rollout import streams
from envs.base import MultiAgentEnv

NOISE_STREAM = 0x5EED  # fold_in tag of the replay-noise stream (disjoint from ``streams``)


class Replays(NamedTuple):
    """Replays of a batch [B.., R]: what the agents acted on and what they did."""

    obs: jax.Array  # float32 [.., T, N, O] the noisy observations the agents acted on
    actions: jax.Array  # int32 [.., T, N] | float32 [.., T, N, A]
    avail: jax.Array  # bool [.., T, N, A]
    valid: jax.Array  # bool [.., T] steps up to and including the first done


class Band(NamedTuple):
    """Per seed, step and agent: replay mean and population std of each statistic."""

    mu: tuple[jax.Array, ...]  # each [S, T, N]
    sigma: tuple[jax.Array, ...]  # each [S, T, N]
    count: jax.Array  # [S, T] replays still running at t


def _noisy_episode(
    env: MultiAgentEnv,
    team: Team,
    actor_params: Params,
    noise: jax.Array,
    key: jax.Array,
    noise_key: jax.Array,
) -> Replays:
    """One greedy clean episode of ``key`` with N(0, noise²) added to every observation the
    agents act on (fresh per step and agent)."""
    spec = env.spec
    keys = streams(key)
    obs0, state0 = env.reset(keys.reset)

    def step(carry, t):
        state, obs = carry
        avail = env.avail_actions(state)
        seen = obs + noise * jax.random.normal(jax.random.fold_in(noise_key, t), obs.shape)
        actions = team.greedy(jax.vmap(team.actor_apply)(actor_params, seen), avail)
        next_obs, next_state, _, done, _ = env.step(jax.random.fold_in(keys.env, t), state, actions)
        return (next_state, next_obs), (seen, actions, avail, done)

    ts = jnp.arange(spec.episode_length, dtype=jnp.int32)
    _, (seen, actions, avail, done) = jax.lax.scan(step, (state0, obs0), ts)
    valid = jnp.cumsum(done) - done == 0
    return Replays(seen, actions, avail, valid)


def noise_keys(keys: jax.Array, replays: int) -> jax.Array:
    """Replay-noise keys [S, R, 2] of episode keys [S, 2]: one independent stream per replay."""
    split = lambda k: jax.random.split(jax.random.fold_in(k, NOISE_STREAM), replays)
    return jax.vmap(split)(keys)


def _replays(
    env: MultiAgentEnv, team: Team, replays: int
) -> Callable[[Params, jax.Array, jax.Array], Replays]:
    """Traceable ``(actor_params, keys [S, 2], noise []) -> Replays [S, R, ...]`` (vmap R,
    then S)."""
    one = partial(_noisy_episode, env, team)
    over_s = jax.vmap(jax.vmap(one, in_axes=(None, None, None, 0)), in_axes=(None, None, 0, 0))
    return lambda params, keys, noise: over_s(params, noise, keys, noise_keys(keys, replays))


def make_replays(
    env: MultiAgentEnv, team: Team, replays: int
) -> Callable[[Params, jax.Array, float], Replays]:
    """``replay(actor_params, keys [S, 2], noise) -> Replays [S, R, ...]``, jitted (noise is
    traced: one compilation for every scale; float32 products: the same replays on a GPU as
    on the CPU, agents/precision.py)."""
    return float32_matmuls(jax.jit(_replays(env, team, replays)))


def band_moments(x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(μ, σ, count) over the replay axis 1 of x [S, R, T, N], valid [S, R, T]: the mean and
    population std (ddof 0, numpy's ``np.std``) of the replays running at each step."""
    w = valid.astype(x.dtype)[..., None]
    count = jnp.sum(w, axis=1)  # [S, T, 1]
    n = jnp.maximum(count, 1.0)
    mu = jnp.sum(w * x, axis=1) / n
    var = jnp.sum(w * (x - mu[:, None]) ** 2, axis=1) / n
    return mu, jnp.sqrt(var), count[..., 0].astype(jnp.int32)


Statistics = Callable[[Any, Replays], tuple[jax.Array, ...]]  # (params, flat replays) -> [B, T, N]


def make_band(
    env: MultiAgentEnv, team: Team, statistics: Statistics, replays: int
) -> Callable[[Params, Any, jax.Array, float], Band]:
    """``band(actor_params, stat_params, keys [S, 2], noise) -> Band``: replays of each seed, every
    statistic of ``statistics(stat_params, replays [S·R, ...])`` and its (μ, σ) per seed, in one
    jitted program (the replays never leave the device)."""
    replay = _replays(env, team, replays)

    @float32_matmuls
    @jax.jit
    def band(actor_params, stat_params, keys, noise):
        rep = replay(actor_params, keys, noise)
        s, r = keys.shape[0], replays
        flat = jax.tree_util.tree_map(lambda a: a.reshape(s * r, *a.shape[2:]), rep)
        stats = statistics(stat_params, flat)
        moments = [band_moments(x.reshape(s, r, *x.shape[1:]), rep.valid) for x in stats]
        return Band(tuple(m[0] for m in moments), tuple(m[1] for m in moments), moments[0][2])

    return band


def iter_bands(
    band: Callable[[Params, Any, jax.Array, float], Band],
    actor_params: Params,
    stat_params: Any,
    keys: np.ndarray,
    noise: float,
    chunk: int,
) -> Band:
    """Bands of every key [S, 2] in chunks of ``chunk`` seeds (the last one padded, so one
    compilation), concatenated on the host."""
    keys = np.asarray(keys)
    parts = []
    for lo in range(0, len(keys), chunk):
        part = keys[lo : lo + chunk]
        n = len(part)
        padded = np.concatenate([part, np.repeat(part[-1:], chunk - n, axis=0)])
        out = jax.device_get(band(actor_params, stat_params, jnp.asarray(padded), noise))
        parts.append(jax.tree_util.tree_map(lambda x, n=n: np.asarray(x)[:n], out))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *parts)
