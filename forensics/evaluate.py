"""``forensics evaluate``: diagnoses + ground truth → the accuracy table.

Ground truth enters here and only here: ``diagnose`` decides without it, ``evaluate`` joins
each verdict with its store's ground truth (``EpisodeStore.ground_truth``) by episode id.

Per attacked episode with victim v, attack start s and a calibration's candidate c detected at
t_det (−1 = never):

  stage-1 correct     c = v and t_det ≥ s  (a flag before the attack is a *threshold failure*,
                      no flag a *miss*; neither is correct whoever the flag names)
  deployable correct  the deployable Patient-0 = v and t_det ≥ s
  stage-2 (always)    the paper's traceback head = v and t_det ≥ s, on every episode
  oracle-gated        the paper's protocol: v among the earliest-flagged agents and t_det ≥ s;
                      otherwise, and *only because the ground truth says Stage 1 was wrong*, the
                      traceback head = v. Not deployable: reported for comparison only.
  downstream-first    t_det ≥ s and c ≠ v (a non-attacked agent was flagged first)
  fixed / broke       Stage 1 wrong → deployable right / Stage 1 right → deployable wrong
  delay               t_det − s over the episodes detected at or after s
  baselines           the reward-drop and action-deviation detectors (same α-budget
                      calibration on the same clean episodes) judged like Stage 1; chance = 1/N
  false-alarm rate    share of the scored store's clean episodes with any confirmed flag

Table-2 analogue (per attack, over the (seed, victim, observed) pairs recorded with both a
high- and a low-influence onset): share of pairs where the high-influence episode scores at
least as high as the low-influence one on the victim's instability occupancy (share of the
attack window's steps with z above the watch level), the observed agent's Q-drop (mean over
the attack window of Q_j in the counterfactual minus Q_j attacked) and the team reward drop
(counterfactual minus attacked return from the onset on).

Interventional check: the counterfactual of an attacked episode is the episode with the
attack removed and every random stream kept (``agents.rollout.counterfactual``); the store's
clean episode with the same replay key is exactly that episode, so no re-simulation is needed.
An agent *diverged* if its action differs from the counterfactual at some step
(``agents.rollout.divergence``). Against the agents the diagnosis calls infected: precision,
recall, and whether the deployable Patient-0 is among the first agents to diverge.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from forensics.diagnose import CALIBRATIONS, SCORES_FILE, SUMMARY_FILE, VERDICTS_FILE
from forensics.store import EpisodeStore, StoreError, open_store

GROUP = ("env", "algo", "N", "statistic", "attack", "influence", "calibration")
ORACLE_LABEL = "oracle-gated (paper; uses ground truth)"

# column → (markdown header, description); the table's order
COLUMNS: dict[str, tuple[str, str]] = {
    "episodes": ("episodes", "attacked episodes in the row"),
    "deployable_acc": (
        "deployable",
        "Patient-0 accuracy of Stage 1 + the calibrated Stage 2 (no ground truth used)",
    ),
    "deployable_ci95": ("± 95 %", "normal-approximation half-width of the deployable accuracy"),
    "stage1_acc": ("stage 1", "Stage-1 candidate alone"),
    "stage2_acc": ("stage 2 always", "the paper's traceback applied to every episode"),
    "oracle_gated_acc": (
        ORACLE_LABEL,
        "the paper's protocol: Stage 2 only on episodes the "
        "ground truth says Stage 1 got wrong; Stage 1 counted right when the "
        "victim is among the earliest flagged",
    ),
    "downstream_first": (
        "downstream-first",
        "share flagged after the onset with a non-victim first",
    ),
    "fixed": ("fixed", "share where the deployable rule turned a wrong Stage 1 right"),
    "broke": ("broke", "share where it turned a right Stage 1 wrong"),
    "threshold_failures": ("threshold fail", "share with the first flag before the attack"),
    "misses": ("misses", "share with no flag at all"),
    "delay": ("delay", "mean steps from attack start to detection (detected at/after start)"),
    "fpr_clean": ("FPR clean", "share of clean episodes of the store with any flag"),
    "reward_acc": ("reward-drop", "baseline: earliest reward-drop flag (α-budget)"),
    "actdev_acc": ("action-dev", "baseline: earliest action-deviation z flag (α-budget)"),
    "chance": ("chance", "1/N"),
    "io_high_ge_low": ("IO hi≥lo", "Table 2: share of pairs, instability occupancy"),
    "qdrop_high_ge_low": ("Q-drop hi≥lo", "Table 2: share of pairs, observed agent's Q-drop"),
    "rdrop_high_ge_low": ("R-drop hi≥lo", "Table 2: share of pairs, team reward drop"),
    "pairs": ("pairs", "Table 2: (seed, victim, observed) pairs with both onsets"),
    "infected_precision": ("infected prec", "interventional: infected agents that diverged"),
    "infected_recall": ("infected rec", "interventional: diverged agents called infected"),
    "p0_first_diverged": (
        "P0 first div",
        "interventional: deployable Patient-0 among the first agents to diverge",
    ),
}


class Diagnosis(NamedTuple):
    path: Path
    summary: dict[str, Any]
    verdicts: pd.DataFrame
    scores: dict[str, np.ndarray]


def load_diagnosis(diag_dir: str | Path) -> Diagnosis:
    """A ``forensics diagnose`` output directory (one-line error if incomplete)."""
    d = Path(diag_dir)
    for name in (SUMMARY_FILE, VERDICTS_FILE, SCORES_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(
                f"{d}: no {name}; expected a `forensics diagnose` output directory"
            )
    summary = json.loads((d / SUMMARY_FILE).read_text())
    with np.load(d / SCORES_FILE) as f:
        scores = {k: f[k] for k in f.files}
    verdicts = pd.read_parquet(d / VERDICTS_FILE)
    ids = verdicts["episode_id"]
    if ids.duplicated().any():
        raise StoreError(
            f"{d / VERDICTS_FILE}: column 'episode_id', episode {ids[ids.duplicated()].iloc[0]}: "
            "has two verdicts; expected one per episode (re-run forensics diagnose)"
        )
    return Diagnosis(d, summary, verdicts, scores)


def coverage(diag: Diagnosis, store: EpisodeStore) -> dict[str, Any]:
    """How many of the episodes ``store``'s manifest lists the diagnosis has verdicts for,
    and whether that is fewer (chunks skipped by ``--allow-partial`` when diagnosing or now
    unreadable, or episodes appended after the diagnosis)."""
    listed = store.manifest_episodes
    have = set(diag.verdicts["episode_id"].tolist()) & set(
        store.ground_truth()["episode_id"].tolist()
    )
    return {
        "diagnosis": str(diag.path),
        "store": str(store.path),
        "episodes": len(have),
        "listed": listed,
        "partial": len(have) < listed,
    }


def _store_of(diag: Diagnosis, allow_partial: bool = False) -> EpisodeStore:
    store = open_store(
        diag.summary["store"]["path"], on_corrupt="skip" if allow_partial else "raise"
    )
    if store.meta.checkpoint["sha256"] != diag.summary["checkpoint"]["sha256"]:
        raise StoreError(
            f"{diag.path}: its store {store.path} now holds another checkpoint's episodes"
        )
    return store


# --------------------------------------------------------------------------- per episode


class Counterfactual(NamedTuple):
    """Per requested episode (in request order); rows without a clean partner are NaN/−1."""

    partner: np.ndarray  # [E] episode id of the clean partner, −1 if the store has none
    div_action: np.ndarray  # [E, N] first step its action differs (T = never)
    team_attacked: np.ndarray  # [E, T] Σ_i r_i^t of the episode
    team_clean: np.ndarray  # [E, T] the same in the counterfactual


def counterfactuals(
    store: EpisodeStore, episode_ids: np.ndarray, ground_truth: pd.DataFrame
) -> Counterfactual:
    """Pair each episode with the clean episode of the same replay key (its counterfactual)
    and measure the divergence and the team rewards of both (``ground_truth``: the store's,
    already read by the caller, says which episodes are clean)."""
    import jax.numpy as jnp

    from agents import rollout as R

    is_clean = ground_truth.set_index("episode_id")["clean"]
    fields = ["episode_id", "replay_key", "actions", "obs_true", "rewards", "valid"]
    clean: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for b in store.iter_batches(fields, 1024):
        for e in np.flatnonzero(is_clean.loc[b["episode_id"]].to_numpy()):
            clean[tuple(b["replay_key"][e].tolist())] = {k: b[k][e] for k in fields}
    position = pd.Index(np.asarray(episode_ids))
    spec = store.meta.env
    t_len, n = spec["episode_length"], spec["num_agents"]
    out = Counterfactual(
        np.full(len(position), -1),
        np.full((len(position), n), t_len),
        np.full((len(position), t_len), np.nan),
        np.full((len(position), t_len), np.nan),
    )
    as_episode = lambda x: R.Episode(  # divergence reads obs_true, actions and rewards only
        obs_true=jnp.asarray(x["obs_true"]),
        obs_perceived=None,
        actions=jnp.asarray(x["actions"]),
        clean_actions=None,
        critic_actions=None,
        rewards=jnp.asarray(x["rewards"]),
        avail=None,
        done=None,
        active=None,
        key=None,
        target=None,
    )
    team = lambda x: (x["rewards"] * x["valid"][..., None]).sum(-1)
    for b in store.iter_batches(fields, 1024):
        rows = position.get_indexer(b["episode_id"])
        partners = [clean.get(tuple(k.tolist())) for k in b["replay_key"]]
        keep = (rows >= 0) & np.asarray([p is not None for p in partners])
        if not keep.any():
            continue
        b = {k: v[keep] for k, v in b.items()}
        ref = {
            k: np.stack([p[k] for p, ok in zip(partners, keep, strict=True) if ok]) for k in fields
        }
        r = rows[keep]
        out.partner[r] = ref["episode_id"]
        out.div_action[r] = np.asarray(R.divergence(as_episode(b), as_episode(ref)).action)
        out.team_attacked[r] = team(b)
        out.team_clean[r] = team(ref)
    return out


def _row_of(ids: np.ndarray) -> dict[int, int]:
    return {int(i): r for r, i in enumerate(ids)}


def episode_table(diag: Diagnosis, store: EpisodeStore | None = None) -> pd.DataFrame:
    """One row per (attacked or clean episode, calibration): verdicts, ground truth, outcomes.
    ``store``: the diagnosed store, opened (default: complete, else an error)."""
    store = store if store is not None else _store_of(diag)
    gt = store.ground_truth()
    v = diag.verdicts.merge(gt.drop(columns=["seed"]), on="episode_id", how="left")
    if store.partial:  # --allow-partial: verdicts of episodes in unreadable chunks drop out
        v = v[v["clean"].notna()].reset_index(drop=True)
    if v["clean"].isna().any():
        raise StoreError(f"{diag.path}: verdicts name episodes that store {store.path} lacks")
    s = diag.scores
    row = _row_of(s["episode_id"])
    idx = np.asarray([row[int(i)] for i in v["episode_id"]])
    n_agents = int(diag.summary["env"]["num_agents"])
    attacked = ~v["clean"].to_numpy(bool)
    cf = counterfactuals(store, v["episode_id"].to_numpy(), gt)
    victim, start = v["victim"].to_numpy(), v["start"].to_numpy()
    window = v["window"].to_numpy()
    t_len = s["q"].shape[1]
    in_window = (np.arange(t_len)[None] >= start[:, None]) & (
        np.arange(t_len)[None] < (start + window)[:, None]
    )  # [E, T]
    safe_v = np.maximum(victim, 0)
    frames = []
    for cal in CALIBRATIONS:
        f = pd.DataFrame(
            {
                "episode_id": v["episode_id"],
                "seed": v["seed"],
                "clean": v["clean"],
                "attack": v["attack"],
                "influence": v["influence"],
                "victim": victim,
                "observed": v["observed"],
                "start": start,
                "status": v["status"],
                "calibration": cal,
            }
        )
        cand, t_det = v[f"{cal}_candidate"].to_numpy(), v[f"{cal}_t_det"].to_numpy()
        after = (t_det >= 0) & (t_det >= start)
        agent_t = np.stack(v[f"{cal}_agent_t_det"].to_numpy())  # [E, N]
        first = np.where(agent_t >= 0, agent_t, np.iinfo(np.int32).max)
        victim_first = first[np.arange(len(v)), safe_v] == first.min(axis=1)
        f["any_flag"] = (agent_t >= 0).any(axis=1)
        f["stage1"] = after & (cand == victim)
        f["deployable"] = after & (v[f"{cal}_deployable"].to_numpy() == victim)
        f["stage2"] = after & (v[f"{cal}_stage2"].to_numpy() == victim)
        lenient = after & victim_first
        f["oracle_gated"] = lenient | (~lenient & f["stage2"])
        f["downstream_first"] = after & (cand != victim)
        f["threshold_failure"] = (t_det >= 0) & (t_det < start)
        f["miss"] = t_det < 0
        f["delay"] = np.where(after, t_det - start, np.nan)
        for base in ("reward", "actdev"):
            bt = v[f"{base}_t_det"].to_numpy()
            f[base] = (bt >= 0) & (bt >= start) & (v[f"{base}_candidate"].to_numpy() == victim)
            f[f"{base}_any_flag"] = bt >= 0
        z = s[f"z_{cal}"][idx]  # [E, T, N]
        watch = s[f"{cal}_watch"]
        above = z[np.arange(len(v)), :, safe_v] > watch[safe_v][:, None]
        f["io"] = np.where(attacked, (above & in_window).sum(1) / np.maximum(window, 1), np.nan)
        infected = v[f"{cal}_infected"].to_numpy()
        f["infected"] = infected
        f["p0"] = v[f"{cal}_deployable"].to_numpy()
        frames.append(f)
    out = pd.concat(frames, ignore_index=True)
    # calibration-independent: Q-drop and reward drop against the counterfactual
    q = s["q"][idx]  # [E, T, N]
    observed = np.maximum(v["observed"].to_numpy(), 0)
    partner_row = pd.Index(v["episode_id"]).get_indexer(cf.partner)
    has = attacked & (cf.partner >= 0) & (partner_row >= 0)
    q_obs = q[np.arange(len(v)), :, observed]  # [E, T] the observed agent's Q
    partner_q = q[np.maximum(partner_row, 0), :, observed]  # the same agent, counterfactual
    after_start = np.arange(t_len)[None] >= start[:, None]
    qdrop = np.sum((partner_q - q_obs) * in_window, 1) / np.maximum(in_window.sum(1), 1)
    rdrop = np.nansum((cf.team_clean - cf.team_attacked) * after_start, 1)
    per_episode = pd.DataFrame(
        {
            "qdrop": np.where(has, qdrop, np.nan),
            "rdrop": np.where(has, rdrop, np.nan),
            "div_action": [
                d.tolist() if h else None for d, h in zip(cf.div_action, has, strict=True)
            ],
        }
    )
    out = pd.concat([out, pd.concat([per_episode] * len(CALIBRATIONS), ignore_index=True)], axis=1)
    out.attrs["num_agents"] = n_agents
    out.attrs["episode_length"] = t_len
    return out


# --------------------------------------------------------------------------- aggregate


def _mean(x: pd.Series) -> float:
    return float(np.mean(x)) if len(x) else np.nan


def _high_ge_low(g: pd.DataFrame, col: str) -> tuple[float, int]:
    """Share of (seed, victim, observed) pairs with col(high) ≥ col(low), and the pair count."""
    pivot = g[g["influence"].isin(["high", "low"])].pivot_table(
        index=["seed", "victim", "observed"], columns="influence", values=col, aggfunc="first"
    )
    if not {"high", "low"} <= set(pivot.columns):
        return np.nan, 0
    both = pivot[["high", "low"]].dropna()
    return (float(np.mean(both["high"] >= both["low"])) if len(both) else np.nan), len(both)


def _interventional(g: pd.DataFrame, t_len: int) -> dict[str, float]:
    prec, rec, first = [], [], []
    for infected, div, p0 in zip(g["infected"], g["div_action"], g["p0"], strict=True):
        if div is None or not isinstance(div, list | np.ndarray):
            continue
        div = np.asarray(div)
        diverged = set(np.flatnonzero(div < t_len).tolist())
        called = set(np.asarray(infected).tolist())
        if called:
            prec.append(len(called & diverged) / len(called))
        if diverged:
            rec.append(len(called & diverged) / len(diverged))
            first.append(p0 >= 0 and div[p0] == div.min())
    return {
        "infected_precision": _mean(pd.Series(prec, dtype=float)),
        "infected_recall": _mean(pd.Series(rec, dtype=float)),
        "p0_first_diverged": _mean(pd.Series(first, dtype=float)),
    }


def _row(g: pd.DataFrame, fpr: Mapping[str, float], n_agents: int, t_len: int) -> dict:
    ok = g[g["status"] == "ok"]
    n = len(ok)
    acc = _mean(ok["deployable"])
    row = {
        "episodes": n,
        "deployable_acc": acc,
        "deployable_ci95": 1.96 * np.sqrt(acc * (1 - acc) / n) if n else np.nan,
        "stage1_acc": _mean(ok["stage1"]),
        "stage2_acc": _mean(ok["stage2"]),
        "oracle_gated_acc": _mean(ok["oracle_gated"]),
        "downstream_first": _mean(ok["downstream_first"]),
        "fixed": _mean(~ok["stage1"] & ok["deployable"]),
        "broke": _mean(ok["stage1"] & ~ok["deployable"]),
        "threshold_failures": _mean(ok["threshold_failure"]),
        "misses": _mean(ok["miss"]),
        "delay": float(ok["delay"].mean()) if ok["delay"].notna().any() else np.nan,
        "fpr_clean": fpr["stage1"],
        "reward_acc": _mean(ok["reward"]),
        "actdev_acc": _mean(ok["actdev"]),
        "chance": 1.0 / n_agents,
        "fpr_reward": fpr["reward"],
        "fpr_actdev": fpr["actdev"],
    }
    for col, name in (("io", "io"), ("qdrop", "qdrop"), ("rdrop", "rdrop")):
        row[f"{name}_high_ge_low"], pairs = _high_ge_low(ok, col)
        row.setdefault("pairs", pairs)  # pairs of the occupancy comparison (all recorded pairs)
    row.update(_interventional(ok, t_len))
    return row


def metrics_table(episodes: pd.DataFrame, env: str, algo: str) -> pd.DataFrame:
    """The accuracy table of one diagnosis: a row per attack × influence class × calibration,
    plus an ``all`` row per attack × calibration."""
    n_agents = episodes.attrs["num_agents"]
    t_len = episodes.attrs["episode_length"]
    rows = []
    for cal, by_cal in episodes.groupby("calibration", sort=False):
        clean = by_cal[by_cal["clean"] & (by_cal["status"] == "ok")]
        fpr = {
            "stage1": _mean(clean["any_flag"]),
            "reward": _mean(clean["reward_any_flag"]),
            "actdev": _mean(clean["actdev_any_flag"]),
        }
        hit = by_cal[~by_cal["clean"]]
        for attack, by_attack in hit.groupby("attack", sort=True):
            groups = [(c, g) for c, g in by_attack.groupby("influence", sort=True)]
            for influence, g in [*groups, ("all", by_attack)]:
                keys = {
                    "env": env,
                    "algo": algo,
                    "N": n_agents,
                    "attack": attack,
                    "influence": influence,
                    "calibration": cal,
                }
                rows.append({**keys, **_row(g, fpr, n_agents, t_len)})
        if hit.empty:  # a clean-only store still reports its false-alarm rate
            rows.append(
                {
                    "env": env,
                    "algo": algo,
                    "N": n_agents,
                    "attack": "none",
                    "influence": "none",
                    "calibration": cal,
                    "episodes": 0,
                    "fpr_clean": fpr["stage1"],
                    "fpr_reward": fpr["reward"],
                    "fpr_actdev": fpr["actdev"],
                    "chance": 1.0 / n_agents,
                }
            )
    return pd.DataFrame(rows)


def statistic_label(config: Mapping[str, Any]) -> str:
    """The Stage-1 instrument of a diagnosis, e.g. ``cost(taken)@obs_true w1`` (ours) or
    ``paper(greedy)@obs_perceived w5`` (the paper's): rows of different instruments differ."""
    s1 = config["stage1"]
    return f"{s1['probe']}({s1['target']})@{config['observations']} w{s1['window']}"


def evaluate(diag_dirs: Sequence[str | Path], allow_partial: bool = False) -> pd.DataFrame:
    """The accuracy table over every diagnosis directory (one block per env × algo × N).

    A diagnosis that covers fewer episodes than its store lists (see ``coverage``), or a
    store with an unreadable chunk, is a ``StoreError`` unless ``allow_partial``; the
    table's ``attrs["coverage"]`` holds each diagnosis's coverage either way."""
    tables, covered = [], []
    for d in diag_dirs:
        diag = load_diagnosis(d)
        store = _store_of(diag, allow_partial)
        cov = coverage(diag, store)
        if cov["partial"] and not allow_partial:
            raise StoreError(
                f"{diag.path}: has verdicts for {cov['episodes']:,} of the {cov['listed']:,} "
                f"episodes store {store.path} lists; re-run forensics diagnose on the complete "
                "store, or pass --allow-partial for a table of those episodes only"
            )
        covered.append(cov)
        env = diag.summary["env"]
        name = f"{env['name']}{'_cont' if env.get('continuous') else ''}"
        if env.get("map_name"):
            name = f"{env['name']}_{env['map_name']}"
        table = metrics_table(episode_table(diag, store), name, diag.summary["algo"])
        table.insert(3, "statistic", statistic_label(diag.summary["config"]))
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    table = table.sort_values(list(GROUP), kind="stable", ignore_index=True)
    table.attrs["coverage"] = covered
    return table


# --------------------------------------------------------------------------- formatting


def _fmt(col: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    if col in ("episodes", "pairs", "N"):
        return f"{int(value):,}"
    if col == "delay":
        return f"{value:.2f}"
    return f"{100 * value:.1f}"


def markdown(table: pd.DataFrame, columns: Iterable[str] | None = None) -> str:
    """The table as GitHub markdown (rates in %), with a legend of every column."""
    cols = [*GROUP, *(columns or COLUMNS)]
    header = [c if c in GROUP else COLUMNS[c][0] for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(_fmt(c, r.get(c)) for c in cols) + " |")
    legend = [f"- **{COLUMNS[c][0]}**: {COLUMNS[c][1]}" for c in cols if c in COLUMNS]
    note = (
        "Rates in %. The deployable accuracy is our claim; the oracle-gated column "
        "reproduces the paper's protocol, which runs Stage 2 only on episodes that the "
        "ground truth marks as Stage-1 failures, and is not achievable without the answer."
    )
    return "\n".join([*lines, "", note, "", *legend]) + "\n"


# --------------------------------------------------------------------------- long format
# DESIGN.md "Results as data": one row per figure. Every instrument's verdict is judged the same
# way: a candidate (−1 = "no failure found"), its detection step and an episode score (the ROC
# statistic: alarm iff above the instrument's calibrated operating point).

LONG_COLUMNS = (
    "env", "algo", "n_agents", "fault", "setting", "instrument", "subset", "metric", "value",
    "ci95", "episodes", "command", "commit",
)  # fmt: skip
TEAMMATE_LABEL = "teammate (Kazari et al.)"
TODAY_LABEL = "stage1+stage2 (old default)"


def wilson_half_width(k: int, n: int, z: float = 1.96) -> float:
    """Half-width of the Wilson 95 % interval of a proportion k/n (sane at 0 % and 100 %,
    where the normal approximation claims a zero-width interval)."""
    if n == 0:
        return np.nan
    p = k / n
    denom = 1 + z**2 / n
    return float(z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom)


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """AUC = P(score_pos > score_neg) + ½ P(=) (Mann–Whitney) and its 95 % half-width from the
    Hanley–McNeil variance."""
    if len(pos) == 0 or len(neg) == 0:
        return np.nan, np.nan
    both = np.concatenate([pos, neg])
    ranks = pd.Series(both).rank(method="average").to_numpy()
    n1, n0 = len(pos), len(neg)
    auc = (ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0)
    return float(auc), float(1.96 * np.sqrt(max(var, 0.0)))


def bootstrap_quantile(x: np.ndarray, q: float, reps: int = 1000, seed: int = 0):
    """(the q-quantile of x, the half-width of its 95 % percentile-bootstrap interval)."""
    if len(x) == 0:
        return np.nan, np.nan
    rng = np.random.default_rng(seed)
    boot = np.quantile(rng.choice(x, (reps, len(x))), q, axis=1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(np.quantile(x, q)), float((hi - lo) / 2)


def instrument_columns(diag: Diagnosis) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Instrument → (candidate, t_det, episode score) per verdict row, for every instrument the
    diagnosis holds: the default verdict, each log-only instrument, the teammate peer, the old
    default (Stage 1 + deployable Stage 2, scored by its max z) and Stage 1 alone."""
    v, s = diag.verdicts, diag.scores
    row = _row_of(s["episode_id"])
    idx = np.asarray([row[int(i)] for i in v["episode_id"]])
    z_max = s["z_budget"][idx].max(axis=(1, 2))
    out = {
        TODAY_LABEL: (v["budget_deployable"].to_numpy(), v["budget_t_det"].to_numpy(), z_max),
        "stage1": (v["budget_candidate"].to_numpy(), v["budget_t_det"].to_numpy(), z_max),
    }
    lo = diag.summary.get("logonly") or {}
    for group in lo.get("groups", {}):
        label = "verdict" if group == "verdict" else group
        label = TEAMMATE_LABEL if group == "teammate" else label
        out[label] = tuple(v[f"lo_{group}_{k}"].to_numpy() for k in ("candidate", "t_det", "score"))
    if "verdict" not in out:  # no log-only verdict: the default decision is the old one
        out["verdict"] = out[TODAY_LABEL]
    return dict(sorted(out.items(), key=lambda kv: kv[0] != "verdict"))


def impactful(store: EpisodeStore, gt: pd.DataFrame, ids: np.ndarray) -> np.ndarray:
    """The victim's action changed inside the window and the team return fell below the paired
    clean episode's (DESIGN.md "Results as data"); False without a clean partner."""
    g = gt.set_index("episode_id").loc[ids]
    cf = counterfactuals(store, ids, gt)
    victim, start = g["victim"].to_numpy(), g["start"].to_numpy()
    end = start + g["window"].to_numpy()
    first = cf.div_action[np.arange(len(ids)), np.maximum(victim, 0)]
    changed = (first >= start) & (first < end)
    hurt = np.nansum(cf.team_attacked, 1) < np.nansum(cf.team_clean, 1)
    return (~g["clean"].to_numpy(bool)) & (cf.partner >= 0) & changed & hurt


def fault_label(store: EpisodeStore, attack: str) -> str:
    """The attack config name, plus every setting the store was recorded with that differs
    from that config's defaults (configs/attack/<name>.yaml), e.g. ``obs_bias(offset=0.05)``:
    a variant of a fault gets rows of its own."""
    import yaml

    import configs

    default_file = Path(configs.__file__).parent / "attack" / f"{attack}.yaml"
    recorded = store.meta.config.get("attack", {})
    if not default_file.is_file() or recorded.get("name") != attack:
        return attack
    default = yaml.safe_load(default_file.read_text()) or {}
    diff = [f"{k}={recorded[k]}" for k in sorted(recorded) if recorded[k] != default.get(k)]
    label = f"{attack}({', '.join(diff)})" if diff else attack
    return label.replace("'", "")


def long_rows(diag: Diagnosis, command: str, commit: str) -> list[dict[str, Any]]:
    """The long-format figures of one diagnosis: per fault × instrument × subset, Patient-0
    accuracy (strict: names the victim at or after the onset), clean FPR, ROC AUC (attacked of
    the subset vs the store's clean episodes, on the episode score), delay median and p90 (over
    the episodes detected at or after the onset), each with its 95 % half-width; chance rows."""
    store = _store_of(diag)
    gt = store.ground_truth()
    ids = diag.verdicts["episode_id"].to_numpy()
    g = gt.set_index("episode_id").loc[ids]
    clean = g["clean"].to_numpy(bool)
    victim, start = g["victim"].to_numpy(), g["start"].to_numpy()
    hit = impactful(store, gt, ids)
    env = diag.summary["env"]
    name = env["name"] if not env.get("map_name") else f"{env['name']}_{env['map_name']}"
    n = int(diag.summary["env"]["num_agents"])
    attacks = sorted(set(g["attack"][~clean])) or ["none"]
    base = {"env": name, "algo": diag.summary["algo"], "n_agents": n, "setting": "log-only",
            "command": command, "commit": commit}  # fmt: skip
    rows = []

    def add(fault, inst, subset, metric, value, ci, episodes):
        label = fault_label(store, fault) if fault != "none" else fault
        keys = {"fault": label, "instrument": inst, "subset": subset, "metric": metric}
        rows.append({**base, **keys, "value": value, "ci95": ci, "episodes": int(episodes)})

    for inst, (cand, t_det, score) in instrument_columns(diag).items():
        alarm = cand >= 0
        k0, n0 = int(alarm[clean].sum()), int(clean.sum())
        for attack in attacks:
            add(attack, inst, "all", "fpr", 100 * k0 / max(n0, 1),
                100 * wilson_half_width(k0, n0), n0)  # fmt: skip
            if attack == "none":
                continue
            for subset, sel in (("all", ~clean), ("impactful", hit)):
                sel = sel & (g["attack"].to_numpy() == attack)
                m = int(sel.sum())
                ok = sel & alarm & (t_det >= start) & (cand == victim)
                k = int(ok.sum())
                add(attack, inst, subset, "patient0", 100 * k / max(m, 1),
                    100 * wilson_half_width(k, m), m)  # fmt: skip
                auc, ci = roc_auc(score[sel], score[clean])
                add(attack, inst, subset, "auc", 100 * auc, 100 * ci, m)
                det = sel & alarm & (t_det >= start)
                delays = (t_det - start)[det].astype(float)
                for metric, q in (("delay_median", 0.5), ("delay_p90", 0.9)):
                    value, ci = bootstrap_quantile(delays, q)
                    add(attack, inst, subset, metric, value, ci, len(delays))
    for attack in attacks:
        if attack != "none":
            for subset, sel in (("all", ~clean), ("impactful", hit)):
                m = int((sel & (g["attack"].to_numpy() == attack)).sum())
                add(attack, "chance", subset, "patient0", 100 / n, 0.0, m)
                add(attack, "chance", subset, "auc", 50.0, 0.0, m)
    if "lo_fault_class" in diag.verdicts:
        right = (diag.verdicts["lo_verdict_candidate"].to_numpy() == victim) & (
            diag.verdicts["lo_verdict_t_det"].to_numpy() >= start
        )
        for attack in attacks:
            if attack != "none":
                for row in fault_class_rows(store, diag.verdicts, attack, right, hit, clean, g):
                    add(attack, "verdict", *row)
    return rows


def fault_class_rows(store, verdicts, attack, right, hit, clean, g) -> list[tuple]:
    """(subset, metric, value, ci95, episodes) of the fault-class call on the episodes whose
    Patient-0 was found (so the class describes the faulty agent): ``fault_class_accuracy``
    (sensor faults → "sensor"; actuator and parameter faults → "action": the log cannot tell
    those two apart, ``forensics.logonly.fault_class``), the confusion shares
    ``called_sensor`` / ``called_action``, and for a sensor fault on named feature groups
    ``feature_group_accuracy`` (the most inconsistent reading against its clean level, the
    top of ``lo_reading_ratio``, is one of them)."""
    from agents.attacks import FAULT_CLASS

    truth = "sensor" if FAULT_CLASS.get(attack) == "sensor" else "action"
    called = verdicts["lo_fault_class"].to_numpy().astype(str)
    top = verdicts["lo_top_reading"].to_numpy().astype(str)
    features = store.meta.config.get("attack", {}).get("features", "all")
    out = []
    for subset, sel in (("all", ~clean), ("impactful", hit)):
        sel = sel & right & (g["attack"].to_numpy() == attack)
        m = int(sel.sum())
        for metric, ok in (
            ("fault_class_accuracy", called == truth),
            ("called_sensor", called == "sensor"),
            ("called_action", called == "action"),
        ):
            k = int((sel & ok).sum())
            out.append((subset, metric, 100 * k / max(m, 1), 100 * wilson_half_width(k, m), m))
        if truth == "sensor" and features != "all":
            k = int((sel & np.isin(top, list(features))).sum())
            out.append((subset, "feature_group_accuracy", 100 * k / max(m, 1),
                        100 * wilson_half_width(k, m), m))  # fmt: skip
    return out


def long_table(diag_dirs: Sequence[str | Path], command: str, commit: str) -> pd.DataFrame:
    """``long_rows`` of every diagnosis, columns ``LONG_COLUMNS``."""
    rows = [r for d in diag_dirs for r in long_rows(load_diagnosis(d), command, commit)]
    return pd.DataFrame(rows, columns=list(LONG_COLUMNS))


def long_markdown(table: pd.DataFrame) -> str:
    """A readable view of the long table: per fault and instrument one line, impactful and all
    side by side (value ± 95 %)."""
    fmt = lambda v, c, d=1: "—" if pd.isna(v) else f"{v:.{d}f} ± {c:.{d}f}"
    keys = table[["env", "algo", "n_agents", "setting"]].drop_duplicates()
    lines = [
        "Log-only forensics: "
        + "; ".join(f"{r.env} N={r.n_agents} {r.algo}, {r.setting}" for r in keys.itertuples())
        + f". Commit {table['commit'].iloc[0][:12]}."
        if len(table)
        else "",
        "",
        "Rates and AUC in %, each ± its 95 % half-width (Wilson for rates, Hanley–McNeil for AUC, "
        "percentile bootstrap for the delays). P0 = strict Patient-0 accuracy (the verdict "
        "names the victim at or after the onset); impactful = the victim's action changed "
        "inside the window and the team return fell below the paired clean episode's; FPR = "
        "share of the store's clean episodes with any alarm; AUC = attacked vs clean on the "
        "episode score; delays in steps over the episodes detected at or after the onset, "
        "impactful ones. `verdict` = the fused log-only decision (diagnose's default).",
        "",
        "| fault | instrument | P0 impactful (n) | P0 all (n) | FPR clean | AUC impactful | "
        "AUC all | delay median | delay p90 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    t = table.set_index(["fault", "instrument", "subset", "metric"])

    def cell(key: tuple, digits: int = 1, count: bool = False) -> str:
        if key not in t.index:
            return "—"
        r = t.loc[key]
        text = fmt(r["value"], r["ci95"], digits)
        return f"{text} ({int(r['episodes'])})" if count else text

    for (fault, inst), _ in table.groupby(["fault", "instrument"], sort=False):
        k = lambda sub, met, f=fault, i=inst: (f, i, sub, met)
        cells = [
            cell(k("impactful", "patient0"), count=True),
            cell(k("all", "patient0"), count=True),
            cell(k("all", "fpr")),
            cell(k("impactful", "auc")),
            cell(k("all", "auc")),
            cell(k("impactful", "delay_median")),
            cell(k("impactful", "delay_p90")),
        ]
        lines.append(f"| {fault} | {inst} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
