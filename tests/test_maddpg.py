"""MADDPG, its replay buffer and the evaluation helpers (fast; the whole file ~ a minute)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import leaves_equal

from agents import evaluate, maddpg, networks, replay
from envs import make_env

# 4 envs x 25 steps = 100 transitions per iteration, one iteration per chunk: chunk 1
# fills 100 < warmup (no update), every later chunk makes exactly one gradient update.
TINY = {
    "actor_hidden": [16, 16],
    "critic_hidden": [16, 16],
    "batch_size": 32,
    "buffer_size": 1000,
    "num_envs": 4,
    "updates_per_iteration": 1,
    "iterations_per_chunk": 1,
    "warmup": 150,
}


def trajectory(trainer, seed: int, chunks: int):
    """[(state_0, None), (state_1, metrics_1), ...] from init(PRNGKey(seed))."""
    out = [(trainer.init(jax.random.PRNGKey(seed)), None)]
    for _ in range(chunks):
        out.append(trainer.train_chunk(out[-1][0]))
    return out


# ------------------------------------------------------------------------- replay
def test_replay_wraps_around_and_keeps_the_newest():
    buf = replay.init({"x": jnp.zeros(2), "i": jnp.int32(0)}, capacity=5)
    for start in (0, 3):  # 3 then 4 items: the second batch wraps past the end
        count = 3 if start == 0 else 4
        ids = jnp.arange(start, start + count)
        batch = {"x": jnp.stack([ids, -ids], 1).astype(jnp.float32), "i": ids}
        buf = jax.jit(replay.add)(buf, batch)
    assert int(buf.size) == 5 and int(buf.pos) == 2
    # slots 0,1 were overwritten by items 5,6; items 0,1 are gone.
    assert buf.data["i"].tolist() == [5, 6, 2, 3, 4]
    assert np.array_equal(buf.data["x"][:, 1], -buf.data["i"].astype(np.float32))


def test_replay_packs_only_kept_rows_and_wraps():
    buf = replay.init(jnp.int32(0), capacity=4)
    add = jax.jit(replay.add)
    buf = add(buf, jnp.arange(1, 4), jnp.array([True, False, True]))  # 1, 3 -> slots 0, 1
    assert buf.data.tolist() == [1, 3, 0, 0] and int(buf.size) == 2 and int(buf.pos) == 2
    buf = add(buf, jnp.arange(4, 8), jnp.array([True, True, False, True]))  # 4, 5, 7
    assert buf.data.tolist() == [7, 3, 4, 5] and int(buf.size) == 4 and int(buf.pos) == 1
    buf = add(buf, jnp.arange(8, 10), jnp.zeros(2, bool))  # nothing kept: unchanged
    assert buf.data.tolist() == [7, 3, 4, 5] and int(buf.pos) == 1


def test_replay_samples_only_filled_slots_uniformly():
    buf = replay.init(jnp.int32(0), capacity=100)
    buf = replay.add(buf, jnp.arange(1, 11))  # 10 of 100 slots filled, values 1..10
    draws = np.asarray(replay.sample(buf, jax.random.PRNGKey(0), 20_000))
    assert set(draws.tolist()) == set(range(1, 11))
    counts = np.bincount(draws, minlength=11)[1:]
    assert np.all(np.abs(counts / 20_000 - 0.1) < 0.01)


def test_replay_rejects_bad_sizes():
    with pytest.raises(ValueError, match="capacity"):
        replay.init(jnp.zeros(3), capacity=0)
    with pytest.raises(ValueError, match="exceeds capacity"):
        replay.add(replay.init(jnp.zeros(3), capacity=2), jnp.zeros((3, 3)))


# ------------------------------------------------------------------------- config
def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"algo\.lr_actor must be > 0, got -1"):
        maddpg.MaddpgConfig.from_mapping({"lr_actor": -1})
    with pytest.raises(ValueError, match=r"algo\.batchsize: unknown"):
        maddpg.MaddpgConfig.from_mapping({"batchsize": 8})
    with pytest.raises(ValueError, match=r"algo\.num_envs must be int"):
        maddpg.MaddpgConfig.from_mapping({"num_envs": "many"})
    with pytest.raises(ValueError, match=r"algo\.buffer_size must be >= num_envs"):
        maddpg.make_trainer(
            make_env("simple_spread", num_agents=3, continuous=False),
            {**TINY, "buffer_size": 50, "batch_size": 8},
        )
    cfg = maddpg.MaddpgConfig.from_mapping({"name": "maddpg", "actor_hidden": [8], "gamma": 1})
    assert cfg.actor_hidden == (8,) and cfg.gamma == 1.0


# ----------------------------------------------------------------------- trainer
@pytest.fixture(scope="module", params=[False, True], ids=["discrete", "continuous"])
def tiny(request):
    """A tiny trainer and its first 3 chunks from seed 7 (compiled once per action kind)."""
    env = make_env("simple_spread", num_agents=3, continuous=request.param)
    trainer = maddpg.make_trainer(env, TINY)
    return env, trainer, trajectory(trainer, 7, 3)


def test_warmup_chunk_collects_but_does_not_update(tiny):
    _, trainer, traj = tiny
    (s0, _), (s1, m1) = traj[:2]
    assert int(s1.num_updates) == 0 and int(s1.buffer.size) == trainer.env_steps_per_chunk
    assert leaves_equal(s1.learner, s0.learner)
    assert np.isnan(float(m1["critic_loss"])) and np.isfinite(float(m1["episode_return"]))


def test_train_chunk_is_deterministic_finite_and_counts(tiny):
    env, trainer, traj = tiny
    again = trajectory(trainer, 7, 3)
    assert leaves_equal(traj, again)
    state, metrics = traj[-1]
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    assert int(state.iteration) == 3 and int(state.num_updates) == 2
    assert int(state.buffer.size) == int(metrics["env_steps"]) == 3 * trainer.env_steps_per_chunk
    params = trainer.policy_params(state)
    assert set(params) == {"actor", "critic"}
    assert all(x.shape[0] == env.spec.num_agents for x in jax.tree_util.tree_leaves(params))
    other = trainer.init(jax.random.PRNGKey(8))
    assert not leaves_equal(state.learner.actor_params, other.learner.actor_params)


def test_target_networks_move_by_polyak(tiny):
    _, _, traj = tiny
    (before, _), (after, _) = traj[1:3]  # chunk 2 makes exactly one gradient update
    tau = maddpg.MaddpgConfig().tau
    lb, la = before.learner, after.learner
    assert not leaves_equal(la.actor_params, lb.actor_params)
    for online, old_target, new_target in [
        (la.actor_params, lb.target_actor_params, la.target_actor_params),
        (la.critic_params, lb.target_critic_params, la.target_critic_params),
    ]:
        expected = jax.tree_util.tree_map(lambda p, t: tau * p + (1 - tau) * t, online, old_target)
        for e, got in zip(*map(jax.tree_util.tree_leaves, (expected, new_target)), strict=True):
            np.testing.assert_allclose(got, e, rtol=1e-6, atol=1e-7)


def test_resume_from_checkpoint_equals_not_stopping(tiny, tmp_path):
    _, trainer, traj = tiny
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", traj[2][0])
        ckpt.wait_until_finished()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, traj[2][0])
        restored = ckpt.restore(tmp_path / "ckpt", abstract)
    resumed = trainer.train_chunk(restored)
    assert leaves_equal(resumed, traj[3])


# ------------------------------------------------------------- parameter sharing
def _shared_and_own(tree):
    """(shared leaves, agent-specific leaves) of a stacked params tree."""
    mask = jax.tree_util.tree_leaves(networks.agent_specific_leaves(tree))
    leaves = jax.tree_util.tree_leaves(tree)
    return [x for x, m in zip(leaves, mask, strict=True) if not m], [
        x for x, m in zip(leaves, mask, strict=True) if m
    ]


def test_tied_gradient_is_the_gradient_of_one_shared_network():
    """tie_shared(∂L/∂stacked) = ∂L/∂θ for the network θ that every agent applies (its
    input-layer bias per agent), L = Σ_i L_i(θ, b_i)."""
    actor = networks.Actor(hidden=(8, 8), action_dim=5, discrete=True, activation="silu")
    n, obs = 3, jax.random.normal(jax.random.PRNGKey(1), (3, 4))
    stacked = networks.init_shared(actor, jax.random.PRNGKey(0), n, obs[0])
    mask = networks.agent_specific_leaves(stacked)

    def team_loss(stacked):
        out = jax.vmap(actor.apply)(stacked, obs)
        return jnp.sum(jnp.tanh(out) * jnp.arange(5.0))

    def loss_of_shared(single, own):  # one network θ, agent i's input bias own[i]
        stacked = jax.tree_util.tree_map(
            lambda x, o, m: o if m else jnp.broadcast_to(x, (n, *x.shape)), single, own, mask
        )
        return team_loss(stacked)

    single = jax.tree_util.tree_map(lambda x: x[0], stacked)
    tied = networks.tie_shared(jax.grad(team_loss)(stacked), mask)
    d_single, d_own = jax.grad(loss_of_shared, argnums=(0, 1))(single, stacked)
    for t, s, o, m in zip(
        *map(jax.tree_util.tree_leaves, (tied, d_single, d_own, mask)), strict=True
    ):
        np.testing.assert_allclose(t, o if m else np.broadcast_to(s, t.shape), atol=1e-6)


@pytest.mark.parametrize("continuous", [False, True], ids=["discrete", "continuous"])
def test_sharing_keeps_shared_leaves_tied_through_training(continuous):
    env = make_env("simple_spread", num_agents=3, continuous=continuous)
    trainer = maddpg.make_trainer(env, {**TINY, "sharing": "both"})
    (s0, _), *_, (state, metrics) = trajectory(trainer, 7, 3)
    assert int(state.num_updates) == 2 and np.isfinite(float(metrics["critic_loss"]))
    learner = state.learner
    for before, after in [
        (s0.learner.actor_params, learner.actor_params),
        (s0.learner.critic_params, learner.critic_params),
        (s0.learner.target_actor_params, learner.target_actor_params),
    ]:
        shared, own = _shared_and_own(after)
        assert len(own) == 1 and len(shared) >= 5
        assert all(np.array_equal(x, np.broadcast_to(x[0], x.shape)) for x in shared)
        assert len(np.unique(np.asarray(own[0]), axis=0)) == env.spec.num_agents  # ids differ
        assert not leaves_equal(before, after)
    # Consumers see the usual stacked layout: one slice per agent.
    params = trainer.policy_params(state)
    assert all(x.shape[0] == 3 for x in jax.tree_util.tree_leaves(params))
    actor, _ = maddpg.build_networks(env.spec, maddpg.MaddpgConfig.from_mapping(TINY))
    obs, _ = env.reset(jax.random.PRNGKey(1))
    assert maddpg.greedy_actions(actor, params["actor"], obs).shape[0] == 3


def test_sharing_one_network_only():
    env = make_env("simple_spread", num_agents=3, continuous=False)
    state = maddpg.make_trainer(env, {**TINY, "sharing": "actor"}).init(jax.random.PRNGKey(0))
    shared_actor, _ = _shared_and_own(state.learner.actor_params)
    shared_critic, _ = _shared_and_own(state.learner.critic_params)
    assert all(np.array_equal(x[0], x[1]) for x in shared_actor)
    kernels = [x for x in shared_critic if x.ndim == 3]  # biases start at zero for all
    assert kernels and not any(np.array_equal(x[0], x[1]) for x in kernels)
    with pytest.raises(ValueError, match=r"algo\.sharing must be one of"):
        maddpg.MaddpgConfig.from_mapping({"sharing": "everything"})


# ------------------------------------------------------------------ action helpers
@pytest.mark.parametrize("policy_gradient", maddpg.POLICY_GRADIENTS)
def test_actor_gradient_flows_through_the_critics_its_estimator_names(policy_gradient):
    """d/d(fresh a_k) of −Σ_j Q_j(joint_j): decentralised = −∂Q_k/∂a_k at (a_k fresh, others
    logged); centralised = −Σ_j ∂Q_j/∂a_k at the all-fresh joint action."""
    B, N, D, A = 4, 3, 5, 2
    k_obs, k_fresh, k_logged, k_init = jax.random.split(jax.random.PRNGKey(0), 4)
    obs = jax.random.normal(k_obs, (B, N, D))
    fresh = jax.random.normal(k_fresh, (B, N, A))
    logged = jax.random.normal(k_logged, (B, N, A))
    critic = networks.Critic(hidden=(8,), activation="silu")
    params = networks.init_stacked(critic, k_init, N, obs[0], fresh[0])

    def loss(fresh):
        joint = maddpg.actor_joint_actions(policy_gradient, fresh, logged)
        return -jnp.sum(maddpg.critic_values(critic, params, obs, joint))

    grad = jax.grad(loss)(fresh)

    def q(j, joint):  # Σ_b Q_j(o^b, joint^b), critic j's own parameters
        params_j = jax.tree_util.tree_map(lambda x: x[j], params)
        return jnp.sum(jax.vmap(critic.apply, in_axes=(None, 0, 0))(params_j, obs, joint))

    for k in range(N):
        if policy_gradient == "centralised":
            expected = -sum(jax.grad(functools.partial(q, j))(fresh)[:, k] for j in range(N))
        else:
            mixed = logged.at[:, k].set(fresh[:, k])
            expected = -jax.grad(functools.partial(q, k))(mixed)[:, k]
        np.testing.assert_allclose(grad[:, k], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"algo\.policy_gradient must be one of"):
        maddpg.MaddpgConfig.from_mapping({"policy_gradient": "joint"})


def test_gumbel_straight_through_is_one_hot_forward_softmax_backward():
    logits = jnp.array([[2.0, 0.0, -1.0, 0.5, 0.0]])
    key = jax.random.PRNGKey(0)
    sample = maddpg.gumbel_softmax_st(key, logits, 1.0)
    assert np.array_equal(np.sort(np.asarray(sample[0])), [0, 0, 0, 0, 1])
    jac = jax.jacobian(lambda x: maddpg.gumbel_softmax_st(key, x, 1.0))(logits)
    g = jax.random.gumbel(key, logits.shape)
    soft_jac = jax.jacobian(lambda x: jax.nn.softmax(x + g))(logits)
    np.testing.assert_allclose(jac, soft_jac, atol=1e-6)
    # Over many keys the hard sample follows softmax(logits).
    keys = jax.random.split(key, 20_000)
    freq = jax.jit(jax.vmap(lambda k: maddpg.gumbel_softmax_st(k, logits, 1.0)))(keys).mean(0)
    np.testing.assert_allclose(freq[0], jax.nn.softmax(logits[0]), atol=0.015)


def test_greedy_actions_and_encoding_shapes(tiny):
    env, trainer, traj = tiny
    actor, critic = maddpg.build_networks(env.spec, maddpg.MaddpgConfig.from_mapping(TINY))
    params = trainer.policy_params(traj[-1][0])
    obs, _ = env.reset(jax.random.PRNGKey(1))
    actions = maddpg.greedy_actions(actor, params["actor"], obs)
    encoded = maddpg.encode_actions(env.spec, actions)
    assert encoded.shape == (3, 5)
    if env.spec.discrete:
        logits = maddpg.apply_actors(actor, params["actor"], obs)
        assert actions.dtype == jnp.int32 and actions.tolist() == logits.argmax(-1).tolist()
        assert np.array_equal(encoded.sum(-1), np.ones(3))
    else:
        assert actions.shape == (3, 5) and bool(jnp.all((actions >= 0) & (actions <= 1)))
        np.testing.assert_array_equal(encoded, actions)
    q = maddpg.critic_values(critic, params["critic"], obs[None], encoded[None])
    q_one = critic.apply(jax.tree_util.tree_map(lambda x: x[1], params["critic"]), obs, encoded)
    assert q.shape == (1, 3) and float(q[0, 1]) == pytest.approx(float(q_one), rel=1e-5)


# ------------------------------------------------------------------- evaluation
def test_mean_ci_matches_normal_formula():
    x = np.array([[1.0, 3.0], [2.0, 4.0], [6.0, 8.0], [0.0, 2.0]])  # per-sample means 2,3,7,1
    mean, half = evaluate.mean_ci(x)
    assert mean == pytest.approx(3.25)
    assert half == pytest.approx(1.959964 * np.std([2, 3, 7, 1], ddof=1) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate.mean_ci(np.ones(1))


def test_short_training_beats_the_untrained_policy():
    """~100k env steps / 400 updates of N=3 discrete MADDPG (seconds) must clearly beat
    the untrained greedy policy on the same 200 evaluation episodes."""
    env = make_env("simple_spread", num_agents=3, continuous=False)
    cfg = {
        "num_envs": 64,
        "batch_size": 512,
        "updates_per_iteration": 8,
        "iterations_per_chunk": 60,
        "warmup": 2000,
    }
    trainer = maddpg.make_trainer(env, cfg)
    actor, _ = maddpg.build_networks(env.spec, maddpg.MaddpgConfig.from_mapping(cfg))
    evaluate_params = jax.jit(
        lambda p: (
            evaluate.episode_stats(
                env, functools.partial(maddpg.greedy_actions, actor, p), jax.random.PRNGKey(99), 200
            ).returns
        )
    )

    state = trainer.init(jax.random.PRNGKey(0))
    before = evaluate_params(trainer.policy_params(state)["actor"])
    state, metrics = trainer.train_chunk(state)
    after = evaluate_params(trainer.policy_params(state)["actor"])
    m_before, ci_before = evaluate.mean_ci(before)
    m_after, ci_after = evaluate.mean_ci(after)
    assert m_after > m_before + 3.0 and m_after - ci_after > m_before + ci_before, (
        m_before,
        m_after,
    )
    assert np.isfinite(float(metrics["critic_loss"]))


class EarlyDone:
    """Simple Spread whose episodes end after 10 of the 25 scanned steps."""

    def __init__(self, env):
        self.env, self.spec = env, env.spec

    def reset(self, key):
        return self.env.reset(key)

    def avail_actions(self, state):
        return self.env.avail_actions(state)

    def step(self, key, state, actions):
        obs, state, reward, _, info = self.env.step(key, state, actions)
        return obs, state, reward, state.t >= 10, info


def test_run_episodes_equals_a_python_loop_and_masks_after_done():
    env = EarlyDone(make_env("simple_spread", num_agents=3, continuous=False))
    act_fn = lambda obs, avail: jnp.argmax(obs[:, 4:9], axis=-1).astype(jnp.int32)
    key = jax.random.PRNGKey(0)
    stats = evaluate.run_episodes(env, act_fn, key, 4)
    returns = stats.returns
    assert returns.shape == (4, 3) and stats.won is None  # Simple Spread has no outcome
    for e, k in enumerate(jax.random.split(key, 4)):  # the documented key schedule
        k_reset, k_steps = jax.random.split(k)
        obs, state = env.reset(k_reset)
        total = np.zeros(3)
        for k_step in jax.random.split(k_steps, env.spec.episode_length):
            obs, state, reward, done, _ = env.step(k_step, state, act_fn(obs, None))
            total += np.asarray(reward)
            if done:
                break
        assert int(state.t) == 10
        np.testing.assert_allclose(returns[e], total, rtol=1e-5)


def test_n_step_transitions_match_a_python_loop_and_stop_at_episode_ends():
    """Each transition's reward sums its episode's next m = min(n, steps left) rewards with
    γ^k, its next_obs/next_avail/terminal are step t+m−1's and its discount is γ^m."""
    T, E, N, D, A, n, gamma = 6, 2, 2, 3, 4, 3, 0.9
    rng = np.random.default_rng(0)
    last = np.zeros((T, E), bool)
    last[2, 0] = last[-1] = True  # env 0: episodes [0..2] and [3..5]; env 1: one of 6 steps
    traj = maddpg.Transition(
        obs=jnp.zeros((T, E, N, D)),
        action=jnp.zeros((T, E, N, A)),
        reward=jnp.asarray(rng.normal(size=(T, E, N)), jnp.float32),
        next_obs=jnp.asarray(rng.normal(size=(T, E, N, D)), jnp.float32),
        terminal=jnp.asarray(last & (np.arange(T)[:, None] < T - 1), jnp.float32),
        avail=jnp.ones((T, E, N, A), bool),
        next_avail=jnp.asarray(rng.random((T, E, N, A)) < 0.5),
        discount=jnp.full((T, E), gamma),
    )
    out = maddpg.n_step_transitions(traj, jnp.asarray(last), n, gamma)
    for e in range(E):
        for t in range(T):
            m = 1
            while m < n and not last[t + m - 1, e]:
                m += 1
            end = t + m - 1
            expected = sum(gamma**k * np.asarray(traj.reward[t + k, e]) for k in range(m))
            np.testing.assert_allclose(out.reward[t, e], expected, rtol=1e-5)
            np.testing.assert_allclose(out.next_obs[t, e], traj.next_obs[end, e])
            np.testing.assert_array_equal(out.next_avail[t, e], traj.next_avail[end, e])
            assert float(out.terminal[t, e]) == float(traj.terminal[end, e])
            np.testing.assert_allclose(float(out.discount[t, e]), gamma**m, rtol=1e-6)
    assert float(out.terminal[0, 0]) == 1.0 and float(out.discount[0, 0]) == pytest.approx(gamma**3)
    one = maddpg.n_step_transitions(traj, jnp.asarray(last), 1, gamma)
    assert all(bool(jnp.all(a == b)) for a, b in zip(one, traj, strict=True))


def test_benchmark_python_loop_baseline_runs_on_the_current_transition():
    """scripts/benchmark_train.py's PettingZoo baseline fills its own numpy replay buffer with
    ``maddpg.Transition`` rows and runs the jitted update on them: it must keep up with the
    Transition's fields (it once still passed a removed one)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_train.py"
    spec = importlib.util.spec_from_file_location("benchmark_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    env = make_env("simple_spread", num_agents=3, continuous=False)
    cfg = maddpg.MaddpgConfig(
        warmup=0, num_envs=2, batch_size=8, buffer_size=64, updates_per_iteration=5
    )
    result = bench.time_python_loop(env.spec, cfg, 20, continuous=False)
    assert result["steps"] == 20 and result["updates"] == 2 and result["seconds"] > 0
