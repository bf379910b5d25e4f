"""``forensics fit-models RUN_DIR -c CLEAN_STORE [-o OUT] [fit.* overrides]``: fit the log-only
reference models (forensics/logonly/models.py) on clean episodes of their own seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

HELP = """Fit the log-only reference models on clean episodes of their own seeds.

Reads CLEAN_STORE (clean episodes recorded by RUN_DIR's newest checkpoint, e.g.
`forensics rollout RUN -o stores/fit --seeds 200000:200500 attack=none`) and fits, on all
but the last `fit.holdout` share of its episodes: per ordered pair (i ← j) a ridge model of
agent i's observation from teammate j's (cross-agent consistency), per agent a ridge model
of its observation from its previous one and its action (own dynamics), and per agent a
small MLP of its action from its teammates' observations (the Kazari et al. teammate model).
The held-out episodes give the residual scales, the CUSUM reference values and the fit
quality (R², NLL), printed and saved.

Writes OUT (default RUN_DIR/logonly-models) with the models and a meta.json recording the
checkpoint's sha256, the env, the store schema and the hash and seeds of the fit data;
`forensics diagnose STORE -c CALIB --models OUT` refuses models of another checkpoint, env
or schema, and seeds shared between the fit, calibration and scored stores.

Overrides: `fit.holdout=0.2 fit.sigma_floor=1e-3 fit.cusum_quantile=0.9
fit.teammate_epochs=40` (forensics/logonly/models.py:FitConfig).

Example: `forensics fit-models runs/simple_spread_3-maddpg-seed0 -c stores/ss3-fit -o
stores/ss3-models`
"""


def fit_models(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `forensics train`.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="fit.<field>=<value>.")] = None,
    clean: Annotated[
        Path, typer.Option("--clean", "-c", help="Store of clean episodes to fit on.")
    ] = ...,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory.")] = None,
) -> None:
    from cli import enable_compilation_cache, one_line_errors

    enable_compilation_cache()
    with one_line_errors(ValueError):
        import yaml

        from configs.schema import ConfigError
        from forensics.logonly import models, pipeline

        fields = {}
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep or not key.startswith("fit."):
                raise ConfigError(f"{item}: expected fit.<field>=<value>")
            fields[key.removeprefix("fit.")] = yaml.safe_load(value)
        cfg = models.FitConfig.from_mapping(fields)
        from cli.diagnose import DEFAULT_MODELS

        target = out if out is not None else run_dir / DEFAULT_MODELS
        meta = pipeline.fit_and_save(run_dir, clean, target, cfg)
    r = meta["report"]
    typer.echo(
        f"Fitted log-only models for {run_dir} on {r['fit_episodes']} clean episodes of {clean} "
        f"in {r['fit_seconds']:.1f} s; held out {r['holdout_episodes']} episodes:"
    )
    for name in ("crossagent", "dynamics"):
        if f"{name}_holdout_r2" in r:
            q = r[f"{name}_holdout_r2"]
            typer.echo(f"  {name}: held-out R² median {q['median']:.4f}, min {q['min']:.4f}")
    if "teammate_holdout_nll" in r:
        typer.echo(
            f"  teammate: held-out NLL {r['teammate_holdout_nll']:.3f} nats, accuracy "
            f"{100 * r['teammate_holdout_accuracy']:.1f} % "
            f"(train NLL {r['teammate_train_nll']:.3f})"
        )
    for name, why in r["unavailable"].items():
        typer.echo(f"  {name}: unavailable: {why}")
    typer.echo(f"Wrote {target}")


def register(app: typer.Typer) -> None:
    app.command("fit-models", help=HELP)(fit_models)
