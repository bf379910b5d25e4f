"""StarCraft micromanagement in JAX: JaxMARL's SMAX behind ``envs.base.MultiAgentEnv``.

SMAX (Rutherford et al., JaxMARL) re-implements the StarCraft Multi-Agent Challenge's
unit-vs-unit battles as a pure JAX simulation: our team (the *allies*, the learning agents)
fights a team driven by SMAX's heuristic enemy (shoot the closest unit in range, otherwise
walk towards a visible enemy). This module only adapts it:

* arrays with a leading agent axis instead of dicts keyed by agent name: obs [N, O],
  avail [N, A] bool, team reward broadcast to every agent [N];
* no auto-reset: after the battle ends (``done``) the state is frozen, so fixed-length
  ``lax.scan``s over ``max_steps`` pad episodes with inert steps that every consumer masks
  (evaluation, training and the recorded ``active`` flag);
* ``info["won"]``: all enemies dead with at least one ally alive (SMAX's win bonus rule);
* the critics' global state is SMAX's world state with positions scaled to [0, 1] by the
  map size (SMAX leaves them in map units, up to 32).

Actions (A = 5 + number of enemies): 0 north, 1 east, 2 south, 3 west, 4 stop, 5 + j attack
enemy j (legal when j is alive and within the unit's attack range). A dead unit may only
stop. Observations are SMAX's ``unit_list``: 13 features per other unit (allies first,
then enemies; health, relative position / sight range, last move, last target, cooldown,
unit-type bits; zeros when dead or out of sight) and 10 own features.

Maps (``SMAX_MAPS``) use SMAC's unit compositions and time limits; ``3s_vs_3z`` (3 stalkers
vs 3 zealots, the paper's map) is not among SMAX's built-ins and is defined here. SMAX's
units and timings are not SC2's (0.5 s per step vs SMAC's ≈0.36 s, shields folded into
health), so returns and win rates are SMAX's own, not SMAC's.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from envs.base import EnvLayout, EnvSpec, contiguous_groups

# SMAX unit-type indices (``SMAX.unit_type_names``).
MARINE, MARAUDER, STALKER, ZEALOT, ZERGLING, HYDRALISK = range(6)
NUM_MOVE_ACTIONS = 5  # north, east, south, west, stop
STOP_ACTION = 4
UNIT_FEATURES = 7 + 6  # per other unit: health, dx, dy, last move (2), last target, cooldown, type
OWN_FEATURES = 4 + 6  # health, x, y, cooldown, type bits
# Offsets inside one other unit's block and inside the own block (JaxMARL ``_observe_features``
# and ``_get_own_features``).
UNIT_HEALTH, UNIT_POSITION = [0], [1, 2]
OWN_HEALTH, OWN_POSITION = [0], [1, 2]


def layout(num_allies: int, num_enemies: int) -> EnvLayout:
    """Feature groups of ally i's ``unit_list`` observation (JaxMARL ``get_obs_unit_list``):
    one 13-feature block per other unit — the n−1 other allies first (in index order,
    skipping i), then the m enemies — then i's own 10 features.

      allies   13(n−1): per ally health / type max, (x_j − x_i, y_j − y_i) / sight range,
               last move (2), last attack target / (A−1), weapon cooldown fraction,
               6 unit-type bits; all zero when dead or out of sight
      enemies  13m: the same for every enemy (their last actions are hidden: zeros)
      own      10: health fraction, (x, y) / map size, cooldown fraction, 6 type bits

    Subgroups: ``ally_health``, ``ally_position``, ``enemy_health``, ``enemy_position``,
    ``own_health``, ``own_position``. Actions: 0 north, 1 east, 2 south, 3 west (moves
    along y, x, y, x), 4 stop (the no-op, always legal), 5 + j attack enemy j.
    """
    groups = contiguous_groups(
        [
            ("allies", UNIT_FEATURES * (num_allies - 1)),
            ("enemies", UNIT_FEATURES * num_enemies),
            ("own", OWN_FEATURES),
        ]
    )

    def per_unit(group: str, offsets: list[int]) -> np.ndarray:
        blocks = groups[group].reshape(-1, UNIT_FEATURES)
        return blocks[:, offsets].ravel()

    own = groups["own"]
    subgroups = {
        "ally_health": per_unit("allies", UNIT_HEALTH),
        "ally_position": per_unit("allies", UNIT_POSITION),
        "enemy_health": per_unit("enemies", UNIT_HEALTH),
        "enemy_position": per_unit("enemies", UNIT_POSITION),
        "own_health": own[OWN_HEALTH],
        "own_position": own[OWN_POSITION],
    }
    move_axis = np.zeros(NUM_MOVE_ACTIONS + num_enemies, int)
    move_axis[:4] = [2, 1, 2, 1]
    return EnvLayout(groups, subgroups, STOP_ACTION, move_axis)


def layout_of(spec: EnvSpec) -> EnvLayout:
    """``layout`` from an ``EnvSpec`` of SMAX's layout (SMAX itself or the real game):
    O = 13 (n + m − 1) + 10 gives the number of enemies m."""
    units, rest = divmod(spec.obs_dim - OWN_FEATURES, UNIT_FEATURES)
    enemies = units + 1 - spec.num_agents
    if rest or enemies < 1 or spec.action_dim != NUM_MOVE_ACTIONS + enemies:
        raise ValueError(
            f"env {spec.name}: obs_dim {spec.obs_dim} / action_dim {spec.action_dim} "
            "is not SMAX's unit_list layout"
        )
    return layout(spec.num_agents, enemies)


@dataclass(frozen=True)
class SmaxMap:
    """A battle: unit types of the allies then the enemies, and SMAC's step limit."""

    allies: tuple[int, ...]
    enemies: tuple[int, ...]
    max_steps: int


# Unit compositions and episode limits of SMAC's maps (smac/env/starcraft2/maps/smac_maps.py).
SMAX_MAPS: dict[str, SmaxMap] = {
    "3m": SmaxMap((MARINE,) * 3, (MARINE,) * 3, 60),
    "2s3z": SmaxMap((STALKER,) * 2 + (ZEALOT,) * 3, (STALKER,) * 2 + (ZEALOT,) * 3, 120),
    "3s_vs_3z": SmaxMap((STALKER,) * 3, (ZEALOT,) * 3, 150),
    "5m_vs_6m": SmaxMap((MARINE,) * 5, (MARINE,) * 6, 70),
}


def import_smax() -> Any:
    """JaxMARL's SMAX module, imported on first use: importing jaxmarl loads every JaxMARL
    environment (seconds) and prints a banner on file descriptor 1 (not through
    ``sys.stdout``), which would corrupt our command output; it is sent to /dev/null."""
    if "jaxmarl" not in sys.modules:
        sys.stdout.flush()
        saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        try:
            import jaxmarl.environments  # noqa: F401
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)
    from jaxmarl.environments import smax

    return smax


class Smax:
    """A SMAX battle against the heuristic enemy, implementing ``MultiAgentEnv``."""

    def __init__(
        self,
        num_agents: int,
        continuous: bool = False,
        map_name: str = "3m",
        max_steps: int | None = None,
    ) -> None:
        if map_name not in SMAX_MAPS:
            raise ValueError(
                f"env.map_name: unknown SMAX map {map_name!r}; expected one of {sorted(SMAX_MAPS)}"
            )
        battle = SMAX_MAPS[map_name]
        if num_agents != len(battle.allies):
            raise ValueError(
                f"env.num_agents: map {map_name} has {len(battle.allies)} allies, got {num_agents}"
            )
        if continuous:
            raise ValueError(
                "env.continuous: SMAX maps take discrete actions; set env.continuous=false"
            )
        max_steps = battle.max_steps if max_steps is None else max_steps
        if max_steps < 1:
            raise ValueError(f"env.max_steps: expected an integer >= 1, got {max_steps}")
        self.map_name = map_name
        self.battle = battle
        self.num_agents = num_agents
        self.num_enemies = len(battle.enemies)
        self.max_steps = max_steps
        action_dim = NUM_MOVE_ACTIONS + self.num_enemies
        n_units = num_agents + self.num_enemies
        unit_features, own_features = UNIT_FEATURES, OWN_FEATURES
        self.spec = EnvSpec(
            name="smax",
            num_agents=num_agents,
            obs_dim=unit_features * (n_units - 1) + own_features,
            action_dim=action_dim,
            discrete=True,
            episode_length=max_steps,
            state_dim=(own_features + 2) * n_units,
        )

    @property
    def layout(self) -> EnvLayout:
        """Named feature groups and action facts (module-level ``layout``)."""
        return layout(self.num_agents, self.num_enemies)

    @cached_property
    def game(self) -> Any:
        """The JaxMARL ``HeuristicEnemySMAX`` instance (built on first use). The first use
        is often inside a ``jit`` trace: the module's and the env's constant arrays are
        computed eagerly, or they would be tracers that outlive the trace."""
        with jax.ensure_compile_time_eval():
            smax = import_smax()
            types = jnp.asarray(self.battle.allies + self.battle.enemies, jnp.uint8)
            scenario = smax.Scenario(types, self.num_agents, self.num_enemies, False, False)
            return smax.HeuristicEnemySMAX(scenario=scenario, max_steps=self.max_steps)

    # ------------------------------------------------------------- interface
    def reset(self, key: jax.Array) -> tuple[jax.Array, Any]:
        """Allies spawn around (8, 16) and enemies around (24, 16), ±2 uniform noise."""
        _, state = self.game.reset(key)
        return self.observations(state.state), state

    def step(
        self, key: jax.Array, state: Any, actions: jax.Array
    ) -> tuple[jax.Array, Any, jax.Array, jax.Array, dict[str, jax.Array]]:
        """One env step (8 world steps of 1/16 s); a finished battle stays frozen with zero
        reward. ``done`` is True from the step that ends the battle or hits ``max_steps``."""
        game = self.game
        named = {agent: actions[i] for i, agent in enumerate(game.agents)}
        _, stepped, rewards, _, _ = game.step_env(key, state, named)
        finished = state.state.done
        new_state = jax.tree_util.tree_map(
            lambda old, new: jnp.where(finished, old, new), state, stepped
        )
        reward = jnp.stack([rewards[a] for a in game.agents]) * (1.0 - finished)
        inner = new_state.state
        info = {
            "won": self.won(inner),
            "allies_alive": jnp.sum(inner.unit_alive[: self.num_agents]),
        }
        return self.observations(inner), new_state, reward, inner.done, info

    def avail_actions(self, state: Any) -> jax.Array:
        """Legal actions bool [N, A]: moves while alive, stop always, attack j in range."""
        return self.avail_of(state.state)

    def global_state(self, state: Any) -> jax.Array:
        """SMAX's world state (per unit: health fraction, x, y, cooldown, type bits; then
        teams and types) scaled as SMAX scales a unit's own observation: x, y divided by
        the map size, the weapon cooldown divided by the unit type's and clipped to [0, 1].
        (The raw cooldown keeps falling below 0 while a unit does not fire, to −17 within
        60 steps of random play on 3m: ten times every other input of the critic, and its value
        below 0 means nothing but "ready".)"""
        game = self.game._env
        inner = state.state
        world = game.get_world_state(inner)
        n_units = self.num_agents + self.num_enemies
        per_unit = world[: 10 * n_units].reshape(n_units, 10)
        full_cooldown = game.unit_type_weapon_cooldowns[inner.unit_types]
        per_unit = per_unit.at[:, 1:3].divide(jnp.array([game.map_width, game.map_height]))
        per_unit = per_unit.at[:, 3].set(jnp.clip(per_unit[:, 3] / full_cooldown, 0.0, 1.0))
        return jnp.concatenate([per_unit.reshape(-1), world[10 * n_units :]])

    # ------------------------------------------- shared with the SC2 adapter
    def observations(self, inner: Any) -> jax.Array:
        """Allies' ``unit_list`` observations [N, O] of a SMAX ``State``."""
        obs = self.game._env.get_obs(inner)
        return jnp.stack([obs[a] for a in self.game.agents])

    def avail_of(self, inner: Any) -> jax.Array:
        """Allies' legal actions [N, A] of a SMAX ``State``."""
        avail = self.game._env.get_avail_actions(inner)
        return jnp.stack([avail[a] for a in self.game.agents]).astype(bool)

    def won(self, inner: Any) -> jax.Array:
        """All enemies dead and at least one ally alive."""
        alive = inner.unit_alive
        return jnp.all(~alive[self.num_agents :]) & jnp.any(alive[: self.num_agents])


__all__ = ["SMAX_MAPS", "Smax", "SmaxMap"]
