"""The fault library: feature groups against the envs' own observation code, and each new
sensor / actuator / parameter fault on hand-worked cases in the real jitted rollout (tiny
random networks, Simple Spread N=3)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_team

from agents import attacks
from agents import rollout as R
from agents.attacks import Attack, Target
from envs import layout, make_env

N = 3
T = 25


# ------------------------------------------------------------------ feature groups
@pytest.mark.parametrize(
    "name, n, kw",
    [
        ("simple_spread", 3, {}),
        ("simple_spread", 5, {"continuous": True}),
        ("smax", 3, {"map_name": "3s_vs_3z"}),
        ("smax", 5, {"map_name": "2s3z"}),
    ],
)
def test_feature_groups_partition_the_observation(name, n, kw):
    env = make_env(name, num_agents=n, continuous=kw.pop("continuous", False), **kw)
    lay = layout(env.spec)
    assert lay.feature_groups.keys() == env.layout.feature_groups.keys()
    every = np.concatenate(list(lay.feature_groups.values()))
    assert np.array_equal(np.sort(every), np.arange(env.spec.obs_dim))  # each index once
    for sub in lay.feature_subgroups.values():  # every subgroup lies inside one group
        assert any(np.isin(sub, g).all() for g in lay.feature_groups.values())
    assert lay.mask(["all"], env.spec.obs_dim).all()
    with pytest.raises(ValueError, match="unknown feature group 'nope'"):
        lay.mask(["nope"], env.spec.obs_dim)


def _moved(before: np.ndarray, after: np.ndarray) -> list[set[int]]:
    """Per agent, the observation indices whose value changed."""
    return [
        set(np.flatnonzero(np.abs(a - b) > 1e-7).tolist())
        for b, a in zip(before, after, strict=True)
    ]


def _group_of(lay, idx: set[int]) -> set[str]:
    return {g for g, ix in lay.feature_groups.items() if idx & set(ix.tolist())}


def test_simple_spread_groups_follow_the_observation_construction():
    env = make_env("simple_spread", num_agents=N, continuous=False)
    lay = env.layout
    _, s = env.reset(jax.random.PRNGKey(0))
    obs = np.asarray(env.observations(s))
    # landmarks move: every agent's "landmarks" group moves, and nothing else
    moved = _moved(obs, np.asarray(env.observations(s.replace(landmark_pos=s.landmark_pos + 0.1))))
    assert all(m == set(lay.feature_groups["landmarks"].tolist()) for m in moved)
    # agent 0's velocity: its own_velocity only
    vel = s.agent_vel.at[0].add(0.3)
    moved = _moved(obs, np.asarray(env.observations(s.replace(agent_vel=vel))))
    assert moved[0] == set(lay.feature_groups["own_velocity"].tolist())
    assert moved[1] == moved[2] == set()
    # agent 1 moves: agents 0 and 2 see it among their teammates only; agent 1 sees its own
    # position, the landmarks and its teammates move relative to itself
    pos = s.agent_pos.at[1].add(0.2)
    moved = _moved(obs, np.asarray(env.observations(s.replace(agent_pos=pos))))
    assert _group_of(lay, moved[0]) == _group_of(lay, moved[2]) == {"teammates"}
    assert _group_of(lay, moved[1]) == {"own_position", "landmarks", "teammates"}
    assert np.all(obs[:, lay.feature_groups["comm"]] == 0)


def test_smax_groups_follow_the_observation_construction():
    env = make_env("smax", num_agents=3, continuous=False, map_name="3s_vs_3z")
    lay = env.layout
    _, state = env.reset(jax.random.PRNGKey(0))
    inner = state.state
    # bring the enemies inside every ally's sight range, so that they are observed at all
    ally_centre = jnp.mean(inner.unit_positions[:3], axis=0)
    pos = inner.unit_positions.at[3:].set(ally_centre + jnp.array([[1.0, 0], [0, 1.0], [1, 1]]))
    inner = inner.replace(unit_positions=pos)
    obs = np.asarray(env.observations(inner))
    assert np.abs(obs[:, lay.feature_groups["enemies"]]).sum() > 0  # enemies are seen
    # enemy health: the enemies group of every ally, in its enemy_health entries only
    hurt = inner.replace(unit_health=inner.unit_health.at[3:].multiply(0.5))
    moved = _moved(obs, np.asarray(env.observations(hurt)))
    assert all(m == set(lay.feature_subgroups["enemy_health"].tolist()) for m in moved)
    # ally 1's health: agent 1's own_health; agents 0 and 2 see it among their allies
    hurt = inner.replace(unit_health=inner.unit_health.at[1].multiply(0.5))
    moved = _moved(obs, np.asarray(env.observations(hurt)))
    assert moved[1] == set(lay.feature_subgroups["own_health"].tolist())
    for i in (0, 2):
        assert _group_of(lay, moved[i]) == {"allies"} and len(moved[i]) == 1
        assert moved[i] <= set(lay.feature_subgroups["ally_health"].tolist())


# --------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"name": "obs_dropout", "p": 1.5}, "attack.p: expected a probability in [0, 1], got 1.5"),
        ({"name": "obs_stale", "k": 0}, "attack.k: expected an integer >= 1, got 0"),
        ({"name": "obs_bias", "offset": -1.0}, "attack.offset: expected a number >= 0"),
        ({"name": "action_saturation", "fraction": 2}, "attack.fraction: expected a number in"),
        ({"name": "param_bitflip", "bit": 32}, "attack.bit: expected an integer in [0, 31]"),
        ({"name": "obs_bias", "features": []}, "attack.features: expected a feature group"),
        ({"name": "action_dropout", "features": ["landmarks"]}, "attack.features: only sensor"),
    ],
)
def test_bad_fault_values_are_one_line_errors_naming_the_field(kw, message):
    with pytest.raises(ValueError) as err:
        Attack.from_config(kw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_env_dependent_fault_checks():
    ss = make_env("simple_spread", num_agents=N, continuous=False).spec
    cont = make_env("simple_spread", num_agents=N, continuous=True).spec
    bias = Attack.from_config({"name": "obs_bias", "features": ["landmarks", "own_velocity"]})
    assert bias.features == ("landmarks", "own_velocity") and hash(bias)
    bias.check_env(ss)
    with pytest.raises(ValueError, match=r"^attack.features: simple_spread: unknown feature "):
        Attack(name="obs_bias", features=("enemies",)).check_env(ss)
    with pytest.raises(ValueError, match=r"^attack.name: action_second_best ranks discrete"):
        Attack(name="action_second_best").check_env(cont)


# --------------------------------------------------------------------- rollouts
@functools.cache
def run(continuous: bool = False, **kw):
    """Four episodes of ``Attack(**kw)`` with hand-picked victims and onsets (0 and 1 test
    the start of the episode, 22 a window cut by its end)."""
    env, team, ap, cp = random_team(N, continuous)
    attack = Attack(**kw)
    target = Target(
        victim=jnp.array([0, 1, 2, 1], jnp.int32),
        observed=jnp.zeros(4, jnp.int32),
        start=jnp.array([0, 1, 9, 22], jnp.int32),
        window=jnp.full(4, attack.window, jnp.int32),
    )
    ep = R.make_rollout(env, team, attack)(ap, cp, R.seed_keys(np.arange(4)), target)
    return env, team, ap, jax.device_get(ep)


def windows(ep):
    """(b, victim, window steps) of each episode."""
    for b in range(ep.key.shape[0]):
        yield b, int(ep.target.victim[b]), np.flatnonzero(ep.active[b])


def untouched_outside_the_window(ep) -> None:
    victim = np.arange(N) == ep.target.victim[:, None, None]  # [B, 1, N]
    hit = ep.active[..., None] & victim
    assert np.array_equal(ep.obs_perceived[~hit], ep.obs_true[~hit])
    discrete = ep.actions.ndim == 3
    same = ep.actions == ep.clean_actions if discrete else (ep.actions == ep.clean_actions).all(-1)
    assert same[~hit].all()


def test_frozen_reading_is_the_onset_reading():
    _, _, _, ep = run(name="obs_frozen", window=6)
    for b, v, steps in windows(ep):
        assert np.array_equal(
            ep.obs_perceived[b, steps, v], ep.obs_true[b, [steps[0]] * len(steps), v]
        )
    untouched_outside_the_window(ep)
    assert int(ep.active[3].sum()) == 3  # cut by the episode's end


def test_stale_reading_lags_k_steps_and_reads_the_first_before_step_k():
    _, _, _, ep = run(name="obs_stale", window=5, k=2)
    for b, v, steps in windows(ep):
        lagged = np.maximum(steps - 2, 0)
        assert np.array_equal(ep.obs_perceived[b, steps, v], ep.obs_true[b, lagged, v])
    untouched_outside_the_window(ep)


def test_bias_moves_only_the_chosen_group_by_a_constant_offset():
    env, _, _, ep = run(name="obs_bias", window=5, offset=0.25, features=("landmarks",))
    group = env.layout.feature_groups["landmarks"]
    other = np.setdiff1d(np.arange(env.spec.obs_dim), group)
    for b, v, steps in windows(ep):
        diff = ep.obs_perceived[b, steps, v] - ep.obs_true[b, steps, v]
        np.testing.assert_allclose(np.abs(diff[:, group]), 0.25, rtol=1e-5)
        assert np.all(diff[:, other] == 0)
        np.testing.assert_allclose(diff, np.repeat(diff[:1], len(steps), 0), atol=1e-6)
    untouched_outside_the_window(ep)


def test_drift_grows_linearly_over_the_window():
    env, _, _, ep = run(name="obs_drift", window=4, offset=0.8)
    for b, v, steps in windows(ep):
        diff = ep.obs_perceived[b, steps, v] - ep.obs_true[b, steps, v]
        u = diff[0] / (0.8 / 4)
        np.testing.assert_allclose(np.abs(u), 1.0, rtol=1e-4)  # a ±1 direction
        ramp = (np.arange(len(steps)) + 1)[:, None] / 4
        np.testing.assert_allclose(diff, 0.8 * ramp * u, atol=1e-5)
    untouched_outside_the_window(ep)


def test_dropout_of_a_group_with_p_1_reads_zeros_there_and_truth_elsewhere():
    env, _, _, ep = run(name="obs_dropout", window=5, p=1.0, features=("teammates",))
    group = env.layout.feature_groups["teammates"]
    rest = np.setdiff1d(np.arange(env.spec.obs_dim), group)
    for b, v, steps in windows(ep):
        assert np.all(ep.obs_perceived[b, steps][:, v, group] == 0)
        assert np.array_equal(
            ep.obs_perceived[b, steps][:, v, rest], ep.obs_true[b, steps][:, v, rest]
        )
    untouched_outside_the_window(ep)


@pytest.mark.parametrize("continuous", [False, True])
def test_command_dropout_with_p_1_is_all_noop_in_the_window_and_none_outside(continuous):
    env, _, _, ep = run(continuous, name="action_dropout", window=5, p=1.0)
    noop = np.asarray(env.layout.noop_action)
    for b, v, steps in windows(ep):
        assert np.all(ep.actions[b, steps, v] == noop)
    untouched_outside_the_window(ep)
    _, _, _, never = run(continuous, name="action_dropout", window=5, p=0.0)
    # (the victim's own forward pass may differ from the vmapped clean one by an ulp)
    np.testing.assert_allclose(never.actions, never.clean_actions, rtol=1e-6, atol=1e-7)


def test_delayed_command_is_the_one_chosen_k_steps_before():
    _, _, _, ep = run(name="action_delay", window=5, k=2)
    for b, v, steps in windows(ep):
        want = np.where(steps >= 2, ep.clean_actions[b, np.maximum(steps - 2, 0), v], 0)
        assert np.array_equal(ep.actions[b, steps, v], want)  # empty queue before step 2: no-op
    untouched_outside_the_window(ep)
    _, _, _, ep = run(True, name="action_delay", window=5, k=3)  # continuous: a = 0 before
    for b, v, steps in windows(ep):
        past = ep.clean_actions[b, np.maximum(steps - 3, 0), v] * (steps >= 3)[:, None]
        np.testing.assert_allclose(ep.actions[b, steps, v], past, rtol=1e-6, atol=1e-7)


def test_masked_env_delay_and_second_best_never_execute_an_illegal_command():
    spec = make_env("smax", num_agents=3, continuous=False, map_name="3s_vs_3z").spec
    team = attacks.Team(spec, actor_apply=None)
    attack = Attack(name="action_delay", k=2)
    memory = attacks.initial_memory(attack, spec)
    # at t = 5 the ring of k + 1 = 3 rows holds d^3 in slot 0: attack enemy 1 (action 6)
    memory = memory._replace(act_hist=jnp.array([6, 1, 2], jnp.int32))
    avail = jnp.ones((3, spec.action_dim), bool)
    step = attacks.Step(
        jnp.zeros((3, spec.obs_dim)), avail, None, jnp.int32(1), jnp.int32(0), jnp.int32(5),
        jnp.int32(4), jnp.int32(5), memory, jax.random.PRNGKey(0),
    )  # fmt: skip
    out_v = jnp.arange(spec.action_dim, dtype=jnp.float32)
    assert int(attacks.act(attack, team, None, step, out_v, None, None)) == 6
    gone = step._replace(avail=avail.at[1, 6].set(False))  # enemy 1 died / left range
    assert int(attacks.act(attack, team, None, gone, out_v, None, None)) == 4  # stop
    second = Attack(name="action_second_best")
    assert int(attacks.act(second, team, None, step, out_v, None, None)) == spec.action_dim - 2
    dead = step._replace(avail=jnp.zeros_like(avail).at[:, 4].set(True))  # only stop is legal
    assert int(attacks.act(second, team, None, dead, out_v, None, None)) == 4


def test_second_best_is_the_rank_2_logit_on_the_true_observation():
    _, team, ap, ep = run(name="action_second_best", window=5)
    for b, v, steps in windows(ep):
        vp = attacks.agent_slice(ap, v)
        logits = np.asarray(
            jax.vmap(lambda o, vp=vp: team.actor_apply(vp, o))(ep.obs_true[b, steps, v])
        )
        assert np.array_equal(ep.actions[b, steps, v], np.argsort(logits, axis=-1)[:, -2])
    untouched_outside_the_window(ep)


def test_discrete_saturation_loses_one_axis_and_continuous_saturation_clips():
    env, _, _, ep = run(name="action_saturation", window=12)
    axis = env.layout.move_axis
    lost_axes = set()
    for b, v, steps in windows(ep):
        clean, taken = ep.clean_actions[b, steps, v], ep.actions[b, steps, v]
        assert np.all((taken == clean) | (taken == 0))
        lost = set(axis[clean[taken != clean]].tolist())
        kept = set(axis[clean[taken == clean]].tolist()) - {0}
        assert len(lost) <= 1 and not (lost & kept)  # one axis, entirely lost
        lost_axes |= lost
    assert lost_axes  # some move was actually lost in these episodes
    untouched_outside_the_window(ep)
    _, _, _, ep = run(True, name="action_saturation", window=5, fraction=0.3)
    for b, v, steps in windows(ep):
        np.testing.assert_allclose(
            ep.actions[b, steps, v], np.clip(ep.clean_actions[b, steps, v], 0, 0.3), rtol=1e-6
        )
    untouched_outside_the_window(ep)


def test_bitflip_of_the_sign_with_p_1_negates_only_the_victims_weights():
    _, _, ap, _ = random_team(N, False)
    flip = jax.jit(functools.partial(attacks.corrupt_params, Attack(name="param_bitflip", p=1.0)))
    got = flip(jax.random.PRNGKey(0), ap, jnp.int32(2))
    for p, q in zip(jax.tree_util.tree_leaves(ap), jax.tree_util.tree_leaves(got), strict=True):
        assert np.array_equal(q[2], -p[2]) and np.array_equal(q[:2], p[:2])
    none = Attack(name="param_bitflip", p=0.0, bit=23)
    same = attacks.corrupt_params(none, jax.random.PRNGKey(0), ap, jnp.int32(2))
    assert all(
        np.array_equal(p, q)
        for p, q in zip(jax.tree_util.tree_leaves(ap), jax.tree_util.tree_leaves(same), strict=True)
    )


# --------------------------------------------------------------------- efficacy
def test_action_changed_counts_only_the_victims_window():
    # 3 episodes, T = 4, N = 2; the victim is agent 0, 1, 0
    clean = np.zeros((3, 4, 2), int)
    taken = clean.copy()
    taken[0, 1, 0] = 2  # victim, inside the window → changed
    taken[1, 3, 1] = 4  # victim, outside the window → not counted
    taken[2, 1, 1] = 1  # another agent → not counted
    active = np.zeros((3, 4), bool)
    active[:, :3] = True
    got = R.action_changed(taken, clean, np.array([0, 1, 0]), active)
    assert got.tolist() == [True, False, False]
    table = R.efficacy_table(
        Attack(name="action_delay"),
        np.array([-10.0]),
        np.array([[-12.0, -10.0, -11.0]]),
        np.full((1, 3), 2),
        np.array([[0, 1, 0]]),
        np.array([[1, 0, 1]]),
        got[None],
    )
    row = table.iloc[0]
    assert row["action_changed"] == pytest.approx(1 / 3) and row["drop"] == pytest.approx(1.0)
    assert row["drop_ci95"] == pytest.approx(1.96 * 1.0 / np.sqrt(3))
    assert row["action_changed_ci95"] == pytest.approx(1.96 * np.sqrt(2 / 9 / 3))
