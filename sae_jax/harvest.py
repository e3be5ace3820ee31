"""`sae-jax harvest`: run the model over text once and write several hook points into one store.

The forward is one `jax.jit` function of fixed shape `[batch_size, ctx_len]` (the last batch is
padded), so a harvest compiles exactly once. Work is organised in shards of `seqs_per_shard`
contexts: a shard's content depends only on its index and the settings, so a killed harvest
restarted with the same command regenerates the context stream, skips the shards the manifest
lists, and ends with exactly the store an uninterrupted run writes.

The forward runs on a `data` x `model` device mesh over every device of every process
(`harvest.mesh_data` / `mesh_model`; the weights tensor-parallel over `model` by the rule table
of `model/sharding.py`, loaded straight into their shards). Several processes (`distributed.*`;
the hosts of a pod, the nodes of a job) tokenize the text once between them
(`data/token_cache.py`); the processes holding the same rows of contexts form a data group, the
groups split the shards left into contiguous runs, all call the forward together, and each
group's first process writes its shards and records them in its own
`manifest.process-p-of-P.json`; process 0 merges those into the one manifest when all are done:
the store is the one a single device writes. A restart with any number of processes first folds
every finished shard into the manifest and writes only the others. docs/harvest.md has the whole
picture.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae_jax.config import harvest_fingerprint_fields
from sae_jax.data import store as st
from sae_jax.data.contexts import contexts
from sae_jax.data.text import describe, documents
from sae_jax.data.token_cache import CACHE
from sae_jax.data.writer import json_dumps, new_manifest, row_sq_norms, shuffle_rows, update_manifest, write_shuffled
from sae_jax.errors import SaeJaxError
from sae_jax.model.hooks import parse_hook, parse_hooks
from sae_jax.model.loading import LoadedModel, load_model

PARTS = "manifest.process-*-of-*.json"  # one per process of a multi-process harvest, merged at the end


class HarvestError(SaeJaxError, RuntimeError):
    pass


def _check_settings(c) -> None:
    h, d = c.harvest, c.data
    if h.dtype not in st.DTYPES:
        raise HarvestError(f"harvest.dtype={h.dtype!r}: must be one of {', '.join(st.DTYPES)}")
    for key, v in (
        ("harvest.tokens", h.tokens),
        ("harvest.batch_size", h.batch_size),
        ("harvest.seqs_per_shard", h.seqs_per_shard),
        ("harvest.rows_per_record", h.rows_per_record),
    ):
        if v < 1:
            raise HarvestError(f"{key}={v}: must be at least 1")
    if d.ctx_len < 2:
        raise HarvestError(f"data.ctx_len={d.ctx_len}: must be at least 2")
    if not h.out:
        raise HarvestError("harvest.out: no output directory given")


def _prepare_dir(out: Path, fingerprint: dict, header: dict) -> dict:
    """Return the manifest to continue from, creating a fresh one if the directory is new.

    Refuses (without touching anything) a directory that holds other files or a different store.
    """
    mpath = out / st.MANIFEST
    if mpath.exists():
        m = st.read_manifest(out)
        if m["fingerprint"] != fingerprint:
            diff = sorted(_diff_keys(m["fingerprint"], fingerprint))
            raise st.StoreError(
                f"{out} already holds a different store (settings differ: {', '.join(diff)}); "
                "choose another harvest.out or delete it yourself"
            )
        if m["shards"]:
            st.open_store(out, require_complete=False)  # listed shards must be intact to build on them
        return m
    return new_manifest(out, header, fingerprint)


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def make_forward(model, hooks, dtype, mesh=None):
    """(jit(state, tokens [B, T]) -> {hook: activations [B, T, width] in `dtype`}, state).

    With `mesh`, the state is placed by the rule table of `model/sharding.py` (weights split over
    `model`), tokens and activations are split over `data`, and every hook output is whole on each
    `model` column (the process that holds a row of contexts holds its activations)."""
    graphdef, state = nnx.split(model)
    hooks = tuple(hooks)

    def fwd(state, tokens):
        _, acts = nnx.merge(graphdef, state)(tokens, hooks, logits=False)
        return {k: v.astype(dtype) for k, v in acts.items()}

    if mesh is None:
        return jax.jit(fwd), state
    from jax.sharding import NamedSharding

    from sae_jax.model import sharding as msh

    shardings = msh.state_shardings(state, mesh, model.cfg)
    if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)):  # abstract: compile-check
        state = jax.device_put(state, shardings)
    jitted = jax.jit(fwd, in_shardings=(shardings, NamedSharding(mesh, msh.TOKENS)), out_shardings=NamedSharding(mesh, msh.ACTIVATIONS))
    return jitted, state


def harvest(c, log=print, lm: LoadedModel | None = None, devices=None) -> st.Store:
    """Run the harvest `c` describes (see the module docstring). `lm`: the model of
    `c.model`, already loaded (saves reloading it; the caller vouches that it is that model);
    `devices`: the devices of the harvest mesh (default: see `model.sharding.harvest_mesh`)."""
    _check_settings(c)
    if c.model.backend not in ("flax", "torch"):
        raise HarvestError(f"model.backend={c.model.backend!r}: flax or torch")
    torch_backend = c.model.backend == "torch"
    own_model = lm is None
    mesh = None
    if lm is None and torch_backend:
        from sae_jax.model.torch_backend import TorchModel

        names = [parse_hook(x).name for x in str(c.harvest.hooks).split(",") if x.strip()]
        m = c.model
        lm = TorchModel(m.path, names, python=m.torch_python, device=m.torch_device, dtype=m.dtype, torch_hooks=m.torch_hooks)
    if not torch_backend:
        from sae_jax.model.loading import model_config
        from sae_jax.model.sharding import harvest_mesh

        cfg = lm.cfg if lm is not None else model_config(c.model.path)
        parse_hooks(c.harvest.hooks, cfg.n_layers)  # a hook the model lacks fails before any weight is read
        mesh = harvest_mesh(cfg, c.harvest, jnp.dtype(c.model.dtype).itemsize, devices, log)
        lm = lm or load_model(c.model.path, c.model.dtype, mesh=mesh)
    try:
        return _harvest(c, lm, log, torch_backend, mesh)
    finally:
        if own_model and torch_backend:
            lm.close()


def _identity(c, lm, hooks, src: str, bos, n_target: int, torch_backend: bool) -> tuple[dict, dict]:
    """(fingerprint, manifest header) of the store this harvest writes: the fingerprint must
    match a store already there (a restart with other settings is refused)."""
    h, d = c.harvest, c.data
    fingerprint = {**harvest_fingerprint_fields(c), "model": lm.identity["digest"], "source": src, "hooks": [x.name for x in hooks]}
    if torch_backend:  # (absent for the Flax backend, so stores written before the option keep their fingerprint)
        fingerprint["backend"] = "torch"
    fingerprint = json.loads(json.dumps(fingerprint))  # compared with the manifest's JSON copy
    header = {
        "format": st.FORMAT,
        "format_version": st.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": lm.identity,
        "tokenizer": {"bos_id": lm.bos_id, "eos_id": lm.eos_id, "special_ids": sorted(lm.special_ids)},
        "source": src,
        "hooks": {x.name: {"layer": x.layer, "point": x.point, "width": lm.cfg.hook_width(x.point)} for x in hooks},
        "dtype": h.dtype,
        "rows_per_record": h.rows_per_record,
        "ctx_len": d.ctx_len,
        "bos_prepended": bos is not None,
        "exclude_special": h.exclude_special,
        "outlier_ratio": h.outlier_ratio,
        "token_fields": list(st.TOKEN_FIELDS),
        "contexts_target": n_target,
    }
    return fingerprint, header


def _compiled_forward(lm, hooks, h, ctx_len: int, store_dtype, torch_backend: bool, mesh):
    """(forward(state, tokens [batch, ctx]) -> {hook: activations}, state)."""
    if torch_backend:

        def fwd(_, tokens):
            return {k: v.astype(store_dtype) for k, v in lm.forward(np.asarray(tokens)).items()}

        return fwd, None
    from jax.sharding import NamedSharding

    from sae_jax.model.sharding import TOKENS

    fwd, state = make_forward(lm.model, hooks, jnp.dtype(store_dtype), mesh)
    # Compiled once, ahead of time, for the one fixed shape; the loop calls only this executable
    # (a batch of another shape would be an error, never a silent recompilation).
    tokens = jax.ShapeDtypeStruct((h.batch_size, ctx_len), jnp.int32, sharding=NamedSharding(mesh, TOKENS))
    return fwd.lower(state, tokens).compile(), state


def _groups(mesh, torch_backend: bool) -> tuple[int, int, bool]:
    """(group, groups, writes): this process's data-parallel group of the harvest mesh, how many
    there are, and whether this process writes its group's shards (the group's first process:
    processes that split one row of contexts over `model` all hold its activations)."""
    me, n = jax.process_index(), jax.process_count()
    if torch_backend or n == 1:
        return me, n, True
    from sae_jax import parallel

    group, groups = parallel.data_group(mesh)
    rows = [row for row in mesh.devices if any(d.process_index == me for d in row)]
    return group, groups, me == min(d.process_index for row in rows for d in row)


def _shard_stream(ctx_iter, seqs_per_shard: int):
    """(index, first context, contexts) of every shard in order; empty once the text runs out."""
    first = 0
    for index in itertools.count():
        ctxs = list(itertools.islice(ctx_iter, seqs_per_shard))
        yield index, first, ctxs
        first += len(ctxs)


def _shared_tokenization(c, lm, out: Path, bos, n_target: int, me: int, n_proc: int):
    """Several processes: each tokenizes its share of the documents into the store's token
    cache, then reads the contexts of its shards from it (data/token_cache.py)."""
    from sae_jax.data import token_cache as tc

    d = c.data
    body = d.ctx_len - (bos is not None)
    needed = tc.contexts_needed(n_target, d.shuffle_window) * body
    docs = documents(d.source, d.path, d.split, d.text_key, d.tfds_name)
    lengths = tc.tokenize_share(docs, lm.tokenizer, lm.eos_id, out / tc.CACHE, me, n_proc, needed, _barrier)
    return tc.CachedContexts(out / tc.CACHE, lengths, d.ctx_len, bos, d.shuffle_window, d.seed, n_target)


def _harvest(c, lm, log, torch_backend: bool, mesh) -> st.Store:
    h, d = c.harvest, c.data
    out = Path(h.out).expanduser()
    hooks = parse_hooks(h.hooks, lm.cfg.n_layers)
    src = describe(d.source, d.path, d.split, d.text_key, d.tfds_name)
    bos = lm.bos_id if d.prepend_bos else None
    n_target = math.ceil(h.tokens / (d.ctx_len - (bos is not None)))
    fingerprint, header = _identity(c, lm, hooks, src, bos, n_target, torch_backend)
    # Read the first context before touching the output directory: a bad or empty text source
    # fails here and leaves nothing behind.
    ctx_iter = contexts(
        documents(d.source, d.path, d.split, d.text_key, d.tfds_name), lm.tokenizer, d.ctx_len, bos, lm.eos_id, d.shuffle_window, d.seed
    )
    ctx_iter = itertools.chain([next(ctx_iter)], ctx_iter)
    n_proc, me = jax.process_count(), jax.process_index()
    m = _open_output(out, fingerprint, header, me)
    if m["complete"]:
        log(f"{out}: store already complete ({len(m['shards'])} shards); nothing to do")
        return st.open_store(out)

    group, groups, writes = _groups(mesh, torch_backend)
    have = {s["index"] for s in m["shards"]}
    n_shards = math.ceil(n_target / h.seqs_per_shard)
    # each group takes a contiguous run of the shards left (several processes read only the token
    # blocks of their own windows: data/token_cache.py)
    left_shards = [i for i in range(n_shards) if i not in have]
    per = math.ceil(len(left_shards) / groups) if left_shards else 0
    pending = {g: left_shards[g * per : (g + 1) * per] for g in range(groups)}
    mine = pending[group]
    # every process runs the same number of forward calls (collectives over the mesh): a group
    # with fewer shards left runs padding rounds
    rounds = max(map(len, pending.values()))
    local_batch = h.batch_size // groups if not torch_backend else h.batch_size
    collective = n_proc > 1 and not torch_backend
    calls = math.ceil(h.seqs_per_shard / local_batch) if collective else None
    if have:
        log(
            f"{out}: resuming: {len(have)} of {n_shards} shards done"
            + (f"; process {me} of {n_proc} writes {len(mine) if writes else 0}" if n_proc > 1 else "")
        )
    if mesh is not None and mesh.devices.size > 1:
        log(f"harvest mesh: data={mesh.shape['data']} x model={mesh.shape['model']} ({mesh.devices.size} devices)")
    if n_proc == 1:
        stream = _shard_stream(itertools.islice(ctx_iter, n_target), h.seqs_per_shard)

        def shard_contexts(index):  # indices come in increasing order
            return next(itertools.dropwhile(lambda s: s[0] < index, stream))[1:]
    else:
        cached = _shared_tokenization(c, lm, out, bos, n_target, me, n_proc)

        def shard_contexts(index):
            return index * h.seqs_per_shard, cached.get(index * h.seqs_per_shard, (index + 1) * h.seqs_per_shard)

    store_dtype = st.DTYPES[h.dtype]
    t0 = time.perf_counter()
    fwd, state = _compiled_forward(lm, hooks, h, d.ctx_len, store_dtype, torch_backend, mesh)
    compile_s = time.perf_counter() - t0
    special = np.zeros(lm.cfg.vocab_size + 1, dtype=bool)
    if h.exclude_special:
        special[[i for i in lm.special_ids if i < len(special)]] = True
    widths = {x.name: lm.cfg.hook_width(x.point) for x in hooks}
    left = min(len(mine) * h.seqs_per_shard, n_target - sum(s["contexts"][1] - s["contexts"][0] for s in m["shards"]))
    bar = _progress(h.progress and me == 0, total=max(left, 0) * d.ctx_len, initial=0)
    totals = st.aggregate_stats(out, m["shards"], list(m["hooks"]))  # of the shards already written
    written = []  # this process's new shards (several processes: its part of the manifest)
    part = out / f"manifest.process-{me}-of-{n_proc}.json"
    t0, tokens_run = time.perf_counter(), 0

    lock = threading.Lock()

    def finish(index, toks, acts, first):  # on a writer thread
        entry, stats = _write_shard(out, index, toks, acts, first, special, widths, h, store_dtype)
        with lock:  # the manifest (or this process's part of it) lists the shard once its files are complete
            if n_proc == 1:
                totals.add(stats)
                m["shards"].append(entry)
                m["shards"].sort(key=lambda s: s["index"])
                update_manifest(out, m, totals)
            else:
                written.append(entry)
                written.sort(key=lambda s: s["index"])
                st.atomic_write_text(part, json_dumps({"fingerprint": fingerprint, "shards": written}))

    # Writer threads shuffle, filter, checksum and write shards while the model runs on the next
    # ones; at most `writers` shards wait in host memory. The manifest's statistics are summed
    # again in index order at the end, so the order shards land in does not change the store.
    n_writers = writer_threads(h.writers)
    with ThreadPoolExecutor(n_writers, thread_name_prefix="shard-writer") as writer:
        in_flight: list = []
        try:
            for r in range(rounds):
                index, start, ctxs = -1, 0, []
                if r < len(mine):
                    index = mine[r]
                    start, ctxs = shard_contexts(index)
                if not ctxs and not collective:
                    break  # the text ran out: nothing left for this process
                toks = np.stack(ctxs) if ctxs else np.zeros((0, d.ctx_len), np.int32)
                acts = _run_forward(fwd, state, toks, local_batch, calls, bar, mesh)
                if not ctxs or not writes:
                    continue
                while len(in_flight) >= n_writers:
                    in_flight.pop(0).result()
                in_flight.append(writer.submit(finish, index, toks, acts, start))
                tokens_run += toks.size
            for f in in_flight:
                f.result()
        finally:
            bar.close()
    _barrier("sae_jax.harvest: every process wrote its shards")
    if me == 0:
        m = st.read_manifest(out) if n_proc > 1 else m
        _fold_parts(out, m)
        # the statistics summed over the shards in index order: the same bits however the shards
        # were written (resumed, by several processes)
        update_manifest(out, m, st.aggregate_stats(out, m["shards"], list(m["hooks"])))
        _finish_manifest(out, m, n_target, compile_s, time.perf_counter() - t0, tokens_run, h, d, log)
        shutil.rmtree(out / CACHE, ignore_errors=True)  # the tokens the processes shared
    _barrier("sae_jax.harvest: manifest written")
    return st.open_store(out)


def _open_output(out: Path, fingerprint: dict, header: dict, me: int) -> dict:
    """The store's manifest, every process agreeing on it: process 0 creates or checks the
    directory (and folds in what a killed run left), the others check they run its settings."""
    if me == 0:
        m = _prepare_dir(out, fingerprint, header)
        if not m["complete"]:
            _fold_parts(out, m)
            for p in out.glob(".tmp-*"):  # leftovers of a killed run: never listed, safe to drop
                p.unlink()
    _barrier("sae_jax.harvest: directory ready")
    if me != 0:
        m = st.read_manifest(out)
        if m["fingerprint"] != fingerprint:
            raise st.StoreError(
                f"{out}: process {me} runs other harvest settings than process 0 ({', '.join(sorted(_diff_keys(m['fingerprint'], fingerprint)))})"
            )
    return m


def writer_threads(setting: int) -> int:
    """`harvest.writers`, or (0) one writer per 8 CPU cores, 1 to 8: a 2-core machine keeps one
    thread beside the forward, a TPU or GPU host with ~200 cores writes 8 shards at once."""
    if setting < 0:
        raise HarvestError(f"harvest.writers={setting}: 0 (automatic) or a number of threads")
    return setting or min(8, max(1, (os.cpu_count() or 1) // 8))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _fold_parts(out: Path, m: dict) -> None:
    """Move the shards that processes of a multi-process harvest recorded in their own manifest
    parts into the manifest (any earlier layout of processes), then drop the parts."""
    parts = sorted(out.glob(PARTS))
    if not parts:
        return
    have = {s["index"] for s in m["shards"]}
    for p in parts:
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise st.StoreError(f"{p}: unreadable manifest part of a multi-process harvest ({e})") from None
        if rec.get("fingerprint") != m["fingerprint"]:
            raise st.StoreError(f"{p}: a manifest part of another harvest (its settings differ from {out / st.MANIFEST})")
        m["shards"] += [s for s in rec["shards"] if s["index"] not in have]
        have |= {s["index"] for s in rec["shards"]}
    m["shards"].sort(key=lambda s: s["index"])
    update_manifest(out, m, st.aggregate_stats(out, m["shards"], list(m["hooks"])))
    st.open_store(out, require_complete=False)  # every listed shard must be intact
    for p in parts:
        p.unlink()


def _finish_manifest(out: Path, m: dict, n_target: int, compile_s: float, loop_s: float, tokens_run: int, h, d, log) -> None:
    idx = [s["index"] for s in m["shards"]]
    if idx != list(range(len(idx))):
        missing = sorted(set(range(max(idx, default=-1) + 1)) - set(idx))
        raise HarvestError(f"{out}: shards {missing} are missing from the manifest; run the same harvest command again to write them")
    done = m["shards"][-1]["contexts"][1] if m["shards"] else 0
    m["contexts"] = done
    m["rows"] = sum(s["rows"] for s in m["shards"])
    m["rows_dropped"] = sum(s["rows_dropped"] for s in m["shards"])
    m["rows_outliers"] = sum(s["rows_outliers"] for s in m["shards"])
    m["corpus_exhausted"] = done < n_target
    # the forward's one compiled shape, and the timing of this (last) invocation, compile excluded
    m["forward"] = {"batch": h.batch_size, "ctx_len": d.ctx_len}
    m["last_run"] = {"compile_s": round(compile_s, 3), "loop_s": round(loop_s, 3), "tokens": tokens_run, "processes": jax.process_count()}
    m["complete"] = True
    if done < n_target:
        log(f"warning: the text source ran out after {done} of {n_target} contexts")
    st.atomic_write_text(out / st.MANIFEST, json_dumps(m))


def _progress(enabled: bool, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, unit="tok", unit_scale=True, desc="harvest", disable=not enabled, file=sys.stderr, dynamic_ncols=True
    )


def _run_forward(fwd, state, toks: np.ndarray, batch: int, calls: int | None, bar, mesh) -> dict[str, np.ndarray]:
    """Forward a shard's contexts in fixed-shape batches of `batch` (this process's rows of the
    global batch), one batch in flight ahead; `calls` fixes the number of batches (processes that
    run the forward together must all call it alike: padding rows, or a whole padding round)."""
    n = len(toks)
    calls = calls if calls is not None else math.ceil(n / batch)
    fill = calls * batch - n
    padded = np.concatenate([toks, np.repeat(toks[:1] if n else np.zeros((1, toks.shape[1]), np.int32), fill, axis=0)]) if fill else toks
    outs: dict[str, list] = {}
    pending, real = None, n
    for i in range(0, calls * batch, batch):
        nxt = fwd(state, _global_tokens(padded[i : i + batch], mesh))  # dispatch before collecting the last
        if pending is not None:
            _collect(pending, outs, bar, real)
            real -= batch
        pending = nxt
    if pending is not None:
        _collect(pending, outs, bar, real)
    return {k: np.concatenate(v)[:n] for k, v in outs.items()}


def _global_tokens(local: np.ndarray, mesh):
    """This process's rows of a forward batch -> the global token array over the harvest mesh."""
    if mesh is None:
        return local
    from jax.sharding import NamedSharding

    from sae_jax.model.sharding import TOKENS

    sharding = NamedSharding(mesh, TOKENS)
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    from sae_jax import parallel

    _, n_groups = parallel.data_group(mesh)
    return jax.make_array_from_process_local_data(sharding, local, (len(local) * n_groups, local.shape[1]))


def _local_rows(a) -> np.ndarray:
    """The rows of a `data`-split array that this process's devices hold, in order."""
    if not isinstance(a, jax.Array) or a.is_fully_addressable:
        return np.asarray(a)
    by_start = {}
    for s in a.addressable_shards:
        by_start.setdefault(s.index[0].start or 0, s)
    return np.concatenate([np.asarray(by_start[k].data) for k in sorted(by_start)])


def _collect(acts, outs, bar, real: int):
    host = {k: _local_rows(v) for k, v in acts.items()}
    for k, v in host.items():
        outs.setdefault(k, []).append(v)
    b, t = next(iter(host.values())).shape[:2]
    bar.update(max(min(b, real), 0) * t)


def outlier_rows(acts: dict[str, np.ndarray], ci, pi, ratio: float) -> np.ndarray:
    """Rows whose squared norm, at any hook, exceeds `ratio` x that hook's median in this shard.

    Attention-sink tokens carry residual norms thousands of times the typical one (SmolLM2-135M,
    blocks.12.hook_resid_post: 0.04% of rows held 79% of the squared norm, at 3e4 x the median,
    with a clean gap between 30x and 100x; mlp_out's largest ratio was 14x). Left in, they set
    the input scale and dominate the reconstruction loss. One mask for all hooks keeps the rows of
    every hook the same tokens. Per-shard medians keep a shard a function of its own contexts.
    """
    bad = np.zeros(len(ci), dtype=bool)
    if ratio <= 0:
        return bad
    for a in acts.values():
        sq = row_sq_norms(a, (ci, pi))
        bad |= sq > ratio * np.median(sq)
    return bad


def _write_shard(out, index, toks, acts, first_ctx, special, widths, h, store_dtype) -> tuple[dict, dict]:
    """The rows of one shard's contexts (special tokens and outliers left out), shuffled by the
    store writer's seeded permutation (`shuffle_rows`: whole records) and gathered once from the
    forward's [contexts, ctx, width] output, then written with their statistics (atomic files)."""
    ci, pi = np.nonzero(~special[toks])  # [n, t] -> candidate rows
    outlier = outlier_rows(acts, ci, pi, h.outlier_ratio)
    ci, pi = ci[~outlier], pi[~outlier]
    perm = shuffle_rows(len(ci), h.seed, index, h.rows_per_record)
    ci, pi = ci[perm], pi[perm]
    tokens = np.stack([toks[ci, pi], (first_ctx + ci).astype(np.int32), pi.astype(np.int32)], axis=1).astype(np.int32)
    rows = {hook: a[ci, pi].astype(store_dtype, copy=False) for hook, a in acts.items()}
    for hook, a in rows.items():
        assert a.shape == (len(ci), widths[hook])
    entry, stats = write_shuffled(out, index, rows, tokens, h.rows_per_record)
    entry["rows_dropped"] = len(outlier) - int(outlier.sum()) - len(perm)
    entry["contexts"] = [first_ctx, first_ctx + len(toks)]
    entry["rows_outliers"] = int(outlier.sum())
    return entry, stats


def write_shard_rate(out: Path, widths: dict[str, int], store_dtype, ctx_len: int, contexts: int, threads: int = 1) -> float:
    """GB of activations per second that `threads` writers running `_write_shard` at once
    (special-token and outlier filter, shuffle, statistics, checksums, ArrayRecord, fsync) write on
    this CPU, from random activations: one shard of `contexts` contexts per thread, written with
    the harvest's default settings."""
    from types import SimpleNamespace

    from sae_jax.config import default

    rng = np.random.default_rng(0)
    toks = rng.integers(3, 1000, size=(contexts, ctx_len), dtype=np.int32)
    toks[:, 0] = 1
    acts = {k: rng.standard_normal((contexts, ctx_len, w), dtype=np.float32).astype(store_dtype) for k, w in widths.items()}
    special = np.zeros(1001, dtype=bool)
    special[1] = True
    h = SimpleNamespace(**{k: default(f"harvest.{k}") for k in ("outlier_ratio", "seed", "rows_per_record")})
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        entries = list(pool.map(lambda i: _write_shard(out, i, toks, acts, 0, special, widths, h, store_dtype)[0], range(threads)))
    dt = time.perf_counter() - t0
    return sum(e["rows"] for e in entries) * sum(widths.values()) * np.dtype(store_dtype).itemsize / dt / 1e9
