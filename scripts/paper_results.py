"""Results rows of a replay-referenced diagnosis (``forensics diagnose … forensics=replay`` or
``forensics=paper``): the paper's protocol, scored the paper's way (oracle-gated, labelled) and
ours, its band's clean false alarms, and our default instrument against the same replays.

    python scripts/paper_results.py STORE/diagnosis-replay --out results/paper-ss3-maddpg.csv \
        --command "forensics diagnose …" [--commit SHA]

Appends one long-format row per figure (``forensics/results.py``) and prints them as a table.
Ground truth is read here (``forensics.paper.evaluate_replay``), never by the diagnosis.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from forensics.paper import evaluate_replay
from forensics.results import append_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("diagnosis", type=Path, help="a replay-referenced diagnosis directory")
    parser.add_argument("--out", type=Path, required=True, help="results CSV to append to")
    parser.add_argument("--command", required=True, help="the command that made the diagnosis")
    parser.add_argument("--commit", default=None, help="code version [default: git HEAD]")
    args = parser.parse_args()
    commit = args.commit or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip() or "unknown"  # fmt: skip
    summary = json.loads((args.diagnosis / "summary.json").read_text())
    env = summary["env"]
    from forensics.store import open_store

    attack = open_store(summary["store"]["path"]).meta.config.get("attack", {}).get("name")
    rows, counts = evaluate_replay(args.diagnosis)
    common = {
        "env": env["name"], "algo": summary["algo"], "n_agents": env["num_agents"],
        "fault": attack or "none", "command": args.command, "commit": commit,
    }  # fmt: skip
    rows = [{**common, **r} for r in rows]
    for name in ("skipped_no_qualifying_step", "attacked", "impactful", "clean"):
        rows.append(
            {**common, "setting": "paper-protocol", "instrument": "paper", "subset": "all",
             "metric": f"count_{name}", "value": counts[name], "episodes": counts["attacked"]}
        )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    append_rows(args.out, rows)
    for r in rows:
        print(
            f"{r['setting']:18} {r['instrument']:8} {r['subset']:9} {r['metric']:36} "
            f"{r['value']:>9} ± {r.get('ci95', '')!s:6} n={r['episodes']}"
        )
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
