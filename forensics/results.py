"""Results as data: the long-format rows behind ``results/summary.csv``.

Every reported figure is one row (DESIGN.md, "Results as data"). A command that measures
something writes its rows to a fragment ``results/<name>.csv`` with these columns;
``scripts/summarize.py`` joins the fragments into ``results/summary.csv`` and writes the
README's tables from it, so prose quotes the file and never the reverse.

Columns: ``env, algo, n_agents, fault, setting, instrument, subset, metric, value, ci95,
episodes, command, commit, device``. ``device`` (not in DESIGN.md's first list) names the
machine a speed figure was measured on (``cpu`` rows of accuracy leave it empty: accuracy does
not depend on it); ``setting`` adds ``benchmark`` for speed rows, whose ``episodes`` column
holds the batch size (episodes, or parallel environments for training).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

COLUMNS = (
    "env",
    "algo",
    "n_agents",
    "fault",
    "setting",
    "instrument",
    "subset",
    "metric",
    "value",
    "ci95",
    "episodes",
    "command",
    "commit",
    "device",
)
SETTINGS = ("log-only", "replay-referenced", "paper-protocol", "training", "benchmark")
SUBSETS = ("all", "impactful")
OPTIONAL = {"ci95": "", "device": "", "fault": "none", "subset": "all"}


def make_row(**fields: Any) -> dict[str, Any]:
    """One row with every column; ``OPTIONAL`` columns default, the rest are required.
    ``ValueError`` naming the column for an unknown or missing one or a bad setting/subset."""
    unknown = sorted(set(fields) - set(COLUMNS))
    if unknown:
        raise ValueError(f"results row: unknown column {unknown[0]!r}; expected {COLUMNS}")
    row = {**OPTIONAL, **fields}
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise ValueError(f"results row: missing column {missing[0]!r}")
    if row["setting"] not in SETTINGS:
        raise ValueError(f"results row: setting {row['setting']!r}, expected one of {SETTINGS}")
    if row["subset"] not in SUBSETS:
        raise ValueError(f"results row: subset {row['subset']!r}, expected one of {SUBSETS}")
    value = float(row["value"])
    if not math.isfinite(value):
        raise ValueError(f"results row {row['metric']}: value {value} is not finite")
    return {c: row[c] for c in COLUMNS}


def append_rows(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Append rows (each through ``make_row``) to the CSV at ``path``, writing the header when
    the file is new; flushed per call so a run cut short keeps what it measured. Returns the
    number of rows written."""
    rows = [make_row(**r) for r in rows]
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != COLUMNS:
            raise ValueError(f"{path}: header {header} is not the results columns {COLUMNS}")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a results CSV, every column present (``device`` may be absent from the
    file: DESIGN.md's thirteen columns are a valid fragment); ``ValueError`` naming the file
    for any other header."""
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        header = tuple(reader.fieldnames or ())
        if header not in (COLUMNS, COLUMNS[:-1]):
            raise ValueError(f"{path}: header {list(header)} is not {list(COLUMNS)}")
        return [{**OPTIONAL, **row} if len(header) < len(COLUMNS) else row for row in reader]
