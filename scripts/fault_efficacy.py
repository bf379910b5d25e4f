"""The fault library's efficacy table on one policy: for every fault, the team-return drop
against the paired clean episode and the share of episodes whose victim's executed action
changed inside the window.

Records each fault with ``forensics rollout RUN -o STORES/<label> --seeds SEEDS attack=<name>
attack.start=uniform [overrides]`` (resumable: a store already complete is not recomputed),
reads the efficacy from each store (``cli.recording.efficacy``: team returns streamed from
the store, ``agents.rollout.action_changed`` on its action columns) and writes

* ``<prefix>.csv``: long format, one row per figure, with the columns of DESIGN.md
  "Results as data" (setting log-only, instrument efficacy, subset all; ``commit`` = the
  code version the store's sessions recorded the episodes with);
* ``<prefix>.md``: the same figures as one markdown table.

    scripts/fault_efficacy.py runs/simple_spread_3-maddpg-seed0 --stores /tmp/faults \\
        --prefix results/faults-ss3-maddpg --seeds 0:200

Every onset is uniform (``attack.start=uniform``, every ordered pair of a seed), the
worst-action row included, so that the rows compare like with like.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

# (label, attack config, extra overrides): every config of configs/attack/ at its defaults,
# plus feature-group variants of the sensor faults.
FAULTS: list[tuple[str, str, list[str]]] = [
    ("worst_action", "worst_action", []),
    ("obs_fgsm", "obs_fgsm", []),
    ("obs_pgd", "obs_pgd", []),
    ("obs_gaussian", "obs_gaussian", []),
    ("obs_frozen", "obs_frozen", []),
    ("obs_stale", "obs_stale", []),
    ("obs_bias", "obs_bias", []),
    ("obs_bias+features=landmarks", "obs_bias", ["attack.features=[landmarks]"]),
    ("obs_bias+features=teammates", "obs_bias", ["attack.features=[teammates]"]),
    ("obs_drift", "obs_drift", []),
    ("obs_dropout", "obs_dropout", []),
    ("obs_dropout+features=landmarks", "obs_dropout", ["attack.features=[landmarks]"]),
    ("action_noise", "action_noise", []),
    ("stuck_actuator", "stuck_actuator", []),
    ("action_dropout", "action_dropout", []),
    ("action_delay", "action_delay", []),
    ("action_saturation", "action_saturation", []),
    ("action_second_best", "action_second_best", []),
    ("param_noise", "param_noise", []),
    ("param_bitflip", "param_bitflip", []),
]
COLUMNS = (
    "env,algo,n_agents,fault,setting,instrument,subset,metric,value,ci95,episodes,command,commit"
)


def code_versions(store) -> str:
    """The commits of the code that recorded a store's episodes (its sessions), short."""
    seen = dict.fromkeys(sess["code_version"] for sess in store.meta.sessions)
    return "+".join(v[:12] + ("+dirty" if v.endswith("+dirty") else "") for v in seen)


def record(run: Path, store: Path, seeds: str, attack: str, extra: list[str]) -> str:
    """Run ``forensics rollout`` for one fault (resumes); returns the command line."""
    forensics = Path(sys.executable).with_name("forensics")
    cmd = [
        str(forensics), "rollout", str(run), "-o", str(store), "--seeds", seeds,
        "--no-progress", f"attack={attack}", "attack.start=uniform", *extra,
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    shown = ["forensics", *cmd[1:]]
    return shlex.join(shown)


def logged_costs(store, policy) -> tuple[float, float]:
    """Mean commitment cost J = −log π_i(a_taken | o_perceived) (discrete; the Gaussian
    analogue ½‖μ − a‖² when continuous) of the victim over its window steps, and of every
    agent over the valid steps of the clean episodes: how surprising the executed actions
    are to the victim's own policy on what it perceived (Stage 1's default statistic;
    ``forensics.stage1.commitment_cost``). A fault that scores near the clean level is
    invisible to that check."""
    import jax

    from cli import recording
    from forensics.stage1 import commitment_cost

    team, actor_params, _ = recording.team_of(policy)
    spec = team.spec

    def cost(params, obs, act, avail):
        tau = jax.nn.one_hot(act, spec.action_dim) if spec.discrete else act
        return commitment_cost(team.actor_apply, params, obs, tau, avail, spec.discrete)

    per_agent = jax.vmap(cost, in_axes=(0, 0, 0, 0))  # [N]
    batch = jax.jit(jax.vmap(jax.vmap(per_agent, in_axes=(None, 0, 0, 0)), in_axes=(None, 0, 0, 0)))
    gt = store.ground_truth().set_index("episode_id")
    window_sum = window_n = clean_sum = clean_n = 0.0
    cols = ["episode_id", "obs_perceived", "actions", "avail", "valid"]
    for b in store.iter_batches(cols, 2048):
        j = np.asarray(batch(actor_params, b["obs_perceived"], b["actions"], b["avail"]))
        rows = gt.loc[b["episode_id"]]
        clean = rows["clean"].to_numpy()
        valid = b["valid"]
        clean_sum += float(np.sum(j[clean] * valid[clean][..., None]))
        clean_n += float(np.sum(valid[clean])) * spec.num_agents
        hit = ~clean
        t = np.arange(valid.shape[1])[None]
        start, window = rows["start"].to_numpy()[hit, None], rows["window"].to_numpy()[hit, None]
        active = (t >= start) & (t < start + window) & valid[hit]
        jv = j[hit][np.arange(hit.sum()), :, rows["victim"].to_numpy()[hit]]  # [E, T]
        window_sum += float(np.sum(jv * active))
        window_n += float(np.sum(active))
    return window_sum / max(window_n, 1), clean_sum / max(clean_n, 1)


def rows_of(label: str, store_dir: Path, command: str, policy) -> list[dict]:
    from agents.attacks import Attack
    from cli import recording
    from forensics.store import open_store

    store = open_store(store_dir)
    attack = Attack.from_config(store.meta.config["attack"])
    table = recording.efficacy(store, attack)
    (row,) = table.itertuples()  # one onset class: uniform
    spec = store.meta.env_spec()
    clean = abs(row.clean_return)
    victim_cost, clean_cost = logged_costs(store, policy)
    base = {
        "env": spec.name,
        "algo": store.meta.config["algo"]["name"],
        "n_agents": spec.num_agents,
        "fault": label,
        "setting": "log-only",
        "instrument": "efficacy",
        "subset": "all",
        "episodes": int(row.episodes),
        "command": command,
        "commit": code_versions(store),
    }
    figures = [
        ("team_return_drop", row.drop, row.drop_ci95),
        ("team_return_drop_pct", 100 * row.drop / clean, 100 * row.drop_ci95 / clean),
        ("action_changed", 100 * row.action_changed, 100 * row.action_changed_ci95),
        (
            "share_hurt",
            100 * row.share_hurt,
            196 * np.sqrt(row.share_hurt * (1 - row.share_hurt) / row.episodes),
        ),
        ("clean_team_return", row.clean_return, np.nan),
        ("victim_logged_cost", victim_cost, np.nan),
        ("clean_logged_cost", clean_cost, np.nan),
        ("magnitude", attack.magnitude, np.nan),
        ("window", attack.window, np.nan),
    ]
    return [{**base, "metric": m, "value": v, "ci95": c} for m, v, c in figures]


def markdown(df: pd.DataFrame, run: Path, seeds: str) -> str:
    wide = df.pivot_table(index="fault", columns="metric", values=["value", "ci95"], sort=False)
    first = df.iloc[0]
    lines = [
        f"# Fault efficacy: {first.env} N={first.n_agents}, {first.algo} "
        f"(`{run}`, seeds {seeds}, uniform onsets)",
        "",
        "Team-return drop = clean − attacked team return (Σ over agents and steps) of the same "
        "seed, ± the 95 % CI half-width; % of the clean team return's magnitude. Changed = "
        "share of attacked episodes in which the victim's executed action differed from its "
        "own policy's greedy choice on the true observation, at some step of the window. "
        "Hurt = share of episodes with a drop > 0. Every ordered pair (victim, observed) of "
        "a seed is one episode. Setting: log-only (efficacy of the recorded episodes). "
        "Regenerate: `scripts/fault_efficacy.py` (commands in the CSV).",
        "",
        "| fault | class | magnitude | window | episodes | team-return drop | drop % | "
        "changed % | hurt % | victim J (nats) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    from agents.attacks import FAULT_CLASS

    for fault in wide.index:
        v = lambda m, fault=fault: wide.loc[fault, ("value", m)]
        c = lambda m, fault=fault: wide.loc[fault, ("ci95", m)]
        episodes = int(df[df.fault == fault].episodes.iloc[0])
        cls = FAULT_CLASS[fault.split("+")[0]]
        lines.append(
            f"| {fault} | {cls} | {v('magnitude'):g} | {int(v('window'))} | {episodes:,} | "
            f"{v('team_return_drop'):.2f} ± {c('team_return_drop'):.2f} | "
            f"{v('team_return_drop_pct'):.1f} | "
            f"{v('action_changed'):.1f} ± {c('action_changed'):.1f} | {v('share_hurt'):.1f} | "
            f"{v('victim_logged_cost'):.2f} |"
        )
    clean = wide[("value", "clean_team_return")].iloc[0]
    clean_cost = wide[("value", "clean_logged_cost")].iloc[0]
    lines += [
        "",
        f"Clean team return (mean over the seeds): {clean:.2f}. Victim J = the mean commitment "
        "cost −log π_i(a_taken | o_perceived) of the victim over its window steps (Stage 1's "
        f"default statistic, before calibration); on clean episodes it is {clean_cost:.2f} "
        "(every agent, every step). Magnitude is the fault's own "
        "unit (`Attack.magnitude`: ε, σ, offset, p, k; 0 where it has none); "
        "action_saturation's `fraction` applies to continuous actions only — on a discrete "
        "policy the fault is the loss of one movement axis. With every feature frozen, a "
        "greedy deterministic victim repeats its onset action, so obs_frozen and "
        "stuck_actuator play the same episodes (their logs differ: a frozen sensor's "
        "perceived observation is frozen too). The defaults of the faults that existed "
        "before the library (obs_gaussian, action_noise, param_noise, FGSM/PGD) are unchanged.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--stores", type=Path, default=Path("/tmp/faults"))
    parser.add_argument("--prefix", type=Path, default=Path("results/faults-ss3-maddpg"))
    parser.add_argument("--seeds", default="0:200")
    parser.add_argument("--only", nargs="*", help="labels to (re)record; default: all")
    args = parser.parse_args()
    from agents import checkpoint

    policy = checkpoint.load_policy(args.run)
    rows = []
    for label, attack, extra in FAULTS:
        if args.only and label not in args.only:
            continue
        store = args.stores / label
        command = record(args.run, store, args.seeds, attack, extra)
        rows += rows_of(label, store, command, policy)
    df = pd.DataFrame(rows, columns=COLUMNS.split(","))
    args.prefix.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.prefix.with_suffix(".csv"), index=False)
    args.prefix.with_suffix(".md").write_text(markdown(df, args.run, args.seeds))
    print(f"wrote {args.prefix.with_suffix('.csv')} and {args.prefix.with_suffix('.md')}")


if __name__ == "__main__":
    main()
