"""``forensics diagnose`` → ``evaluate`` → ``report`` end to end, through the CLI: a smoke
checkpoint (maddpg_smoke) records the paired worst-action protocol (seeds 0:4, two chunks)
and a clean calibration store (seeds 100:140); the outputs are checked for consistency,
determinism and ground-truth isolation, and bad input is refused in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from test_rollout_cli import invoke, snapshot, untrained_checkpoint

from agents import checkpoint
from cli.diagnose import DEFAULT_OUT
from cli.hydra_entry import compose_config
from forensics import diagnose as dg
from forensics import store as st
from forensics.evaluate import COLUMNS, ORACLE_LABEL, evaluate

N, T = 3, 25
SEEDS, CALIB_SEEDS = "0:4", "100:140"
EPISODES = 4 * (1 + N * (N - 1) * 2)  # per seed: the clean episode + pairs × {high, low}
OVERRIDES = ["forensics.batch_episodes=32"]  # small fixed batches: less padding on 2 cores
CONFIG = dg.DiagnoseConfig.from_mapping(compose_config(OVERRIDES)["forensics"])
# what diagnose reads from the scored store: SCORED_FIELDS with the configured observations
SCORED = {CONFIG.observations if f == "obs_perceived" else f for f in dg.SCORED_FIELDS} | {
    "avail"  # the env's legal actions: observable in deployment, not ground truth
}


def diagnose_args(store: Path, calibration: Path | None, *extra: str | Path) -> list:
    calib = ["--calibration", calibration] if calibration is not None else []
    return ["diagnose", store, *calib, "--no-progress", *OVERRIDES, *extra]


def outputs(diag: Path) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, str]]:
    """Verdicts, scores and the sha256 of every graph file of a diagnosis."""
    with np.load(diag / dg.SCORES_FILE) as f:
        scores = {k: f[k] for k in f.files}
    graphs = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((diag / dg.GRAPHS_DIR).iterdir())
    }
    return pd.read_parquet(diag / dg.VERDICTS_FILE), scores, graphs


def assert_same_outputs(a: Path, b: Path, ids: np.ndarray | None = None) -> None:
    """The diagnoses agree (on the episodes ``ids`` of ``a``, if given)."""
    (va, sa, ga), (vb, sb, gb) = outputs(a), outputs(b)
    if ids is not None:
        va = va[va["episode_id"].isin(ids)].reset_index(drop=True)
        keep = np.isin(sa["episode_id"], ids)
        sa = {k: v[keep] if v.shape[:1] == keep.shape else v for k, v in sa.items()}
        ga = {k: v for k, v in ga.items() if int(k.split(".")[0]) in set(ids.tolist())}
    pd.testing.assert_frame_equal(va, vb)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    assert ga == gb


def copy_store(src: Path, dst: Path) -> Path:
    """The store's files without its diagnosis."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(DEFAULT_OUT, ".lock"))
    return dst


def rewrite_chunk(store_path: Path, index: int, edit) -> None:
    """Rewrite committed chunk ``index`` with ``edit(arrays)`` applied, bypassing the writer's
    validation (as another tool writing the format would), and commit its new size and hash
    to the manifest so that it opens like any committed chunk."""
    store = st.open_store(store_path)
    info = store.chunks[index]
    path = store_path / "chunks" / info.file
    table = st.pq.read_table(path)
    arrays = {c.name: st._from_arrow(c, table.column(c.name).combine_chunks()).copy()
              for c in store.columns}  # fmt: skip
    edit(arrays)
    data = st._encode_chunk(store.columns, arrays)
    path.write_bytes(data)
    manifest = json.loads((store_path / "manifest.json").read_text())
    manifest["chunks"][index].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (store_path / "manifest.json").write_text(json.dumps(manifest))


def scrambled_copy(src: Path, dst: Path, keep: set[str]) -> Path:
    """A valid store with the columns ``keep`` of ``src`` and every other column changed:
    clean ⇄ attacked, victims, observed agents, onsets, windows, attack names, magnitudes,
    influence classes, replay keys; per-step arrays shifted by one step."""
    store = st.open_store(src)
    names = {c.name for c in store.columns}
    optional = [f.name for f in st.EPISODE_FIELDS if f.optional and f.name in names]
    with st.StoreWriter(dst, store.meta.env_spec(), checkpoint=store.meta.checkpoint,
                        config=store.meta.config, seeds=store.meta.seeds,
                        optional_fields=optional) as w:  # fmt: skip
        for b in store.iter_batches(None, 1 << 16):
            was_clean, ids = b["clean"], b["episode_id"]
            changed = {
                "clean": ~was_clean,
                "victim": np.where(was_clean, ids % N, -1),
                "observed": np.where(was_clean, (ids + 1) % N, -1),
                "start": np.where(was_clean, 7, -1),
                "window": np.where(was_clean, 3, 0),
                "attack": np.where(was_clean, "scrambled", "none"),
                "magnitude": np.where(was_clean, 9.0, 0.0).astype(np.float32),
                "influence": np.where(was_clean, "uniform", "none"),
                "replay_key": b["replay_key"] + 1,
                **{k: np.roll(b[k], 1, axis=1)
                   for k in ("obs_true", "obs_perceived", "clean_actions", "actions",
                             "rewards", "critic_actions") if k in b},
            }  # fmt: skip
            w.append({**b, **{k: v for k, v in changed.items() if k not in keep}})
    return dst


def changed_columns(a: Path, b: Path) -> set[str]:
    x, y = (next(st.open_store(p).iter_batches(None, 1 << 16)) for p in (a, b))
    return {k for k in x if not np.array_equal(x[k], y[k])}


def assert_one_line_error(result, message: str, code: int = 4) -> None:
    """One ``error:`` line containing ``message``, exit status ``code`` (cli.EXIT_CODES:
    3 config, 4 data)."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


# --------------------------------------------------------------------------- fixtures


def record(run: Path, out: Path, seeds: str, *extra: str) -> Path:
    result = invoke("rollout", run, "-o", out, "--seeds", seeds, "--no-progress", *extra)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def stores(run_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    return {
        "protocol": record(run_dir, root / "worst", SEEDS, "--chunk-seeds", "2"),
        "clean": record(run_dir, root / "clean", CALIB_SEEDS, "attack=none"),
    }


@pytest.fixture(scope="module")
def diagnosed(stores):
    """The protocol store diagnosed into its default output directory."""
    result = invoke(*diagnose_args(stores["protocol"], stores["clean"]))
    assert result.exit_code == 0, result.output
    return stores["protocol"] / DEFAULT_OUT, result


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, Path]:
    """Other real (untrained) checkpoints — another seed, another N — and a clean store
    recorded by the first."""
    root = tmp_path_factory.mktemp("foreign")
    seed1 = untrained_checkpoint(root / "seed1", seed=1)
    return {
        "run_seed1": seed1,
        "run_n5": untrained_checkpoint(root / "n5", env="simple_spread_5"),
        "clean_seed1": record(seed1, root / "clean-seed1", "200:202", "attack=none"),
    }


# --------------------------------------------------------------------------- diagnose


def test_diagnosis_is_complete_and_consistent(diagnosed, stores, run_dir):
    out, result = diagnosed
    assert f"Diagnosed {EPISODES} episodes" in result.stdout
    assert "Verdicts (no ground truth used)" in result.stdout
    store = st.open_store(stores["protocol"])
    verdicts, scores, graphs = outputs(out)

    ids = store.ground_truth()["episode_id"].to_numpy()
    assert verdicts["episode_id"].tolist() == ids.tolist()  # one row per episode, in order
    assert (verdicts["status"] == "ok").all()
    assert scores["episode_id"].tolist() == ids.tolist()
    assert sorted(graphs) == sorted(f"{i}.json" for i in ids)
    for name in dg.CALIBRATIONS:
        z = scores[f"z_{name}"]
        assert z.shape == (EPISODES, T, N) and np.isfinite(z).all()
        agent_t = np.stack(verdicts[f"{name}_agent_t_det"].to_numpy())
        np.testing.assert_array_equal(agent_t, scores[f"{name}_agent_t_det"])
        # the candidate is an earliest-flagged agent, and its t_det is that step
        cand, t_det = verdicts[f"{name}_candidate"], verdicts[f"{name}_t_det"]
        first = np.where(agent_t >= 0, agent_t, T).min(axis=1)
        flagged = cand >= 0
        assert np.array_equal(flagged, first < T)
        assert (agent_t[flagged, cand[flagged]] == first[flagged]).all()
        assert (t_det[flagged] == first[flagged]).all() and (t_det[~flagged] == -1).all()
        # a chain runs from the candidate to the deployable Patient-0
        for c, head, chain in zip(cand, verdicts[f"{name}_deployable"],
                                  verdicts[f"{name}_deployable_chain"], strict=True):  # fmt: skip
            assert (list(chain) == []) if c < 0 else (chain[0] == c and chain[-1] == head)
    for i in ids:  # every graph parses, and says what the verdict says
        g = json.loads((out / dg.GRAPHS_DIR / f"{i}.json").read_text())
        row = verdicts.set_index("episode_id").loc[i]
        assert g["episode_id"] == i and set(g["calibrations"]) == set(dg.CALIBRATIONS)
        for name, cal in g["calibrations"].items():
            assert len(cal["nodes"]) == N and len(cal["edges"]) == N * (N - 1)
            assert cal["candidate"] == row[f"{name}_candidate"]
            assert cal["deployable_chain"] == list(row[f"{name}_deployable_chain"])
            assert all(e["weight"] >= 0 and np.isfinite(e["weight"]) for e in cal["edges"])

    summary = json.loads((out / dg.SUMMARY_FILE).read_text())
    assert summary["config"] == CONFIG.to_json() and summary["config"]["batch_episodes"] == 32
    assert summary["code_version"] == st.current_code_version()
    assert summary["checkpoint"]["sha256"] == store.meta.checkpoint["sha256"]
    assert summary["env_steps"] == checkpoint.load_policy(run_dir).env_steps
    assert summary["run_dir"] == str(run_dir.resolve())  # found from the store's metadata
    assert summary["episodes_scored"] == EPISODES and summary["episodes_skipped"] == 0
    assert summary["calibration_store"]["clean_episodes"] == 40
    assert "diagnose" in summary["command"]
    assert not list(out.parent.glob(f".{out.name}.*"))  # no partial or old copies left


def test_diagnosing_again_gives_identical_outputs(diagnosed, stores, tmp_path):
    out, _ = diagnosed
    again = tmp_path / "again"
    result = invoke(*diagnose_args(stores["protocol"], stores["clean"], "--out", again))
    assert result.exit_code == 0, result.output
    assert_same_outputs(out, again)
    # re-diagnosing into an existing diagnosis replaces it whole
    result = invoke(*diagnose_args(stores["protocol"], stores["clean"], "--out", again))
    assert result.exit_code == 0, result.output
    assert_same_outputs(out, again)


def test_verdicts_do_not_depend_on_ground_truth(diagnosed, stores, tmp_path):
    scrambled = scrambled_copy(stores["protocol"], tmp_path / "scrambled", keep=SCORED)
    all_columns = {c.name for c in st.open_store(scrambled).columns}
    assert changed_columns(stores["protocol"], scrambled) == all_columns - SCORED
    assert not SCORED & {"clean", "victim", "start", "window", "influence", "clean_actions"}
    result = invoke(*diagnose_args(scrambled, stores["clean"]))
    assert result.exit_code == 0, result.output
    assert_same_outputs(diagnosed[0], scrambled / DEFAULT_OUT)


def test_non_finite_episodes_are_reported_as_skipped(diagnosed, stores, tmp_path):
    broken = copy_store(stores["protocol"], tmp_path / "nan")

    def poison(arrays):  # NaN in what episodes 1 and 2 observed at one step
        arrays[CONFIG.observations][1:3, 10, 0, 0] = np.nan

    rewrite_chunk(broken, 0, poison)
    result = invoke(*diagnose_args(broken, stores["clean"]))
    assert result.exit_code == 0, result.output
    assert "warning: 2 episode(s) skipped: non-finite" in result.stderr
    out = broken / DEFAULT_OUT
    verdicts = pd.read_parquet(out / dg.VERDICTS_FILE)
    skipped = verdicts["status"] != "ok"
    assert verdicts["episode_id"][skipped].tolist() == [1, 2]
    assert verdicts["status"][skipped].str.startswith("skipped").all()
    assert json.loads((out / dg.SUMMARY_FILE).read_text())["episodes_skipped"] == 2
    others = np.setdiff1d(verdicts["episode_id"], [1, 2])
    ok_rows = verdicts[~skipped].reset_index(drop=True)
    original = pd.read_parquet(diagnosed[0] / dg.VERDICTS_FILE)
    pd.testing.assert_frame_equal(
        ok_rows, original[original["episode_id"].isin(others)].reset_index(drop=True)
    )
    # and evaluate scores no verdict for them
    table = evaluate([out])
    reference = evaluate([diagnosed[0]])
    rows = (table["influence"] == "all") & (table["calibration"] == "budget")
    assert int(table[rows]["episodes"].iloc[0]) == int(reference[rows]["episodes"].iloc[0]) - 2


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_partial_store_is_an_error_unless_allowed(diagnosed, stores, tmp_path, damage):
    """A truncated or deleted chunk: diagnose and evaluate exit 4 naming it; with
    --allow-partial they use the other chunks and say how many episodes they cover."""
    damaged = copy_store(stores["protocol"], tmp_path / damage)
    chunk = damaged / "chunks" / "chunk-000000.parquet"
    if damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:-200])  # a chunk cut short after its commit
    else:
        chunk.unlink()
    refused = invoke(*diagnose_args(damaged, stores["clean"]))
    assert_one_line_error(refused, "chunk chunk-000000.parquet ")
    assert "--allow-partial" in refused.stderr and not (damaged / DEFAULT_OUT).exists()

    result = invoke(*diagnose_args(damaged, stores["clean"], "--allow-partial"))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "chunk-000000" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    out = damaged / DEFAULT_OUT
    summary = json.loads((out / dg.SUMMARY_FILE).read_text())
    assert [c[0] for c in summary["store"]["skipped_chunks"]] == ["chunk-000000.parquet"]
    with pytest.warns(UserWarning, match="skipping chunk chunk-000000"):
        kept = st.open_store(damaged, on_corrupt="skip").ground_truth()["episode_id"].to_numpy()
    assert kept.min() > 0 and summary["episodes_scored"] == kept.size < EPISODES
    assert summary["coverage"] == {"episodes": kept.size, "listed": EPISODES, "partial": True}
    assert f"PARTIAL: {kept.size} of {EPISODES} episodes" in result.stdout
    assert_same_outputs(diagnosed[0], out, ids=kept)

    refused = invoke("evaluate", out)
    assert_one_line_error(refused, "chunk chunk-000000.parquet ")
    table = invoke("evaluate", out, "--allow-partial", "--markdown", tmp_path / "t.md")
    assert table.exit_code == 0, table.output
    assert table.stdout.count(f"PARTIAL: {kept.size} of {EPISODES} episodes") == 4  # every view
    assert (tmp_path / "t.md").read_text().startswith(f"**PARTIAL: {kept.size} of {EPISODES}")


def test_a_diagnosis_of_fewer_episodes_than_its_store_is_refused(diagnosed, stores, tmp_path):
    """Episodes appended after the diagnosis (or left out of it): evaluate refuses the
    stale diagnosis by default, and says so in its table with --allow-partial."""
    store = copy_store(stores["protocol"], tmp_path / "store")
    shutil.copytree(diagnosed[0], store / DEFAULT_OUT)
    summary = json.loads((store / DEFAULT_OUT / dg.SUMMARY_FILE).read_text())
    summary["store"]["path"] = str(store.resolve())
    (store / DEFAULT_OUT / dg.SUMMARY_FILE).write_text(json.dumps(summary))
    verdicts = pd.read_parquet(store / DEFAULT_OUT / dg.VERDICTS_FILE)
    verdicts[verdicts["episode_id"] != 3].to_parquet(store / DEFAULT_OUT / dg.VERDICTS_FILE)
    assert_one_line_error(invoke("evaluate", store), f"{EPISODES - 1:,} of the {EPISODES:,}")
    result = invoke("evaluate", store, "--allow-partial")
    assert result.exit_code == 0 and f"PARTIAL: {EPISODES - 1} of {EPISODES}" in result.stdout


@pytest.mark.parametrize(
    "case,message",
    [
        ("action_7", "column 'actions', episode 1: value 7 outside [0, 5)"),
        ("action_-1", "column 'actions', episode 1: value -1 outside [0, 5)"),
        ("float_actions_nan", "has column 'actions' stored as float × 75; meta.json declares"),
        ("listed_twice", "manifest.json lists chunk chunk-000001.parquet twice"),
    ],
)
def test_out_of_contract_store_is_refused_in_one_line(stores, tmp_path, case, message):
    """Values the store's own schema rules out change verdicts silently if read: every
    reader refuses them (exit 4), naming file, column and episode; nothing is written."""
    bad = copy_store(stores["protocol"], tmp_path / "bad")
    if case.startswith("action_"):
        value = int(case.split("_")[1])
        rewrite_chunk(bad, 0, lambda a: a["actions"].__setitem__((1, 10, 0), value))
    elif case == "float_actions_nan":
        chunk = bad / "chunks" / "chunk-000000.parquet"
        table = st.pq.read_table(chunk)
        flat = table.column("actions").combine_chunks().flatten().to_numpy().astype(np.float32)
        flat[0] = np.nan
        column = st.pa.FixedSizeListArray.from_arrays(st.pa.array(flat), T * N)
        st.pq.write_table(table.set_column(table.schema.get_field_index("actions"), "actions",
                                           column), chunk)  # fmt: skip
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["chunks"][0]["bytes"] = chunk.stat().st_size
        (bad / "manifest.json").write_text(json.dumps(manifest))
    else:
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["chunks"].append(manifest["chunks"][1])
        (bad / "manifest.json").write_text(json.dumps(manifest))
    result = invoke(*diagnose_args(bad, stores["clean"]))
    assert_one_line_error(result, message)
    assert "chunk-00000" in result.stderr and not (bad / DEFAULT_OUT).exists()


def test_bad_input_is_one_line_and_writes_nothing(stores, foreign, run_dir, tmp_path):
    protocol, clean = stores["protocol"], stores["clean"]
    truncated = copy_store(protocol, tmp_path / "all-truncated")
    for chunk in (truncated / "chunks").glob("chunk-*.parquet"):
        chunk.write_bytes(chunk.read_bytes()[:-200])
    out = tmp_path / "diag"
    cases = [
        (diagnose_args(protocol, None), "calibration: missing; pass --calibration"),
        (diagnose_args(protocol, protocol), "4 seed(s) also in the scored store"),
        (diagnose_args(protocol, clean, "--run", foreign["run_seed1"]),
         f"store {protocol}: written by checkpoint"),
        (diagnose_args(protocol, clean, "--run", foreign["run_n5"]),
         f"store {protocol}: env num_agents is 3, but the checkpoint"),
        (diagnose_args(protocol, foreign["clean_seed1"]),
         f"calibration store {foreign['clean_seed1']}: written by checkpoint"),
        (diagnose_args(truncated, clean), "26 of 52 episodes unreadable (diagnose, evaluate"),
        (diagnose_args(truncated, clean, "--allow-partial"), "holds no committed episodes"),
        (diagnose_args(run_dir, clean, "--run", run_dir), "not an episode store"),
        (diagnose_args(protocol, clean, "forensics.calibration.alpha=2"),
         "forensics.calibration.alpha: expected a number in (0, 1), got 2"),
        (diagnose_args(protocol, clean, "forensics.calibration.alpah=0.1"),
         "Could not override 'forensics.calibration.alpah'"),
        (diagnose_args(protocol, clean, "seed=3"), "diagnose takes forensics.* overrides"),
    ]  # fmt: skip
    for args, message in cases:
        result = invoke(*args, "--out", out)
        config = "forensics" in message or "Could not override" in message
        assert_one_line_error(result, message, code=3 if config else 4)
        assert not out.exists() and not list(tmp_path.glob(".diag.*")), args
    # an output path holding something else is never replaced
    before = snapshot(run_dir)
    result = invoke(*diagnose_args(protocol, clean, "--out", run_dir))
    assert_one_line_error(result, "exists and is not a `forensics diagnose` output directory")
    assert snapshot(run_dir) == before


# --------------------------------------------------------------------------- evaluate, report


def test_evaluate_prints_and_writes_the_accuracy_table(diagnosed, tmp_path):
    out = diagnosed[0]
    parquet, md = tmp_path / "t" / "table.parquet", tmp_path / "t" / "table.md"
    result = invoke("evaluate", out, "--out", parquet, "--markdown", md)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(parquet)
    pd.testing.assert_frame_equal(table, evaluate([out]))
    assert st.read_table_metadata(parquet)["diagnoses"] == [str(out.resolve())]
    assert set(table["calibration"]) == set(dg.CALIBRATIONS)
    assert set(table["influence"]) == {"high", "low", "all"}
    for col in COLUMNS:
        if col in ("episodes", "pairs", "delay"):
            continue
        values = table[col].dropna()
        assert ((values >= 0) & (values <= 1)).all(), col
    assert (table["delay"].dropna().between(0, T)).all()
    all_rows = table[table["influence"] == "all"]
    assert (all_rows["episodes"] == EPISODES - 4).all()  # the attacked ones
    # identities of the definitions: oracle gating only adds episodes to Stage 1's, and the
    # deployable rule changes Stage 1's accuracy by exactly what it fixed minus what it broke
    assert (table["oracle_gated_acc"] >= table["stage1_acc"]).all()
    np.testing.assert_allclose(
        table["deployable_acc"] - table["stage1_acc"], table["fixed"] - table["broke"]
    )
    text = md.read_text()
    assert f"| {ORACLE_LABEL} |" in text.splitlines()[0]
    assert "oracle-gated†" in result.stdout and "paper; uses ground truth" in result.stdout

    assert_one_line_error(invoke("evaluate", tmp_path), "no summary.json")


def test_report_draws_an_episode(diagnosed, tmp_path):
    out = diagnosed[0]
    verdicts = pd.read_parquet(out / dg.VERDICTS_FILE)
    gt = st.open_store(out.parent).ground_truth()
    flagged = verdicts["episode_id"][(verdicts["paper_candidate"] >= 0) & ~gt["clean"]]
    episode = int(flagged.iloc[0]) if len(flagged) else 1
    result = invoke("report", out.parent, "--episode", episode)  # the store: its diagnosis
    assert result.exit_code == 0, result.output
    assert f"episode {episode}: paper:" in result.stdout
    image = matplotlib.image.imread(out / f"report-{episode}.png")
    assert image.ndim == 3 and image.shape[0] > 500 and image.shape[1] > 1000

    assert_one_line_error(
        invoke("report", out, "--episode", 999, "--out", tmp_path / "x.png"),
        f"--episode 999: not in {out} ({EPISODES} episodes, ids 0..{EPISODES - 1})",
        code=3,  # a bad option value
    )
    assert_one_line_error(
        invoke("report", out, "--episode", episode, "--out", tmp_path / "x.jpg"),
        "expected a .png, .pdf or .svg file name",
        code=3,
    )
    assert not list(tmp_path.glob("x.*"))
