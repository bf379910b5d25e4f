"""Episode store: round trip, resume, crash atomicity, corruption, identity, laziness, checks."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from envs.base import EnvSpec
from forensics import store as st

REPO = Path(__file__).resolve().parent.parent
DISCRETE = EnvSpec("simple_spread", 3, 18, 5, True, 25, 54)
CONTINUOUS = EnvSpec("simple_spread", 3, 18, 5, False, 25, 54)
CKPT = {"path": "/ckpt/maddpg_n3", "sha256": "ab" * 32}


def make_batch(spec: EnvSpec, ids: range, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch with every declared field; every other episode clean, the rest attacked."""
    rng = np.random.default_rng(seed + ids.start)
    b, t, n, o, a = len(ids), spec.episode_length, spec.num_agents, spec.obs_dim, spec.action_dim
    if spec.discrete:
        act = lambda: rng.integers(0, a, (b, t, n)).astype(np.int32)
    else:
        act = lambda: rng.uniform(0, 1, (b, t, n, a)).astype(np.float32)
    clean = np.arange(b) % 2 == 0
    obs = rng.standard_normal((b, t, n, o)).astype(np.float32)
    noise = rng.standard_normal(obs.shape).astype(np.float32) * ~clean[:, None, None, None]
    return {
        "obs_true": obs,
        "obs_perceived": obs + noise,
        "actions": act(),
        "clean_actions": act(),
        "rewards": rng.standard_normal((b, t, n)).astype(np.float32),
        "valid": np.ones((b, t), bool),
        "episode_id": np.asarray(ids, np.int64),
        "seed": np.asarray(ids, np.int64) // 2,
        "replay_key": rng.integers(0, 2**32, (b, 2), dtype=np.uint32),
        "clean": clean,
        "attack": np.where(clean, "none", "worst_action"),
        "victim": np.where(clean, -1, rng.integers(0, n, b)).astype(np.int32),
        "observed": np.where(clean, -1, rng.integers(0, n, b)).astype(np.int32),
        "start": np.where(clean, -1, rng.integers(0, t - 5, b)).astype(np.int32),
        "window": np.where(clean, 0, 5).astype(np.int32),
        "magnitude": np.where(clean, 0.0, 1.0).astype(np.float32),
        "influence": np.where(clean, "none", np.where(np.arange(b) % 4 == 1, "high", "low")),
    }


def writer(path: Path, spec: EnvSpec = DISCRETE, **kw) -> st.StoreWriter:
    args = {
        "checkpoint": CKPT,
        "config": {"attack": "worst_action"},
        "seeds": [0, 1],
        "code_version": "test",
    } | kw
    return st.StoreWriter(path, spec, **args)


def concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def snapshot(path: Path) -> dict[str, tuple[str, int]]:
    """Every file under path with its content hash and mtime: detects any modification."""
    return {
        str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("spec", [DISCRETE, CONTINUOUS], ids=["discrete", "continuous"])
def test_round_trip(tmp_path: Path, spec: EnvSpec) -> None:
    batches = [make_batch(spec, range(0, 7)), make_batch(spec, range(7, 12))]
    with writer(tmp_path / "s", spec, seeds=[3, 4]) as w:
        infos = [w.append(b) for b in batches]
    assert [i.file for i in infos] == ["chunk-000000.parquet", "chunk-000001.parquet"]
    want = concat(batches)
    s = st.open_store(tmp_path / "s")
    assert len(s) == 12 and s.meta.env_spec() == spec and s.meta.checkpoint == CKPT
    assert s.meta.seeds == [3, 4] and s.meta.config == {"attack": "worst_action"}
    assert s.meta.sessions[0]["code_version"] == "test" and s.uncommitted == []
    assert_same(concat(list(s.iter_batches(batch_episodes=5))), want)
    one = s.episode(8)
    for k in want:
        np.testing.assert_array_equal(one[k], want[k][8], err_msg=k)
    gt = s.ground_truth()
    scalars = [c.name for c in s.columns if not c.per_step and not c.shape]
    assert list(gt.columns) == scalars and "replay_key" not in gt and len(gt) == 12
    for k in scalars:
        np.testing.assert_array_equal(gt[k].to_numpy(), want[k], err_msg=k)
    assert s.verify() == []
    with pytest.raises(KeyError, match="episode 99"):
        s.episode(99)


def test_append_across_sessions_and_single_writer(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with writer(path, seeds=[0]) as w:
        w.append(make_batch(DISCRETE, range(0, 6)))
        with pytest.raises(st.StoreError, match="another writer"):
            writer(path)
    b2 = make_batch(DISCRETE, range(6, 10))
    with writer(path, seeds=[1], config={"attack": "fgsm"}) as w:
        assert w.n_episodes == 6
        with pytest.raises(st.StoreError, match="id 5 is already in store"):
            w.append(make_batch(DISCRETE, range(5, 8)))
        w.append(b2)
        w.append(make_batch(DISCRETE, range(10, 13)))
    s = st.open_store(path)
    assert [c.file for c in s.chunks] == [f"chunk-00000{i}.parquet" for i in range(3)]
    assert [c.session for c in s.chunks] == [0, 1, 1]
    assert s.meta.seeds == [0, 1] and s.meta.sessions[1]["config"] == {"attack": "fgsm"}
    assert s.ground_truth()["episode_id"].tolist() == list(range(13))
    assert_same(
        s.episode(7, ["obs_true", "influence"]),
        {"obs_true": b2["obs_true"][1], "influence": b2["influence"][1]},
    )


CRASH = textwrap.dedent("""
    import os, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    from forensics import store as st
    from test_store import DISCRETE, make_batch, writer

    w = writer(__import__("pathlib").Path({path!r}))
    w.append(make_batch(DISCRETE, range(0, 5)))
    mode = {mode!r}
    if mode == "mid_write":      # die with half the chunk's bytes in its temp file
        def half(path, data):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            os._exit(3)
        st._write_durable = half
    else:                        # die after the chunk's rename, before the manifest commit
        st.atomic_write = lambda path, data: os._exit(3)
    w.append(make_batch(DISCRETE, range(5, 9)))
""")


@pytest.mark.parametrize("mode", ["mid_write", "before_commit"])
def test_writer_killed_mid_chunk(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "s"
    script = CRASH.format(repo=str(REPO), tests=str(REPO / "tests"), path=str(path), mode=mode)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    s = st.open_store(path)
    assert len(s) == 5 and len(s.uncommitted) == 1
    leftover = s.uncommitted[0].name
    assert (
        leftover.startswith(".tmp-")
        if mode == "mid_write"
        else leftover == ("chunk-000001.parquet")
    )
    assert_same(concat(list(s.iter_batches())), make_batch(DISCRETE, range(0, 5)))
    with pytest.warns(UserWarning, match="removing 1 uncommitted"), writer(path) as w:
        w.append(make_batch(DISCRETE, range(5, 9)))
    s = st.open_store(path)
    assert s.uncommitted == [] and s.verify() == []
    assert_same(
        concat(list(s.iter_batches())),
        concat([make_batch(DISCRETE, range(0, 5)), make_batch(DISCRETE, range(5, 9))]),
    )


def test_stray_files_are_never_data(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with writer(path) as w:
        w.append(make_batch(DISCRETE, range(0, 4)))
    good = path / "chunks" / "chunk-000000.parquet"
    shutil.copy(good, path / "chunks" / "chunk-000001.parquet")  # a complete but uncommitted chunk
    (path / "chunks" / ".tmp-chunk-000002.parquet-x").write_bytes(good.read_bytes()[:100])
    (path / ".tmp-manifest.json-x").write_text("{")
    s = st.open_store(path)
    assert len(s) == 4 and len(list(s.iter_batches())) == 1 and len(s.uncommitted) == 3


def test_truncated_committed_chunk(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with writer(path) as w:
        w.append(make_batch(DISCRETE, range(0, 4)))
        w.append(make_batch(DISCRETE, range(4, 8)))
    chunk = path / "chunks" / "chunk-000000.parquet"
    chunk.write_bytes(chunk.read_bytes()[:-200])
    with pytest.raises(st.StoreError, match=r"chunk chunk-000000\.parquet is \d+ bytes") as e:
        st.open_store(path)
    assert "\n" not in str(e.value)
    with pytest.warns(UserWarning, match="skipping chunk chunk-000000"):
        s = st.open_store(path, on_corrupt="skip")
    assert s.skipped[0][0] == "chunk-000000.parquet"
    assert s.ground_truth()["episode_id"].tolist() == [4, 5, 6, 7]
    with pytest.raises(st.StoreError, match="chunk chunk-000000.parquet"):
        writer(path)  # a writer will not append to a store it cannot read


def test_corrupt_page_is_detected_and_ground_truth_reads_no_step_arrays(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with writer(path) as w:
        w.append(make_batch(DISCRETE, range(0, 8)))
    chunk = path / "chunks" / "chunk-000000.parquet"
    meta = pq.read_metadata(chunk).row_group(0)
    obs = next(
        meta.column(i)
        for i in range(meta.num_columns)
        if meta.column(i).path_in_schema.startswith("obs_true")
    )
    data = bytearray(chunk.read_bytes())
    middle = obs.data_page_offset + obs.total_compressed_size // 2
    data[middle : middle + 64] = bytes(64)  # same size: only checksums can tell
    chunk.write_bytes(bytes(data))
    s = st.open_store(path)
    assert s.ground_truth()["episode_id"].tolist() == list(range(8))
    with pytest.raises(st.StoreError, match="chunk chunk-000000.parquet is corrupt"):
        list(s.iter_batches(["obs_true"]))
    assert s.verify() == [("chunk-000000.parquet", "sha256 differs from the manifest")]


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"spec": EnvSpec("simple_spread", 5, 30, 5, True, 25, 130)},
            "env num_agents is 3 on disk, 5 requested",
        ),
        ({"spec": CONTINUOUS}, "env discrete is True on disk, False requested"),
        (
            {"checkpoint": {"path": "/ckpt/other", "sha256": "cd" * 32}},
            "written from checkpoint /ckpt/maddpg_n3",
        ),
        (
            {"optional_fields": ["critic_actions"]},
            r"field 'critic_actions' is absent on disk, float32 \[B, 25, 3, 5\] requested",
        ),
    ],
)
def test_identity_mismatch_changes_nothing(tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / "s"
    with writer(path) as w:
        w.append(make_batch(DISCRETE, range(0, 3)))
    before = snapshot(path)
    change = dict(change)
    spec = change.pop("spec", DISCRETE)
    with pytest.raises(st.StoreError, match=message) as e:
        writer(path, spec, **change)
    assert "nothing written" in str(e.value) and "\n" not in str(e.value)
    assert snapshot(path) == before


def test_refuses_paths_that_are_not_stores(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(st.StoreError, match="not a directory"):
        writer(tmp_path / "afile")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.csv").write_text("x")
    with pytest.raises(st.StoreError, match="has no meta.json"):
        writer(tmp_path / "other")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["results.csv"]
    with pytest.raises(st.StoreError, match="not an episode store"):
        st.open_store(tmp_path / "other")


def test_lazy_iteration_has_bounded_memory(tmp_path: Path) -> None:
    spec = EnvSpec("simple_spread", 5, 30, 5, True, 25, 130)
    path = tmp_path / "s"
    with writer(path, spec) as w:
        for c in range(24):
            w.append(make_batch(spec, range(50 * c, 50 * c + 50)))
    s = st.open_store(path)
    total = 1200 * 2 * 25 * 5 * 30 * 4  # bytes of the two observation fields: 36 MB
    tracemalloc.start()
    arrow_peak, sizes, checksum = 0, [], 0.0
    for b in s.iter_batches(["episode_id", "obs_true", "obs_perceived"], batch_episodes=16):
        arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
        sizes.append(len(b["episode_id"]))
        checksum += float(b["obs_true"][:, 0, 0, 0].sum())
    _, numpy_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sizes == [16] * 75
    # what must be held at once: ~2 output batches (numpy) and one decoded chunk (arrow),
    # both far below the 36 MB that the selected fields occupy in the whole store
    batch_bytes, chunk_bytes = 16 * 2 * 25 * 5 * 30 * 4, 50 * 2 * 25 * 5 * 30 * 4
    assert 6 * batch_bytes < total / 10 and 4 * chunk_bytes < total / 5
    assert numpy_peak < 6 * batch_bytes and arrow_peak < 4 * chunk_bytes, (numpy_peak, arrow_peak)
    want = sum(
        float(make_batch(spec, range(50 * c, 50 * c + 50))["obs_true"][:, 0, 0, 0].sum())
        for c in range(24)
    )
    assert checksum == pytest.approx(want, rel=1e-6)


def _bad(key: str, value):
    return lambda b: {**b, key: value(b[key]) if callable(value) else value}


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda b: {k: v for k, v in b.items() if k != "rewards"},
            r"batch: missing field 'rewards' \(float32 \[B, 25, 3\]\)",
        ),
        (lambda b: {**b, "reward": b["rewards"]}, "batch: unknown field 'reward'"),
        (
            _bad("obs_true", lambda v: v[:, :, :, :17]),
            r"field 'obs_true': expected float32 \[B=4, 25, 3, 18\], got float32 \[4, 25, 3, 17\]",
        ),
        (_bad("actions", lambda v: v.astype(np.float32)), "field 'actions': .* got dtype float32"),
        (_bad("actions", lambda v: v + 5), r"field 'actions': values must lie in \[0, 5\), found"),
        (_bad("valid", lambda v: v.astype(np.int8)), "field 'valid': .* got dtype int8"),
        (
            _bad("rewards", lambda v: np.where(np.arange(4)[:, None, None] == 2, np.nan, v)),
            r"field 'rewards': non-finite values in batch rows \[2\]",
        ),
        (
            _bad("influence", lambda v: np.array(["none", "hi", "none", "low"])),
            "field 'influence': value 'hi' is not one of",
        ),
        (_bad("clean", lambda v: np.ones_like(v)), "field 'influence': must be 'none' exactly"),
        (_bad("episode_id", lambda v: np.array([0, 1, 1, 2])), "duplicate id 1 in batch"),
        (
            _bad("replay_key", lambda v: np.full(v.shape, -1)),
            "field 'replay_key': values do not fit",
        ),
        (_bad("attack", lambda v: np.arange(4)), "field 'attack': expected strings"),
    ],
)
def test_batch_validation_errors(tmp_path: Path, edit, message: str) -> None:
    with writer(tmp_path / "s") as w:
        with pytest.raises(st.StoreError, match=message) as e:
            w.append(edit(make_batch(DISCRETE, range(0, 4))))
        assert "\n" not in str(e.value) and w.n_episodes == 0
        w.append(make_batch(DISCRETE, range(0, 4)))  # a rejected batch leaves the writer usable
    assert len(st.open_store(tmp_path / "s")) == 4


def test_lossless_casts_are_accepted(tmp_path: Path) -> None:
    b = make_batch(DISCRETE, range(0, 3))
    b = {
        **b,
        "obs_true": b["obs_true"].astype(np.float64),
        "victim": b["victim"].tolist(),
        "actions": b["actions"].astype(np.int64),
    }
    with writer(tmp_path / "s") as w:
        w.append(b)
    got = concat(list(st.open_store(tmp_path / "s").iter_batches(["obs_true", "victim"])))
    assert got["obs_true"].dtype == np.float32 and got["victim"].dtype == np.int32
    np.testing.assert_array_equal(got["victim"], b["victim"])


def test_write_table_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out" / "verdicts.parquet"
    df = pd.DataFrame(
        {
            "episode_id": np.arange(5),
            "patient0": [0, 2, 1, 0, 2],
            "attack": ["none", "worst_action", "fgsm", "none", "pgd"],
        }
    )
    st.write_table(df, path, metadata={"store": "/runs/s", "k": 2})
    pd.testing.assert_frame_equal(pd.read_parquet(path), df)
    assert st.read_table_metadata(path) == {"store": "/runs/s", "k": 2}

    def crash(p: Path, data: bytes) -> None:
        p.write_bytes(data[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "_write_durable", crash)
    with pytest.raises(KeyboardInterrupt):
        st.write_table(df.iloc[:2], path)
    pd.testing.assert_frame_equal(pd.read_parquet(path), df)
    assert os.listdir(path.parent) == ["verdicts.parquet"]


def test_checkpoint_identity(tmp_path: Path) -> None:
    ck = tmp_path / "ckpt"
    (ck / "params").mkdir(parents=True)
    (ck / "params" / "a.bin").write_bytes(b"weights")
    (ck / "meta.json").write_text("{}")
    ident = st.checkpoint_identity(ck)
    shutil.copytree(ck, tmp_path / "copy")
    assert st.checkpoint_identity(tmp_path / "copy")["sha256"] == ident["sha256"]
    (tmp_path / "copy" / "params" / "a.bin").write_bytes(b"weightz")
    assert st.checkpoint_identity(tmp_path / "copy")["sha256"] != ident["sha256"]
    with writer(tmp_path / "s", checkpoint=ident) as w:
        w.append(make_batch(DISCRETE, range(0, 2)))
    meta = st.open_store(tmp_path / "s").meta
    meta.require_checkpoint(ck)
    with pytest.raises(st.StoreError, match="is not the one that produced store"):
        meta.require_checkpoint(tmp_path / "copy")
    with pytest.raises(st.StoreError, match="does not exist"):
        st.checkpoint_identity(tmp_path / "nope")
    assert st.current_code_version()
