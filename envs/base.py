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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import numpy as np

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


@dataclass(frozen=True, eq=False)
class EnvLayout:
    """What the observation and action vectors of an env *mean*: the named feature groups
    faults perturb and instruments compare, and the actions a fault substitutes.

    feature_groups     name → sorted int indices into the observation [O]; the groups are a
                       **partition** of range(O) (every feature in exactly one group), so a
                       per-group statistic accounts for the whole observation.
    feature_subgroups  name → indices of a finer, named part of one group (e.g. SMAX's
                       ``enemy_health`` inside ``enemies``); not a partition.
    noop_action        the command that moves/does nothing: an int (discrete) or a float
                       vector [A] (continuous); what a dropped command executes.
    move_axis          int [A]: 0 for an action that is not a move, 1 for a move along x,
                       2 along y (discrete envs; zeros for continuous ones).

    A pure function of the ``EnvSpec`` (``envs.layout``), so it is the same for a live env,
    a checkpoint and an episode store recorded from either.
    """

    feature_groups: Mapping[str, np.ndarray]
    feature_subgroups: Mapping[str, np.ndarray]
    noop_action: int | np.ndarray
    move_axis: np.ndarray

    def names(self) -> list[str]:
        """Every name ``mask`` accepts: the groups, the subgroups and ``all``."""
        return ["all", *self.feature_groups, *self.feature_subgroups]

    def mask(self, names: Iterable[str], obs_dim: int) -> np.ndarray:
        """bool [O]: the union of the named groups/subgroups (``all``: every feature).
        ValueError naming the first unknown name."""
        known = {**self.feature_groups, **self.feature_subgroups}
        out = np.zeros(obs_dim, bool)
        for name in names:
            if name == "all":
                out[:] = True
            elif name in known:
                out[known[name]] = True
            else:
                raise ValueError(f"unknown feature group {name!r}; expected one of {self.names()}")
        return out


def contiguous_groups(sizes: Iterable[tuple[str, int]]) -> dict[str, np.ndarray]:
    """Consecutive named blocks of an observation: [(name, size), ...] → name → indices."""
    out, lo = {}, 0
    for name, size in sizes:
        out[name] = np.arange(lo, lo + size)
        lo += size
    return out


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
