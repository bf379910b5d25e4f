"""The one small interface every environment adapter implements.

Everything is array-shaped with a leading agent axis so that training, attacks and
forensics can ``vmap`` over agents, episodes and seeds without dictionaries keyed by
agent name. ``reset`` and ``step`` are pure functions of (key, state, actions): they
can be ``jit``-ted, ``vmap``-ped over parallel environments and ``lax.scan``-ned over
time.

Shapes (N agents, O observation size, A action size):
  obs          float32 [N, O]
  actions      discrete: int32 [N] (an index into A choices)
               continuous: float32 [N, A] inside ``EnvSpec.action_low/high``
  rewards      float32 [N]   (per-agent reward, as the reference environment defines it)
  done         bool   []     (True on the step that ends the episode; no auto-reset)
  avail        bool   [N, A] (which discrete actions are legal; all True when unmasked)
  global_state float32 [S]   (what a centralised critic sees)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import jax

EnvState = Any  # an environment-specific pytree (a flax.struct dataclass)


@dataclass(frozen=True)
class EnvSpec:
    """Static facts about an environment: hashable, so it can be a jit static argument."""

    name: str
    num_agents: int
    obs_dim: int
    action_dim: int
    discrete: bool
    episode_length: int
    state_dim: int
    action_low: float = 0.0
    action_high: float = 1.0


class MultiAgentEnv(Protocol):
    """Pure-functional multi-agent environment (JaxMARL / gymnax style)."""

    spec: EnvSpec

    def reset(self, key: jax.Array) -> tuple[jax.Array, EnvState]:
        """Start an episode: returns (obs [N, O], state)."""
        ...

    def step(
        self, key: jax.Array, state: EnvState, actions: jax.Array
    ) -> tuple[jax.Array, EnvState, jax.Array, jax.Array, dict[str, jax.Array]]:
        """Advance one step: returns (obs, state, rewards [N], done [], info)."""
        ...

    def avail_actions(self, state: EnvState) -> jax.Array:
        """Legal discrete actions, bool [N, A]."""
        ...

    def global_state(self, state: EnvState) -> jax.Array:
        """Centralised critic input, float32 [S]."""
        ...
