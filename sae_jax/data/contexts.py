"""Documents -> fixed-length token contexts.

Documents are tokenized in batches, joined with a separator token into one stream, and cut into
contexts of `ctx_len` tokens, each starting with BOS (when `bos_id` is given). A seeded windowed
shuffle then permutes contexts within windows of `window` contexts, so that neighbouring
contexts (and the shards they land in) come from different parts of the corpus. Everything is a
pure function of (documents, tokenizer, settings): a restarted harvest regenerates the same
stream and skips what it has already written.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from sae_jax.errors import SaeJaxError


class EmptyCorpusError(SaeJaxError, ValueError):
    pass


def token_stream(docs: Iterable[str], tokenizer, sep_id: int | None, batch_docs: int = 256) -> Iterator[np.ndarray]:
    """Yield token id arrays, one per document, each followed by `sep_id`."""
    buf: list[str] = []

    def flush():
        for enc in tokenizer.encode_batch(buf, add_special_tokens=False):
            ids = np.asarray(enc.ids, dtype=np.int32)
            yield ids if sep_id is None else np.append(ids, np.int32(sep_id))

    for d in docs:
        if d and d.strip():
            buf.append(d)
        if len(buf) >= batch_docs:
            yield from flush()
            buf = []
    if buf:
        yield from flush()


def pack(stream: Iterable[np.ndarray], ctx_len: int, bos_id: int | None) -> Iterator[np.ndarray]:
    """Cut a token stream into contexts of exactly `ctx_len` tokens (the tail is dropped)."""
    body = ctx_len - (bos_id is not None)
    if body < 1:
        raise ValueError(f"ctx_len={ctx_len} leaves no room for tokens")
    pending: list[np.ndarray] = []
    n = 0
    for ids in stream:
        pending.append(ids)
        n += len(ids)
        if n < body:
            continue
        flat = np.concatenate(pending)
        k = len(flat) // body
        for i in range(k):
            chunk = flat[i * body : (i + 1) * body]
            yield chunk if bos_id is None else np.concatenate([np.int32([bos_id]), chunk])
        rest = flat[k * body :]
        pending, n = [rest], len(rest)


def window_shuffle(contexts: Iterable[np.ndarray], window: int, seed: int) -> Iterator[np.ndarray]:
    """Permute contexts within consecutive windows of `window` (each window its own seeded RNG)."""
    if window <= 1:
        yield from contexts
        return
    buf: list[np.ndarray] = []
    w = 0
    for c in contexts:
        buf.append(c)
        if len(buf) == window:
            rng = np.random.default_rng([seed, w])
            yield from (buf[i] for i in rng.permutation(len(buf)))
            buf, w = [], w + 1
    if buf:
        rng = np.random.default_rng([seed, w])
        yield from (buf[i] for i in rng.permutation(len(buf)))


def contexts(
    docs: Iterable[str], tokenizer, ctx_len: int, bos_id: int | None, sep_id: int | None, window: int, seed: int
) -> Iterator[np.ndarray]:
    """The full pipeline; raises EmptyCorpusError if the documents give not even one context."""
    it = window_shuffle(pack(token_stream(docs, tokenizer, sep_id), ctx_len, bos_id), window, seed)
    first = next(it, None)
    if first is None:
        raise EmptyCorpusError(f"the text source gave fewer than {ctx_len} tokens: not even one context")
    yield first
    yield from it
