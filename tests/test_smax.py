"""SMAX behind our env interface, masked training on it, and forensics end to end on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import evaluate, hatrpo, maddpg
from envs import make_env
from envs.smax import SMAX_MAPS, STALKER, STOP_ACTION, ZEALOT

FORENSICS = Path(sys.executable).with_name("forensics")


@pytest.fixture(scope="module")
def env():
    return make_env("smax", num_agents=3, continuous=False, map_name="3s_vs_3z")


def random_legal(key, avail):
    return jax.random.categorical(key, jnp.where(avail, 0.0, -1e9)).astype(jnp.int32)


def test_3s_vs_3z_is_three_stalkers_against_three_zealots(env):
    obs, state = env.reset(jax.random.PRNGKey(0))
    inner = state.state
    assert inner.unit_types.tolist() == [STALKER] * 3 + [ZEALOT] * 3
    assert env.spec.episode_length == SMAX_MAPS["3s_vs_3z"].max_steps == 150
    assert obs.shape == (3, env.spec.obs_dim) == (3, 75)
    assert env.global_state(state).shape == (env.spec.state_dim,)
    assert env.avail_actions(state).shape == (3, env.spec.action_dim) == (3, 8)
    # own features (last 10): health fraction 1, position / map size, stalker bit
    np.testing.assert_allclose(obs[:, -10], 1.0)
    np.testing.assert_allclose(obs[:, -9:-7], inner.unit_positions[:3] / 32.0, rtol=1e-6)
    assert obs[:, -6 + STALKER].tolist() == [1.0] * 3


def test_observations_and_masks_are_jaxmarls(env):
    """Our arrays are JaxMARL's dicts stacked in agent order, step after step."""
    game = env.game
    obs, state = env.reset(jax.random.PRNGKey(1))
    step = jax.jit(env.step)
    for t in range(5):
        ref_obs = game.get_obs(state)
        ref_avail = game.get_avail_actions(state)
        np.testing.assert_array_equal(obs, np.stack([ref_obs[a] for a in game.agents]))
        np.testing.assert_array_equal(
            env.avail_actions(state), np.stack([ref_avail[a] for a in game.agents]).astype(bool)
        )
        actions = random_legal(jax.random.PRNGKey(t), env.avail_actions(state))
        obs, state, *_ = step(jax.random.PRNGKey(100 + t), state, actions)


def test_global_state_scales_positions_and_cooldowns_as_observations_do(env):
    """x, y / map size; cooldown / the unit type's, clipped to [0, 1] (SMAX's own-features
    scaling), on a state mid-battle where idle units' raw cooldowns are below 0."""
    obs, state = env.reset(jax.random.PRNGKey(2))
    step = jax.jit(env.step)
    for t in range(12):
        actions = random_legal(jax.random.PRNGKey(t), env.avail_actions(state))
        obs, state, *_ = step(jax.random.PRNGKey(100 + t), state, actions)
    inner = state.state
    world = np.asarray(env.game.get_world_state(state))
    ours = np.asarray(env.global_state(state)).reshape(-1)
    per_unit, raw = ours[:60].reshape(6, 10), world[:60].reshape(6, 10)
    assert raw[:, 3].min() < 0 < raw[:, 3].max()  # idle (clipped) and reloading units
    np.testing.assert_allclose(per_unit[:, 1:3], raw[:, 1:3] / 32.0, rtol=1e-6)
    full = np.asarray(env.game._env.unit_type_weapon_cooldowns)[np.asarray(inner.unit_types)]
    np.testing.assert_allclose(per_unit[:, 3], np.clip(raw[:, 3] / full, 0, 1), rtol=1e-6)
    assert per_unit[:, 3].min() >= 0 and per_unit[:, 3].max() <= 1
    np.testing.assert_array_equal(per_unit[:, [0, *range(4, 10)]], raw[:, [0, *range(4, 10)]])
    np.testing.assert_array_equal(ours[60:], world[60:])
    # An ally's own observation carries the same scaled cooldown (SMAX's own features).
    own = np.asarray(obs)[:, -10:]
    alive = np.asarray(inner.unit_alive)[:3]
    np.testing.assert_allclose(own[alive, 3], per_unit[:3][alive, 3], rtol=1e-6)


def test_attack_masks_follow_range_and_death(env):
    """Attack j is legal iff enemy j is alive and within the stalker's range (6); a dead
    ally may only stop."""
    _, state = env.reset(jax.random.PRNGKey(3))
    inner = state.state
    pos = inner.unit_positions.at[0].set(jnp.array([10.0, 16.0]))
    pos = pos.at[3].set(jnp.array([15.0, 16.0]))  # 5 away from ally 0: in range
    pos = pos.at[4].set(jnp.array([17.0, 16.0]))  # 7 away: out of range
    alive = inner.unit_alive.at[5].set(False).at[1].set(False)
    health = inner.unit_health.at[5].set(0.0).at[1].set(0.0)
    pos = pos.at[5].set(jnp.array([11.0, 16.0]))  # in range but dead
    state = state.replace(
        state=inner.replace(unit_positions=pos, unit_alive=alive, unit_health=health)
    )
    avail = np.asarray(env.avail_actions(state))
    assert avail[0].tolist() == [True] * 5 + [True, False, False]
    assert avail[1].tolist() == [False] * 4 + [True] + [False] * 3  # dead: stop only
    assert avail[:, STOP_ACTION].all()


def test_finished_battles_are_frozen_and_won_is_reported(env):
    """Kill every enemy: the step reports done and won, then further steps change nothing
    and pay nothing."""
    _, state = env.reset(jax.random.PRNGKey(4))
    inner = state.state
    health = inner.unit_health.at[3:].set(0.0)
    state = state.replace(state=inner.replace(unit_health=health))
    obs, state, reward, done, info = env.step(jax.random.PRNGKey(5), state, jnp.full(3, 4))
    assert bool(done) and bool(info["won"]) and int(info["allies_alive"]) == 3
    assert float(reward[0]) == pytest.approx(1.0)  # SMAX's win bonus
    obs2, state2, reward2, done2, info2 = env.step(jax.random.PRNGKey(6), state, jnp.zeros(3, int))
    np.testing.assert_array_equal(obs2, obs)
    np.testing.assert_array_equal(state2.state.unit_positions, state.state.unit_positions)
    assert float(jnp.abs(reward2).sum()) == 0.0 and bool(done2) and bool(info2["won"])


def test_random_play_loses_and_is_deterministic(env):
    act = lambda obs, avail: jnp.full(obs.shape[0], STOP_ACTION, jnp.int32)
    a = evaluate.run_episodes(env, act, jax.random.PRNGKey(7), 16)
    b = evaluate.run_episodes(env, act, jax.random.PRNGKey(7), 16)
    np.testing.assert_array_equal(a.returns, b.returns)
    assert a.won is not None and not bool(a.won.any())  # standing still never wins


def test_bad_env_options_name_the_field():
    with pytest.raises(ValueError, match="env.map_name: unknown SMAX map '4m'"):
        make_env("smax", num_agents=3, continuous=False, map_name="4m")
    with pytest.raises(ValueError, match="env.num_agents: map 2s3z has 5 allies, got 3"):
        make_env("smax", num_agents=3, continuous=False, map_name="2s3z")
    with pytest.raises(ValueError, match="env.continuous"):
        make_env("smax", num_agents=3, continuous=True, map_name="3m")
    with pytest.raises(ValueError, match="env.sight: unknown key for env smax"):
        make_env("smax", num_agents=3, continuous=False, map_name="3m", sight=3)


@pytest.mark.parametrize("algo", ["maddpg", "hatrpo"])
def test_training_on_smax_takes_only_legal_actions(algo):
    """One real chunk of each algorithm on 3m: finite metrics, and the trained greedy
    policy never picks a masked action (checked on fresh states)."""
    env = make_env("smax", num_agents=3, continuous=False, map_name="3m")
    if algo == "maddpg":
        cfg = maddpg.MaddpgConfig(num_envs=4, iterations_per_chunk=3, warmup=256,
                                  batch_size=128, buffer_size=2048, sharing="both")  # fmt: skip
        trainer = maddpg.make_trainer(env, cfg)
        actor, _ = maddpg.build_networks(env.spec, cfg)
        act_fn = lambda p: lambda obs, avail: maddpg.greedy_actions(actor, p["actor"], obs, avail)
    else:
        cfg = hatrpo.HatrpoConfig(num_envs=4, iterations_per_chunk=2)
        trainer = hatrpo.make_trainer(env, cfg)
        act_fn = lambda p: hatrpo.greedy_act_fn(env.spec, cfg, p)
    state, metrics = trainer.train_chunk(trainer.init(jax.random.PRNGKey(0)))
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    policy = act_fn(trainer.policy_params(state))

    def illegal(key):
        obs, s = env.reset(key)

        def step(carry, k):
            obs, s, bad = carry
            avail = env.avail_actions(s)
            a = policy(obs, avail)
            bad = bad + jnp.sum(~avail[jnp.arange(3), a])
            obs, s, *_ = env.step(k, s, a)
            return (obs, s, bad), None

        (_, _, bad), _ = jax.lax.scan(step, (obs, s, 0), jax.random.split(key, 60))
        return bad

    assert int(jax.jit(jax.vmap(illegal))(jax.random.split(jax.random.PRNGKey(1), 8)).sum()) == 0


@pytest.mark.parametrize("auto_reset", [False, True])
def test_hatrpo_collector_pads_or_restarts_finished_battles(auto_reset):
    """``algo.auto_reset``: a battle that ends is followed at once by a fresh one (every step
    real) instead of padding; in both modes only a first battle's step T − 1 is a time limit
    and the logged return is the mean over the battles that ended."""
    env = make_env("smax", num_agents=3, continuous=False, map_name="3m")
    cfg = hatrpo.HatrpoConfig(num_envs=8, auto_reset=auto_reset)
    head = hatrpo.make_policy_head(env.spec, cfg)
    thetas = hatrpo.init_actors(env.spec, cfg, jax.random.PRNGKey(0))
    collect = jax.jit(lambda th, k: hatrpo.collect(env, head, cfg, th, k))
    traj, episode_return = collect(thetas, jax.random.PRNGKey(1))
    done, valid, terminal = (
        np.asarray(x).astype(bool) for x in (traj.done, traj.valid, traj.terminal)
    )
    T = env.spec.episode_length
    ended = done & valid  # [T, E]
    same_battle = np.all(np.asarray(traj.state[1:] == traj.next_state[:-1]), axis=-1)
    if auto_reset:
        assert valid.all() and ended.sum() > 2 * cfg.num_envs
        np.testing.assert_array_equal(same_battle, ~done[:-1])
    else:
        assert (ended.sum(axis=0) == 1).all() and same_battle.all()
        assert not valid[np.cumsum(ended, axis=0) - ended > 0].any()  # padding after the end
    first_battle = np.cumsum(done, axis=0) - done == 0
    time_limit = first_battle & (np.arange(T) == T - 1)[:, None]
    np.testing.assert_array_equal(terminal[valid], (done & ~time_limit)[valid])
    battle_returns, running = [], np.zeros(cfg.num_envs)
    for t in range(T):  # the reference: sum each battle's mean per-agent reward until it ends
        running += np.asarray(traj.reward[t]).mean(axis=-1) * valid[t]
        battle_returns += list(running[ended[t]])
        running[ended[t]] = 0.0
    assert float(episode_return) == pytest.approx(np.mean(battle_returns), rel=1e-5)


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(FORENSICS), *args], capture_output=True, text=True,
                            timeout=timeout, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_smax_train_rollout_diagnose_evaluate_end_to_end(tmp_path):
    """The installed CLI on 3s_vs_3z: a short MADDPG run, the paired worst-action protocol on
    2 seeds (2 × 6 pairs × {high, low} = 24 attacked episodes), clean calibration episodes,
    diagnose and evaluate; the store's onsets lie inside the episodes actually played."""
    import pandas as pd

    from forensics.store import open_store

    trained = run("train", "env=smax_3s_vs_3z", "algo=maddpg_smax", "algo.num_envs=4",
        "algo.iterations_per_chunk=2", "algo.warmup=512", "train.total_env_steps=1200",
        "train.eval_episodes=8", "train.progress=false", f"out_dir={tmp_path}")  # fmt: skip
    run_dir = tmp_path / "smax_3s_vs_3z-maddpg-seed0"
    assert "wins" in trained.stdout  # SMAX evaluation reports the win rate
    run("rollout", str(run_dir), "-o", str(tmp_path / "attacked"), "--seeds", "0:2")
    run("rollout", str(run_dir), "-o", str(tmp_path / "clean"), "--seeds", "100:140",
        "attack=none")  # fmt: skip
    store = open_store(tmp_path / "attacked")
    cols = next(store.iter_batches(["clean", "start", "valid", "victim", "actions", "avail"], 4096))
    taken = np.take_along_axis(cols["avail"], cols["actions"][..., None], axis=-1)[..., 0]
    assert taken[cols["valid"]].all()  # every recorded action was legal, attacks included
    attacked = ~cols["clean"]
    assert attacked.sum() == 24
    played = cols["valid"].sum(axis=1)
    assert np.all(cols["start"][attacked] < played[attacked])  # onset inside the battle
    run("diagnose", str(tmp_path / "attacked"), "-c", str(tmp_path / "clean"),
        "-o", str(tmp_path / "diag"))  # fmt: skip
    run("evaluate", str(tmp_path / "diag"), "--out", str(tmp_path / "t.parquet"))
    table = pd.read_parquet(tmp_path / "t.parquet")
    assert set(table["env"]) == {"smax_3s_vs_3z"}
    assert table["episodes"].max() == 24
