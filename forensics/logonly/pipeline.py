"""Glue between stores, checkpoints and the log-only instruments: ``fit-models`` and the
log-only part of ``diagnose``. No ground truth is read on the scoring path: the scored store is
read through ``SCORED_FIELDS`` and the clean selection of the fit and calibration stores uses
their ``clean`` column only (those stores are references, not the episodes being judged)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forensics.logonly import fault_class as FC
from forensics.logonly import instruments as I
from forensics.logonly import models as M
from forensics.logonly import verdict as V
from forensics.store import (
    EpisodeStore,
    StoreError,
    checkpoint_identity,
    load_clean,
    open_store,
    pad_batch,
    split_batches,
)

SCORED_FIELDS = ("episode_id", "seed", "valid", "obs_perceived", "actions")


def store_columns(store: EpisodeStore) -> set[str]:
    return {c.name for c in store.meta.columns}


def statics(policy: Any, available: tuple[str, ...], hidden=(64, 64)) -> tuple[I.Statics, Any]:
    """The jit-static description and the actor params of a loaded policy."""
    from agents.forensic_networks import forensic_networks

    spec = policy.env.spec
    nets = forensic_networks(policy)
    st = I.Statics(nets.actor_apply, spec.discrete, spec.action_dim, available, tuple(hidden))
    return st, nets.actor_params


def _fields(store: EpisodeStore, base: tuple[str, ...]) -> tuple[str, ...]:
    return base + (("avail",) if "avail" in store_columns(store) else ())


def fit_and_save(
    run_dir: str | Path, clean_path: str | Path, out: str | Path, cfg: M.FitConfig
) -> dict[str, Any]:
    """Fit every available model on the clean episodes of ``clean_path`` (recorded by the
    newest checkpoint of ``run_dir``) and save them to ``out``; returns the meta."""
    from agents import checkpoint
    from forensics.diagnose import check_store

    policy = checkpoint.load_policy(run_dir)
    ckpt = checkpoint.policy_item(policy)
    ident = checkpoint_identity(ckpt)
    store = open_store(clean_path, on_corrupt="skip")
    spec = policy.env.spec
    check_store(store, "fit store", spec, ckpt, ident)
    avail = I.availability(
        spec.num_agents,
        spec.episode_length,
        spec.discrete,
        store_columns(store),
        set(I.INSTRUMENTS),
    )
    available = tuple(k for k, why in avail.items() if why is None)
    st, actor = statics(policy, available, cfg.teammate_hidden)
    clean = load_clean(store, _fields(store, M.FIT_FIELDS))
    models, report = M.fit_models(clean, st, actor, cfg)
    report["unavailable"] = {k: why for k, why in avail.items() if why is not None}
    meta = M.build_meta(
        cfg, report, ident, dataclasses.asdict(spec), store, clean["seed"], available
    )
    meta["data"]["seeds"] = np.unique(clean["seed"]).tolist()
    M.save(Path(out), models, meta)
    return meta


def diagnose(
    inputs: Any,
    models_path: str | Path | None,
    clean: Mapping[str, np.ndarray],
    scored_seeds: np.ndarray,
    batch: int,
    alpha: float,
) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    """The log-only verdicts of every episode of ``inputs.store`` (``forensics.diagnose``'s
    Inputs), calibrated on ``clean`` (the calibration store's clean episodes). Returns
    (columns or None when nothing can run, summary with each instrument's availability)."""
    spec = inputs.policy.env.spec
    models, meta = (None, None) if models_path is None else M.load(models_path)
    if meta is not None:
        for s in (inputs.store, inputs.calibration):
            M.check_models(meta, Path(models_path), inputs.checkpoint, dataclasses.asdict(spec), s)
        fit_seeds = np.asarray(meta["data"].get("seeds", []), np.int64)
        for what, seeds in (("scored store", scored_seeds), ("calibration store", clean["seed"])):
            shared = np.intersect1d(fit_seeds, seeds)
            if shared.size:
                raise StoreError(
                    f"models {models_path}: fitted on {shared.size} seed(s) of the {what} "
                    f"(e.g. seed {shared[0]}); fit, calibrate and score on disjoint seeds"
                )
    columns = store_columns(inputs.store) & store_columns(inputs.calibration)
    fitted = None if meta is None else set(meta["instruments"])
    avail = I.availability(spec.num_agents, spec.episode_length, spec.discrete, columns, fitted)
    available = tuple(k for k, why in avail.items() if why is None)
    summary: dict[str, Any] = {
        "models": None if models_path is None else str(Path(models_path).resolve()),
        "availability": {k: why or "available" for k, why in avail.items()},
        "alpha": alpha,
    }
    if not available:
        return None, summary
    hidden = tuple(meta["config"]["teammate_hidden"])
    st, actor = statics(inputs.policy, available, hidden)
    masks = ("avail",) if "avail" in columns else ()
    keep = ("episode_id", "valid", "obs_perceived", "actions", *masks)
    t0 = time.perf_counter()
    clean_only = {k: clean[k] for k in keep}
    cal = V.calibrate(st, actor, models, split_batches(clean_only, batch), batch, alpha)
    t_cal = time.perf_counter() - t0
    t0 = time.perf_counter()
    explain = None
    if V.VERDICT in cal.groups and set(FC.SENSOR) & set(cal.groups[V.VERDICT]):
        explain = fault_class_explainer(st, models, cal, clean_only, batch, spec, alpha)
    out, timings = V.score(
        st,
        actor,
        models,
        cal,
        inputs.store.iter_batches(SCORED_FIELDS + masks, batch),
        batch,
        explain,
    )
    summary.update(
        {
            "groups": cal.to_json(),
            "clean_episodes": cal.clean_episodes,
            "fit": {"data": meta["data"] | {"seeds": None}, "report": meta["report"]},
            "timings": {"calibrate_s": t_cal, "score_s": time.perf_counter() - t0, **timings},
        }
    )
    return out, summary


def fault_class_explainer(st, models, cal, clean, size: int, spec, alpha: float, window=5):
    """``V.score``'s explain hook: the fault class and inconsistent readings of each fused
    verdict (``forensics.logonly.fault_class``), the group thresholds fitted on ``clean``."""
    import jax.numpy as jnp

    from envs import layout

    names, masks = FC.group_masks(layout(spec), spec.obs_dim)
    masks = jnp.asarray(masks)

    def groups_of(b):
        p = pad_batch(b, size)  # a batch from V.score is already padded: no copy
        return FC.group_scores(
            models, p["obs_perceived"], p["actions"], p["valid"], masks,
            discrete=st.discrete, action_dim=st.action_dim,
        )  # fmt: skip

    clean_max = np.concatenate(
        [
            np.asarray(jnp.max(groups_of(b), axis=(2, 3))).swapaxes(0, 1)[: len(b["valid"])]
            for b in split_batches(clean, size)
        ]
    )
    h_groups = FC.group_thresholds(clean_max, alpha)
    cols = cal.columns[V.VERDICT]
    inst_of, agent_of = FC.side_codes(cal.names, cols), cal.agent_of[cols]

    def explain(x, valid, b, n, candidate, t_det):
        code, margin, sensor, action = FC.side(
            x[..., cols], cal.h[V.VERDICT], inst_of, agent_of, candidate, t_det, valid,
            window=window,
        )  # fmt: skip
        ratio = np.asarray(
            FC.inconsistent_groups(groups_of(b), h_groups, candidate, t_det, valid, window=window)
        )[:n]
        return {
            "fault_class": np.asarray(FC.CLASSES)[np.asarray(code)[:n]],
            "fault_class_margin": np.asarray(margin)[:n],
            "sensor_ratio": np.asarray(sensor)[:n],
            "action_ratio": np.asarray(action)[:n],
            "readings": np.asarray([";".join(r) for r in FC.readings(ratio, names)], dtype=object),
            "top_reading": np.where(
                np.asarray(candidate)[:n] >= 0, np.asarray(names)[np.argmax(ratio, axis=1)], ""
            ),
            "reading_ratio": ratio,
        }

    return explain


def add_verdicts(
    verdicts: pd.DataFrame,
    inputs: Any,
    models: str | Path | None,
    clean: Mapping[str, np.ndarray],
    scored_seeds: np.ndarray,
    batch: int,
    alpha: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Add the log-only columns ``lo_<group>_{candidate,t_det,score,agent_t_det}`` and the
    default decision ``verdict_{candidate,t_det,score}``: the fused log-only verdict when the
    models are given and it can run, else Stage 1 + the deployable Stage 2 (``budget``)."""
    cols, summary = diagnose(inputs, models, clean, scored_seeds, batch, alpha)
    for name, why in summary["availability"].items():
        if why != "available":
            log(f"log-only instrument {name}: unavailable: {why}")
    if cols is not None:
        row = pd.Index(cols["episode_id"]).get_indexer(verdicts["episode_id"])
        for k, v in cols.items():
            if k != "episode_id":
                v = v[row]
                verdicts[f"lo_{k}"] = [r.tolist() for r in v] if v.ndim > 1 else v
    fused = cols is not None and "verdict_candidate" in cols
    src = "lo_verdict" if fused else "budget_deployable"
    verdicts["verdict_candidate"] = verdicts[f"{src}_candidate" if fused else src]
    verdicts["verdict_t_det"] = verdicts["lo_verdict_t_det" if fused else "budget_t_det"]
    summary["verdict"] = "log-only fused" if fused else "stage1+stage2 (budget, deployable)"
    return summary
