"""The paper's protocol as its public code runs it, and the replay-referenced setting.

Everything here needs a simulator that can replay a seed (the *replay-referenced* setting,
DESIGN.md "Two settings"): the reference of an episode is the same seed replayed R times
without the fault (``agents.replay_band``). Two instruments share that reference:

**paper-protocol** (``forensics=paper``; risal-shefin/marl-failure-analysis, MADDPG code):

1. Statistic: the Taylor remainder of log π at a sign probe, argmax re-taken at o + η,
   raw x_{t,i} and its 5-step causal mean x̄ (``forensics.stage1``, ``retake_argmax``).
2. Band: μ_{t,i}, σ_{t,i} = replay mean and population std of x̄ over R = 100 replays of the
   scored episode's own seed with N(0, (1e-4)²) observation noise.
3. Flag (``band_flags``): |x̄ − μ| > K·max(σ, floor) and not isclose(x̄, μ, rtol = atol = 1e-5)
   (np.isclose: |x̄ − μ| ≤ atol + rtol·|μ|). K = 2, floor 0 (MADDPG); K = 3, floor 1e-6 (HATRPO).
4. Candidate (``earliest_candidate``): the earliest flag step t_det; every agent flagged there is
   among "the earliest flagged"; the candidate is the one with the largest *raw* deviation
   |x_{t_det,i} − μ_{t_det,i}| (unsmoothed x against the smoothed band, as the code does), the
   lowest index on ties.
5. Traceback (``traceback_maddpg``): at the current agent c, for every other u in index order,
   count_u = #{τ ∈ [t_det − 4, t_det] ∩ [0, T) : D_{c u}^τ > 0}, rate_u = count_u / #window,
   score_u = count_u · G_{c u}^{t_det}; the best u is the first with the strictly largest
   score; stop when rate_best ≤ 0 or best is already on the chain, else hop. G, D are
   evaluated on the attacked run at the policies' own pre-attack actions a_i = argmax π_i(o_i)
   (recomputed from the observations: nothing is read from the ground truth).
   ``traceback_hatrpo``: window [t_det − 4, t_det), best u by (rate, then G at t_det), G, D of
   the seed's clean episode.
6. Protocol (``onset_eligible``): an ordered pair's high- (low-) influence episode exists only
   if some step t < ceil(0.25·T) (MADDPG; t < T for HATRPO) of the clean episode has
   D_{j i}^t > 0 (< 0); the others are skipped and counted.
7. Scoring (``paper_scoring``): correct at Stage 1 if the victim is among the earliest flagged
   and (MADDPG) t_det ≥ attack start; a first flag before the start is a threshold failure;
   Stage 2 runs *only on the remaining wrong detected episodes* — the ground truth decides
   when to run it, so the number is oracle-gated. Its denominator is the episodes with a
   detection (the code's ``total_with_detection``); we also give it over all episodes.

**replay-referenced default** (``forensics=replay``): our default instrument (the cost of the
logged action, J = −log π(a_t | o_t)) against the same reference: the residual
r_{t,i} = log J_{t,i} − mean_r log J^r_{t,i} of the replays, thresholded by our calibrated
per-episode false-alarm budget (``calibration.budget_calibration``) fitted on the residuals
of *clean episodes of other seeds* against *their own* replays, and our deployable Stage 2
(``diagnose.decide``). No ground truth anywhere.

Shapes: E episodes, T steps, N agents.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from agents.replay_band import iter_bands
from forensics.stage1 import NO_DETECTION, Stage1Config, stage1_scores

PAPER_K = {"maddpg": 2.0, "hatrpo": 3.0}
PAPER_SIGMA_FLOOR = {"maddpg": 0.0, "hatrpo": 1e-6}
ISCLOSE_RTOL = ISCLOSE_ATOL = 1e-5
PAPER_STAGE1 = Stage1Config(
    probe="paper", eps=0.01, target="greedy", window=5, retake_argmax=True
)  # the paper's code: sign probe, argmax re-taken at o + η, 5-step deque
TRACE_WINDOW = 5
SEARCH_FRACTION = 0.25


# --------------------------------------------------------------------------- stage 1


def band_flags(
    x: jax.Array,
    mu: jax.Array,
    sigma: jax.Array,
    k: float,
    sigma_floor: float = 0.0,
    valid: jax.Array | None = None,
) -> jax.Array:
    """[E, T, N] bool: |x − μ| > K·max(σ, floor) and not isclose(x, μ, 1e-5, 1e-5)."""
    dev = jnp.abs(x - mu)
    close = dev <= ISCLOSE_ATOL + ISCLOSE_RTOL * jnp.abs(mu)
    flags = (dev > k * jnp.maximum(sigma, sigma_floor)) & ~close
    if valid is not None:
        flags = flags & valid[..., None]
    return flags


class Earliest(NamedTuple):
    agent_t: jax.Array  # [E, N] first flag step per agent (−1: never)
    earliest: jax.Array  # [E, N] bool: flagged at the episode's earliest flag step
    t_det: jax.Array  # [E] earliest flag step (−1: nothing flagged)
    candidate: jax.Array  # [E] the earliest-flagged agent with the largest raw deviation


@jax.jit
def earliest_candidate(flags: jax.Array, raw_dev: jax.Array) -> Earliest:
    """Earliest flags of ``flags`` [E, T, N]; ties among the earliest go to the largest
    ``raw_dev`` [E, T, N] at t_det (the paper: |raw x − μ|), then the lowest agent index."""
    hit = jnp.any(flags, axis=1)
    agent_t = jnp.where(hit, jnp.argmax(flags, axis=1), NO_DETECTION).astype(jnp.int32)
    big = jnp.iinfo(jnp.int32).max
    first = jnp.min(jnp.where(hit, agent_t, big), axis=1)
    any_flag = jnp.any(hit, axis=1)
    t_det = jnp.where(any_flag, first, NO_DETECTION).astype(jnp.int32)
    earliest = hit & (agent_t == t_det[:, None])
    dev = jnp.take_along_axis(raw_dev, jnp.maximum(t_det, 0)[:, None, None], axis=1)[:, 0]
    cand = jnp.argmax(jnp.where(earliest, dev, -jnp.inf), axis=1).astype(jnp.int32)
    return Earliest(agent_t, earliest, t_det, jnp.where(any_flag, cand, NO_DETECTION))


# --------------------------------------------------------------------------- stage 2


def _window(num_steps: int, t_det: jax.Array, closed: bool) -> jax.Array:
    """[E, T] float: steps in [t_det − 4, t_det] (closed) or [t_det − 4, t_det) ∩ [0, T)."""
    t = jnp.arange(num_steps)[None, :]
    end = t_det[:, None]
    upper = (t <= end) if closed else (t < end)
    return (upper & (t >= end - (TRACE_WINDOW - 1)) & (end >= 0)).astype(jnp.float32)


def trace_chain(keys: tuple[jax.Array, ...], stop_rate: jax.Array, candidate: jax.Array):
    """The code's recursive traceback for one episode: from ``candidate`` the best other agent
    u of row c is the lexicographic argmax of ``keys`` (each [N(c), N(u)]; the first index
    on full ties, as a strict ``>`` scan in index order keeps); stop when ``stop_rate[c, u]``
    ≤ 0 or u is on the chain. Returns (head, chain [N] −1 padded)."""
    n = stop_rate.shape[0]

    def hop(k, carry):
        current, chain, visited, done = carry
        tied = jnp.arange(n) != current
        for key in keys:  # a static handful of refinements
            row = key[current]
            tied = tied & (row == jnp.max(jnp.where(tied, row, -jnp.inf)))
        u = jnp.argmax(tied)
        stop = done | (stop_rate[current, u] <= 0) | visited[u]
        current = jnp.where(stop, current, u)
        chain = jnp.where(stop, chain, chain.at[k + 1].set(u))
        return current, chain, visited.at[current].set(True), stop

    c0 = jnp.maximum(candidate, 0)
    chain0 = jnp.full((n,), NO_DETECTION, jnp.int32).at[0].set(candidate)
    visited0 = jnp.zeros((n,), bool).at[c0].set(True)
    head, chain, _, _ = jax.lax.fori_loop(0, n - 1, hop, (c0, chain0, visited0, candidate < 0))
    return jnp.where(candidate >= 0, head, NO_DETECTION), chain


def _g_at(G: jax.Array, t_det: jax.Array) -> jax.Array:
    return jnp.take_along_axis(G, jnp.maximum(t_det, 0)[:, None, None, None], axis=1)[:, 0]


@jax.jit
def traceback_maddpg(G: jax.Array, D: jax.Array, t_det: jax.Array, candidate: jax.Array):
    """The MADDPG code's traceback (module doc, point 5). G, D [E, T, N(j), N(i)] of the
    attacked run at the pre-attack actions. Returns (head [E], chain [E, N])."""
    w = _window(G.shape[1], t_det, closed=True)
    count = jnp.einsum("et,etji->eji", w, (D > 0).astype(w.dtype))
    rate = count / jnp.maximum(jnp.sum(w, axis=1), 1.0)[:, None, None]
    score = count * _g_at(G, t_det)
    return jax.vmap(lambda s, r, c: trace_chain((s,), r, c))(score, rate, candidate)


@jax.jit
def traceback_hatrpo(G: jax.Array, D: jax.Array, t_det: jax.Array, candidate: jax.Array):
    """The HATRPO code's variant: window [t_det − 4, t_det), best u by (critical rate, G at
    t_det); G, D [E, T, N, N] of the seed's clean episode."""
    w = _window(G.shape[1], t_det, closed=False)
    count = jnp.einsum("et,etji->eji", w, (D > 0).astype(w.dtype))
    rate = count / jnp.maximum(jnp.sum(w, axis=1), 1.0)[:, None, None]
    return jax.vmap(lambda r, g, c: trace_chain((r, g), r, c))(rate, _g_at(G, t_det), candidate)


def search_horizon(algo: str, episode_length: int) -> int:
    """Steps searched for influence onsets: t < ceil(0.25·T) (MADDPG), the whole episode
    (HATRPO)."""
    return math.ceil(SEARCH_FRACTION * episode_length) if algo == "maddpg" else episode_length


def onset_eligible(
    D: np.ndarray, victim: np.ndarray, observed: np.ndarray, high: np.ndarray, horizon: int
) -> np.ndarray:
    """[E] bool: the episode's pair (victim i → observed j) has a step t < horizon of its
    seed's clean D[·, j, i] with the sign its class needs (> 0 high, < 0 low); D [E, T, N, N]
    of each episode's clean partner. Ineligible episodes do not exist in the paper's
    protocol (skipped and counted, not scored)."""
    d = D[np.arange(len(victim)), :horizon, observed, victim]  # [E, h]
    return np.where(high, (d > 0).any(axis=1), (d < 0).any(axis=1))


# --------------------------------------------------------------------------- scoring


class PaperScore(NamedTuple):
    stage1: np.ndarray  # [E] victim among the earliest flagged (and t_det ≥ start: MADDPG)
    threshold_failure: np.ndarray  # [E] first flag before the attack (MADDPG)
    detected: np.ndarray  # [E] any flag
    oracle_gated: np.ndarray  # [E] stage1, or Stage 2 run because the ground truth says wrong
    strict: np.ndarray  # [E] ours: the tie-broken candidate is the victim, t_det ≥ start


def paper_scoring(
    earliest: np.ndarray,
    t_det: np.ndarray,
    candidate: np.ndarray,
    head: np.ndarray,
    victim: np.ndarray,
    start: np.ndarray,
    algo: str,
) -> PaperScore:
    """The code's scoring (module doc, point 7) beside ours, per attacked episode."""
    detected = t_det >= 0
    in_time = t_det >= start if algo == "maddpg" else np.ones_like(detected)
    among = earliest[np.arange(len(victim)), victim]
    stage1 = detected & among & in_time
    threshold = detected & ~in_time
    gated = stage1 | (detected & ~stage1 & ~threshold & (head == victim))
    strict = detected & (t_det >= start) & (candidate == victim)
    return PaperScore(stage1, threshold, detected, gated, strict)


# --------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """``forensics.reference``: where the reference of an episode comes from.

    kind: ``pooled`` (log-only: clean episodes of other seeds, ``forensics.diagnose``) |
    ``replay`` (replay-referenced: R noisy clean replays of the episode's own seed).
    """

    kind: str = "pooled"
    replays: int = 100
    noise: float = 1e-4
    chunk_seeds: int = 8  # seeds per jitted band call (memory: chunk × R episodes)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> ReferenceConfig:
        from configs.schema import ConfigError

        cfg = dict(cfg or {})
        for key in sorted(set(cfg) - {f.name for f in dataclasses.fields(cls)}):
            raise ConfigError(
                f"forensics.reference.{key}: unknown key; expected kind, replays, noise, "
                "chunk_seeds"
            )
        out = cls(**cfg)
        rules = [
            ("kind", out.kind in ("pooled", "replay"), "pooled or replay"),
            ("replays", isinstance(out.replays, int) and out.replays >= 2, "an integer >= 2"),
            ("noise", isinstance(out.noise, int | float) and out.noise >= 0, "a number >= 0"),
            (
                "chunk_seeds",
                isinstance(out.chunk_seeds, int) and out.chunk_seeds >= 1,
                "an integer >= 1",
            ),
        ]
        for name, ok, expected in rules:
            if not ok:
                raise ConfigError(
                    f"forensics.reference.{name}: expected {expected}, got {getattr(out, name)!r}"
                )
        return out


def _greedy_onehot(inst: Any, params: Any, obs: jax.Array, avail: jax.Array) -> jax.Array:
    """The policies' own actions at ``obs`` [.., N, O] as critic inputs (one-hot)."""
    per_agent = jax.vmap(inst.actor_apply)  # own params, own obs
    per_step = jax.vmap(per_agent, in_axes=(None, 0))
    logits = jax.vmap(per_step, in_axes=(None, 0))(params, obs)  # [E, T, N, A]
    if not inst.discrete:
        return logits
    act = jnp.argmax(jnp.where(avail, logits, -jnp.inf), axis=-1)
    return jax.nn.one_hot(act, inst.action_dim, dtype=jnp.float32)


def _statistics(paper_inst: Any, inst: Any, log_scores: bool, params: Any, rep: Any):
    """(the paper's smoothed statistic, our budget statistic) [B, T, N] of episodes ``rep``
    (obs, actions, avail): what the band averages over replays."""
    from forensics.diagnose import budget_statistic

    paper = stage1_scores(
        paper_inst.actor_apply, params, rep.obs, rep.avail, None, rep.actions,
        cfg=paper_inst.stage1,
    )  # fmt: skip
    ours = stage1_scores(
        inst.actor_apply, params, rep.obs, rep.avail, None, rep.actions, cfg=inst.stage1
    )
    return paper.smooth, budget_statistic(ours.smooth, log_scores)


@partial(jax.jit, static_argnames=("paper_inst",))
def paper_measure(paper_inst: Any, params: Mapping[str, Any], obs, avail):
    """The paper's raw and smoothed statistic and its Stage-2 geometry (G, D at the
    policies' own pre-attack actions, recomputed from ``obs``) for a batch [B, T, N, ...]."""
    from forensics.stage2 import critic_geometry

    s1 = stage1_scores(paper_inst.actor_apply, params["actor"], obs, avail, cfg=paper_inst.stage1)
    act = _greedy_onehot(paper_inst, params["actor"], obs, avail)
    geom = critic_geometry(paper_inst.critic_apply, params["critic"], obs, act, wrt="act")
    return s1.raw, s1.smooth, geom.G, geom.D


def _load(store: Any, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    parts = list(store.iter_batches(fields, 4096))
    return {k: np.concatenate([p[k] for p in parts]) for k in fields}


def _seed_band(band_fn, params, data: Mapping[str, np.ndarray], noise: float, chunk: int):
    """Band of every distinct seed of ``data`` (keyed by its replay key) and each episode's
    row into it."""
    seeds, first, index = np.unique(data["seed"], return_index=True, return_inverse=True)
    keys = data["replay_key"][first]
    band = iter_bands(band_fn, params, params, keys, noise, chunk)
    return seeds, band, index


def diagnose_replay(
    store_path: str | Path,
    run_dir: str | Path,
    calibration_path: str | Path | None,
    out_dir: str | Path,
    config: Mapping[str, Any],
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> dict[str, Any]:
    """Replay-referenced diagnosis of every episode of ``store_path`` (module doc): the
    paper's protocol and our default instrument against the same seed's clean replays.

    Writes ``verdicts.parquet`` (one row per episode), ``band.npz`` (μ, σ per seed, step and
    agent of both statistics: all that the replays leave behind) and ``summary.json``.
    Ground truth is never read; the replays are regenerated from each episode's recorded
    replay key by the checkpoint's jitted env.
    """
    from agents.attacks import Team
    from agents.replay_band import make_band, make_replays
    from forensics import diagnose as D
    from forensics.calibration import budget_calibration, identity_normaliser, standardise
    from forensics.store import current_code_version, pad_batch, write_table

    t_start = time.perf_counter()
    config = dict(config)
    ref = ReferenceConfig.from_mapping(config.pop("reference", None))
    cfg = D.DiagnoseConfig.from_mapping(config)
    inputs = D.open_inputs(store_path, run_dir, calibration_path, cfg.stage1)
    model, policy = inputs.model, inputs.policy
    inst, params = model.instruments, model.params
    algo = policy.config["algo"]["name"]
    spec = policy.env.spec
    paper_inst = dataclasses.replace(
        inst, stage1=dataclasses.replace(PAPER_STAGE1, discrete=spec.discrete)
    )
    obs_field = cfg.observations
    fields = (
        "episode_id", "seed", "replay_key", "valid", obs_field, "actions", "rewards",
        *D.mask_fields(inputs),
    )  # fmt: skip
    scored = _load(inputs.store, fields)
    clean = D.load_clean(inputs.calibration, fields)
    D.check_disjoint(np.unique(scored["seed"]), clean["seed"], inputs.calibration.path)
    if "avail" not in scored:
        for d in (scored, clean):
            d["avail"] = np.ones(d[obs_field].shape[:3] + (inst.action_dim,), bool)

    team = Team(spec, inst.actor_apply, inst.critic_apply)
    stats = partial(_statistics, paper_inst, inst, cfg.log_scores)
    band_fn = make_band(policy.env, team, stats, ref.replays)
    t0 = time.perf_counter()
    seeds_s, band_s, idx_s = _seed_band(
        band_fn, params["actor"], scored, ref.noise, ref.chunk_seeds
    )
    seeds_c, band_c, idx_c = _seed_band(band_fn, params["actor"], clean, ref.noise, ref.chunk_seeds)
    t_band = time.perf_counter() - t0
    key = jax.random.PRNGKey(cfg.probe_seed)

    def measured(data, index, band):
        """Our measures with the residual against the band as the statistic, per batch."""
        out = []
        for lo in range(0, len(data["episode_id"]), cfg.batch_episodes):
            b = {k: v[lo : lo + cfg.batch_episodes] for k, v in data.items()}
            n = len(b["episode_id"])
            b = pad_batch(b, cfg.batch_episodes)
            m = D.measure(
                inst, params, jnp.asarray(b[obs_field]), jnp.asarray(b["actions"]),
                jnp.asarray(b["rewards"]), jnp.asarray(b["valid"]), key,
                jnp.asarray(b["avail"]), evidence_window=cfg.evidence_window,
                evidence=cfg.evidence,
            )  # fmt: skip
            rows = np.resize(index[lo : lo + n], cfg.batch_episodes)  # padding rows: any
            resid = D.budget_statistic(m.smooth, cfg.log_scores) - band.mu[1][rows]
            pm = paper_measure(
                paper_inst, params, jnp.asarray(b[obs_field]), jnp.asarray(b["avail"])
            )
            out.append((n, b, m, resid, pm, rows))
        return out

    t0 = time.perf_counter()
    cal_batches = measured(clean, idx_c, band_c)
    cat = lambda xs: jnp.concatenate([x[:n] for n, x in xs])
    valid_c = cat([(n, jnp.asarray(b["valid"]) & m.finite[:, None]) for n, b, m, *_ in cal_batches])
    cals = D.fit_calibrations(
        dataclasses.replace(cfg, log_scores=False),
        PAPER_K[algo],
        cat([(n, r) for n, _, _, r, _, _ in cal_batches]),
        cat([(n, m.reward_drop) for n, _, m, *_ in cal_batches]),
        cat([(n, m.action_dev) for n, _, m, *_ in cal_batches]),
        cat([(n, m.evidence) for n, _, m, *_ in cal_batches]),
        valid_c,
    )
    # our rule on the residual: the replay already references every (seed, step, agent), so
    # z is the residual itself (no per-step σ of other seeds) and only the threshold is fitted
    resid_c = cat([(n, r) for n, _, _, r, _, _ in cal_batches])
    cals = cals._replace(
        budget=budget_calibration(
            resid_c, cfg.alpha, debounce=cfg.debounce, watch_quantile=cfg.watch_quantile,
            method=cfg.method, valid=valid_c, norm=identity_normaliser(*resid_c.shape[1:]),
        )
    )  # fmt: skip
    k, floor = PAPER_K[algo], PAPER_SIGMA_FLOOR[algo]
    clean_replay = make_replays(policy.env, team, 2)  # HATRPO: G, D of the clean episode
    cols: dict[str, list] = {}
    for n, b, m, resid, (raw, smooth, G, Dd), rows in measured(scored, idx_s, band_s):
        valid = jnp.asarray(b["valid"]) & m.finite[:, None]
        mu, sigma = jnp.asarray(band_s.mu[0][rows]), jnp.asarray(band_s.sigma[0][rows])
        flags = band_flags(smooth, mu, sigma, k, floor, valid)
        e = earliest_candidate(flags, jnp.abs(raw - mu))
        trace = traceback_maddpg if algo == "maddpg" else traceback_hatrpo
        if algo != "maddpg":  # G, D of the seed's clean episode: its noiseless replay
            rep = clean_replay(params["actor"], jnp.asarray(b["replay_key"]), 0.0)
            _, _, G, Dd = paper_measure(paper_inst, params, rep.obs[:, 0], rep.avail[:, 0])
        head, chain = trace(G, Dd, e.t_det, e.candidate)
        z = standardise(resid, cals.budget.norm, valid)
        d = D.decide(
            z, jnp.ones_like(cals.budget.norm.sigma), cals.budget.threshold, cals.budget.watch,
            valid, m.geom, m.evidence, cals.edge_threshold, debounce=cals.budget.debounce,
            window=cfg.window, decay=cfg.decay,
        )  # fmt: skip
        host = jax.device_get(
            {
                "paper_candidate": e.candidate, "paper_t_det": e.t_det,
                "paper_agent_t_det": e.agent_t, "paper_earliest": e.earliest,
                "paper_stage2": head, "paper_stage2_chain": chain,
                "replay_candidate": d.candidate, "replay_t_det": d.t_det,
                "replay_agent_t_det": d.onsets.t_det,
                "replay_deployable": d.deployable.patient_zero,
                "replay_deployable_chain": d.deployable.chain, "ok": m.finite,
            }
        )  # fmt: skip
        for name, v in host.items():
            cols.setdefault(name, []).append(np.asarray(v)[:n])
        cols.setdefault("episode_id", []).append(b["episode_id"][:n])
        cols.setdefault("seed", []).append(b["seed"][:n])
    arr = {name: np.concatenate(v) for name, v in cols.items()}
    lists = lambda x: [r.tolist() for r in x]
    verdicts = pd.DataFrame(
        {
            "episode_id": arr["episode_id"],
            "seed": arr["seed"],
            "status": np.where(arr["ok"], "ok", "skipped: non-finite scores or critic values"),
            **{c: arr[c] for c in ("paper_candidate", "paper_t_det", "paper_stage2")},
            "paper_agent_t_det": lists(arr["paper_agent_t_det"]),
            "paper_earliest": [np.flatnonzero(r).tolist() for r in arr["paper_earliest"]],
            "paper_stage2_chain": [
                [int(a) for a in r if a >= 0] for r in arr["paper_stage2_chain"]
            ],
            **{c: arr[c] for c in ("replay_candidate", "replay_t_det", "replay_deployable")},
            "replay_agent_t_det": lists(arr["replay_agent_t_det"]),
            "replay_deployable_chain": [
                [int(a) for a in r if a >= 0] for r in arr["replay_deployable_chain"]
            ],
        }
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out / "band.npz",
        seeds=seeds_s, paper_mu=band_s.mu[0], paper_sigma=band_s.sigma[0],
        ours_mu=band_s.mu[1], ours_sigma=band_s.sigma[1], count=band_s.count,
        calibration_seeds=seeds_c,
    )  # fmt: skip
    write_table(verdicts, out / "verdicts.parquet", metadata={"checkpoint": inputs.checkpoint})
    summary = {
        "setting": "replay-referenced",
        "store": {"path": str(inputs.store.path.resolve()), "episodes": len(verdicts)},
        "calibration_store": {
            "path": str(inputs.calibration.path.resolve()),
            "episodes": len(clean["seed"]),
        },
        "run_dir": str(Path(run_dir).resolve()),
        "checkpoint": inputs.checkpoint,
        "algo": algo,
        "env": policy.config["env"],
        "config": {**cfg.to_json(), "reference": dataclasses.asdict(ref)},
        "paper": {"k": k, "sigma_floor": floor, "stage1": dataclasses.asdict(paper_inst.stage1)},
        "replay_calibration": {
            "threshold": np.asarray(cals.budget.threshold).tolist(),
            "calib_fpr": cals.budget.calib_fpr,
        },
        "code_version": current_code_version(),
        "timings": {"band_s": t_band, "total_s": time.perf_counter() - t_start},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# --------------------------------------------------------------------------- evaluate


def _rate(x: np.ndarray) -> tuple[float, float, int]:
    """(share in %, normal-approximation 95 % half-width in %, n)."""
    x = np.asarray(x, bool)
    n = len(x)
    p = float(x.mean()) if n else float("nan")
    return 100 * p, 100 * 1.96 * math.sqrt(p * (1 - p) / max(n, 1)), n


def evaluate_replay(diag_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Join a replay-referenced diagnosis with its store's ground truth (the only place it is
    read): the paper's scoring of its protocol beside our strict scoring, each band's false
    alarms on the store's clean episodes, and our replay-referenced verdict.

    Returns (rows: dicts of setting, instrument, subset, metric, value, ci95, episodes — the
    ``forensics.results`` columns that depend on the data; counts: skipped pairs etc.).
    """
    from agents import checkpoint
    from forensics.diagnose import critic_input, model_from_policy
    from forensics.stage2 import critic_geometry
    from forensics.store import open_store

    d = Path(diag_dir)
    summary = json.loads((d / "summary.json").read_text())
    v = pd.read_parquet(d / "verdicts.parquet")
    store = open_store(summary["store"]["path"], on_corrupt="skip")
    if store.meta.checkpoint["sha256"] != summary["checkpoint"]["sha256"]:
        raise ValueError(f"{d}: its store {store.path} now holds another checkpoint's episodes")
    gt = store.ground_truth()
    v = v.merge(gt.drop(columns=["seed"]), on="episode_id", how="left")
    algo = summary["algo"]
    fields = ["episode_id", "seed", "obs_true", "actions", "clean_actions", "rewards", "valid"]
    data = _load(store, tuple(fields))
    pos = pd.Index(data["episode_id"]).get_indexer(v["episode_id"])
    data = {k: x[pos] for k, x in data.items()}
    clean = v["clean"].to_numpy(bool)
    # the clean partner (same seed) of every episode, and its critic geometry D
    clean_row = pd.Series(np.flatnonzero(clean), index=v["seed"].to_numpy()[clean])
    partner = clean_row.loc[v["seed"].to_numpy()].to_numpy()
    model = model_from_policy(checkpoint.load_policy(summary["run_dir"]), PAPER_STAGE1)
    inst = model.instruments
    ci = np.flatnonzero(clean)
    geom = critic_geometry(
        inst.critic_apply, model.params["critic"], jnp.asarray(data["obs_true"][ci]),
        critic_input(inst, jnp.asarray(data["actions"][ci])), wrt="act",
    )  # fmt: skip
    d_clean = np.zeros((len(v), *geom.D.shape[1:]), np.float32)
    d_clean[ci] = np.asarray(geom.D)
    t_len = data["valid"].shape[1]
    horizon = search_horizon(algo, t_len)
    attacked = ~clean
    victim = v["victim"].to_numpy()
    start = v["start"].to_numpy()
    safe_v = np.maximum(victim, 0)
    eligible = np.zeros(len(v), bool)
    eligible[attacked] = onset_eligible(
        d_clean[partner[attacked]], safe_v[attacked], np.maximum(v["observed"].to_numpy(), 0)[
            attacked], (v["influence"].to_numpy() == "high")[attacked], horizon,
    )  # fmt: skip
    # impactful: the victim's action changed inside the window and the team lost return
    t = np.arange(t_len)[None]
    win = (t >= start[:, None]) & (t < (start + v["window"].to_numpy())[:, None])
    rows_e = np.arange(len(v))
    changed = (
        (data["actions"][rows_e, :, safe_v] != data["clean_actions"][rows_e, :, safe_v]) & win
    ).any(axis=1)
    team = (data["rewards"] * data["valid"][..., None]).sum(axis=(1, 2))
    impactful = attacked & changed & (team < team[partner])

    earliest = np.zeros((len(v), store.meta.env["num_agents"]), bool)
    for r, agents in enumerate(v["paper_earliest"]):
        earliest[r, list(agents)] = True
    score = paper_scoring(
        earliest, v["paper_t_det"].to_numpy(), v["paper_candidate"].to_numpy(),
        v["paper_stage2"].to_numpy(), safe_v, start, algo,
    )  # fmt: skip
    out: list[dict[str, Any]] = []

    def add(setting, instrument, subset, metric, sel, x=None, value=None):
        if value is None:
            value, ci, n = _rate(x[sel])
        else:
            ci, n = "", int(sel.sum())
        out.append(
            dict(setting=setting, instrument=instrument, subset=subset, metric=metric,
                 value=round(float(value), 3), ci95=ci if ci == "" else round(ci, 3), episodes=n)
        )  # fmt: skip

    P = "paper-protocol"
    for subset, sel in (("all", attacked & eligible), ("impactful", impactful & eligible)):
        det = sel & score.detected
        add(P, "paper", subset, "patient0_paper_scored", det, score.oracle_gated)
        add(P, "paper", subset, "patient0_paper_scored_all_episodes", sel, score.oracle_gated)
        add(P, "paper", subset, "stage1_paper_scored", det, score.stage1)
        add(P, "paper", subset, "patient0", sel, score.strict)
        add(P, "paper", subset, "misses", sel, ~score.detected)
        add(P, "paper", subset, "threshold_failures", sel, score.threshold_failure)
        add(P, "paper", subset, "stage2_always", sel,
            score.detected & (start <= v["paper_t_det"].to_numpy())
            & (v["paper_stage2"].to_numpy() == victim))  # fmt: skip
    add(P, "paper", "all", "fpr", clean, v["paper_t_det"].to_numpy() >= 0)

    R = "replay-referenced"
    t_det = v["replay_t_det"].to_numpy()
    after = (t_det >= 0) & (t_det >= start)
    for subset, sel in (("all", attacked), ("impactful", impactful)):
        add(R, "verdict", subset, "patient0", sel, after & (v["replay_deployable"] == victim))
        add(R, "stage1", subset, "patient0", sel, after & (v["replay_candidate"] == victim))
        add(R, "verdict", subset, "misses", sel, t_det < 0)
        add(R, "verdict", subset, "threshold_failures", sel, (t_det >= 0) & (t_det < start))
        delays = (t_det - start)[sel & after]
        if len(delays):
            add(R, "verdict", subset, "delay_median", sel & after, value=np.median(delays))
            add(R, "verdict", subset, "delay_p90", sel & after, value=np.quantile(delays, 0.9))
    add(R, "verdict", "all", "fpr", clean, t_det >= 0)
    counts = {
        "attacked": int(attacked.sum()),
        "skipped_no_qualifying_step": int((attacked & ~eligible).sum()),
        "impactful": int(impactful.sum()),
        "clean": int(clean.sum()),
        "search_horizon": horizon,
        "recorded_search_fraction": store.meta.config.get("attack", {}).get("search_fraction"),
    }
    return out, counts
