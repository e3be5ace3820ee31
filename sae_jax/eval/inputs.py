"""What eval and the atlas read besides the run: the run's model (checked by digest), held-out
text contexts, held-out store rows, and the positions where a dictionary is spliced in."""

from __future__ import annotations

import itertools
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sae_jax.eval.errors import EvalError


def missing_model(store_meta: dict, model_path: str | None = None) -> str | None:
    """Why no model can be run for this store (None: there is one, or `model_path` names it)."""
    ident = store_meta.get("model") or {}
    if model_path or ident.get("path"):
        return None
    return f"the store names no model the zoo can run (model {ident.get('name', 'external')!r}: activations written from arrays)"


def load_run_model(store_meta: dict, model_path: str | None = None):
    """The model the run's store was harvested from; refuses another one (digest)."""
    from sae_jax.model.loading import load_model

    ident = store_meta.get("model") or {}
    if why := missing_model(store_meta, model_path):
        raise EvalError(f"{why}, and this needs one to read text through; `sae-jax eval` gives the reconstruction metrics of such runs")
    lm = load_model(model_path or ident["path"], ident.get("dtype", "float32"))
    if ident.get("digest") and lm.identity["digest"] != ident["digest"]:
        raise EvalError(
            f"model {lm.identity['path']} (digest {lm.identity['digest']}) is not the run's model {ident['name']} ({ident['digest']})"
        )
    return lm


def text_contexts(store_meta: dict, lm, n: int, split: str = "heldout", text: str | None = None) -> np.ndarray:
    """`n` contexts [n, ctx_len] of held-out text, tokenized as the store was (BOS, ctx_len).

    The store's text source is read with `split`; sources without splits (plain text, JSONL) need
    `text` (a file, directory or glob of held-out text; `.jsonl` read as JSONL), since reading
    their only split again would evaluate on training text."""
    return np.stack(list(text_context_stream(store_meta, lm, n, split, text))).astype(np.int32)


def text_context_stream(store_meta: dict, lm, n: int, split: str = "heldout", text: str | None = None):
    """The contexts of `text_contexts` one at a time (int32 [ctx_len]), at most `n`; the source is
    checked now, the text read as the iterator is."""
    from sae_jax.data.contexts import contexts
    from sae_jax.data.text import documents

    src = store_meta["source"]
    if text:
        docs = documents("jsonl" if str(text).endswith(".jsonl") else "text", str(text))
    elif src["source"] in ("text", "jsonl"):
        raise EvalError(
            f"the store's text source ({src['source']} at {src.get('path')}) has no held-out split; give held-out text with --text PATH"
        )
    else:
        if split == src.get("split"):
            raise EvalError(f"split {split!r} is the split the store was harvested from; choose a held-out split")
        docs = documents(src["source"], src.get("path", ""), split, src.get("text_key", "text"), src.get("tfds_name", ""))
    bos = lm.bos_id if store_meta["bos_prepended"] else None
    it = contexts(docs, lm.tokenizer, store_meta["ctx_len"], bos, lm.eos_id, 1, 0)
    return (np.asarray(c, np.int32) for c in itertools.islice(it, n))


def splice_mask(tokens, acts, special_ids, outlier_ratio: float):
    """Positions a dictionary is spliced into (and ablated at): those the store keeps.

    Special tokens (BOS, ...) and rows the harvest would drop as outliers (squared norm above
    `outlier_ratio` times the median of their context's other rows; the harvest used the shard's
    median) keep their clean activation, as the dictionary never saw such rows. Per context, so
    the mask does not depend on how contexts are batched."""
    special = jnp.isin(tokens, jnp.asarray(sorted(special_ids) or [-1], jnp.int32))
    keep = ~special
    if outlier_ratio > 0:
        sq = jnp.sum(acts.astype(jnp.float32) ** 2, axis=-1)
        med = jnp.nanmedian(jnp.where(keep, sq, jnp.nan), axis=-1, keepdims=True)
        keep &= sq <= outlier_ratio * med
    return keep


def heldout_start(run, store) -> tuple[int, bool]:
    """(first record the run did not train on, whether `store` is the run's own store): its own
    store's held-out shards, or from record 0 of another store of the same model."""
    meta = run.store_meta
    if store.manifest["model"]["digest"] != meta["model"]["digest"]:
        raise EvalError(
            f"{store.root} was harvested from {store.manifest['model']['name']} ({store.manifest['model']['digest']}); "
            f"the run was trained on {meta['model']['name']} ({meta['model']['digest']})"
        )
    same = Path(store.root).resolve() == Path(meta["root"]).resolve()
    first = meta["train_records"][1] if same else 0
    if first >= store.n_records:
        raise EvalError(
            f"the run trained on every shard of {store.root} (train.holdout_shards=0): give --store with held-out rows of the same model"
        )
    return first, same


def heldout_rows(run, store, hook: str, max_rows: int, part: str | None = None) -> tuple[np.ndarray, str]:
    """Rows of `hook` the run did not train on: the run's held-out shards of its own store, or any
    rows of another store of the same model. Returns (rows float32, description). `part="tokens"`:
    the same rows' token fields (int32 [N, 3]) instead."""
    from array_record.python.array_record_module import ArrayRecordReader

    first, same = heldout_start(run, store)
    store.check_hook(hook)
    out, n, rec0 = [], 0, 0
    for shard, f in zip(store.shards, store.files(part or hook), strict=True):
        if rec0 + shard["records"] > first and n < max_rows:
            r = ArrayRecordReader(str(f))
            for i, b in enumerate(r.read_all()):
                if rec0 + i >= first and n < max_rows:
                    a = store.decode(part or hook, b)[: max_rows - n]
                    out.append(a)
                    n += len(a)
            r.close()
        rec0 += shard["records"]
    what = f"{store.root}: records {first}..{store.n_records} ({'held out of training' if same else 'another store'})"
    out = np.concatenate(out)
    return (out if part == "tokens" else out.astype(np.float32)), what
