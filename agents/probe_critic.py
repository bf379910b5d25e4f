"""Post-hoc centralised probe Q critics for a trained policy without an action-value critic.

HATRPO learns only a state value V(s), but Stage 2 needs an action-value critic whose
gradient and curvature in each agent's action channel it can probe. As in the paper, the
trained policy is frozen and, per agent j, a centralised
    Q_j(o_1..o_N, a_1..a_N) ≈ E[G_j^t | o^t, a^t],   G_j^t = Σ_{k=0}^{T−1−t} γ^k r_j^{t+k}
is fitted by least squares on its rollouts (G_j^t is agent j's discounted return-to-go
within the episode). The network is ``networks.Critic`` with stacked per-agent parameters,
so the fitted probe has exactly MADDPG's critic interface (``critic.apply(params_j, obs
[N, O], act [N, A])``, one-hot discrete actions) and Stage 2 runs on it unchanged.

Rollouts: ``episodes`` episodes of the stochastic policy, each agent's action replaced by a
uniformly random one with probability ``epsilon`` (discrete) or perturbed by Gaussian noise
of std ``epsilon`` × box width (continuous), so that Q is also fitted off the policy's own
actions — where an attacked agent's actions lie. A held-out ``holdout`` share of the
episodes measures the fit: R²_j = 1 − Σ(Q_j − G_j)² / Σ(G_j − Ḡ_j)².

The fitted parameters are saved next to the run's checkpoints in ``<run>/probe_critic/``
(an Orbax step named after the policy checkpoint's env step, written atomically), with a
JSON record of the probe config, the fit report and the policy checkpoint it belongs to;
``load`` refuses a probe fitted on an older policy checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from agents import checkpoint
from agents.maddpg import critic_values, encode_actions
from agents.networks import ACTIVATIONS, Critic, init_stacked
from agents.trainer import parse_algo_config
from configs.schema import ConfigError
from envs.base import EnvSpec, MultiAgentEnv
from forensics.store import current_code_version

PROBE_DIR = "probe_critic"
Params = Any
Sampler = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


@dataclass(frozen=True)
class ProbeConfig:
    """Probe-critic fit settings."""

    hidden: tuple[int, ...] = (64, 64)
    activation: str = "silu"  # smooth: Stage 2 differentiates Q twice in the actions
    gamma: float = 0.95  # MADDPG's discount: probe and MADDPG critics share one horizon
    episodes: int = 2048
    epsilon: float = 0.1
    holdout: float = 0.2
    epochs: int = 60
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> ProbeConfig:
        """Parse and validate; errors name the field."""
        return parse_algo_config(cls, cfg, "probe critic", section="probe")

    def validate(self) -> None:
        checks = [
            ("hidden", all(w >= 1 for w in self.hidden), "positive widths"),
            ("activation", self.activation in ACTIVATIONS, f"one of {sorted(ACTIVATIONS)}"),
            ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"),
            ("episodes", self.episodes >= 2, ">= 2"),
            ("epsilon", 0 <= self.epsilon <= 1, "in [0, 1]"),
            ("holdout", 0 < self.holdout < 1, "in (0, 1)"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("seed", self.seed >= 0, ">= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"probe.{name} must be {expected}, got {getattr(self, name)!r}")


class ProbeData(NamedTuple):
    obs: jax.Array  # [S, N, O]
    act: jax.Array  # [S, N, A], the critic encoding (one-hot for discrete actions)
    ret: jax.Array  # [S, N], G_j
    weight: jax.Array  # [S], 1 for real steps, 0 for steps after an episode ended


# ------------------------------------------------------------------------- data
def discounted_returns(reward: jax.Array, valid: jax.Array, gamma: float) -> jax.Array:
    """G^t = r^t + γ G^{t+1} along axis 0 (time), restarted after the last valid step:
    reward [T, ...], valid [T, ...] (broadcastable) → [T, ...]."""

    def back(carry, inp):
        r, v = inp
        g = v * (r + gamma * carry)
        return g, g

    valid = jnp.broadcast_to(valid, reward.shape)
    return jax.lax.scan(back, jnp.zeros_like(reward[0]), (reward, valid), reverse=True)[1]


def explore_actions(spec: EnvSpec, key: jax.Array, actions: jax.Array, epsilon: float):
    """ε-exploration around the policy's env actions [..., N(, A)] (see the module docstring);
    continuous actions come back clipped to the box, so the critic sees what the env executes."""
    k_pick, k_new = jax.random.split(key)
    if spec.discrete:
        uniform = jax.random.randint(k_new, actions.shape, 0, spec.action_dim, jnp.int32)
        return jnp.where(jax.random.uniform(k_pick, actions.shape) < epsilon, uniform, actions)
    width = spec.action_high - spec.action_low
    noisy = actions + epsilon * width * jax.random.normal(k_new, actions.shape)
    return jnp.clip(noisy, spec.action_low, spec.action_high)


def collect(
    env: MultiAgentEnv, sample: Sampler, key: jax.Array, episodes: int, epsilon: float
) -> ProbeData:
    """``episodes`` rollouts of ``sample`` with ε-exploration, as [episodes, T, ...] arrays
    (not flattened, so the hold-out split is by episode). Returns are undiscounted here;
    ``discounted`` fills them in."""
    spec = env.spec

    def one(key):
        k_reset, k_steps = jax.random.split(key)
        obs, state = env.reset(k_reset)

        def step(carry, key):
            obs, state, alive = carry
            k_act, k_explore, k_env = jax.random.split(key, 3)
            avail = env.avail_actions(state) if spec.discrete else None
            actions = sample(k_act, obs, avail)
            actions = explore_actions(spec, k_explore, actions, epsilon)  # clipped to the box
            next_obs, state, reward, done, _ = env.step(k_env, state, actions)
            out = ProbeData(obs, encode_actions(spec, actions), reward, alive.astype(jnp.float32))
            return (next_obs, state, alive & ~done), out

        steps = jax.random.split(k_steps, spec.episode_length)
        return jax.lax.scan(step, (obs, state, jnp.bool_(True)), steps)[1]

    return jax.vmap(one)(jax.random.split(key, episodes))


def discounted(data: ProbeData, gamma: float) -> ProbeData:
    """Replace per-step rewards [E, T, N] by discounted returns-to-go G_j^t."""
    to_time = lambda x: jnp.moveaxis(x, 1, 0)
    ret = discounted_returns(to_time(data.ret), to_time(data.weight)[..., None], gamma)
    return data._replace(ret=jnp.moveaxis(ret, 0, 1))


def flatten(data: ProbeData) -> ProbeData:
    """[E, T, ...] → [E·T, ...]."""
    return jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), data)


# -------------------------------------------------------------------------- fit
def init_params(spec: EnvSpec, cfg: ProbeConfig, key: jax.Array) -> tuple[Critic, Params]:
    """The probe critic module and fresh stacked parameters (one critic per agent)."""
    critic = Critic(hidden=cfg.hidden, activation=cfg.activation)
    obs = jnp.zeros((spec.num_agents, spec.obs_dim), jnp.float32)
    act = jnp.zeros((spec.num_agents, spec.action_dim), jnp.float32)
    return critic, init_stacked(critic, key, spec.num_agents, obs, act)


def fit(
    critic: Critic, params: Params, data: ProbeData, cfg: ProbeConfig, key: jax.Array
) -> tuple[Params, jax.Array]:
    """Adam on the mean squared error Σ_b w_b Σ_j (Q_j(o_b, a_b) − G_j,b)² / (N Σ_b w_b), over
    ``epochs`` shuffled passes of ``batch_size`` minibatches (the last partial one dropped);
    returns (params, per-epoch mean loss). Data [S, ...]; jitted as a whole."""
    size = data.ret.shape[0]
    batch = min(cfg.batch_size, size)
    per_epoch = size // batch
    tx = optax.adam(cfg.lr)

    def loss_fn(params, mb: ProbeData):
        err = critic_values(critic, params, mb.obs, mb.act) - mb.ret
        return jnp.sum(mb.weight[:, None] * err**2) / (
            err.shape[1] * jnp.maximum(jnp.sum(mb.weight), 1.0)
        )

    @jax.jit
    def run(params, data, key):
        def minibatch(carry, idx):
            params, opt_state = carry
            mb = jax.tree_util.tree_map(lambda x: x[idx], data)
            loss, grads = jax.value_and_grad(loss_fn)(params, mb)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        def epoch(carry, key):
            perm = jax.random.permutation(key, size)[: per_epoch * batch]
            carry, losses = jax.lax.scan(minibatch, carry, perm.reshape(per_epoch, batch))
            return carry, jnp.mean(losses)

        carry = (params, tx.init(params))
        (params, _), losses = jax.lax.scan(epoch, carry, jax.random.split(key, cfg.epochs))
        return params, losses

    return run(params, data, key)


def r_squared(critic: Critic, params: Params, data: ProbeData) -> np.ndarray:
    """Per-agent R²_j = 1 − Σ w (Q_j − G_j)² / Σ w (G_j − Ḡ_j)² on ``data`` [S, ...]."""
    q = jax.jit(lambda p, obs, act: critic_values(critic, p, obs, act))(params, data.obs, data.act)
    w = data.weight[:, None]
    mean = jnp.sum(w * data.ret, axis=0) / jnp.sum(w)
    sse = jnp.sum(w * (q - data.ret) ** 2, axis=0)
    sst = jnp.sum(w * (data.ret - mean) ** 2, axis=0)
    return np.asarray(1.0 - sse / sst)


# ------------------------------------------------------------------- a trained run
def policy_sampler(policy: checkpoint.Policy) -> Sampler:
    """The stochastic policy of a loaded run, for algorithms that need a probe critic."""
    algo = policy.config["algo"]
    if algo["name"] == "hatrpo":
        from agents import hatrpo

        cfg = hatrpo.HatrpoConfig.from_mapping(algo)
        return hatrpo.sample_act_fn(policy.env.spec, cfg, policy.params)
    raise ConfigError(
        f"algo.name: no probe critic for algorithm {algo['name']!r} (supported: hatrpo; "
        "MADDPG has its own critics)"
    )


def fit_policy(policy: checkpoint.Policy, cfg: ProbeConfig) -> tuple[Critic, Params, dict]:
    """Roll out the frozen policy, fit the probe critics; returns (module, params, report)."""
    spec = policy.env.spec
    k_data, k_init, k_fit = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    collect_jit = jax.jit(
        lambda key: collect(policy.env, policy_sampler(policy), key, cfg.episodes, cfg.epsilon)
    )
    data = discounted(collect_jit(k_data), cfg.gamma)
    n_hold = max(1, int(round(cfg.holdout * cfg.episodes)))
    fit_data = flatten(jax.tree_util.tree_map(lambda x: x[n_hold:], data))
    held_out = flatten(jax.tree_util.tree_map(lambda x: x[:n_hold], data))
    critic, params = init_params(spec, cfg, k_init)
    params, losses = fit(critic, params, fit_data, cfg, k_fit)
    report = {
        "train_mse": float(losses[-1]),
        "holdout_r2": [float(x) for x in r_squared(critic, params, held_out)],
        "fit_r2": [float(x) for x in r_squared(critic, params, fit_data)],
        "fit_episodes": cfg.episodes - n_hold,
        "holdout_episodes": n_hold,
    }
    return critic, params, report


def save(run_dir: str | Path, params: Params, meta: Mapping[str, Any]) -> Path:
    """Write ``<run_dir>/probe_critic/<policy_env_steps>/`` (params + JSON meta) atomically,
    keeping only the newest probe."""
    where = Path(run_dir).resolve() / PROBE_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    step = meta["policy_env_steps"]
    with ocp.CheckpointManager(where, options=options) as mngr:
        if step in mngr.all_steps():  # a refit of the same policy replaces the old probe
            mngr.delete(step)
        mngr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(dict(meta))
            ),
        )
        mngr.wait_until_finished()
    return where / str(meta["policy_env_steps"])


def load(run_dir: str | Path, policy_env_steps: int) -> tuple[Critic, Params, dict]:
    """(module, stacked params, meta) of the probe fitted on the checkpoint at
    ``policy_env_steps``; a missing or stale probe raises ``FileNotFoundError``."""
    where = Path(run_dir).resolve() / PROBE_DIR
    mngr = None
    if where.is_dir():
        mngr = ocp.CheckpointManager(where, options=ocp.CheckpointManagerOptions(create=False))
    step = None if mngr is None else mngr.latest_step()
    if step != policy_env_steps:
        found = "none" if step is None else f"one for env step {step:,}"
        raise FileNotFoundError(
            f"{where}: no probe critic for the policy checkpoint at env step "
            f"{policy_env_steps:,} (found {found}); fit one with `forensics fit-probe {run_dir}`"
        )
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(params=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
    )
    meta = restored["meta"]
    cfg = ProbeConfig.from_mapping(meta["probe_config"])
    critic = Critic(hidden=cfg.hidden, activation=cfg.activation)
    return critic, restored["params"], meta


def fit_and_save(run_dir: str | Path, cfg: ProbeConfig | None = None) -> dict:
    """Fit probe critics to the newest checkpoint's policy of ``run_dir`` and save them next
    to it; returns the saved meta (config, fit report, policy checkpoint, code version)."""
    cfg = cfg or ProbeConfig()
    policy = checkpoint.load_policy(run_dir)
    _, params, report = fit_policy(policy, cfg)
    meta = {
        "probe_config": {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
        },
        "report": report,
        "policy_env_steps": policy.env_steps,
        "algo": policy.config["algo"]["name"],
        "code_version": current_code_version(),
    }
    save(run_dir, params, meta)
    return meta
