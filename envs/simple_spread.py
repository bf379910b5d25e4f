"""Simple Spread (MPE) in pure JAX, step-for-step equal to PettingZoo's ``simple_spread_v3``.

Reference: the ``mpe2`` package (``simple_spread/simple_spread.py``,
``_mpe_utils/core.py``, ``_mpe_utils/simple_env.py``). N agents (radius 0.15, mass 1,
movable, silent) and N landmarks (fixed, non-colliding) in the plane.

Dynamics per step (dt = 0.1, damping = 0.25, sensitivity = 5):
  u_i      = 5 · d_i, with d_i = (a[2] − a[1], a[4] − a[3]) for a continuous action
             a ∈ [0, 1]^5 (clipped, as PettingZoo's ClipOutOfBoundsWrapper does), or the
             unit direction of discrete action [no_op, left, right, down, up]
  f_i      = u_i + Σ_{j≠i} 100 · (p_i − p_j)/|p_i − p_j| · k·softplus(−(|p_i − p_j| − 0.3)/k),
             k = 1e-3 (contact forces use the positions *before* the step)
  p_i'     = p_i + dt · v_i
  v_i'     = (1 − damping) · v_i + dt · f_i
Reward of agent i (positions *after* the step, local_ratio λ):
  r_i = (1 − λ) · (−Σ_l min_a |p_a − q_l|) + λ · (−#{j ≠ i : |p_i − p_j| < 0.3})
Observation of agent i: [v_i, p_i, q_l − p_i (l = 1..N), p_j − p_i (j ≠ i), comm (zeros,
2(N−1))]. ``done`` is True on transition ``max_cycles`` (25 transitions per episode).

mpe2 integrates in float64 and casts observations to float32. This module runs in
JAX's default float dtype: in float32 it agrees with mpe2 to ~1e-5 over an episode
(contacts amplify rounding); under ``jax.enable_x64`` it agrees to ~1e-12.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from envs.base import EnvLayout, EnvSpec, contiguous_groups

DIM_P = 2
DIM_C = 2
ACTION_DIM = 5
AGENT_SIZE = 0.15
DT = 0.1
DAMPING = 0.25
SENSITIVITY = 5.0  # mpe2 `_set_action` default when agent.accel is None
CONTACT_FORCE = 1e2
CONTACT_MARGIN = 1e-3
COLLISION_DIST = 2 * AGENT_SIZE

# Unit direction of each discrete action: [no_op, left, right, down, up].
DISCRETE_DIRECTIONS = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.float32)

# Largest N for which the scripted controller enumerates all N! assignments.
MAX_SCRIPTED_AGENTS = 7

# Per-agent episode returns of mpe2 simple_spread_v3 (25 steps, 200 episodes), keyed by
# (num_agents, continuous). Source: /work/shared/DESIGN.md, "Known facts worth knowing".
REFERENCE_RETURNS_SOURCE = "DESIGN.md 'Known facts': mpe2 simple_spread_v3, 25 steps, 200 episodes"
REFERENCE_RETURNS: dict[tuple[int, bool], dict[str, float]] = {
    (3, False): {"random": -28.0, "scripted": -8.2},
    (5, False): {"random": -35.2, "scripted": -11.5},
    (3, True): {"random": -26.4, "scripted": -6.9},
    (5, True): {"random": -33.8, "scripted": -10.2},
}


def gap_closed(ret: float | jax.Array, n: int, continuous: bool) -> float | jax.Array:
    """Fraction of the random→scripted gap closed: (ret − random) / (scripted − random)."""
    if (n, continuous) not in REFERENCE_RETURNS:
        raise ValueError(
            f"gap_closed: no reference returns for num_agents={n}, continuous={continuous}; "
            f"known: {sorted(REFERENCE_RETURNS)}"
        )
    ref = REFERENCE_RETURNS[(n, continuous)]
    return (ret - ref["random"]) / (ref["scripted"] - ref["random"])


def layout(num_agents: int, continuous: bool) -> EnvLayout:
    """Feature groups of agent i's observation (``observations``), in order:

      own_velocity  v_i (2)              own_position  p_i (2)
      landmarks     q_l − p_i (2N)       teammates     p_j − p_i, j ≠ i (2(N−1))
      comm          the silent agents' communication channel (2(N−1), always zero)

    Actions: discrete [no_op, left, right, down, up] (no-op 0; left/right move along x,
    down/up along y); continuous a ∈ [0, 1]^5 with the no-op a = 0 (no force).
    """
    n = num_agents
    groups = contiguous_groups(
        [
            ("own_velocity", DIM_P),
            ("own_position", DIM_P),
            ("landmarks", DIM_P * n),
            ("teammates", DIM_P * (n - 1)),
            ("comm", DIM_C * (n - 1)),
        ]
    )
    if continuous:
        return EnvLayout(groups, {}, np.zeros(ACTION_DIM, np.float32), np.zeros(ACTION_DIM, int))
    return EnvLayout(groups, {}, 0, np.array([0, 1, 1, 2, 2]))


@struct.dataclass
class SpreadState:
    """Full world state; landmarks never move and agents carry no communication state."""

    agent_pos: jax.Array  # float32 [N, 2]
    agent_vel: jax.Array  # float32 [N, 2]
    landmark_pos: jax.Array  # float32 [N, 2]
    t: jax.Array  # int32 [], transitions taken so far


def _pairwise(pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """delta[i, j] = p_i − p_j and dist[i, j] = |p_i − p_j| (diagonal set to 1, never used)."""
    delta = pos[:, None, :] - pos[None, :, :]
    eye = jnp.eye(pos.shape[0], dtype=bool)
    # Keep the diagonal away from sqrt(0)/0 so neither values nor gradients become NaN.
    sq = jnp.where(eye, 1.0, jnp.sum(delta**2, axis=-1))
    return delta, jnp.sqrt(sq)


class SimpleSpread:
    """Jittable, vmappable Simple Spread implementing ``envs.base.MultiAgentEnv``."""

    def __init__(
        self, num_agents: int, continuous: bool, local_ratio: float = 0.5, max_cycles: int = 25
    ) -> None:
        if num_agents < 2:
            raise ValueError(f"SimpleSpread: num_agents must be >= 2, got {num_agents}")
        if not 0.0 <= local_ratio <= 1.0:
            raise ValueError(f"SimpleSpread: local_ratio must be in [0, 1], got {local_ratio}")
        if max_cycles < 1:
            raise ValueError(f"SimpleSpread: max_cycles must be >= 1, got {max_cycles}")
        n = num_agents
        self.num_agents = n
        self.continuous = continuous
        self.local_ratio = local_ratio
        self.max_cycles = max_cycles
        obs_dim = 2 * DIM_P + DIM_P * n + (DIM_P + DIM_C) * (n - 1)
        self.spec = EnvSpec(
            name="simple_spread",
            num_agents=n,
            obs_dim=obs_dim,
            action_dim=ACTION_DIM,
            discrete=not continuous,
            episode_length=max_cycles,
            state_dim=n * obs_dim,
        )
        # others[i] = indices j ≠ i in increasing order (mpe2's `others` list order).
        self._others = np.array([[j for j in range(n) if j != i] for i in range(n)])

    @property
    def layout(self) -> EnvLayout:
        """Named feature groups and action facts (module-level ``layout``)."""
        return layout(self.num_agents, self.continuous)

    # ------------------------------------------------------------------ state
    def state_from(
        self, agent_pos: jax.Array, agent_vel: jax.Array, landmark_pos: jax.Array, t: int = 0
    ) -> SpreadState:
        """Build a state from explicit arrays (parity tests, replays).

        Arrays take JAX's default float dtype: float32, or float64 under ``jax.enable_x64``
        (which the parity test uses to compare with mpe2's float64 physics exactly).
        """
        n = self.num_agents
        arrays = {"agent_pos": agent_pos, "agent_vel": agent_vel, "landmark_pos": landmark_pos}
        for field, value in arrays.items():
            if jnp.shape(value) != (n, DIM_P):
                raise ValueError(
                    f"SimpleSpread.state_from: {field} must have shape ({n}, {DIM_P}), "
                    f"got {jnp.shape(value)}"
                )
        return SpreadState(
            agent_pos=jnp.asarray(agent_pos, dtype=float),
            agent_vel=jnp.asarray(agent_vel, dtype=float),
            landmark_pos=jnp.asarray(landmark_pos, dtype=float),
            t=jnp.asarray(t, jnp.int32),
        )

    def reset(self, key: jax.Array) -> tuple[jax.Array, SpreadState]:
        """Agents and landmarks uniform in [−1, 1]², velocities zero (mpe2 `reset_world`)."""
        k_agent, k_land = jax.random.split(key)
        shape = (self.num_agents, DIM_P)
        state = SpreadState(
            agent_pos=jax.random.uniform(k_agent, shape, jnp.float32, -1.0, 1.0),
            agent_vel=jnp.zeros(shape, jnp.float32),
            landmark_pos=jax.random.uniform(k_land, shape, jnp.float32, -1.0, 1.0),
            t=jnp.zeros((), jnp.int32),
        )
        return self.observations(state), state

    # ------------------------------------------------------------- dynamics
    def action_force(self, actions: jax.Array) -> jax.Array:
        """Control force u [N, 2] from actions, exactly as mpe2 `_set_action`."""
        if self.continuous:
            a = jnp.clip(actions, 0.0, 1.0)
            direction = jnp.stack([a[:, 2] - a[:, 1], a[:, 4] - a[:, 3]], axis=-1)
        else:
            direction = jnp.asarray(DISCRETE_DIRECTIONS)[actions]
        # Scale in the state's float dtype, as mpe2 scales its float64 `action.u`.
        return SENSITIVITY * jnp.asarray(direction, dtype=float)

    def contact_force(self, pos: jax.Array) -> jax.Array:
        """Soft contact force on each agent [N, 2] (mpe2 `get_collision_force`, summed)."""
        delta, dist = _pairwise(pos)
        k = CONTACT_MARGIN
        penetration = jnp.logaddexp(0.0, -(dist - COLLISION_DIST) / k) * k
        mag = jnp.where(jnp.eye(pos.shape[0], dtype=bool), 0.0, CONTACT_FORCE * penetration / dist)
        return jnp.sum(mag[..., None] * delta, axis=1)

    def step(
        self, key: jax.Array, state: SpreadState, actions: jax.Array
    ) -> tuple[jax.Array, SpreadState, jax.Array, jax.Array, dict[str, jax.Array]]:
        """One transition; ``key`` is unused (mpe2 Simple Spread has no motor noise)."""
        del key
        force = self.action_force(actions) + self.contact_force(state.agent_pos)
        new_state = state.replace(
            agent_pos=state.agent_pos + state.agent_vel * DT,
            agent_vel=state.agent_vel * (1.0 - DAMPING) + force * DT,
            t=state.t + 1,
        )
        rewards, collisions, min_dist = self._reward_terms(new_state)
        done = new_state.t >= self.max_cycles
        info = {"collisions": collisions, "covered": jnp.sum(min_dist < 0.1)}
        return self.observations(new_state), new_state, rewards, done, info

    def _reward_terms(self, state: SpreadState) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(rewards [N], collisions per agent [N], min agent distance per landmark [N])."""
        _, dist = _pairwise(state.agent_pos)
        n = self.num_agents
        collisions = jnp.sum((dist < COLLISION_DIST) & ~jnp.eye(n, dtype=bool), axis=1)
        to_land = state.agent_pos[:, None, :] - state.landmark_pos[None, :, :]
        min_dist = jnp.min(jnp.sqrt(jnp.sum(to_land**2, axis=-1)), axis=0)
        global_reward = -jnp.sum(min_dist)
        lam = self.local_ratio
        rewards = global_reward * (1.0 - lam) - collisions.astype(global_reward.dtype) * lam
        return rewards, collisions, min_dist

    def reward(self, state: SpreadState) -> jax.Array:
        """Per-agent reward [N] of a (post-step) state."""
        return self._reward_terms(state)[0]

    # ---------------------------------------------------------- observations
    def observations(self, state: SpreadState) -> jax.Array:
        """[vel, pos, landmark − pos (2N), other − pos (2(N−1)), comm zeros (2(N−1))]."""
        n = self.num_agents
        pos = state.agent_pos
        landmark_rel = (state.landmark_pos[None, :, :] - pos[:, None, :]).reshape(n, -1)
        other_rel = (pos[self._others] - pos[:, None, :]).reshape(n, -1)
        comm = jnp.zeros((n, DIM_C * (n - 1)), pos.dtype)
        return jnp.concatenate([state.agent_vel, pos, landmark_rel, other_rel, comm], axis=-1)

    def global_state(self, state: SpreadState) -> jax.Array:
        """mpe2 `state()`: every agent's observation, concatenated [N·O]."""
        return self.observations(state).reshape(-1)

    def avail_actions(self, state: SpreadState) -> jax.Array:
        """Every action is always legal."""
        return jnp.ones((self.num_agents, ACTION_DIM), dtype=bool)

    # ------------------------------------------------------ scripted control
    def scripted_actions(self, state: SpreadState, kp: float = 8.0, kd: float = 2.0) -> jax.Array:
        """Landmark-assignment controller.

        Each step, agents take the assignment σ (a permutation) that minimises
        Σ_i |p_i − q_σ(i)| over all N! permutations, then a saturated PD command
        d_i = clip(kp·(q_σ(i) − p_i) − kd·v_i, −1, 1) per axis. Continuous actions encode
        d as a = [0, max(−dx,0), max(dx,0), max(−dy,0), max(dy,0)]; discrete actions pick
        the direction in DISCRETE_DIRECTIONS nearest to d (no_op when |d| is small).
        The default gains were picked by a small grid search on N=3 returns (both action
        types): the return is flat within ~0.1 around them.
        """
        n = self.num_agents
        if n > MAX_SCRIPTED_AGENTS:
            raise ValueError(
                f"SimpleSpread.scripted_actions: num_agents={n} exceeds "
                f"{MAX_SCRIPTED_AGENTS} (enumerates all N! assignments)"
            )
        perms = jnp.asarray(np.array(list(itertools.permutations(range(n)))))  # [P, N]
        to_land = state.landmark_pos[None, :, :] - state.agent_pos[:, None, :]  # [N, L, 2]
        cost = jnp.sqrt(jnp.sum(to_land**2, axis=-1))  # [N, L]
        best = perms[jnp.argmin(jnp.sum(cost[jnp.arange(n), perms], axis=1))]  # [N]
        err = to_land[jnp.arange(n), best]
        d = jnp.clip(kp * err - kd * state.agent_vel, -1.0, 1.0)
        if self.continuous:
            zero = jnp.zeros((n,), jnp.float32)
            pos, neg = jnp.maximum(d, 0.0), jnp.maximum(-d, 0.0)
            return jnp.stack([zero, neg[:, 0], pos[:, 0], neg[:, 1], pos[:, 1]], axis=-1)
        dirs = jnp.asarray(DISCRETE_DIRECTIONS)
        return jnp.argmin(jnp.sum((d[:, None, :] - dirs[None]) ** 2, axis=-1), axis=1).astype(
            jnp.int32
        )
