"""``forensics diagnose`` as a library: an episode store and the checkpoint that produced it →
per-episode verdicts, per-step scores and one contagion graph per episode.

Pipeline (shapes: E episodes, T steps, N agents; B = ``batch_episodes``):

1. **Measure** every episode of a batch in one jitted call (``measure``): the Stage-1 statistic
   x_{e,t,i} (raw and its causal rolling mean), the critic geometry G, D, S, X [B, T, N(j), N(i)]
   (``stage2.critic_geometry``), each critic's value Q_j(o^t, a^t), and two baseline statistics:
   the reward drop −r_i^t and the action deviation ‖a_i^t − a_i^{t−1}‖ (critic encoding).
   Batches have a fixed size (the last one is padded), so each function compiles once.
2. **Calibrate** on the clean episodes of a *separate* calibration store only — never on the
   episodes being scored (``check_disjoint`` refuses any shared seed): the paper's band
   (μ_{t,i}, σ_{t,i}, K) and ours (a per-episode false-alarm budget α), the same budget for each
   baseline statistic, and the deployable rule's edge thresholds (below).
3. **Decide** per calibration (``decide``): onsets, the Patient-0 candidate (earliest
   confirmed flag; ties to the largest exceedance — |x − μ| for the paper, z for ours), the
   evidence of every edge over the causal window [t_det − w + 1, t_det], the paper's traceback
   (``stage2.traceback``), the deployable traceback, contagion weights C_ij(T−1), instability
   occupancy, and the set of agents the graph calls infected.

Deployable rule (Stage 2 overrules Stage 1 without ground truth). The evidence that agent i
pushed agent j is the Q-drop it caused to first order,

  A_ji^t = max(0, −⟨∇_{a_i} Q_j(o^t, a^t), a_i^t − a_i^{t−1}⟩) = max(0, −S_ji^t),

aggregated (``evidence``: max or mean) over the last ``evidence_window`` steps: e_ji. Its null
distribution is that of the same statistic at every step of every clean calibration episode;
the edge threshold θ_ji is its (1 − ``edge_alpha``/(N(N−1))) quantile — Bonferroni over the
directed edges, so that a clean episode is overruled with probability at most ``edge_alpha``.
The deployable traceback runs the paper's
traceback with the critical rate replaced by the calibrated excess r_ji = e_ji/θ_ji where
e_ji > θ_ji (else 0): from the candidate c it moves to the u ≠ c with the largest excess (ties
by mean G, then G at t_det) only while that excess is > 0 — i.e. only when u depressed c's
critic more than a clean window does with probability 1 − edge_alpha — and stops at a cycle.
The head of the chain is the deployable Patient-0. Nothing in this path reads ground truth: the
scored store is read through ``SCORED_FIELDS`` alone, which holds no ground-truth column.

Graph infected set: the deployable Patient-0 plus every agent Stage 1 flags at or after the
candidate's detection step.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from agents.precision import float32_matmuls
from agents.sharding import batch_mesh, replicated, shard_batch
from configs.schema import SEED, ConfigError
from envs import MASKED_ENVS
from forensics.calibration import (
    Calibration,
    budget_calibration,
    paper_calibration,
    standardise,
)
from forensics.logonly.pipeline import add_verdicts
from forensics.stage1 import (
    Onsets,
    Stage1Config,
    detect_onsets,
    gather_steps,
    patient_zero_candidate,
    rolling_mean,
    stage1_scores,
)
from forensics.stage2 import (
    CriticGeometry,
    EdgeEvidence,
    Traceback,
    contagion_weights,
    critic_geometry,
    edge_evidence,
    instability_occupancy,
    step_deviation,
    traceback,
)
from forensics.store import (
    EpisodeStore,
    StoreError,
    checkpoint_identity,
    current_code_version,
    load_clean,
    open_store,
    pad_batch,
    split_batches,
    write_table,
)

# What diagnose reads from the store being scored: no ground truth (clean, attack, victim,
# observed, start, window, magnitude, influence, clean_actions) ever enters the verdicts.
# ``obs_perceived`` is what each agent acted on; ``forensics.observations=obs_true`` reads the
# environment's own observation instead, which only a log kept apart from the agent's sensors
# (e.g. a simulator's state) has under an observation attack.
SCORED_FIELDS = ("episode_id", "seed", "valid", "obs_perceived", "actions", "rewards")
GROUND_TRUTH_FIELDS = (
    "clean",
    "attack",
    "victim",
    "observed",
    "start",
    "window",
    "magnitude",
    "influence",
    "clean_actions",
)
CALIBRATIONS = ("paper", "budget")  # Stage-1 calibrations, each with its own verdicts
BASELINES = ("reward", "actdev")  # reward-drop detector, action-deviation z-score
PAPER_K = {"maddpg": 2.0, "hatrpo": 3.0}  # the paper's K per algorithm
EDGE_FLOOR = 1e-6  # an edge threshold of 0 (never any drop on clean data) still needs a drop
LOG_FLOOR = 1e-30  # log of a zero score

VERDICTS_FILE, SCORES_FILE, SUMMARY_FILE, GRAPHS_DIR = (
    "verdicts.parquet",
    "scores.npz",
    "summary.json",
    "graphs",
)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DiagnoseConfig:
    """The ``forensics`` config section, parsed and checked (see configs/forensics/default.yaml)."""

    stage1: Stage1Config
    observations: str = "obs_perceived"
    probe_seed: int = 0
    paper_k: float | None = None
    alpha: float = 0.05
    method: str = "joint"
    fit_fraction: float = 0.5
    debounce: int = 1
    watch_quantile: float = 0.9
    two_sided: bool = False
    log_scores: bool = True
    window: int = 5
    decay: float = 0.3
    edge_alpha: float = 0.05
    evidence_window: int = 10
    evidence: str = "max"
    batch_episodes: int = 256
    graphs: bool = True

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> DiagnoseConfig:
        """Parse the ``forensics`` section; errors are one line naming ``forensics.<field>``."""
        sections = {
            "stage1": {f.name for f in dataclasses.fields(Stage1Config)} - {"discrete"},
            "calibration": {
                "paper_k",
                "alpha",
                "method",
                "fit_fraction",
                "debounce",
                "watch_quantile",
                "two_sided",
                "log_scores",
            },
            "stage2": {"window", "decay", "edge_alpha", "evidence_window", "evidence"},
        }
        top = {"observations", "probe_seed", "batch_episodes", "graphs"}
        for key in sorted(set(cfg) - set(sections) - top):
            raise ConfigError(
                f"forensics.{key}: unknown key; expected only "
                f"{', '.join([*sections, *sorted(top)])}"
            )
        flat: dict[str, Any] = {k: cfg[k] for k in top if k in cfg}
        for name, keys in sections.items():
            section = cfg.get(name, {}) or {}
            for key in sorted(set(section) - keys):
                raise ConfigError(
                    f"forensics.{name}.{key}: unknown key; expected only {', '.join(sorted(keys))}"
                )
            if name != "stage1":
                flat.update(section)
        try:
            stage1 = Stage1Config(**dict(cfg.get("stage1", {}) or {}))
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None
        out = cls(stage1=stage1, **flat)
        out.check()
        return out

    def check(self) -> None:
        """Raise ``ConfigError`` naming the first bad value."""
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
        is_num = lambda v: isinstance(v, int | float) and not isinstance(v, bool)
        rules = [
            (
                "observations",
                self.observations in ("obs_perceived", "obs_true"),
                "obs_perceived or obs_true",
            ),
            ("probe_seed", SEED.ok(self.probe_seed), SEED.expected),  # the one seed rule
            (
                "calibration.paper_k",
                self.paper_k is None or (is_num(self.paper_k) and self.paper_k > 0),
                "null or a number > 0",
            ),
            ("calibration.alpha", is_num(self.alpha) and 0 < self.alpha < 1, "a number in (0, 1)"),
            ("calibration.method", self.method in ("joint", "bonferroni"), "joint or bonferroni"),
            (
                "calibration.fit_fraction",
                is_num(self.fit_fraction) and 0 < self.fit_fraction < 1,
                "a number in (0, 1)",
            ),
            (
                "calibration.debounce",
                is_int(self.debounce) and self.debounce >= 1,
                "an integer >= 1",
            ),
            (
                "calibration.watch_quantile",
                is_num(self.watch_quantile) and 0 < self.watch_quantile < 1,
                "a number in (0, 1)",
            ),
            ("calibration.two_sided", isinstance(self.two_sided, bool), "true or false"),
            ("calibration.log_scores", isinstance(self.log_scores, bool), "true or false"),
            ("stage2.window", is_int(self.window) and self.window >= 1, "an integer >= 1"),
            ("stage2.decay", is_num(self.decay) and self.decay >= 0, "a number >= 0"),
            (
                "stage2.edge_alpha",
                is_num(self.edge_alpha) and 0 < self.edge_alpha < 1,
                "a number in (0, 1)",
            ),
            (
                "stage2.evidence_window",
                is_int(self.evidence_window) and self.evidence_window >= 1,
                "an integer >= 1",
            ),
            ("stage2.evidence", self.evidence in ("max", "mean"), "max or mean"),
            (
                "batch_episodes",
                is_int(self.batch_episodes) and self.batch_episodes >= 1,
                "an integer >= 1",
            ),
            ("graphs", isinstance(self.graphs, bool), "true or false"),
        ]
        for field, ok, expected in rules:
            if not ok:
                value = getattr(self, field.rsplit(".", 1)[-1])
                raise ConfigError(f"forensics.{field}: expected {expected}, got {value!r}")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Instruments:
    """Static (hashable) description of what is differentiated: a jit static argument.

    ``actor_apply(params_i, obs_i) -> logits | action``; ``critic_apply(params_j, obs [N, O],
    act [N, A]) -> Q_j`` with discrete actions one-hot (``agents.networks``).
    """

    actor_apply: Callable[[Any, jax.Array], jax.Array]
    critic_apply: Callable[[Any, jax.Array, jax.Array], jax.Array]
    discrete: bool
    action_dim: int
    stage1: Stage1Config


class Model(NamedTuple):
    instruments: Instruments
    params: dict[str, Any]  # {"actor": stacked, "critic": stacked}
    paper_k: float


def model_from_policy(policy: Any, stage1: Stage1Config) -> Model:
    """The networks of a loaded ``agents.checkpoint.Policy``: actors + action-value critics
    (MADDPG's own; HATRPO's probe critics), ``agents.forensic_networks``."""
    from agents.forensic_networks import forensic_networks

    spec = policy.env.spec
    nets = forensic_networks(policy)
    s1 = dataclasses.replace(stage1, discrete=spec.discrete)
    inst = Instruments(nets.actor_apply, nets.critic_apply, spec.discrete, spec.action_dim, s1)
    params = {"actor": nets.actor_params, "critic": nets.critic_params}
    return Model(inst, params, PAPER_K[policy.config["algo"]["name"]])


# --------------------------------------------------------------------------- measure


class Measures(NamedTuple):
    raw: jax.Array  # [B, T, N] Stage-1 statistic
    smooth: jax.Array  # [B, T, N] its causal rolling mean
    q: jax.Array  # [B, T, N] Q_j(o^t, a^t) of each agent's own critic
    reward_drop: jax.Array  # [B, T, N] causal rolling mean of −r_i^t
    action_dev: jax.Array  # [B, T, N] causal rolling mean of ‖a_i^t − a_i^{t−1}‖
    geom: CriticGeometry  # [B, T, N(j), N(i)] each
    evidence: jax.Array  # [B, T, N(j), N(i)] e_ji of the window ending at t (module doc)
    finite: jax.Array  # [B] every measured value finite at the valid steps


def critic_input(inst: Instruments, actions: jax.Array) -> jax.Array:
    """Stored env actions → the critic's action input [..., N, A] (one-hot when discrete)."""
    if inst.discrete:
        return jax.nn.one_hot(actions, inst.action_dim, dtype=jnp.float32)
    return actions


def rolling_max(x: jax.Array, window: int, axis: int = 1) -> jax.Array:
    """Causal max of the last ``window`` values along ``axis`` (fewer at the start)."""
    x = jnp.moveaxis(x, axis, 0)
    pad = jnp.full((window - 1,) + x.shape[1:], -jnp.inf, x.dtype)
    xp = jnp.concatenate([pad, x])
    t = x.shape[0]
    out = jnp.max(jnp.stack([xp[k : k + t] for k in range(window)]), axis=0)  # static offsets
    return jnp.moveaxis(out, 0, axis)


@float32_matmuls  # agents/precision.py: TF32 would swamp the Taylor remainder and curvature
@partial(jax.jit, static_argnames=("inst", "evidence_window", "evidence"))
def measure(
    inst: Instruments,
    params: Mapping[str, Any],
    obs: jax.Array,
    actions: jax.Array,
    rewards: jax.Array,
    valid: jax.Array,
    key: jax.Array,
    avail: jax.Array | None = None,
    *,
    evidence_window: int,
    evidence: str,
) -> Measures:
    """Everything diagnose differentiates, for a batch: obs [B, T, N, O], actions [B, T, N(, A)],
    rewards [B, T, N], valid [B, T] bool, key (random Stage-1 probes), avail [B, T, N, A] the
    recorded legal actions (None: every action legal; π is the policy over legal actions).
    The baselines are smoothed by the same rolling mean as the Stage-1 score; the edge
    evidence is the ``evidence`` (max | mean) of A over the ``evidence_window`` steps ending
    at each t."""
    act = critic_input(inst, actions)
    s1 = stage1_scores(inst.actor_apply, params["actor"], obs, avail, key, actions, cfg=inst.stage1)
    geom = critic_geometry(inst.critic_apply, params["critic"], obs, act, wrt="act")
    q_all = jax.vmap(inst.critic_apply, in_axes=(0, None, None))  # every critic j at one step
    q = jax.vmap(jax.vmap(q_all, in_axes=(None, 0, 0)), in_axes=(None, 0, 0))(
        params["critic"], obs, act
    )
    v = valid[..., None]
    attribution = jnp.maximum(-geom.S, 0.0) * v[..., None]  # A_ji^t
    aggregate = rolling_max if evidence == "max" else rolling_mean
    finite = jnp.ones(obs.shape[0], bool)
    for x in (s1.raw, q, rewards, *geom):  # a static handful of arrays, not a loop over data
        bad = ~jnp.isfinite(x) & v.reshape(v.shape + (1,) * (x.ndim - 3))
        finite &= ~jnp.any(bad.reshape(bad.shape[0], -1), axis=1)
    smooth = partial(rolling_mean, window=inst.stage1.window, axis=1)
    return Measures(
        raw=s1.raw,
        smooth=s1.smooth,
        q=q,
        reward_drop=smooth(-rewards),
        action_dev=smooth(jnp.linalg.norm(step_deviation(act), axis=-1)),
        geom=geom,
        evidence=aggregate(attribution, evidence_window, axis=1),
        finite=finite,
    )


def budget_statistic(smooth: jax.Array, log_scores: bool) -> jax.Array:
    """What our calibration thresholds: log x (the Stage-1 score is heavy-tailed over orders
    of magnitude on clean episodes, so μ ± cσ of raw x is dominated by a few outliers) or x."""
    return jnp.log(jnp.maximum(smooth, LOG_FLOOR)) if log_scores else smooth


# --------------------------------------------------------------------------- calibrate


class Calibrations(NamedTuple):
    """Everything fitted on clean episodes."""

    paper: Calibration
    budget: Calibration
    reward: Calibration
    actdev: Calibration
    edge_threshold: jax.Array  # [N(j), N(i)] θ_ji of the deployable rule


def fit_calibrations(
    cfg: DiagnoseConfig,
    paper_k: float,
    smooth: jax.Array,
    reward_drop: jax.Array,
    action_dev: jax.Array,
    evidence: jax.Array,
    valid: jax.Array,
) -> Calibrations:
    """Fit both Stage-1 calibrations, the baselines' and the edge thresholds on clean episodes.

    smooth, reward_drop, action_dev [E_c, T, N] (``Measures``); evidence [E_c, T, N, N], the
    window evidence ending at every step; valid [E_c, T]. The paper's band is fitted on the
    raw smoothed score as its code does; ours on ``budget_statistic``. Baselines use our
    budget calibration, one-sided (only a drop / a larger deviation is suspicious).
    """
    budget = partial(
        budget_calibration,
        alpha=cfg.alpha,
        debounce=cfg.debounce,
        fit_fraction=cfg.fit_fraction,
        watch_quantile=cfg.watch_quantile,
        method=cfg.method,
        valid=valid,
    )
    null = jnp.where(valid[..., None, None], evidence, jnp.nan)
    n = evidence.shape[-1]
    level = 1.0 - cfg.edge_alpha / (n * (n - 1))  # Bonferroni over the N(N−1) directed edges
    theta = jnp.nanquantile(null.reshape(-1, *null.shape[2:]), level, axis=0)
    return Calibrations(
        paper=paper_calibration(smooth, paper_k, valid),
        budget=budget(budget_statistic(smooth, cfg.log_scores), two_sided=cfg.two_sided),
        reward=budget(reward_drop, two_sided=False),
        actdev=budget(action_dev, two_sided=False),
        edge_threshold=jnp.maximum(theta, EDGE_FLOOR),
    )


# --------------------------------------------------------------------------- decide


class Decision(NamedTuple):
    """One calibration's verdicts for a batch."""

    onsets: Onsets  # per agent [B, N]
    candidate: jax.Array  # [B] Stage-1 Patient-0 candidate (−1: no flag)
    t_det: jax.Array  # [B] its confirmed detection step
    stage2: Traceback  # the paper's traceback
    deployable: Traceback  # the calibrated traceback (module doc)
    evidence: EdgeEvidence  # the paper's window aggregates [B, N(j), N(i)]
    attribution: jax.Array  # [B, N(j), N(i)] e_ji at t_det, the deployable evidence
    contagion: jax.Array  # [B, N(j), N(i)] C_ij at the last step
    occupancy: jax.Array  # [B, N] instability occupancy of the window
    infected: jax.Array  # [B, N] bool


@partial(jax.jit, static_argnames=("debounce", "window", "decay"))
def decide(
    z: jax.Array,
    tiebreak_scale: jax.Array,
    threshold: jax.Array,
    watch: jax.Array,
    valid: jax.Array,
    geom: CriticGeometry,
    evidence: jax.Array,
    edge_threshold: jax.Array,
    *,
    debounce: int,
    window: int,
    decay: float,
) -> Decision:
    """Stage 1 onsets → candidate → Stage 2 (paper and deployable) for a batch.

    z [B, T, N] normalised statistic; tiebreak_scale [T, N] (σ for the paper's |x − μ|, ones
    for z); threshold, watch [N]; valid [B, T]; geom, evidence [B, T, N, N].
    """
    on = detect_onsets(z, threshold, valid, debounce=debounce)
    tiebreak = gather_steps(z * tiebreak_scale[: z.shape[1]], on.t_det)
    candidate, t_det = patient_zero_candidate(on.t_det, tiebreak)
    ev = edge_evidence(geom, t_det, window)
    at_det = jnp.take_along_axis(evidence, jnp.maximum(t_det, 0)[:, None, None, None], axis=1)
    attr = jnp.where((t_det >= 0)[:, None, None], at_det[:, 0], 0.0)
    ratio = attr / edge_threshold  # r_ji = e_ji / θ_ji
    net = ratio > jnp.swapaxes(ratio, -1, -2)  # i pushed j harder than j pushed i
    excess = jnp.where((ratio > 1.0) & net, ratio, 0.0)
    g_valid = geom.G * valid[..., None, None]
    flagged_after = (on.t_det >= t_det[:, None]) & (on.t_det >= 0)
    deployable = traceback(ev._replace(rate=excess), candidate)
    head = jax.nn.one_hot(deployable.patient_zero, z.shape[2], dtype=bool)  # −1 → all False
    return Decision(
        onsets=on,
        candidate=candidate,
        t_det=t_det,
        stage2=traceback(ev, candidate),
        deployable=deployable,
        evidence=ev,
        attribution=attr,
        contagion=contagion_weights(g_valid, t_det, decay)[:, -1],
        occupancy=instability_occupancy(z, watch, t_det, window),
        infected=flagged_after | head,
    )


@partial(jax.jit, static_argnames=("debounce",))
def first_flag(z: jax.Array, threshold: jax.Array, valid: jax.Array, *, debounce: int):
    """Baseline detector: (candidate [B], t_det [B], per-agent onsets) of z > threshold."""
    on = detect_onsets(z, threshold, valid, debounce=debounce)
    candidate, t_det = patient_zero_candidate(on.t_det, on.z_at_det)
    return candidate, t_det, on


def normalised(cal: Calibration, x: jax.Array, valid: jax.Array) -> jax.Array:
    """z of a measured batch: ``valid`` already excludes its non-finite episodes (``Measures.
    finite``), so the checks of ``normalise`` cannot fire and are skipped (no host sync)."""
    return standardise(x, cal.norm, valid)


@partial(jax.jit, static_argnames=("cfg",))
def decide_all(
    cals: Calibrations, cfg: DiagnoseConfig, m: Measures, valid: jax.Array
) -> tuple[dict[str, Decision], dict[str, tuple], dict[str, jax.Array]]:
    """Decisions of both calibrations, both baselines, and the z arrays, for one batch: one
    jitted program (no host round trip), so the next batch can be queued behind it."""
    decisions, zs = {}, {}
    for name in CALIBRATIONS:
        cal: Calibration = getattr(cals, name)
        x = m.smooth if name == "paper" else budget_statistic(m.smooth, cfg.log_scores)
        z = normalised(cal, x, valid)
        scale = cal.norm.sigma if name == "paper" else jnp.ones_like(cal.norm.sigma)
        decisions[name] = decide(
            z,
            scale,
            cal.threshold,
            cal.watch,
            valid,
            m.geom,
            m.evidence,
            cals.edge_threshold,
            debounce=cal.debounce,
            window=cfg.window,
            decay=cfg.decay,
        )
        zs[name] = z
    baselines = {}
    for name, x in (("reward", m.reward_drop), ("actdev", m.action_dev)):
        cal = getattr(cals, name)
        z = normalised(cal, x, valid)
        baselines[name] = first_flag(z, cal.threshold, valid, debounce=cal.debounce)
        zs[name] = z
    return decisions, baselines, zs


# --------------------------------------------------------------------------- inputs


class Inputs(NamedTuple):
    store: EpisodeStore
    calibration: EpisodeStore
    model: Model
    policy: Any
    checkpoint: dict[str, str]


def check_store(store: EpisodeStore, what: str, spec: Any, ckpt: Path, ident: dict) -> None:
    """The store was written for this env by this checkpoint, and is not empty."""
    have = store.meta.env
    for key, value in dataclasses.asdict(spec).items():
        if have.get(key) != value:
            raise StoreError(
                f"{what} {store.path}: env {key} is {have.get(key)!r}, but the "
                f"checkpoint {ckpt} has {value!r}"
            )
    if store.meta.checkpoint["sha256"] != ident["sha256"]:
        raise StoreError(
            f"{what} {store.path}: written by checkpoint "
            f"{store.meta.checkpoint['path']} (sha256 "
            f"{store.meta.checkpoint['sha256'][:12]}), not by {ckpt} (sha256 "
            f"{ident['sha256'][:12]})"
        )
    if store.n_episodes == 0:
        raise StoreError(f"{what} {store.path}: holds no committed episodes")


def open_inputs(
    store_path: str | Path,
    run_dir: str | Path,
    calibration_path: str | Path | None,
    stage1: Stage1Config,
    allow_partial: bool = False,
) -> Inputs:
    """Load the policy and both stores, refusing any mismatch with a one-line error.

    A store chunk that is missing, truncated or unreadable is an error unless
    ``allow_partial`` (then it is left out, and the summary says how much was covered)."""
    from agents import checkpoint

    if calibration_path is None:
        raise StoreError(
            "calibration: missing; pass --calibration CLEAN_STORE (clean episodes "
            "of other seeds from the same checkpoint)"
        )
    policy = checkpoint.load_policy(run_dir)
    ckpt = checkpoint.policy_item(policy)
    ident = policy.identity or checkpoint_identity(ckpt)  # load_policy verified and hashed it
    on_corrupt = "skip" if allow_partial else "raise"
    store = open_store(store_path, on_corrupt=on_corrupt)
    cal = open_store(calibration_path, on_corrupt=on_corrupt)
    check_store(store, "store", policy.env.spec, ckpt, ident)
    check_store(cal, "calibration store", policy.env.spec, ckpt, ident)
    return Inputs(store, cal, model_from_policy(policy, stage1), policy, ident)


def mask_fields(inputs: Inputs) -> tuple[str, ...]:
    """("avail",) when the stores recorded legal actions, () for stores of an env without
    masks written before masks were recorded; a masked env's store must have them."""
    have = [
        any(c.name == "avail" for c in s.meta.columns) for s in (inputs.store, inputs.calibration)
    ]
    if all(have):
        return ("avail",)
    if inputs.policy.env.spec.name in MASKED_ENVS:
        where = inputs.store.path if not have[0] else inputs.calibration.path
        raise StoreError(
            f"store {where}: records no action masks, which {inputs.policy.env.spec.name} "
            "needs; re-record it with this version of forensics rollout"
        )
    return ()


def _column(store: EpisodeStore, name: str) -> np.ndarray:
    return np.concatenate([b[name] for b in store.iter_batches([name], 1 << 16)])


def check_disjoint(scored_seeds: np.ndarray, calib_seeds: np.ndarray, where: Path) -> None:
    """Calibration episodes must share no seed (hence no initial state) with scored ones."""
    shared = np.intersect1d(scored_seeds, calib_seeds)
    if shared.size:
        raise StoreError(
            f"calibration store {where}: {shared.size} seed(s) also in the scored "
            f"store (e.g. seed {shared[0]}); calibrate on clean episodes of other "
            "seeds"
        )


# --------------------------------------------------------------------------- run


def _measure_batch(
    model: Model, cfg: DiagnoseConfig, key: jax.Array, batch: Mapping[str, np.ndarray]
) -> tuple[Measures, jax.Array, int]:
    """Measure a (padded) batch; returns the measures, the valid mask with non-finite
    episodes removed, and the number of real episodes. With several devices the episodes are
    split across them and the networks replicated (``agents.sharding``)."""
    n = len(batch["episode_id"])
    b = pad_batch(batch, cfg.batch_episodes)
    mesh = batch_mesh(cfg.batch_episodes)
    obs, actions, rewards, valid, avail = shard_batch(
        (b[cfg.observations], b["actions"], b["rewards"], b["valid"], b.get("avail")), mesh
    )
    params, key = jax.device_put((model.params, key), replicated(mesh))
    m = measure(
        model.instruments,
        params,
        obs,
        actions,
        rewards,
        valid,
        key,
        avail,
        evidence_window=cfg.evidence_window,
        evidence=cfg.evidence,
    )
    return m, valid & m.finite[:, None], n


def calibrate(
    model: Model, cfg: DiagnoseConfig, clean: Mapping[str, np.ndarray], key: jax.Array
) -> tuple[Calibrations, dict[str, Any]]:
    """Measure the clean calibration episodes and fit every threshold on them."""
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("smooth", "reward", "actdev", "evidence", "valid")
    }
    dropped = 0
    for batch in split_batches(clean, cfg.batch_episodes):
        m, valid, n = _measure_batch(model, cfg, key, batch)
        keep = np.asarray(m.finite[:n])
        dropped += int((~keep).sum())
        for k, x in (
            ("smooth", m.smooth),
            ("reward", m.reward_drop),
            ("actdev", m.action_dev),
            ("evidence", m.evidence),
            ("valid", valid),
        ):
            parts[k].append(np.asarray(x[:n])[keep])
    arrays = {k: jnp.asarray(np.concatenate(v)) for k, v in parts.items()}
    try:
        cals = fit_calibrations(
            cfg,
            cfg.paper_k or model.paper_k,
            arrays["smooth"],
            arrays["reward"],
            arrays["actdev"],
            arrays["evidence"],
            arrays["valid"],
        )
    except ValueError as err:
        raise StoreError(f"calibration: {err}") from None
    info = {"clean_episodes": int(arrays["valid"].shape[0]), "dropped_non_finite": dropped}
    return cals, info


def _chain(row: np.ndarray) -> list[int]:
    return [int(a) for a in row if a >= 0]


def verdict_rows(
    ids: np.ndarray,
    seeds: np.ndarray,
    ok: np.ndarray,
    decisions: Mapping[str, Mapping[str, np.ndarray]],
    baselines: Mapping[str, Mapping[str, np.ndarray]],
) -> pd.DataFrame:
    """The per-episode verdict table (one row per episode; −1 = nobody / never)."""
    cols: dict[str, Any] = {
        "episode_id": ids,
        "seed": seeds,
        "status": np.where(ok, "ok", "skipped: non-finite scores or critic values"),
    }
    for name, d in decisions.items():
        cols[f"{name}_candidate"] = d["candidate"]
        cols[f"{name}_t_det"] = d["t_det"]
        cols[f"{name}_stage2"] = d["stage2_head"]
        cols[f"{name}_deployable"] = d["deployable_head"]
        cols[f"{name}_stage2_chain"] = [_chain(r) for r in d["stage2_chain"]]
        cols[f"{name}_deployable_chain"] = [_chain(r) for r in d["deployable_chain"]]
        cols[f"{name}_agent_t_det"] = [r.tolist() for r in d["agent_t_det"]]
        cols[f"{name}_infected"] = [np.flatnonzero(r).tolist() for r in d["infected"]]
    for name, d in baselines.items():
        cols[f"{name}_candidate"] = d["candidate"]
        cols[f"{name}_t_det"] = d["t_det"]
    return pd.DataFrame(cols)


EDGE_FIELDS = ("rate", "mean_G", "G_det", "D_sum", "mean_S", "mean_X")


def graph_json(
    episode_id: int,
    per_cal: Mapping[str, Mapping[str, np.ndarray]],
    e: int,
    edge_threshold: np.ndarray,
) -> dict[str, Any]:
    """One episode's contagion graphs (one per calibration): nodes and every edge i → j with
    its weight C_ij, window evidence and the deployable threshold."""
    out: dict[str, Any] = {"episode_id": int(episode_id), "calibrations": {}}
    for name, d in per_cal.items():
        n = d["agent_t_det"].shape[1]
        nodes = [
            {
                "agent": i,
                "t_det": int(d["agent_t_det"][e, i]),
                "z_at_det": float(d["z_at_det"][e, i]),
                "occupancy": float(d["occupancy"][e, i]),
                "infected": bool(d["infected"][e, i]),
            }
            for i in range(n)
        ]
        edges = [
            {
                "source": i,
                "target": j,
                "weight": float(d["contagion"][e, j, i]),
                **{k: float(d[k][e, j, i]) for k in EDGE_FIELDS},
                "evidence": float(d["attribution"][e, j, i]),
                "threshold": float(edge_threshold[j, i]),
                "above_threshold": bool(d["attribution"][e, j, i] > edge_threshold[j, i]),
            }
            for j in range(n)
            for i in range(n)
            if i != j
        ]
        out["calibrations"][name] = {
            "candidate": int(d["candidate"][e]),
            "t_det": int(d["t_det"][e]),
            "stage2_chain": _chain(d["stage2_chain"][e]),
            "deployable_chain": _chain(d["deployable_chain"][e]),
            "window_steps": int(d["steps"][e]),
            "nodes": nodes,
            "edges": edges,
        }
    return out


def _host(d: Decision) -> dict[str, np.ndarray]:
    """A Decision as flat host arrays (what the verdicts, scores and graphs are built from)."""
    flat = {
        "candidate": d.candidate,
        "t_det": d.t_det,
        "agent_t_det": d.onsets.t_det,
        "agent_onset": d.onsets.onset,
        "z_at_det": d.onsets.z_at_det,
        "stage2_head": d.stage2.patient_zero,
        "stage2_chain": d.stage2.chain,
        "deployable_head": d.deployable.patient_zero,
        "deployable_chain": d.deployable.chain,
        "attribution": d.attribution,
        "contagion": d.contagion,
        "occupancy": d.occupancy,
        "infected": d.infected,
        "steps": d.evidence.steps,
        **{k: getattr(d.evidence, k) for k in EDGE_FIELDS},
    }
    return {k: np.asarray(v) for k, v in flat.items()}


PER_STEP = ("raw", "smooth", "q")  # per-step measures written to scores.npz


def score_batches(
    model: Model,
    cfg: DiagnoseConfig,
    cals: Calibrations,
    key: jax.Array,
    batches: Iterator[Mapping[str, np.ndarray]],
    on_batch: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Measure and decide every batch; returns concatenated host arrays and timings.

    Keys: ``episode_id``, ``seed``, ``ok``, per-step ``raw``/``smooth``/``q`` and ``z_<name>``,
    and per calibration / baseline ``<name>.<field>``. ``on_batch`` sees each batch's host
    arrays (graph files are written from there, so memory stays per-batch for the graphs).

    One batch is kept in flight: batch k + 1 is read, sent and queued on the device before
    batch k's results are copied back, so the device computes while the host reads the store
    and converts results. Timings: ``first_batch_s`` until the first batch's results are on
    the host (compilation included), ``steady_s`` the rest.
    """
    out: dict[str, list[np.ndarray]] = {}
    timings = {"first_batch_s": 0.0, "steady_s": 0.0, "batches": 0}
    start = time.perf_counter()

    def collect(batch, queued) -> None:
        host = _batch_host(batch, *queued)
        if timings["batches"] == 0:
            timings["first_batch_s"] = time.perf_counter() - start
        timings["batches"] += 1
        if on_batch is not None:
            on_batch(host)
        for k, v in host.items():
            out.setdefault(k, []).append(v)

    pending = None
    for batch in batches:
        m, valid, n = _measure_batch(model, cfg, key, batch)
        queued = (batch, (m, n, *decide_all(cals, cfg, m, valid)))  # asynchronous
        if pending is not None:
            collect(*pending)
        pending = queued
    if pending is not None:
        collect(*pending)
    timings["steady_s"] = time.perf_counter() - start - timings["first_batch_s"]
    if not out:
        raise StoreError("store: no episodes to diagnose")
    return {k: np.concatenate(v) for k, v in out.items()}, timings


def _batch_host(batch, m: Measures, n: int, decisions, baselines, zs) -> dict[str, np.ndarray]:
    """One batch's results as host arrays (the real ``n`` episodes; padding dropped)."""
    host: dict[str, np.ndarray] = {
        "episode_id": batch["episode_id"],
        "seed": batch["seed"],
        "ok": np.asarray(m.finite[:n]),
        **{k: np.asarray(getattr(m, k)[:n]) for k in PER_STEP},
        **{f"z_{k}": np.asarray(z[:n]) for k, z in zs.items()},
    }
    for name, d in decisions.items():
        host.update({f"{name}.{k}": v[:n] for k, v in _host(d).items()})
    for name, (cand, t_det, on) in baselines.items():
        host.update(
            {
                f"{name}.candidate": np.asarray(cand[:n]),
                f"{name}.t_det": np.asarray(t_det[:n]),
                f"{name}.agent_t_det": np.asarray(on.t_det[:n]),
            }
        )
    return host


def split(host: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The ``<prefix>.<field>`` entries of ``host`` as {field: array}."""
    return {k.split(".", 1)[1]: v for k, v in host.items() if k.startswith(prefix + ".")}


def calibration_arrays(cals: Calibrations) -> dict[str, np.ndarray]:
    """Thresholds, watch levels and normalisers, for scores.npz (report draws them)."""
    out = {"edge_threshold": np.asarray(cals.edge_threshold)}
    for name in (*CALIBRATIONS, *BASELINES):
        cal: Calibration = getattr(cals, name)
        out.update(
            {
                f"{name}_mu": np.asarray(cal.norm.mu),
                f"{name}_sigma": np.asarray(cal.norm.sigma),
                f"{name}_floor": np.asarray(cal.norm.floor),
                f"{name}_threshold": np.asarray(cal.threshold),
                f"{name}_watch": np.asarray(cal.watch),
            }
        )
    return out


def diagnose(
    store_path: str | Path,
    run_dir: str | Path,
    calibration_path: str | Path | None,
    out_dir: str | Path,
    config: Mapping[str, Any],
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    allow_partial: bool = False,
    models: str | Path | None = None,
) -> dict[str, Any]:
    """Diagnose every episode of ``store_path``; write verdicts, scores, graphs and a summary
    to ``out_dir``; returns the summary. ``config`` is the ``forensics`` config section;
    ``models`` a ``forensics fit-models`` directory for the log-only instruments
    (``forensics.logonly``), whose fused verdict is then the ``verdict`` column.
    ``allow_partial``: diagnose the readable chunks of a damaged store (see ``open_inputs``)."""
    t_start = time.perf_counter()
    cfg = DiagnoseConfig.from_mapping(config)
    inputs = open_inputs(store_path, run_dir, calibration_path, cfg.stage1, allow_partial)
    store, cal_store, model = inputs.store, inputs.calibration, inputs.model
    fields = tuple(
        dict.fromkeys(f if f != "obs_perceived" else cfg.observations for f in SCORED_FIELDS)
    ) + mask_fields(inputs)
    for s in (store, cal_store):
        for file, problem in s.skipped:
            log(f"warning: {s.path}: skipped chunk {file}: {problem}")
    clean = load_clean(cal_store, fields)
    scored_seeds = np.unique(_column(store, "seed"))
    check_disjoint(scored_seeds, clean["seed"], cal_store.path)
    key = jax.random.PRNGKey(cfg.probe_seed)

    t0 = time.perf_counter()
    cals, cal_info = calibrate(model, cfg, clean, key)
    t_cal = time.perf_counter() - t0

    out = Path(out_dir)
    graphs = out / GRAPHS_DIR
    (graphs if cfg.graphs else out).mkdir(parents=True, exist_ok=True)
    edge_thr = np.asarray(cals.edge_threshold)

    def write_graphs(host: dict[str, Any]) -> None:
        if not cfg.graphs:
            return
        per_cal = {name: split(host, name) for name in CALIBRATIONS}
        for e, episode_id in enumerate(host["episode_id"]):
            g = graph_json(episode_id, per_cal, e, edge_thr)
            (graphs / f"{int(episode_id)}.json").write_text(json.dumps(g) + "\n")

    t0 = time.perf_counter()
    host, timings = score_batches(
        model, cfg, cals, key, store.iter_batches(fields, cfg.batch_episodes), write_graphs
    )
    t_score = time.perf_counter() - t0

    decisions = {name: split(host, name) for name in CALIBRATIONS}
    baselines = {name: split(host, name) for name in BASELINES}
    verdicts = verdict_rows(host["episode_id"], host["seed"], host["ok"], decisions, baselines)
    if models is not None and cfg.observations != "obs_perceived":
        raise StoreError("--models: the log-only instruments read obs_perceived only")
    logonly = add_verdicts(
        verdicts, inputs, models, clean, scored_seeds, cfg.batch_episodes, cfg.alpha, log
    )
    skipped = int((~host["ok"]).sum())
    if skipped:
        log(
            f"warning: {skipped} episode(s) skipped: non-finite Stage-1 scores or critic "
            "values (status column of the verdicts)"
        )
    summary = {
        "store": {
            "path": str(store.path.resolve()),
            "episodes": store.n_episodes,
            "episodes_listed": store.manifest_episodes,  # > episodes: a partial diagnosis
            "partial": store.partial,
            "checkpoint": store.meta.checkpoint,
            "env": store.meta.env,
            "skipped_chunks": [list(s) for s in store.skipped],
            "seeds": scored_seeds.tolist(),
        },
        "calibration_store": {
            "path": str(cal_store.path.resolve()),
            "episodes": cal_store.n_episodes,
            "episodes_listed": cal_store.manifest_episodes,
            "partial": cal_store.partial,
            "skipped_chunks": [list(s) for s in cal_store.skipped],
            "seeds": np.unique(clean["seed"]).tolist(),
            **cal_info,
        },
        "run_dir": str(Path(run_dir).resolve()),
        "checkpoint": inputs.checkpoint,
        "env_steps": inputs.policy.env_steps,
        "env": inputs.policy.config["env"],
        "algo": inputs.policy.config["algo"]["name"],
        "config": cfg.to_json(),
        "paper_k": cfg.paper_k or model.paper_k,
        "calibration": {
            name: {
                "threshold": np.asarray(getattr(cals, name).threshold).tolist(),
                "watch": np.asarray(getattr(cals, name).watch).tolist(),
                "calib_fpr": getattr(cals, name).calib_fpr,
            }
            for name in (*CALIBRATIONS, *BASELINES)
        },
        "edge_threshold": edge_thr.tolist(),
        "logonly": logonly,
        "episodes_scored": int(len(verdicts)),
        # what the verdicts cover: all the store lists, or (--allow-partial) fewer
        "coverage": {
            "episodes": int(len(verdicts)),
            "listed": store.manifest_episodes,
            "partial": store.partial or cal_store.partial,
        },
        "episodes_skipped": skipped,
        "code_version": current_code_version(),
        "device": str(jax.devices()[0]),
        "timings": {"calibrate_s": t_cal, "score_s": t_score, **timings},
    }
    np.savez_compressed(
        out / SCORES_FILE,
        episode_id=host["episode_id"],
        **{k: host[k] for k in PER_STEP},
        **{k: v for k, v in host.items() if k.startswith("z_")},
        **{
            f"{name}_{k}": decisions[name][k]
            for name in CALIBRATIONS
            for k in ("attribution", "contagion", "occupancy", "agent_t_det")
        },
        **calibration_arrays(cals),
    )
    write_table(
        verdicts,
        out / VERDICTS_FILE,
        metadata={"store": summary["store"]["path"], "checkpoint": inputs.checkpoint},
    )
    summary["timings"]["total_s"] = time.perf_counter() - t_start
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary
