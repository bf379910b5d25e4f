"""``forensics sc2-rollout``'s recorder without the game: SMAX stepped from Python through the
very code path the real game takes (``agents.rollout.make_player`` inside
``cli.recording.record`` with a ``stepped_env``) must record what the jitted rollout
records, into a store that ``forensics diagnose`` reads unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import typer
from test_rollout_cli import untrained_checkpoint
from typer.testing import CliRunner

from agents import checkpoint
from agents import rollout as R
from agents.attacks import Attack, Target
from cli import recording
from cli.main import app
from configs.schema import ConfigError
from forensics import store as st

ATTACKED_SEEDS, CLEAN_SEEDS = np.arange(2), np.arange(100, 140)
FIELDS = ("obs_true", "obs_perceived", "actions", "clean_actions", "rewards", "avail")


class SteppedSmax:
    """SMAX driven step by step from Python, as ``Sc2Env`` is (``reset``/``step``/
    ``avail_actions``/``spec``); each call jitted so the test stays fast."""

    def __init__(self, env):
        self.spec = env.spec
        self.reset = jax.jit(env.reset)
        self.step = jax.jit(env.step)
        self.avail_actions = jax.jit(env.avail_actions)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """An untrained MADDPG checkpoint on SMAX 3m; an attacked store (worst action, every
    ordered pair, uniform onsets) and a clean calibration store, both Python-stepped."""
    root = tmp_path_factory.mktemp("sc2_rollout")
    run_dir = untrained_checkpoint(root / "run", env="smax_3m")
    policy = checkpoint.load_policy(run_dir)
    env = SteppedSmax(policy.env)
    stores = {}
    for name, overrides, seeds in [
        ("attacked", ["attack=worst_action"], ATTACKED_SEEDS),
        ("clean", ["attack=none"], CLEAN_SEEDS),
    ]:
        config = recording.rollout_config(overrides, policy.config, run_dir)
        config["attack"] = recording.stepped_attack_config(config["attack"], overrides)
        done = recording.record(root / name, policy, config, seeds, 1, stepped_env=env)
        stores[name] = (root / name, done)
    return run_dir, policy, stores


def contents(path):
    batches = list(st.open_store(path).iter_batches(batch_episodes=1 << 16))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_stepped_episodes_equal_the_jitted_rollout_of_the_same_keys_and_targets(recorded):
    """Every stored episode — clean and attacked, padded after the battle ends — equals
    what the jitted ``lax.scan`` rollout records from its replay key and target."""
    _, policy, stores = recorded
    got = contents(stores["attacked"][0])
    attacked = ~got["clean"]
    team, ap, cp = recording.team_of(policy)
    attack = Attack(name="worst_action", start=("uniform",))
    targets = Target(
        victim=jnp.asarray(np.maximum(got["victim"], 0), jnp.int32),
        observed=jnp.asarray(np.maximum(got["observed"], 0), jnp.int32),
        start=jnp.asarray(np.maximum(got["start"], 0), jnp.int32),
        window=jnp.asarray(got["window"], jnp.int32),
    )
    ref = R.make_rollout(policy.env, team, attack)(ap, cp, jnp.asarray(got["replay_key"]), targets)
    for field in FIELDS:
        np.testing.assert_array_equal(got[field], np.asarray(getattr(ref, field)), err_msg=field)
    ref_done = np.asarray(ref.done)
    np.testing.assert_array_equal(got["valid"], np.cumsum(ref_done, axis=1) - ref_done == 0)
    played = got["valid"].sum(axis=1)
    assert (played < policy.env.spec.episode_length).any()  # padding was exercised
    # the padding: frozen last observation, zero reward after the battle
    e = int(np.argmin(played))
    assert np.all(got["rewards"][e, played[e] :] == 0)
    assert np.all(got["obs_true"][e, played[e] :] == got["obs_true"][e, played[e]])
    # the attack acted: the victim's action differs from its clean one somewhere
    assert (got["actions"][attacked] != got["clean_actions"][attacked]).any()


def test_store_ground_truth_onsets_keys_and_sessions(recorded):
    _, policy, stores = recorded
    path, done = stores["attacked"]
    store = st.open_store(path)
    gt = store.ground_truth()
    n = policy.env.spec.num_agents
    per_seed = 1 + n * (n - 1)
    assert done.episodes == len(gt) == len(ATTACKED_SEEDS) * per_seed
    hit = gt[~gt["clean"]]
    assert set(hit["influence"]) == {"uniform"} and set(gt[gt["clean"]]["influence"]) == {"none"}
    assert sorted(set(hit["victim"])) == list(range(n))  # victims cycle over every agent
    assert (gt[gt["clean"]][["victim", "observed", "start"]] == -1).all().all()
    # onsets inside the seed's clean episode: start ≤ L_clean − window
    cols = contents(path)
    played = dict(
        zip(cols["seed"][cols["clean"]], cols["valid"][cols["clean"]].sum(1), strict=True)
    )
    limit = np.asarray([played[s] for s in hit["seed"]]) - hit["window"].to_numpy()
    assert np.all(hit["start"].to_numpy() <= np.maximum(limit, 0))
    late = np.sum(cols["start"][~cols["clean"]] >= cols["valid"][~cols["clean"]].sum(1))
    assert done.late_onsets == late
    # no two episodes share a replay key: nothing pairs game episodes as counterfactuals
    assert len({tuple(k) for k in cols["replay_key"].tolist()}) == len(gt)
    session = store.meta.sessions[0]["config"]
    assert session["rollout"] == {"played_in": "smax", "replayable": False}
    assert session["attack"]["start"] == ["uniform"]
    assert store.meta.env == st.open_store(stores["clean"][0]).meta.env


def test_diagnose_and_evaluate_read_the_stepped_stores_unchanged(recorded, tmp_path):
    run_dir, _, stores = recorded
    out = tmp_path / "diag"
    result = CliRunner().invoke(app, ["diagnose", str(stores["attacked"][0]), "--run",
        str(run_dir), "-c", str(stores["clean"][0]), "-o", str(out), "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    import pandas as pd

    verdicts = pd.read_parquet(out / "verdicts.parquet")
    assert len(verdicts) == stores["attacked"][1].episodes
    # evaluate too; with no replayable clean partner, the counterfactual columns stay empty
    table_path = tmp_path / "t.parquet"
    result = CliRunner().invoke(app, ["evaluate", str(out), "--out", str(table_path)])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(table_path)
    assert table["episodes"].max() == stores["attacked"][1].episodes - 2  # 2 clean
    assert table["infected_recall"].isna().all() and table["p0_first_diverged"].isna().all()


def test_stepped_and_jitted_episodes_never_share_a_store(recorded):
    _, _, stores = recorded
    cfg = st.open_store(stores["clean"][0]).meta.config["attack"]
    with pytest.raises(st.StoreError, match="holds episodes played in smax, this command"):
        recording.committed_seeds(stores["clean"][0], cfg)  # what `forensics rollout` calls


def test_influence_onsets_are_refused_for_stepped_envs():
    cfg = {"name": "worst_action", "start": ["high_influence"]}
    with pytest.raises(ConfigError, match="attack.start=high_influence: an env stepped"):
        recording.stepped_attack_config(cfg, ["attack.start=high_influence"])
    given = {"name": "worst_action", "start": ["high_influence", "low_influence"]}
    assert recording.stepped_attack_config(given, [])["start"] == ["uniform"]


def test_sc2_rollout_without_game_is_one_line_exit_6(tmp_path, monkeypatch):
    from cli import play_sc2

    sub = typer.Typer()
    sub.callback()(lambda: None)
    play_sc2.register(sub)
    monkeypatch.setenv("SC2PATH", str(tmp_path))
    args = ["sc2-rollout", str(tmp_path / "run"), "--map", "3m", "-o", str(tmp_path / "s")]
    result = CliRunner().invoke(sub, args)
    assert result.exit_code == 6  # cli.EXIT_MISSING_GAME
    assert result.output.strip().splitlines() == [
        f"error: set SC2PATH to a StarCraft II install (found none at {tmp_path}: "
        "no Versions/*/SC2_x64)"
    ]
    assert not (tmp_path / "s").exists()
