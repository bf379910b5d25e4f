"""The training loop behind ``forensics train``: resumable chunks, metrics, checkpoints.

``run(config, run_dir)`` is idempotent in the run directory: it resumes from the newest
checkpoint there (refusing one made under a different env/algo/seed), calls the jitted
``trainer.train_chunk`` until ``train.total_env_steps`` is reached, appends one JSON line
of metrics per chunk to ``metrics.jsonl``, checkpoints every
``train.checkpoint_every_chunks`` chunks and at the end, then evaluates the final
checkpoint exactly as ``forensics evaluate-policy`` does.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
from omegaconf import OmegaConf
from rich.console import Console

from agents import checkpoint
from agents.trainer import Trainer, make_trainer
from cli import progress_bar
from cli.evaluate_policy import evaluate, summary_line
from configs.schema import ConfigError
from envs import JITTABLE_ENVS, MultiAgentEnv
from forensics.store import atomic_write, current_code_version

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.yaml"
HYDRA_DIR = ".hydra"


def build(config: Mapping[str, Any]) -> tuple[MultiAgentEnv, Trainer]:
    """Environment and trainer of a validated config; their own checks become ConfigErrors."""
    name = config["env"]["name"]
    if name not in JITTABLE_ENVS:
        raise ConfigError(
            f"env.name: {name} is the real game, for evaluation (forensics sc2-evaluate); "
            f"train on a jitted env ({', '.join(JITTABLE_ENVS)}), e.g. env=smax_3s_vs_3z"
        )
    try:
        env = checkpoint.env_from_config(config)
        return env, make_trainer(config["algo"]["name"], env, config["algo"])
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _write_records(
    run_dir: Path, config: Mapping[str, Any], hydra_record: Mapping[str, str], command: str
) -> None:
    """Hydra's ``.hydra/`` files, and our own record of the run: resolved config, code
    version, seed and command line."""
    (run_dir / HYDRA_DIR).mkdir(exist_ok=True)
    for name, text in hydra_record.items():
        atomic_write(run_dir / HYDRA_DIR / name, text)
    record = {
        "command": command,
        "code_version": current_code_version(),
        "seeds": {"seed": config["seed"], "init_key": f"jax.random.PRNGKey({config['seed']})"},
        "config": dict(config),
    }
    atomic_write(run_dir / RUN_FILE, OmegaConf.to_yaml(record))


def _truncate_metrics(path: Path, last_chunk: int) -> None:
    """Keep only complete lines of chunks ≤ ``last_chunk``: after a crash, the chunks past
    the restored checkpoint are re-run and must not appear twice."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["chunk"] <= last_chunk:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the crash
    atomic_write(path, "".join(kept))


def _to_json(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Device scalars → floats (NaN, e.g. losses before the first update, → null)."""
    out = {}
    for key, value in jax.device_get(dict(metrics)).items():
        value = float(value)
        out[key] = None if math.isnan(value) else value
    return out


def _initial_state(
    trainer: Trainer, mngr: Any, config: Mapping[str, Any], run_dir: Path
) -> tuple[Any, checkpoint.Resumed | None]:
    """(train state, what was resumed): the newest intact checkpoint's state after it was
    checked against ``config`` (``checkpoint.restore_train``), else a fresh state. Nothing
    in the run directory is written here."""
    init_key = jax.random.PRNGKey(config["seed"])
    abstract = jax.eval_shape(trainer.init, init_key)
    resumed = checkpoint.restore_train(mngr, abstract, config, str(run_dir))
    if resumed is None or resumed.state is None:  # jitted: one (cached) compile
        return jax.jit(trainer.init)(init_key), resumed
    return resumed.state, resumed


def _chunk_record(chunk: int, per_chunk: int, metrics: Mapping[str, Any], wall: float) -> dict:
    """One metrics.jsonl line: counters, the trainer's chunk metrics, throughput."""
    return {
        "chunk": chunk,
        "env_steps": chunk * per_chunk,
        **{k: v for k, v in _to_json(metrics).items() if k != "env_steps"},
        "env_steps_per_s": per_chunk / wall,
        "wall_s": wall,
    }


def _chunk_line(record: Mapping[str, Any]) -> str:
    shown = {k: v for k, v in record.items() if k not in ("chunk", "env_steps", "wall_s")}
    body = "  ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
    )
    return f"chunk {record['chunk']:>4}  env_steps {record['env_steps']:>10,}  {body}"


def run(
    config: Mapping[str, Any],
    run_dir: Path,
    hydra_record: Mapping[str, str] | None = None,
    console: Console | None = None,
    command: str | None = None,
) -> dict:
    """Train (or resume) the run in ``run_dir``; returns the final evaluation summary.

    ``hydra_record`` (file name → text) is written to ``run_dir/.hydra/`` once the newest
    intact checkpoint has been restored and matches the config (a refused or failed resume
    rewrites nothing: not run.yaml, not .hydra/, not metrics.jsonl); ``command`` (default:
    this process's command line) is recorded in ``run.yaml``. Damaged newer checkpoints
    that the resume skipped are moved to ``damaged_checkpoints/`` only then.
    """
    console = console or Console(soft_wrap=True)
    train = config["train"]
    env, trainer = build(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    mngr = checkpoint.manager(run_dir, keep=train["checkpoints_to_keep"])
    state, resumed = _initial_state(trainer, mngr, config, run_dir)
    chunk = 0 if resumed is None or resumed.meta is None else resumed.meta["chunk"]
    if resumed is not None and resumed.damaged:
        checkpoint.move_damaged(run_dir, resumed.damaged)
        mngr.reload()
    _write_records(run_dir, config, hydra_record or {}, command or shlex.join(sys.argv))
    if resumed is not None and resumed.meta is not None:
        steps = resumed.meta["env_steps"]
        console.print(f"Resuming {run_dir} from env step {steps:,} (chunk {chunk})")
    metrics_path = run_dir / METRICS_FILE
    _truncate_metrics(metrics_path, chunk)

    per_chunk = trainer.env_steps_per_chunk
    total_chunks = max(1, math.ceil(train["total_env_steps"] / per_chunk))
    bar_ctx = progress_bar(console, train["progress"], "env steps")
    with bar_ctx as progress, metrics_path.open("a") as log:
        total = total_chunks * per_chunk
        bar = progress.add_task("train", total=total, completed=chunk * per_chunk)
        while chunk < total_chunks:
            start = time.perf_counter()
            state, metrics = trainer.train_chunk(state)
            jax.block_until_ready(metrics)
            chunk += 1
            record = _chunk_record(chunk, per_chunk, metrics, time.perf_counter() - start)
            log.write(json.dumps(record) + "\n")
            log.flush()
            progress.console.print(_chunk_line(record))
            progress.update(bar, completed=chunk * per_chunk)
            if chunk % train["checkpoint_every_chunks"] == 0 or chunk == total_chunks:
                meta = checkpoint.make_meta(config, env.spec, chunk * per_chunk, chunk)
                checkpoint.save(mngr, state, trainer.policy_params(state), meta)
    mngr.close()
    where = run_dir / checkpoint.CHECKPOINT_DIR
    console.print(f"Checkpoint: {where} (env step {chunk * per_chunk:,})")

    if train["eval_episodes"] == 0:
        return {}
    result = evaluate(run_dir, episodes=train["eval_episodes"])
    console.print(summary_line(result))
    return result
