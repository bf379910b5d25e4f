"""Diagnose speed: Stage 1 + Stage 2 of ``forensics.diagnose`` (``measure`` + ``decide_all``,
jitted over batches of episodes × steps × agents) vs a naive per-step, per-agent loop.

* jitted: ``forensics.diagnose.calibrate`` on the clean calibration store, then
  ``score_batches`` over every episode of the scored store (``measure``: the Stage-1
  statistic, its rolling mean, the critic geometry G, D, S, X, Q values, baselines and edge
  evidence; ``decide_all``: onsets, candidates, both tracebacks, contagion weights, for both
  calibrations and both baselines). Compilation is timed apart: ``measure`` as the first
  ``calibrate`` − a second, warm one; ``decide_all`` as the first scored batch − the mean
  later batch. Steady state = the scored batches after the first (store reads included:
  ``score_batches`` reads batch k + 1 while the device computes batch k).
* naive: for each episode, step and agent a jitted single-sample call of the Stage-1
  statistic (``stage1._agent_step_score``, the function ``stage1_scores`` vmaps), and for
  each (step, critic j, agent i) one jitted single-sample call computing g = ∇_a Q_j by
  ``jax.grad`` and H g by one forward-over-reverse HVP, giving G_ji = ‖g_i‖ and
  D_ji = −g_iᵀ (H g_i)_i — no vmap over episodes, steps or agents. It computes less than
  ``measure`` (no S, X, Q, baselines, nor any decision), so the ratio is a lower bound. Its
  compilation is excluded; it runs on the first ``--naive-episodes`` episodes and is
  extrapolated per episode. Its raw statistic, G and D must equal ``measure``'s (allclose).

The paper's Stage-1 probe (``forensics=paper_pooled``: |L(η)| with a gradient and a second cost
evaluation per agent-step) is the benchmarked one; the default config (``probe=cost``) is
timed on the jitted path as well.

    .venv/bin/python scripts/benchmark_diagnose.py [--store S --calibration C [--run R]]
    .venv/bin/python scripts/benchmark_diagnose.py --seeds 100 --calib-seeds 100

Without ``--store`` both stores are recorded first with ``cli.recording.record`` into a
temporary directory: the paired worst-action protocol on seeds 0..S−1 and clean episodes
(``attack=none``) on seeds 10000.. (disjoint); the checkpoint is chosen as in
``benchmark_rollout.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agents import checkpoint
from cli import recording
from cli.hydra_entry import compose_config
from forensics import diagnose as dg
from forensics.stage1 import _agent_step_score, random_probe_directions, rolling_mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_rollout import benchmark_policy, describe  # noqa: E402

CALIB_SEED0 = 10_000  # calibration seeds start here: disjoint from the scored 0..S−1
CONFIGS = {"paper": "forensics=paper_pooled", "default": "forensics=default"}


# ------------------------------------------------------------------ stores
def build_stores(
    tmp: Path, policy: checkpoint.Policy, seeds: int, calib_seeds: int, chunk_seeds: int
) -> tuple[Path, Path, float]:
    """Record the paired protocol (seeds 0..S−1) and a clean calibration store; wall s."""
    t0 = time.perf_counter()
    stores = {}
    for name, overrides, first, count in (
        ("paired", [], 0, seeds),
        ("clean", ["attack=none"], CALIB_SEED0, calib_seeds),
    ):
        config = recording.rollout_config(overrides, policy.config, policy.run_dir)
        stores[name] = tmp / name
        recording.record(stores[name], policy, config, np.arange(first, first + count), chunk_seeds)
    return stores["paired"], stores["clean"], time.perf_counter() - t0


def diagnose_config(name: str, batch_episodes: int | None) -> dg.DiagnoseConfig:
    overrides = [CONFIGS[name]]
    if batch_episodes is not None:
        overrides.append(f"forensics.batch_episodes={batch_episodes}")
    return dg.DiagnoseConfig.from_mapping(compose_config(overrides)["forensics"])


def fields_of(cfg: dg.DiagnoseConfig) -> tuple[str, ...]:
    """What diagnose reads from the scored store, with the configured observations."""
    return tuple(
        dict.fromkeys(f if f != "obs_perceived" else cfg.observations for f in dg.SCORED_FIELDS)
    )


# ------------------------------------------------------------------ jitted path
def time_jitted(
    cfg: dg.DiagnoseConfig, store: Path, calibration: Path, run: Path
) -> tuple[dict[str, Any], dg.Model]:
    inputs = dg.open_inputs(store, run, calibration, cfg.stage1)
    fields = fields_of(cfg)
    clean = dg.load_clean(inputs.calibration, fields)
    dg.check_disjoint(
        np.concatenate([b["seed"] for b in inputs.store.iter_batches(["seed"], 1 << 16)]),
        clean["seed"],
        calibration,
    )
    key = jax.random.PRNGKey(cfg.probe_seed)
    t0 = time.perf_counter()
    dg.calibrate(inputs.model, cfg, clean, key)  # compiles measure for this batch shape
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    cals, _ = dg.calibrate(inputs.model, cfg, clean, key)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    host, timings = dg.score_batches(
        inputs.model, cfg, cals, key, inputs.store.iter_batches(fields, cfg.batch_episodes)
    )
    score_s = time.perf_counter() - t0
    episodes = len(host["episode_id"])
    first = min(episodes, cfg.batch_episodes)
    later = timings["batches"] - 1
    per_batch = timings["steady_s"] / later if later else float("nan")
    return {
        "episodes": episodes,
        "clean_episodes": len(clean["episode_id"]),
        "batches": timings["batches"],
        "compile_measure_s": cold - warm,
        # 0 when an earlier config compiled the same decide functions (same static args)
        "compile_decide_s": max(0.0, timings["first_batch_s"] - per_batch),
        "calibrate_s": warm,
        "steady_episodes": episodes - first,
        "steady_s": timings["steady_s"],
        "score_s": score_s,
        "raw": host["raw"],
    }, inputs.model


# ------------------------------------------------------------------ log-only instruments
def time_logonly(
    cfg: dg.DiagnoseConfig, store: Path, calibration: Path, run: Path, models: Path
) -> dict[str, Any]:
    """The log-only part of diagnose (``forensics.logonly.pipeline.diagnose``: every
    instrument, its CUSUM and every group's verdict), run twice so the second is warm."""
    from forensics.logonly import pipeline

    inputs = dg.open_inputs(store, run, calibration, cfg.stage1)
    fields = (*pipeline.SCORED_FIELDS, "seed", *dg.mask_fields(inputs))
    clean = dg.load_clean(inputs.calibration, tuple(dict.fromkeys(fields)))
    seeds = np.concatenate([b["seed"] for b in inputs.store.iter_batches(["seed"], 1 << 16)])
    runs = [pipeline.diagnose(inputs, models, clean, seeds, cfg.batch_episodes, cfg.alpha)[1]]
    runs.append(pipeline.diagnose(inputs, models, clean, seeds, cfg.batch_episodes, cfg.alpha)[1])
    t = runs[1]["timings"]
    episodes = inputs.store.n_episodes
    return {
        "episodes": episodes,
        "steady_episodes": episodes - min(episodes, cfg.batch_episodes),
        "steady_s": t["steady_s"],
        "calibrate_s": t["calibrate_s"],
        "compile_s": runs[0]["timings"]["score_s"] - t["score_s"],
        "instruments": [k for k, v in runs[1]["availability"].items() if v == "available"],
    }


def fit_models(tmp: Path, policy: checkpoint.Policy, seeds: int, chunk_seeds: int) -> Path:
    """Record clean episodes of their own seeds and fit the log-only models on them."""
    from forensics.logonly import models, pipeline

    config = recording.rollout_config(["attack=none"], policy.config, policy.run_dir)
    first = 2 * CALIB_SEED0
    recording.record(tmp / "fit", policy, config, np.arange(first, first + seeds), chunk_seeds)
    pipeline.fit_and_save(policy.run_dir, tmp / "fit", tmp / "models", models.FitConfig())
    return tmp / "models"


# ------------------------------------------------------------------ naive loop
def naive_geometry(critic_apply, params_j, obs, act, i):
    """G_ji = ‖∇_{a_i} Q_j‖ and D_ji = −g_iᵀ H_ii g_i at one step (obs [N, O], act [N, A]):
    one gradient and one forward-over-reverse HVP with the tangent g_i in block i."""
    grad = jax.grad(lambda a: critic_apply(params_j, obs, a))
    g = grad(act)
    tangent = jnp.zeros_like(act).at[i].set(g[i])
    _, hg = jax.jvp(grad, (act,), (tangent,))
    return jnp.linalg.norm(g[i]), -jnp.dot(g[i], hg[i])


def naive_measure(
    model: dg.Model, obs: np.ndarray, actions: np.ndarray, key: jax.Array
) -> tuple[np.ndarray, ...]:
    """raw [E, T, N], G, D [E, T, N(j), N(i)] by single-sample calls in Python loops."""
    inst = model.instruments
    s1 = inst.stage1
    e_count, t_count, n, o = obs.shape
    dirs = random_probe_directions(key, s1.num_random if s1.probe == "curvature" else 0, o)
    score = jax.jit(partial(_agent_step_score, inst.actor_apply, s1, dirs))
    geometry = jax.jit(partial(naive_geometry, inst.critic_apply))
    slice_ = lambda tree, k: jax.tree_util.tree_map(lambda p: p[k], tree)
    actors = [slice_(model.params["actor"], i) for i in range(n)]
    critics = [slice_(model.params["critic"], j) for j in range(n)]
    act = np.asarray(dg.critic_input(inst, jnp.asarray(actions)))
    avail = np.ones(act.shape[-1], bool)  # stage1_scores' default: every action legal
    raw = np.zeros((e_count, t_count, n), np.float32)
    g_out = np.zeros((e_count, t_count, n, n), np.float32)
    d_out = np.zeros_like(g_out)
    for e in range(e_count):
        for t in range(t_count):
            for i in range(n):
                raw[e, t, i] = score(actors[i], obs[e, t, i], avail, actions[e, t, i])
            for j in range(n):
                for i in range(n):
                    g, d = geometry(critics[j], obs[e, t], act[e, t], i)
                    g_out[e, t, j, i], d_out[e, t, j, i] = g, d
    return raw, g_out, d_out


def time_naive(
    model: dg.Model, cfg: dg.DiagnoseConfig, store: Path, count: int
) -> tuple[dict[str, float], str]:
    """Time ``naive_measure`` on the first ``count`` episodes and compare it with ``measure``
    on the same episodes (as the first batch of the jitted path, padded like it)."""
    from forensics.store import open_store, pad_batch

    batch = next(open_store(store).iter_batches(fields_of(cfg), cfg.batch_episodes))
    key = jax.random.PRNGKey(cfg.probe_seed)
    obs, actions = batch[cfg.observations], batch["actions"]
    naive_measure(model, obs[:1, :1], actions[:1, :1], key)  # compile
    t0 = time.perf_counter()
    raw, g, d = naive_measure(model, obs[:count], actions[:count], key)
    seconds = time.perf_counter() - t0
    padded = pad_batch(batch, cfg.batch_episodes)
    m = dg.measure(
        model.instruments, model.params,
        padded[cfg.observations], padded["actions"], padded["rewards"], padded["valid"], key,
        evidence_window=cfg.evidence_window, evidence=cfg.evidence,
    )  # fmt: skip
    ref = {
        "raw": np.asarray(m.raw[:count]),
        "smooth": np.asarray(m.smooth[:count]),
        "G": np.asarray(m.geom.G[:count]),
        "D": np.asarray(m.geom.D[:count]),
    }
    got = {"raw": raw, "smooth": np.asarray(rolling_mean(raw, cfg.stage1.window)), "G": g, "D": d}
    lines, ok = [], True
    for k in ref:
        # float32: batched and single-sample matmuls round differently, and the paper's
        # |L| = |J(o+η) − J(o) − gᵀη| is a difference of costs of order max(1, |x|), which
        # leaves ~1e-6 of absolute rounding noise on a statistic that is often ~1e-4 (a few
        # ulps of O(1) terms), hence an absolute floor on top of rtol
        atol = 1e-5 * max(1.0, float(np.max(np.abs(ref[k]))))
        close = np.allclose(got[k], ref[k], rtol=1e-3, atol=atol)
        ok &= close
        err = float(np.max(np.abs(got[k] - ref[k])))
        lines.append(f"{k} {'allclose' if close else 'DIFFER'} (max |Δ| {err:.2e})")
    calls = count * obs.shape[1] * obs.shape[2] * (1 + obs.shape[2])
    stats = {"episodes": count, "seconds": seconds, "calls": calls, "ok": ok}
    return stats, ", ".join(lines)


# ------------------------------------------------------------------ main
def report(name: str, cfg: dg.DiagnoseConfig, r: dict[str, Any]) -> float:
    s1 = cfg.stage1
    rate = r["steady_episodes"] / r["steady_s"] if r["steady_s"] else float("nan")
    print(
        f"{'jitted ' + name:>22}: {rate:10.1f} episodes/s steady state "
        f"({r['steady_episodes']:,} episodes in {r['steady_s']:.1f} s, {r['batches']} batches "
        f"of {cfg.batch_episodes}); compile measure {r['compile_measure_s']:.1f} s + "
        f"decide {r['compile_decide_s']:.1f} s"
    )
    print(
        f"{'':>22}  stage1 probe={s1.probe} target={s1.target} window={s1.window} "
        f"obs={cfg.observations}; calibrate {r['clean_episodes']} clean episodes "
        f"{r['calibrate_s']:.1f} s (warm); all {r['episodes']:,} episodes scored in "
        f"{r['score_s']:.1f} s incl. decide compile and store reads"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None, help="scored episode store")
    parser.add_argument("--calibration", type=Path, default=None, help="clean episode store")
    parser.add_argument("--run", type=Path, default=None, help="run directory (checkpoint)")
    parser.add_argument("--seeds", type=int, default=100, help="paired seeds when building")
    parser.add_argument("--calib-seeds", type=int, default=100, help="clean calibration seeds")
    parser.add_argument("--chunk-seeds", type=int, default=32, help="recording chunk size")
    parser.add_argument("--batch-episodes", type=int, default=None, help="default: config's")
    parser.add_argument("--naive-episodes", type=int, default=8, help="episodes for the loop")
    parser.add_argument("--smoke-hidden", default="64,64", help="smoke checkpoint's layers")
    parser.add_argument("--skip-default", action="store_true", help="time the paper probe only")
    parser.add_argument(
        "--models", type=Path, default=None, help="log-only models (default: fit when building)"
    )
    args = parser.parse_args()
    if (args.store is None) != (args.calibration is None):
        parser.error("--store and --calibration go together (or neither: build both)")

    with tempfile.TemporaryDirectory(prefix="bench-diagnose-") as tmp:
        tmp = Path(tmp)
        if args.store is None:
            policy = benchmark_policy(args.run, tmp, args.smoke_hidden)
            run = policy.run_dir
            store, calibration, build_s = build_stores(
                tmp, policy, args.seeds, args.calib_seeds, args.chunk_seeds
            )
            built = f"recorded both stores in {build_s:.1f} s (paired seeds 0:{args.seeds}, "
            built += f"clean seeds {CALIB_SEED0}:{CALIB_SEED0 + args.calib_seeds})"
        else:
            from cli.diagnose import recorded_run_dir

            store, calibration = args.store, args.calibration
            run = args.run or recorded_run_dir(store)
            policy = checkpoint.load_policy(run)
            built = f"store {store}, calibration {calibration}"
        print(f"checkpoint: {describe(policy)}")
        print(f"{built}; jax backend={jax.default_backend()}")

        paper_cfg = diagnose_config("paper", args.batch_episodes)
        paper, model = time_jitted(paper_cfg, store, calibration, run)
        print(
            f"scored store: {paper['episodes']:,} episodes; calibration: "
            f"{paper['clean_episodes']} clean episodes; naive loop on {args.naive_episodes}"
        )
        paper_rate = report("paper", paper_cfg, paper)
        if not args.skip_default:
            default_cfg = diagnose_config("default", args.batch_episodes)
            default, _ = time_jitted(default_cfg, store, calibration, run)
            report("default", default_cfg, default)
            models = args.models
            if models is None and args.store is None:
                models = fit_models(tmp, policy, args.calib_seeds, args.chunk_seeds)
            if models is not None:
                lo = time_logonly(default_cfg, store, calibration, run, models)
                lo_rate = lo["steady_episodes"] / lo["steady_s"]
                both = default["steady_episodes"] / (default["steady_s"] + lo["steady_s"])
                print(
                    f"{'jitted log-only':>22}: {lo_rate:10.1f} episodes/s steady state "
                    f"({', '.join(lo['instruments'])}, each with its CUSUM, every verdict); "
                    f"calibrate {lo['calibrate_s']:.1f} s (warm), compile {lo['compile_s']:.1f} s"
                )
                print(
                    f"{'default + log-only':>22}: {both:10.1f} episodes/s steady state "
                    "(diagnose --models: every instrument)"
                )
        naive, check = time_naive(model, paper_cfg, store, args.naive_episodes)

    naive_rate = naive["episodes"] / naive["seconds"]
    print(
        f"{'naive loop paper':>22}: {naive_rate:10.2f} episodes/s ({naive['episodes']} "
        f"episodes, {naive['calls']:,} single-sample calls in {naive['seconds']:.1f} s) → "
        f"{paper['episodes']:,} episodes ≈ {paper['episodes'] / naive_rate:,.0f} s"
    )
    print(f"{'speed-up (paper)':>22}: {paper_rate / naive_rate:10.1f}x steady state")
    print(f"{'agreement':>22}: {check}")
    if not naive["ok"]:
        raise SystemExit("benchmark_diagnose: the naive loop and measure disagree")


if __name__ == "__main__":
    main()
