"""Attacks and faults on one victim agent, and the paper's choice of when they start.

An ``Attack`` is a small frozen (hashable) config; everything an episode varies — which
agent is the victim i, which agent j's critic is "observed", the start step and the window
length — lives in a ``Target`` of int32 arrays, so one compiled rollout serves every pair
and start under ``vmap``. Inside the rollout, at step t with
active(t) = start ≤ t < start + window, three pure hooks touch the victim only:

  * ``perceive``        observation attacks: the victim acts on õ_i instead of o_i;
  * ``corrupt_params``  parameter corruption: the victim acts with θ̃_i instead of θ_i;
  * ``act``             action attacks: the victim's action is replaced.

Attacks (``Attack.name``):
  none            nothing (clean episodes).
  worst_action    the paper's attack. Discrete: a_i = argmin_a logits_i(a) over available
                  actions. Continuous: a_i ← clip(a_i − η ∇_{a_i} Q_j(o, a), low, high), one
                  gradient step lowering the observed agent j's critic (η = ``step_size``).
  obs_gaussian    õ_i = o_i + σ ξ, ξ ~ N(0, I) fresh each step.
  obs_fgsm        õ_i = o_i + δ, ‖δ‖∞ ≤ ε, one signed-gradient step (PGD with k=1, α=ε).
  obs_pgd         õ_i = o_i + δ from k projected signed-gradient steps of size α.
                  Both minimise the team value the critics assign to the victim's
                  perturbed action (see ``team_value_objective``).
  action_noise    discrete: a_i = argmax(logits_i + σ ξ) over available actions;
                  continuous: a_i = clip(μ_i + σ ξ, low, high).
  stuck_actuator  the victim's action at the onset step is latched and repeated.
  param_noise     θ̃_i = θ_i + σ ξ on every leaf of the victim's actor, drawn once per
                  episode; the other agents' parameters are untouched.

Start selection (the paper, per ordered pair victim i → observed j, from the clean
episode): G_ij^t = ‖∂Q_j/∂a_i‖ and D_ij^t = gᵀ H g, with g, H the gradient and Hessian of
−Q_j in a_i at the clean step t (``influence_geometry``). ``high_influence`` = argmax G
over steps with D > 0, ``low_influence`` = argmin G over steps with D < 0, both searched in
the first ``search_fraction`` of the episode (the paper's MADDPG setting is 0.25);
``uniform`` = a uniformly random step in [0, T − window]. See ``select_start`` for the
fallbacks when no step has the required curvature sign.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from envs.base import EnvSpec
from forensics.stage2 import critic_geometry

Params = Any  # a flax params pytree; "stacked" means every leaf has a leading agent axis N

ATTACKS = (
    "none",
    "worst_action",
    "obs_gaussian",
    "obs_fgsm",
    "obs_pgd",
    "action_noise",
    "stuck_actuator",
    "param_noise",
)
START_MODES = ("high_influence", "low_influence", "uniform")
# Attacks whose hooks differentiate a centralised Q critic (continuous worst_action too).
CRITIC_ATTACKS = ("obs_fgsm", "obs_pgd")


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Attack:
    """One attack's hyperparameters (hashable: a static argument of the jitted rollout).

    name            one of ``ATTACKS``.
    window          attacked steps from the onset (≥ 1; cut short at the episode end).
    start           onset classes, each one of ``START_MODES``; the protocol records one
                    attacked episode per (ordered pair, class).
    victim          "all": every ordered pair (i, j ≠ i) — the paper's protocol;
                    "uniform": one random pair per seed; an int k: the pairs (k, j ≠ k).
    epsilon         L∞ radius of obs_fgsm / obs_pgd.
    sigma           noise std of obs_gaussian / action_noise / param_noise.
    steps           PGD iterations k (obs_pgd).
    step_size       PGD step α (obs_pgd); gradient step η of continuous worst_action.
    search_fraction share of the episode searched for high/low-influence onsets.
    """

    name: str = "none"
    window: int = 5
    start: tuple[str, ...] = ("high_influence", "low_influence")
    victim: str | int = "all"
    epsilon: float = 0.0
    sigma: float = 0.0
    steps: int = 10
    step_size: float = 1.0
    search_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(
                f"attack.name: unknown attack {self.name!r}; expected one of {ATTACKS}"
            )
        start = (self.start,) if isinstance(self.start, str) else tuple(self.start)
        object.__setattr__(self, "start", start)
        checks = [
            ("window", _is_int(self.window) and self.window >= 1, "an integer >= 1"),
            (
                "start",
                len(start) > 0 and all(s in START_MODES for s in start),
                f"one or a list of {START_MODES}",
            ),
            (
                "victim",
                self.victim in ("all", "uniform") or (_is_int(self.victim) and self.victim >= 0),
                "'all', 'uniform' or an agent index",
            ),
            ("epsilon", _is_num(self.epsilon) and self.epsilon >= 0, "a number >= 0"),
            ("sigma", _is_num(self.sigma) and self.sigma >= 0, "a number >= 0"),
            ("steps", _is_int(self.steps) and self.steps >= 1, "an integer >= 1"),
            ("step_size", _is_num(self.step_size) and self.step_size > 0, "a number > 0"),
            (
                "search_fraction",
                _is_num(self.search_fraction) and 0 < self.search_fraction <= 1,
                "a number in (0, 1]",
            ),
        ]
        for field, ok, expected in checks:
            if not ok:
                raise ValueError(
                    f"attack.{field}: expected {expected}, got {getattr(self, field)!r}"
                )
        if len(set(start)) != len(start):
            raise ValueError(f"attack.start: expected distinct modes, got {list(start)}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Attack:
        """Build from the ``attack`` config section (keys = field names; ``name`` required)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"attack.{unknown[0]}: unknown key; expected only {sorted(known)}")
        if "name" not in cfg:
            raise ValueError(f"attack.name: missing; expected one of {ATTACKS}")
        kw = dict(cfg)
        if "start" in kw and not isinstance(kw["start"], str):
            kw["start"] = tuple(kw["start"])
        return cls(**kw)

    @property
    def magnitude(self) -> float:
        """The attack's strength in its own unit (ε, σ or η; 0 where it has none)."""
        if self.name in ("obs_fgsm", "obs_pgd"):
            return float(self.epsilon)
        if self.name in ("obs_gaussian", "action_noise", "param_noise"):
            return float(self.sigma)
        if self.name == "worst_action":
            return float(self.step_size)
        return 0.0

    def needs_critic(self, spec: EnvSpec) -> bool:
        """Whether the hooks differentiate a Q critic (start selection aside)."""
        return self.name in CRITIC_ATTACKS or (self.name == "worst_action" and not spec.discrete)


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool) and np.isfinite(v)


class Target(NamedTuple):
    """Who is attacked and when (int32 arrays of one shared batch shape).

    ``window == 0`` means a clean episode: no step is attacked.
    """

    victim: jax.Array
    observed: jax.Array
    start: jax.Array
    window: jax.Array


def clean_target(shape: tuple[int, ...] = ()) -> Target:
    """Targets of clean episodes (window 0)."""
    z = jnp.zeros(shape, jnp.int32)
    return Target(victim=z, observed=z, start=z, window=z)


def is_active(target: Target, t: jax.Array) -> jax.Array:
    """active(t) = start ≤ t < start + window."""
    return (t >= target.start) & (t < target.start + target.window)


# ------------------------------------------------------------------ the team's policy
@dataclass(frozen=True)
class Team:
    """Static description of the policy: env facts plus the network apply functions.

    ``actor_apply(params_i, obs_i [O]) -> out_i [A]`` (logits or action) and
    ``critic_apply(params_j, obs [N, O], act [N, A]) -> Q_j`` as in ``agents.networks``.
    """

    spec: EnvSpec
    actor_apply: Callable[[Params, jax.Array], jax.Array]
    critic_apply: Callable[[Params, jax.Array, jax.Array], jax.Array] | None = None

    def greedy(self, out: jax.Array, avail: jax.Array) -> jax.Array:
        """Evaluation action from an actor output: masked argmax (discrete) or μ (continuous)."""
        if self.spec.discrete:
            return jnp.argmax(jnp.where(avail, out, -jnp.inf), axis=-1).astype(jnp.int32)
        return out

    def critic_input(self, action: jax.Array) -> jax.Array:
        """What a critic consumes for an action: one-hot (discrete) or the action itself."""
        if self.spec.discrete:
            return jax.nn.one_hot(action, self.spec.action_dim, dtype=jnp.float32)
        return action

    def soft_action(self, out: jax.Array) -> jax.Array:
        """Differentiable critic input of an actor output: softmax(logits) or μ."""
        return jax.nn.softmax(out) if self.spec.discrete else out

    def clip(self, action: jax.Array) -> jax.Array:
        return jnp.clip(action, self.spec.action_low, self.spec.action_high)


def agent_slice(stacked: Params, i: jax.Array) -> Params:
    """Agent i's parameters out of a stacked pytree."""
    return jax.tree_util.tree_map(lambda p: p[i], stacked)


def team_value(team: Team, critic_params: Params, obs: jax.Array, act: jax.Array) -> jax.Array:
    """Σ_j Q_j(o, a) over every agent's critic (stacked ``critic_params``)."""
    q = jax.vmap(team.critic_apply, in_axes=(0, None, None))(critic_params, obs, act)
    return jnp.sum(q)


# ------------------------------------------------------------------------ the hooks
class Step(NamedTuple):
    """What the hooks see at one step (true, unattacked quantities)."""

    obs: jax.Array  # [N, O] true observations
    avail: jax.Array  # bool [N, A]
    clean_critic_act: jax.Array  # [N, A] critic input of every agent's clean action
    victim: jax.Array  # int32 []
    observed: jax.Array  # int32 []


def team_value_objective(
    team: Team, victim_params: Params, critic_params: Params, step: Step, obs_v: jax.Array
) -> jax.Array:
    """L(õ_i) = Σ_j Q_j(o, a_{−i}, π̃_i(õ_i)): the value the critics give the team when the
    victim acts on õ_i and everyone else takes its clean action.

    The critics see the true observations o; π̃_i is the differentiable actor output
    (softmax of the logits when discrete, the action when continuous). Observation
    attacks minimise L, i.e. maximise the victim's cost −Σ_j Q_j.
    """
    a_v = team.soft_action(team.actor_apply(victim_params, obs_v))
    act = step.clean_critic_act.at[step.victim].set(a_v)
    return team_value(team, critic_params, step.obs, act)


def pgd(
    objective: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    epsilon: float,
    steps: int,
    step_size: float,
) -> jax.Array:
    """argmin over the iterates of L∞ projected signed-gradient descent around x.

    δ_0 = 0,  δ_{k+1} = clip(δ_k − α sign ∇L(x + δ_k), −ε, ε);  returns x + δ* with δ* the
    iterate (δ_0 included) of lowest L, so the result never scores worse than x itself.
    FGSM is the case k = 1, α = ε.
    """
    value_and_grad = jax.value_and_grad(lambda d: objective(x + d))

    def body(carry, _):
        delta, best_delta, best_val = carry
        val, g = value_and_grad(delta)
        better = val < best_val
        best_delta = jnp.where(better, delta, best_delta)
        best_val = jnp.where(better, val, best_val)
        delta = jnp.clip(delta - step_size * jnp.sign(g), -epsilon, epsilon)
        return (delta, best_delta, best_val), None

    zero = jnp.zeros_like(x)
    (delta, best_delta, best_val), _ = jax.lax.scan(body, (zero, zero, jnp.inf), None, steps)
    final_better = objective(x + delta) < best_val
    return x + jnp.where(final_better, delta, best_delta)


def perceive(
    attack: Attack,
    team: Team,
    key: jax.Array,
    step: Step,
    victim_params: Params,
    critic_params: Params,
) -> jax.Array:
    """The victim's perceived observation õ_i [O] (its true o_i unless an obs attack)."""
    obs_v = step.obs[step.victim]
    if attack.name == "obs_gaussian":
        return obs_v + attack.sigma * jax.random.normal(key, obs_v.shape, obs_v.dtype)
    if attack.name in ("obs_fgsm", "obs_pgd"):
        fgsm = attack.name == "obs_fgsm"
        return pgd(
            lambda o: team_value_objective(team, victim_params, critic_params, step, o),
            obs_v,
            attack.epsilon,
            steps=1 if fgsm else attack.steps,
            step_size=attack.epsilon if fgsm else attack.step_size,
        )
    return obs_v


def corrupt_params(
    attack: Attack, key: jax.Array, actor_params: Params, victim: jax.Array
) -> Params:
    """Stacked actor params with only the victim's slice corrupted (param_noise: θ_i + σξ)."""
    if attack.name != "param_noise":
        return actor_params
    leaves, treedef = jax.tree_util.tree_flatten(actor_params)
    keys = jax.random.split(key, len(leaves))

    def corrupt(p: jax.Array, k: jax.Array) -> jax.Array:
        noise = attack.sigma * jax.random.normal(k, p.shape[1:], p.dtype)
        return p.at[victim].add(noise)

    return jax.tree_util.tree_unflatten(
        treedef, [corrupt(p, k) for p, k in zip(leaves, keys, strict=True)]
    )


def worst_action(
    team: Team, out_v: jax.Array, step: Step, critic_params: Params, step_size: float
) -> jax.Array:
    """The paper's worst action of the victim.

    Discrete: argmin_a logits(a) among available actions. Continuous: one gradient step
    a_i ← clip(a_i − η ∇_{a_i} Q_j(o, a), low, high) on the observed agent j's critic, at
    the team's clean joint action (a_i = the victim's own action).
    """
    if team.spec.discrete:
        avail = step.avail[step.victim]
        return jnp.argmin(jnp.where(avail, out_v, jnp.inf)).astype(jnp.int32)
    act = step.clean_critic_act.at[step.victim].set(out_v)
    q_j = agent_slice(critic_params, step.observed)
    grad = jax.grad(lambda a: team.critic_apply(q_j, step.obs, a))(act)[step.victim]
    return team.clip(out_v - step_size * grad)


def act(
    attack: Attack,
    team: Team,
    key: jax.Array,
    step: Step,
    out_v: jax.Array,
    latched: jax.Array,
    critic_params: Params,
) -> jax.Array:
    """The victim's action under attack, from its (possibly perturbed) actor output."""
    if attack.name == "worst_action":
        return worst_action(team, out_v, step, critic_params, attack.step_size)
    if attack.name == "action_noise":
        noisy = out_v + attack.sigma * jax.random.normal(key, out_v.shape, out_v.dtype)
        return (
            team.greedy(noisy, step.avail[step.victim]) if team.spec.discrete else team.clip(noisy)
        )
    if attack.name == "stuck_actuator":
        return latched
    return team.greedy(out_v, step.avail[step.victim])


# ----------------------------------------------------------------- start selection
def influence_geometry(
    critic_apply: Callable[[Params, jax.Array, jax.Array], jax.Array],
    critic_params: Params,
    obs: jax.Array,
    critic_act: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """G[t, j, i] = ‖∇_{a_i} Q_j‖ and D[t, j, i] = gᵀHg of −Q_j in a_i, for one clean episode.

    obs [T, N, O], critic_act [T, N, A]; index order [T, N(j), N(i)]. A thin view of
    ``forensics.stage2.critic_geometry`` (one home for the HVP machinery).
    """
    geo = critic_geometry(critic_apply, critic_params, obs[None], critic_act[None])
    return geo.G[0], geo.D[0]


def search_steps(attack: Attack, episode_length: int | jax.Array) -> jax.Array:
    """Steps searched for influence-based onsets: ⌊search_fraction · T⌋, at least 1."""
    steps = jnp.floor(attack.search_fraction * jnp.asarray(episode_length, jnp.float32))
    return jnp.maximum(1, steps.astype(jnp.int32))


def select_start(
    g: jax.Array, d: jax.Array, mode: str, horizon: int, key: jax.Array, last_start: int
) -> tuple[jax.Array, jax.Array]:
    """Onset step for one ordered pair from its clean-episode series G [T], D [T].

    high_influence: argmax_t G_t over t < horizon with D_t > 0;
    low_influence:  argmin_t G_t over t < horizon with D_t < 0;
    uniform:        a uniform step in [0, last_start].
    Fallback when no step in the horizon has the required sign of D (e.g. a piecewise-
    linear ReLU critic, whose Hessian is 0): the same argmax / argmin of G over the whole
    horizon, ignoring D. Returns (start int32, fell_back bool).
    """
    if mode == "uniform":
        return jax.random.randint(key, (), 0, last_start + 1, jnp.int32), jnp.bool_(False)
    in_horizon = jnp.arange(g.shape[0]) < horizon
    sign_ok = d > 0 if mode == "high_influence" else d < 0
    # Rank by G (high) or −G (low); ineligible steps get −inf.
    score = g if mode == "high_influence" else -g
    eligible = in_horizon & sign_ok
    found = jnp.any(eligible)
    mask = jnp.where(found, eligible, in_horizon)
    start = jnp.argmax(jnp.where(mask, score, -jnp.inf)).astype(jnp.int32)
    return start, ~found


def ordered_pairs(num_agents: int, victim: str | int) -> np.ndarray:
    """Ordered pairs (i, j ≠ i) as int32 [P, 2], restricted to i = victim when an int."""
    pairs = [(i, j) for i in range(num_agents) for j in range(num_agents) if i != j]
    if _is_int(victim):
        if victim >= num_agents:
            raise ValueError(f"attack.victim: expected an agent index < {num_agents}, got {victim}")
        pairs = [p for p in pairs if p[0] == victim]
    return np.asarray(pairs, np.int32)


def protocol_size(attack: Attack, num_agents: int) -> int:
    """Attacked episodes per seed: |pairs| × |start classes| (one pair when victim=uniform)."""
    pairs = 1 if attack.victim == "uniform" else len(ordered_pairs(num_agents, attack.victim))
    return pairs * len(attack.start)


def protocol_targets(
    attack: Attack,
    num_agents: int,
    episode_length: int | jax.Array,
    key: jax.Array,
    g: jax.Array | None,
    d: jax.Array | None,
) -> tuple[Target, jax.Array, jax.Array]:
    """One seed's attacked episodes: every selected pair × every class in ``attack.start``.

    ``episode_length`` is the clean episode's length (steps up to and including its done;
    it may be traced): a battle that ends early must still see its onset, so the search
    horizon and the last uniform start are fractions of the episode actually played.

    g, d [T, N(j), N(i)] from ``influence_geometry`` on the seed's clean episode (None when
    only uniform onsets are asked for). Episode m = p·C + c for pair p and class c.
    Returns (Target [M], start-class index into START_MODES int32 [M], fell_back [M]).
    """
    table = jnp.asarray(
        ordered_pairs(num_agents, "all" if attack.victim == "uniform" else attack.victim)
    )
    k_pair, k_start = jax.random.split(key)
    if attack.victim == "uniform":
        table = table[jax.random.randint(k_pair, (1,), 0, table.shape[0])]
    horizon = search_steps(attack, episode_length)
    last_start = jnp.maximum(0, jnp.asarray(episode_length, jnp.int32) - attack.window)
    starts, classes, fallbacks = [], [], []
    # Python loop over the (few, static) classes only; pairs are vmapped.
    for c, mode in enumerate(attack.start):
        keys = jax.random.split(jax.random.fold_in(k_start, c), table.shape[0])

        def one(pair: jax.Array, k: jax.Array, mode: str = mode) -> tuple[jax.Array, jax.Array]:
            gi = None if g is None else g[:, pair[1], pair[0]]
            di = None if d is None else d[:, pair[1], pair[0]]
            return select_start(gi, di, mode, horizon, k, last_start)

        s, f = jax.vmap(one)(table, keys)
        starts.append(s)
        fallbacks.append(f)
        classes.append(jnp.full(table.shape[0], START_MODES.index(mode), jnp.int32))
    # [C, P] → [P, C] → [M]
    stack = lambda xs: jnp.stack(xs, axis=1).reshape(-1)
    start, cls, fell = stack(starts), stack(classes), stack(fallbacks)
    reps = len(attack.start)
    target = Target(
        victim=jnp.repeat(table[:, 0], reps),
        observed=jnp.repeat(table[:, 1], reps),
        start=start,
        window=jnp.full_like(start, attack.window),
    )
    return target, cls, fell
