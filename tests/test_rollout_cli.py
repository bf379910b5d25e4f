"""``forensics rollout`` end to end: a checkpoint trained by ``forensics train`` (maddpg_smoke)
→ the paired worst-action protocol recorded into an episode store → ground truth, replay,
efficacy table; determinism across processes; resume after an interruption; refusals."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agents import checkpoint
from agents import rollout as R
from cli import recording
from cli.hydra_entry import compose_config
from cli.main import app
from cli.training import build
from forensics import store as st

FORENSICS = str(Path(sys.executable).with_name("forensics"))
N, T = 3, 25
PER_SEED = 1 + N * (N - 1) * 2  # clean + every ordered pair × {high, low}
SEEDS, CHUNK = "0:5", "2"  # three chunks: 2 + 2 + 1 seeds


def forensics(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FORENSICS, *args], capture_output=True, text=True, timeout=300, check=False
    )


def invoke(*args: str | Path):
    """The same command in this process (no interpreter start-up; compiled code reused)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def rollout_args(run_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["rollout", str(run_dir), "-o", str(out), "--seeds", SEEDS, "--chunk-seeds", CHUNK,
            "--no-progress", *extra]  # fmt: skip


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` → sha256 of its bytes."""
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def contents(store_path: Path) -> dict[str, np.ndarray]:
    """All columns of all episodes, in store order."""
    batches = list(st.open_store(store_path).iter_batches(batch_episodes=1 << 16))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def untrained_checkpoint(run_dir: Path, **config: object) -> Path:
    """A real Orbax checkpoint of a freshly initialised policy (no training: cheap)."""
    overrides = ["algo=maddpg_smoke", *(f"{k}={v}" for k, v in config.items())]
    full = compose_config(overrides)
    env, trainer = build(full)
    state = trainer.init(jax.random.PRNGKey(full["seed"]))
    mngr = checkpoint.manager(run_dir, keep=1)
    meta = checkpoint.make_meta(full, env.spec, env_steps=0, chunk=0)
    checkpoint.save(mngr, state, trainer.policy_params(state), meta)
    mngr.close()
    return run_dir


@pytest.fixture(scope="module")
def recorded(run_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The default protocol (worst_action, high + low) over SEEDS, through the CLI."""
    out = tmp_path_factory.mktemp("stores") / "worst"
    result = forensics(*rollout_args(run_dir, out))
    assert result.returncode == 0, result.stderr
    return out, result


def test_paired_protocol_store_has_the_episodes_and_ground_truth(recorded, run_dir):
    out, result = recorded
    store = st.open_store(out)
    gt = store.ground_truth()
    assert len(gt) == 5 * PER_SEED and gt.groupby("seed").size().eq(PER_SEED).all()
    assert gt["episode_id"].tolist() == list(range(5 * PER_SEED))  # seed·13 + m, in order
    clean, hit = gt[gt["clean"]], gt[~gt["clean"]]
    assert clean["seed"].tolist() == [0, 1, 2, 3, 4] and (clean["episode_id"] % PER_SEED == 0).all()
    assert (clean[["victim", "observed", "start"]] == -1).all().all()
    assert (clean["window"] == 0).all() and (clean["influence"] == "none").all()
    assert (clean["attack"] == "none").all()
    # every ordered pair × {high, low} once per seed, onsets in the searched first 25 %
    pairs = hit.groupby("seed").apply(
        lambda g: sorted(zip(g["victim"], g["observed"], g["influence"], strict=True))
    )
    want = sorted((i, j, c) for i in range(N) for j in range(N) if i != j for c in ("high", "low"))
    assert all(p == want for p in pairs)
    assert (hit["attack"] == "worst_action").all() and (hit["window"] == 5).all()
    assert hit["start"].between(0, int(0.25 * T) - 1).all() and (hit["magnitude"] == 1.0).all()

    ep = contents(out)
    # the victim's action differs from the clean policy's exactly inside its window
    t = np.arange(T)
    window = (t >= ep["start"][:, None]) & (t < (ep["start"] + ep["window"])[:, None])
    victim = np.arange(N) == ep["victim"][:, None, None]
    assert np.array_equal(ep["actions"] != ep["clean_actions"], window[..., None] & victim)
    assert np.array_equal(ep["obs_perceived"], ep["obs_true"]) and ep["valid"].all()
    # what is stored is enough to replay: the env alone, from the key and the actions
    env = checkpoint.load_policy(run_dir).env
    obs, rewards = jax.jit(jax.vmap(functools.partial(R.replay_actions, env)))(
        ep["replay_key"], ep["actions"]
    )
    assert np.array_equal(obs, ep["obs_true"]) and np.array_equal(rewards, ep["rewards"])

    meta = store.meta
    policy = checkpoint.load_policy(run_dir)
    assert meta.checkpoint["sha256"] == recording.policy_identity(policy)["sha256"]
    assert meta.seeds == list(range(5)) and meta.sessions[0]["code_version"]
    assert meta.config["attack"]["name"] == "worst_action"
    assert meta.config["env"] == policy.config["env"]
    assert meta.config["rollout"]["seeds"] == SEEDS


def test_efficacy_table_is_printed_and_saved(recorded):
    out, result = recorded
    table = pd.read_parquet(out / recording.EFFICACY_FILE)
    assert table["start"].tolist() == ["high_influence", "low_influence"]
    assert table["episodes"].tolist() == [5 * N * (N - 1)] * 2
    gt = recording.team_returns(st.open_store(out))
    high = gt[gt["influence"] == "high"]["team_return"].mean()
    assert table["attacked_return"][0] == pytest.approx(high)
    assert table["clean_return"][0] == pytest.approx(gt[gt["clean"]]["team_return"].mean())
    assert 0 <= table["high_beats_low"][0] <= 1
    # the worst action (argmin of the logits) is never the greedy choice: always changed
    assert table["action_changed"].tolist() == [1.0, 1.0]
    assert "Attack efficacy, worst_action" in result.stdout and "high>low" in result.stdout
    assert "changed" in result.stdout
    assert st.read_table_metadata(out / recording.EFFICACY_FILE)["episodes"] == 5 * PER_SEED


def test_same_command_gives_an_identical_store(recorded, run_dir, tmp_path):
    out, _ = recorded
    again = tmp_path / "again"
    result = forensics(*rollout_args(run_dir, again))
    assert result.returncode == 0, result.stderr
    a, b = contents(out), contents(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    manifests = [json.loads((p / "manifest.json").read_text()) for p in (out, again)]
    assert [[c["sha256"] for c in m["chunks"]] for m in manifests] == [
        [c["sha256"] for c in manifests[0]["chunks"]]
    ] * 2  # byte-identical chunks


def test_rerun_after_an_interruption_resumes_without_duplicates(recorded, run_dir, tmp_path):
    out = tmp_path / "resumed"
    policy = checkpoint.load_policy(run_dir)
    config = recording.rollout_config([], policy.config, run_dir)

    def stop_after_first_chunk(episodes: int) -> None:
        if episodes and st.open_store(out).n_episodes:
            raise KeyboardInterrupt  # as Ctrl-C while the second chunk computes

    with pytest.raises(KeyboardInterrupt):
        recording.record(
            out, policy, config, recording.parse_seeds(SEEDS), int(CHUNK), stop_after_first_chunk
        )
    assert st.open_store(out).ground_truth()["seed"].unique().tolist() == [0, 1]
    stray = out / "chunks" / "chunk-000001.parquet"  # as a crash between rename and commit
    stray.write_bytes(b"half-written")

    with pytest.warns(UserWarning, match=r"removing 1 uncommitted file\(s\)"):
        result = invoke(*rollout_args(run_dir, out))
    assert result.exit_code == 0, result.output
    assert "2 of the seeds were recorded" in result.stdout
    whole, resumed = contents(recorded[0]), contents(out)
    assert all(np.array_equal(whole[k], resumed[k]) for k in whole)  # no loss, no duplicate
    assert [s["seeds"] for s in st.open_store(out).meta.sessions] == [[0, 1, 2, 3, 4], [2, 3, 4]]

    before = snapshot(out)
    finished = invoke(*rollout_args(run_dir, out))
    assert finished.exit_code == 0 and "Nothing to record" in finished.stdout
    assert snapshot(out) == before


@pytest.fixture(scope="module")
def other_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("other")
    return {
        "env": untrained_checkpoint(root / "n5", **{"env": "simple_spread_5"}),
        "seed": untrained_checkpoint(root / "seed1", seed=1),
    }


@pytest.mark.parametrize(
    "case,message",
    [
        ("unknown_attack", "Could not find 'attack/foo'; Available options in 'attack': "),
        ("negative_epsilon", "attack.epsilon: expected a number >= 0, got -0.1"),
        ("env_override", "env.num_agents=5: the checkpoint in "),
        ("another_attack", "recorded with attack.name='worst_action', this command has"),
        ("another_env", "env num_agents is 3 on disk, 5 requested; refusing to append"),
        ("another_checkpoint", "written from checkpoint "),
        ("another_schema", "field 'critic_actions' is float32"),
        ("bad_seeds", "--seeds: expected START:STOP"),
        ("not_a_store", "exists, is not empty and has no meta.json"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    case, message, recorded, run_dir, other_checkpoints, tmp_path
):
    out = recorded[0]
    run, extra = run_dir, []
    if case == "unknown_attack":
        extra = ["attack=foo"]
    elif case == "negative_epsilon":
        extra = ["attack=obs_fgsm", "attack.epsilon=-0.1"]
    elif case == "env_override":
        extra = ["env=simple_spread_5"]
    elif case == "another_attack":
        extra = ["attack=obs_fgsm"]
    elif case == "another_env":
        run = other_checkpoints["env"]
    elif case == "another_checkpoint":
        run = other_checkpoints["seed"]
    elif case == "another_schema":
        out = tmp_path / "schema"
        policy = checkpoint.load_policy(run_dir)
        with st.StoreWriter(out, policy.env.spec, checkpoint=recording.policy_identity(policy),
                            config={}, seeds=[], optional_fields=["critic_actions"]):  # fmt: skip
            pass
    elif case == "bad_seeds":
        extra = ["--seeds", "3:x"]
    elif case == "not_a_store":
        out = run_dir
    before = snapshot(out)
    result = invoke("rollout", run, "-o", out, "--no-progress", *extra)
    config_cases = ("unknown_attack", "negative_epsilon", "env_override", "bad_seeds")
    # cli.EXIT_CODES: 3 a bad config value or override, 4 a store that holds something else
    assert result.exit_code == (3 if case in config_cases else 4), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert snapshot(out) == before
