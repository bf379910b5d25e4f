"""Never a silent wrong answer (issue 22): what stores and checkpoints hold is validated on
read, damaged checkpoints fall back or fail in one line, seeds obey one rule, every error
class has one exit status. Small generated stores (``test_store.make_batch``) and a tiny
real checkpoint (``algo=maddpg_smoke``, untrained state) keep each test to seconds; the
CLI-level store cases (diagnose/evaluate on damaged stores) are in ``test_diagnose.py``."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_store import DISCRETE, make_batch, writer
from typer.testing import CliRunner

from agents import checkpoint
from agents.attacks import Attack
from cli import EXIT_CODES, exit_code
from cli.main import app
from cli.recording import parse_seeds
from configs.schema import ConfigError, check_attack_fits
from forensics import store as st
from forensics.store import CheckpointError, StoreError

REPO = Path(__file__).resolve().parent.parent
FORENSICS = str(Path(sys.executable).with_name("forensics"))


# --------------------------------------------------------------------------- stores


def two_chunk_store(path: Path, edit=None) -> Path:
    """A valid store of two chunks (ids 0–5, 6–9), optionally with ``edit(batch)`` applied
    to the first before it is written *without* the writer's checks (as another tool, a
    hand edit or bit rot would), its size and hash committed to the manifest."""
    with writer(path) as w:
        w.append(make_batch(DISCRETE, range(0, 6)))
        w.append(make_batch(DISCRETE, range(6, 10)))
    if edit is not None:
        store = st.open_store(path)
        arrays = make_batch(DISCRETE, range(0, 6))
        edit(arrays)
        data = st._encode_chunk(store.columns, arrays)
        commit_chunk(path, 0, data)
    return path


def commit_chunk(path: Path, index: int, data: bytes) -> None:
    """Replace committed chunk ``index`` by ``data`` and record its size and hash."""
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "chunks" / manifest["chunks"][index]["file"]).write_bytes(data)
    manifest["chunks"][index].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (path / "manifest.json").write_text(json.dumps(manifest))


def read_everything(path: Path) -> None:
    """What every reader does: open, stream all fields, one episode, the ground truth."""
    store = st.open_store(path)
    for _ in store.iter_batches(None, 4):
        pass
    store.episode(0)
    store.ground_truth()


def set_at(field, index, value):
    return lambda b: b[field].__setitem__(index, value)


@pytest.mark.parametrize(
    "edit,message",
    [
        (set_at("actions", (3, 10, 0), 7), "column 'actions', episode 3: value 7 outside [0, 5)"),
        (set_at("actions", (3, 10, 0), -1), "column 'actions', episode 3: value -1 outside [0, 5)"),
        (set_at("clean_actions", (2, 0, 1), 5), "column 'clean_actions', episode 2: value 5"),
        (set_at("victim", 1, 3), "column 'victim', episode 1: value 3 outside [-1, 3)"),
        (set_at("start", 1, 25), "column 'start', episode 1: value 25 outside [-1, 25)"),
        (set_at("influence", 1, "junk"), "column 'influence', episode 1: value 'junk' is not"),
    ],
    ids=["action_7", "action_-1", "clean_action_5", "victim", "start", "influence"],
)
def test_values_outside_the_recorded_ranges_are_refused_on_read(tmp_path, edit, message):
    path = two_chunk_store(tmp_path / "s", edit)
    with pytest.raises(StoreError) as err:
        read_everything(path)
    text = str(err.value)
    assert "\n" not in text and f"store {path}: chunk chunk-000000.parquet, {message}" in text


def test_a_clean_action_the_mask_forbids_is_refused(tmp_path):
    """The policy's own (greedy, masked) actions must be legal under the recorded masks."""
    with writer(tmp_path / "s", optional_fields=["avail"]) as w:
        batch = make_batch(DISCRETE, range(0, 4))
        batch["avail"] = np.ones((4, 25, 3, 5), bool)
        w.append(batch)
    store = st.open_store(tmp_path / "s")
    arrays = {**batch, "avail": batch["avail"].copy()}
    arrays["avail"][2, 4, 1, arrays["clean_actions"][2, 4, 1]] = False
    commit_chunk(tmp_path / "s", 0, st._encode_chunk(store.columns, arrays))
    with pytest.raises(StoreError, match=r"'clean_actions', episode 2: agent 1 at step 4 took"):
        read_everything(tmp_path / "s")
    # masked-out steps past the episode's end (valid False) are not checked
    arrays["valid"][2, 4:] = False
    commit_chunk(tmp_path / "s", 0, st._encode_chunk(store.columns, arrays))
    read_everything(tmp_path / "s")


def test_float_actions_with_nan_and_nulls_in_int_columns_are_refused(tmp_path):
    path = two_chunk_store(tmp_path / "s")
    chunk = path / "chunks" / "chunk-000000.parquet"
    table = pq.read_table(chunk)
    floats = table.column("actions").combine_chunks().flatten().to_numpy().astype(np.float32)
    floats[7] = np.nan
    actions = pa.FixedSizeListArray.from_arrays(pa.array(floats), 75)
    for name, column in [
        ("actions", actions),
        ("victim", pa.array([None, *table.column("victim").to_pylist()[1:]], pa.int32())),
    ]:
        edited = table.set_column(table.schema.get_field_index(name), name, column)
        sink = pa.BufferOutputStream()
        pq.write_table(edited, sink)
        commit_chunk(path, 0, sink.getvalue().to_pybytes())
        with pytest.raises(StoreError) as err:
            read_everything(path)
        text = str(err.value)
        assert "chunk-000000.parquet" in text and f"'{name}'" in text, text
        if name == "actions":
            assert "stored as float × 75; meta.json declares int32 [B, 25, 3]" in text
        else:
            assert "episode 0: null/NaN value; meta.json declares int32 [B]" in text


def test_manifest_inconsistencies_are_refused(tmp_path):
    # a chunk listed twice: every episode of it would count twice
    twice = two_chunk_store(tmp_path / "twice")
    manifest = json.loads((twice / "manifest.json").read_text())
    manifest["chunks"].append(manifest["chunks"][0])
    (twice / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="lists chunk chunk-000000.parquet twice"):
        st.open_store(twice, on_corrupt="skip")  # never skippable
    # the same episodes under two chunk names
    copied = two_chunk_store(tmp_path / "copied")
    manifest = json.loads((copied / "manifest.json").read_text())
    (copied / "chunks" / "chunk-000009.parquet").write_bytes(
        (copied / "chunks" / "chunk-000000.parquet").read_bytes()
    )
    manifest["chunks"].append({**manifest["chunks"][0], "file": "chunk-000009.parquet"})
    (copied / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"chunk-000009.parquet, column 'episode_id', episode 0: "
                       "also in chunk chunk-000000.parquet"):  # fmt: skip
        st.open_store(copied)
    # ids outside the range the manifest records for the chunk
    shifted = two_chunk_store(tmp_path / "shifted")
    manifest = json.loads((shifted / "manifest.json").read_text())
    manifest["chunks"][1]["first_id"] = 7
    (shifted / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"episode 6: outside the range \[7, 9\]"):
        st.open_store(shifted)


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_missing_or_truncated_chunk_is_an_error_unless_partial_is_allowed(tmp_path, damage):
    path = two_chunk_store(tmp_path / "s")
    chunk = path / "chunks" / "chunk-000001.parquet"
    chunk.unlink() if damage == "deleted" else chunk.write_bytes(chunk.read_bytes()[:-100])
    with pytest.raises(StoreError) as err:
        st.open_store(path)
    assert "chunk chunk-000001.parquet" in str(err.value)
    assert "4 of 10 episodes unreadable (diagnose, evaluate: --allow-partial" in str(err.value)
    with pytest.warns(UserWarning, match="skipping chunk chunk-000001"):
        partial = st.open_store(path, on_corrupt="skip")
    assert partial.partial and partial.n_episodes == 6 and partial.manifest_episodes == 10
    assert not st.open_store(two_chunk_store(tmp_path / "ok")).partial


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with two checkpoints (env steps 200, 400) of an untrained
    maddpg_smoke state: real Orbax items, content hashes recorded by ``checkpoint.save``."""
    from cli.hydra_entry import compose_config
    from cli.training import build

    config = compose_config(["algo=maddpg_smoke"])
    env, trainer = build(config)
    state = jax.jit(trainer.init)(jax.random.PRNGKey(0))
    run_dir = tmp_path_factory.mktemp("run") / "simple_spread_3-maddpg-seed0"
    mngr = checkpoint.manager(run_dir, keep=2)
    for chunk in (1, 2):
        meta = checkpoint.make_meta(config, env.spec, 200 * chunk, chunk)
        checkpoint.save(mngr, state, trainer.policy_params(state), meta)
    mngr.close()
    return run_dir, config, trainer


def damaged_copy(run, tmp_path: Path, *steps: int, how: str = "flip") -> Path:
    import shutil

    src = run[0]
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    for step in steps:
        item = dst / "checkpoints" / str(step) / "policy"
        data = max((p for p in item.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        if how == "flip":  # one bit of the largest parameter file
            raw = bytearray(data.read_bytes())
            raw[len(raw) // 2] ^= 1
            data.write_bytes(bytes(raw))
        elif how == "truncate":
            data.write_bytes(data.read_bytes()[:-64])
        elif how == "delete":
            data.unlink()
        elif how == "lose_hashes":
            (dst / "checkpoints" / str(step) / checkpoint.HASH_FILE).unlink()
    return dst


def test_every_save_records_hashes_and_a_load_reports_the_policy_identity(run):
    run_dir = run[0]
    recorded = json.loads((run_dir / "checkpoints" / "400" / checkpoint.HASH_FILE).read_text())
    assert set(recorded["sha256"]) == set(checkpoint.ITEMS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact, hashed checkpoint loads without a word
        policy = checkpoint.load_policy(run_dir)
    assert policy.env_steps == 400
    # the one hash: what load_policy verified is what a store binds to
    assert policy.identity == st.checkpoint_identity(checkpoint.policy_item(policy))
    assert policy.identity["sha256"] == recorded["sha256"]["policy"]


@pytest.mark.parametrize("how", ["flip", "truncate", "delete", "lose_hashes"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(run, tmp_path, how):
    run_dir = damaged_copy(run, tmp_path, 400, how=how)
    with pytest.warns(checkpoint.CheckpointWarning) as caught:
        policy = checkpoint.load_policy(run_dir)
    assert policy.env_steps == 200
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(f"checkpoint {run_dir.resolve()}/checkpoints/400 is damaged (")
    assert message.endswith(f"using the newest intact one, {run_dir.resolve()}/checkpoints/200")


def test_no_intact_checkpoint_is_one_line_naming_it(run, tmp_path):
    run_dir = damaged_copy(run, tmp_path, 200, 400)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_policy(run_dir)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"checkpoint {run_dir.resolve()}/checkpoints/400")
    assert "item policy/ has sha256" in text and exit_code(err.value) == 5


def test_a_checkpoint_saved_before_hashes_loads_with_a_warning(run, tmp_path):
    run_dir = damaged_copy(run, tmp_path, 200, 400, how="lose_hashes")
    for step in (200, 400):  # as an older version wrote it: no hash file, no flag in meta
        meta_file = run_dir / "checkpoints" / str(step) / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        del meta["content_hashes"]
        meta_file.write_text(json.dumps(meta))
    with pytest.warns(checkpoint.CheckpointWarning, match="checkpoints/400: saved before content"):
        assert checkpoint.load_policy(run_dir).env_steps == 400


def test_resume_skips_a_damaged_train_state_and_writes_nothing_when_none_is_intact(run, tmp_path):
    run_dir, config, trainer = run
    abstract = jax.eval_shape(trainer.init, jax.random.PRNGKey(0))
    copy = damaged_copy(run, tmp_path / "a")
    state_file = max(
        (p for p in (copy / "checkpoints" / "400" / "state").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    state_file.write_bytes(state_file.read_bytes()[:-64])
    with pytest.warns(checkpoint.CheckpointWarning, match="checkpoints/400 is damaged"):
        resumed = checkpoint.restore_train(checkpoint.manager(copy), abstract, config, "x")
    assert resumed.step == 200 and [s for s, _ in resumed.damaged] == [400]
    checkpoint.move_damaged(copy, resumed.damaged)
    assert not (copy / "checkpoints" / "400").exists()
    assert (copy / checkpoint.DAMAGED_DIR / "400" / "state").is_dir()

    # killed between Orbax's commit and the hash record (the save's last step): those
    # steps are not committed; with nothing else left, training starts afresh
    killed = damaged_copy(run, tmp_path / "k", 200, 400, how="lose_hashes")
    with pytest.warns(checkpoint.CheckpointWarning, match="did not complete.*starting afresh"):
        resumed = checkpoint.restore_train(checkpoint.manager(killed), abstract, config, "x")
    assert resumed.state is None and [s for s, _ in resumed.damaged] == [400, 200]

    # through the CLI: nothing intact → exit 5, one line, run.yaml and .hydra/ untouched
    broken = damaged_copy(run, tmp_path / "b", 200, 400)
    (broken / ".hydra").mkdir()
    records = {broken / "run.yaml": "the record\n", broken / ".hydra" / "config.yaml": "cfg\n"}
    for path, text in records.items():
        path.write_text(text)
    result = subprocess.run(
        [FORENSICS, "train", f"out_dir={broken.parent}", "algo=maddpg_smoke",
         "train.progress=false"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 5, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {broken.resolve()}/")
    assert all(path.read_text() == text for path, text in records.items())


# --------------------------------------------------------------------------- seeds, config


def test_seeds_obey_one_rule_everywhere(tmp_path):
    for good in ("0", "2147483647"):
        assert parse_seeds(good).tolist() == [int(good)]
    with pytest.raises(ConfigError, match=r"--seeds: expected an integer in \[0, 2\*\*31\)"):
        parse_seeds("2147483648")
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate-policy", str(tmp_path), "--seed", "-1"])
    assert result.exit_code == 3
    assert result.stderr.strip() == "error: --seed: expected an integer in [0, 2**31), got -1"
    # train: refused before any work, leaving no run directory or empty train.log behind
    result = subprocess.run(
        [FORENSICS, "train", f"out_dir={tmp_path}", "seed=4294967296"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 3
    assert result.stderr.strip() == "error: seed: expected an integer in [0, 2**31), got 4294967296"
    assert not list(tmp_path.rglob("train.log")) and not list(tmp_path.iterdir())


def test_an_attack_window_longer_than_the_episode_is_refused():
    spec = DISCRETE  # 25-step episodes
    check_attack_fits(Attack.from_config({"name": "worst_action", "window": 25}), spec)
    with pytest.raises(ConfigError, match=r"attack.window: expected an integer <= the episode "
                       r"length of simple_spread \(25 steps\), got 100"):  # fmt: skip
        check_attack_fits(Attack.from_config({"name": "worst_action", "window": 100}), spec)


def test_exit_codes_are_documented_in_help_and_readme():
    """One table (``cli.EXIT_CODES``): ``forensics --help`` prints it, the README's table
    lists the same codes."""
    help_text = CliRunner().invoke(app, ["--help"]).stdout
    readme = (REPO / "README.md").read_text()
    table = dict(re.findall(r"^\| `(\d+)` \| (.+?) \|$", readme, re.M))
    assert {int(code) for code in table} == set(EXIT_CODES)
    for code in EXIT_CODES:
        assert f"{code}: " in help_text
