"""Policy evaluation: many whole episodes in one jitted call, and a confidence interval.

``run_episodes`` vmaps over episodes and ``lax.scan``s over the ``episode_length`` steps;
rewards after an episode's ``done`` are masked out, so the per-agent return is
R_i = Σ_{t < t_done} r_i^t.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from envs.base import MultiAgentEnv

Z_95 = 1.959963984540054  # standard-normal 97.5 % quantile


def episode_returns(
    env: MultiAgentEnv,
    act_fn: Callable[[jax.Array], jax.Array],
    key: jax.Array,
    num_episodes: int,
) -> jax.Array:
    """Traceable core of ``run_episodes`` (call it inside your own jit)."""

    def one_episode(key: jax.Array) -> jax.Array:
        k_reset, k_steps = jax.random.split(key)
        obs, state = env.reset(k_reset)

        def step(carry, key):
            obs, state, alive, ret = carry
            obs, state, reward, done, _ = env.step(key, state, act_fn(obs))
            return (obs, state, alive & ~done, ret + alive * reward), None

        init = (obs, state, jnp.bool_(True), jnp.zeros(env.spec.num_agents))
        steps = jax.random.split(k_steps, env.spec.episode_length)
        (_, _, _, ret), _ = jax.lax.scan(step, init, steps)
        return ret

    return jax.vmap(one_episode)(jax.random.split(key, num_episodes))


def run_episodes(
    env: MultiAgentEnv,
    act_fn: Callable[[jax.Array], jax.Array],
    key: jax.Array,
    num_episodes: int,
) -> jax.Array:
    """Per-agent returns [E, N] of ``num_episodes`` episodes under ``act_fn``.

    ``act_fn(obs [N, O]) -> actions`` (env format) must be traceable; for the greedy
    MADDPG policy use ``functools.partial(maddpg.greedy_actions, actor, actor_params)``.
    """
    return jax.jit(lambda k: episode_returns(env, act_fn, k, num_episodes))(key)


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
