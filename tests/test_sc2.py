"""The SC2 translation layer on hand-built s2clientprotocol observations (no game here).

Expected values are worked out by hand from the SMAX layout (13 features per other unit:
health / max, offset / sight range, last move, last attack / (A − 1), cooldown / max,
type bits; 10 own features) and cross-checked against JaxMARL's own SMAX functions applied
to the translated State.
"""

from __future__ import annotations

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest
import typer
from s2clientprotocol import common_pb2, raw_pb2, sc2api_pb2
from typer.testing import CliRunner

from envs.sc2 import (
    ABILITY_ATTACK,
    ABILITY_MOVE,
    ABILITY_STOP,
    Sc2Env,
    Sc2InstallError,
    actions_to_commands,
    bind_units,
    check_install,
    estimate_enemy_actions,
    make_layout,
    smax_outcome,
    state_from_observation,
)
from envs.smax import MARINE, STALKER, ZEALOT, Smax, import_smax

SMAC_STALKER = 1970  # a SMAC map's custom ally id (any id outside the standard table)
PLAYABLE = common_pb2.RectangleI(p0=common_pb2.PointI(x=10, y=20), p1=common_pb2.PointI(x=42, y=52))
# centre (26, 36): an SC2 point p is at 16 + (p − (26, 36)) in SMAX's frame
SIGHT, STALKER_MAX, ZEALOT_MAX, STALKER_CD = 10.0, 160.0, 150.0, 1.87
A = 5 + 3  # actions of 3s_vs_3z


def observation(units: list[dict]) -> sc2api_pb2.ResponseObservation:
    obs = sc2api_pb2.ResponseObservation()
    for spec in units:
        u = obs.observation.raw_data.units.add()
        u.tag, u.unit_type, u.owner = spec["tag"], spec["type"], spec["owner"]
        u.alliance = raw_pb2.Self if spec["owner"] == 1 else raw_pb2.Enemy
        u.pos.x, u.pos.y, u.pos.z = *spec["pos"], 8.0
        u.health, u.shield = spec["health"], spec.get("shield", 0.0)
        if "cooldown" in spec:  # game loops; SC2 sends it for our units only
            u.weapon_cooldown = spec["cooldown"]
    return obs


# Episode start: allies in raw order 101, 102, 103; SMAC's sort by (type, x, y) gives
# slots 103, 101, 102. Enemy 203 is 19.5 from ally slot 0, beyond sight 10.
START = [
    dict(tag=101, type=SMAC_STALKER, owner=1, pos=(21.0, 34.0), health=80, shield=80),
    dict(tag=102, type=SMAC_STALKER, owner=1, pos=(23.0, 37.5), health=80, shield=80),
    dict(tag=103, type=SMAC_STALKER, owner=1, pos=(20.5, 36.0), health=60, shield=30, cooldown=14),
    dict(tag=201, type=73, owner=2, pos=(26.0, 36.0), health=100, shield=20),
    dict(tag=202, type=73, owner=2, pos=(24.5, 37.0), health=70, shield=0),
    dict(tag=203, type=73, owner=2, pos=(40.0, 36.0), health=100, shield=50),
]
# One step later after actions [east, south, attack enemy 1]: ally 101 died (gone from
# raw_data), enemy 201 moved 1 west, 202 stood still next to ally slot 2 (1.58 apart),
# 203 stood alone.
LATER = [
    dict(tag=102, type=SMAC_STALKER, owner=1, pos=(23.0, 37.5), health=80, shield=80, cooldown=0),
    dict(tag=103, type=SMAC_STALKER, owner=1, pos=(21.0, 36.0), health=60, shield=10, cooldown=7),
    dict(tag=201, type=73, owner=2, pos=(25.0, 36.0), health=100, shield=20),
    dict(tag=202, type=73, owner=2, pos=(24.5, 37.0), health=70, shield=0),
    dict(tag=203, type=73, owner=2, pos=(40.0, 36.0), health=100, shield=50),
]
ACTIONS = np.array([1, 2, 6])


@pytest.fixture(scope="module")
def smax() -> Smax:
    return Smax(3, map_name="3s_vs_3z")


@pytest.fixture(scope="module")
def layout():
    return make_layout("3s_vs_3z", PLAYABLE)


@pytest.fixture(scope="module")
def episode(layout):
    first = observation(START)
    roster = bind_units(first, layout)
    s0 = state_from_observation(first, layout, roster)
    s1 = state_from_observation(observation(LATER), layout, roster, s0, ACTIONS, max_steps=150)
    return roster, s0, s1


def unit(health, rel, move=(0.0, 0.0), attack=0.0, cooldown=0.0, kind=STALKER):
    """A unit's 13 observed features, written out."""
    bits = np.eye(6)[kind]
    return np.array([health, *rel, *move, attack, cooldown, *bits], np.float32)


def test_state_slots_positions_health_cooldown(layout, episode):
    roster, s0, s1 = episode
    assert roster.ally_tags == (103, 101, 102) and roster.enemy_tags == (201, 202, 203)
    np.testing.assert_allclose(
        s0.unit_positions, [[10.5, 16], [11, 14], [13, 17.5], [16, 16], [14.5, 17], [30, 16]]
    )
    np.testing.assert_allclose(s0.unit_health, [90, 160, 160, 120, 70, 150])  # health + shield
    np.testing.assert_allclose(s0.unit_weapon_cooldowns, [14 / 22.4, 0, 0, 0, 0, 0], rtol=1e-6)
    assert s0.unit_types.tolist() == [STALKER] * 3 + [ZEALOT] * 3
    assert s0.unit_teams.tolist() == [0, 0, 0, 1, 1, 1] and int(s0.step) == 0
    # the dead ally keeps its slot and last position, with no health
    assert s1.unit_alive.tolist() == [True, False, True, True, True, True]
    np.testing.assert_allclose(s1.unit_positions[1], [11, 14])
    np.testing.assert_allclose(s1.unit_health, [70, 0, 160, 120, 70, 150])
    assert int(s1.step) == 1 and not bool(s1.done)


def test_previous_actions_ours_and_estimated_enemies(episode):
    _, _, s1 = episode
    # ours as issued (east, south, attack 6); enemy 201 moved west, 202 stood still with
    # ally slot 2 at 1.58 < zealot range 2 at the step's start: attack in SMAX's enemy
    # numbering 5 + (3−1−2)
    np.testing.assert_allclose(
        s1.prev_movement_actions, [[1, 0], [0, -1], [0, 0], [-1, 0], [0, 0], [0, 0]]
    )
    assert s1.prev_attack_actions.tolist() == [0, 0, 6, 0, 5, 0]


def test_observation_matches_hand_computed_features(smax, episode):
    _, s0, s1 = episode
    obs0 = np.asarray(smax.observations(s0))
    assert obs0.shape == (3, smax.spec.obs_dim)
    hand = np.concatenate(
        [
            unit(1.0, (0.5 / SIGHT, -2 / SIGHT)),  # ally slot 1
            unit(1.0, (2.5 / SIGHT, 1.5 / SIGHT)),  # ally slot 2
            unit(120 / ZEALOT_MAX, (5.5 / SIGHT, 0.0), kind=ZEALOT),  # enemy 0
            unit(70 / ZEALOT_MAX, (4.0 / SIGHT, 1 / SIGHT), kind=ZEALOT),  # enemy 1
            np.zeros(13),  # enemy 2: out of sight
            [90 / STALKER_MAX, 10.5 / 32, 16 / 32, 14 / 22.4 / STALKER_CD, *np.eye(6)[STALKER]],
        ]
    )
    np.testing.assert_allclose(obs0[0], hand, rtol=1e-5, atol=1e-6)
    obs1 = np.asarray(smax.observations(s1))
    np.testing.assert_array_equal(obs1[1], 0.0)  # a dead ally sees nothing
    np.testing.assert_allclose(
        obs1[0, : 13 * 5].reshape(5, 13)[[0, 1, 2, 3]],
        [
            np.zeros(13),  # the dead ally
            unit(1.0, (0.2, 0.15), attack=6 / (A - 1)),
            unit(120 / ZEALOT_MAX, (0.4, 0.0), move=(-1, 0), kind=ZEALOT),
            unit(70 / ZEALOT_MAX, (0.35, 0.1), attack=5 / (A - 1), kind=ZEALOT),
        ],
        rtol=1e-5,
        atol=1e-6,
    )


def test_observation_and_masks_equal_jaxmarl_smax_on_the_same_state(smax, episode):
    """Built independently of envs.smax, straight from JaxMARL."""
    jaxmarl_smax = import_smax()
    types = jnp.array([STALKER] * 3 + [ZEALOT] * 3, jnp.uint8)
    game = jaxmarl_smax.SMAX(scenario=jaxmarl_smax.Scenario(types, 3, 3, False, False))
    for state in episode[1:]:
        obs, avail = game.get_obs(state), game.get_avail_actions(state)
        allies = [f"ally_{i}" for i in range(3)]
        np.testing.assert_array_equal(smax.observations(state), jnp.stack([obs[a] for a in allies]))
        np.testing.assert_array_equal(
            smax.avail_of(state), jnp.stack([avail[a] for a in allies]).astype(bool)
        )
    # by hand: ally 0 at start reaches enemies 0 (5.5) and 1 (4.1) within stalker range 6
    assert np.asarray(smax.avail_of(episode[1]))[0].tolist() == [1, 1, 1, 1, 1, 1, 1, 0]


def test_smac_ally_ids_and_enemy_slots_by_type():
    """2s3z: custom ally ids (stalker = smallest, zealot = next) sorted SMAC's way;
    enemies grouped into SMAX's stalker, zealot slots, raw order within a type."""
    layout = make_layout("2s3z", PLAYABLE)
    units = [
        dict(tag=1, type=3001, owner=1, pos=(20.0, 30.0), health=100),
        dict(tag=2, type=3000, owner=1, pos=(21.0, 30.0), health=80),
        dict(tag=3, type=3001, owner=1, pos=(19.0, 31.0), health=100),
        dict(tag=4, type=3000, owner=1, pos=(20.0, 32.0), health=80),
        dict(tag=5, type=3001, owner=1, pos=(19.0, 29.0), health=100),
        *(
            dict(tag=t, type=k, owner=2, pos=(30.0, 30.0 + t), health=80)
            for t, k in [(11, 73), (12, 74), (13, 73), (14, 74), (15, 73)]
        ),
    ]
    roster = bind_units(observation(units), layout)
    assert roster.ally_tags == (4, 2, 5, 3, 1) and roster.enemy_tags == (12, 14, 11, 13, 15)
    wrong = [dict(u, type=48) if u["tag"] == 11 else u for u in units]
    with pytest.raises(ValueError, match="raw_data.units: enemy units of SMAX types"):
        bind_units(observation(wrong), layout)
    with pytest.raises(ValueError, match="no SC2 layout for map 'nope'"):
        make_layout("nope", PLAYABLE)
    assert make_layout("3m", PLAYABLE).allies == (MARINE,) * 3


def test_actions_to_commands(layout, episode):
    roster, _, s1 = episode

    def unpack(action):
        cmd = action.action_raw.unit_command
        target = cmd.WhichOneof("target")
        where = cmd.target_world_space_pos
        return (
            cmd.ability_id,
            list(cmd.unit_tags),
            (where.x, where.y) if target == "target_world_space_pos" else cmd.target_unit_tag,
        )

    # slot 0 (tag 103 at SC2 (21, 36)) north by 2; slot 1 is dead: no command
    got = [unpack(a) for a in actions_to_commands(np.array([0, 4, 5]), s1, roster, layout)]
    assert got[0][0] == ABILITY_MOVE and got[0][1] == [103]
    np.testing.assert_allclose(got[0][2], (21.0, 38.0))
    assert got[1:] == [(ABILITY_ATTACK, [102], 201)]
    got = [unpack(a) for a in actions_to_commands(np.array([3, 0, 4]), s1, roster, layout)]
    np.testing.assert_allclose(got[0][2], (19.0, 36.0))
    assert got[1] == (ABILITY_STOP, [102], 0)
    # east and south from slot 2 (SC2 (23, 37.5)); an attack on a dead enemy stands still
    dead_enemy = state_from_observation(
        observation([u for u in LATER if u["tag"] != 201]), layout, roster, s1, ACTIONS
    )
    got = [unpack(a) for a in actions_to_commands(np.array([5, 0, 1]), dead_enemy, roster, layout)]
    assert got[0] == (ABILITY_STOP, [103], 0)
    np.testing.assert_allclose(got[1][2], (25.0, 37.5))
    got = actions_to_commands(np.array([4, 0, 2]), dead_enemy, roster, layout)
    np.testing.assert_allclose(unpack(got[1])[2], (23.0, 35.5))
    with pytest.raises(ValueError, match=r"actions: expected 3 integers in \[0, 8\)"):
        actions_to_commands(np.array([8, 0, 0]), s1, roster, layout)


def test_enemy_estimate_uses_the_step_start():
    """Targets are chosen at the step's start (an ally killed during the step still was
    one); the closest in range wins; a moving enemy is not attacking."""
    before = np.array([[10, 10], [20, 10], [11.5, 10], [21, 10], [30, 10]], np.float32)
    after = before + np.array([[0, 0], [0, 0], [0, 0], [0, 0], [0, 1.2]], np.float32)
    alive_after = np.array([False, True, True, True, True])
    types = np.array([STALKER, STALKER, ZEALOT, ZEALOT, ZEALOT])
    moves, attacks = estimate_enemy_actions(
        before, after, np.ones(5, bool), alive_after, types, num_allies=2
    )
    np.testing.assert_array_equal(moves, [[0, 0], [0, 0], [0, 1]])
    assert attacks.tolist() == [5 + 1, 5 + 0, 0]  # enemies number allies in reverse


def test_episode_ends_when_a_side_is_gone(layout, episode):
    roster, _, s1 = episode
    only_ours = observation([u for u in LATER if u["owner"] == 1])
    end = state_from_observation(only_ours, layout, roster, s1, ACTIONS)
    assert bool(end.done) and not end.unit_alive[3:].any()
    smax = Smax(3, map_name="3s_vs_3z")
    reward, info = smax_outcome(smax, s1, end)
    # enemies lost 120 + 70 + 150 of max 150 each, averaged over 3, plus the win bonus 1
    np.testing.assert_allclose(reward, [(120 + 70 + 150) / 150 / 3 + 1] * 3, rtol=1e-6)
    assert bool(info["won"]) and int(info["allies_alive"]) == 2
    timeout = state_from_observation(observation(LATER), layout, roster, s1, ACTIONS, max_steps=2)
    assert bool(timeout.done) and not bool(smax.won(timeout))
    reward, info = smax_outcome(smax, s1, timeout)
    np.testing.assert_allclose(reward, 0.0)
    assert not bool(info["won"])


def test_check_install_messages(tmp_path, monkeypatch):
    monkeypatch.delenv("SC2PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(Sc2InstallError) as err:
        check_install(None, "3s_vs_3z")
    assert str(err.value) == (
        f"set SC2PATH to a StarCraft II install (found none at {tmp_path / 'StarCraftII'}: "
        "no Versions/*/SC2_x64)"
    )
    root = tmp_path / "sc2"
    (root / "Versions" / "Base75689").mkdir(parents=True)
    monkeypatch.setenv("SC2PATH", str(root))
    with pytest.raises(Sc2InstallError, match="set SC2PATH to a StarCraft II install"):
        check_install(None, "3s_vs_3z")
    (root / "Versions" / "Base75689" / "SC2_x64").write_bytes(b"")
    with pytest.raises(Sc2InstallError) as err:
        check_install(None, "3s_vs_3z")
    assert str(err.value).startswith(
        "copy SMAC_Maps/3s_vs_3z.SC2Map into $SC2PATH/Maps "
        "(https://github.com/oxwhirl/smac#smac-maps)"
    )
    (root / "Maps" / "SMAC_Maps").mkdir(parents=True)
    (root / "Maps" / "SMAC_Maps" / "3s_vs_3z.SC2Map").write_bytes(b"")
    if importlib.util.find_spec("pysc2_evolved") is None:
        with pytest.raises(Sc2InstallError, match=r"^pip install pysc2-evolved"):
            check_install(None, "3s_vs_3z")
    else:
        assert check_install(None, "3s_vs_3z") == root
    # an explicit folder wins over $SC2PATH
    with pytest.raises(Sc2InstallError, match=f"found none at {tmp_path / 'elsewhere'}"):
        check_install(str(tmp_path / "elsewhere"), "3s_vs_3z")


def test_sc2_env_shapes_and_missing_game(tmp_path, monkeypatch):
    monkeypatch.setenv("SC2PATH", str(tmp_path))
    env = Sc2Env(3, map_name="3s_vs_3z")
    assert env.spec.name == "sc2" and env.spec.obs_dim == Smax(3, map_name="3s_vs_3z").spec.obs_dim
    assert env.max_steps == 150
    with pytest.raises(Sc2InstallError, match="set SC2PATH"):
        env.reset()
    with pytest.raises(ValueError, match="env.difficulty: expected one of"):
        Sc2Env(3, map_name="3s_vs_3z", difficulty="Brutal")
    with pytest.raises(ValueError, match="env.num_agents: map 3s_vs_3z has 3 allies, got 5"):
        Sc2Env(5, map_name="3s_vs_3z")


def test_sc2_evaluate_without_game_is_one_line_exit_6(tmp_path, monkeypatch):
    from cli import play_sc2

    app = typer.Typer()
    app.callback()(lambda: None)
    play_sc2.register(app)
    monkeypatch.setenv("SC2PATH", str(tmp_path))
    result = CliRunner().invoke(app, ["sc2-evaluate", str(tmp_path / "run"), "--map", "3m"])
    assert result.exit_code == 6  # cli.EXIT_MISSING_GAME
    lines = result.output.strip().splitlines()
    assert lines == [
        f"error: set SC2PATH to a StarCraft II install (found none at {tmp_path}: "
        "no Versions/*/SC2_x64)"
    ]
