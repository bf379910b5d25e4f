"""The attacked rollout, the paired protocol, replay and counterfactuals (fast: tiny nets)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import leaves_equal, random_team

from agents import attacks
from agents import rollout as R
from agents.attacks import Attack

N = 3
SEEDS = np.arange(4)


@functools.cache
def paired(continuous: bool = False):
    """The paper's paired worst-action protocol on SEEDS, plus a rollout of the same attack."""
    env, team, ap, cp = random_team(N, continuous)
    attack = Attack(name="worst_action")
    protocol = R.make_protocol(env, team, attack)
    return protocol, R.make_rollout(env, team, attack), protocol(ap, cp, SEEDS)


def test_paired_protocol_shapes_and_ground_truth():
    env, _, _, _ = random_team(N, False)
    _, _, chunk = paired()
    T, M = env.spec.episode_length, N * (N - 1) * 2
    ep = chunk.attacked
    assert ep.obs_true.shape == (4, M, T, N, env.spec.obs_dim)
    assert ep.actions.shape == ep.clean_actions.shape == (4, M, T, N)
    assert ep.actions.dtype == jnp.int32 and ep.critic_actions.shape == (4, M, T, N, 5)
    assert ep.rewards.shape == (4, M, T, N) and ep.key.shape == (4, M, 2)
    assert chunk.clean.obs_true.shape == (4, T, N, env.spec.obs_dim)
    assert not bool(chunk.clean.active.any()) and int(chunk.clean.target.window.max()) == 0
    # every ordered pair × {high, low} per seed, onsets inside the searched first 25 %
    pairs = {(i, j) for i in range(N) for j in range(N) if i != j}
    for s in range(4):
        got = zip(ep.target.victim[s].tolist(), ep.target.observed[s].tolist(), strict=True)
        assert set(got) == pairs
    assert sorted(set(chunk.start_class.ravel().tolist())) == [0, 1]
    assert int(ep.target.start.max()) < attacks.search_steps(Attack(), T)
    # the active mask is exactly [start, start + 5)
    t = np.arange(T)
    start = np.asarray(ep.target.start)[..., None]
    assert np.array_equal(ep.active, (t >= start) & (t < start + 5))
    # attacked episodes share the seed's key, hence its initial state
    assert np.array_equal(ep.key, np.repeat(np.asarray(chunk.clean.key)[:, None], M, axis=1))
    assert np.array_equal(ep.obs_true[:, :, 0], np.repeat(chunk.clean.obs_true[:, None, 0], M, 1))


def test_victim_takes_its_worst_action_and_nobody_else_is_touched():
    _, _, chunk = paired()
    ep = chunk.attacked
    victim_mask = np.arange(N) == np.asarray(ep.target.victim)[..., None, None]  # [S,M,1,N]
    attacked = np.asarray(ep.active)[..., None] & victim_mask
    # the attacked entries differ from the clean policy's choice, nothing else does
    differs = np.asarray(ep.actions != ep.clean_actions)
    assert np.array_equal(differs, attacked)
    # worst_action never perturbs observations
    assert np.array_equal(ep.obs_perceived, ep.obs_true)
    # clean_actions are the greedy policy on the true obs
    env, team, ap, _ = random_team(N, False)
    logits = jax.vmap(team.actor_apply)(ap, jnp.moveaxis(ep.obs_true, -2, 0))
    assert np.array_equal(jnp.argmax(jnp.moveaxis(logits, 0, -2), -1), ep.clean_actions)
    one_hot = jax.nn.one_hot(ep.actions, 5)
    assert np.array_equal(ep.critic_actions, one_hot)


def test_same_seeds_give_identical_arrays():
    env, team, ap, cp = random_team(N, False)
    protocol, _, chunk = paired()
    again = protocol(ap, cp, SEEDS)
    assert leaves_equal(chunk, again)
    other = protocol(ap, cp, SEEDS + 100)
    assert not np.array_equal(chunk.clean.obs_true, other.clean.obs_true)


def test_chunked_protocol_equals_one_call():
    env, team, ap, cp = random_team(N, False)
    protocol, _, chunk = paired()
    # 5 seeds in chunks of 4: the last chunk is padded to the compiled size and trimmed
    parts = list(R.iter_protocol(protocol, ap, cp, np.arange(5), chunk_size=4))
    assert [p.seeds.tolist() for p in parts] == [[0, 1, 2, 3], [4]]
    assert leaves_equal(parts[0], chunk)
    alone = jax.tree_util.tree_map(lambda x: x[:1], protocol(ap, cp, np.full(4, 4)))
    assert leaves_equal(parts[1], alone)


def test_replay_reproduces_recorded_steps_exactly():
    env, team, ap, cp = random_team(N, False)
    _, rollout, chunk = paired()
    ep = chunk.attacked
    # open loop: the env alone, from the recorded key and actions
    replay = jax.jit(jax.vmap(jax.vmap(functools.partial(R.replay_actions, env))))
    obs, rewards = replay(ep.key, ep.actions)
    assert np.array_equal(obs, ep.obs_true) and np.array_equal(rewards, ep.rewards)
    # closed loop: one recorded episode regenerated from (key, target) alone
    pick = lambda x: x[3, 7][None]
    again = rollout(ap, cp, pick(ep.key), jax.tree_util.tree_map(pick, ep.target))
    assert leaves_equal(again, jax.tree_util.tree_map(pick, ep))


def test_counterfactual_of_a_clean_episode_is_the_episode():
    env, team, ap, cp = random_team(N, False)
    _, rollout, chunk = paired()
    cf = R.counterfactual(rollout, ap, cp, chunk.clean)
    assert leaves_equal(cf, chunk.clean)
    div = R.divergence(chunk.clean, cf)
    assert np.all(np.asarray(div.first) == env.spec.episode_length)


def test_counterfactual_of_attacked_episodes_is_the_clean_seed_and_gives_divergence():
    env, team, ap, cp = random_team(N, False)
    _, rollout, chunk = paired()
    ep = chunk.attacked
    cf = R.counterfactual(rollout, ap, cp, ep)
    M = ep.key.shape[1]
    clean = jax.tree_util.tree_map(lambda x: np.repeat(np.asarray(x)[:, None], M, 1), chunk.clean)
    assert np.array_equal(cf.obs_true, clean.obs_true)
    assert np.array_equal(cf.actions, clean.actions)
    div = R.divergence(ep, cf)
    v, start = np.asarray(ep.target.victim), np.asarray(ep.target.start)
    rows = np.indices(v.shape)
    # the victim's action departs at the onset; its own state one step later (the velocity
    # changes first); nobody departs before the onset
    assert np.array_equal(div.action[rows[0], rows[1], v], start)
    assert np.array_equal(div.obs[rows[0], rows[1], v], start + 1)
    assert np.all(np.asarray(div.first) >= start[..., None])


def test_stuck_actuator_repeats_the_onset_action():
    env, team, ap, cp = random_team(N, False)
    rollout = R.make_rollout(env, team, Attack(name="stuck_actuator", window=6))
    keys = R.seed_keys(np.arange(4))
    target = attacks.Target(
        victim=jnp.array([0, 1, 2, 1], jnp.int32),
        observed=jnp.zeros(4, jnp.int32),
        start=jnp.array([0, 3, 10, 22], jnp.int32),
        window=jnp.full(4, 6, jnp.int32),
    )
    ep = rollout(ap, None, keys, target)
    for b in range(4):  # four episodes, checked one by one for readability
        v, s = int(target.victim[b]), int(target.start[b])
        held = np.asarray(ep.actions[b, s : s + 6, v])
        assert np.all(held == int(ep.clean_actions[b, s, v]))
    assert int(ep.active[3].sum()) == 3  # the window is cut at the episode end


def test_continuous_obs_attack_stays_in_the_ball_on_the_victim_only():
    env, team, ap, cp = random_team(N, True)
    rollout = R.make_rollout(
        env, team, Attack(name="obs_pgd", epsilon=0.05, steps=3, step_size=0.02)
    )
    target = attacks.Target(
        victim=jnp.array([0, 2], jnp.int32),
        observed=jnp.array([1, 0], jnp.int32),
        start=jnp.array([2, 15], jnp.int32),
        window=jnp.array([5, 5], jnp.int32),
    )
    ep = rollout(ap, cp, R.seed_keys(np.arange(2)), target)
    assert ep.actions.shape == (2, 25, N, 5) and ep.actions.dtype == jnp.float32
    assert float(ep.actions.min()) >= 0.0 and float(ep.actions.max()) <= 1.0
    gap = np.abs(np.asarray(ep.obs_perceived - ep.obs_true)).max(-1)  # [B, T, N]
    victim_mask = np.arange(N) == np.asarray(target.victim)[:, None, None]
    assert np.all(gap[~(np.asarray(ep.active)[..., None] & victim_mask)] == 0)
    assert gap.max() <= 0.05 + 1e-6 and gap.max() > 0
    with pytest.raises(ValueError, match="attack.name: 'obs_pgd' .* needs a Q critic"):
        rollout(ap, None, R.seed_keys(np.arange(2)), target)


def test_efficacy_table_on_known_returns():
    attack = Attack(name="worst_action")
    clean = np.array([-10.0, -20.0])
    # per seed: pair (0,1) high, pair (0,1) low, pair (1,0) high, pair (1,0) low
    attacked = np.array([[-15.0, -11.0, -12.0, -13.0], [-30.0, -21.0, -22.0, -20.0]])
    cls = np.tile([0, 1, 0, 1], (2, 1))
    victim = np.tile([0, 0, 1, 1], (2, 1))
    observed = 1 - victim
    table = R.efficacy_table(attack, clean, attacked, cls, victim, observed).set_index("start")
    assert list(table.index) == ["high_influence", "low_influence"]
    assert table.loc["high_influence", "drop"] == pytest.approx((5 + 2 + 10 + 2) / 4)
    assert table.loc["low_influence", "drop"] == pytest.approx((1 + 3 + 1 + 0) / 4)
    assert table.loc["high_influence", "share_hurt"] == 1.0
    assert table.loc["low_influence", "share_hurt"] == 0.75
    assert table.loc["high_influence", "high_beats_low"] == 0.75  # loses for seed 0, (1,0)
    assert table.loc["high_influence", "episodes"] == 4
