"""Stage 1 — per-agent onset from a Taylor-remainder probe of the action-commitment cost.

For agent i at step t with observation o = o_i^t, the action-commitment cost holds the target
fixed at the agent's own choice at the unperturbed o:

  discrete     J_i(o', τ) = −Σ_a τ(a) log π_i(a | o'),  τ = onehot(argmax_a logits_i(o))
               (unavailable actions are removed from the softmax when an avail mask is given)
  continuous   J_i(o', τ) = ½ ‖μ_i(o') − τ‖² / σ²,       τ = μ_i(o)

and the Taylor remainder of a probe η is

  L_i^t(η) = J_i(o + η, τ) − J_i(o, τ) − ∇_o J_i(o, τ)ᵀ η   ≈ ½ ηᵀ ∇²_o J_i η   (‖η‖ → 0).

Target (``Stage1Config.target``): ``"greedy"`` is the method's τ above (the paper's code);
``"taken"`` holds τ at the action the log says the agent took — the cost of the committed
action. The two agree wherever the agent acted greedily on o, so clean episodes score alike,
while an agent whose action disagrees with its own policy at o (a worst-action attack, a stuck
actuator, corrupted weights, an observation attack when o is the true observation) pays
−log π(a_taken | o) at once.

Probes (``Stage1Config.probe``):

* ``"cost"`` — no probe: the statistic is J_i(o, τ) itself, the order-0 term of the expansion
  (with ``target="taken"``: the log-likelihood surprise of the logged action).

* ``"paper"`` — the paper's code: g = ∇_o log π_i(a* | o) (= −∇_o J), a* the greedy action,
  η = ε · sign(g) / max(‖g‖₂, 1e-6), ε = 0.01; raw statistic |L(η)| (not divided by ε², so it
  is comparable with the paper's numbers). Note ‖η‖ = ε·√(#nonzero g)/‖g‖, not ε. The paper's
  code re-takes the argmax at o + η: |log π(a'|o+η) − log π(a*|o) − gᵀη| with a' the argmax
  at o + η (``retake_argmax``, discrete only, ``forensics=paper``); by default τ is held fixed
  as the method defines (they differ only when the probe flips the greedy action).
* ``"curvature"`` — mean over a fixed probe set of |L(η)| / ε²: the gradient direction
  ε·g/‖g‖ (``gradient_probe``) and/or ``num_random`` directions of norm ε, drawn once from
  ``key`` and shared by every (episode, step, agent) so that the score is a deterministic
  function of (o, θ_i) — clean and attacked episodes are scored by the same instrument.
  Precision: in float32, J(o+η) − J(o) − gᵀη loses about 1e-7·|logits| to rounding, which is
  ~10 % of |L| for a random direction at ε = 0.01 (measured against float64 on a random
  64-64 actor; 0.03 % at ε = 0.1). Use ε ≳ 0.05, float64, or ``exact_quadratic`` — the ε → 0
  limit ½|vᵀ∇²J v| by forward-over-forward differentiation, free of cancellation (for a ReLU
  actor it sees the softmax curvature only, not the kinks a finite probe can straddle). The
  paper probe is not affected in the same test (0.006 % median): its ‖η‖ = ε√O/‖g‖ ≫ ε
  unless the policy is very uncertain.

For a continuous deterministic actor ∇_o J vanishes identically at τ = μ(o), so every
"gradient" direction above is replaced by the top right-singular vector of the actor Jacobian
∂μ/∂o (``power_iters`` steps of power iteration on (∂μ/∂o)ᵀ(∂μ/∂o) via jvp/vjp): the direction
in which J grows fastest at second order.

The per-step score is smoothed by a causal rolling mean over ``window`` steps (the paper's
deque of length 5: the first steps average what is available). Onsets are threshold crossings
of a *normalised* statistic z (see forensics.calibration), optionally debounced.

Shapes: E episodes, T steps, N agents, O observation size, A action size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from agents.networks import mask_logits

ActorApply = Callable[[Any, jax.Array], jax.Array]

NO_DETECTION = -1  # onset / agent index meaning "nothing was flagged"
_GRAD_FLOOR = 1e-6  # the paper's max(‖g‖, 1e-6)


@dataclass(frozen=True)
class Stage1Config:
    """Static Stage-1 settings (hashable: a jit static argument)."""

    discrete: bool = True
    probe: str = "paper"  # "paper" | "curvature" | "cost" (J(o, τ) itself, no probe)
    eps: float = 0.01
    gradient_probe: bool = True  # curvature probe: include ε·g/‖g‖
    num_random: int = 0  # curvature probe: random directions of norm ε
    window: int = 5  # causal rolling-mean length
    sigma: float = 1.0  # continuous cost scale σ
    power_iters: int = 8  # continuous: power-iteration steps for the worst direction
    exact_quadratic: bool = False  # curvature probe: ½|vᵀ∇²J v| instead of |L(εv)|/ε²
    target: str = "greedy"  # τ: "greedy" (the paper: argmax at o) | "taken" (the logged action)
    retake_argmax: bool = False  # paper probe: J(o+η) at the argmax of o+η (the paper's code)

    def __post_init__(self) -> None:
        if self.probe not in ("paper", "curvature", "cost"):
            raise ValueError(
                "forensics.stage1.probe: expected 'paper', 'curvature' or 'cost', "
                f"got {self.probe!r}"
            )
        if self.target not in ("greedy", "taken"):
            raise ValueError(
                f"forensics.stage1.target: expected 'greedy' or 'taken', got {self.target!r}"
            )
        if self.probe == "curvature" and not self.gradient_probe and self.num_random < 1:
            raise ValueError(
                "forensics.stage1: the curvature probe needs gradient_probe=true or num_random >= 1"
            )
        if not self.eps > 0:
            raise ValueError(f"forensics.stage1.eps: expected > 0, got {self.eps}")
        if self.window < 1:
            raise ValueError(f"forensics.stage1.window: expected >= 1, got {self.window}")
        if self.num_random < 0:
            raise ValueError(f"forensics.stage1.num_random: expected >= 0, got {self.num_random}")
        if not self.sigma > 0:
            raise ValueError(f"forensics.stage1.sigma: expected > 0, got {self.sigma}")


class Stage1Scores(NamedTuple):
    raw: jax.Array  # [E, T, N] per-step statistic (|L| or mean |L|/ε²)
    smooth: jax.Array  # [E, T, N] causal rolling mean of ``raw``


class Onsets(NamedTuple):
    onset: jax.Array  # [E, N] int32: first step of the first qualifying run, or -1
    t_det: jax.Array  # [E, N] int32: step the flag is confirmed (onset + debounce − 1), or -1
    z_at_det: jax.Array  # [E, N] z at t_det (0 where nothing was flagged)


# --------------------------------------------------------------------------- the cost


def commitment_target(
    actor_apply: ActorApply, params: Any, obs: jax.Array, avail: jax.Array, discrete: bool
) -> jax.Array:
    """τ = onehot(argmax over available actions of logits(o)) or μ(o); no gradient flows."""
    out = actor_apply(params, obs)
    if discrete:
        out = jax.nn.one_hot(jnp.argmax(jnp.where(avail, out, -jnp.inf)), out.shape[-1])
    return jax.lax.stop_gradient(out)


def commitment_cost(
    actor_apply: ActorApply,
    params: Any,
    obs: jax.Array,
    target: jax.Array,
    avail: jax.Array,
    discrete: bool,
    sigma: float = 1.0,
) -> jax.Array:
    """J(o, τ): −Σ τ log softmax(masked logits(o)) (discrete) or ½‖μ(o) − τ‖²/σ² (continuous)."""
    out = actor_apply(params, obs)
    if discrete:
        logp = jax.nn.log_softmax(mask_logits(out, avail))
        return -jnp.sum(target * logp)
    return 0.5 * jnp.sum((out - target) ** 2) / sigma**2


def taylor_remainders(
    cost: Callable[[jax.Array], jax.Array], obs: jax.Array, etas: jax.Array
) -> jax.Array:
    """L(η) = J(o+η) − J(o) − ∇J(o)ᵀη for each probe row of ``etas`` [P, O] → [P]."""
    j0, grad = jax.value_and_grad(cost)(obs)
    return jax.vmap(cost)(obs + etas) - j0 - etas @ grad


def _top_singular_direction(
    f: Callable[[jax.Array], jax.Array], obs: jax.Array, iters: int
) -> jax.Array:
    """Unit v maximising ‖(∂f/∂o) v‖, by power iteration on JᵀJ (jvp then vjp, no Jacobian)."""
    _, jvp = jax.linearize(f, obs)
    vjp = jax.linear_transpose(jvp, obs)
    v0 = jnp.ones_like(obs) / jnp.sqrt(obs.size)

    def step(v, _):
        w = vjp(jvp(v))[0]
        return w / jnp.maximum(jnp.linalg.norm(w), _GRAD_FLOOR), None

    return jax.lax.scan(step, v0, None, length=iters)[0]


# --------------------------------------------------------------------------- the score


def quadratic_forms(
    cost: Callable[[jax.Array], jax.Array], obs: jax.Array, dirs: jax.Array
) -> jax.Array:
    """½ vᵀ∇²J(o) v for each row v of ``dirs`` [P, O] → [P] (forward-over-forward, exact)."""
    d2 = lambda v: jax.jvp(lambda x: jax.jvp(cost, (x,), (v,))[1], (obs,), (v,))[1]
    return 0.5 * jax.vmap(d2)(dirs)


def _agent_step_score(
    actor_apply: ActorApply,
    cfg: Stage1Config,
    random_dirs: jax.Array,
    params: Any,
    obs: jax.Array,
    avail: jax.Array,
    action: jax.Array,
) -> jax.Array:
    """Stage-1 statistic of one agent at one step (o [O], avail [A], the logged action: an
    index or an [A] vector, read only when ``cfg.target == "taken"``) → scalar."""
    if cfg.target == "taken":
        tau = jax.nn.one_hot(action, avail.shape[-1]) if cfg.discrete else action
    else:
        tau = commitment_target(actor_apply, params, obs, avail, cfg.discrete)
    cost = lambda o: commitment_cost(actor_apply, params, o, tau, avail, cfg.discrete, cfg.sigma)
    if cfg.probe == "cost":  # the expansion's order-0 term: J(o, τ) itself
        return cost(obs)
    if cfg.discrete:
        j0, grad_j = jax.value_and_grad(cost)(obs)
        g = -grad_j  # ∇_o log π(a*|o)
    else:
        g = _top_singular_direction(partial(actor_apply, params), obs, cfg.power_iters)
    g_norm = jnp.maximum(jnp.linalg.norm(g), _GRAD_FLOOR)

    if cfg.probe == "paper":
        eta = cfg.eps * jnp.sign(g) / g_norm
        if cfg.retake_argmax and cfg.discrete:  # J(o+η, τ') with τ' = the argmax at o + η:
            # −max of the log-softmax over legal actions (one forward pass at o + η)
            logp = jax.nn.log_softmax(mask_logits(actor_apply(params, obs + eta), avail))
            j_eta = -jnp.max(jnp.where(avail, logp, -jnp.inf))
            return jnp.abs(j_eta - j0 + jnp.dot(g, eta))  # ∇_o J = −g
        return jnp.abs(taylor_remainders(cost, obs, eta[None]))[0]

    dirs = [(g / g_norm)[None]] if cfg.gradient_probe else []
    dirs = jnp.concatenate(dirs + [random_dirs], axis=0)
    if cfg.exact_quadratic:  # the ε → 0 limit of |L(εv)|/ε²
        return jnp.mean(jnp.abs(quadratic_forms(cost, obs, dirs)))
    return jnp.mean(jnp.abs(taylor_remainders(cost, obs, cfg.eps * dirs))) / cfg.eps**2


def rolling_mean(x: jax.Array, window: int, axis: int = 1) -> jax.Array:
    """Causal mean of the last ``window`` values along ``axis`` (fewer at the start)."""
    x = jnp.moveaxis(x, axis, 0)
    csum = jnp.cumsum(x, axis=0)
    lagged = jnp.concatenate([jnp.zeros((window,) + x.shape[1:], x.dtype), csum[:-window]])
    count = jnp.minimum(jnp.arange(1, x.shape[0] + 1), window).astype(x.dtype)
    out = (csum - lagged[: x.shape[0]]) / count.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.moveaxis(out, 0, axis)


def random_probe_directions(key: jax.Array | None, num: int, obs_dim: int) -> jax.Array:
    """``num`` unit directions in R^O (shape [num, O]); empty when num == 0."""
    if num == 0:
        return jnp.zeros((0, obs_dim))
    if key is None:
        raise ValueError("forensics.stage1.num_random > 0 needs a PRNG key")
    d = jax.random.normal(key, (num, obs_dim))
    return d / jnp.linalg.norm(d, axis=-1, keepdims=True)


@partial(jax.jit, static_argnames=("actor_apply", "cfg"))
def stage1_scores(
    actor_apply: ActorApply,
    actor_params: Any,
    obs: jax.Array,
    avail: jax.Array | None = None,
    key: jax.Array | None = None,
    actions: jax.Array | None = None,
    *,
    cfg: Stage1Config,
) -> Stage1Scores:
    """Stage-1 statistic for every (episode, step, agent) in one jitted call.

    actor_params: stacked (leaf axis 0 = agent); obs [E, T, N, O]; avail [E, T, N, A] bool or
    None (all legal); key: PRNG key for the random probes (needed iff cfg.num_random > 0);
    actions [E, T, N] (discrete) or [E, T, N, A]: the logged actions, needed iff
    cfg.target == "taken" (τ = the action the agent actually committed to).
    Returns raw [E, T, N] and its causal rolling mean over cfg.window steps.
    """
    if obs.ndim != 4:
        raise ValueError(f"stage1_scores obs: expected [E, T, N, O], got shape {obs.shape}")
    if avail is None:
        n_act = jax.eval_shape(
            actor_apply, jax.tree.map(lambda p: p[0], actor_params), obs[0, 0, 0]
        ).shape[-1]
        avail = jnp.ones(obs.shape[:3] + (n_act,), bool)
    if actions is None:
        if cfg.target == "taken":
            raise ValueError("forensics.stage1.target=taken needs the logged actions")
        actions = jnp.zeros(obs.shape[:3], jnp.int32)
    dirs = random_probe_directions(
        key, cfg.num_random if cfg.probe == "curvature" else 0, obs.shape[-1]
    )
    score = partial(_agent_step_score, actor_apply, cfg, dirs)
    per_agents = jax.vmap(score, in_axes=(0, 0, 0, 0))  # agents: own params, obs, avail, act
    per_steps = jax.vmap(per_agents, in_axes=(None, 0, 0, 0))
    per_episodes = jax.vmap(per_steps, in_axes=(None, 0, 0, 0))
    raw = per_episodes(actor_params, obs, avail, actions)
    return Stage1Scores(raw=raw, smooth=rolling_mean(raw, cfg.window, axis=1))


# --------------------------------------------------------------------------- onsets


def run_end_flags(flags: jax.Array, debounce: int, axis: int = 1) -> jax.Array:
    """True at t iff ``flags`` holds at all of t−debounce+1 … t (steps before 0 count False)."""
    if debounce < 1:
        raise ValueError(f"forensics.debounce: expected >= 1, got {debounce}")
    f = jnp.moveaxis(flags, axis, 0).astype(jnp.int32)
    csum = jnp.cumsum(f, axis=0)
    lagged = jnp.concatenate([jnp.zeros((debounce,) + f.shape[1:], jnp.int32), csum[:-debounce]])
    out = (csum - lagged[: f.shape[0]]) == debounce
    return jnp.moveaxis(out, 0, axis)


def gather_steps(x: jax.Array, t: jax.Array) -> jax.Array:
    """x[e, t[e, n], n] for x [E, T, N] and t [E, N] (t < 0 gives 0)."""
    got = jnp.take_along_axis(x, jnp.maximum(t, 0)[:, None, :], axis=1)[:, 0]
    return jnp.where(t >= 0, got, 0.0)


@partial(jax.jit, static_argnames=("debounce",))
def detect_onsets(
    z: jax.Array,
    threshold: jax.Array,
    valid: jax.Array | None = None,
    *,
    debounce: int = 1,
) -> Onsets:
    """First confirmed crossing z > threshold per (episode, agent).

    z [E, T, N] normalised statistic; threshold scalar or [N]; valid [E, T] bool (steps after an
    episode ended, or without calibration data, never flag) or None. A flag is confirmed at the
    first t where z > threshold on ``debounce`` consecutive steps; onset = t − debounce + 1.
    Agents never flagged get onset = t_det = -1 and z_at_det = 0.
    """
    above = z > threshold
    if valid is not None:
        above = above & valid[..., None]
    confirmed = run_end_flags(above, debounce, axis=1)  # [E, T, N]
    hit = jnp.any(confirmed, axis=1)
    t_det = jnp.where(hit, jnp.argmax(confirmed, axis=1), NO_DETECTION).astype(jnp.int32)
    onset = jnp.where(hit, t_det - (debounce - 1), NO_DETECTION).astype(jnp.int32)
    return Onsets(onset=onset, t_det=t_det, z_at_det=gather_steps(z, t_det))


@jax.jit
def patient_zero_candidate(t_det: jax.Array, tiebreak: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Earliest-flagged agent per episode; ties go to the largest ``tiebreak``.

    t_det [E, N] (−1 = never flagged), tiebreak [E, N] (the paper: |x − μ| at the flag; ours:
    the normalised exceedance z). Returns (agent [E], t_det [E]), both −1 when nobody flagged.
    """
    flagged = t_det >= 0
    big = jnp.iinfo(jnp.int32).max
    first = jnp.min(jnp.where(flagged, t_det, big), axis=1)
    at_first = flagged & (t_det == first[:, None])
    agent = jnp.argmax(jnp.where(at_first, tiebreak, -jnp.inf), axis=1).astype(jnp.int32)
    any_flag = jnp.any(flagged, axis=1)
    return (
        jnp.where(any_flag, agent, NO_DETECTION),
        jnp.where(any_flag, first, NO_DETECTION).astype(jnp.int32),
    )
