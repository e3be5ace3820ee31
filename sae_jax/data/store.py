"""The activation store: `manifest.json` plus sharded ArrayRecord files.

Layout of a store directory::

    manifest.json
    shard-00000.tokens.array_record                    # int32 [R, 3]: token id, context index, position
    shard-00000.<hook name>.array_record               # one file per hook: [R, width] in the store dtype
    shard-00000.stats.npz                              # per-hook sum, sum of squared norms, row count
    shard-00001....

Shard `s`, record `i` of every file holds the same R tokens (rows), so a batch for hooks {A, B}
reads record i of A's file and of B's file and nothing else. Rows are tokens shuffled within a
shard (a shard spans `seqs_per_shard` contexts, themselves window-shuffled over the corpus); the
loader shuffles records globally. Each record is the raw C-order bytes of its array, so a read is
one `np.frombuffer`.

Atomicity: a shard's files are written under temporary names, fsynced, checksummed (sha256) and
renamed; only then is the shard appended to the manifest, which is itself replaced atomically.
The manifest is the only source of truth: files it does not list are never read, and a restarted
harvest rewrites them.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from sae_jax.errors import SaeJaxError

FORMAT = "sae_jax.activation_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}
TOKEN_FIELDS = ("token_id", "context", "position")
_WRITER_OPTIONS = "group_size:1,uncompressed"  # group_size 1: a random read decodes one record


class StoreError(SaeJaxError, RuntimeError):
    """A store that is missing, damaged, or not what the command expects; the message names the file."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def shard_file(index: int, part: str) -> str:
    ext = "npz" if part == "stats" else "array_record"
    return f"shard-{index:05d}.{part}.{ext}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- writing


def write_shard(
    root: Path, index: int, arrays: dict[str, np.ndarray], tokens: np.ndarray, stats: dict[str, np.ndarray], rows_per_record: int
) -> dict:
    """Write one shard atomically; returns its manifest entry.

    `arrays[hook]` is `[n_rows, width]` in the store dtype with n_rows a multiple of
    `rows_per_record`; `tokens` is int32 `[n_rows, 3]`.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    n_rows = len(tokens)
    assert n_rows % rows_per_record == 0, (n_rows, rows_per_record)
    n_rec = n_rows // rows_per_record
    entry = {"index": index, "records": n_rec, "rows": n_rows, "files": {}}
    parts = {"tokens": tokens, **arrays}
    tmps = []
    for part, arr in parts.items():
        assert len(arr) == n_rows, (part, arr.shape, n_rows)
        name = shard_file(index, part)
        tmp = root / f".tmp-{name}"
        w = ArrayRecordWriter(str(tmp), _WRITER_OPTIONS)
        blocks = np.ascontiguousarray(arr).reshape(n_rec, rows_per_record * arr.shape[1])
        for r in range(n_rec):
            w.write(blocks[r].tobytes())
        w.close()
        tmps.append((tmp, root / name, part))
    stats_name = shard_file(index, "stats")
    tmp_stats = root / f".tmp-{stats_name}"
    with open(tmp_stats, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in stats.items()})
    tmps.append((tmp_stats, root / stats_name, "stats"))
    for tmp, final, part in tmps:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        entry["files"][part] = {"name": final.name, "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
        os.replace(tmp, final)
    _fsync_dir(root)
    return entry


# ---------------------------------------------------------------- reading


@dataclass
class Store:
    """An opened store: its manifest, checked against the files on disk."""

    root: Path
    manifest: dict

    @property
    def hooks(self) -> dict:
        return self.manifest["hooks"]

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def rows_per_record(self) -> int:
        return self.manifest["rows_per_record"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.manifest["dtype"]])

    @property
    def n_records(self) -> int:
        return sum(s["records"] for s in self.shards)

    @property
    def n_rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def width(self, hook: str) -> int:
        self.check_hook(hook)
        return self.hooks[hook]["width"]

    def check_hook(self, hook: str) -> None:
        if hook != "tokens" and hook not in self.hooks:
            raise StoreError(f"{self.root}: hook {hook!r} is not in this store (it has: {', '.join(self.hooks)})")

    def files(self, part: str) -> list[Path]:
        self.check_hook(part)
        return [self.root / s["files"][part]["name"] for s in self.shards]

    def decode(self, part: str, record: bytes) -> np.ndarray:
        if part == "tokens":
            return np.frombuffer(record, dtype=np.int32).reshape(-1, len(TOKEN_FIELDS))
        return np.frombuffer(record, dtype=self.dtype).reshape(-1, self.hooks[part]["width"])

    def read_all(self, part: str) -> np.ndarray:
        """Every row of `part` (a hook or 'tokens') in store order: for tests, tools and small stores."""
        from array_record.python.array_record_module import ArrayRecordReader

        out = []
        for f in self.files(part):
            r = ArrayRecordReader(str(f))
            out += [self.decode(part, b) for b in r.read_all()]
            r.close()
        return np.concatenate(out) if out else np.zeros((0, self.width(part) if part != "tokens" else len(TOKEN_FIELDS)))

    def verify(self, workers: int = 4) -> list[str]:
        """Checksum every listed file and check the manifest statistics. Returns the problems found."""
        jobs = [(self.root / f["name"], f) for s in self.shards for f in s["files"].values()]

        def check(job):
            path, f = job
            if not path.is_file():
                return f"{path}: missing"
            size = path.stat().st_size
            if size != f["bytes"]:
                return f"{path}: {size} bytes, the manifest says {f['bytes']} (truncated or replaced)"
            if sha256_file(path) != f["sha256"]:
                return f"{path}: checksum mismatch (the file is corrupted)"
            return None

        with ThreadPoolExecutor(workers) as ex:
            problems = [p for p in ex.map(check, jobs) if p]
        if not problems:
            problems += self._check_stats()
        return problems

    def _check_stats(self) -> list[str]:
        totals = aggregate_stats(self.root, self.shards, list(self.hooks)).result()
        out = []
        for hook, meta in self.hooks.items():
            if totals[hook]["count"] != self.n_rows:
                out.append(
                    f"{self.root / MANIFEST}: hook {hook!r} statistics cover {totals[hook]['count']} rows, the shards hold {self.n_rows}"
                )
            mean = np.asarray(meta["mean"])
            if not np.allclose(mean, totals[hook]["mean"], rtol=1e-5, atol=1e-6) or not np.isclose(
                meta["mean_sq_norm"], totals[hook]["mean_sq_norm"], rtol=1e-6
            ):
                out.append(f"{self.root / MANIFEST}: hook {hook!r} statistics disagree with the shards' stats files")
        return out


class StatsAccumulator:
    """Running per-hook sum, sum of squared norms and row count (float64)."""

    def __init__(self, hooks: list[str]):
        self.acc = {h: {"sum": None, "sum_sq_norm": 0.0, "count": 0} for h in hooks}

    def add(self, stats) -> None:
        """`stats` maps `hook/sum`, `hook/sum_sq_norm`, `hook/count` (a shard's stats file)."""
        for h, a in self.acc.items():
            v = np.asarray(stats[f"{h}/sum"], dtype=np.float64)
            a["sum"] = v if a["sum"] is None else a["sum"] + v
            a["sum_sq_norm"] += float(stats[f"{h}/sum_sq_norm"])
            a["count"] += int(stats[f"{h}/count"])

    def result(self) -> dict:
        out = {}
        for h, a in self.acc.items():
            n = max(a["count"], 1)
            out[h] = {"mean": (a["sum"] / n) if a["sum"] is not None else None, "mean_sq_norm": a["sum_sq_norm"] / n, "count": a["count"]}
        return out


def aggregate_stats(root: Path, shards: list[dict], hooks: list[str]) -> StatsAccumulator:
    """Sum the per-shard stats files."""
    acc = StatsAccumulator(hooks)
    for s in shards:
        path = root / s["files"]["stats"]["name"]
        try:
            with np.load(path) as z:
                acc.add(z)
        except (OSError, KeyError, ValueError) as e:
            raise StoreError(f"{path}: unreadable shard statistics ({e})") from None
    return acc


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise StoreError(f"{root}: not an activation store (no {MANIFEST})")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: invalid JSON ({e})") from None
    if m.get("format") != FORMAT:
        raise StoreError(f"{path}: not a sae_jax activation store manifest (format={m.get('format')!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: format version {m.get('format_version')} is not supported (this sae_jax reads {FORMAT_VERSION})")
    for key in ("hooks", "shards", "rows_per_record", "dtype", "fingerprint"):
        if key not in m:
            raise StoreError(f"{path}: manifest lacks the key {key!r}")
    return m


def open_store(root, *, require_complete: bool = True, verify: bool = False) -> Store:
    """Open a store, checking that every listed file exists with the listed size and record count.

    `verify=True` also checks every checksum (what `sae-jax verify` does).
    """
    from array_record.python.array_record_module import ArrayRecordReader

    root = Path(root)
    m = read_manifest(root)
    store = Store(root, m)
    if require_complete and not m.get("complete"):
        raise StoreError(
            f"{root}: the harvest has not finished ({len(store.shards)} shards so far); run the same harvest command again to complete it"
        )
    if not store.shards:
        raise StoreError(f"{root}: the store has no shards")
    for s in store.shards:
        if set(s["files"]) != {"tokens", "stats", *m["hooks"]}:
            raise StoreError(
                f"{root / MANIFEST}: shard {s['index']} lists files {sorted(s['files'])}, expected tokens, stats and {sorted(m['hooks'])}"
            )
        for part, f in s["files"].items():
            path = root / f["name"]
            if not path.is_file():
                raise StoreError(f"{path}: listed in the manifest but missing")
            if path.stat().st_size != f["bytes"]:
                raise StoreError(f"{path}: {path.stat().st_size} bytes, the manifest says {f['bytes']} (truncated or replaced)")
            if part == "stats":
                continue
            try:
                r = ArrayRecordReader(str(path))
                n = r.num_records()
                r.close()
            except Exception as e:
                raise StoreError(f"{path}: not a readable ArrayRecord file ({e})") from None
            if n != s["records"]:
                raise StoreError(f"{path}: holds {n} records, the manifest says {s['records']}")
    if verify:
        problems = store.verify()
        if problems:
            raise StoreError("store verification failed:\n  " + "\n  ".join(problems))
    return store
