"""MADDPG (Lowe et al., 2017) in JAX: decentralised actors, centralised critics.

Agent i acts from its own observation, a_i = μ_i(o_i); agent j's critic scores the joint
observation and joint action, Q_j(o_1..o_N, a_1..a_N). Per-agent parameters are stacked
on axis 0 (see ``agents.networks``) and every agent is updated by one batched computation.

For a replay batch {(o, a, r, o', d, γ')} (d = 1 only on a true termination; Simple Spread
episodes end by time limit only, so its targets always bootstrap):
  critic j:  y_j = r_j + γ' (1 − d) Q̄_j(o', ā'),  ā'_i = μ̄_i(o'_i)     (bars: target nets)
             L_j = E[(Q_j(o, a) − y_j)²]
  actor i:   L_i = −E[Q_i(o, a_1..â_i..a_N)] (+ λ E[ℓ_i²] for discrete logits ℓ_i),
             â_i = μ_i(o_i) with the other agents' actions taken from the buffer
             (``policy_gradient: decentralised``, Lowe et al.), or, with
             ``policy_gradient: centralised`` (FACMAC's centralised policy gradient, Peng
             et al. 2021), one loss for all actors L = −E[Σ_j Q_j(o, â_1..â_N)]: every
             agent's fresh action in every critic, so each actor's gradient sums over all
             critics and is taken at the joint action the current policies would play,
             not at the others' stale exploratory actions
  targets:   θ̄ ← τ θ + (1 − τ) θ̄                                          (Polyak)
With ``n_step`` = 1, γ' = γ and (r, o') are one step's; with n > 1 a transition carries
the discounted sum of its episode's next m = min(n, steps left) rewards, the observation
after them and γ' = γ^m (``n_step_transitions``; uncorrected n-step returns as in Ape-X DPG
and D4PG: a bias from older policies' actions, traded for credit that travels n steps per
update along an episode instead of one).
Each agent has its own Adam state and its own gradient-norm clip (``jax.vmap`` over the
agent axis), so agents never share a step size or a clipping scale.

Parameter sharing (``sharing``: actor, critic or both): one network for all agents with the
agent's one-hot id as an extra input, which is the same as every agent owning only its
input-layer bias (``networks.agent_specific_leaves``). Params keep the stacked layout with
the shared leaves equal across agents; their gradient is the sum over agents
(``networks.tie_shared``) and one optimiser steps the whole stacked tree, so tied leaves
get identical updates and stay tied.

Discrete actions: the actor outputs logits ℓ_i, so π_i(a|o) = softmax(ℓ_i)_a and
−log π_i(a|o) is defined for forensics. Exploration samples a ~ π_i (argmax of ℓ_i + Gumbel
noise); the critic sees one-hot actions; target actions are the one-hot greedy choice; the
actor update feeds the critic a straight-through Gumbel-softmax sample (hard one-hot
forward, gradient of softmax((ℓ_i + g)/T) backward).
Continuous actions: the actor is deterministic and sigmoid-squashed into the action box;
exploration adds Gaussian noise of std ``exploration_noise``·(high − low), clipped to the box.

One iteration collects ``num_envs`` whole episodes in parallel (vmap over envs, ``lax.scan``
over steps) into the replay buffer (only real steps: a battle that ends before the step
limit is padded to it by the scan, and the padding would otherwise fill 2-4x more slots
than the battle itself), then runs ``updates_per_iteration`` gradient updates
(``lax.scan``); ``train_chunk`` scans ``iterations_per_chunk`` iterations in one jitted call.
With several devices the parallel envs are split across them (``agents.sharding``); the
learner and the replay buffer are replicated.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from agents import replay, sharding
from agents.networks import (
    ACTIVATIONS,
    Actor,
    Critic,
    actor_for,
    agent_specific_leaves,
    init_shared,
    init_stacked,
    mask_logits,
    tie_shared,
)
from agents.trainer import Trainer, parse_algo_config
from envs.base import EnvSpec, MultiAgentEnv

Params = Any
SHARING = ("none", "actor", "critic", "both")  # which networks all agents share
POLICY_GRADIENTS = ("decentralised", "centralised")  # the actors' estimator: docstring


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MaddpgConfig:
    """MADDPG hyper-parameters (``algo.*`` in the Hydra config)."""

    actor_hidden: tuple[int, ...] = (64, 64)
    critic_hidden: tuple[int, ...] = (64, 64)
    # Smooth by default: Stage 2 needs the critic's curvature in the actions (networks.py).
    activation: str = "silu"
    lr_actor: float = 1e-2
    lr_critic: float = 1e-2
    gamma: float = 0.95
    tau: float = 0.01
    batch_size: int = 1024
    buffer_size: int = 100_000  # transitions
    num_envs: int = 64  # parallel episodes collected per iteration
    updates_per_iteration: int = 16
    iterations_per_chunk: int = 50
    warmup: int = 5_000  # transitions in the buffer before the first gradient update
    gumbel_temperature: float = 1.0  # discrete: softness of the straight-through relaxation
    exploration_noise: float = 0.1  # continuous: Gaussian std as a fraction of the box width
    grad_clip: float = 0.5  # per-agent global-norm clip of each gradient
    logit_reg: float = 1e-3  # discrete: λ in the actor loss, keeps logits (and π) bounded
    sharing: str = "none"  # networks shared by all agents (+ agent id): SHARING, docstring
    n_step: int = 1  # rewards summed into each critic target before bootstrapping
    policy_gradient: str = "decentralised"  # POLICY_GRADIENTS: actor loss, module docstring

    @property
    def share_actor(self) -> bool:
        return self.sharing in ("actor", "both")

    @property
    def share_critic(self) -> bool:
        return self.sharing in ("critic", "both")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> MaddpgConfig:
        """Parse and validate ``algo_cfg``; errors name the field (``algo.<field>``)."""
        return parse_algo_config(cls, cfg, "MADDPG")

    def validate(self) -> None:
        """Raise ``ValueError('algo.<field> must be ..., got ...')`` on the first bad value."""
        checks = [
            ("lr_actor", self.lr_actor > 0, "> 0"),
            ("lr_critic", self.lr_critic > 0, "> 0"),
            ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"),
            ("tau", 0 < self.tau <= 1, "in (0, 1]"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("buffer_size", self.buffer_size >= self.batch_size, ">= algo.batch_size"),
            ("num_envs", self.num_envs >= 1, ">= 1"),
            ("updates_per_iteration", self.updates_per_iteration >= 1, ">= 1"),
            ("iterations_per_chunk", self.iterations_per_chunk >= 1, ">= 1"),
            ("warmup", self.warmup >= 0, ">= 0"),
            ("gumbel_temperature", self.gumbel_temperature > 0, "> 0"),
            ("exploration_noise", self.exploration_noise >= 0, ">= 0"),
            ("grad_clip", self.grad_clip > 0, "> 0"),
            ("logit_reg", self.logit_reg >= 0, ">= 0"),
            ("actor_hidden", all(w >= 1 for w in self.actor_hidden), "positive widths"),
            ("critic_hidden", all(w >= 1 for w in self.critic_hidden), "positive widths"),
            ("activation", self.activation in ACTIVATIONS, f"one of {sorted(ACTIVATIONS)}"),
            ("sharing", self.sharing in SHARING, f"one of {list(SHARING)}"),
            ("n_step", self.n_step >= 1, ">= 1"),
            (
                "policy_gradient",
                self.policy_gradient in POLICY_GRADIENTS,
                f"one of {list(POLICY_GRADIENTS)}",
            ),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"algo.{name} must be {expected}, got {getattr(self, name)!r}")


# --------------------------------------------------------------------- networks & actions
def build_networks(spec: EnvSpec, cfg: MaddpgConfig) -> tuple[Actor, Critic]:
    """The actor and critic modules for ``spec`` (apply them with stacked params)."""
    actor = actor_for(spec, cfg.actor_hidden, cfg.activation)
    return actor, Critic(hidden=cfg.critic_hidden, activation=cfg.activation)


def apply_actors(actor: Actor, actor_params: Params, obs: jax.Array) -> jax.Array:
    """Every agent's actor on its own observation: obs [..., N, O] → out [..., N, A].

    ``out`` is logits (discrete) or the action (continuous).
    """
    per_agent = jax.vmap(actor.apply, in_axes=(0, 0))(actor_params, jnp.moveaxis(obs, -2, 0))
    return jnp.moveaxis(per_agent, 0, -2)


def greedy_actions(
    actor: Actor, actor_params: Params, obs: jax.Array, avail: jax.Array | None = None
) -> jax.Array:
    """Deterministic env actions from obs [N, O]: argmax of the available logits → int32
    [N] (discrete), the actor output → float32 [N, A] (continuous)."""
    out = apply_actors(actor, actor_params, obs)
    if actor.discrete:
        return jnp.argmax(mask_logits(out, avail), axis=-1).astype(jnp.int32)
    return out


def encode_actions(spec: EnvSpec, actions: jax.Array) -> jax.Array:
    """Env actions → the critic's action input [..., N, A]: one-hot for discrete indices,
    unchanged for continuous actions."""
    if spec.discrete:
        return jax.nn.one_hot(actions, spec.action_dim, dtype=jnp.float32)
    return actions


def gumbel_softmax_st(key: jax.Array, logits: jax.Array, temperature: float) -> jax.Array:
    """Straight-through Gumbel-softmax: forward = one-hot(argmax(ℓ + g)) (a sample of
    softmax(ℓ)), backward = ∂ softmax((ℓ + g)/T)."""
    soft = jax.nn.softmax((logits + jax.random.gumbel(key, logits.shape)) / temperature)
    hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
    return soft + jax.lax.stop_gradient(hard - soft)


def critic_values(critic: Critic, critic_params: Params, obs: jax.Array, act: jax.Array):
    """Q_j(o^b, a^b) for every critic j and sample b: obs [B, N, O], act [B, N, A] → [B, N].

    ``act`` may also be [N, B, N, A]: critic j then scores its own joint action ``act[j]``.
    """
    one = jax.vmap(critic.apply, in_axes=(None, 0, 0))  # one critic over the batch
    act_axis = 0 if act.ndim == 4 else None
    return jax.vmap(one, in_axes=(0, None, act_axis), out_axes=1)(critic_params, obs, act)


def actor_joint_actions(policy_gradient: str, fresh: jax.Array, logged: jax.Array) -> jax.Array:
    """The joint action(s) the critics score in the actor loss, from the actors' fresh
    actions and the replay batch's logged ones (both [B, N, A]):

    * ``decentralised`` → [N, B, N, A]: critic i scores agent i's fresh action with the
      others' logged actions, so actor i's gradient is ∇_{a_i} Q_i alone (Lowe et al.);
    * ``centralised`` → [B, N, A]: every critic scores every fresh action, so actor i's
      gradient is Σ_j ∇_{a_i} Q_j at the current joint policy (FACMAC's estimator).
    """
    if policy_gradient == "centralised":
        return fresh
    n = fresh.shape[-2]
    own_row = jnp.eye(n, dtype=bool)[:, None, :, None]  # [i, 1, N, 1]: agent i's own row
    return jnp.where(own_row, fresh[None], logged[None])


# -------------------------------------------------------------------------- state
class Transition(NamedTuple):
    obs: jax.Array  # [N, O]
    action: jax.Array  # [N, A], critic encoding
    reward: jax.Array  # [N]
    next_obs: jax.Array  # [N, O]
    terminal: jax.Array  # [] 1.0 if the episode truly ended here (no bootstrap)
    avail: jax.Array  # [N, A] bool, legal actions at obs (all True for unmasked envs)
    next_avail: jax.Array  # [N, A] bool, legal actions at next_obs
    discount: jax.Array  # [] γ^m, the bootstrap's discount after the m rewards in ``reward``


def _where_rows(rows: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """``new`` where ``rows`` [T, E] is True, else ``old`` (leaves [T, E, ...])."""
    return jnp.where(rows.reshape(rows.shape + (1,) * (new.ndim - rows.ndim)), new, old)


def n_step_transitions(traj: Transition, last: jax.Array, n: int, gamma: float) -> Transition:
    """Fold into each transition the next n − 1 steps of its own episode. Leaves [T, E, ...];
    ``last`` [T, E] marks each episode's final step (True at t = T − 1 too):
        reward ← Σ_{k<m} γ^k r_{t+k},   (next_obs, next_avail, terminal) ← those of step t+m−1,
        discount ← γ^m,   m = min(n, steps to the episode's end, t included).
    """
    T = last.shape[0]
    ahead = lambda x, k: x[jnp.minimum(jnp.arange(T) + k, T - 1)]  # x[t + k], clamped
    out, open_ = traj, jnp.ones(last.shape, bool)
    for k in range(1, n):  # unrolled over the (small, static) horizon; vectorised over T, E
        open_ = open_ & ~ahead(last, k - 1)  # steps t..t+k-1 did not end the episode
        pick = functools.partial(_where_rows, open_)
        out = out._replace(
            reward=out.reward + open_[..., None] * gamma**k * ahead(traj.reward, k),
            next_obs=pick(ahead(traj.next_obs, k), out.next_obs),
            next_avail=pick(ahead(traj.next_avail, k), out.next_avail),
            terminal=pick(ahead(traj.terminal, k), out.terminal),
            discount=jnp.where(open_, gamma ** (k + 1), out.discount),
        )
    return out


class Learner(struct.PyTreeNode):
    actor_params: Params
    critic_params: Params
    target_actor_params: Params
    target_critic_params: Params
    actor_opt_state: optax.OptState
    critic_opt_state: optax.OptState


class TrainState(struct.PyTreeNode):
    learner: Learner
    buffer: replay.ReplayBuffer
    key: jax.Array  # raw uint32 key (checkpointable as a plain array)
    iteration: jax.Array  # int32 [], iterations done
    num_updates: jax.Array  # int32 [], gradient updates done


# ------------------------------------------------------------------ learner pieces
def optimisers(cfg: MaddpgConfig) -> tuple[optax.GradientTransformation, ...]:
    """(actor, critic) optimisers over stacked params: global-norm clip then Adam.

    Independent networks: applied per agent with ``jax.vmap`` over the stacked axis, so
    each agent clips and adapts on its own. A shared network: its gradient is tied (summed
    over agents) and one optimiser steps the whole stacked tree.
    """
    return tuple(
        (_shared if shared else _per_agent)(
            optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adam(lr))
        )
        for lr, shared in ((cfg.lr_actor, cfg.share_actor), (cfg.lr_critic, cfg.share_critic))
    )


def _per_agent(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` run independently on every agent's slice of a stacked tree."""
    return optax.GradientTransformation(jax.vmap(tx.init), jax.vmap(tx.update))


def _shared(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` on a stacked tree whose leaves other than the agent-specific ones are one
    shared parameter: their gradients are summed over agents first."""

    def update(grads, opt_state, params=None):
        return tx.update(tie_shared(grads, agent_specific_leaves(grads)), opt_state, params)

    return optax.GradientTransformation(tx.init, update)


def init_learner(spec: EnvSpec, cfg: MaddpgConfig, key: jax.Array) -> Learner:
    """Fresh stacked actors and critics; targets start equal to the online networks."""
    actor, critic = build_networks(spec, cfg)
    actor_tx, critic_tx = optimisers(cfg)
    k_actor, k_critic = jax.random.split(key)
    n = spec.num_agents
    obs = jnp.zeros((n, spec.obs_dim), jnp.float32)
    act = jnp.zeros((n, spec.action_dim), jnp.float32)
    actor_params = (init_shared if cfg.share_actor else init_stacked)(actor, k_actor, n, obs[0])
    critic_init = init_shared if cfg.share_critic else init_stacked
    critic_params = critic_init(critic, k_critic, n, obs, act)
    return Learner(
        actor_params=actor_params,
        critic_params=critic_params,
        target_actor_params=actor_params,
        target_critic_params=critic_params,
        actor_opt_state=actor_tx.init(actor_params),
        critic_opt_state=critic_tx.init(critic_params),
    )


def make_explore(spec: EnvSpec, cfg: MaddpgConfig):
    """``explore(actor_params, obs [..., N, O], avail [..., N, A], key) -> (env actions,
    critic encoding)``: a ~ softmax(ℓ) over the available actions (discrete) or
    clip(μ + σ·(high − low)·ε, low, high) (continuous)."""
    actor, _ = build_networks(spec, cfg)

    def explore(actor_params: Params, obs: jax.Array, avail: jax.Array, key: jax.Array):
        out = apply_actors(actor, actor_params, obs)
        if spec.discrete:
            actions = jax.random.categorical(key, mask_logits(out, avail)).astype(jnp.int32)
        else:
            width = spec.action_high - spec.action_low
            noise = cfg.exploration_noise * width * jax.random.normal(key, out.shape)
            actions = jnp.clip(out + noise, spec.action_low, spec.action_high)
        return actions, encode_actions(spec, actions)

    return explore


def make_update(spec: EnvSpec, cfg: MaddpgConfig):
    """``update(learner, batch, key) -> (learner, metrics)``: one MADDPG gradient step on a
    replay batch (leaves [B, ...]), the math in the module docstring."""
    actor, critic = build_networks(spec, cfg)
    actor_tx, critic_tx = optimisers(cfg)
    n = spec.num_agents

    def update(learner: Learner, batch: Transition, key: jax.Array):
        """One critic step, then one actor step against the updated critics, then Polyak."""
        next_out = apply_actors(actor, learner.target_actor_params, batch.next_obs)
        if spec.discrete:
            next_greedy = jnp.argmax(mask_logits(next_out, batch.next_avail), -1)
            next_out = jax.nn.one_hot(next_greedy, spec.action_dim)
        q_next = critic_values(critic, learner.target_critic_params, batch.next_obs, next_out)
        bootstrap = batch.discount * (1.0 - batch.terminal)
        target = batch.reward + bootstrap[:, None] * q_next

        def critic_loss(params):
            q = critic_values(critic, params, batch.obs, batch.action)
            return jnp.mean(jnp.sum((q - target) ** 2, axis=1)), q

        (c_loss, q), c_grads = jax.value_and_grad(critic_loss, has_aux=True)(learner.critic_params)
        c_updates, critic_opt_state = critic_tx.update(
            c_grads, learner.critic_opt_state, learner.critic_params
        )
        critic_params = optax.apply_updates(learner.critic_params, c_updates)

        def actor_loss(params):
            out = apply_actors(actor, params, batch.obs)  # [B, N, A]
            if spec.discrete:
                logits = mask_logits(out, batch.avail)
                own = gumbel_softmax_st(key, logits, cfg.gumbel_temperature)
                reg = cfg.logit_reg * jnp.sum(jnp.mean(out**2, axis=(0, 2)))
            else:
                own, reg = out, 0.0
            joint = actor_joint_actions(cfg.policy_gradient, own, batch.action)
            q_own = critic_values(critic, critic_params, batch.obs, joint)  # [B, N]
            pg = -jnp.mean(jnp.sum(q_own, axis=1))
            return pg + reg, pg

        (_, pg), a_grads = jax.value_and_grad(actor_loss, has_aux=True)(learner.actor_params)
        a_updates, actor_opt_state = actor_tx.update(
            a_grads, learner.actor_opt_state, learner.actor_params
        )
        actor_params = optax.apply_updates(learner.actor_params, a_updates)

        learner = Learner(
            actor_params=actor_params,
            critic_params=critic_params,
            target_actor_params=optax.incremental_update(
                actor_params, learner.target_actor_params, cfg.tau
            ),
            target_critic_params=optax.incremental_update(
                critic_params, learner.target_critic_params, cfg.tau
            ),
            actor_opt_state=actor_opt_state,
            critic_opt_state=critic_opt_state,
        )
        metrics = {
            "critic_loss": c_loss / n,
            "actor_loss": pg / n,
            "q_mean": jnp.mean(q),
        }
        return learner, metrics

    return update


# -------------------------------------------------------------------------- trainer
def make_trainer(
    env: MultiAgentEnv,
    algo_cfg: Mapping[str, Any],
    devices: Sequence[jax.Device] | None = None,
) -> Trainer:
    """MADDPG on ``env`` with hyper-parameters ``algo_cfg`` (see ``MaddpgConfig``); the
    parallel envs are sharded over ``devices`` (default: all visible, see
    ``sharding.batch_mesh``)."""
    cfg = algo_cfg if isinstance(algo_cfg, MaddpgConfig) else MaddpgConfig.from_mapping(algo_cfg)
    spec = env.spec
    n, T, E = spec.num_agents, spec.episode_length, cfg.num_envs
    if cfg.buffer_size < E * T:
        raise ValueError(
            f"algo.buffer_size must be >= num_envs * episode_length = {E * T}, "
            f"got {cfg.buffer_size}"
        )
    explore = make_explore(spec, cfg)
    update = make_update(spec, cfg)
    ready_size = max(cfg.warmup, cfg.batch_size)
    mesh = sharding.batch_mesh(E, devices)
    shard_envs = lambda tree: sharding.constrain_batch(tree, mesh)  # env axis 0
    state_sharding = sharding.replicated(mesh)  # the default device without a mesh

    def init(key: jax.Array) -> TrainState:
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        key, k_learner = jax.random.split(key)
        obs = jnp.zeros((n, spec.obs_dim), jnp.float32)
        act = jnp.zeros((n, spec.action_dim), jnp.float32)
        legal = jnp.ones((n, spec.action_dim), bool)
        zero = jnp.float32(0)
        example = Transition(obs, act, jnp.zeros(n), obs, zero, legal, legal, zero)
        return TrainState(
            learner=init_learner(spec, cfg, k_learner),
            buffer=replay.init(example, cfg.buffer_size),
            key=key,
            iteration=jnp.int32(0),
            num_updates=jnp.int32(0),
        )

    def collect(actor_params: Params, key: jax.Array):
        """E whole episodes: transitions [T, E, ...], which of them are real steps [T, E]
        (not the padding after an episode ended before T) and per-agent returns [E, N]."""
        k_reset, k_steps = jax.random.split(key)
        obs, env_state = jax.vmap(env.reset)(shard_envs(jax.random.split(k_reset, E)))
        legal = jax.vmap(env.avail_actions)

        def step(carry, inp):
            obs, env_state, avail, alive = carry
            key, t = inp
            k_act, k_env = jax.random.split(key)
            actions, encoded = explore(actor_params, obs, avail, k_act)
            next_obs, env_state, reward, done, _ = jax.vmap(env.step)(
                shard_envs(jax.random.split(k_env, E)), env_state, actions
            )
            next_avail = legal(env_state)
            # A done on the last step is the time limit, not a terminal state.
            terminal = (done & (t < T - 1)).astype(jnp.float32)
            discount = jnp.full((E,), cfg.gamma)
            tr = Transition(obs, encoded, reward, next_obs, terminal, avail, next_avail, discount)
            last = done | (t == T - 1)
            return shard_envs((next_obs, env_state, next_avail, alive & ~done)), (tr, alive, last)

        carry = shard_envs((obs, env_state, legal(env_state), jnp.ones((E,), bool)))
        steps = (jax.random.split(k_steps, T), jnp.arange(T))
        _, (traj, real, last) = jax.lax.scan(step, carry, steps)
        returns = jnp.sum(traj.reward * real[..., None], axis=0)
        return n_step_transitions(traj, last, cfg.n_step, cfg.gamma), real, returns

    def learn(learner: Learner, buffer: replay.ReplayBuffer, key: jax.Array):
        """``updates_per_iteration`` updates on fresh uniform batches; mean metrics."""

        def body(learner, key):
            k_sample, k_update = jax.random.split(key)
            batch = replay.sample(buffer, k_sample, cfg.batch_size)
            return update(learner, batch, k_update)

        learner, metrics = jax.lax.scan(
            body, learner, jax.random.split(key, cfg.updates_per_iteration)
        )
        return learner, jax.tree_util.tree_map(jnp.mean, metrics)

    def iteration(state: TrainState, _):
        key, k_collect, k_learn = jax.random.split(state.key, 3)
        traj, real, returns = collect(state.learner.actor_params, k_collect)
        flat = jax.tree_util.tree_map(lambda x: x.reshape(T * E, *x.shape[2:]), traj)
        buffer = replay.add(state.buffer, flat, real.reshape(T * E))
        ready = buffer.size >= ready_size

        def skip(learner, buffer, key):
            nan = jnp.float32(jnp.nan)
            return learner, {"critic_loss": nan, "actor_loss": nan, "q_mean": nan}

        learner, metrics = jax.lax.cond(ready, learn, skip, state.learner, buffer, k_learn)
        metrics = {**metrics, "episode_return": jnp.mean(returns), "updated": ready}
        new_state = TrainState(
            learner=learner,
            buffer=buffer,
            key=key,
            iteration=state.iteration + 1,
            num_updates=state.num_updates + ready * cfg.updates_per_iteration,
        )
        return new_state, metrics

    # The state is committed to ``state_sharding`` on the way out of every jitted call:
    # Orbax restores it with that sharding (``jax.eval_shape`` of the jitted init carries it),
    # and one fixed layout keeps a fresh and a restored state on one compiled train_chunk.
    init_committed = jax.jit(init, out_shardings=state_sharding)

    @functools.partial(jax.jit, out_shardings=state_sharding)
    def train_chunk(state: TrainState) -> tuple[TrainState, dict[str, jax.Array]]:
        """``iterations_per_chunk`` iterations. Metrics are chunk means: ``episode_return``
        (per-agent return of the collected exploratory episodes) over all iterations, the
        losses and ``q_mean`` over iterations that updated (NaN if none did)."""
        state, per_iter = jax.lax.scan(iteration, state, None, length=cfg.iterations_per_chunk)
        updated = per_iter.pop("updated")
        weight = updated / jnp.sum(updated)  # NaN weights when no iteration updated
        returns = per_iter.pop("episode_return")
        metrics = {k: jnp.sum(jnp.where(updated, v, 0.0) * weight) for k, v in per_iter.items()}
        metrics["episode_return"] = jnp.mean(returns)
        metrics["env_steps"] = state.iteration * (E * T)
        return state, metrics

    def policy_params(state: TrainState) -> dict[str, Params]:
        return {"actor": state.learner.actor_params, "critic": state.learner.critic_params}

    return Trainer(
        init=init_committed,
        train_chunk=train_chunk,
        env_steps_per_chunk=cfg.iterations_per_chunk * E * T,
        policy_params=policy_params,
    )
