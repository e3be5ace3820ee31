"""An exact top-k per row that never sorts the row: a tournament of group maxima.

`tree_top_k(pre, k, bias)` returns what `lax.top_k(pre + bias, k)` returns, values and indices,
ties to the lower index, in IEEE total order (-NaN < -inf < -0 < +0 < +inf < +NaN), as XLA's
TopK orders them. XLA:GPU lowers a wide `top_k` to a full sort of the row (a bitonic network of
log2(S)(log2(S)+1)/2 compare-exchange stages per element); this does a few max-reductions and
sorts only small candidate sets:

1. Keys: each value as the int32 whose order is the float's total order (`total_order_key`).
2. Build: level j's entry e is the maximum key of the row's entries [e x 4^j, (e + 1) x 4^j).
   Level 2 (16 row entries each) is computed in one pass over the row; levels 3, 4, ... from the
   one below, until a level holds at most max(4k, 256) entries. Levels 0 and 1 are never
   written: where the descent needs them they are computed from the few row entries it gathers.
3. Descend: take the k largest entries of the top level (a sort of at most max(4k, 256) pairs),
   then at each level below only the 4k children of the k entries chosen above, again keeping
   k. The k largest entries of a level (ties to the lower index) lie in the k entries of the
   level above with the largest maxima (ties to the lower index): an entry outside them is
   beaten by k maxima, or tied with k maxima of lower-indexed groups, each a lower-indexed entry
   of the same key. So each step is exact, and the last, over 4k entries of the row, is the
   row's top-k.

Each sort is over (descending key, ascending index) pairs, so ties resolve as `lax.top_k`
resolves them. Per row it sorts about (levels + 1) x 4k keys instead of S (at k 64 and 2^16
latents: 6 sorts of 256), and reads the row once (level 2) plus 1/16 of that. Rows shorter than
max(4k, 256), or than 16k, are sorted whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

INT_MIN = jnp.iinfo(jnp.int32).min


def total_order_key(v):
    """float32 -> int32 in the same order as IEEE total order (the order XLA's TopK sorts by):
    non-negative floats keep their bits; negative ones have their magnitude bits flipped."""
    i = lax.bitcast_convert_type(v.astype(jnp.float32), jnp.int32)
    return i ^ ((i >> 31) & jnp.int32(0x7FFFFFFF))


GROUP = 4  # entries of a level per entry of the level above
SPAN = 16  # row entries under one entry of the first level built (GROUP ** 2): the one pass over the row


def _top_pairs(keys, ids, k: int):
    """The k largest `keys [R, n]` (ties to the lower id) and their ids, in that order: one sort
    of n (key, id) pairs."""
    neg, ids = lax.sort((~keys, ids), dimension=1, num_keys=2, is_stable=False)  # ~key reverses int32 order; ids are unique
    return ~neg[:, :k], ids[:, :k]


def tree_top_k(pre, k: int, bias=None):
    """`lax.top_k(pre + bias, k)` over the last axis of `pre [R, S]` (`bias [S]` added where it is
    read), by the tournament of group maxima described above: the same values and indices."""
    return tree_top_ks(pre, [bias], [k])[0]


def tree_top_ks(pre, biases, ks) -> list:
    """[`tree_top_k(pre, k, bias)` for each (bias, k)], the selections' first levels computed in
    one pass over `pre` (the TopK encoder's main and AuxK selections share the row)."""
    with jax.named_scope("topk_select"):  # how `hlo_cost` finds these kernels in a compiled step
        return _tree_top_ks(pre.astype(jnp.float32), [None if b is None else b.astype(jnp.float32) for b in biases], list(ks))


def _plus(pre, bias, sl):
    """pre-activations plus bias[sl]; without a bias the values themselves (-0.0 + 0.0 is +0.0)."""
    return pre if bias is None else pre + bias[sl]


def _tree_top_ks(pre, biases, ks):
    rows, s = pre.shape
    for k in ks:
        if not 0 < k <= s:
            raise ValueError(f"tree_top_k: k={k} must be in 1..{s}")
    short = [s // SPAN < k or s <= max(4 * k, 256) for k in ks]
    n_full = s // SPAN
    head, rest = slice(None, n_full * SPAN), slice(n_full * SPAN, None)
    tall = [i for i, sh in enumerate(short) if not sh]
    firsts = {}
    if tall:  # the first level built, of every selection at once: one pass over the row
        keys = jnp.stack([total_order_key(_plus(pre[:, head], biases[i], head)) for i in tall])
        first = keys.reshape(len(tall), rows, n_full, SPAN).max(axis=-1)
        if s % SPAN:
            tail = jnp.stack([total_order_key(_plus(pre[:, rest], biases[i], rest)) for i in tall]).max(axis=-1, keepdims=True)
            first = jnp.concatenate([first, tail], axis=2)
        firsts = {i: first[n] for n, i in enumerate(tall)}
    out = []
    for i, (bias, k) in enumerate(zip(biases, ks, strict=True)):
        if short[i]:  # a short row: one sort of it
            ids = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (rows, s))
            _, idx = _top_pairs(total_order_key(_plus(pre, bias, slice(None))), ids, k)
        else:
            idx = _descend(pre, bias, k, firsts[i])
        out.append((_plus(jnp.take_along_axis(pre, idx, axis=1), bias, idx), idx))
    return out


def _descend(pre, bias, k: int, first):
    """The row indices of the k largest keys (ties to the lower index), from the first level built
    (SPAN row entries each): the levels above it built, then the descent through every level."""
    rows, s = pre.shape

    def row_keys(idx):
        """Keys of the row's entries `idx` (any shape [R, ...]); past the row's end: INT_MIN."""
        c = jnp.minimum(idx, s - 1)
        v = _plus(jnp.take_along_axis(pre, c.reshape(rows, -1), axis=1).reshape(c.shape), bias, c)
        return jnp.where(idx < s, total_order_key(v), INT_MIN)

    top = max(4 * k, 256)
    base = SPAN.bit_length() - 1 >> 1  # the first level's depth: GROUP ** base == SPAN
    levels = {base: first}
    j = base
    while levels[j].shape[1] > top and -(-levels[j].shape[1] // GROUP) >= k:
        a = levels[j]
        pad = -a.shape[1] % GROUP
        if pad:
            levels[j] = a = jnp.pad(a, ((0, 0), (0, pad)), constant_values=INT_MIN)
        levels[j + 1] = a.reshape(rows, -1, GROUP).max(axis=-1)
        j += 1

    a = levels[j]
    _, chosen = _top_pairs(a, jnp.broadcast_to(jnp.arange(a.shape[1], dtype=jnp.int32), a.shape), k)
    for level in range(j - 1, -1, -1):
        children = (chosen[:, :, None] * GROUP + jnp.arange(GROUP, dtype=jnp.int32)).reshape(rows, -1)  # [R, k x GROUP]
        if level in levels:
            keys = jnp.take_along_axis(levels[level], children, axis=1)
        else:  # a virtual level: the maxima of the row entries under each child, from the row
            span = GROUP**level
            keys = row_keys(children[:, :, None] * span + jnp.arange(span, dtype=jnp.int32)).max(axis=-1)
        _, chosen = _top_pairs(keys, children, k)
    return chosen
