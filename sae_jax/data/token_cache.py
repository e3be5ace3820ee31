"""Tokenizing the text once across the processes of a harvest.

A single process turns documents into contexts as a stream (`contexts.py`: tokenize, join with a
separator, cut every `ctx_len - 1` tokens, permute within windows of `window` contexts). Several
processes must produce exactly those contexts, yet tokenizing the whole text in every process
multiplies the tokenizer's work by the process count. Instead:

1. **Share.** The documents are cut into blocks of `BLOCK_DOCS`; process p of P tokenizes blocks
   p, p + P, ... and writes each block's token stream (separators included, int32) to
   `STORE/.tokens/block-NNNNNNNN.bin` (atomically). Every process still reads the documents to
   find its blocks, but only its own are tokenized. After each round of P blocks the processes
   meet at a barrier and stop once the blocks written hold every token the store needs (or the
   text ran out).
2. **Read.** The flat token stream is the blocks in order; context c is its tokens
   `[c * body, (c + 1) * body)` (BOS prepended). A process builds the contexts of its shards by
   reading only the blocks that cover their windows: window w holds contexts `[w * W, (w + 1) * W)`
   permuted by `default_rng([seed, w])`, as `window_shuffle` does.

The blocks are a cache of the streaming pipeline's own token stream, so the contexts are the
same whatever the process count (a test compares them with the stream). The harvest removes
`.tokens/` when the store is complete; a restarted harvest reuses the blocks already written.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from sae_jax.data.contexts import EmptyCorpusError, token_stream

BLOCK_DOCS = 1024  # documents per block: the unit a process tokenizes
CACHE = ".tokens"


def _block_path(cache: Path, b: int) -> Path:
    return cache / f"block-{b:08d}.bin"


def contexts_needed(n_target: int, window: int) -> int:
    """Pre-shuffle contexts the first `n_target` shuffled ones are drawn from (whole windows)."""
    return -(-n_target // window) * window if window > 1 else n_target


def tokenize_share(
    docs: Iterable[str],
    tokenizer,
    sep_id: int | None,
    cache: Path,
    me: int,
    n_proc: int,
    tokens_needed: int,
    barrier: Callable[[str], None],
) -> list[int]:
    """Tokenize this process's blocks until the blocks written (by every process) hold
    `tokens_needed` tokens or the documents run out; returns the token count of each block, in
    order (the same list in every process)."""
    cache.mkdir(parents=True, exist_ok=True)
    blocks = itertools.batched(docs, BLOCK_DOCS)
    lengths: list[int] = []
    first = 0
    while True:
        round_blocks = list(itertools.islice(blocks, n_proc))
        if me < len(round_blocks):
            path = _block_path(cache, first + me)
            if not path.exists():  # a restarted harvest keeps the blocks already written
                ids = list(token_stream(round_blocks[me], tokenizer, sep_id))
                flat = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
                tmp = path.with_name(f".tmp-{path.name}")
                flat.tofile(tmp)
                os.replace(tmp, path)
        barrier(f"sae_jax.harvest: tokens of blocks {first}..{first + len(round_blocks) - 1}")
        lengths += [_block_path(cache, first + j).stat().st_size // 4 for j in range(len(round_blocks))]
        first += len(round_blocks)
        if len(round_blocks) < n_proc or sum(lengths) >= tokens_needed:
            return lengths


class CachedContexts:
    """The shuffled context stream of `contexts.contexts`, read from the token blocks: position q
    of the stream (0 <= q < `n`) for any q, without reading the blocks of other windows."""

    def __init__(self, cache: Path, lengths: list[int], ctx_len: int, bos_id: int | None, window: int, seed: int, n_target: int):
        self.cache, self.bos, self.seed = cache, bos_id, seed
        self.body = ctx_len - (bos_id is not None)
        self.starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.total = int(self.starts[-1]) // self.body  # pre-shuffle contexts (the tail that fills none is dropped)
        if self.total == 0:
            raise EmptyCorpusError(f"the text source gave fewer than {ctx_len} tokens: not even one context")
        self.window = window if window > 1 else 0
        self.n = min(n_target, self.total)

    def _pre(self, q: np.ndarray) -> np.ndarray:
        """Pre-shuffle context index of each stream position in `q`."""
        if not self.window:
            return q
        out = np.empty_like(q)
        w_of = q // self.window
        for w in np.unique(w_of):
            start = int(w) * self.window
            size = min(self.window, self.total - start)
            perm = np.random.default_rng([self.seed, int(w)]).permutation(size)
            sel = w_of == w
            out[sel] = start + perm[q[sel] - start]
        return out

    def _tokens(self, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) of the flat stream, read from the blocks that hold them."""
        b0 = int(np.searchsorted(self.starts, lo, side="right")) - 1
        parts, b = [], b0
        while lo < hi:
            s, e = int(self.starts[b]), int(self.starts[b + 1])
            take = min(hi, e) - lo
            if take > 0:
                parts.append(np.fromfile(_block_path(self.cache, b), dtype=np.int32, count=take, offset=(lo - s) * 4))
                lo += take
            b += 1
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def get(self, start: int, stop: int) -> list[np.ndarray]:
        """The contexts at stream positions [start, stop) (clipped to the stream's length)."""
        q = np.arange(start, min(stop, self.n), dtype=np.int64)
        out = []
        for c in self._pre(q):
            ids = self._tokens(int(c) * self.body, (int(c) + 1) * self.body)
            out.append(ids if self.bos is None else np.concatenate([np.int32([self.bos]), ids]))
        return out
