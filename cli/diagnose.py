"""``forensics diagnose STORE [--run RUN_DIR] --calibration CLEAN_STORE [--out DIAG_DIR]
[forensics.* overrides]``: per-episode verdicts, per-step scores and contagion graphs."""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_OUT = "diagnosis"  # DIAG_DIR defaults to STORE/diagnosis
DEFAULT_MODELS = "logonly-models"  # --models defaults to RUN_DIR/logonly-models when fitted

HELP = """Diagnose every episode of an episode store: who failed first, and how it spread.

Reads STORE (episodes recorded by `forensics rollout`), the checkpoint that recorded it
(`--run`, default: the run directory named in STORE/meta.json) and a **calibration
store** (`--calibration`): clean episodes (`forensics rollout RUN --seeds 1000:1100
attack=none`) of the same checkpoint with **seeds disjoint from STORE's**. Every
threshold is fitted on those clean episodes and on nothing else.

Per episode, in jitted batches vectorised over episodes × agents × steps:

* **Stage 1**: each agent's action-commitment cost J = −log π(τ|o) — by default with τ the
  action the log says it took (the cost of the committed action; `forensics=paper` selects
  the paper's Taylor-remainder statistic: greedy τ, sign probe, 5-step rolling mean) —
  onsets under two calibrations — the paper's per-step band |x − μ| > Kσ and ours, a
  per-episode false-alarm budget α — and the Patient-0 candidate (earliest flag, ties to
  the largest exceedance);

* **Stage 2**: critic sensitivities G and curvatures D (Hessian-vector products), the
  paper's traceback over [t_det − 4, t_det], our deployable traceback (a hop only where
  the calibrated edge evidence exceeds its clean quantile), the contagion graph
  C_ij = Σ e^(−λ(τ − t_det)) |G_ij^τ| with its evidence per edge.

* **Log-only instruments** (with `--models`, fitted by `forensics fit-models` on clean
  episodes of a third set of seeds): cross-agent consistency (each agent's observation
  predicted from each teammate's; an agent is suspect only when every teammate's view
  disagrees with its own), own-dynamics consistency, the greedy decision gap
  (log π(argmax) − log π(taken)) and the Kazari et al. teammate model, each with a per-agent
  CUSUM; thresholds held jointly at a per-episode false-alarm rate α on the calibration
  store; the **verdict** (columns `verdict_candidate`, `verdict_t_det`: the first agent to
  cross, −1 = no failure found) is their fused decision, else Stage 1 + the deployable
  Stage 2. An instrument the store or models cannot feed is named unavailable.

**Ground truth is never read**: the verdicts come from observations, actions and rewards
alone. `forensics evaluate` joins them with the ground truth afterwards.

Writes DIAG_DIR (default `STORE/diagnosis`), replaced as a whole only when complete:
`verdicts.parquet` (one row per episode, pandas/DuckDB open it), `scores.npz` (per-step
scores, z of every calibration, thresholds), `graphs/<episode_id>.json` (one contagion
graph per episode), `summary.json` (resolved config, code version, checkpoint, stores,
calibration, timings, command). Episodes whose scores are not finite (NaN/inf in the
store) are kept as `status = skipped: …` rows, never given a verdict; unreadable
chunks of a store are skipped with a warning and listed in the summary.

Arguments after STORE are Hydra overrides of the `forensics` config
(configs/forensics/default.yaml): `forensics.calibration.alpha=0.01`,
`forensics.calibration.paper_k=3`, `forensics.stage2.window=5`,
`forensics.stage1.eps=0.02`, `forensics.batch_episodes=128`.

Bad input — a store or calibration store of another checkpoint or env, shared seeds, a
missing `--calibration`, a bad override — is refused in one line before anything is
written.

Examples:

* `forensics diagnose stores/ss3-worst --calibration stores/ss3-clean`
* `forensics diagnose stores/ss3-worst --run runs/simple_spread_3-maddpg-seed0
  --calibration stores/ss3-clean --out diag/ss3 forensics.calibration.alpha=0.01`
"""


def diagnose(
    ctx: typer.Context,
    store: Annotated[
        Path, typer.Argument(help="Episode store to diagnose (written by `forensics rollout`).")
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Hydra overrides of the forensics config (forensics.key=value)."),
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option(
            "--run",
            "-r",
            help="Run directory whose newest checkpoint recorded STORE "
            "[default: the one named in STORE/meta.json].",
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            "-c",
            help="Store of clean episodes of the same checkpoint, seeds disjoint from STORE's.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output directory [default: STORE/diagnosis]."),
    ] = None,
    models: Annotated[
        Path | None,
        typer.Option(
            "--models",
            "-m",
            help="Log-only models (`forensics fit-models`): adds the cross-agent, own-dynamics, "
            "decision-gap and teammate instruments and makes their fused verdict the default "
            "[default: RUN_DIR/logonly-models when it exists].",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress spinner.")] = True,
) -> None:
    from rich.console import Console

    from cli import enable_compilation_cache, invocation, one_line_errors
    from forensics.diagnose import diagnose as run_diagnosis

    console, status = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    out = out if out is not None else store / DEFAULT_OUT
    enable_compilation_cache()
    with one_line_errors(), warnings.catch_warnings():
        # diagnose reports skipped chunks itself, in one line (below)
        warnings.filterwarnings("ignore", message=r"store .*: skipping chunk")
        config = forensics_config(overrides or [])
        check_out_dir(out)
        run_dir = run if run is not None else recorded_run_dir(store)
        if models is None and (run_dir / DEFAULT_MODELS / "meta.json").is_file():
            models = run_dir / DEFAULT_MODELS  # `forensics fit-models RUN`'s default output
        partial = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            with status.status(f"diagnosing {store}") if progress else nullcontext():
                summary = run_diagnosis(
                    store, run_dir, calibration, partial, config,
                    log=lambda line: status.print(line, highlight=False), models=models,
                )  # fmt: skip
            summary["command"] = invocation(ctx)
            (partial / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            replace_dir(partial, out)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    _report(console, out, summary)


def forensics_config(overrides: list[str]) -> dict[str, Any]:
    """The ``forensics`` section composed with ``overrides`` (each must be ``forensics.*``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cli.hydra_entry import compose_config
    from configs.schema import ConfigError

    for override in OverridesParser.create().parse_overrides(overrides):
        section = override.key_or_group.split(".")[0].split("/")[0]
        if section != "forensics":
            raise ConfigError(
                f"{override.input_line}: diagnose takes forensics.* overrides "
                f"(the env, algo and seed are the checkpoint's), not {section}"
            )
    return compose_config(overrides)["forensics"]


def recorded_run_dir(store: Path) -> Path:
    """The run directory of the checkpoint named in the store's metadata
    (``<run>/checkpoints/<env_steps>/policy``)."""
    from forensics.store import open_store

    return Path(open_store(store, on_corrupt="skip").meta.checkpoint["path"]).parents[2]


def check_out_dir(out: Path) -> None:
    """Refuse an output path that holds something other than an earlier diagnosis."""
    from forensics.diagnose import SUMMARY_FILE
    from forensics.store import StoreError

    if out.exists() and not (out.is_dir() and (
        (out / SUMMARY_FILE).is_file() or not any(out.iterdir()))):  # fmt: skip
        raise StoreError(
            f"--out {out}: exists and is not a `forensics diagnose` output "
            "directory; refusing to replace it"
        )


def diagnosis_dir(path: Path) -> Path:
    """``path`` itself, or ``path/diagnosis`` when ``path`` is a store diagnosed into its
    default output directory (so ``report``/``evaluate`` accept either)."""
    from forensics.diagnose import SUMMARY_FILE

    default = path / DEFAULT_OUT
    if not (path / SUMMARY_FILE).is_file() and (default / SUMMARY_FILE).is_file():
        return default
    return path


def replace_dir(new: Path, out: Path) -> None:
    """Move the complete diagnosis ``new`` to ``out``, replacing an earlier one: readers see
    the old directory or the new one, never a mixture (two renames)."""
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _report(console, out: Path, summary: dict[str, Any]) -> None:
    import pandas as pd
    from rich import box
    from rich.table import Table

    from forensics.diagnose import BASELINES, CALIBRATIONS, VERDICTS_FILE

    t, cal = summary["timings"], summary["calibration_store"]
    scored, skipped = summary["episodes_scored"], summary["episodes_skipped"]
    later = scored - summary["config"]["batch_episodes"]  # episodes after the first batch
    rate = f", then {later / t['steady_s']:,.0f} episodes/s" if later > 0 else ""
    console.print(
        f"Diagnosed {scored:,} episodes of {summary['store']['path']} in {t['total_s']:.1f} s "
        f"on {summary['device']} (checkpoint at env step {summary['env_steps']:,})"
    )
    console.print(
        f"  calibration: {cal['clean_episodes']:,} clean episodes of {cal['path']} in "
        f"{t['calibrate_s']:.1f} s ({cal['dropped_non_finite']} dropped as non-finite)"
    )
    console.print(
        f"  scoring: {t['batches']} batch(es) in {t['score_s']:.1f} s (first, incl. "
        f"compilation, {t['first_batch_s']:.1f} s{rate})"
    )
    if skipped or summary["store"]["skipped_chunks"]:
        console.print(
            f"  skipped: {skipped} episode(s) with non-finite scores, "
            f"{len(summary['store']['skipped_chunks'])} unreadable chunk(s)"
        )
    verdicts = pd.read_parquet(out / VERDICTS_FILE)
    ok = verdicts["status"] == "ok"
    detectors = {
        "paper": f"Stage 1, paper (K = {summary['paper_k']:g})",
        "budget": f"Stage 1, ours (α = {summary['config']['alpha']:g})",
        "reward": "baseline: reward drop",
        "actdev": "baseline: action deviation",
    }
    view = Table(title="Verdicts (no ground truth used)", box=box.SIMPLE_HEAD)
    for header in ("detector", "flagged", "Stage 2 overrules", "mean t_det"):
        view.add_column(header, justify="left" if header == "detector" else "right")
    for name in (*CALIBRATIONS, *BASELINES):
        cand, t_det = verdicts[f"{name}_candidate"][ok], verdicts[f"{name}_t_det"][ok]
        flagged = cand >= 0
        overrules = (
            f"{int((verdicts[f'{name}_deployable'][ok] != cand).sum()):,}"
            if name in CALIBRATIONS else "—"
        )  # fmt: skip
        view.add_row(
            detectors[name],
            f"{int(flagged.sum()):,} / {int(ok.sum()):,}",
            overrules,
            f"{t_det[flagged].mean():.1f}" if flagged.any() else "—",
        )
    console.print(view)
    lo = summary.get("logonly") or {}
    for name, why in lo.get("availability", {}).items():
        console.print(f"  log-only {name}: {why}")
    flagged = int((verdicts["verdict_candidate"][ok] >= 0).sum())
    console.print(
        f"Verdict ({summary['logonly']['verdict']}): {flagged:,} / {int(ok.sum()):,} "
        "episodes with a failure found"
    )
    console.print(f"Wrote {out}: verdicts.parquet, scores.npz, summary.json, graphs/")


def register(app: typer.Typer) -> None:
    app.command(
        "diagnose",
        help=HELP,
        context_settings={"ignore_unknown_options": True},
    )(diagnose)
