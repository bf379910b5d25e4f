"""Attacks and faults on one victim agent, and the paper's choice of when they start.

An ``Attack`` is a small frozen (hashable) config; everything an episode varies — which
agent is the victim i, which agent j's critic is "observed", the start step and the window
length — lives in a ``Target`` of int32 arrays, so one compiled rollout serves every pair
and start under ``vmap``. Inside the rollout, at step t with
active(t) = start ≤ t < start + window (W = window), three pure hooks touch the victim only:

  * ``perceive``        sensor faults: the victim acts greedily on õ_i instead of o_i
                        (everything else — teammates, critics, the env — sees the truth);
  * ``corrupt_params``  parameter corruption: the victim acts with θ̃_i instead of θ_i;
  * ``act``             actuator faults: the policy's decision is right, the executed
                        command is wrong.

Faults that need the past (a frozen reading, a lagged reading or command) carry a small
``Memory`` through the rollout's scan (``remember``); it is written on every step, before
and inside the window, so "k steps earlier" is defined from the episode's start.

Attacks (``Attack.name``; ``features`` restricts every sensor fault to named observation
groups, ``envs.layout``; o^t is the victim's true observation at step t):
  none               nothing (clean episodes).
  worst_action       the paper's attack. Discrete: a_i = argmin_a logits_i(a) over available
                     actions. Continuous: a_i ← clip(a_i − η ∇_{a_i} Q_j(o, a), low, high), one
                     gradient step lowering the observed agent j's critic (η = ``step_size``).
 sensor
  obs_gaussian       õ_i = o_i + σ ξ, ξ ~ N(0, I) fresh each step.
  obs_fgsm           õ_i = o_i + δ, ‖δ‖∞ ≤ ε, one signed-gradient step (PGD with k=1, α=ε).
  obs_pgd            õ_i = o_i + δ from k projected signed-gradient steps of size α.
                     Both minimise the team value the critics assign to the victim's
                     perturbed action (see ``team_value_objective``).
  obs_frozen         õ_i^t = o^{start}: the reading at the onset is held for the window.
  obs_stale          õ_i^t = o^{max(t−k, 0)}: the sensor lags k steps.
  obs_bias           õ_i^t = o^t + b u, u ∈ {±1}^O drawn once per episode, b = ``offset``.
  obs_drift          õ_i^t = o^t + b (t − start + 1)/W · u: the bias grows linearly from b/W
                     to b over the window (a slowly drifting calibration).
  obs_dropout        õ_i^t = o^t with each feature zeroed with probability p (fresh each
                     step; p = 1: every chosen feature reads 0).
 actuator
  action_noise       discrete: a_i = argmax(logits_i + σ ξ) over available actions;
                     continuous: a_i = clip(μ_i + σ ξ, low, high).
  stuck_actuator     the victim's action at the onset step is latched and repeated.
  action_dropout     with probability p (fresh each step) the command is lost and the env's
                     no-op is executed (Simple Spread: no_op / a = 0; SMAX: stop).
  action_delay       the command chosen k steps earlier is executed, d^{t−k}; before the
                     episode's step k the queue is empty (no-op); a delayed command the env
                     no longer allows (SMAX: its target died or left range) becomes the no-op.
  action_saturation  continuous: every channel clipped to low + f (high − low), f = ``fraction``
                     (a weakened actuator that cannot deliver more than f of its range).
                     Discrete analogue (a discrete command has no magnitude to clip): the
                     actuator loses one axis — a move along the axis (x or y, drawn once per
                     episode) executes as the no-op; other commands pass.
  action_second_best the near-miss: the victim executes its rank-2 action by logits among the
                     available ones (discrete only): a small deviation, cheap in log-
                     probability (≈ the logit gap), but still "taken ≠ argmax".
 parameters
  param_noise        θ̃_i = θ_i + σ ξ on every leaf of the victim's actor, drawn once per
                     episode; the other agents' parameters are untouched.
  param_bitflip      each float32 weight of the victim's actor independently, with
                     probability p, has bit ``bit`` flipped (31: the sign; 23–30: the
                     exponent, a ×2^±(2^(b−23)) scale), drawn once per episode.

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

SENSOR_FAULTS = (
    "obs_gaussian",
    "obs_fgsm",
    "obs_pgd",
    "obs_frozen",
    "obs_stale",
    "obs_bias",
    "obs_drift",
    "obs_dropout",
)
ACTUATOR_FAULTS = (
    "action_noise",
    "stuck_actuator",
    "action_dropout",
    "action_delay",
    "action_saturation",
    "action_second_best",
)
PARAM_FAULTS = ("param_noise", "param_bitflip")
ATTACKS = ("none", "worst_action", *SENSOR_FAULTS, *ACTUATOR_FAULTS, *PARAM_FAULTS)
# The fault class of each attack (what a per-class table groups by).
FAULT_CLASS = {
    "none": "none",
    "worst_action": "actuator",
    **{a: "sensor" for a in SENSOR_FAULTS},
    **{a: "actuator" for a in ACTUATOR_FAULTS},
    **{a: "parameters" for a in PARAM_FAULTS},
}
START_MODES = ("high_influence", "low_influence", "uniform")
# Attacks whose hooks differentiate a centralised Q critic (continuous worst_action too).
CRITIC_ATTACKS = ("obs_fgsm", "obs_pgd")
DISCRETE_ONLY = ("action_second_best",)


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
    features        sensor faults only: the observation groups perturbed (names of
                    ``envs.layout(spec)`` groups/subgroups, or "all"); the rest reads true.
    offset          obs_bias / obs_drift: the bias b per feature (observation units).
    p               probability: a feature dropped (obs_dropout), a command lost
                    (action_dropout), a weight's bit flipped (param_bitflip).
    k               lag in steps: obs_stale (reading), action_delay (command).
    fraction        action_saturation (continuous): share f of the action range delivered.
    bit             param_bitflip: the float32 bit flipped (0 = mantissa LSB … 31 = sign).
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
    features: tuple[str, ...] = ("all",)
    offset: float = 0.0
    p: float = 1.0
    k: int = 1
    fraction: float = 0.5
    bit: int = 31

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(
                f"attack.name: unknown attack {self.name!r}; expected one of {ATTACKS}"
            )
        start = (self.start,) if isinstance(self.start, str) else tuple(self.start)
        object.__setattr__(self, "start", start)
        feats = self.features
        feats = (feats,) if isinstance(feats, str) else tuple(feats)
        object.__setattr__(self, "features", feats)
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
            (
                "features",
                len(feats) > 0 and all(isinstance(f, str) and f for f in feats),
                "a feature group name or a list of them (envs.layout), or 'all'",
            ),
            ("offset", _is_num(self.offset) and self.offset >= 0, "a number >= 0"),
            ("p", _is_num(self.p) and 0 <= self.p <= 1, "a probability in [0, 1]"),
            ("k", _is_int(self.k) and self.k >= 1, "an integer >= 1"),
            ("fraction", _is_num(self.fraction) and 0 <= self.fraction <= 1, "a number in [0, 1]"),
            ("bit", _is_int(self.bit) and 0 <= self.bit <= 31, "an integer in [0, 31]"),
        ]
        for field, ok, expected in checks:
            if not ok:
                raise ValueError(
                    f"attack.{field}: expected {expected}, got {getattr(self, field)!r}"
                )
        if len(set(start)) != len(start):
            raise ValueError(f"attack.start: expected distinct modes, got {list(start)}")
        if feats != ("all",) and self.name not in SENSOR_FAULTS:
            raise ValueError(
                f"attack.features: only sensor faults ({', '.join(SENSOR_FAULTS)}) perturb "
                f"feature groups; expected 'all' for {self.name}, got {list(feats)}"
            )

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
        for key in ("start", "features"):
            if key in kw and not isinstance(kw[key], str):
                kw[key] = tuple(kw[key])
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
        if self.name in ("obs_bias", "obs_drift"):
            return float(self.offset)
        if self.name in ("obs_dropout", "action_dropout", "param_bitflip"):
            return float(self.p)
        if self.name in ("obs_stale", "action_delay"):
            return float(self.k)
        if self.name == "action_saturation":
            return float(self.fraction)
        return 0.0

    def needs_critic(self, spec: EnvSpec) -> bool:
        """Whether the hooks differentiate a Q critic (start selection aside)."""
        return self.name in CRITIC_ATTACKS or (self.name == "worst_action" and not spec.discrete)

    def check_env(self, spec: EnvSpec) -> None:
        """What can only be checked against the env: the feature groups exist, and the
        attack is defined for its action type. ValueError naming the field, in one line."""
        if self.name in DISCRETE_ONLY and not spec.discrete:
            raise ValueError(
                f"attack.name: {self.name} ranks discrete actions; {spec.name} has continuous "
                "actions (use action_noise or action_saturation)"
            )
        if self.features != ("all",):
            try:
                feature_mask(self, spec)
            except ValueError as err:
                raise ValueError(f"attack.features: {spec.name}: {err}") from None


def feature_mask(attack: Attack, spec: EnvSpec) -> np.ndarray | None:
    """bool [O] of the features a sensor fault perturbs; None for "all" (no masking, so the
    all-feature faults compute exactly what they did before feature groups existed)."""
    if attack.features == ("all",):
        return None
    from envs import layout

    return layout(spec).mask(attack.features, spec.obs_dim)


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
class Memory(NamedTuple):
    """What a fault carries from step to step of one episode (rollout scan carry).

    latched   the victim's action at the onset (stuck_actuator): int32 [] or float32 [A]
    obs_hist  float32 [R, O]: obs_frozen R = 1 (the onset reading); obs_stale R = k + 1, a
              ring buffer of the victim's true readings (slot t mod (k+1) holds o^t);
              R = 0 for every other fault
    act_hist  int32 [R] | float32 [R, A]: action_delay R = k + 1, a ring buffer of the
              victim's decisions d^t; R = 0 otherwise
    Zero-sized buffers cost nothing, so every attack shares one scan carry.
    """

    latched: jax.Array
    obs_hist: jax.Array
    act_hist: jax.Array


def initial_memory(attack: Attack, spec: EnvSpec) -> Memory:
    """The episode's first ``Memory`` (buffers sized for ``attack``, zero-filled)."""
    rows_obs = {"obs_frozen": 1, "obs_stale": attack.k + 1}.get(attack.name, 0)
    rows_act = attack.k + 1 if attack.name == "action_delay" else 0
    if spec.discrete:
        latched, act_hist = jnp.zeros((), jnp.int32), jnp.zeros((rows_act,), jnp.int32)
    else:
        a = spec.action_dim
        latched, act_hist = jnp.zeros((a,), jnp.float32), jnp.zeros((rows_act, a), jnp.float32)
    return Memory(latched, jnp.zeros((rows_obs, spec.obs_dim), jnp.float32), act_hist)


def _ring_write(hist: jax.Array, x: jax.Array, t: jax.Array, fill: jax.Array) -> jax.Array:
    """Ring buffer of R = k + 1 rows after writing x^t at slot t mod R; at t = 0 every slot
    is first set to ``fill``, so a read of "k steps ago" before step k returns ``fill``."""
    hist = jnp.where(t == 0, jnp.broadcast_to(fill, hist.shape).astype(hist.dtype), hist)
    return hist.at[t % hist.shape[0]].set(x)


def _ring_lagged(hist: jax.Array, t: jax.Array) -> jax.Array:
    """x^{t−k} out of a ring buffer of R = k + 1 rows written up to step t: slot (t+1) mod R."""
    return hist[(t + 1) % hist.shape[0]]


class Step(NamedTuple):
    """What the hooks see at one step (true, unattacked quantities).

    The trailing fields are filled by the rollout (``agents.rollout.attacked_step``); the
    faults that do not need them accept the defaults (hand-made steps in tests)."""

    obs: jax.Array  # [N, O] true observations
    avail: jax.Array  # bool [N, A]
    clean_critic_act: jax.Array  # [N, A] critic input of every agent's clean action
    victim: jax.Array  # int32 []
    observed: jax.Array  # int32 []
    t: jax.Array | None = None  # int32 [] the step
    start: jax.Array | None = None  # int32 [] the onset
    window: jax.Array | None = None  # int32 [] W
    memory: Memory | None = None  # after ``remember_obs`` (perceive) / ``remember_act`` (act)
    episode_key: jax.Array | None = None  # draws fixed for the whole episode


def remember_obs(attack: Attack, memory: Memory, obs_v: jax.Array, t: jax.Array, start) -> Memory:
    """Write the victim's true reading o^t into the fault's memory (before ``perceive``):
    obs_frozen keeps o^{start}; obs_stale appends o^t to its ring (filled with o^0)."""
    if attack.name == "obs_frozen":
        hist = jnp.where(t == start, obs_v[None], memory.obs_hist)
        return memory._replace(obs_hist=hist)
    if attack.name == "obs_stale":
        return memory._replace(obs_hist=_ring_write(memory.obs_hist, obs_v, t, obs_v))
    return memory


def remember_act(
    attack: Attack, spec: EnvSpec, memory: Memory, decision: jax.Array, t: jax.Array
) -> Memory:
    """Write the victim's decision d^t (its greedy action on what it perceived) into the
    memory (before ``act``): action_delay appends it to its ring, filled with the no-op."""
    if attack.name != "action_delay":
        return memory
    return memory._replace(act_hist=_ring_write(memory.act_hist, decision, t, noop(spec)))


def noop(spec: EnvSpec) -> jax.Array:
    """The env's no-op command (``envs.layout``): int32 [] or float32 [A]."""
    from envs import layout

    a = layout(spec).noop_action
    return jnp.asarray(a, jnp.int32) if spec.discrete else jnp.asarray(a, jnp.float32)


def rademacher(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Independent ±1 (float32) draws."""
    return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0).astype(jnp.float32)


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
    """The victim's perceived observation õ_i [O] (its true o_i unless a sensor fault).

    With ``attack.features`` naming groups, only those features read õ; the others read
    the truth (FGSM/PGD then optimise over the chosen features alone: the objective sees
    the true values elsewhere, so their gradient and step are zero there).
    """
    obs_v = step.obs[step.victim]
    mask = feature_mask(attack, team.spec)
    restrict = (lambda o: o) if mask is None else (lambda o: jnp.where(mask, o, obs_v))
    name = attack.name
    if name == "obs_gaussian":
        seen = obs_v + attack.sigma * jax.random.normal(key, obs_v.shape, obs_v.dtype)
    elif name in ("obs_fgsm", "obs_pgd"):
        fgsm = name == "obs_fgsm"
        seen = pgd(
            lambda o: team_value_objective(team, victim_params, critic_params, step, restrict(o)),
            obs_v,
            attack.epsilon,
            steps=1 if fgsm else attack.steps,
            step_size=attack.epsilon if fgsm else attack.step_size,
        )
    elif name == "obs_frozen":
        seen = step.memory.obs_hist[0]
    elif name == "obs_stale":
        seen = _ring_lagged(step.memory.obs_hist, step.t)
    elif name in ("obs_bias", "obs_drift"):
        ramp = 1.0
        if name == "obs_drift":
            ramp = (step.t - step.start + 1).astype(jnp.float32) / jnp.maximum(step.window, 1)
        u = rademacher(jax.random.fold_in(step.episode_key, 0), obs_v.shape)
        seen = obs_v + attack.offset * ramp * u
    elif name == "obs_dropout":
        seen = jnp.where(jax.random.bernoulli(key, attack.p, obs_v.shape), 0.0, obs_v)
    else:
        return obs_v
    return restrict(seen)


def corrupt_params(
    attack: Attack, key: jax.Array, actor_params: Params, victim: jax.Array
) -> Params:
    """Stacked actor params with only the victim's slice corrupted (param_noise: θ_i + σξ;
    param_bitflip: bit ``bit`` of each float32 weight flipped with probability p)."""
    if attack.name not in PARAM_FAULTS:
        return actor_params
    leaves, treedef = jax.tree_util.tree_flatten(actor_params)
    keys = jax.random.split(key, len(leaves))

    def corrupt(p: jax.Array, k: jax.Array) -> jax.Array:
        if attack.name == "param_bitflip":
            flip = jax.random.bernoulli(k, attack.p, p.shape[1:])
            bits = jax.lax.bitcast_convert_type(p[victim].astype(jnp.float32), jnp.uint32)
            flipped = bits ^ jnp.where(flip, jnp.uint32(1 << attack.bit), jnp.uint32(0))
            new = jax.lax.bitcast_convert_type(flipped, jnp.float32).astype(p.dtype)
            return p.at[victim].set(new)
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
    spec = team.spec
    avail_v = step.avail[step.victim]
    if attack.name == "worst_action":
        return worst_action(team, out_v, step, critic_params, attack.step_size)
    if attack.name == "action_noise":
        noisy = out_v + attack.sigma * jax.random.normal(key, out_v.shape, out_v.dtype)
        return team.greedy(noisy, avail_v) if spec.discrete else team.clip(noisy)
    if attack.name == "stuck_actuator":
        return latched
    decision = team.greedy(out_v, avail_v)
    if attack.name == "action_dropout":
        return jnp.where(jax.random.bernoulli(key, attack.p), noop(spec), decision)
    if attack.name == "action_delay":
        past = _ring_lagged(step.memory.act_hist, step.t)
        return jnp.where(avail_v[past], past, noop(spec)) if spec.discrete else past
    if attack.name == "action_saturation":
        if not spec.discrete:
            low, high = spec.action_low, spec.action_high
            return jnp.clip(out_v, low, low + attack.fraction * (high - low))
        from envs import layout

        axis = jax.random.randint(jax.random.fold_in(step.episode_key, 1), (), 1, 3)
        lost = jnp.asarray(layout(spec).move_axis)[decision] == axis
        return jnp.where(lost, noop(spec), decision)
    if attack.name == "action_second_best":
        return second_best(out_v, avail_v)
    return decision


def second_best(out_v: jax.Array, avail_v: jax.Array) -> jax.Array:
    """The rank-2 action by logits among the available ones (the best when only one is)."""
    values, index = jax.lax.top_k(jnp.where(avail_v, out_v, -jnp.inf), 2)
    return jnp.where(jnp.isfinite(values[1]), index[1], index[0]).astype(jnp.int32)


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
