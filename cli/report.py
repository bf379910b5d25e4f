"""``forensics report DIAG_DIR --episode K [--out FIG]``: one diagnosed episode as a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

HELP = """Draw one diagnosed episode: score timelines and its contagion graph.

Reads DIAG_DIR (written by `forensics diagnose`: scores.npz, verdicts.parquet,
graphs/K.json; a STORE stands for its default STORE/diagnosis) and, for the attack window
only, the ground truth of the store it diagnosed. One row per Stage-1 calibration (the
paper's band, ours):

* **score timelines**: each agent's normalised score z over the episode (symlog axis), its
  threshold (dashed) and watch level (dotted), its flag (circle), the Patient-0 candidate
  (star) and the attack window with its victim (ground truth, shaded);

* **contagion graph**: an arrow i → j per edge, width ∝ its weight C_ij, solid where the
  edge's evidence exceeds its clean threshold, the deployable traceback chain in red;
  the deployable Patient-0, the candidate and the infected agents coloured, the victim
  ringed.

Writes `--out` (.png, .pdf or .svg; default `DIAG_DIR/report-K.png`) atomically and
prints the episode's verdicts. Episode ids are those of the store (`verdicts.parquet`
lists them); an unknown id is refused with the range that exists.

Example: `forensics report stores/ss3-worst/diagnosis --episode 7 --out ep7.png`
"""


def report(
    diag_dir: Annotated[
        Path,
        typer.Argument(
            help="Output directory of `forensics diagnose` (or its STORE, for the "
            "default STORE/diagnosis)."
        ),
    ],
    episode: Annotated[int, typer.Option("--episode", "-e", help="Episode id to draw.")] = ...,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Figure file [default: DIAG_DIR/report-K.png]."),
    ] = None,
) -> None:
    from cli import one_line_errors
    from cli.diagnose import diagnosis_dir
    from forensics import report as rp
    from forensics.evaluate import load_diagnosis

    diag_dir = diagnosis_dir(diag_dir)
    out = out if out is not None else diag_dir / f"report-{episode}.png"
    with one_line_errors():
        diag = load_diagnosis(diag_dir)
        written = rp.save(rp.figure(diag, episode), out)
    typer.echo(f"episode {episode}: {rp.verdict_line(diag, episode)}")
    typer.echo(f"Wrote {written}")


def register(app: typer.Typer) -> None:
    app.command("report", help=HELP)(report)
