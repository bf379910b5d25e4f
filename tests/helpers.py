"""Small helpers shared by several test modules (imported as ``helpers``: pytest puts
``tests/`` on the path)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from agents.attacks import Team
from agents.networks import Actor, Critic, init_stacked
from envs import make_env


def leaves_equal(a, b) -> bool:
    """Two pytrees with the same structure and bit-identical leaves (NaN equals NaN)."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(x, y, equal_nan=True) for x, y in zip(la, lb, strict=True)
    )


@functools.cache
def random_team(n: int, continuous: bool):
    """Simple Spread with n agents and randomly initialised real actor/critic networks
    (16-16): (env, Team, stacked actor params, stacked critic params)."""
    env = make_env("simple_spread", num_agents=n, continuous=continuous)
    s = env.spec
    actor = Actor(hidden=(16, 16), action_dim=s.action_dim, discrete=s.discrete)
    critic = Critic(hidden=(16, 16))
    ap = init_stacked(actor, jax.random.PRNGKey(0), n, jnp.zeros(s.obs_dim))
    cp = init_stacked(
        critic, jax.random.PRNGKey(1), n, jnp.zeros((n, s.obs_dim)), jnp.zeros((n, s.action_dim))
    )
    return env, Team(s, actor.apply, critic.apply), ap, cp
