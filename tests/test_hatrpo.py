"""HATRPO: Fisher-vector products, conjugate gradient, the KL line search, the sequential
compounded-ratio update, GAE, the trainer contract (determinism, resume, CLI) and a short
real training run on Simple Spread N=3."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import leaves_equal
from jax.flatten_util import ravel_pytree

from agents import checkpoint, evaluate, hatrpo
from cli import enable_compilation_cache
from cli.hydra_entry import compose_config
from cli.training import run as train_run
from envs import make_env
from envs.base import EnvSpec
from envs.simple_spread import gap_closed

enable_compilation_cache()  # repeated runs of this file reuse the compiled programs

TINY = {
    "actor_hidden": [16],
    "critic_hidden": [16],
    "cg_iters": 4,
    "critic_epoch": 2,
    "critic_minibatches": 2,
    "num_envs": 4,
    "iterations_per_chunk": 1,
}


def assert_trees_close(a, b) -> None:
    """Equal up to float rounding (the same math compiled inside and outside a scan)."""
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def tiny_problem(discrete: bool, num_agents: int = 1, batch: int = 12, seed: int = 0, **cfg):
    """(head, cfg, stacked θ, obs [B, N, O], action, avail, advantage [B], weight [B, N]) of a
    tiny random policy and batch (actions drawn from the policy, one illegal action masked;
    each agent's weights differ and sum to 1)."""
    spec = EnvSpec("toy", num_agents, 3, 4, discrete, 25, 3 * num_agents)
    config = hatrpo.HatrpoConfig.from_mapping({"actor_hidden": [5], "output_gain": 1.0, **cfg})
    head = hatrpo.make_policy_head(spec, config)
    k_theta, k_obs, k_act, k_adv, k_w, k_std = jax.random.split(jax.random.PRNGKey(seed), 6)
    thetas = hatrpo.init_actors(spec, config, k_theta)
    if not discrete:  # distinct per-dimension stds, so the log-std block is non-trivial
        thetas["log_std"] = thetas["log_std"] + 0.3 * jax.random.normal(k_std, (num_agents, 4))
    obs = jax.random.normal(k_obs, (batch, num_agents, 3))
    avail = None
    if discrete:
        avail = jnp.ones((batch, num_agents, 4), bool).at[::3, :, 2].set(False)
    d = hatrpo.forward_team(head, thetas, obs, avail)
    action = head.dist.sample(k_act, d)
    advantage = jax.random.normal(k_adv, (batch,))
    weight = jax.random.uniform(k_w, (batch, num_agents), minval=0.5)
    return head, config, thetas, obs, action, avail, advantage, weight / weight.sum(0)


def agent_batch(obs, action, avail, advantage, weight, i=0, factor=None):
    return hatrpo.AgentBatch(
        obs[:, i],
        action[:, i],
        None if avail is None else avail[:, i],
        advantage,
        jnp.ones_like(advantage) if factor is None else factor,
        weight[:, i],
    )


def agent(thetas, i):
    return jax.tree_util.tree_map(lambda x: x[i], thetas)


# -------------------------------------------------------------------------- config
def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"algo\.kl_threshold must be > 0, got -0\.1"):
        hatrpo.HatrpoConfig.from_mapping({"kl_threshold": -0.1})
    with pytest.raises(ValueError, match=r"algo\.backtrack_coeff must be in \(0, 1\)"):
        hatrpo.HatrpoConfig.from_mapping({"backtrack_coeff": 1.0})
    with pytest.raises(ValueError, match=r"algo\.klthreshold: unknown HATRPO setting"):
        hatrpo.HatrpoConfig.from_mapping({"klthreshold": 0.01})
    with pytest.raises(ValueError, match=r"algo\.critic_minibatches must divide"):
        env = make_env("simple_spread", num_agents=3, continuous=False)
        hatrpo.make_trainer(env, {**TINY, "critic_minibatches": 7})
    with pytest.raises(ValueError, match=r"algo\.layer_norm must be bool, got 1"):
        hatrpo.HatrpoConfig.from_mapping({"layer_norm": 1})
    assert hatrpo.HatrpoConfig.from_mapping({"name": "hatrpo"}) == hatrpo.HatrpoConfig()


@pytest.mark.parametrize("layer_norm", [False, True])
def test_layer_norm_networks_ignore_the_scale_and_offset_of_their_inputs(layer_norm):
    """``algo.layer_norm`` normalises the raw inputs first (HARL's feature normalisation):
    actor logits and V(s) at a·x + b (a > 0, b one scalar for every feature) equal those at
    x; a plain MLP's change."""
    spec = EnvSpec("toy", 2, 6, 4, True, 25, 9)
    cfg = hatrpo.HatrpoConfig.from_mapping({"actor_hidden": [8, 8], "layer_norm": layer_norm})
    thetas = hatrpo.init_actors(spec, cfg, jax.random.PRNGKey(0))
    head = hatrpo.make_policy_head(spec, cfg)
    obs = jax.random.normal(jax.random.PRNGKey(1), (5, 2, 6))
    logits = lambda o: hatrpo.forward_team(head, thetas, o, None)
    value_net = hatrpo.StateValue((8,), cfg.activation, cfg.layer_norm)
    state = jax.random.normal(jax.random.PRNGKey(2), (5, 9))
    v_params = value_net.init(jax.random.PRNGKey(3), state)
    value = lambda s: value_net.apply(v_params, s)
    same = [
        np.allclose(f(x), f(3.0 * x - 2.0), atol=1e-4) for f, x in ((logits, obs), (value, state))
    ]
    assert same == [layer_norm, layer_norm]


# ------------------------------------------------------------ Fisher and CG
def test_fisher_vector_product_equals_the_explicit_fisher_categorical():
    """F = Σ_b w_b Σ_a π(a|o_b) ∇log π(a|o_b) ∇log π(a|o_b)ᵀ, the definition, materialised."""
    head, cfg, thetas, obs, action, avail, adv, w = tiny_problem(True)
    w = w[:, 0]
    flat, unravel = ravel_pytree(agent(thetas, 0))
    f = lambda x: head.forward(unravel(x), obs[:, 0], avail[:, 0])
    damping = 0.1

    @jax.jit
    def both():
        scores = jax.jacobian(lambda x: jax.nn.log_softmax(f(x)))(flat)  # [B, A, P]
        p = jax.nn.softmax(f(flat))
        explicit = jnp.einsum("b,ba,bap,baq->pq", w, p, scores, scores)
        fvp = hatrpo.fisher_vector_product(f, head.dist.fisher, w, flat, damping)
        return explicit, jax.vmap(fvp)(jnp.eye(flat.size)).T

    explicit, via_products = both()
    np.testing.assert_allclose(via_products, explicit + damping * jnp.eye(flat.size), atol=1e-5)
    assert float(jnp.abs(explicit).max()) > 1e-2  # a real, non-trivial matrix


def test_fisher_vector_product_equals_the_kl_hessian_gaussian():
    """For the Gaussian head (mean net + free log-std): F = ∇²_θ E[KL(π_θ_old ‖ π_θ)] at θ_old."""
    head, cfg, thetas, obs, *_, w = tiny_problem(False)
    w = w[:, 0]
    flat, unravel = ravel_pytree(agent(thetas, 0))
    f = lambda x: head.forward(unravel(x), obs[:, 0], None)

    @jax.jit
    def both():
        d_old = f(flat)
        explicit = jax.hessian(lambda x: jnp.sum(w * head.dist.kl(d_old, f(x))))(flat)
        fvp = hatrpo.fisher_vector_product(f, head.dist.fisher, w, flat, 0.0)
        return explicit, jax.vmap(fvp)(jnp.eye(flat.size)).T

    explicit, via_products = both()
    np.testing.assert_allclose(via_products, explicit, atol=1e-5)
    log_std_block = explicit[:4, :4]  # ravel_pytree orders keys: "log_std" before "net"
    np.testing.assert_allclose(log_std_block, 2.0 * jnp.eye(4), atol=1e-5)


def test_conjugate_gradient_solves_a_known_spd_system():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    a = jnp.asarray(q @ np.diag(np.linspace(1.0, 20.0, 8)) @ q.T, jnp.float32)
    x_true = jnp.asarray(rng.normal(size=8), jnp.float32)
    b = a @ x_true
    x = hatrpo.conjugate_gradient(lambda v: a @ v, b, iters=8)
    np.testing.assert_allclose(x, x_true, rtol=1e-3, atol=1e-3)  # n steps: exact
    few = hatrpo.conjugate_gradient(lambda v: a @ v, b, iters=3)
    assert 1e-3 < float(jnp.linalg.norm(few - x_true)) < float(jnp.linalg.norm(x_true))
    zero = hatrpo.conjugate_gradient(lambda v: a @ v, jnp.zeros(8), iters=8)
    assert np.array_equal(zero, np.zeros(8))  # converged at once, no 0/0


# ------------------------------------------------------------------- line search
def test_line_search_takes_the_largest_step_inside_the_kl_bound():
    """L(θ) = gᵀθ always improves; KL(θ) = 50‖θ‖² exceeds δ for the first candidates."""
    cfg = hatrpo.HatrpoConfig(kl_threshold=0.01, backtrack_coeff=0.8, ls_step=10)
    g = jnp.array([1.0, 2.0])
    step = jnp.array([0.05, 0.05])
    evaluate = lambda th: (jnp.vdot(g, th), 50.0 * jnp.vdot(th, th))
    flat, info = hatrpo.line_search(evaluate, jnp.zeros(2), step, jnp.vdot(g, step), 0.0, cfg)
    kls = [50.0 * float(jnp.vdot(f * step, f * step)) for f in 0.8 ** np.arange(10)]
    first_ok = next(j for j, kl in enumerate(kls) if kl <= 0.01)
    assert first_ok > 0  # the full step violates the bound
    assert bool(info.accepted) and int(info.tries) == first_ok + 1
    np.testing.assert_allclose(flat, 0.8**first_ok * step, rtol=1e-6)
    assert float(info.kl) <= 0.01

    never = lambda th: (jnp.vdot(g, th), 1.0 + jnp.vdot(th, th))  # no candidate is inside
    flat, info = hatrpo.line_search(never, jnp.zeros(2), step, jnp.vdot(g, step), 0.0, cfg)
    assert not bool(info.accepted) and int(info.tries) == 10
    assert np.array_equal(flat, np.zeros(2)) and float(info.kl) == 0.0

    worse = lambda th: (-jnp.vdot(g, th), 0.0 * jnp.vdot(th, th))  # inside, but no improvement
    flat, info = hatrpo.line_search(worse, jnp.zeros(2), step, jnp.vdot(g, step), 0.0, cfg)
    assert not bool(info.accepted) and np.array_equal(flat, np.zeros(2))


@pytest.mark.parametrize("discrete", [True, False], ids=["categorical", "gaussian"])
def test_trust_region_steps_never_exceed_the_kl_bound(discrete):
    """Random tiny policies with a large δ and an undamped Fisher (the quadratic KL model
    is poor): the KL of the step taken, recomputed here, is ≤ δ in every case, and the line
    search had to backtrack in some of them. δ is passed as the (annealed) radius, which
    overrides the config's larger ``kl_threshold``."""
    delta = 0.5

    def one(seed):
        head, cfg, thetas, obs, action, avail, adv, w = tiny_problem(
            discrete, seed=seed, kl_threshold=20 * delta, cg_damping=0.0, accept_ratio=0.0
        )
        theta = agent(thetas, 0)
        batch = agent_batch(obs, action, avail, adv, w)
        new, _, info = hatrpo.trust_region_step(head, cfg, theta, batch, jnp.float32(delta))
        d_old = head.forward(theta, batch.obs, batch.avail)
        kl = jnp.sum(batch.weight * head.dist.kl(d_old, head.forward(new, batch.obs, batch.avail)))
        return kl, info

    kls, info = jax.jit(jax.vmap(one))(jnp.arange(12))
    kls, accepted = np.asarray(kls), np.asarray(info.accepted)
    assert np.all(kls <= delta * (1 + 1e-5)), kls
    assert np.all(kls[~accepted] == 0.0)
    assert accepted.sum() >= 6 and int(info.tries.max()) > 1, info
    np.testing.assert_allclose(kls, info.kl, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("discrete", [True, False], ids=["categorical", "gaussian"])
def test_entropy_bonus_raises_entropy_where_the_advantage_is_silent(discrete):
    """With Â ≡ 0 the surrogate is c_H · H alone: c_H > 0 takes a step that raises the mean
    entropy (within the KL bound), c_H = 0 has no gradient and keeps θ."""

    def step(entropy_coef):
        head, cfg, thetas, obs, action, avail, adv, w = tiny_problem(
            discrete, entropy_coef=entropy_coef
        )
        theta = agent(thetas, 0)
        batch = agent_batch(obs, action, avail, jnp.zeros_like(adv), w)
        new, _, info = hatrpo.trust_region_step(head, cfg, theta, batch)
        forward = lambda th: head.forward(th, batch.obs, batch.avail)
        entropy = lambda th: jnp.sum(batch.weight * head.dist.entropy(forward(th)))
        return float(entropy(theta)), float(entropy(new)), info

    before, after, info = step(0.1)
    assert bool(info.accepted) and after > before + 1e-3, (before, after)
    assert float(info.kl) <= hatrpo.HatrpoConfig().kl_threshold * (1 + 1e-5)
    before, after, info = step(0.0)
    assert not bool(info.accepted) and after == before


# --------------------------------------------------------- sequential update
def test_sequential_update_uses_the_compounded_ratio_and_order_matters():
    """Two agents, order (1, 0): agent 1 steps with M = 1, agent 0 with M = π1_new/π1_old
    computed here from agent 1's new parameters; order (0, 1) gives agent 0 a different step."""
    head, cfg, thetas, obs, action, avail, adv, w = tiny_problem(True, num_agents=2, batch=32)
    sequential = jax.jit(functools.partial(hatrpo.sequential_update, head, cfg))
    step = jax.jit(functools.partial(hatrpo.trust_region_step, head, cfg))
    new, infos = sequential(thetas, obs, action, avail, adv, w, jnp.array([1, 0]))
    assert bool(infos.accepted.all())

    first = agent_batch(obs, action, avail, adv, w, i=1)
    theta1, _, _ = step(agent(thetas, 1), first)
    logp = lambda th: head.dist.log_prob(head.forward(th, first.obs, first.avail), first.action)
    ratio1 = jnp.exp(logp(theta1) - logp(agent(thetas, 1)))
    assert float(jnp.abs(ratio1 - 1).max()) > 1e-2  # agent 1 really moved
    second = agent_batch(obs, action, avail, adv, w, i=0, factor=ratio1)
    theta0, _, _ = step(agent(thetas, 0), second)
    assert_trees_close(agent(new, 1), theta1)
    assert_trees_close(agent(new, 0), theta0)

    other, _ = sequential(thetas, obs, action, avail, adv, w, jnp.array([0, 1]))
    alone, _, _ = step(agent(thetas, 0), agent_batch(obs, action, avail, adv, w, i=0))
    assert_trees_close(agent(other, 0), alone)  # first in line: M = 1
    # Second in line, agent 0's step differs: the compounded ratio changed it.
    flat = lambda tree: ravel_pytree(tree)[0]
    assert float(jnp.abs(flat(agent(other, 0)) - flat(agent(new, 0))).max()) > 1e-3


def test_gae_matches_a_python_loop():
    rng = np.random.default_rng(1)
    T, E, gamma, lam = 7, 3, 0.9, 0.8
    r, v, v_next = (rng.normal(size=(T, E)).astype(np.float32) for _ in range(3))
    terminal = np.zeros((T, E), np.float32)
    terminal[3, 0] = 1.0  # env 0 terminates at t = 3, env 1 is truncated there
    done = terminal.copy()
    done[3, 1] = 1.0
    done[-1] = 1.0
    expected = np.zeros((T, E))
    for e in range(E):
        nxt = 0.0
        for t in reversed(range(T)):
            delta = r[t, e] + gamma * (1 - terminal[t, e]) * v_next[t, e] - v[t, e]
            nxt = delta + gamma * lam * (1 - done[t, e]) * nxt
            expected[t, e] = nxt
    got = hatrpo.gae(*map(jnp.asarray, (r, v, v_next, terminal, done)), gamma, lam)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ trainer
@pytest.fixture(scope="module", params=[False, True], ids=["discrete", "continuous"])
def tiny(request):
    """A tiny trainer and its first 3 chunks from seed 7."""
    env = make_env("simple_spread", num_agents=3, continuous=request.param)
    trainer = hatrpo.make_trainer(env, TINY)
    states = [(trainer.init(jax.random.PRNGKey(7)), None)]
    for _ in range(3):
        states.append(trainer.train_chunk(states[-1][0]))
    return env, trainer, states


def test_train_chunk_is_deterministic_finite_and_counts(tiny):
    env, trainer, states = tiny
    state, metrics = trainer.train_chunk(states[2][0])
    assert leaves_equal((state, metrics), states[3])
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    assert int(state.iteration) == 3
    assert int(metrics["env_steps"]) == 3 * trainer.env_steps_per_chunk
    assert 0 < float(metrics["kl"]) <= hatrpo.HatrpoConfig().kl_threshold
    params = trainer.policy_params(state)
    expected = {"actor", "value", "value_stats"} | ({"log_std"} if not env.spec.discrete else set())
    assert set(params) == expected
    assert all(x.shape[0] == 3 for x in jax.tree_util.tree_leaves(params["actor"]))
    assert not leaves_equal(state.actor_params, states[0][0].actor_params)


def test_kl_radius_anneals_linearly_then_holds():
    cfg = hatrpo.HatrpoConfig(kl_threshold=0.01, kl_anneal_env_steps=1000, kl_threshold_final=0.002)
    steps = jnp.array([0, 250, 1000, 5000])
    np.testing.assert_allclose(hatrpo.kl_radius(cfg, steps), [0.01, 0.008, 0.002, 0.002], rtol=1e-6)
    assert float(hatrpo.kl_radius(hatrpo.HatrpoConfig(), jnp.int32(10**9))) == pytest.approx(0.01)


def test_annealed_training_steps_within_the_shrinking_radius():
    """Each chunk's update uses δ_t at the env steps done before it, and its steps obey it."""
    env = make_env("simple_spread", num_agents=3, continuous=False)
    per_chunk = TINY["num_envs"] * env.spec.episode_length
    cfg = {**TINY, "kl_anneal_env_steps": 2 * per_chunk, "kl_threshold_final": 0.001}
    trainer = hatrpo.make_trainer(env, cfg)
    state = trainer.init(jax.random.PRNGKey(3))
    bounds, kls = [], []
    for _ in range(3):
        state, metrics = trainer.train_chunk(state)
        bounds.append(float(metrics["kl_bound"]))
        kls.append(float(metrics["kl"]))
    np.testing.assert_allclose(bounds, [0.01, 0.0055, 0.001], rtol=1e-5)
    assert all(0 < kl <= bound * (1 + 1e-5) for kl, bound in zip(kls, bounds, strict=True)), kls


def test_resume_from_checkpoint_equals_not_stopping(tiny, tmp_path):
    _, trainer, states = tiny
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", states[2][0])
        ckpt.wait_until_finished()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, states[2][0])
        restored = ckpt.restore(tmp_path / "ckpt", abstract)
    assert leaves_equal(trainer.train_chunk(restored), states[3])


def test_cli_training_checkpoints_resumes_and_evaluates(tmp_path):
    """``forensics train algo=hatrpo_smoke`` in-process: checkpoint, greedy evaluation through
    ``evaluate-policy``'s code, then a longer total that resumes from the checkpoint."""
    config = compose_config(
        [
            "algo=hatrpo_smoke",
            "train.total_env_steps=200",
            "train.eval_episodes=8",
            "train.progress=false",
        ]  # fmt: skip
    )
    result = train_run(config, tmp_path)
    assert result["algo"] == "hatrpo" and result["env_steps"] == 200
    assert np.isfinite(result["mean_return_per_agent"])
    policy = checkpoint.load_policy(tmp_path, config)
    actions = checkpoint.greedy_act_fn(policy)(policy.env.reset(jax.random.PRNGKey(0))[0])
    assert actions.shape == (3,) and actions.dtype == np.int32

    longer = {**config, "train": {**config["train"], "total_env_steps": 400, "eval_episodes": 0}}
    train_run(longer, tmp_path)
    assert checkpoint.load_policy(tmp_path).env_steps == 400
    chunks = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if line]
    assert len(chunks) == 2


# ----------------------------------------------------------------- learning
def test_short_training_improves_the_return():
    """2 × 64k env steps of N=3 discrete HATRPO (tens of seconds): the exploratory return
    rises from the first chunk to the second, and the greedy policy closes a clear share of
    the random → scripted gap on 200 evaluation episodes."""
    env = make_env("simple_spread", num_agents=3, continuous=False)
    cfg = hatrpo.HatrpoConfig(num_envs=64, iterations_per_chunk=40)
    trainer = hatrpo.make_trainer(env, cfg)
    returns = jax.jit(
        lambda params: (
            evaluate.episode_stats(
                env, hatrpo.greedy_act_fn(env.spec, cfg, params), jax.random.PRNGKey(99), 200
            ).returns
        )
    )
    state, first = trainer.train_chunk(trainer.init(jax.random.PRNGKey(0)))
    state, second = trainer.train_chunk(state)
    assert float(second["episode_return"]) > float(first["episode_return"]) + 1.0
    mean, ci = evaluate.mean_ci(returns(trainer.policy_params(state)))
    assert gap_closed(mean - ci, 3, False) > 0.3, (mean, ci)


def test_decision_weights_leave_out_forced_steps_and_padding():
    """An agent-step with one legal action (a dead unit's no-op) or past the episode's end
    weighs 0; every agent's weights sum to 1 over its real decisions."""
    valid = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])
    avail = jnp.ones((5, 2, 3), bool).at[2:, 1, 1:].set(False)  # agent 1 dead from step 2
    w = np.asarray(hatrpo.decision_weights(valid, avail, 2))
    np.testing.assert_allclose(w[:, 0], [0.25, 0.25, 0.25, 0.25, 0.0])
    np.testing.assert_allclose(w[:, 1], [0.5, 0.5, 0.0, 0.0, 0.0])
    continuous = np.asarray(hatrpo.decision_weights(valid, None, 2))
    np.testing.assert_allclose(continuous, np.stack([w[:, 0]] * 2, axis=1))
