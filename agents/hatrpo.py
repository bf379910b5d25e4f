"""HATRPO (Kuba et al., 2022, "Trust Region Policy Optimisation in Multi-Agent RL") in JAX.

Decentralised stochastic actors π_i(a_i | o_i) and one centralised state-value critic
V(s) on the environment's global state s (``env.global_state``: Simple Spread's is every
agent's observation concatenated, as PettingZoo's ``state()``; SMAX's is its world state).

One iteration collects ``num_envs`` whole episodes with the current policies and then:

* **Advantages (GAE).** Team reward r^t = (1/N) Σ_i r_i^t (the mean per-agent reward, the
  quantity evaluation reports). With V(s) de-normalised (see *value normalisation*),
      δ^t = r^t + γ (1 − term^t) V(s'^t) − V(s^t),   Â^t = δ^t + γλ (1 − done^t) Â^{t+1},
  where done marks the episode's last transition and term a true termination (a time-limit
  end still bootstraps from V(s'), as MADDPG's targets do). Â is then standardised over the
  batch.
* **Sequential trust-region actor updates.** Draw a random permutation i_1..i_N of the
  agents. Agent i_m maximises the surrogate
      L_m(θ) = E[ M_m · π_θ(a | o) / π_old(a | o) · Â + c_H · H(π_θ(· | o)) ],
      M_m = Π_{k<m} π_{i_k}^new / π_{i_k}^old
  (the already-updated agents' probability ratios on the same samples, M_1 = 1; c_H is
  ``entropy_coef``, 0 as in HARL: a bonus that keeps battle policies exploring), subject to
  E_s[KL(π_old(·|o) ‖ π_θ(·|o))] ≤ δ (``kl_threshold``; with ``kl_anneal_env_steps`` > 0, δ
  falls linearly to ``kl_threshold_final`` over that many env steps, see ``kl_radius``).
  Expectations are over agent i_m's real decisions: steps where it has a single legal
  action (a dead SMAX unit) weigh 0 (``decision_weights``, HARL's policy active masks).
  One TRPO step: g = ∇L(θ_old);
  x ≈ F⁻¹ g by ``cg_iters`` conjugate-gradient iterations on Fisher-vector products
  (F + damping·I) v = Jᵀ F_d J v + damping·v (J the Jacobian of the distribution
  parameters in θ, F_d the distribution's own Fisher; one ``jax.jvp`` and one ``jax.vjp``
  per product, F is never materialised); full step β₀ x with β₀ = √(δ / ½ xᵀF x); then a
  backtracking line search over fractions c^j (j < ``ls_step``, c = ``backtrack_coeff``)
  accepting the first candidate with KL ≤ δ, L − L_old > 0 and
  L − L_old > ``accept_ratio`` · c^j · gᵀ(β₀ x). If none passes the agent keeps θ_old.
* **Critic.** ``critic_epoch`` epochs × ``critic_minibatches`` Adam steps on the Huber loss
  between the normalised value and the normalised return target Â_raw + V(s), with the
  value clipped to ±``value_clip`` around its pre-update prediction (HARL's clipped value
  loss) and global-norm gradient clipping.

Value normalisation (HARL's ValueNorm): the critic predicts (G − μ) / σ, with μ, σ running
debiased moments of the return targets (rate 1 − ``value_norm_beta``).

Actors: discrete actions use a categorical distribution over the actor's logits, with
illegal actions (``env.avail_actions``) given logit −1e9 (probability 0, finite log-probs);
continuous actions a diagonal Gaussian whose mean is the sigmoid-squashed actor output (the
same ``networks.Actor`` as MADDPG) and whose log-standard deviation is a free per-agent
parameter. The greedy policy is the argmax of the logits / the mean. Hidden units default to
SiLU: forensics differentiates the policy and the critics twice.

Everything runs in one jitted ``train_chunk``: ``lax.scan`` over iterations and rollout
steps, ``vmap`` over environments and agents' forward passes, ``lax.scan`` over the agent
permutation, ``lax.while_loop`` for CG and the line search.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from agents.maddpg import greedy_actions
from agents.networks import ACTIVATIONS, MLP, Actor, actor_for, init_stacked, mask_logits
from agents.trainer import Trainer, parse_algo_config
from envs.base import EnvSpec, MultiAgentEnv

Params = Any


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class HatrpoConfig:
    """HATRPO hyper-parameters (``algo.*``); defaults follow HARL's ``hatrpo.yaml``."""

    actor_hidden: tuple[int, ...] = (128, 128)
    critic_hidden: tuple[int, ...] = (128, 128)
    activation: str = "silu"  # smooth: forensics needs curvature (see networks.ACTIVATIONS)
    layer_norm: bool = False  # HARL's MLPBase: LayerNorm on the inputs and every hidden layer
    output_gain: float = 0.01  # actor output-layer scale at init: near-uniform/centred policy
    init_std: float = 0.35  # continuous: initial Gaussian std as a fraction of the box width
    gamma: float = 0.99
    gae_lambda: float = 0.95
    kl_threshold: float = 0.01  # δ, the trust region radius in mean KL
    # Annealing (0 = constant δ): δ falls linearly to kl_threshold_final over this many env
    # steps (kl_radius), so late updates refine the policy instead of moving it as far.
    kl_anneal_env_steps: int = 0
    kl_threshold_final: float = 0.001
    entropy_coef: float = 0.0  # c_H: entropy bonus in the surrogate (HARL's HATRPO has none)
    ls_step: int = 10  # line-search candidates
    accept_ratio: float = 0.5  # required share of the linearly predicted improvement
    backtrack_coeff: float = 0.8  # c: step fraction shrink per line-search candidate
    cg_iters: int = 10
    cg_damping: float = 0.1  # F + damping·I, as HARL's fisher_vector_product
    lr_critic: float = 5e-4
    adam_eps: float = 1e-5
    critic_epoch: int = 5
    critic_minibatches: int = 1
    value_clip: float = 0.2  # clipped value loss (normalised units)
    huber_delta: float = 10.0
    max_grad_norm: float = 10.0  # critic global-norm clip
    value_norm_beta: float = 0.99999
    num_envs: int = 128  # parallel environments per iteration (one batch, one update)
    # Reset an environment as soon as its episode ends, so all T·num_envs steps of a batch
    # are real (short battles otherwise leave most of the batch as padding).
    auto_reset: bool = False
    iterations_per_chunk: int = 25

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> HatrpoConfig:
        """Parse and validate ``algo_cfg``; errors name the field (``algo.<field>``)."""
        return parse_algo_config(cls, cfg, "HATRPO")

    def validate(self) -> None:
        """Raise ``ValueError('algo.<field> must be ..., got ...')`` on the first bad value."""
        checks = [
            ("actor_hidden", all(w >= 1 for w in self.actor_hidden), "positive widths"),
            ("critic_hidden", all(w >= 1 for w in self.critic_hidden), "positive widths"),
            ("activation", self.activation in ACTIVATIONS, f"one of {sorted(ACTIVATIONS)}"),
            ("output_gain", self.output_gain > 0, "> 0"),
            ("init_std", self.init_std > 0, "> 0"),
            ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"),
            ("gae_lambda", 0 <= self.gae_lambda <= 1, "in [0, 1]"),
            ("kl_threshold", self.kl_threshold > 0, "> 0"),
            ("kl_anneal_env_steps", self.kl_anneal_env_steps >= 0, ">= 0"),
            ("kl_threshold_final", self.kl_threshold_final > 0, "> 0"),
            ("entropy_coef", self.entropy_coef >= 0, ">= 0"),
            ("ls_step", self.ls_step >= 1, ">= 1"),
            ("accept_ratio", 0 <= self.accept_ratio < 1, "in [0, 1)"),
            ("backtrack_coeff", 0 < self.backtrack_coeff < 1, "in (0, 1)"),
            ("cg_iters", self.cg_iters >= 1, ">= 1"),
            ("cg_damping", self.cg_damping >= 0, ">= 0"),
            ("lr_critic", self.lr_critic > 0, "> 0"),
            ("adam_eps", self.adam_eps > 0, "> 0"),
            ("critic_epoch", self.critic_epoch >= 1, ">= 1"),
            ("critic_minibatches", self.critic_minibatches >= 1, ">= 1"),
            ("value_clip", self.value_clip > 0, "> 0"),
            ("huber_delta", self.huber_delta > 0, "> 0"),
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
            ("value_norm_beta", 0 < self.value_norm_beta < 1, "in (0, 1)"),
            ("num_envs", self.num_envs >= 1, ">= 1"),
            ("iterations_per_chunk", self.iterations_per_chunk >= 1, ">= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"algo.{name} must be {expected}, got {getattr(self, name)!r}")


# ---------------------------------------------------------------------- distributions
class Categorical:
    """π(a | o) = softmax(ℓ)_a; the distribution parameters are the (masked) logits ℓ."""

    @staticmethod
    def from_logits(logits: jax.Array, avail: jax.Array | None) -> jax.Array:
        return mask_logits(logits, avail)

    @staticmethod
    def log_prob(d: jax.Array, action: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(d)
        return jnp.take_along_axis(logp, action[..., None], axis=-1)[..., 0]

    @staticmethod
    def kl(old: jax.Array, new: jax.Array) -> jax.Array:
        """KL(old ‖ new) = Σ_a p_old(a) (log p_old(a) − log p_new(a))."""
        logp_old = jax.nn.log_softmax(old)
        return jnp.sum(jnp.exp(logp_old) * (logp_old - jax.nn.log_softmax(new)), axis=-1)

    @staticmethod
    def fisher(d: jax.Array, u: jax.Array) -> jax.Array:
        """Fisher of softmax in the logits, (diag p − p pᵀ) u = ∇²_ℓ KL(p ‖ softmax ℓ) u."""
        p = jax.nn.softmax(d)
        return p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)

    @staticmethod
    def entropy(d: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(d)
        return -jnp.sum(jnp.exp(logp) * logp, axis=-1)

    @staticmethod
    def sample(key: jax.Array, d: jax.Array) -> jax.Array:
        return jax.random.categorical(key, d).astype(jnp.int32)


class Gaussian:
    """Diagonal Gaussian; the distribution parameters are (mean μ, log-std s), both [..., A]."""

    @staticmethod
    def log_prob(d: tuple[jax.Array, jax.Array], action: jax.Array) -> jax.Array:
        mean, log_std = d
        z = (action - mean) * jnp.exp(-log_std)
        return jnp.sum(-0.5 * z**2 - log_std - 0.5 * np.log(2 * np.pi), axis=-1)

    @staticmethod
    def kl(old: tuple[jax.Array, jax.Array], new: tuple[jax.Array, jax.Array]) -> jax.Array:
        """KL(old ‖ new) = Σ [s_new − s_old + (σ_old² + (μ_old − μ_new)²) / (2σ_new²) − ½]."""
        (m_old, s_old), (m_new, s_new) = old, new
        var_ratio = jnp.exp(2 * (s_old - s_new))
        t = (m_old - m_new) ** 2 * jnp.exp(-2 * s_new)
        return jnp.sum(s_new - s_old + 0.5 * (var_ratio + t) - 0.5, axis=-1)

    @staticmethod
    def fisher(d: tuple[jax.Array, jax.Array], u: tuple[jax.Array, jax.Array]):
        """Fisher in (μ, s): diag(1/σ², 2) (no μ–s cross term)."""
        _, log_std = d
        return u[0] * jnp.exp(-2 * log_std), 2.0 * u[1]

    @staticmethod
    def entropy(d: tuple[jax.Array, jax.Array]) -> jax.Array:
        return jnp.sum(d[1] + 0.5 * (1 + np.log(2 * np.pi)), axis=-1)

    @staticmethod
    def sample(key: jax.Array, d: tuple[jax.Array, jax.Array]) -> jax.Array:
        mean, log_std = d
        return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)


Distribution = type[Categorical] | type[Gaussian]


class PolicyHead(NamedTuple):
    """One agent's policy: ``forward(theta, obs [B, O], avail [B, A] | None)`` → distribution
    parameters, and the distribution's functions."""

    forward: Callable[[Params, jax.Array, jax.Array | None], Any]
    dist: Distribution


# --------------------------------------------------------------------------- networks
class StateValue(nn.Module):
    """Centralised state value V(s): global state [..., S] → [...] (normalised units)."""

    hidden: tuple[int, ...]
    activation: str = "silu"
    layer_norm: bool = False

    @nn.compact
    def __call__(self, state: jax.Array) -> jax.Array:
        return MLP(self.hidden, 1, self.activation, self.layer_norm)(state)[..., 0]


def build_actor(spec: EnvSpec, cfg: HatrpoConfig) -> Actor:
    """The actor network: logits (discrete) or the Gaussian mean in the action box."""
    return actor_for(spec, cfg.actor_hidden, cfg.activation, cfg.layer_norm)


def make_policy_head(spec: EnvSpec, cfg: HatrpoConfig) -> PolicyHead:
    """Agent parameters θ_i = {"net": actor params[, "log_std": [A]]} → distribution."""
    actor = build_actor(spec, cfg)
    if spec.discrete:

        def forward(theta: Params, obs: jax.Array, avail: jax.Array | None):
            return Categorical.from_logits(actor.apply(theta["net"], obs), avail)

        return PolicyHead(forward, Categorical)

    def forward_gaussian(theta: Params, obs: jax.Array, avail: jax.Array | None):
        mean = actor.apply(theta["net"], obs)
        return mean, jnp.broadcast_to(theta["log_std"], mean.shape)

    return PolicyHead(forward_gaussian, Gaussian)


def init_actors(spec: EnvSpec, cfg: HatrpoConfig, key: jax.Array) -> Params:
    """Stacked agent parameters; the output layer scaled by ``output_gain`` (HARL's small
    output gain: the initial policy is near uniform / centred in the box)."""
    actor = build_actor(spec, cfg)
    net = init_stacked(actor, key, spec.num_agents, jnp.zeros((spec.obs_dim,), jnp.float32))
    out_layer = net["params"]["MLP_0"][f"Dense_{len(cfg.actor_hidden)}"]
    out_layer["kernel"] = out_layer["kernel"] * cfg.output_gain
    theta = {"net": net}
    if not spec.discrete:
        std = cfg.init_std * (spec.action_high - spec.action_low)
        theta["log_std"] = jnp.full((spec.num_agents, spec.action_dim), np.log(std), jnp.float32)
    return theta


def forward_team(head: PolicyHead, thetas: Params, obs: jax.Array, avail: jax.Array | None):
    """Every agent's distribution on its own observation: obs [..., N, O] → params [..., N, A]."""
    move = lambda x: None if x is None else jnp.moveaxis(x, -2, 0)
    d = jax.vmap(head.forward)(thetas, move(obs), move(avail))
    return jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 0, -2), d)


def greedy_act_fn(spec: EnvSpec, cfg: HatrpoConfig, params: Mapping[str, Params]):
    """``(obs [N, O], avail [N, A] | None) -> env actions`` of the deterministic policy:
    argmax of the available logits or the Gaussian mean (the actor output, exactly as for
    MADDPG's actor)."""
    actor = build_actor(spec, cfg)
    return functools.partial(greedy_actions, actor, params["actor"])


def sample_act_fn(spec: EnvSpec, cfg: HatrpoConfig, params: Mapping[str, Params]):
    """``(key, obs [..., N, O], avail [..., N, A] | None) -> env actions`` drawn from the
    stochastic policy of ``policy_params`` (the Gaussian sample is not clipped: the env clips)."""
    head = make_policy_head(spec, cfg)
    thetas = {"net": params["actor"]}
    if not spec.discrete:
        thetas["log_std"] = params["log_std"]

    def act(key: jax.Array, obs: jax.Array, avail: jax.Array | None = None) -> jax.Array:
        return head.dist.sample(key, forward_team(head, thetas, obs, avail))

    return act


# ------------------------------------------------------------------- trust region core
def conjugate_gradient(
    mvp: Callable[[jax.Array], jax.Array], b: jax.Array, iters: int, tol: float = 1e-10
) -> jax.Array:
    """x ≈ A⁻¹ b for symmetric positive-definite A given only v ↦ A v: at most ``iters``
    CG iterations from x = 0, stopping once the squared residual ‖b − A x‖² < ``tol``."""

    def cond(c):
        k, _, _, _, rr = c
        return (k < iters) & (rr >= tol)

    def body(c):
        k, x, r, p, rr = c
        ap = mvp(p)
        alpha = rr / jnp.vdot(p, ap)
        x, r = x + alpha * p, r - alpha * ap
        rr_new = jnp.vdot(r, r)
        return k + 1, x, r, r + (rr_new / rr) * p, rr_new

    init = (jnp.int32(0), jnp.zeros_like(b), b, b, jnp.vdot(b, b))
    return jax.lax.while_loop(cond, body, init)[1]


def fisher_vector_product(
    f: Callable[[jax.Array], Any],
    fisher: Callable[[Any, Any], Any],
    weight: jax.Array,
    flat: jax.Array,
    damping: float,
) -> Callable[[jax.Array], jax.Array]:
    """v ↦ (Σ_b w_b J_bᵀ F_d(b) J_b + damping·I) v, the damped Fisher of the policy at ``flat``.

    ``f(flat) -> distribution params [B, ...]``, J_b its Jacobian for sample b, ``fisher`` the
    distribution's Fisher in its parameters (the Hessian of KL(d_old ‖ d) at d = d_old).
    J v by forward mode (``jax.linearize``), Jᵀ u by reverse mode (``jax.vjp``).
    """
    d, jvp = jax.linearize(f, flat)
    _, vjp = jax.vjp(f, flat)

    def weighted(x: jax.Array) -> jax.Array:
        return x * weight.reshape(weight.shape + (1,) * (x.ndim - weight.ndim))

    def fvp(v: jax.Array) -> jax.Array:
        u = jax.tree_util.tree_map(weighted, fisher(d, jvp(v)))
        return vjp(u)[0] + damping * v

    return fvp


class StepInfo(NamedTuple):
    accepted: jax.Array  # bool: a line-search candidate passed
    kl: jax.Array  # mean KL(old ‖ new) of the step taken (0 if none)
    improve: jax.Array  # surrogate improvement of the step taken (0 if none)
    expected: jax.Array  # gᵀ(full step): the linearly predicted improvement
    tries: jax.Array  # line-search candidates evaluated


def line_search(
    evaluate: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    flat: jax.Array,
    full_step: jax.Array,
    expected: jax.Array,
    surrogate_old: jax.Array,
    cfg: HatrpoConfig,
    delta: jax.Array | float | None = None,
) -> tuple[jax.Array, StepInfo]:
    """Backtracking: the first θ = θ_old + c^j·step (j < ls_step) with ``evaluate(θ) = (L, KL)``
    satisfying KL ≤ δ, L − L_old > 0 and L − L_old > accept_ratio·c^j·expected; else θ_old.
    δ is ``delta`` (default ``cfg.kl_threshold``)."""
    delta = cfg.kl_threshold if delta is None else delta

    def cond(c):
        j, accepted = c[0], c[1]
        return (j < cfg.ls_step) & ~accepted

    def body(c):
        j = c[0]
        frac = cfg.backtrack_coeff**j
        candidate = flat + frac * full_step
        surrogate, kl = evaluate(candidate)
        improve = surrogate - surrogate_old
        enough = improve > cfg.accept_ratio * frac * expected
        ok = (kl <= delta) & (improve > 0) & enough
        return j + 1, ok, candidate, kl, improve

    zero = jnp.float32(0)
    init = (jnp.int32(0), jnp.bool_(False), flat, zero, zero)
    tries, accepted, candidate, kl, improve = jax.lax.while_loop(cond, body, init)
    info = StepInfo(
        accepted=accepted,
        kl=jnp.where(accepted, kl, 0.0),
        improve=jnp.where(accepted, improve, 0.0),
        expected=expected,
        tries=tries,
    )
    return jnp.where(accepted, candidate, flat), info


class AgentBatch(NamedTuple):
    """One agent's slice of the batch; ``weight`` sums to 1 over valid samples."""

    obs: jax.Array  # [B, O]
    action: jax.Array  # [B] int32 or [B, A]
    avail: jax.Array | None  # [B, A] bool (discrete) or None
    advantage: jax.Array  # [B], standardised
    factor: jax.Array  # [B], M: the already-updated agents' compounded ratio
    weight: jax.Array  # [B]


def trust_region_step(
    head: PolicyHead,
    cfg: HatrpoConfig,
    theta: Params,
    batch: AgentBatch,
    delta: jax.Array | float | None = None,
) -> tuple[Params, jax.Array, StepInfo]:
    """One agent's TRPO step on L(θ) = Σ_b w_b [M_b (π_θ/π_old)(a_b|o_b) Â_b + c_H H(π_θ(·|o_b))]
    within KL ≤ δ (``delta``, default ``cfg.kl_threshold``).

    Returns (θ_new, π_new/π_old on the batch [B], StepInfo); the math is in the module docstring.
    """
    delta = cfg.kl_threshold if delta is None else delta
    flat_old, unravel = ravel_pytree(theta)
    f = lambda flat: head.forward(unravel(flat), batch.obs, batch.avail)
    d_old = jax.lax.stop_gradient(f(flat_old))
    logp_old = head.dist.log_prob(d_old, batch.action)
    coef = batch.weight * batch.factor * batch.advantage

    def surrogate_and_logp(flat):
        d = f(flat)
        logp = head.dist.log_prob(d, batch.action)
        surrogate = jnp.sum(coef * jnp.exp(logp - logp_old))
        if cfg.entropy_coef:  # a Python branch: the default (0) traces no entropy term
            surrogate += cfg.entropy_coef * jnp.sum(batch.weight * head.dist.entropy(d))
        return surrogate, (d, logp)

    (surrogate_old, _), grad = jax.value_and_grad(surrogate_and_logp, has_aux=True)(flat_old)
    fvp = fisher_vector_product(f, head.dist.fisher, batch.weight, flat_old, cfg.cg_damping)
    direction = conjugate_gradient(fvp, grad, cfg.cg_iters)
    quad = 0.5 * jnp.vdot(direction, fvp(direction))  # ½ xᵀ F x, the model KL of x
    scale = jnp.where(quad > 0, jnp.sqrt(delta / jnp.maximum(quad, 1e-30)), 0.0)
    full_step = scale * direction

    def evaluate(flat):
        surrogate, (d, _) = surrogate_and_logp(flat)
        kl = jnp.sum(batch.weight * head.dist.kl(d_old, d))
        return surrogate, kl

    flat_new, info = line_search(
        evaluate, flat_old, full_step, jnp.vdot(grad, full_step), surrogate_old, cfg, delta
    )
    logp_new = head.dist.log_prob(f(flat_new), batch.action)
    return unravel(flat_new), jnp.exp(logp_new - logp_old), info


def sequential_update(
    head: PolicyHead,
    cfg: HatrpoConfig,
    thetas: Params,
    obs: jax.Array,
    action: jax.Array,
    avail: jax.Array | None,
    advantage: jax.Array,
    weight: jax.Array,
    order: jax.Array,
    delta: jax.Array | float | None = None,
) -> tuple[Params, StepInfo]:
    """Trust-region steps (radius ``delta``, default ``cfg.kl_threshold``) for agents
    ``order[0], order[1], ...`` in turn (``lax.scan``), each with M = the product of the
    earlier agents' new/old probability ratios.

    obs [B, N, O], action [B, N(, A)], avail [B, N, A] | None, advantage [B], weight [B, N]
    (each agent's column sums to 1 over its decisions); returns the stacked new parameters and
    the per-step ``StepInfo`` (leaves [N], in ``order``)."""
    take = lambda x, i: None if x is None else jax.lax.dynamic_index_in_dim(x, i, 1, False)

    def body(carry, i):
        thetas, factor = carry
        theta_i = jax.tree_util.tree_map(lambda x: x[i], thetas)
        batch = AgentBatch(
            take(obs, i), take(action, i), take(avail, i), advantage, factor, take(weight, i)
        )
        theta_i, ratio, info = trust_region_step(head, cfg, theta_i, batch, delta)
        thetas = jax.tree_util.tree_map(lambda x, y: x.at[i].set(y), thetas, theta_i)
        return (thetas, factor * jax.lax.stop_gradient(ratio)), info

    (thetas, _), infos = jax.lax.scan(body, (thetas, jnp.ones_like(advantage)), order)
    return thetas, infos


# ------------------------------------------------------------------------ advantages
def gae(
    reward: jax.Array,
    value: jax.Array,
    next_value: jax.Array,
    terminal: jax.Array,
    done: jax.Array,
    gamma: float,
    lam: float,
) -> jax.Array:
    """Generalised advantage estimates along axis 0 (time), all inputs [T, ...]:
    δ^t = r^t + γ(1 − term^t) V(s'^t) − V(s^t),  Â^t = δ^t + γλ(1 − done^t) Â^{t+1}."""
    delta = reward + gamma * (1.0 - terminal) * next_value - value

    def back(carry, inp):
        delta_t, done_t = inp
        adv = delta_t + gamma * lam * (1.0 - done_t) * carry
        return adv, adv

    _, adv = jax.lax.scan(back, jnp.zeros_like(delta[0]), (delta, done), reverse=True)
    return adv


class ValueNorm(struct.PyTreeNode):
    """Running debiased first/second moments of the return targets (HARL's ValueNorm)."""

    mean: jax.Array
    mean_sq: jax.Array
    debias: jax.Array

    @classmethod
    def create(cls) -> ValueNorm:
        zero = jnp.float32(0)
        return cls(zero, zero, zero)

    def update(self, x: jax.Array, weight: jax.Array, beta: float) -> ValueNorm:
        """Moments ← β·moments + (1 − β)·(weighted batch moments of ``x``)."""
        return ValueNorm(
            mean=beta * self.mean + (1 - beta) * jnp.sum(weight * x),
            mean_sq=beta * self.mean_sq + (1 - beta) * jnp.sum(weight * x**2),
            debias=beta * self.debias + (1 - beta),
        )

    def stats(self) -> tuple[jax.Array, jax.Array]:
        """(μ, σ) with σ² = E[x²] − μ² floored at 1e-2, as HARL does."""
        debias = jnp.maximum(self.debias, 1e-5)
        mu = self.mean / debias
        return mu, jnp.sqrt(jnp.maximum(self.mean_sq / debias - mu**2, 1e-2))


# ------------------------------------------------------------------------------ state
class Transition(NamedTuple):
    obs: jax.Array  # [N, O]
    action: jax.Array  # [N] int32 or [N, A] (the unclipped Gaussian sample)
    avail: jax.Array | None  # [N, A] bool (discrete) or None
    reward: jax.Array  # [N]
    state: jax.Array  # [S] global state before the step (the critic's input)
    next_state: jax.Array  # [S] global state after it
    terminal: jax.Array  # [] 1.0 on a true termination (no bootstrap)
    done: jax.Array  # [] 1.0 on the episode's last transition
    valid: jax.Array  # [] 0.0 for steps after the episode ended


def collect(
    env: MultiAgentEnv, head: PolicyHead, cfg: HatrpoConfig, thetas: Params, key: jax.Array
) -> tuple[Transition, jax.Array]:
    """T = ``episode_length`` steps of E = ``num_envs`` environments under the stochastic
    policies ``thetas``: transitions [T, E, ...] and the mean per-agent return of the
    episodes that ended in them.

    Without ``auto_reset`` each environment plays one episode, padded to T after it
    ends (``valid`` 0 there). With it, an environment that ends is reset on the spot and
    every step is real; an episode still running at T is cut there and bootstrapped
    from V. Either way only an episode's own step limit is a time limit: a done on its
    step T − 1 bootstraps, any earlier done is terminal."""
    spec = env.spec
    n, T, E = spec.num_agents, spec.episode_length, cfg.num_envs
    k_reset, k_steps = jax.random.split(key)
    obs, env_state = jax.vmap(env.reset)(jax.random.split(k_reset, E))
    global_state = jax.vmap(env.global_state)

    def restart(key, done, next_obs, env_state):
        """Where ``done``, a fresh episode's observation and env state."""
        new_obs, new_env_state = jax.vmap(env.reset)(jax.random.split(key, E))
        pick = lambda new, old: jnp.where(done.reshape(-1, *([1] * (old.ndim - 1))), new, old)
        return pick(new_obs, next_obs), jax.tree_util.tree_map(pick, new_env_state, env_state)

    def step(carry, key):
        # The global state rides in the carry: each step's "after" is the next "before".
        obs, env_state, state_before, alive, age, ret = carry
        k_act, k_env = jax.random.split(key)
        avail = jax.vmap(env.avail_actions)(env_state) if spec.discrete else None
        actions = head.dist.sample(k_act, forward_team(head, thetas, obs, avail))
        next_obs, env_state, reward, done, _ = jax.vmap(env.step)(
            jax.random.split(k_env, E), env_state, actions
        )
        state_after = global_state(env_state)
        tr = Transition(
            obs,
            actions,
            avail,
            reward,
            state_before,
            state_after,
            (done & (age < T - 1)).astype(jnp.float32),
            done.astype(jnp.float32),
            alive.astype(jnp.float32),
        )
        ret = ret + reward * alive[:, None]
        ended = done & alive
        finished = jnp.where(ended[:, None], ret, 0.0)
        if cfg.auto_reset:
            next_obs, env_state = restart(jax.random.fold_in(k_env, 1), done, next_obs, env_state)
            state_after = global_state(env_state)
            age = jnp.where(done, 0, age + 1)
            ret = jnp.where(ended[:, None], 0.0, ret)
        else:
            alive, age = alive & ~done, age + 1
        return (next_obs, env_state, state_after, alive, age, ret), (tr, finished, ended)

    start = jnp.ones((E,), bool), jnp.zeros((E,), jnp.int32), jnp.zeros((E, n))
    carry = (obs, env_state, global_state(env_state), *start)
    _, (traj, finished, ended) = jax.lax.scan(step, carry, jax.random.split(k_steps, T))
    episode_return = jnp.sum(finished) / jnp.maximum(n * jnp.sum(ended), 1.0)
    return traj, episode_return


class TrainState(struct.PyTreeNode):
    actor_params: Params  # stacked {"net": ...[, "log_std": [N, A]]}
    critic_params: Params  # one centralised V network (not stacked)
    critic_opt_state: optax.OptState
    value_norm: ValueNorm
    key: jax.Array  # raw uint32 key (checkpointable as a plain array)
    iteration: jax.Array  # int32 [], iterations done


def kl_radius(cfg: HatrpoConfig, env_steps: jax.Array) -> jax.Array:
    """The trust-region radius after ``env_steps`` env steps of training:
    δ_t = δ + (δ_final − δ)·min(1, t / T_anneal), or δ throughout when T_anneal = 0."""
    if not cfg.kl_anneal_env_steps:
        return jnp.float32(cfg.kl_threshold)
    frac = jnp.minimum(1.0, env_steps / cfg.kl_anneal_env_steps)
    return cfg.kl_threshold + (cfg.kl_threshold_final - cfg.kl_threshold) * frac


def critic_optimiser(cfg: HatrpoConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.lr_critic, eps=cfg.adam_eps)
    )


def decision_weights(valid: jax.Array, avail: jax.Array | None, num_agents: int) -> jax.Array:
    """Per-agent sample weights [B, N] for the actor updates: w_bi ∝ valid_b · [agent i has
    more than one legal action at b], each agent's column summing to 1.

    HARL's policy active masks: a step with a single legal action (a dead SMAX unit's no-op)
    is no decision; its ratio and KL are identically 1 and 0, so counting it would dilute the
    agent's surrogate and trust region over its real decisions."""
    decides = jnp.ones((1, num_agents)) if avail is None else (jnp.sum(avail, axis=-1) > 1)
    active = valid[:, None] * decides
    return active / jnp.maximum(jnp.sum(active, axis=0), 1.0)


def weighted_standardise(x: jax.Array, weight: jax.Array) -> jax.Array:
    """(x − mean) / (std + 1e-5) with ``weight`` (summing to 1) defining the moments."""
    mean = jnp.sum(weight * x)
    std = jnp.sqrt(jnp.sum(weight * (x - mean) ** 2))
    return (x - mean) / (std + 1e-5)


# ---------------------------------------------------------------------------- trainer
def make_trainer(env: MultiAgentEnv, algo_cfg: Mapping[str, Any]) -> Trainer:
    """HATRPO on ``env`` with hyper-parameters ``algo_cfg`` (see ``HatrpoConfig``)."""
    cfg = algo_cfg if isinstance(algo_cfg, HatrpoConfig) else HatrpoConfig.from_mapping(algo_cfg)
    spec = env.spec
    n, T, E = spec.num_agents, spec.episode_length, cfg.num_envs
    B = T * E
    if B % cfg.critic_minibatches:
        raise ValueError(
            f"algo.critic_minibatches must divide num_envs * episode_length = {B}, "
            f"got {cfg.critic_minibatches}"
        )
    head = make_policy_head(spec, cfg)
    critic = StateValue(cfg.critic_hidden, cfg.activation, cfg.layer_norm)
    tx = critic_optimiser(cfg)

    def init(key: jax.Array) -> TrainState:
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        key, k_actor, k_critic = jax.random.split(key, 3)
        critic_params = critic.init(k_critic, jnp.zeros((spec.state_dim,), jnp.float32))
        return TrainState(
            actor_params=init_actors(spec, cfg, k_actor),
            critic_params=critic_params,
            critic_opt_state=tx.init(critic_params),
            value_norm=ValueNorm.create(),
            key=key,
            iteration=jnp.int32(0),
        )

    def init_committed(key: jax.Array) -> TrainState:
        """Jitted ``init`` committed to the default device, so a fresh and an Orbax-restored
        state share one compiled ``train_chunk`` (see MADDPG's ``init_committed``)."""
        return jax.device_put(jax.jit(init)(key), jax.devices()[0])

    def update_critic(state: TrainState, inputs, target_n, value_old_n, weight, key):
        """``critic_epoch`` × ``critic_minibatches`` clipped-Huber Adam steps (normalised units)."""

        def loss_fn(params, mb):
            inputs, target, old, w = mb
            v = critic.apply(params, inputs)
            clipped = old + jnp.clip(v - old, -cfg.value_clip, cfg.value_clip)
            huber = lambda e: optax.huber_loss(e, delta=cfg.huber_delta)
            loss = jnp.maximum(huber(target - v), huber(target - clipped))
            return jnp.sum(w * loss) / jnp.maximum(jnp.sum(w), 1e-8)

        def minibatch_step(carry, mb):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, mb)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        def epoch(carry, key):
            perm = jax.random.permutation(key, B).reshape(cfg.critic_minibatches, -1)
            mbs = jax.tree_util.tree_map(lambda x: x[perm], (inputs, target_n, value_old_n, weight))
            return jax.lax.scan(minibatch_step, carry, mbs)

        (params, opt_state), losses = jax.lax.scan(
            epoch,
            (state.critic_params, state.critic_opt_state),
            jax.random.split(key, cfg.critic_epoch),
        )
        return params, opt_state, jnp.mean(losses)

    def iteration(state: TrainState, _):
        key, k_collect, k_order, k_critic = jax.random.split(state.key, 4)
        traj, episode_return = collect(env, head, cfg, state.actor_params, k_collect)

        mu, sigma = state.value_norm.stats()
        value = critic.apply(state.critic_params, traj.state) * sigma + mu  # [T, E]
        next_value = critic.apply(state.critic_params, traj.next_state) * sigma + mu
        team_reward = jnp.mean(traj.reward, axis=-1)
        adv = gae(
            team_reward, value, next_value, traj.terminal, traj.done, cfg.gamma, cfg.gae_lambda
        )
        returns = adv + value

        flat = lambda x: None if x is None else x.reshape(B, *x.shape[2:])
        valid = flat(traj.valid)
        step_weight = valid / jnp.maximum(jnp.sum(valid), 1.0)  # [B]: the batch's moments
        avail = flat(traj.avail)
        weight = decision_weights(valid, avail, n)
        obs = flat(traj.obs)
        d_old = forward_team(head, state.actor_params, obs, avail)
        entropy = jnp.sum(weight * head.dist.entropy(d_old)) / n
        order = jax.random.permutation(k_order, n)
        delta = kl_radius(cfg, state.iteration * B)
        actor_params, infos = sequential_update(
            head,
            cfg,
            state.actor_params,
            obs,
            flat(traj.action),
            avail,
            weighted_standardise(flat(adv), step_weight),
            weight,
            order,
            delta,
        )

        value_norm = state.value_norm.update(flat(returns), step_weight, cfg.value_norm_beta)
        mu, sigma = value_norm.stats()
        critic_params, critic_opt_state, critic_loss = update_critic(
            state,
            flat(traj.state),
            (flat(returns) - mu) / sigma,
            (flat(value) - mu) / sigma,
            valid,
            k_critic,
        )
        metrics = {
            "episode_return": episode_return,
            "critic_loss": critic_loss,
            "kl": jnp.mean(infos.kl),
            "kl_bound": delta,
            "accept_rate": jnp.mean(infos.accepted.astype(jnp.float32)),
            "entropy": entropy,
        }
        new_state = TrainState(
            actor_params=actor_params,
            critic_params=critic_params,
            critic_opt_state=critic_opt_state,
            value_norm=value_norm,
            key=key,
            iteration=state.iteration + 1,
        )
        return new_state, metrics

    @jax.jit
    def train_chunk(state: TrainState) -> tuple[TrainState, dict[str, jax.Array]]:
        """``iterations_per_chunk`` iterations; metrics are means over them. ``episode_return``
        is the per-agent return of the collected (stochastic-policy) episodes."""
        state, per_iter = jax.lax.scan(iteration, state, None, length=cfg.iterations_per_chunk)
        metrics = jax.tree_util.tree_map(jnp.mean, per_iter)
        metrics["env_steps"] = state.iteration * B
        return state, metrics

    def policy_params(state: TrainState) -> dict[str, Params]:
        """{"actor": stacked ``networks.Actor`` params (logits / Gaussian mean), "value": the
        centralised V network, "value_stats": (μ, σ) with V(s) = σ·value(s) + μ
        [, "log_std": [N, A]]}."""
        out = {
            "actor": state.actor_params["net"],
            "value": state.critic_params,
            "value_stats": jnp.stack(state.value_norm.stats()),
        }
        if not spec.discrete:
            out["log_std"] = state.actor_params["log_std"]
        return out

    return Trainer(
        init=init_committed,
        train_chunk=train_chunk,
        env_steps_per_chunk=cfg.iterations_per_chunk * B,
        policy_params=policy_params,
    )
