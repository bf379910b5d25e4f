"""Thin numpy adapter over mpe2's PettingZoo ``simple_spread_v3`` parallel env.

The reference implementation for the JAX port's parity test, and the Python-loop
baseline for speed comparisons. Everything is stacked in agent order
(``agent_0 … agent_{N−1}``): observations [N, O], rewards [N].
"""

from __future__ import annotations

import numpy as np
from mpe2 import simple_spread_v3


class PettingZooSpread:
    """mpe2 ``simple_spread_v3.parallel_env`` with array-in / array-out reset and step."""

    def __init__(
        self, num_agents: int, continuous: bool, local_ratio: float = 0.5, max_cycles: int = 25
    ) -> None:
        self.env = simple_spread_v3.parallel_env(
            N=num_agents,
            local_ratio=local_ratio,
            max_cycles=max_cycles,
            continuous_actions=continuous,
        )
        self.num_agents = num_agents
        self.continuous = continuous
        self.names = list(self.env.possible_agents)

    def _stack(self, per_agent: dict, dtype: type) -> np.ndarray:
        return np.stack([np.asarray(per_agent[a], dtype=dtype) for a in self.names])

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode; returns observations [N, O] (float32)."""
        obs, _ = self.env.reset(seed=seed)
        return self._stack(obs, np.float32)

    def set_state(
        self, agent_pos: np.ndarray, agent_vel: np.ndarray, landmark_pos: np.ndarray
    ) -> np.ndarray:
        """Overwrite the world (after ``reset``) with explicit [N, 2] arrays; returns obs."""
        world = self.env.unwrapped.world
        for i, agent in enumerate(world.agents):
            agent.state.p_pos = np.array(agent_pos[i], dtype=np.float64)
            agent.state.p_vel = np.array(agent_vel[i], dtype=np.float64)
        for i, landmark in enumerate(world.landmarks):
            landmark.state.p_pos = np.array(landmark_pos[i], dtype=np.float64)
        return self._stack({a: self.env.unwrapped.observe(a) for a in self.names}, np.float32)

    def world_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(agent_pos, agent_vel, landmark_pos), each [N, 2] float64."""
        world = self.env.unwrapped.world
        return (
            np.stack([a.state.p_pos for a in world.agents]),
            np.stack([a.state.p_vel for a in world.agents]),
            np.stack([lm.state.p_pos for lm in world.landmarks]),
        )

    def state(self) -> np.ndarray:
        """mpe2's global state (concatenated observations)."""
        return np.asarray(self.env.state(), dtype=np.float32)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """Apply actions ([N] ints or [N, 5] floats); returns (obs [N, O], rewards [N], done)."""
        obs, rew, term, trunc, _ = self.env.step({a: actions[i] for i, a in enumerate(self.names)})
        done = all(term[a] or trunc[a] for a in self.names)
        return self._stack(obs, np.float32), self._stack(rew, np.float64), done
