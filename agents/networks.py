"""Actor and critic networks, and the per-agent parameter stacking convention.

Per-agent parameters are *stacked*: every leaf of ``actor_params`` / ``critic_params``
has a leading axis of size N (one slice per agent), built with ``jax.vmap(init)`` and
applied with ``jax.vmap(apply)``. Agents stay fully decentralised (no shared weights)
while the whole team runs as one batched computation.

Conventions shared by training, attacks and forensics:
  * ``actor_apply(params_i, obs_i [O]) -> out_i [A]``: logits for discrete actions,
    the action in [low, high] for continuous actions (sigmoid-squashed mean).
  * ``critic_apply(params_j, obs [N, O], act [N, A]) -> Q_j`` (scalar): agent j's
    centralised critic over every agent's observation and action. Discrete actions are
    fed as probability vectors / one-hots so that ∂Q_j/∂a_i is defined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Hidden-layer nonlinearities by config name. Stage 2 differentiates critics twice in the
# actions, and a ReLU network is piecewise linear there: its Hessian is exactly zero almost
# everywhere, so the directional curvature D_ij the traceback relies on would vanish. Critics
# meant for forensics therefore use a smooth activation (SiLU behaves like ReLU but is C^∞).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "silu": nn.silu,
    "tanh": nn.tanh,
    "softplus": nn.softplus,
    "gelu": nn.gelu,
}


class MLP(nn.Module):
    """MLP with ``activation`` hidden layers and a linear head of ``out_dim`` units.

    ``layer_norm`` is HARL's MLPBase: LayerNorm of the input features (its
    ``use_feature_normalization``) and after every hidden activation, so each layer sees
    zero-mean, unit-variance features whatever the scale of the raw inputs. LayerNorm is
    smooth away from constant inputs, so curvature-based forensics still applies.
    """

    hidden: Sequence[int]
    out_dim: int
    activation: str = "relu"
    layer_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        if self.layer_norm:
            x = nn.LayerNorm()(x)
        for width in self.hidden:
            x = act(nn.Dense(width)(x))
            if self.layer_norm:
                x = nn.LayerNorm()(x)
        return nn.Dense(self.out_dim)(x)


class Actor(nn.Module):
    """Decentralised actor: own observation → logits (discrete) or action (continuous)."""

    hidden: Sequence[int]
    action_dim: int
    discrete: bool
    action_low: float = 0.0
    action_high: float = 1.0
    activation: str = "relu"
    layer_norm: bool = False

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        out = MLP(self.hidden, self.action_dim, self.activation, self.layer_norm)(obs)
        if self.discrete:
            return out
        return self.action_low + (self.action_high - self.action_low) * nn.sigmoid(out)


def actor_for(spec: Any, hidden: Sequence[int], activation: str, layer_norm: bool = False) -> Actor:
    """The actor for an env spec (``envs.base.EnvSpec``): its action size, kind and box."""
    return Actor(
        hidden=hidden,
        action_dim=spec.action_dim,
        discrete=spec.discrete,
        action_low=spec.action_low,
        action_high=spec.action_high,
        activation=activation,
        layer_norm=layer_norm,
    )


class Critic(nn.Module):
    """Centralised critic Q_j(o_1..o_N, a_1..a_N) → scalar."""

    hidden: Sequence[int]
    activation: str = "relu"

    @nn.compact
    def __call__(self, obs: jax.Array, act: jax.Array) -> jax.Array:
        x = jnp.concatenate([obs.reshape(-1), act.reshape(-1)])
        return MLP(self.hidden, 1, self.activation)(x)[0]


def init_stacked(module: nn.Module, key: jax.Array, num_agents: int, *example) -> dict:
    """Independent parameters for each of ``num_agents`` agents, stacked on axis 0."""
    keys = jax.random.split(key, num_agents)
    return jax.vmap(lambda k: module.init(k, *example))(keys)


def agent_specific_leaves(stacked_params: dict) -> dict:
    """Bool pytree over ``stacked_params``: True for the input layer's bias, False elsewhere.

    Parameter sharing with an agent id: feeding one shared MLP the input [x; e_i] (e_i the
    one-hot id of agent i) gives a first layer W x + W_e e_i + b = W x + b_i, so a shared
    network with an id is exactly a network whose input-layer bias b_i is agent i's own
    and every other parameter is common to all agents. The stacked layout (leading N axis,
    ``actor_apply(params_i, x_i)``) is then unchanged for every consumer of the params.
    """

    def own(path, _leaf) -> bool:
        names = [getattr(entry, "key", None) for entry in path]
        return names[-2:] == ["Dense_0", "bias"]

    return jax.tree_util.tree_map_with_path(own, stacked_params)


def tie_shared(stacked: dict, agent_specific: dict) -> dict:
    """Sum the shared leaves over the agent axis and broadcast the sum back to every agent
    (agent-specific leaves unchanged): for gradients, Σ_i ∂L_i/∂θ = ∂(Σ_i L_i)/∂θ, the
    gradient of a parameter θ common to all agents."""
    return jax.tree_util.tree_map(
        lambda x, own: x if own else jnp.broadcast_to(jnp.sum(x, axis=0), x.shape),
        stacked,
        agent_specific,
    )


def init_shared(module: nn.Module, key: jax.Array, num_agents: int, *example) -> dict:
    """Stacked parameters of one network shared by ``num_agents`` agents with an agent id:
    agent 0's weights broadcast to every agent, and per-agent input-layer biases drawn
    N(0, 1/fan_in) like the id columns W_e of a LeCun-normal input layer would be."""
    k_net, k_ids = jax.random.split(key)
    stacked = init_stacked(module, k_net, num_agents, *example)
    agent_specific = agent_specific_leaves(stacked)
    fan_in = sum(x.size for x in example)

    def tie(x, own):
        if own:
            return jax.random.normal(k_ids, x.shape, x.dtype) / jnp.sqrt(fan_in)
        return jnp.broadcast_to(x[0], x.shape)

    return jax.tree_util.tree_map(tie, stacked, agent_specific)


MASKED_LOGIT = -1e9  # logit of an unavailable discrete action


def mask_logits(logits: jax.Array, avail: jax.Array | None) -> jax.Array:
    """Logits with unavailable actions set to a large negative value (probability 0,
    finite log-probabilities and gradients); ``avail=None`` means every action is legal."""
    return logits if avail is None else jnp.where(avail, logits, MASKED_LOGIT)
