"""Environment registry: ``make_env(name, num_agents, continuous, **kw)``."""

from __future__ import annotations

from typing import Any

from envs.base import EnvSpec, MultiAgentEnv
from envs.simple_spread import SimpleSpread

ENVS: dict[str, type] = {"simple_spread": SimpleSpread}

__all__ = ["ENVS", "EnvSpec", "MultiAgentEnv", "make_env"]


def make_env(name: str, num_agents: int, continuous: bool, **kw: Any) -> MultiAgentEnv:
    """Build a registered environment; extra keywords go to its constructor."""
    if name not in ENVS:
        raise ValueError(f"env.name: unknown environment {name!r}; expected one of {sorted(ENVS)}")
    if num_agents < 2:
        raise ValueError(f"env.num_agents: expected an integer >= 2, got {num_agents}")
    return ENVS[name](num_agents=num_agents, continuous=continuous, **kw)
