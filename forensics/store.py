"""Episode store: the on-disk contract between ``forensics rollout`` and ``diagnose``/``evaluate``.

A store is a directory::

    <store>/
      meta.json        written once at creation: format tag, schema version, the resolved
                       column list, env spec, checkpoint identity (path + sha256), created time
      manifest.json    the commit record: committed chunks (file, episodes, bytes, sha256,
                       episode-id range) and the writer sessions that added them (resolved
                       config, seeds, code version, start time)
      chunks/chunk-000000.parquet, chunk-000001.parquet, ...
      .lock            flock target: at most one writer at a time

Why Parquet (pyarrow) rather than Arrow IPC or Zarr: every chunk is self-describing and
self-checking (a footer with magic bytes at the *end* of the file, so truncation is always
detected; CRC32 checksums on every data page, verified on read); columns are read
independently (the ground-truth table touches only the per-episode scalar columns, never the
per-step arrays); row groups of ``ROW_GROUP_EPISODES`` let readers stream a chunk in slices;
and pandas/DuckDB/polars open the chunks directly. Arrow IPC decodes faster but has no page
checksums; Zarr is not installed and would scatter one episode batch over many small files.
Per-step arrays are stored flattened as fixed-size lists (one row = one episode) and reshaped
on read from the shapes recorded in ``meta.json``.

Atomicity protocol (POSIX rename is atomic, flock dies with its process):
  1. a chunk is written to ``chunks/.tmp-*`` and fsync-ed, then ``os.replace``-d to its name;
  2. only then is ``manifest.json`` rewritten (temp file, fsync, ``os.replace``) to list it.
Readers trust the manifest alone, so a crash at any point leaves exactly the chunks committed
before it: a leftover temp file or a renamed-but-uncommitted chunk is never read as data
(``EpisodeStore.uncommitted`` lists them) and the next writer deletes them before appending.
A committed chunk whose size, footer or row count disagrees with the manifest is reported by
``open_store`` (an error, or a warned skip with ``on_corrupt="skip"``); ``verify`` re-hashes.

Schema: ``EPISODE_FIELDS`` declares every column once (name, dtype, symbolic per-episode
shape); adding a field is one line there. ``resolve_schema`` turns it into concrete
``Column``s for an environment and ``StoreWriter.append`` validates each batch against them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import re
import subprocess
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from envs.base import EnvSpec

FORMAT = "marl-forensics/episode-store"
SCHEMA_VERSION = 1
ROW_GROUP_EPISODES = 256
INFLUENCE_CLASSES = ("high", "low", "uniform", "none")

_META, _MANIFEST, _CHUNKS, _LOCK, _TMP = "meta.json", "manifest.json", "chunks", ".lock", ".tmp-"
_CHUNK_NAME = re.compile(r"^chunk-(\d{6,})\.parquet$")


class StoreError(ValueError):
    """A bad batch, a mismatched or corrupt store: the message is one line naming the cause."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged (content hash, unreadable files) or not a run's:
    one line naming the checkpoint directory. Lives here, next to ``checkpoint_identity``
    (the one hash of a checkpoint item), so that the CLI classifies it without importing
    JAX or Orbax."""


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Field:
    """One declared column.

    ``shape`` is the per-episode shape in symbolic dims ``T, N, O, A`` or integers; ``"A?"``
    is ``A`` for continuous actions and absent for discrete ones. ``dtype`` is a numpy dtype
    name, ``"str"``, or ``"action"`` (int32 discrete / float32 continuous). ``bounds`` is a
    half-open integer range ``[lo, hi)`` checked on integer columns; ``choices`` restricts a
    string column. Fields whose shape starts with ``T`` are per-step, the rest per-episode.
    """

    name: str
    dtype: str
    shape: tuple[str | int, ...] = ()
    bounds: tuple[str | int, str | int] | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False


EPISODE_FIELDS: tuple[Field, ...] = (
    # per step
    Field("obs_true", "float32", ("T", "N", "O")),
    Field("obs_perceived", "float32", ("T", "N", "O")),
    Field("actions", "action", ("T", "N", "A?"), bounds=(0, "A")),
    Field("clean_actions", "action", ("T", "N", "A?"), bounds=(0, "A")),
    Field("rewards", "float32", ("T", "N")),
    Field("valid", "bool", ("T",)),
    Field("critic_actions", "float32", ("T", "N", "A"), optional=True),
    # legal actions (masked envs such as SMAX); stores written before it have no masks
    Field("avail", "bool", ("T", "N", "A"), optional=True),
    # per episode: identity and replay
    Field("episode_id", "int64"),
    Field("seed", "int64"),
    Field("replay_key", "uint32", (2,)),
    # per episode: ground truth (victim/observed/start are -1 on clean episodes)
    Field("clean", "bool"),
    Field("attack", "str"),
    Field("victim", "int32", bounds=(-1, "N")),
    Field("observed", "int32", bounds=(-1, "N")),
    Field("start", "int32", bounds=(-1, "T")),
    Field("window", "int32", bounds=(0, np.iinfo(np.int32).max)),
    Field("magnitude", "float32"),
    Field("influence", "str", choices=INFLUENCE_CLASSES),
)


@dataclass(frozen=True)
class Column:
    """A field resolved for one environment: concrete dtype and per-episode shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    per_step: bool
    bounds: tuple[int, int] | None = None
    choices: tuple[str, ...] = ()

    def describe(self, lead: str = "B") -> str:
        return f"{self.dtype} [{', '.join([lead, *map(str, self.shape)])}]"

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Column:
        bounds = d.get("bounds")
        return cls(
            d["name"],
            d["dtype"],
            tuple(d["shape"]),
            bool(d["per_step"]),
            tuple(bounds) if bounds is not None else None,
            tuple(d.get("choices", ())),
        )


def resolve_schema(spec: EnvSpec, optional: Iterable[str] = ()) -> tuple[Column, ...]:
    """Concrete columns of ``EPISODE_FIELDS`` for ``spec``, with the named optional fields."""
    optional = set(optional)
    known = {f.name for f in EPISODE_FIELDS if f.optional}
    if optional - known:
        raise StoreError(
            f"optional fields: unknown {sorted(optional - known)}; expected some of {sorted(known)}"
        )
    dims = {"T": spec.episode_length, "N": spec.num_agents, "O": spec.obs_dim, "A": spec.action_dim}
    size = lambda d: dims[d] if isinstance(d, str) else int(d)
    columns = []
    for f in EPISODE_FIELDS:
        if f.optional and f.name not in optional:
            continue
        shape = tuple(
            size(d.rstrip("?") if isinstance(d, str) else d)
            for d in f.shape
            if not (d == "A?" and spec.discrete)
        )
        dtype = ("int32" if spec.discrete else "float32") if f.dtype == "action" else f.dtype
        integer = dtype != "str" and np.dtype(dtype).kind in "iu"
        bounds = (size(f.bounds[0]), size(f.bounds[1])) if f.bounds and integer else None
        columns.append(Column(f.name, dtype, shape, f.shape[:1] == ("T",), bounds, f.choices))
    return tuple(columns)


def _check_column(col: Column, value: Any, n: int) -> np.ndarray:
    """Validate one field of a batch of ``n`` episodes; return it in the column's dtype."""
    try:
        arr = np.asarray(value)
    except ValueError as e:  # ragged nested lists
        raise StoreError(f"field {col.name!r}: not an array ({e})") from None
    if arr.shape != (n, *col.shape):
        shown = ", ".join(map(str, arr.shape))
        raise StoreError(
            f"field {col.name!r}: expected {col.describe(f'B={n}')}, got {arr.dtype} [{shown}]"
        )
    if col.dtype == "str":
        if arr.dtype.kind not in "UO" or not all(isinstance(v, str) for v in arr.ravel()):
            raise StoreError(f"field {col.name!r}: expected strings, got {arr.dtype}")
        bad = sorted(set(arr.ravel().tolist()) - set(col.choices)) if col.choices else []
        if bad:
            raise StoreError(f"field {col.name!r}: value {bad[0]!r} is not one of {col.choices}")
        return arr.astype(str)
    target = np.dtype(col.dtype)
    # bool <-> number is always a bug here; otherwise accept same-kind casts and check values
    castable = (
        arr.dtype == target
        or (arr.dtype.kind in "iu" and target.kind in "iu")
        or (
            target.kind != "b"
            and arr.dtype.kind != "b"
            and np.can_cast(arr.dtype, target, "same_kind")
        )
    )
    if not castable:
        raise StoreError(
            f"field {col.name!r}: expected {col.describe(f'B={n}')}, got dtype {arr.dtype}"
        )
    out = arr.astype(target, copy=False)
    if target.kind in "iu" and arr.dtype != target and not np.array_equal(out, arr):
        raise StoreError(f"field {col.name!r}: values do not fit in {target}")
    if target.kind == "f" and not np.isfinite(out).all():
        bad = np.unique(np.nonzero(~np.isfinite(out.reshape(n, -1)))[0])
        raise StoreError(f"field {col.name!r}: non-finite values in batch rows {bad[:5].tolist()}")
    if col.bounds is not None and out.size:
        lo, hi = col.bounds
        if out.min() < lo or out.max() >= hi:
            found = out.min() if out.min() < lo else out.max()
            raise StoreError(f"field {col.name!r}: values must lie in [{lo}, {hi}), found {found}")
    return out


def validate_batch(columns: Sequence[Column], batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check a batch (dict of arrays with a leading episode axis) against ``columns``.

    Every declared column must be present with shape [B, *shape] and a dtype that casts to
    the column's without loss; floats must be finite; integers within their bounds; episode
    ids unique; the ground truth self-consistent (clean ⇔ influence "none", attacked ⇒ a
    victim). Returns the arrays cast to the stored dtypes.
    """
    if not isinstance(batch, Mapping):
        raise StoreError(f"batch: expected a dict of arrays, got {type(batch).__name__}")
    names = [c.name for c in columns]
    unknown = [k for k in batch if k not in names]
    if unknown:
        raise StoreError(f"batch: unknown field {unknown[0]!r}; the store's fields are {names}")
    missing = [c for c in columns if c.name not in batch]
    if missing:
        raise StoreError(f"batch: missing field {missing[0].name!r} ({missing[0].describe()})")
    ids = np.asarray(batch["episode_id"])
    if ids.ndim != 1 or ids.size == 0:
        raise StoreError(
            f"field 'episode_id': expected int64 [B] with B >= 1, got shape {list(ids.shape)}"
        )
    out = {c.name: _check_column(c, batch[c.name], ids.size) for c in columns}
    uniq, counts = np.unique(out["episode_id"], return_counts=True)
    if (counts > 1).any():
        raise StoreError(f"field 'episode_id': duplicate id {uniq[counts > 1][0]} in batch")
    if "influence" in out and "clean" in out:
        wrong = np.nonzero(out["clean"] != (out["influence"] == "none"))[0]
        if wrong.size:
            raise StoreError(
                f"field 'influence': must be 'none' exactly on clean episodes; "
                f"episode {out['episode_id'][wrong[0]]} disagrees"
            )
    if "victim" in out and "clean" in out:
        wrong = np.nonzero(~out["clean"] & (out["victim"] < 0))[0]
        if wrong.size:
            raise StoreError(
                f"field 'victim': attacked episode {out['episode_id'][wrong[0]]} has no victim (-1)"
            )
    return out


# --------------------------------------------------------------------------- arrow codec


def _to_arrow(col: Column, arr: np.ndarray) -> pa.Array:
    if col.dtype == "str":
        return pa.array(arr.tolist(), pa.string())
    if not col.shape:
        return pa.array(arr)
    flat = pa.array(np.ascontiguousarray(arr).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, math.prod(col.shape))


def _arrow_type(col: Column) -> pa.DataType:
    """The Arrow type ``_to_arrow`` writes for ``col``: what every chunk must hold."""
    if col.dtype == "str":
        return pa.string()
    scalar = pa.from_numpy_dtype(np.dtype(col.dtype))
    return pa.list_(scalar, math.prod(col.shape)) if col.shape else scalar


def _from_arrow(col: Column, arr: pa.Array) -> np.ndarray:
    if col.dtype == "str":
        return np.asarray(arr.to_pylist(), dtype=str)
    if not col.shape:
        return arr.to_numpy(zero_copy_only=False)
    # flatten() (not .values) honours the slice offset of a sliced list array
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), *col.shape)


def _encode_chunk(columns: Sequence[Column], arrays: Mapping[str, np.ndarray]) -> bytes:
    """One Parquet file in memory: zstd, page checksums, dictionaries only for strings."""
    table = pa.table({c.name: _to_arrow(c, arrays[c.name]) for c in columns})
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        row_group_size=ROW_GROUP_EPISODES,
        use_dictionary=[c.name for c in columns if c.dtype == "str"],
        write_page_checksum=True,
    )
    return sink.getvalue().to_pybytes()


# --------------------------------------------------------------------------- durable files


def _write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the bytes are on disk when this returns)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Replace ``path`` by ``data`` (text is UTF-8 encoded) atomically and durably: readers
    see the old or the new file, never half of one."""
    data = data.encode() if isinstance(data, str) else data
    tmp = path.parent / f"{_TMP}{path.name}-{uuid.uuid4().hex}"
    try:
        _write_durable(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def write_table(
    df: pd.DataFrame, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write a result table (e.g. per-episode verdicts) as Parquet, atomically.

    ``metadata`` (JSON-serialisable, e.g. the store and checkpoint the verdicts came from) is
    kept in the file's schema metadata under ``marl_forensics``. Readers see the previous file
    or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata is not None:
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), b"marl_forensics": json.dumps(dict(metadata))}
        )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
    atomic_write(path, sink.getvalue().to_pybytes())
    return path


def read_table_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata`` that ``write_table`` stored in ``path`` ({} when none)."""
    raw = (pq.read_schema(path).metadata or {}).get(b"marl_forensics")
    return json.loads(raw) if raw else {}


# --------------------------------------------------------------------------- identity helpers


def checkpoint_identity(path: str | os.PathLike) -> dict[str, str]:
    """{"path", "sha256"} of a checkpoint file or directory (hash over relative paths + bytes).

    The hash, not the path, identifies the checkpoint: a copied checkpoint keeps its identity.
    """
    root = Path(path).resolve()
    if not root.exists():
        raise StoreError(f"checkpoint {root}: does not exist")
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    if not files:
        raise StoreError(f"checkpoint {root}: empty directory")
    h = hashlib.sha256()
    for f in files:
        if root.is_dir():  # names count too: moving a file inside a checkpoint changes it
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return {"path": str(root), "sha256": h.hexdigest()}


def current_code_version() -> str:
    """The git commit of this checkout (``+dirty`` with uncommitted changes), else the package
    version."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():  # an installed copy: a parent repo would be the wrong one
        return _package_version()
    git = lambda *a: subprocess.run(
        ["git", "-C", str(root), *a], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return _package_version()


def _package_version() -> str:
    try:
        return "marl-forensics " + importlib.metadata.version("marl-forensics")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class ChunkInfo:
    """A committed chunk as the manifest records it."""

    file: str
    episodes: int
    bytes: int
    sha256: str
    first_id: int
    last_id: int
    session: int


@dataclass(frozen=True)
class StoreMeta:
    """Everything a store says about itself (``meta.json`` + the sessions in the manifest)."""

    path: Path
    schema_version: int
    columns: tuple[Column, ...]
    env: dict[str, Any]
    checkpoint: dict[str, str]
    created: str
    sessions: tuple[dict[str, Any], ...]

    def env_spec(self) -> EnvSpec:
        from envs.base import EnvSpec

        return EnvSpec(**self.env)

    @property
    def config(self) -> dict[str, Any]:
        """Resolved config of the first session that committed episodes ({} if none)."""
        return self.sessions[0]["config"] if self.sessions else {}

    @property
    def seeds(self) -> list[int]:
        """Seeds of all sessions, in commit order."""
        return [s for sess in self.sessions for s in sess["seeds"]]

    def require_checkpoint(self, path: str | os.PathLike) -> None:
        """Raise unless the checkpoint at ``path`` is the one that produced this store."""
        ident = checkpoint_identity(path)
        if ident["sha256"] != self.checkpoint["sha256"]:
            raise StoreError(
                f"checkpoint {ident['path']} (sha256 {ident['sha256'][:12]}) is not the one that "
                f"produced store {self.path} ({self.checkpoint['path']}, sha256 "
                f"{self.checkpoint['sha256'][:12]})"
            )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise StoreError(f"{path}: not a {FORMAT} {what}")
    return obj


def _load_meta(root: Path) -> dict[str, Any]:
    if not (root / _META).is_file():
        raise StoreError(f"{root}: not an episode store (no {_META})")
    meta = _read_json(root / _META, "metadata")
    if meta.get("schema_version", 0) > SCHEMA_VERSION:
        raise StoreError(
            f"{root}: schema version {meta['schema_version']} is newer than this "
            f"code reads ({SCHEMA_VERSION}); upgrade marl-forensics"
        )
    return meta


def _load_manifest(root: Path) -> dict[str, Any]:
    # no manifest = creation stopped after meta.json: a valid, empty store
    if not (root / _MANIFEST).exists():
        return {"format": FORMAT, "chunks": [], "sessions": []}
    return _read_json(root / _MANIFEST, "manifest")


def _uncommitted(root: Path, committed: Iterable[str]) -> list[Path]:
    """Temp files and chunk files the manifest does not list: never data."""
    committed = set(committed)
    stray = [p for p in root.glob(f"{_TMP}*")]
    chunks = root / _CHUNKS
    if chunks.is_dir():
        stray += [p for p in chunks.iterdir() if p.name not in committed]
    return sorted(stray)


# --------------------------------------------------------------------------- writer


class StoreWriter:
    """Appends chunks of episodes to a store, creating it or resuming it.

    Opening an existing store requires the same schema, env spec and checkpoint hash (else a
    one-line ``StoreError`` and nothing on disk changes); ``config``/``seeds``/``code_version``
    may differ and are recorded per session. Uncommitted leftovers of a crashed writer are
    deleted (with a warning) before the first append. Use as a context manager.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        spec: EnvSpec,
        *,
        checkpoint: Mapping[str, str],
        config: Mapping[str, Any],
        seeds: Sequence[int],
        code_version: str | None = None,
        optional_fields: Iterable[str] = (),
    ) -> None:
        self.path = Path(path)
        self.columns = resolve_schema(spec, optional_fields)
        if not {"path", "sha256"} <= set(checkpoint):
            raise StoreError("checkpoint: expected {'path', 'sha256'} (see checkpoint_identity)")
        try:
            session_json = json.loads(
                json.dumps(
                    {
                        "config": dict(config),
                        "seeds": [int(s) for s in seeds],
                        "code_version": code_version or current_code_version(),
                        "started": _now(),
                    }
                )
            )
        except (TypeError, ValueError) as e:
            raise StoreError(f"config/seeds: not JSON-serialisable ({e})") from None
        identity = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "columns": [c.to_json() for c in self.columns],
            "env": json.loads(json.dumps(dataclasses.asdict(spec))),
            "checkpoint": {"path": str(checkpoint["path"]), "sha256": str(checkpoint["sha256"])},
        }
        exists = self.path.exists()
        if exists:
            self._check_identity(identity)  # before any write: a mismatch changes nothing
        self._lock_fd = self._lock(create=not exists)
        try:
            if not (self.path / _META).exists():
                (self.path / _CHUNKS).mkdir(exist_ok=True)
                atomic_write(self.path / _META, _dump({**identity, "created": _now()}))
            manifest = _load_manifest(self.path)
            self._chunks = list(manifest["chunks"])
            self._sessions = list(manifest["sessions"])
            committed = [c["file"] for c in self._chunks]
            stray = _uncommitted(self.path, committed)
            if stray:
                warnings.warn(
                    f"store {self.path}: removing {len(stray)} uncommitted file(s) "
                    f"left by an interrupted writer: {[p.name for p in stray]}",
                    stacklevel=2,
                )
                for p in stray:
                    p.unlink()
            (self.path / _CHUNKS).mkdir(exist_ok=True)
            store = EpisodeStore(self.path)
            self._ids = (
                set()
                if not self._chunks
                else set(
                    np.concatenate(
                        [b["episode_id"] for b in store.iter_batches(["episode_id"], 1 << 16)]
                    ).tolist()
                )
            )
            self._next = 1 + max(
                (int(_CHUNK_NAME.match(f).group(1)) for f in committed), default=-1
            )
        except BaseException:
            self.close()
            raise
        self._session = session_json
        self._session_index: int | None = None

    def _check_identity(self, want: dict[str, Any]) -> None:
        root = self.path
        if not root.is_dir():
            raise StoreError(f"store {root}: exists and is not a directory; nothing written")
        if not (root / _META).exists():
            if any(root.iterdir()):
                raise StoreError(
                    f"store {root}: exists, is not empty and has no {_META}; "
                    f"refusing to write into it"
                )
            return
        have = _load_meta(root)
        refuse = "refusing to append (nothing written)"
        if have.get("schema_version") != want["schema_version"]:
            raise StoreError(
                f"store {root}: schema version {have.get('schema_version')} on disk, "
                f"this code writes {want['schema_version']}; {refuse}"
            )
        for key, value in want["env"].items():
            if have["env"].get(key) != value:
                raise StoreError(
                    f"store {root}: env {key} is {have['env'].get(key)!r} on disk, "
                    f"{value!r} requested; {refuse}"
                )
        h, w = have["checkpoint"], want["checkpoint"]
        if h["sha256"] != w["sha256"]:
            raise StoreError(
                f"store {root}: written from checkpoint {h['path']} (sha256 "
                f"{h['sha256'][:12]}), not {w['path']} (sha256 {w['sha256'][:12]}); "
                f"{refuse}"
            )
        old = {c["name"]: Column.from_json(c) for c in have["columns"]}
        new = {c["name"]: Column.from_json(c) for c in want["columns"]}
        for name in [*old, *(n for n in new if n not in old)]:
            a, b = old.get(name), new.get(name)
            if a != b:
                raise StoreError(
                    f"store {root}: field {name!r} is "
                    f"{a.describe() if a else 'absent'} on disk, "
                    f"{b.describe() if b else 'absent'} requested; {refuse}"
                )

    def _lock(self, create: bool) -> int:
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"store {self.path}: another writer holds {_LOCK}") from None
        return fd

    @property
    def n_episodes(self) -> int:
        return sum(c["episodes"] for c in self._chunks)

    def append(self, batch: Mapping[str, Any]) -> ChunkInfo:
        """Validate ``batch`` and commit it as one chunk (durable and visible on return)."""
        if self._lock_fd is None:
            raise StoreError(f"store {self.path}: writer is closed")
        arrays = validate_batch(self.columns, batch)
        ids = arrays["episode_id"]
        clash = self._ids.intersection(ids.tolist())
        if clash:
            raise StoreError(f"field 'episode_id': id {min(clash)} is already in store {self.path}")
        data = _encode_chunk(self.columns, arrays)
        name = f"chunk-{self._next:06d}.parquet"
        chunks = self.path / _CHUNKS
        tmp = chunks / f"{_TMP}{name}-{uuid.uuid4().hex}"
        _write_durable(tmp, data)
        os.replace(tmp, chunks / name)
        _fsync_dir(chunks)
        sessions = self._sessions
        if self._session_index is None:  # a session is recorded with its first chunk
            sessions = [*self._sessions, self._session]
        info = ChunkInfo(
            name,
            int(ids.size),
            len(data),
            hashlib.sha256(data).hexdigest(),
            int(ids.min()),
            int(ids.max()),
            len(sessions) - 1,
        )
        chunk_list = [*self._chunks, dataclasses.asdict(info)]
        atomic_write(
            self.path / _MANIFEST,
            _dump({"format": FORMAT, "chunks": chunk_list, "sessions": sessions}),
        )
        # the commit landed: only now update in-memory state
        self._chunks, self._sessions, self._session_index = chunk_list, sessions, info.session
        self._ids.update(ids.tolist())
        self._next += 1
        return info

    def close(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)  # releases the flock
        self._lock_fd = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- reader


class EpisodeStore:
    """Read-only view of the committed chunks of a store (see ``open_store``)."""

    def __init__(
        self, path: str | os.PathLike, on_corrupt: Literal["raise", "skip"] = "raise"
    ) -> None:
        if on_corrupt not in ("raise", "skip"):
            raise StoreError(f"on_corrupt: expected 'raise' or 'skip', got {on_corrupt!r}")
        self.path = Path(path)
        meta = _load_meta(self.path)
        manifest = _load_manifest(self.path)
        self.meta = StoreMeta(
            self.path,
            meta["schema_version"],
            tuple(Column.from_json(c) for c in meta["columns"]),
            meta["env"],
            meta["checkpoint"],
            meta["created"],
            tuple(manifest["sessions"]),
        )
        self._columns = {c.name: c for c in self.meta.columns}
        self.chunks: list[ChunkInfo] = []
        self.skipped: list[tuple[str, str]] = []
        self.manifest_episodes = 0  # what the manifest lists, skipped chunks included
        seen: dict[str, int] = {}
        for i, entry in enumerate(manifest["chunks"]):
            try:
                info = ChunkInfo(**entry)
            except TypeError:
                raise StoreError(
                    f"store {self.path}: manifest.json entry {i} is not a chunk record "
                    f"(expected the fields {[f.name for f in dataclasses.fields(ChunkInfo)]})"
                ) from None
            if info.file in seen:  # never skippable: every episode of it would count twice
                raise StoreError(
                    f"store {self.path}: manifest.json lists chunk {info.file} twice (entries "
                    f"{seen[info.file]} and {i}); expected each chunk once"
                )
            seen[info.file] = i
            self.manifest_episodes += info.episodes
            problem = self._check_chunk(info)
            if problem is None:
                self.chunks.append(info)
            elif on_corrupt == "raise":
                raise StoreError(
                    f"store {self.path}: chunk {info.file} {problem}; "
                    f"{info.episodes} of {sum(c['episodes'] for c in manifest['chunks'])} "
                    "episodes unreadable (diagnose, evaluate: --allow-partial uses the others)"
                )
            else:
                self.skipped.append((info.file, problem))
                warnings.warn(
                    f"store {self.path}: skipping chunk {info.file}: {problem}", stacklevel=2
                )
        self._check_ids()
        self.uncommitted = _uncommitted(self.path, [e["file"] for e in manifest["chunks"]])

    @property
    def partial(self) -> bool:
        """Whether chunks the manifest lists were left out (``on_corrupt="skip"``)."""
        return bool(self.skipped)

    def _check_ids(self) -> None:
        """Episode ids are unique over the readable chunks and each chunk's ids lie in the
        range its manifest entry records. Only the (small) ``episode_id`` column is read."""
        owner: dict[int, str] = {}
        col = self._columns["episode_id"]
        for info in self.chunks:
            with self._reading(info):
                arr = self._parquet(info).read(columns=["episode_id"]).column(0)
            ids = self._decode(info, col, arr.combine_chunks(), None)
            if ids.size and (ids.min() < info.first_id or ids.max() > info.last_id):
                bad = ids[(ids < info.first_id) | (ids > info.last_id)][0]
                raise StoreError(
                    f"store {self.path}: chunk {info.file}, column 'episode_id', episode {bad}: "
                    f"outside the range [{info.first_id}, {info.last_id}] manifest.json records"
                )
            uniq, counts = np.unique(ids, return_counts=True)
            if (counts > 1).any():
                raise StoreError(
                    f"store {self.path}: chunk {info.file}, column 'episode_id', episode "
                    f"{uniq[counts > 1][0]}: appears twice; expected unique episode ids"
                )
            for i in ids.tolist():
                if i in owner:
                    raise StoreError(
                        f"store {self.path}: chunk {info.file}, column 'episode_id', episode "
                        f"{i}: also in chunk {owner[i]}; expected unique episode ids"
                    )
                owner[i] = info.file

    def _decode(
        self, info: ChunkInfo, col: Column, arr: pa.Array, ids: np.ndarray | None
    ) -> np.ndarray:
        """One column read from chunk ``info``, checked against the store's own schema
        (``meta.json``): no nulls (a NaN in an integer column arrives as a null or as a float
        column, which ``_check_chunk`` refuses), the recorded shape, and values inside the
        column's recorded bounds / choices. A writer that bypassed ``validate_batch`` (another
        tool, a hand edit, bit rot under a rewritten hash) is caught here, on every read,
        rather than turned into a verdict. One-line ``StoreError`` naming file, column,
        episode (``ids``, when read alongside) and what was expected."""
        where = f"store {self.path}: chunk {info.file}, column {col.name!r}"
        episode = lambda row: f", episode {ids[row]}" if ids is not None else f", row {row}"
        nulls = arr.null_count + (arr.flatten().null_count if col.shape else 0)
        if nulls:
            mask = np.asarray(arr.is_null())
            if col.shape:  # a null inside a list: find its row
                inner = np.asarray(arr.flatten().is_null()).reshape(len(arr), -1).any(axis=1)
                mask = mask | inner
            raise StoreError(
                f"{where}{episode(int(np.nonzero(mask)[0][0]))}: null/NaN value; meta.json "
                f"declares {col.describe()} with no missing values"
            )
        out = _from_arrow(col, arr)
        if col.dtype != "str" and out.dtype != np.dtype(col.dtype):
            raise StoreError(f"{where}: stored as {out.dtype}, meta.json declares {col.describe()}")
        if col.bounds is not None and out.size:
            lo, hi = col.bounds
            bad = np.nonzero(((out < lo) | (out >= hi)).reshape(len(out), -1).any(axis=1))[0]
            if bad.size:
                row = out[bad[0]]
                found = row.min() if row.min() < lo else row.max()
                raise StoreError(
                    f"{where}{episode(int(bad[0]))}: value {found} outside [{lo}, {hi}), the "
                    "range meta.json records"
                )
        if col.choices and out.size:
            bad = np.nonzero(~np.isin(out, col.choices))[0]
            if bad.size:
                raise StoreError(
                    f"{where}{episode(int(bad[0]))}: value {str(out[bad[0]])!r} is not one of "
                    f"{col.choices}"
                )
        return out

    def _decode_batch(
        self, info: ChunkInfo, cols: Sequence[Column], rb: pa.RecordBatch | pa.Table
    ) -> dict[str, np.ndarray]:
        """The selected columns of one record batch, each checked (``_decode``); the policy's
        own actions (``clean_actions``) must also be legal under the recorded masks on valid
        steps. (Taken ``actions`` may be illegal: a stuck actuator repeats a command that
        stopped being available, a fault the store must be able to hold.)"""
        column = lambda name: rb.column(name) if isinstance(rb, pa.RecordBatch) else (
            rb.column(name).combine_chunks()
        )  # fmt: skip
        names = [c.name for c in cols]
        ids = _from_arrow(self._columns["episode_id"], column("episode_id")) if (
            "episode_id" in names) else None  # fmt: skip
        out = {c.name: self._decode(info, c, column(c.name), ids) for c in cols}
        if {"clean_actions", "avail"} <= set(out) and self._columns["clean_actions"].bounds:
            legal = np.take_along_axis(out["avail"], out["clean_actions"][..., None], -1)[..., 0]
            if "valid" in out:
                legal = legal | ~out["valid"][:, :, None]
            bad = np.argwhere(~legal)
            if bad.size:
                e, t, i = bad[0]
                who = f"episode {ids[e]}" if ids is not None else f"row {e}"
                raise StoreError(
                    f"store {self.path}: chunk {info.file}, column 'clean_actions', {who}: agent "
                    f"{i} at step {t} took action {out['clean_actions'][e, t, i]}, which the "
                    "recorded mask (avail) marks unavailable"
                )
        return out

    def _file(self, info: ChunkInfo) -> Path:
        return self.path / _CHUNKS / info.file

    def _check_chunk(self, info: ChunkInfo) -> str | None:
        """Cheap structural check (stat + footer): None if sound, else what is wrong."""
        f = self._file(info)
        if not f.is_file():
            return "is missing"
        size = f.stat().st_size
        if size != info.bytes:
            return f"is {size} bytes, the manifest recorded {info.bytes} (truncated or replaced)"
        try:
            rows = pq.read_metadata(f).num_rows
        except (pa.ArrowException, OSError) as e:
            return f"has an unreadable Parquet footer ({e})"
        if rows != info.episodes:
            return f"holds {rows} episodes, the manifest recorded {info.episodes}"
        schema = pq.read_schema(f)
        for col in self.meta.columns:
            want = _arrow_type(col)
            if col.name not in schema.names:
                return f"has no column {col.name!r}; meta.json declares {col.describe()}"
            got = schema.field(col.name).type
            if pa.types.is_dictionary(got):
                got = got.value_type
            if got != want and not (col.dtype == "str" and pa.types.is_large_string(got)):
                shown = (
                    f"{got.value_type} × {got.list_size}"
                    if pa.types.is_fixed_size_list(got)
                    else str(got)
                )
                declared = col.describe()
                return f"has column {col.name!r} stored as {shown}; meta.json declares {declared}"
        return None

    def _parquet(self, info: ChunkInfo) -> pq.ParquetFile:
        return pq.ParquetFile(self._file(info), page_checksum_verification=True)

    def _select(self, fields: Iterable[str] | None) -> list[Column]:
        if fields is None:
            return list(self.meta.columns)
        fields = [fields] if isinstance(fields, str) else list(fields)
        if not fields:
            raise StoreError("fields: expected at least one field name (or None for all)")
        bad = [f for f in fields if f not in self._columns]
        if bad:
            raise StoreError(
                f"fields: {bad[0]!r} is not in store {self.path}; stored: {list(self._columns)}"
            )
        return [self._columns[f] for f in fields]

    @contextlib.contextmanager
    def _reading(self, info: ChunkInfo) -> Iterator[None]:
        """Corruption met while reading a chunk surfaces as a StoreError naming the chunk."""
        try:
            yield
        except (pa.ArrowException, OSError) as e:
            raise StoreError(
                f"store {self.path}: chunk {info.file} is corrupt ({type(e).__name__}: {e})"
            ) from None

    @property
    def columns(self) -> tuple[Column, ...]:
        return self.meta.columns

    @property
    def n_episodes(self) -> int:
        return sum(c.episodes for c in self.chunks)

    def __len__(self) -> int:
        return self.n_episodes

    def iter_batches(
        self, fields: Iterable[str] | None = None, batch_episodes: int = 1024
    ) -> Iterator[dict[str, np.ndarray]]:
        """Stream the committed episodes in order as dicts of arrays [B, *shape].

        Every batch holds exactly ``batch_episodes`` episodes except the last (fixed shapes:
        no recompiles downstream). Only the selected fields are read, one row group at a
        time, so memory stays O(batch_episodes + ROW_GROUP_EPISODES) per field.
        """
        if not isinstance(batch_episodes, int) or batch_episodes < 1:
            raise StoreError(f"batch_episodes: expected an integer >= 1, got {batch_episodes!r}")
        cols = self._select(fields)
        names = [c.name for c in cols]
        pending: list[dict[str, np.ndarray]] = []
        held = 0
        for info in self.chunks:
            with self._reading(info):
                batches = self._parquet(info).iter_batches(
                    batch_size=min(batch_episodes, ROW_GROUP_EPISODES), columns=names
                )
            while True:
                with self._reading(info):
                    rb = next(batches, None)
                if rb is None:
                    break
                pending.append(self._decode_batch(info, cols, rb))
                held += rb.num_rows
                if held >= batch_episodes:
                    joined = {n: np.concatenate([p[n] for p in pending]) for n in names}
                    while held >= batch_episodes:
                        yield {n: a[:batch_episodes] for n, a in joined.items()}
                        joined = {n: a[batch_episodes:] for n, a in joined.items()}
                        held -= batch_episodes
                    pending = [joined] if held else []
        if held:
            yield {n: np.concatenate([p[n] for p in pending]) for n in names}

    def episode(self, episode_id: int, fields: Iterable[str] | None = None) -> dict[str, Any]:
        """One episode by id: arrays without the episode axis (scalars as numpy scalars)."""
        cols = self._select(fields)
        for info in self.chunks:
            if not info.first_id <= episode_id <= info.last_id:
                continue
            with self._reading(info):
                pf = self._parquet(info)
                ids = pf.read(columns=["episode_id"]).column(0).to_numpy()
                rows = np.nonzero(ids == episode_id)[0]
                if rows.size == 0:
                    continue
                # the row group holding the row, and the row's offset inside it
                ends = np.cumsum(
                    [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
                )
                group = int(np.searchsorted(ends, rows[0], side="right"))
                offset = int(rows[0]) - (int(ends[group - 1]) if group else 0)
                table = pf.read_row_group(group, columns=[c.name for c in cols])
                table = table.slice(offset, 1)
            return {k: v[0] for k, v in self._decode_batch(info, cols, table).items()}
        raise KeyError(f"episode {episode_id} is not in store {self.path}")

    def ground_truth(self) -> pd.DataFrame:
        """Per-episode scalar columns of all committed episodes (no per-step array is read)."""
        names = [c.name for c in self.meta.columns if not c.per_step and not c.shape]
        tables = []
        for info in self.chunks:
            with self._reading(info):
                table = self._parquet(info).read(columns=names)
            self._decode_batch(info, [self._columns[n] for n in names], table)  # checks only
            tables.append(table)
        if not tables:
            return pd.DataFrame(
                {
                    n: pd.Series(
                        dtype=object if self._columns[n].dtype == "str" else self._columns[n].dtype
                    )
                    for n in names
                }
            )
        return pa.concat_tables(tables).to_pandas()

    def verify(self) -> list[tuple[str, str]]:
        """Re-hash every committed chunk; returns (file, problem) for each mismatch."""
        problems = []
        for info in self.chunks:
            h = hashlib.sha256()
            with open(self._file(info), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            if h.hexdigest() != info.sha256:
                problems.append((info.file, "sha256 differs from the manifest"))
        return problems


def load_clean(cal: EpisodeStore, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The clean episodes of the calibration store (its ``clean`` column selects them)."""
    parts = []
    for b in cal.iter_batches((*fields, "clean"), 1024):
        keep = b.pop("clean")
        parts.append({k: v[keep] for k, v in b.items()})
    out = {k: np.concatenate([p[k] for p in parts]) for k in fields}
    if len(out["episode_id"]) == 0:
        raise StoreError(f"calibration store {cal.path}: holds no clean episodes")
    return out


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Repeat the last episode until the batch holds ``size`` (fixed shapes: one compile per
    jitted consumer); a full batch is returned without a copy."""
    n = len(next(iter(batch.values())))
    if n == size:
        return dict(batch)
    return {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in batch.items()}


def split_batches(arrays: Mapping[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    """In-memory arrays (episode axis 0) in consecutive batches of ``size`` episodes, the
    last one shorter: what ``EpisodeStore.iter_batches`` yields for a store on disk."""
    n = len(next(iter(arrays.values())))
    for lo in range(0, n, size):
        yield {k: v[lo : lo + size] for k, v in arrays.items()}


def open_store(
    path: str | os.PathLike, on_corrupt: Literal["raise", "skip"] = "raise"
) -> EpisodeStore:
    """Open a store for reading. Only committed chunks are visible; a committed chunk that is
    missing, truncated or unreadable raises a ``StoreError`` naming it, or with
    ``on_corrupt="skip"`` is left out with a warning and listed in ``store.skipped``."""
    return EpisodeStore(path, on_corrupt)
