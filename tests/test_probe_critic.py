"""Post-hoc probe Q critics: discounted returns, a fit of a known return surface (values and
action effects), and fit → save → load next to a real (tiny) HATRPO checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import checkpoint, probe_critic
from agents.probe_critic import ProbeConfig, ProbeData
from cli import enable_compilation_cache
from cli.hydra_entry import compose_config
from cli.training import run as train_run
from envs import make_env
from envs.base import EnvSpec

enable_compilation_cache()


def test_discounted_returns_match_a_python_loop_and_stop_at_the_episode_end():
    rng = np.random.default_rng(0)
    reward = rng.normal(size=(6, 2, 3)).astype(np.float32)  # [T, E, N]
    valid = np.ones((6, 2), np.float32)
    valid[4:, 1] = 0.0  # episode 1 ended after step 3
    expected = np.zeros_like(reward)
    for e in range(2):
        g = np.zeros(3)
        for t in reversed(range(6)):
            g = valid[t, e] * (reward[t, e] + 0.9 * g)
            expected[t, e] = g
    got = probe_critic.discounted_returns(jnp.asarray(reward), jnp.asarray(valid)[..., None], 0.9)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_collect_clips_continuous_actions_and_discounts_per_episode():
    env = make_env("simple_spread", num_agents=3, continuous=True)
    sample = lambda key, obs, avail: 2.0 * jax.random.normal(key, (3, env.spec.action_dim))
    data = jax.jit(lambda k: probe_critic.collect(env, sample, k, 4, 0.1))(jax.random.PRNGKey(0))
    assert data.act.shape == (4, 25, 3, env.spec.action_dim) and data.ret.shape == (4, 25, 3)
    assert float(data.act.min()) == 0.0 and float(data.act.max()) == 1.0  # clipped to the box
    ret = probe_critic.discounted(data, 0.9).ret
    np.testing.assert_allclose(ret[:, -1], data.ret[:, -1])
    np.testing.assert_allclose(ret[:, :-1], data.ret[:, :-1] + 0.9 * ret[:, 1:], rtol=1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"probe\.holdout must be in \(0, 1\), got 1\.0"):
        ProbeConfig.from_mapping({"holdout": 1.0})
    with pytest.raises(ValueError, match=r"probe\.epoch: unknown probe critic setting"):
        ProbeConfig.from_mapping({"epoch": 3})


def test_probe_fits_a_known_return_surface():
    """G_j = sin(o·w_j) + 0.5·o_{0,0}·o_{1,1} + c_j[a_0] + d_j[a_1] on random observations and
    uniform discrete actions: held-out R² > 0.95 for both agents, and the fitted action effects
    Q_j(a_0 = k) − Q_j(a_0 = 0) recover c_j[k] − c_j[0]."""
    n, o_dim, a_dim, size = 2, 3, 4, 5000
    spec = EnvSpec("toy", n, o_dim, a_dim, True, 25, n * o_dim)
    k_obs, k_act, k_w, k_c, k_d, k_init, k_fit = jax.random.split(jax.random.PRNGKey(0), 7)
    obs = jax.random.normal(k_obs, (size, n, o_dim))
    actions = jax.random.randint(k_act, (size, n), 0, a_dim)
    w = jax.random.normal(k_w, (n, n * o_dim)) / np.sqrt(n * o_dim)
    c = jax.random.uniform(k_c, (n, a_dim), minval=-1.0, maxval=1.0)
    d = jax.random.uniform(k_d, (n, a_dim), minval=-1.0, maxval=1.0)

    def surface(obs, actions):
        flat = obs.reshape(obs.shape[0], -1)
        cross = 0.5 * obs[:, 0, 0] * obs[:, 1, 1]
        return jnp.sin(flat @ w.T) + cross[:, None] + c[:, actions[:, 0]].T + d[:, actions[:, 1]].T

    data = ProbeData(obs, jax.nn.one_hot(actions, a_dim), surface(obs, actions), jnp.ones((size,)))
    fit_data = jax.tree_util.tree_map(lambda x: x[:4000], data)
    held_out = jax.tree_util.tree_map(lambda x: x[4000:], data)
    cfg = ProbeConfig(epochs=20, batch_size=256, lr=3e-3)
    critic, params = probe_critic.init_params(spec, cfg, k_init)
    untrained = probe_critic.r_squared(critic, params, held_out)
    params, losses = probe_critic.fit(critic, params, fit_data, cfg, k_fit)
    r2 = probe_critic.r_squared(critic, params, held_out)
    assert np.all(r2 > 0.95) and np.all(untrained < 0.5), (r2, untrained)
    assert float(losses[-1]) < 0.1 * float(losses[0])

    def q_with_first_action(k):
        act = held_out.act.at[:, 0].set(jax.nn.one_hot(k, a_dim))
        return probe_critic.critic_values(critic, params, held_out.obs, act)  # [S, N]

    effects = np.stack([np.mean(q_with_first_action(k) - q_with_first_action(0), 0) for k in
                        range(a_dim)])  # fmt: skip
    np.testing.assert_allclose(effects, (c - c[:, :1]).T, atol=0.1)


def test_fit_save_load_next_to_a_hatrpo_checkpoint(tmp_path):
    config = compose_config(
        [
            "algo=hatrpo_smoke",
            "train.total_env_steps=200",
            "train.eval_episodes=0",
            "train.progress=false",
        ]  # fmt: skip
    )
    train_run(config, tmp_path)
    cfg = ProbeConfig(hidden=(16,), episodes=40, epochs=3, batch_size=128)
    meta = probe_critic.fit_and_save(tmp_path, cfg)
    assert meta["policy_env_steps"] == 200 and meta["algo"] == "hatrpo"
    assert len(meta["report"]["holdout_r2"]) == 3 and meta["report"]["holdout_episodes"] == 8

    critic, params, loaded = probe_critic.load(tmp_path, 200)
    assert loaded == meta
    _, refit, _ = probe_critic.fit_policy(checkpoint.load_policy(tmp_path), cfg)
    for x, y in zip(*map(jax.tree_util.tree_leaves, (params, refit)), strict=True):
        np.testing.assert_array_equal(x, y)  # same config and seed: the same probe
    policy = checkpoint.load_policy(tmp_path)
    obs, _ = policy.env.reset(jax.random.PRNGKey(0))
    act = jnp.zeros((3, policy.env.spec.action_dim))
    q = jax.vmap(critic.apply, in_axes=(0, None, None))(params, obs, act)
    assert q.shape == (3,) and np.all(np.isfinite(q))

    with pytest.raises(FileNotFoundError, match="no probe critic for the policy checkpoint"):
        probe_critic.load(tmp_path, 400)
    probe_critic.fit_and_save(tmp_path, cfg)  # a refit replaces the saved probe
    assert probe_critic.load(tmp_path, 200)[2]["report"] == meta["report"]
