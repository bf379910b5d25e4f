"""Fixed numerical cases whose CPU values are stored beside the tests, so another backend (a
GPU, a new jax or XLA) is checked against them: ``tests/test_numerics.py`` compares,
``scripts/gpu_check.sh`` runs that test on the device, and

    .venv/bin/python tests/numerics.py --write

regenerates ``tests/data/numerics_cpu.npz`` on the CPU (only after a deliberate change of
what is computed: the file is the CPU's answer, not a tolerance to be tuned).

Cases (every input is stored too — parameters, optimiser states, replay buffers, PRNG keys,
episodes — so a backend whose initialisers or rollouts round differently is still fed the
same numbers; the treedef comes from a local ``init``):

* ``measure``: ``forensics.diagnose.measure`` on 8 greedy episodes of Simple Spread N=5
  (MADDPG networks with the default 64-64 SiLU actor and critic, random weights), with the
  paper's Stage-1 probe and with the default one: the Stage-1 statistic and its rolling
  mean, every critic's Q, and the critic geometry G, D, S, X (D and X are Hessian-vector
  products, 6 per step and critic);
* ``train_maddpg`` / ``train_hatrpo``: one ``train_chunk`` of the smoke configs on Simple
  Spread N=3 from a stored initial state: the chunk's metrics and every parameter after it.

Tolerances (``TOLERANCE``) are float32 rounding, stated per quantity: the same program on
another CPU, or on a GPU with IEEE float32 matrix products, reorders sums and fuses
multiply-adds, so values agree to a few ulps of their largest terms, not bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's packages
    sys.path.insert(0, str(ROOT))

REFERENCE = Path(__file__).resolve().parent / "data" / "numerics_cpu.npz"
MEASURED = ("raw", "smooth", "q", "G", "D", "S", "X")
PROBES = ("paper", "default")  # Stage-1 probes measured, each from a forensics config:
CONFIG_OF = {"paper": "paper_pooled", "default": "default"}  # (paper: its probe, held τ)
EPISODES = 8  # measure case: greedy episodes (seeds 0..7)

# (rtol, atol relative to max(1, max |reference|)) per output kind. ``raw`` under the
# paper's probe is |J(o+η) − J(o) − gᵀη|, a difference of O(1) costs that is often ~1e-4:
# a few ulps of the O(1) terms are 1e-6 absolute, hence the absolute floor. Training
# compounds the rounding of one chunk's updates (Adam's normalised steps amplify
# relative differences in small gradients), hence 1e-3.
TOLERANCE = {"measure": (1e-3, 1e-5), "train": (1e-3, 1e-4)}


# ------------------------------------------------------------------ pytrees <-> arrays
def flat_leaves(tree: Any, prefix: str) -> dict[str, np.ndarray]:
    """``{prefix/keypath: leaf}`` for every leaf of ``tree`` (host numpy arrays)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {f"{prefix}/{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in leaves}


def restore(tree: Any, stored: dict[str, np.ndarray], prefix: str) -> Any:
    """``tree`` with every leaf replaced by ``stored[prefix/keypath]`` (same dtype)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = []
    for p, x in paths:
        key = f"{prefix}/{jax.tree_util.keystr(p)}"
        if key not in stored:
            raise KeyError(f"{REFERENCE.name}: no stored leaf {key!r} (regenerate: --write)")
        leaves.append(jnp.asarray(stored[key], dtype=jnp.asarray(x).dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ------------------------------------------------------------------ the cases
def _measure_model():
    from agents import maddpg
    from envs import make_env

    env = make_env("simple_spread", num_agents=5, continuous=False)
    cfg = maddpg.MaddpgConfig()
    actor, critic = maddpg.build_networks(env.spec, cfg)
    learner = maddpg.init_learner(env.spec, cfg, jax.random.PRNGKey(0))
    return env, actor, critic, {"actor": learner.actor_params, "critic": learner.critic_params}


def _diagnose_config(name: str):
    from cli.hydra_entry import compose_config
    from forensics import diagnose as dg

    return dg.DiagnoseConfig.from_mapping(
        compose_config([f"forensics={CONFIG_OF[name]}"])["forensics"]
    )


def measure_inputs() -> dict[str, np.ndarray]:
    """Random-weight networks and 8 greedy clean episodes of them (CPU, when writing)."""
    from agents import attacks
    from agents import rollout as R

    env, actor, critic, params = _measure_model()
    team = attacks.Team(env.spec, actor.apply, critic.apply)
    roll = R.make_rollout(env, team, attacks.Attack(name="none"))
    ep = roll(
        params["actor"], params["critic"], R.seed_keys(jnp.arange(EPISODES)),
        attacks.clean_target((EPISODES,)),
    )  # fmt: skip
    done = np.asarray(ep.done)
    out = flat_leaves(params, "measure/params")
    out.update(
        {
            "measure/obs": np.asarray(ep.obs_perceived),
            "measure/actions": np.asarray(ep.actions),
            "measure/rewards": np.asarray(ep.rewards),
            "measure/valid": np.cumsum(done, axis=-1) - done == 0,
        }
    )
    return out


def measure_outputs(stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from forensics import diagnose as dg

    env, actor, critic, params = _measure_model()
    params = restore(params, stored, "measure/params")
    args = [jnp.asarray(stored[f"measure/{k}"]) for k in ("obs", "actions", "rewards", "valid")]
    out = {}
    for probe in PROBES:
        cfg = _diagnose_config(probe)
        s1 = dataclasses.replace(cfg.stage1, discrete=True)
        inst = dg.Instruments(actor.apply, critic.apply, True, env.spec.action_dim, s1)
        m = dg.measure(
            inst, params, *args, jax.random.PRNGKey(cfg.probe_seed),
            evidence_window=cfg.evidence_window, evidence=cfg.evidence,
        )  # fmt: skip
        values = {"raw": m.raw, "smooth": m.smooth, "q": m.q, **m.geom._asdict()}
        out.update({f"measure/{probe}/{k}": np.asarray(values[k]) for k in MEASURED})
    return out


def _trainer(algo: str):
    from agents.trainer import make_trainer
    from cli.hydra_entry import compose_config
    from envs import make_env

    cfg = compose_config(["env=simple_spread_3", f"algo={algo}_smoke"])
    env = make_env("simple_spread", num_agents=3, continuous=False)
    return make_trainer(algo, env, {k: v for k, v in cfg["algo"].items()})


def train_inputs(algo: str) -> dict[str, np.ndarray]:
    return flat_leaves(_trainer(algo).init(jax.random.PRNGKey(0)), f"train_{algo}/state")


def train_outputs(algo: str, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    trainer = _trainer(algo)
    state = restore(trainer.init(jax.random.PRNGKey(0)), stored, f"train_{algo}/state")
    state, metrics = trainer.train_chunk(state)
    out = flat_leaves(trainer.policy_params(state), f"train_{algo}/params")
    out.update({f"train_{algo}/metrics/{k}": np.asarray(v) for k, v in metrics.items()})
    return out


ALGOS = ("maddpg", "hatrpo")
CASES = ("measure", *(f"train_{a}" for a in ALGOS))


def inputs() -> dict[str, np.ndarray]:
    out = measure_inputs()
    for algo in ALGOS:
        out.update(train_inputs(algo))
    return out


def outputs(stored: dict[str, np.ndarray], cases: tuple[str, ...] = CASES) -> dict[str, np.ndarray]:
    """The outputs of ``cases`` from the stored inputs, on the current default backend."""
    out = measure_outputs(stored) if "measure" in cases else {}
    for algo in ALGOS:
        if f"train_{algo}" in cases:
            out.update(train_outputs(algo, stored))
    return out


def load() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, CPU outputs) from ``REFERENCE``."""
    with np.load(REFERENCE) as f:
        data = dict(f)
    split = lambda tag: {k[len(tag) + 1 :]: v for k, v in data.items() if k.startswith(tag)}
    return split("in"), split("out")


# ------------------------------------------------------------------ comparison
def tolerance(key: str) -> tuple[float, float]:
    return TOLERANCE["measure" if key.startswith("measure/") else "train"]


def compare(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per stored output: max |Δ|, the largest |Δ| / (atol + rtol |ref|) and whether
    every element is within tolerance (``np.allclose`` with the stated rtol, atol)."""
    rows = []
    for key in sorted(ref):
        r, g = np.asarray(ref[key], np.float64), np.asarray(got[key], np.float64)
        rtol, atol_rel = tolerance(key)
        atol = atol_rel * max(1.0, float(np.max(np.abs(r), initial=0.0)))
        diff = np.abs(g - r)
        ratio = float(np.max(diff / (atol + rtol * np.abs(r)), initial=0.0))
        rows.append(
            {
                "key": key,
                "shape": r.shape,
                "max_abs_diff": float(np.max(diff, initial=0.0)),
                "worst_over_tolerance": ratio,
                "ok": bool(np.all(np.isfinite(g) == np.isfinite(r)) and ratio <= 1.0),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"regenerate {REFERENCE.name}")
    args = parser.parse_args()
    if args.write:
        if jax.default_backend() != "cpu":
            raise SystemExit(
                "tests/numerics.py --write: the reference is the CPU's (JAX_PLATFORMS=cpu)"
            )
        stored = inputs()
        out = outputs(stored)
        REFERENCE.parent.mkdir(exist_ok=True)
        np.savez_compressed(
            REFERENCE,
            **{f"in/{k}": v for k, v in stored.items()},
            **{f"out/{k}": v for k, v in out.items()},
        )
        print(f"wrote {REFERENCE} ({len(stored)} inputs, {len(out)} outputs)")
        return
    stored, ref = load()
    rows = compare(outputs(stored), ref)
    for r in rows:
        print(
            f"{'ok ' if r['ok'] else 'BAD'} {r['key']:<60} max|Δ| {r['max_abs_diff']:.2e}  "
            f"{r['worst_over_tolerance']:.3f} of tolerance"
        )
    ok = sum(r["ok"] for r in rows)
    print(f"backend {jax.default_backend()}: {ok}/{len(rows)} within tolerance")


if __name__ == "__main__":
    main()
