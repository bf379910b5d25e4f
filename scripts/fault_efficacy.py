"""The fault library's efficacy table on one policy: for every fault, the team-return drop
against the paired clean episode and the share of episodes whose victim's executed action
changed inside the window.

Records each fault with ``forensics rollout RUN -o STORES/<label> --seeds SEEDS attack=<name>
attack.start=uniform [overrides]`` (resumable: a store already complete is not recomputed),
reads the efficacy from each store (``cli.recording.efficacy``: team returns streamed from
the store, ``agents.rollout.action_changed`` on its action columns) and writes

* ``<prefix>.csv``: long format, one row per figure, with the columns of DESIGN.md
  "Results as data" (setting log-only, instrument efficacy, subset all);
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


def commit_of(repo: Path) -> str:
    """HEAD of the code that ran, with ``-dirty`` when the tree had uncommitted changes."""
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    return head + ("-dirty" if dirty else "")


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


def rows_of(label: str, store_dir: Path, command: str, commit: str) -> list[dict]:
    from agents.attacks import Attack
    from cli import recording
    from forensics.store import open_store

    store = open_store(store_dir)
    attack = Attack.from_config(store.meta.config["attack"])
    table = recording.efficacy(store, attack)
    (row,) = table.itertuples()  # one onset class: uniform
    spec = store.meta.env_spec()
    clean = abs(row.clean_return)
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
        "commit": commit,
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
        "changed % | hurt % |",
        "|---|---|---|---|---|---|---|---|---|",
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
            f"{v('action_changed'):.1f} ± {c('action_changed'):.1f} | {v('share_hurt'):.1f} |"
        )
    clean = wide[("value", "clean_team_return")].iloc[0]
    lines += ["", f"Clean team return (mean over the seeds): {clean:.2f}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--stores", type=Path, default=Path("/tmp/faults"))
    parser.add_argument("--prefix", type=Path, default=Path("results/faults-ss3-maddpg"))
    parser.add_argument("--seeds", default="0:200")
    parser.add_argument("--only", nargs="*", help="labels to (re)record; default: all")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    commit = commit_of(repo)
    rows = []
    for label, attack, extra in FAULTS:
        if args.only and label not in args.only:
            continue
        store = args.stores / label
        command = record(args.run, store, args.seeds, attack, extra)
        rows += rows_of(label, store, command, commit)
    df = pd.DataFrame(rows, columns=COLUMNS.split(","))
    args.prefix.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.prefix.with_suffix(".csv"), index=False)
    args.prefix.with_suffix(".md").write_text(markdown(df, args.run, args.seeds))
    print(f"wrote {args.prefix.with_suffix('.csv')} and {args.prefix.with_suffix('.md')}")


if __name__ == "__main__":
    main()
