"""results/summary.csv and the tables the README and docs/ quote from it, in one pass.

    .venv/bin/python scripts/summarize.py [--check]

1. Every fragment ``results/*.csv`` (except summary.csv) is a set of rows a command
   measured (``forensics.results`` columns; its ``command`` column says which). They are
   validated and joined into ``results/summary.csv``, sorted, so the file changes only
   when a figure does.
2. Every Markdown file under the repository root and docs/ is scanned for blocks

       <!-- table:NAME -->
       …
       <!-- /table:NAME -->

   and the text between the markers is replaced by table NAME of ``TABLES``, built from
   summary.csv alone. Prose around a table quotes it; nothing in a table is typed by hand.

``--check`` writes nothing and exits 1 if summary.csv or a table is out of date (a test
runs it, so a fragment added without regenerating fails the suite).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forensics.results import COLUMNS, read_rows  # noqa: E402

RESULTS = ROOT / "results"
SUMMARY = RESULTS / "summary.csv"
MARKER = re.compile(
    r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S
)


def fragments() -> list[Path]:
    return sorted(p for p in RESULTS.glob("*.csv") if p != SUMMARY)


def summary_frame() -> pd.DataFrame:
    """All fragments' rows, validated, as one sorted frame of strings."""
    rows = [r for p in fragments() for r in read_rows(p)]
    frame = pd.DataFrame(rows, columns=list(COLUMNS)).fillna("")
    return frame.sort_values(list(COLUMNS)).reset_index(drop=True)


# ------------------------------------------------------------------ tables
PERCENT = (
    "patient0", "fpr", "auc", "action_changed", "share_hurt", "team_return_drop_pct",
    "patient0_paper_scored", "stage1_paper_scored", "stage2_always", "threshold_failures",
)  # fmt: skip


def _is_rate(metric: str) -> bool:
    """A percentage: shown, with its half-width, to one decimal."""
    return (
        metric in PERCENT
        or metric.endswith(("_accuracy", "within_tolerance@default"))
        or (metric.startswith("called_"))
    )


def _fmt(value: str, metric: str) -> str:
    x = float(value)
    if _is_rate(metric):
        return f"{x:.1f}"
    if metric.endswith("_per_s"):  # rates: millions past a million, else whole numbers
        return f"{x / 1e6:.3g} M" if x >= 1e6 else f"{x:,.0f}"
    if metric.endswith(("_s", "gib")):
        return f"{x:.1f}"
    return f"{x:.3g}"


def _order(column: pd.Series) -> pd.Series:
    """Sort key: numbers as numbers (10000 before 100000), other text as text."""
    numeric = pd.to_numeric(column, errors="coerce")
    return numeric if numeric.notna().all() else column


@dataclass(frozen=True)
class Col:
    """One table column: the ``metric`` of the rows matching ``instrument`` / ``subset``
    (None: any), shown with its ± 95 % half-width when the row has one."""

    label: str
    metric: str
    instrument: str | None = None
    subset: str | None = None
    show: str = "value ± ci"  # "value ± ci" | "value" | "episodes"


@dataclass(frozen=True)
class Table:
    """A pivot of summary rows: ``keep`` selects rows, ``index`` names the row labels (one
    table row per distinct value), ``columns`` what is shown."""

    keep: Callable[[pd.DataFrame], pd.Series]
    index: tuple[str, ...]
    index_labels: tuple[str, ...]
    columns: tuple[Col, ...]

    def render(self, frame: pd.DataFrame) -> str:
        rows = frame[self.keep(frame)]
        rows = rows.sort_values(list(self.index), key=_order, kind="stable")
        if rows.empty:
            return "_(no rows in results/summary.csv yet)_\n"
        lines = [
            "| " + " | ".join((*self.index_labels, *(c.label for c in self.columns))) + " |",
            "|" + "---|" * (len(self.index) + len(self.columns)),
        ]
        for key, group in rows.groupby(list(self.index), sort=False):
            cells = [self.cell(group, c) for c in self.columns]
            if any(cells):
                lines.append("| " + " | ".join((*map(str, key), *cells)) + " |")
        return "\n".join(lines) + "\n"

    @staticmethod
    def cell(group: pd.DataFrame, col: Col) -> str:
        hit = group["metric"] == col.metric
        if col.instrument is not None:
            hit &= group["instrument"] == col.instrument
        if col.subset is not None:
            hit &= group["subset"] == col.subset
        if not hit.any():
            return ""
        row = group[hit].iloc[0]
        if col.show == "episodes":
            return f"{int(float(row['episodes'])):,}"
        text = _fmt(row["value"], col.metric)
        if col.show == "value" or row["ci95"] in ("", "nan"):
            return text
        ci = float(row["ci95"])
        return text + (f" ± {ci:.1f}" if _is_rate(col.metric) else f" ± {ci:.2g}")


def _gpu(frame: pd.DataFrame) -> pd.Series:
    return (frame["setting"] == "benchmark") & frame["device"].str.startswith("gpu")


def _cols(*spec: tuple[str, str]) -> tuple[Col, ...]:
    return tuple(Col(label, metric) for label, metric in spec)


OLD = "stage1+stage2 (old default)"
TABLES: dict[str, Table] = {
    "gpu-diagnose": Table(
        keep=lambda f: (
            _gpu(f)
            & f["instrument"].isin(
                ["rollout", "critic_geometry", "diagnose:paper", "diagnose:default"]
            )
        ),
        index=("device", "instrument", "episodes", "commit"),
        index_labels=("device", "what", "episodes (batch 5,000)", "commit"),
        columns=_cols(
            ("episodes/s", "episodes_per_s"),
            ("HVP/s", "hvp_per_s"),
            ("compile s", "compile_s"),
            ("compile measure s", "compile_measure_s"),
            ("compile decide s", "compile_decide_s"),
        ),
    ),  # fmt: skip
    "gpu-train": Table(
        keep=lambda f: _gpu(f) & (f["instrument"] == "train"),
        index=("device", "algo", "n_agents", "episodes", "commit"),
        index_labels=("device", "algo", "N", "parallel envs", "commit"),
        columns=_cols(("env-steps/s", "env_steps_per_s"), ("compile s", "compile_s")),
    ),
    "gpu-numerics": Table(
        keep=lambda f: _gpu(f) & f["instrument"].str.startswith("numerics:"),
        index=("device", "instrument", "commit"),
        index_labels=("device", "case", "commit"),
        columns=_cols(
            ("worst / tolerance, GPU default (TF32)", "worst_over_tolerance@default"),
            ("% of arrays within, default", "within_tolerance@default"),
            ("worst / tolerance, float32", "worst_over_tolerance@highest"),
            ("% within, float32", "within_tolerance@highest"),
        ),
    ),
    "logonly-verdict": Table(
        keep=lambda f: (f["setting"] == "log-only") & (f["fault"] != "none"),
        index=("env", "algo", "n_agents", "fault"),
        index_labels=("env", "algo", "N", "fault"),
        columns=(
            Col("impactful", "patient0", "verdict", "impactful", "episodes"),
            Col("all", "patient0", "verdict", "all", "episodes"),
            Col("**verdict** P0 impactful", "patient0", "verdict", "impactful"),
            Col("verdict P0 all", "patient0", "verdict", "all", "value"),
            Col("AUC impactful", "auc", "verdict", "impactful", "value"),
            Col("AUC all", "auc", "verdict", "all", "value"),
            Col("delay median", "delay_median", "verdict", "impactful", "value"),
            Col("delay p90", "delay_p90", "verdict", "impactful", "value"),
            Col("old default P0 impactful", "patient0", OLD, "impactful", "value"),
            Col("decision", "patient0", "decision", "impactful", "value"),
            Col("cross-agent", "patient0", "crossagent", "impactful", "value"),
            Col("own-dynamics", "patient0", "dynamics", "impactful", "value"),
            Col("teammate (Kazari)", "patient0", "teammate (Kazari et al.)", "impactful", "value"),
        ),
    ),
    "logonly-fpr": Table(
        keep=lambda f: (f["setting"] == "log-only") & (f["fault"] == "none"),
        index=("env", "algo", "n_agents", "instrument"),
        index_labels=("env", "algo", "N", "instrument"),
        columns=(
            Col("clean FPR (%)", "fpr", subset="all"),
            Col("clean episodes", "fpr", subset="all", show="episodes"),
        ),
    ),
    "paper-protocol": Table(
        keep=lambda f: (
            f["setting"].isin(["paper-protocol", "replay-referenced"])
            & f["instrument"].isin(["paper", "verdict", "stage1"])
        ),
        index=("env", "algo", "n_agents", "setting", "instrument", "subset"),
        index_labels=("env", "algo", "N", "setting", "instrument", "subset"),
        columns=(
            Col("episodes", "patient0", show="episodes"),
            Col("paper-scored, oracle-gated (%)", "patient0_paper_scored"),
            Col("Stage 1, paper-scored (%)", "stage1_paper_scored"),
            Col("**strict Patient-0** (%)", "patient0"),
            Col("paper traceback on every episode (%)", "stage2_always"),
            Col("clean FPR (%)", "fpr"),
            Col("threshold failures (%)", "threshold_failures", show="value"),
        ),
    ),
    "fault-class": Table(
        keep=lambda f: (
            f["metric"].isin(
                ["fault_class_accuracy", "called_sensor", "called_action", "feature_group_accuracy"]
            )
            & (f["subset"] == "impactful")
        ),
        index=("env", "algo", "n_agents", "fault"),
        index_labels=("env", "algo", "N", "fault"),
        columns=(
            Col("episodes (Patient-0 found)", "fault_class_accuracy", show="episodes"),
            Col("**right class** (%)", "fault_class_accuracy"),
            Col("called sensor (%)", "called_sensor", show="value"),
            Col("called action side (%)", "called_action", show="value"),
            Col("right feature group (%)", "feature_group_accuracy"),
        ),
    ),
    "fault-efficacy": Table(
        keep=lambda f: f["instrument"] == "efficacy",
        index=("env", "algo", "n_agents", "fault"),
        index_labels=("env", "algo", "N", "fault"),
        columns=_cols(
            ("team-return drop", "team_return_drop"),
            ("drop % of clean", "team_return_drop_pct"),
            ("victim's action changed (%)", "action_changed"),
            ("hurt (%)", "share_hurt"),
        ),
    ),  # fmt: skip
}


def render_tables(frame: pd.DataFrame, text: str, where: Path) -> str:
    def replace(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise SystemExit(f"{where}: table {name!r} is not one of {sorted(TABLES)}")
        return m.group(1) + TABLES[name].render(frame) + m.group(4)

    return MARKER.sub(replace, text)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if anything is stale")
    args = parser.parse_args(argv)
    frame = summary_frame()
    csv_text = frame.to_csv(index=False, lineterminator="\n")
    stale = []
    outputs = {SUMMARY: csv_text}
    for doc in documents():
        if doc.exists():
            text = doc.read_text()
            outputs[doc] = render_tables(frame, text, doc)
    for path, text in outputs.items():
        if not path.exists() or path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.write_text(text)
    rel = [str(p.relative_to(ROOT)) for p in stale]
    if args.check:
        if rel:
            print(f"out of date (run scripts/summarize.py): {', '.join(rel)}")
            return 1
        print(f"summary.csv and tables up to date ({len(frame)} rows)")
        return 0
    done = ", ".join(rel) or "nothing"
    print(f"{len(frame)} rows from {len(fragments())} fragments; rewrote {done}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
