"""Writing a store: shards of shuffled rows with statistics and checksums, and the manifest.

`write_rows` is the one way rows become a shard (seeded shuffle within the shard, whole records,
per-hook statistics, files written under temporary names, fsynced, checksummed and renamed);
`harvest` writes every shard through it, and so does `StoreWriter`, the API for activations from
anywhere (numpy, JAX or torch arrays):

    from sae_jax.data.writer import StoreWriter

    with StoreWriter("runs/my_store", {"blocks.6.hook_resid_post": 768}, dtype="bfloat16") as w:
        for acts, ids in my_pipeline():               # [N, 768] activations, [N] token ids
            w.add({"blocks.6.hook_resid_post": acts}, tokens=ids)
    # leaving the block closes the store (the last partial record is dropped, the manifest
    # marked complete); an exception inside it leaves an incomplete store that training refuses

The manifest is replaced atomically after each shard; until `close` it says `complete: false`.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

import numpy as np

from sae_jax.config import default
from sae_jax.data import store as st


class WriterError(st.StoreError):
    """Arrays that do not fit the store being written (the message names the hook and shape)."""


def shuffle_rows(n: int, seed: int, index: int, rows_per_record: int) -> np.ndarray:
    """The row order of shard `index`: a seeded permutation cut to whole records."""
    perm = np.random.default_rng([seed, index]).permutation(n)
    return perm[: n - n % rows_per_record]


def _chunk(width: int) -> int:
    """Rows per float32 chunk: ~1 MiB, so conversions stay in cache and allocate no large arrays."""
    return max(1, (1 << 18) // max(width, 1))


def row_sq_norms(a: np.ndarray, rows=None) -> np.ndarray:
    """Float32 squared norms of the rows `a[rows]` (all rows if None) of a 2-D array (or the
    leading-axes positions `rows` = (i, j) of a 3-D one), computed a cache-sized chunk at a time."""
    if rows is None:
        rows = (np.arange(len(a)),)
    n = len(rows[0])
    out = np.empty(n, np.float32)
    step = _chunk(a.shape[-1])
    for i in range(0, n, step):
        f = a[tuple(r[i : i + step] for r in rows)].astype(np.float32)
        out[i : i + step] = np.einsum("ij,ij->i", f, f)
    return out


def row_stats(r: np.ndarray) -> tuple[np.ndarray, np.float64]:
    """(sum of the rows, sum of their squared norms), both float64, of `r [N, width]`, from
    float32 chunks."""
    total, sq = np.zeros(r.shape[1], np.float64), np.float64(0.0)
    step = _chunk(r.shape[1])
    for i in range(0, len(r), step):
        f = r[i : i + step].astype(np.float32)
        total += f.sum(0, dtype=np.float64)
        sq += np.einsum("ij,ij->", f, f, dtype=np.float64)
    return total, sq


def write_rows(
    out: Path, index: int, arrays: dict[str, np.ndarray], tokens: np.ndarray, seed: int, rows_per_record: int, dtype
) -> tuple[dict, dict]:
    """Shuffle the rows of one shard (`arrays[hook] [N, width]`, `tokens` int32 [N, 3]), drop the
    tail that does not fill a record, and write the shard atomically with its statistics.
    Returns (manifest entry, statistics) and records the dropped rows in the entry."""
    n = len(tokens)
    perm = shuffle_rows(n, seed, index, rows_per_record)
    rows = {hook: np.ascontiguousarray(a[perm]).astype(dtype, copy=False) for hook, a in arrays.items()}
    entry, stats = write_shuffled(out, index, rows, tokens[perm], rows_per_record)
    entry["rows_dropped"] = n - len(perm)
    return entry, stats


def write_shuffled(out: Path, index: int, rows: dict[str, np.ndarray], tokens: np.ndarray, rows_per_record: int) -> tuple[dict, dict]:
    """Write rows already in their shard order (a whole number of records, the store dtype) with
    their statistics; returns (manifest entry, statistics)."""
    stats = {}
    for hook, r in rows.items():
        stats[f"{hook}/sum"], stats[f"{hook}/sum_sq_norm"] = row_stats(r)
        stats[f"{hook}/count"] = np.int64(len(r))
    entry = st.write_shard(out, index, rows, np.ascontiguousarray(tokens, dtype=np.int32), stats, rows_per_record)
    return entry, stats


def new_manifest(out: Path, header: dict, fingerprint: dict) -> dict:
    """Create `out` (absent or empty) with an empty manifest; refuse a directory holding other files."""
    if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".tmp-")):
        raise st.StoreError(f"{out} exists and holds files but no {st.MANIFEST}: refusing to write a store into it")
    out.mkdir(parents=True, exist_ok=True)
    m = {**header, "fingerprint": fingerprint, "shards": [], "complete": False}
    st.atomic_write_text(out / st.MANIFEST, json_dumps(m))
    return m


def update_manifest(out: Path, m: dict, totals: st.StatsAccumulator) -> None:
    """Write the manifest with the statistics of every listed shard (atomically)."""
    for hook, t in totals.result().items():
        m["hooks"][hook]["mean"] = [float(x) for x in t["mean"]] if t["mean"] is not None else None
        m["hooks"][hook]["mean_sq_norm"] = t["mean_sq_norm"]
    m["rows"] = sum(s["rows"] for s in m["shards"])
    st.atomic_write_text(out / st.MANIFEST, json_dumps(m))


def json_dumps(m: dict) -> str:
    return json.dumps(m, indent=1) + "\n"


def _to_numpy(x, what: str) -> np.ndarray:
    """numpy, JAX or torch (any device, bfloat16 included) -> numpy, without importing torch."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # noqa: BLE001
        raise WriterError(f"{what}: cannot be read as an array ({type(x).__name__}: {e})") from None


class StoreWriter:
    """A store from arrays of any origin: `add` batches of rows, `close` (or leave the `with`).

    `hooks`: {hook name: width}. `add(arrays, tokens=None)`: `arrays[hook]` of shape [N, width]
    for every hook (the same N, floating point), `tokens` the N token ids (or [N, 3]: id, context,
    position; without them ids are -1 and each row is its own context). Rows are buffered into
    shards of `shard_rows` (a multiple of `rows_per_record`), each shuffled with a seeded
    permutation, written atomically with its statistics and listed in the manifest. `header`
    adds manifest fields (model, tokenizer, source, ctx_len, ...; defaults say "external").
    `dtype`, `rows_per_record`, `seed` None: the harvest's defaults (`harvest.*`).

    The store is written in a hidden folder beside `out` (`.NAME.writing-PID`) and renamed to `out`
    by `close` once complete: `out` never holds a partial store. An exception inside the `with`
    (bad rows, a full disk) removes the hidden folder; `out` must be absent or an empty folder."""

    def __init__(
        self,
        out,
        hooks: dict[str, int],
        *,
        dtype: str | None = None,
        rows_per_record: int | None = None,
        shard_rows: int = 65536,
        seed: int | None = None,
        header: dict | None = None,
    ):
        dtype = default("harvest.dtype") if dtype is None else dtype
        rows_per_record = default("harvest.rows_per_record") if rows_per_record is None else rows_per_record
        seed = default("harvest.seed") if seed is None else seed
        if dtype not in st.DTYPES:
            raise WriterError(f"dtype {dtype!r}: one of {', '.join(st.DTYPES)}")
        if not hooks:
            raise WriterError("a store needs at least one hook")
        for h, w in hooks.items():
            if not isinstance(h, str) or not h or h in ("tokens", "stats") or "/" in h:
                raise WriterError(f"hook name {h!r}: a non-empty name other than 'tokens' and 'stats', without '/'")
            if int(w) < 1:
                raise WriterError(f"hook {h!r}: width {w} must be positive")
        if rows_per_record < 1 or shard_rows < rows_per_record or shard_rows % rows_per_record:
            raise WriterError(f"shard_rows={shard_rows} must be a positive multiple of rows_per_record={rows_per_record}")
        self.out = Path(out).expanduser()
        _check_free(self.out)
        self._dir = self.out.with_name(f".{self.out.name}.writing-{os.getpid()}")  # renamed to `out` by close()
        shutil.rmtree(self._dir, ignore_errors=True)
        self.widths = {h: int(w) for h, w in hooks.items()}
        self.dtype, self.np_dtype = dtype, st.DTYPES[dtype]
        self.rows_per_record, self.shard_rows, self.seed = rows_per_record, shard_rows, seed
        base = {
            "format": st.FORMAT,
            "format_version": st.FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "model": {"name": "external", "digest": None},
            "tokenizer": {"bos_id": None, "eos_id": None, "special_ids": []},
            "source": {"kind": "external"},
            "ctx_len": None,
            "bos_prepended": False,
            "exclude_special": False,
            "outlier_ratio": 0.0,
            "token_fields": list(st.TOKEN_FIELDS),
        }
        meta = {**base, **(header or {})}
        meta["hooks"] = {h: {**(meta.get("hooks", {}).get(h, {})), "width": w} for h, w in self.widths.items()}
        meta.update(dtype=dtype, rows_per_record=rows_per_record)
        fingerprint = {"writer": "StoreWriter", "hooks": self.widths, "dtype": dtype, "rows_per_record": rows_per_record, "seed": seed}
        try:
            self.m = new_manifest(self._dir, meta, fingerprint)
        except OSError as e:
            raise WriterError(f"{self.out}: cannot write a store there ({e.strerror})") from None
        self.totals = st.StatsAccumulator(list(self.widths))
        self._buf: dict[str, list[np.ndarray]] = {h: [] for h in self.widths}
        self._tok: list[np.ndarray] = []
        self._n = 0  # rows buffered
        self._rows_in = 0  # rows added in all
        self.closed = False

    # ---- adding rows
    def add(self, arrays: dict, tokens=None) -> None:
        if self.closed:
            raise WriterError(f"{self.out}: the writer is closed")
        if not isinstance(arrays, dict):
            raise WriterError(f"add() takes {{hook: array [N, width]}}, got {type(arrays).__name__}")
        missing, extra = sorted(set(self.widths) - set(arrays)), sorted(set(arrays) - set(self.widths))
        if missing or extra:
            raise WriterError(
                f"{self.out}: add() got hooks {sorted(arrays)}; the store has {sorted(self.widths)}"
                + (f" (missing {missing})" if missing else "")
                + (f" (not in the store: {extra})" if extra else "")
            )
        rows = {}
        n = None
        for h, w in self.widths.items():
            a = _to_numpy(arrays[h], f"hook {h!r}")
            if a.ndim != 2 or a.shape[1] != w:
                raise WriterError(f"{self.out}: hook {h!r}: array of shape {tuple(a.shape)}, the store's width is {w} (expected [N, {w}])")
            if not (np.issubdtype(a.dtype, np.floating) or a.dtype == self.np_dtype):
                raise WriterError(f"{self.out}: hook {h!r}: dtype {a.dtype} is not floating point (the store holds {self.dtype})")
            if n is not None and len(a) != n:
                raise WriterError(f"{self.out}: hook {h!r} has {len(a)} rows, another hook {n}: every hook needs the same rows")
            n = len(a)
            if not np.isfinite(a.astype(np.float32, copy=False)).all():
                raise WriterError(f"{self.out}: hook {h!r}: non-finite values (NaN or Inf) in rows {self._rows_in}..{self._rows_in + n}")
            rows[h] = a
        self._buf_tokens(tokens, n)
        for h, a in rows.items():
            self._buf[h].append(a)
        self._n += n
        self._rows_in += n
        while self._n >= self.shard_rows:
            self._flush(self.shard_rows)

    def _buf_tokens(self, tokens, n: int) -> None:
        if tokens is None:
            idx = np.arange(self._rows_in, self._rows_in + n, dtype=np.int64)
            t = np.stack([np.full(n, -1), idx, np.zeros(n, np.int64)], 1)
        else:
            t = _to_numpy(tokens, "tokens")
            if t.ndim == 1 and len(t) == n:
                idx = np.arange(self._rows_in, self._rows_in + n, dtype=np.int64)
                t = np.stack([t.astype(np.int64), idx, np.zeros(n, np.int64)], 1)
            elif not (t.ndim == 2 and t.shape == (n, len(st.TOKEN_FIELDS))):
                raise WriterError(
                    f"{self.out}: tokens of shape {tuple(t.shape)}: expected [{n}] token ids or [{n}, 3] (id, context, position)"
                )
            if not np.issubdtype(t.dtype, np.integer):
                raise WriterError(f"{self.out}: tokens of dtype {t.dtype}: integers expected")
        if np.abs(t).max(initial=0) >= 2**31:
            raise WriterError(f"{self.out}: token fields exceed int32")
        self._tok.append(t.astype(np.int32))

    def _flush(self, n: int) -> None:
        arrays = {h: np.concatenate(v) for h, v in self._buf.items()}
        tokens = np.concatenate(self._tok)
        take = {h: a[:n] for h, a in arrays.items()}
        self._buf = {h: [a[n:]] for h, a in arrays.items()}
        self._tok = [tokens[n:]]
        self._n -= n
        index = len(self.m["shards"])
        entry, stats = write_rows(self._dir, index, take, tokens[:n], self.seed, self.rows_per_record, self.np_dtype)
        entry["rows_outliers"] = 0
        self.totals.add(stats)
        self.m["shards"].append(entry)
        update_manifest(self._dir, self.m, self.totals)

    def close(self) -> st.Store:
        """Write the remaining rows (whole records), mark the store complete, move it to `out`,
        return it opened."""
        if self.closed:
            return st.open_store(self.out)
        try:
            if self._n >= self.rows_per_record:
                self._flush(self._n)
            dropped = self._n
            self.closed = True
            if not self.m["shards"]:
                raise WriterError(
                    f"{self.out}: {self._rows_in} rows added, fewer than one record of {self.rows_per_record}: nothing to store"
                )
            m = self.m
            m["rows"] = sum(s["rows"] for s in m["shards"])
            m["rows_dropped"] = sum(s["rows_dropped"] for s in m["shards"]) + dropped
            m["rows_outliers"] = 0
            m["contexts"] = None
            m["complete"] = True
            st.atomic_write_text(self._dir / st.MANIFEST, json_dumps(m))
            _check_free(self.out)
            if self.out.is_dir():
                self.out.rmdir()  # empty (checked): the finished store takes its place
            os.replace(self._dir, self.out)
        except BaseException:
            self.abort()
            raise
        return st.open_store(self.out)

    def abort(self) -> None:
        """Stop and remove what was written (nothing reaches `out`)."""
        self.closed = True
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:  # nothing half-written is left behind
            self.abort()
        return False


def _check_free(out: Path) -> None:
    """`out` must be absent or an empty folder: a store is never written over anything."""
    if not out.exists():
        return
    if not out.is_dir():
        raise WriterError(f"{out} exists and is not a folder: choose another path for the store")
    if any(out.iterdir()):
        what = "a store" if (out / st.MANIFEST).exists() else "other files"
        raise WriterError(f"{out} already holds {what}: remove it or choose another path")
