"""SAELens cached activations <-> a store.

SAELens's `CacheActivationsRunner` saves a Hugging Face `datasets` directory (`save_to_disk`)
with one `Array2D(shape=(context_size, d_in))` column per hook (named by the hook, e.g.
`blocks.6.hook_resid_post`) and `token_ids`, a `Sequence(int32, length=context_size)`; one
dataset row is one context.

- `import_cache(cache, out)`: every row's `context_size` tokens become store rows through
  `StoreWriter` (shuffled within shards, statistics, checksums, atomic), token ids, context
  (dataset row) and position kept.
- `export_cache(store, out)`: the store's rows, in store order, `context_size` to a dataset row,
  in SAELens's features. A store's rows are tokens already shuffled across contexts, so an
  exported "context" is `context_size` unrelated tokens: what SAELens trains on (it flattens
  the rows to tokens), not readable text. `token_ids` are those rows' tokens.

Needs `datasets` (`pip install 'sae-jax[hf]'`; the dev install has it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sae_jax.data import store as st
from sae_jax.data.writer import StoreWriter


class CacheError(st.StoreError):
    pass


def _datasets():
    try:
        import datasets
    except ImportError:
        raise CacheError(
            "SAELens caches are Hugging Face datasets, which are not installed: pip install 'datasets>=3.0' (or the 'hf' extra: pip install -e '.[hf]')"
        ) from None
    return datasets


def _hook_columns(ds) -> dict[str, tuple[int, int]]:
    datasets = _datasets()
    return {c: tuple(f.shape) for c, f in ds.features.items() if isinstance(f, datasets.Array2D)}


def open_cache(path):
    path = Path(path).expanduser()
    if not path.is_dir():  # before asking for `datasets`: a mistyped path is the likelier mistake
        raise CacheError(f"{path}: no such directory (a SAELens cache is a datasets directory written by save_to_disk)")
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise CacheError(f"{path}: not a datasets directory saved with save_to_disk ({str(e).splitlines()[0][:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise CacheError(f"{path}: a DatasetDict with splits {list(ds)}; give the directory of one split")
    return ds


def import_cache(
    cache, out, hooks: list[str] | None = None, *, dtype: str | None = None, rows_per_record: int | None = None,
    shard_rows: int = 65536, seed: int | None = None, chunk: int = 64, log=print,
) -> st.Store:  # fmt: skip
    """A SAELens cache directory -> a store at `out` (`hooks`: the columns to import; default all;
    `dtype`, `rows_per_record`, `seed` None: `StoreWriter`'s, the harvest's defaults)."""
    ds = open_cache(cache)
    cols = _hook_columns(ds)
    if not cols:
        raise CacheError(f"{cache}: no activation column (Array2D) among its columns {ds.column_names}")
    hooks = hooks or sorted(cols)
    for h in hooks:
        if h not in cols:
            other = f" ({h!r} is a column but not an Array2D of activations: {ds.features[h]})" if h in ds.column_names else ""
            raise CacheError(f"{cache}: no activation column for hook {h!r}{other}; the cache's hook columns are {sorted(cols)}")
    ctx = {cols[h][0] for h in hooks}
    if len(ctx) != 1:
        raise CacheError(f"{cache}: the hook columns have different context sizes {sorted(ctx)}")
    ctx_len = ctx.pop()
    has_tokens = "token_ids" in ds.column_names
    header = {
        "source": {"kind": "saelens_cache", "path": str(Path(cache).absolute()), "contexts": len(ds)},
        "ctx_len": ctx_len,
        "model": {"name": "unknown (imported from a SAELens cache)", "digest": None},
    }
    w = StoreWriter(
        out, {h: cols[h][1] for h in hooks}, dtype=dtype, rows_per_record=rows_per_record, shard_rows=shard_rows, seed=seed, header=header
    )
    view = ds.with_format("numpy")
    with w:
        for i in range(0, len(ds), chunk):
            batch = view[i : i + chunk]
            n = len(batch[hooks[0]])
            acts = {h: np.asarray(batch[h]).reshape(n * ctx_len, -1) for h in hooks}
            ids = np.asarray(batch["token_ids"], np.int64).reshape(-1) if has_tokens else np.full(n * ctx_len, -1)
            context = np.repeat(np.arange(i, i + n), ctx_len)
            position = np.tile(np.arange(ctx_len), n)
            w.add(acts, tokens=np.stack([ids, context, position], 1))
    store = w.close()
    log(f"{out}: {store.n_rows:,} rows of {', '.join(hooks)} from {len(ds):,} contexts of {ctx_len} in {cache}")
    return store


def _shard_rows(store: st.Store, part: str):
    """Each shard's rows of `part`, in store order."""
    from array_record.python.array_record_module import ArrayRecordReader

    for f in store.files(part):
        r = ArrayRecordReader(str(f))
        try:
            yield np.concatenate([store.decode(part, b) for b in r.read_all()])
        finally:
            r.close()


def export_cache(store, out, hooks: list[str] | None = None, *, context_size: int = 128, dtype: str = "float32", log=print) -> Path:
    """A store -> a directory SAELens reads as cached activations (see the module docstring)."""
    if not isinstance(store, st.Store):
        store = st.open_store(store)
    hooks = hooks or list(store.hooks)
    for h in hooks:
        store.check_hook(h)
    if context_size < 1:
        raise CacheError(f"context_size={context_size}: must be positive")
    if dtype not in ("float32", "float16"):
        raise CacheError(f"dtype {dtype!r}: float32 or float16 (Arrow has no bfloat16)")
    datasets = _datasets()  # after the arguments' own checks
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise CacheError(f"{out} exists and is not empty: refusing to overwrite it")
    n_ctx = store.n_rows // context_size
    if n_ctx < 1:
        raise CacheError(f"{store.root}: {store.n_rows} rows, fewer than one context of {context_size}")
    features = {h: datasets.Array2D(shape=(context_size, store.width(h)), dtype=dtype) for h in hooks}
    features["token_ids"] = datasets.Sequence(datasets.Value("int32"), length=context_size)
    np_dtype = np.dtype(dtype)

    def rows():
        streams = [_shard_rows(store, p) for p in [*hooks, "tokens"]]
        left = [None] * len(streams)
        done = 0
        for shard in zip(*streams):
            parts = [s if lo is None else np.concatenate([lo, s]) for s, lo in zip(shard, left)]
            n = len(parts[0]) // context_size
            for j in range(n):
                if done == n_ctx:
                    return
                sl = slice(j * context_size, (j + 1) * context_size)
                row = {h: parts[i][sl].astype(np_dtype) for i, h in enumerate(hooks)}
                row["token_ids"] = parts[-1][sl, 0].astype(np.int32)
                yield row
                done += 1
            left = [p[n * context_size :] for p in parts]

    import shutil

    # written beside `out` and renamed into place when complete: an interrupted export leaves no
    # directory that loads as a (short) cache
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, cache = out.parent / f".tmp-{out.name}", out.parent / f".tmp-{out.name}-cache"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ds = datasets.Dataset.from_generator(rows, features=datasets.Features(features), cache_dir=str(cache))
        ds.save_to_disk(str(tmp))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{out}: {n_ctx:,} rows of {context_size} tokens ({', '.join(hooks)}), {store.n_rows - n_ctx * context_size} store rows left over")
    return out
