"""forensics/results.py rows and scripts/summarize.py: the figures' one home."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from forensics.results import COLUMNS, append_rows, make_row, read_rows

ROOT = Path(__file__).resolve().parents[1]
ROW = dict(
    env="simple_spread", algo="maddpg", n_agents=3, setting="log-only", instrument="verdict",
    metric="patient0", value=97.5, episodes=1200, command="forensics evaluate S", commit="abc",
)  # fmt: skip


def test_rows_round_trip_with_defaults_and_refuse_bad_columns(tmp_path):
    path = tmp_path / "r.csv"
    assert append_rows(path, [ROW, {**ROW, "subset": "impactful", "ci95": 1.2}]) == 2
    append_rows(path, [{**ROW, "metric": "fpr", "value": 4.0}])
    rows = read_rows(path)
    assert [r["metric"] for r in rows] == ["patient0", "patient0", "fpr"]
    assert rows[0]["fault"] == "none" and rows[0]["subset"] == "all" and rows[1]["ci95"] == "1.2"
    for bad, match in [
        ({**ROW, "colour": 1}, "unknown column 'colour'"),
        ({k: v for k, v in ROW.items() if k != "value"}, "missing column 'value'"),
        ({**ROW, "setting": "vibes"}, "setting 'vibes'"),
        ({**ROW, "value": float("nan")}, "not finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            make_row(**bad)
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other.csv: header"):
        append_rows(other, [ROW])
    thirteen = tmp_path / "design.csv"  # DESIGN.md's columns, without device
    thirteen.write_text(",".join(COLUMNS[:-1]) + "\n" + ",".join(["x"] * 13) + "\n")
    assert read_rows(thirteen)[0]["device"] == ""


def test_summary_and_every_generated_table_are_up_to_date():
    """A fragment added or a figure changed without `scripts/summarize.py` fails here."""
    result = subprocess.run(
        [sys.executable, ROOT / "scripts" / "summarize.py", "--check"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
