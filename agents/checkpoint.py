"""Orbax checkpoints of a training run: save, resume, and load a policy for evaluation.

A run directory holds ``checkpoints/<env_steps>/`` with three items:
  * ``state``  — the algorithm's whole TrainState (params, optimiser states, replay
    buffer, rng, counters), restored against ``jax.eval_shape(trainer.init, key)``;
  * ``policy`` — ``trainer.policy_params(state)`` (stacked actor/critic params), so that
    evaluation, attacks and forensics restore kilobytes instead of the replay buffer;
  * ``meta``   — JSON: resolved config, env spec, algo, env steps, chunk, code version.

Orbax writes each step into a temporary directory and renames it once every item is
complete, so a process killed mid-save (``kill -9``) leaves the previous checkpoint
intact and the half-written one invisible to ``latest_step``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from configs.schema import ConfigError
from envs import EnvSpec, MultiAgentEnv, make_env
from forensics.store import current_code_version

CHECKPOINT_DIR = "checkpoints"
# Config sections a checkpoint is bound to: resuming or evaluating under a different value
# of any of these would silently mix two experiments.
BOUND_SECTIONS = ("env", "algo", "seed")


def make_meta(
    config: Mapping[str, Any], spec: EnvSpec, env_steps: int, chunk: int
) -> dict[str, Any]:
    """The JSON metadata stored with every checkpoint."""
    return {
        "config": dict(config),
        "env_spec": dataclasses.asdict(spec),
        "algo": config["algo"]["name"],
        "env_steps": env_steps,
        "chunk": chunk,
        "code_version": current_code_version(),
    }


def manager(run_dir: str | Path, keep: int | None = None) -> ocp.CheckpointManager:
    """The run's checkpoint manager.

    A writer (``keep`` given) keeps the ``keep`` newest checkpoints and deletes
    half-written ones left by a killed process when it opens; a reader (``keep=None``)
    changes nothing, so evaluating while training runs is safe.
    """
    writer = keep is not None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=writer, cleanup_tmp_directories=writer
    )
    return ocp.CheckpointManager(Path(run_dir).resolve() / CHECKPOINT_DIR, options=options)


def save(
    mngr: ocp.CheckpointManager,
    state: Any,
    policy: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> None:
    """Checkpoint at step ``meta['env_steps']`` (returns once the write is committed)."""
    mngr.save(
        meta["env_steps"],
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            policy=ocp.args.StandardSave(policy),
            meta=ocp.args.JsonSave(dict(meta)),
        ),
    )
    mngr.wait_until_finished()


def latest_meta(mngr: ocp.CheckpointManager) -> dict[str, Any] | None:
    """Metadata of the newest complete checkpoint, or None if there is none."""
    step = mngr.latest_step()
    if step is None:
        return None
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_state(
    mngr: ocp.CheckpointManager, abstract_state: Any, meta: Mapping[str, Any] | None = None
) -> Any:
    """The newest TrainState, with the structure/shapes/dtypes of ``abstract_state``.

    A train state saved by code whose state layout differs (e.g. a replay buffer without
    a field this version records) cannot resume: ``ConfigError`` names the checkpoint and
    the code version that wrote it. Its policy still loads (``load_policy``)."""
    step = mngr.latest_step()
    try:
        restored = mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
    except ValueError as err:
        version = (meta or {}).get("code_version", "an unknown code version")
        raise ConfigError(
            f"{mngr.directory}/{step}: the train state was saved by code {version} with another "
            f"layout ({str(err).splitlines()[0][:120]}); resume it with that version, or start "
            "a new run (another out_dir= or run_name=); its policy still evaluates and attacks"
        ) from None
    return restored["state"]


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}"))
        return out
    return {prefix: tree}


# Fields added to the bound sections after checkpoints were written without them, with the
# value that reproduces how those checkpoints were trained: such a checkpoint still matches
# a config that leaves the new field at that value (and resumes).
ADDED_FIELDS: dict[str, Any] = {
    "algo.auto_reset": False,
    "algo.entropy_coef": 0.0,
    "algo.kl_anneal_env_steps": 0,
    "algo.kl_threshold_final": 0.001,
    "algo.layer_norm": False,
    "algo.n_step": 1,
    "algo.policy_gradient": "decentralised",
    "algo.sharing": "none",
}


def check_compatible(meta: Mapping[str, Any], config: Mapping[str, Any], where: str) -> None:
    """Raise ``ConfigError`` naming the first env/algo/seed field that differs from ``meta``."""
    for section in BOUND_SECTIONS:
        saved = _flatten(meta["config"].get(section), section)
        given = _flatten(config.get(section), section)
        for field in sorted(saved.keys() | given.keys()):
            # A field the checkpoint predates was trained at its ADDED_FIELDS value.
            trained = saved[field] if field in saved else ADDED_FIELDS.get(field)
            if trained != given.get(field):
                raise ConfigError(
                    f"{field}: the checkpoint in {where} was trained with "
                    f"{field}={trained!r}, but the config has {field}={given.get(field)!r}"
                    " (use the original config, or another run_name/out_dir for a new run)"
                )


class Policy(NamedTuple):
    """What evaluation, attacks and forensics need from a trained run."""

    env: MultiAgentEnv
    params: Mapping[str, Any]  # trainer.policy_params(state): stacked actor/critic params
    config: dict[str, Any]  # the run's resolved config
    env_steps: int
    run_dir: Path


def env_from_config(config: Mapping[str, Any]) -> MultiAgentEnv:
    return make_env(**config["env"])


def load_policy(run_dir: str | Path, config: Mapping[str, Any] | None = None) -> Policy:
    """Restore the newest checkpoint's policy params (not the train state) of a run.

    If ``config`` is given, it must agree with the checkpoint on env, algo and seed.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        raise FileNotFoundError(f"{run_dir}: no {CHECKPOINT_DIR}/ here; is this a run directory?")
    mngr = manager(run_dir)
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"{run_dir / CHECKPOINT_DIR}: no complete checkpoint")
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(meta=ocp.args.JsonRestore(), policy=ocp.args.StandardRestore()),
    )
    meta = restored["meta"]
    if config is not None:
        check_compatible(meta, config, str(run_dir))
    env = env_from_config(meta["config"])
    saved_spec = EnvSpec(**meta["env_spec"])
    if env.spec != saved_spec:
        raise ConfigError(
            f"{run_dir}: env_spec: the checkpoint's {saved_spec} differs from what this code "
            f"builds for the same config, {env.spec}"
        )
    return Policy(env, restored["policy"], meta["config"], meta["env_steps"], run_dir)


def policy_item(policy: Policy) -> Path:
    """The newest checkpoint's ``policy`` item of a loaded run: what an episode store's
    checkpoint hash identifies (acting needs only it, not the train state)."""
    path = policy.run_dir / CHECKPOINT_DIR / str(policy.env_steps) / "policy"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: the policy item of the newest checkpoint is missing")
    return path.resolve()


def greedy_act_fn(policy: Policy) -> Callable[[jax.Array, jax.Array | None], jax.Array]:
    """``(obs [N, O], avail [N, A] | None) -> env actions`` of the policy's deterministic
    (greedy) actors; ``avail`` masks illegal discrete actions."""
    algo = policy.config["algo"]
    if algo["name"] == "maddpg":
        from agents import maddpg

        actor, _ = maddpg.build_networks(policy.env.spec, maddpg.MaddpgConfig.from_mapping(algo))
        return functools.partial(maddpg.greedy_actions, actor, policy.params["actor"])
    if algo["name"] == "hatrpo":
        from agents import hatrpo

        cfg = hatrpo.HatrpoConfig.from_mapping(algo)
        return hatrpo.greedy_act_fn(policy.env.spec, cfg, policy.params)
    raise ConfigError(f"algo.name: no greedy policy for algorithm {algo['name']!r}")
