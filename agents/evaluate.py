"""Policy evaluation: many whole episodes in one jitted call, and a confidence interval.

``run_episodes`` vmaps over episodes and ``lax.scan``s over the ``episode_length`` steps;
rewards after an episode's ``done`` are masked out, so the per-agent return is
R_i = Σ_{t ≤ t_done} r_i^t; envs with a battle outcome (SMAX) also give the win flag.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from envs.base import MultiAgentEnv

Z_95 = 1.959963984540054  # standard-normal 97.5 % quantile


class EpisodeStats(NamedTuple):
    """Per-episode results: per-agent returns [E, N] and, for envs that report a battle
    outcome (``info["won"]``, e.g. SMAX), whether the episode was won [E] (else None)."""

    returns: jax.Array
    won: jax.Array | None


ActFn = Callable[[jax.Array, jax.Array], jax.Array]  # (obs [N, O], avail [N, A]) -> actions


def episode_stats(
    env: MultiAgentEnv, act_fn: ActFn, key: jax.Array, num_episodes: int
) -> EpisodeStats:
    """Traceable core of ``run_episodes`` (call it inside your own jit)."""
    reports_outcome = False  # set while tracing: does env.step's info carry "won"?

    def one_episode(key: jax.Array) -> tuple[jax.Array, jax.Array]:
        k_reset, k_steps = jax.random.split(key)
        obs, state = env.reset(k_reset)

        def step(carry, key):
            nonlocal reports_outcome
            obs, state, alive, ret, _ = carry
            actions = act_fn(obs, env.avail_actions(state))
            obs, state, reward, done, info = env.step(key, state, actions)
            reports_outcome = "won" in info
            won = info.get("won", jnp.bool_(False))
            return (obs, state, alive & ~done, ret + alive * reward, won), None

        init = (obs, state, jnp.bool_(True), jnp.zeros(env.spec.num_agents), jnp.bool_(False))
        steps = jax.random.split(k_steps, env.spec.episode_length)
        (_, _, _, ret, won), _ = jax.lax.scan(step, init, steps)
        return ret, won

    returns, won = jax.vmap(one_episode)(jax.random.split(key, num_episodes))
    return EpisodeStats(returns, won if reports_outcome else None)


def run_episodes(
    env: MultiAgentEnv, act_fn: ActFn, key: jax.Array, num_episodes: int
) -> EpisodeStats:
    """Returns (and wins, if the env reports them) of ``num_episodes`` greedy episodes.

    ``act_fn(obs [N, O], avail [N, A]) -> actions`` (env format) must be traceable, e.g.
    ``agents.checkpoint.greedy_act_fn(policy)``. A finished SMAX battle is frozen, so the
    last step's ``won`` is the episode's outcome.
    """
    return jax.jit(lambda k: episode_stats(env, act_fn, k, num_episodes))(key)


def mean_ci(x: jax.Array | np.ndarray, student: bool = False) -> tuple[float, float]:
    """Sample mean and 95 % confidence half-width, q · s / √n with q = 1.96 (normal
    approximation, many samples such as episodes) or, with ``student``, the Student-t
    quantile t_{0.975, n−1} (a handful of samples such as the seeds of a sweep).

    Samples lie along axis 0; trailing axes are averaged within each sample first, so
    per-agent returns [E, N] give the mean per-agent return with an episode-level CI.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0 or x.shape[0] < 2:
        raise ValueError(f"mean_ci: need at least 2 samples along axis 0, got shape {x.shape}")
    per_sample = x.reshape(x.shape[0], -1).mean(axis=1)
    n = per_sample.shape[0]
    if student:
        from scipy.stats import t

        q = float(t.ppf(0.975, n - 1))
    else:
        q = Z_95
    half = q * per_sample.std(ddof=1) / np.sqrt(n)
    return float(per_sample.mean()), float(half)
