"""Device check: numerics against the stored CPU values, then diagnose and training speed.

    python scripts/gpu_bench.py --out DIR [--dry-run] [--budget-s 420] [--commit SHA]

Sections, in order (each a few rows of ``forensics.results`` columns appended to
``DIR/gpu_rows.csv`` as soon as it is measured, so a run cut short keeps what it had):

1. numerics: ``tests/numerics.py``'s cases (diagnose measures with their Hessian-vector
   products, one MADDPG and one HATRPO training chunk) on this backend against the CPU's
   stored values, under the backend's default matrix-product precision and under
   ``highest`` (IEEE float32). GPUs may multiply float32 matrices in TF32 (10-bit mantissa)
   by default, which a Taylor remainder |J(o+η) − J(o) − gᵀη| of ε = 0.01 cannot survive.
2. episodes: greedy clean Simple Spread N=5 episodes generated on the device by the jitted
   rollout (``agents.rollout.make_rollout``), random MADDPG weights: a 64-64 actor and a
   256-256 SiLU critic (the size of the HVP roofline this is compared with).
3. HVPs: ``forensics.stage2.critic_geometry`` alone on those episodes. Per (episode, step,
   critic j) it runs one linearisation and N + 1 Hessian-vector products, so
   HVP/s = episodes · T · N · (N + 1) / s.
4. diagnose: ``forensics.diagnose.calibrate`` on clean episodes, then ``score_batches``
   (``measure`` + ``decide_all``: Stage 1, Stage 2, both calibrations, baselines, host copies)
   over 10k and 100k episodes, for the paper's probe and the default one. Compile times are
   cold − warm calls.
   Then the log-only instruments and their fused verdict (``forensics.logonly``) over the
   same episodes.
5. training: ``train_chunk`` env-steps/s of MADDPG and HATRPO (their default configs, more
   parallel envs) on Simple Spread N=3 and N=5 at 1,024 and 8,192 environments.
6. memory: the device's peak bytes in use.

``--dry-run`` runs every section at toy sizes (tens of episodes, 8 environments) so the
script is exercised on the CPU by the default test suite; its rows say ``dry-run`` in
``command`` and are never copied into results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numerics  # noqa: E402  (tests/numerics.py: the stored CPU cases)

from agents import attacks, maddpg  # noqa: E402
from agents import rollout as R  # noqa: E402
from agents.trainer import make_trainer  # noqa: E402
from cli.hydra_entry import compose_config  # noqa: E402
from envs import make_env  # noqa: E402
from forensics import diagnose as dg  # noqa: E402
from forensics.results import append_rows  # noqa: E402
from forensics.stage2 import critic_geometry  # noqa: E402

N_DIAGNOSE = 5  # Simple Spread agents in the diagnose sections
CRITIC_HIDDEN = (256, 256)  # the roofline's critic


@dataclass(frozen=True)
class Sizes:
    chunk: int  # episodes per generated / diagnosed batch
    totals: tuple[int, ...]  # episodes diagnosed (multiples of chunk)
    calib: int  # clean calibration episodes
    envs: tuple[int, ...]  # parallel environments for training
    agents: tuple[int, ...]  # Simple Spread N for training
    chunk_steps: int  # env steps per training chunk (rounded to whole iterations)


FULL = Sizes(5_000, (10_000, 100_000), 5_000, (8192, 1024), (3, 5), 2_000_000)
DRY = Sizes(16, (32, 48), 48, (8,), (3,), 400)


class Bench:
    """Row writer with the run's identity, a deadline, and the section timer."""

    def __init__(self, out: Path, dry: bool, budget_s: float, commit: str):
        self.path = out / "gpu_rows.csv"
        self.dry = dry
        self.deadline = time.perf_counter() + budget_s
        self.commit = commit
        self.device = "dry-run " if dry else ""
        self.device += f"{jax.default_backend()}: {jax.devices()[0].device_kind}"
        self.command = "scripts/gpu_bench.py" + (" --dry-run" if dry else "")

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def rows(self, instrument: str, metrics: dict[str, float], **fields: Any) -> None:
        base = {
            "env": "simple_spread",
            "algo": "maddpg",
            "n_agents": N_DIAGNOSE,
            "setting": "benchmark",
            "instrument": instrument,
            "episodes": 0,
            "command": self.command,
            "commit": self.commit,
            "device": self.device,
            **fields,
        }
        bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
        if bad:  # e.g. a rate with no steady batch: say so, keep the rest
            print(f"[{instrument}] not measured: {', '.join(bad)}")
        kept = {k: v for k, v in metrics.items() if k not in bad}
        append_rows(self.path, [{**base, "metric": k, "value": v} for k, v in kept.items()])
        shown = ", ".join(f"{k}={v:.4g}" for k, v in kept.items())
        print(f"[{instrument} {fields}] {shown}", flush=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------ 1. numerics
def numerics_section(b: Bench) -> None:
    """Both precisions on a device; the dry run (CPU: one precision) the measure case only."""
    stored, ref = numerics.load()
    cases = ("measure",) if b.dry else numerics.CASES
    ref = {k: v for k, v in ref.items() if k.split("/")[0] in cases}
    # "default": as the code runs (forensics and training pin float32 products themselves,
    # agents/precision.py); "highest": every product in float32, the code's pins aside
    for precision in ("highest",) if b.dry else ("default", "highest"):
        with jax.default_matmul_precision(None if precision == "default" else "highest"):
            rows = numerics.compare(numerics.outputs(stored, cases), ref)
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault("/".join(r["key"].split("/")[:2]), []).append(r)
        for group, rs in groups.items():
            worst = max(rs, key=lambda r: r["worst_over_tolerance"])
            b.rows(
                f"numerics:{group}",
                {
                    f"worst_over_tolerance@{precision}": worst["worst_over_tolerance"],
                    f"within_tolerance@{precision}": 100.0 * np.mean([r["ok"] for r in rs]),
                },
                episodes=numerics.EPISODES,
            )
            if not worst["ok"]:
                print(f"  {precision}: worst {worst['key']} max|Δ| {worst['max_abs_diff']:.3g}")


# ------------------------------------------------------------------ 2-4. diagnose
def diagnose_model(probe: str) -> tuple[dg.Model, dg.DiagnoseConfig, Any, Any]:
    env = make_env("simple_spread", num_agents=N_DIAGNOSE, continuous=False)
    mcfg = maddpg.MaddpgConfig(critic_hidden=CRITIC_HIDDEN)
    actor, critic = maddpg.build_networks(env.spec, mcfg)
    learner = maddpg.init_learner(env.spec, mcfg, jax.random.PRNGKey(0))
    params = {"actor": learner.actor_params, "critic": learner.critic_params}
    config = compose_config([f"forensics={numerics.CONFIG_OF[probe]}"])  # paper: paper_pooled
    cfg = dg.DiagnoseConfig.from_mapping(config["forensics"])
    s1 = dataclasses.replace(cfg.stage1, discrete=True)
    inst = dg.Instruments(actor.apply, critic.apply, True, env.spec.action_dim, s1)
    return dg.Model(inst, params, dg.PAPER_K["maddpg"]), cfg, env, (actor, critic)


def generate(b: Bench, sizes: Sizes, model: dg.Model, env, nets) -> list[dict[str, np.ndarray]]:
    """max(totals) + calib greedy clean episodes in chunks (host arrays, store layout)."""
    team = attacks.Team(env.spec, nets[0].apply, nets[1].apply)
    roll = R.make_rollout(env, team, attacks.Attack(name="none"))
    count = (max(sizes.totals) + sizes.calib) // sizes.chunk
    chunks, seconds, compile_s = [], 0.0, 0.0
    for c in range(count):
        seeds = jnp.arange(c * sizes.chunk, (c + 1) * sizes.chunk)
        ep, s = timed(
            lambda seeds=seeds: roll(
                model.params["actor"], model.params["critic"], R.seed_keys(seeds),
                attacks.clean_target((sizes.chunk,)),
            )
        )  # fmt: skip
        if c == 0:
            compile_s = s
        else:
            seconds += s
        done = np.asarray(ep.done)
        chunks.append(
            {
                "episode_id": np.asarray(seeds, np.int64),
                "seed": np.asarray(seeds, np.int64),
                "valid": np.cumsum(done, axis=-1) - done == 0,
                "obs_perceived": np.asarray(ep.obs_perceived),
                "actions": np.asarray(ep.actions),
                "rewards": np.asarray(ep.rewards),
            }
        )
    steady = (count - 1) * sizes.chunk
    if count > 1:
        compile_s -= seconds / (count - 1)
    b.rows(
        "rollout",
        {"episodes_per_s": steady / seconds if seconds else float("nan"), "compile_s": compile_s},
        episodes=sizes.chunk,
    )
    return chunks


def hvp_section(b: Bench, model: dg.Model, chunks: list[dict[str, np.ndarray]]) -> None:
    inst = model.instruments
    to_device = lambda c: (
        jnp.asarray(c["obs_perceived"]),
        dg.critic_input(inst, jnp.asarray(c["actions"])),
    )
    geometry = lambda c: critic_geometry(inst.critic_apply, model.params["critic"], *c)
    first = to_device(chunks[0])
    _, cold = timed(lambda: geometry(first))
    _, warm = timed(lambda: geometry(first))
    device_chunks = [to_device(c) for c in chunks[1:]]  # transfers outside the timing
    jax.block_until_ready(device_chunks)
    seconds = 0.0
    for c in device_chunks:
        _, s = timed(lambda c=c: geometry(c))
        seconds += s
    e, t, n = chunks[0]["obs_perceived"].shape[:3]
    episodes = e * len(device_chunks)
    hvps = episodes * t * n * (n + 1)
    b.rows(
        "critic_geometry",
        {
            "hvp_per_s": hvps / seconds,
            "episodes_per_s": episodes / seconds,
            "compile_s": cold - warm,
        },
        episodes=episodes,
    )


def diagnose_section(b: Bench, sizes: Sizes, probe: str, chunks, model: dg.Model, cfg) -> None:
    cfg = dataclasses.replace(cfg, batch_episodes=sizes.chunk)
    tail = chunks[len(chunks) - sizes.calib // sizes.chunk :]  # seeds after every scored one
    calib = {k: np.concatenate([c[k] for c in tail]) for k in tail[0]}
    key = jax.random.PRNGKey(cfg.probe_seed)
    _, cold = timed(lambda: dg.calibrate(model, cfg, calib, key))
    (cals, _), warm = timed(lambda: dg.calibrate(model, cfg, calib, key))
    measure_alone(b, sizes, probe, chunks, model, cfg, key)
    for total in sizes.totals:
        scored = chunks[: total // sizes.chunk]
        if b.left() < 30:
            print(f"diagnose {probe} {total}: skipped, {b.left():.0f} s of the budget left")
            return
        host, timings = dg.score_batches(model, cfg, cals, key, iter(scored))
        later = timings["batches"] - 1
        steady = later * sizes.chunk
        rate = steady / timings["steady_s"] if later else float("nan")
        e, t, n = scored[0]["obs_perceived"].shape[:3]
        b.rows(
            f"diagnose:{probe}",
            {
                "episodes_per_s": rate,
                "hvp_per_s": rate * t * n * (n + 1),
                "compile_measure_s": cold - warm,
                "compile_decide_s": max(
                    0.0, timings["first_batch_s"] - timings["steady_s"] / max(later, 1)
                ),
                "flagged_share": 100.0 * float(np.mean(host["budget.candidate"] >= 0)),
            },
            episodes=total,
        )


def measure_alone(b: Bench, sizes: Sizes, probe: str, chunks, model: dg.Model, cfg, key) -> None:
    """``measure`` on device-resident batches of the largest size: the device's share of
    ``score_batches`` (the rest is host work: store layout, transfers, decisions to numpy)."""
    fields = ("obs_perceived", "actions", "rewards", "valid")
    scored = [
        tuple(jnp.asarray(c[f]) for f in fields) for c in chunks[: max(sizes.totals) // sizes.chunk]
    ]
    run = lambda c: dg.measure(
        model.instruments, model.params, *c, key,
        evidence_window=cfg.evidence_window, evidence=cfg.evidence,
    )  # fmt: skip
    timed(lambda: run(scored[0]))
    seconds = sum(timed(partial(run, c))[1] for c in scored[1:])
    episodes = sizes.chunk * (len(scored) - 1)
    e, t, n = chunks[0]["obs_perceived"].shape[:3]
    rate = episodes / seconds if seconds else float("nan")
    b.rows(
        f"measure:{probe}",
        {"episodes_per_s": rate, "hvp_per_s": rate * t * n * (n + 1)},
        episodes=episodes,
    )


def logonly_section(b: Bench, sizes: Sizes, chunks, model: dg.Model, env) -> None:
    """The log-only instruments (``forensics.logonly``: cross-agent and own-dynamics ridge
    models, the decision gap, their CUSUMs, the fused verdict) over the largest size. A
    benchmark of speed only: the models are fitted and the thresholds calibrated on the same
    clean chunks (a diagnosis keeps them apart)."""
    from forensics.logonly import instruments as I
    from forensics.logonly import models as M
    from forensics.logonly import verdict as V

    st = I.Statics(model.instruments.actor_apply, True, env.spec.action_dim, I.FUSED)
    actor = model.params["actor"]
    tail = chunks[len(chunks) - sizes.calib // sizes.chunk :]
    clean = {k: np.concatenate([c[k] for c in tail]) for k in M.FIT_FIELDS}
    (models, _), fit_s = timed(lambda: M.fit_models(clean, st, actor, M.FitConfig()))
    cal = V.calibrate(st, actor, models, iter(tail), sizes.chunk, alpha=0.05)
    scored = chunks[: max(sizes.totals) // sizes.chunk]
    _, timings = V.score(st, actor, models, cal, iter(scored), sizes.chunk)
    later = timings["batches"] - 1
    rate = later * sizes.chunk / timings["steady_s"] if later else float("nan")
    b.rows(
        "logonly:verdict",
        {
            "episodes_per_s": rate,
            "fit_s": fit_s,
            "compile_s": timings["first_batch_s"] - timings["steady_s"] / max(later, 1),
        },
        episodes=len(scored) * sizes.chunk,
    )


# ------------------------------------------------------------------ 5. training
def train_section(b: Bench, sizes: Sizes) -> None:
    for n in sizes.agents:
        env = make_env("simple_spread", num_agents=n, continuous=False)
        for num_envs in sizes.envs:
            for algo in ("hatrpo", "maddpg"):
                if b.left() < 60:
                    print(f"train {algo} N={n} {num_envs}: skipped, {b.left():.0f} s left")
                    continue
                base = "_smoke" if b.dry else ""
                cfg = dict(compose_config([f"env=simple_spread_{n}", f"algo={algo}{base}"])["algo"])
                per_iter = num_envs * env.spec.episode_length
                cfg["num_envs"] = num_envs
                cfg["iterations_per_chunk"] = max(1, sizes.chunk_steps // per_iter)
                if algo == "maddpg":
                    cfg["buffer_size"] = max(cfg["buffer_size"], 2 * per_iter)
                    cfg["warmup"] = 0
                trainer = make_trainer(algo, env, cfg)
                state = trainer.init(jax.random.PRNGKey(0))
                seconds = []
                for _ in range(3):  # the first call compiles
                    (state, _), s = timed(partial(trainer.train_chunk, state))
                    seconds.append(s)
                steady = min(seconds[1:])
                cold = seconds[0]
                b.rows(
                    "train",
                    {
                        "env_steps_per_s": trainer.env_steps_per_chunk / steady,
                        "compile_s": cold - steady,
                    },
                    algo=algo,
                    n_agents=n,
                    episodes=num_envs,
                )


# ------------------------------------------------------------------ main
def memory_section(b: Bench) -> None:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        b.rows("device", {"peak_memory_gib": stats["peak_bytes_in_use"] / 2**30})
    else:
        print("device memory stats: not reported by this backend")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_rows.csv")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes (CPU, seconds)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip what would overrun")
    parser.add_argument("--commit", default="unknown", help="code version for the rows")
    parser.add_argument("--sections", default="numerics,diagnose,train,memory")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    b = Bench(args.out, args.dry_run, args.budget_s, args.commit)
    sizes = DRY if args.dry_run else FULL
    sections = set(args.sections.split(","))
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    if "numerics" in sections:
        numerics_section(b)
    if "diagnose" in sections:
        model, cfg, env, nets = diagnose_model("paper")
        chunks = generate(b, sizes, model, env, nets)
        hvp_section(b, model, chunks)
        for probe in ("paper", "default"):
            model, cfg, *_ = diagnose_model(probe)
            diagnose_section(b, sizes, probe, chunks, model, cfg)
        if b.left() > 60:
            logonly_section(b, sizes, chunks, model, env)
    if "train" in sections:
        train_section(b, sizes)
    if "memory" in sections:
        memory_section(b)
    print(f"rows: {b.path}")


if __name__ == "__main__":
    main()
