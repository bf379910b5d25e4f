"""``forensics evaluate DIAG_DIR [DIAG_DIR ...] [--out TABLE.parquet] [--markdown TABLE.md]``:
the accuracy table of one or more diagnoses, against their stores' ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

HELP = """Score diagnoses against the ground truth: the accuracy table.

Reads each DIAG_DIR written by `forensics diagnose` (a STORE stands for its default
STORE/diagnosis) and the ground truth of the episode
store it diagnosed (victim, attack start and window, influence class, the clean
counterfactual of each attacked episode). Ground truth enters here, after every verdict
was made without it.

One row per env × algo × N × attack × influence class × calibration (the paper's band
and ours), plus an `all` row per attack:

* **deployable** Patient-0 accuracy (Stage 1 + the calibrated Stage 2: our claim) with its
  95 % half-width; Stage 1 alone; the paper's traceback on every episode;

* **oracle-gated (paper; uses ground truth)**: the paper's protocol, which runs Stage 2
  only on the episodes the ground truth says Stage 1 got wrong — for comparison with its
  table, not achievable in deployment;

* downstream-first rate, corrections that fixed / broke an answer, detections before the
  attack (threshold failures), misses, detection delay in steps, false-alarm rate on the
  store's clean episodes; the reward-drop and action-deviation baselines and chance;

* the paper's Table-2 analogue (high- vs low-influence pairs: instability occupancy,
  Q-drop, reward drop) and the interventional check (agents the graph calls infected vs
  agents that really diverged in the counterfactual).

Prints the table (rates in %) and writes it with `--out` (Parquet, every column, the
diagnoses recorded in its metadata) and `--markdown` (every column, with a legend).
Both files are replaced atomically.

A diagnosis that covers fewer episodes than its store lists (made with `--allow-partial`, or
a store damaged or appended since) is refused (exit 4); `--allow-partial` scores the
episodes it has, and every table title, the Markdown header and the Parquet metadata
(`coverage`) say how many.

Examples:

* `forensics evaluate stores/ss3-worst/diagnosis`
* `forensics evaluate stores/ss3-worst/diagnosis stores/ss5-worst/diagnosis
  --out results/table.parquet --markdown results/table.md`
"""

# What the terminal shows (keys of forensics.evaluate.COLUMNS), in tables narrow enough for
# 80 columns; the files hold every column.
VIEWS = {
    "Patient-0 accuracy": (
        "episodes", "deployable_acc", "deployable_ci95", "stage1_acc", "oracle_gated_acc",
    ),
    "Stage 2 and failure modes": (
        "stage2_acc", "downstream_first", "fixed", "broke", "threshold_failures", "misses", "delay",
    ),
    "False alarms and baselines": ("fpr_clean", "reward_acc", "actdev_acc", "chance"),
    "Explanations: Table-2 analogue, interventional check": (
        "io_high_ge_low", "qdrop_high_ge_low", "rdrop_high_ge_low", "pairs",
        "infected_precision", "infected_recall", "p0_first_diverged",
    ),
}  # fmt: skip
# the terminal's headers where the file's are long (the oracle-gated one is footnoted)
SHORT = {
    "oracle_gated_acc": "oracle-gated†", "deployable_ci95": "±95%", "calibration": "calib",
    "influence": "infl",
}  # fmt: skip


def evaluate(
    diag_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="Output directories of `forensics diagnose` (a STORE stands for its default "
            "STORE/diagnosis).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the table as Parquet here.")
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option("--markdown", "-m", help="Write the table as Markdown here.")
    ] = None,
    allow_partial: Annotated[
        bool,
        typer.Option(
            "--allow-partial",
            help="Score a diagnosis that covers fewer episodes than its store lists, or a "
            "store with unreadable chunks (default: refuse); every title says how many.",
        ),
    ] = False,
    long: Annotated[
        Path | None,
        typer.Option(
            "--long",
            help='Write the long-format figures (DESIGN.md "Results as data": Patient-0, FPR, '
            "AUC, delay median/p90 with 95 % intervals, per instrument, all and impactful "
            "episodes) as CSV here, and a readable view next to it (.md).",
        ),
    ] = None,
) -> None:
    from rich.console import Console

    from cli import one_line_errors
    from cli.diagnose import diagnosis_dir
    from forensics import evaluate as ev
    from forensics.store import atomic_write, current_code_version, write_table

    console = Console()
    diag_dirs = [diagnosis_dir(d) for d in diag_dirs]
    if any(_replay_referenced(d) for d in diag_dirs):
        with one_line_errors():
            _evaluate_replay(console, diag_dirs, out)
        return
    with one_line_errors():
        table = ev.evaluate(diag_dirs, allow_partial=allow_partial)
    note = partial_note(table.attrs.get("coverage", []))
    for title, columns in VIEWS.items():
        console.print(_view(table, title + note, columns))
    console.print(
        "Rates in %. deployable: our claim, nothing decided from the ground truth. "
        f"† {ev.ORACLE_LABEL}: the paper's protocol runs Stage 2 only on the episodes the "
        "ground truth marks as Stage-1 failures; for comparison only, not deployable."
    )
    if out is not None:
        meta = {
            "diagnoses": [str(d.resolve()) for d in diag_dirs],
            "code_version": current_code_version(),
            "coverage": table.attrs.get("coverage", []),
        }
        console.print(f"Wrote {write_table(table, out, metadata=meta)}")
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        header = f"**{note.lstrip('; ')}**\n\n" if note else ""
        atomic_write(markdown, (header + ev.markdown(table)).encode())
        console.print(f"Wrote {markdown}")
    if long is not None:
        import shlex

        command = shlex.join(["forensics", "evaluate", *map(str, diag_dirs), "--long", str(long)])
        with one_line_errors():
            rows = ev.long_table(diag_dirs, command, current_code_version())
        long.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(long, rows.to_csv(index=False, float_format="%.4g").encode())
        atomic_write(long.with_suffix(".md"), ev.long_markdown(rows).encode())
        console.print(f"Wrote {long} and {long.with_suffix('.md')}")


def _replay_referenced(diag_dir: Path) -> bool:
    import json

    summary = diag_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("setting") == (
        "replay-referenced"
    )


def _evaluate_replay(console, diag_dirs: list[Path], out: Path | None) -> None:
    """Diagnoses of ``forensics=paper`` / ``forensics=replay`` (forensics/paper.py): the
    paper's protocol with its scoring (oracle-gated, labelled) and ours, and our default
    instrument against the same replays, one row per figure."""
    import pandas as pd
    from rich import box
    from rich.table import Table

    from forensics.paper import evaluate_replay
    from forensics.store import write_table

    if not all(_replay_referenced(d) for d in diag_dirs):
        raise ValueError("evaluate: replay-referenced and log-only diagnoses in one table")
    frames = []
    for d in diag_dirs:
        rows, counts = evaluate_replay(d)
        frames.append(pd.DataFrame(rows).assign(diagnosis=str(d)))
        console.print(
            f"{d}: {counts['attacked']:,} attacked episodes, "
            f"{counts['skipped_no_qualifying_step']:,} not in the paper's protocol (no step "
            f"of the required D sign in t < "
            f"{counts['search_horizon']}), {counts['clean']:,} clean"
        )
    table = pd.concat(frames, ignore_index=True)
    view = Table(title="replay-referenced diagnosis (rates in %)", box=box.SIMPLE_HEAD)
    for c in ("setting", "instrument", "subset", "metric", "value", "ci95", "episodes"):
        right = c in ("value", "ci95", "episodes")
        view.add_column(c, justify="right" if right else "left", no_wrap=True)
    for _, r in table.iterrows():
        view.add_row(
            r["setting"], r["instrument"], r["subset"], r["metric"], f"{r['value']:g}",
            str(r["ci95"]), f"{r['episodes']:,}",
        )  # fmt: skip
    console.print(view)
    console.print(
        "patient0_paper_scored: the paper's scoring, oracle-gated (Stage 2 only on episodes the "
        "ground truth marks wrong; denominator: episodes with a detection); patient0: ours, "
        "strict. Replay-referenced rows need a simulator that replays each seed."
    )
    if out is not None:
        console.print(f"Wrote {write_table(table, out)}")


def partial_note(coverage: list[dict]) -> str:
    """``"; PARTIAL: 816 of 1,200 episodes"`` when a diagnosis covers fewer episodes than its
    store lists (only reachable with ``--allow-partial``), else ``""``."""
    if not any(c["partial"] for c in coverage):
        return ""
    have, listed = sum(c["episodes"] for c in coverage), sum(c["listed"] for c in coverage)
    return f"; PARTIAL: {have:,} of {listed:,} episodes (--allow-partial)"


def _view(table, title: str, columns: tuple[str, ...]):
    """One rich table: the group keys that vary joined into one row label, the constant ones
    in the title, then ``columns`` formatted as in the markdown table."""
    from rich import box
    from rich.table import Table

    from forensics.evaluate import COLUMNS, GROUP, _fmt

    varying = [g for g in GROUP if table[g].nunique() > 1]
    fixed = ", ".join(f"{g}={table[g].iloc[0]}" for g in GROUP if g not in varying)
    view = Table(
        title=f"{title} ({fixed})" if fixed else title, box=box.SIMPLE_HEAD, pad_edge=False
    )
    if varying:
        view.add_column("/".join(SHORT.get(g, g) for g in varying), no_wrap=True)
    for c in columns:
        header = SHORT.get(c, COLUMNS[c][0])
        view.add_column(header, justify="right", min_width=len(header) if c in SHORT else 5)
    for _, row in table.iterrows():
        label = ["/".join(str(row[g]) for g in varying)] if varying else []
        view.add_row(*label, *(_fmt(c, row.get(c)) for c in columns))
    return view


def register(app: typer.Typer) -> None:
    app.command("evaluate", help=HELP)(evaluate)
