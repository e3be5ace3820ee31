"""One dictionary on raw activations (folded, as exported), for eval, splicing and the atlas.

`p` holds W_enc [d_in, w], b_enc [w], W_dec [w, d_out], b_dec [d_out] and, for JumpReLU-type
dictionaries, `threshold [w]` (`Run.folded`). `kind` is the activation at inference:

- `topk`: the k largest of relu(pre), by the trainer's streaming / fused encoder (`kernels.topk`);
- `jumprelu` (JumpReLU, and BatchTopK with its running threshold): pre where pre > threshold;
- `relu`: relu(pre).

The last two have no bound on active latents per row: they are encoded *capped* at k per row
(the k largest of pre - threshold, by the same streaming encoder, no [N, w] pre-activation),
which is exact for every row with at most k active latents; `truncated` counts the others.
The decode works from (values, indices) (`decode`: a gather, blocked, or dense at a large cap).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax.kernels.topk import EncoderOptions, topk_encode, topk_pre

KINDS = ("topk", "jumprelu", "relu")
# evaluation encodes exactly: float32 matmul inputs whatever training's `train.encoder_dtype`
EXACT = EncoderOptions(dtype="float32")


def encode(p, x, k: int, kind: str = "topk", transcoder: bool = False):
    """x [N, d_in] -> (values [N, k] >= 0, indices [N, k]): topk descending; jumprelu / relu the
    (at most k) active latents, zeros after them."""
    xin = x.astype(jnp.float32) if transcoder else x.astype(jnp.float32) - p["b_dec"]
    if kind == "topk":
        return topk_encode(xin, p["W_enc"], p["b_enc"], k, options=EXACT)
    if kind not in KINDS:
        raise ValueError(f"unknown dictionary kind {kind!r} ({', '.join(KINDS)})")
    theta = p["threshold"] if kind == "jumprelu" else jnp.zeros_like(p["b_enc"])
    v, i = topk_pre(xin, p["W_enc"], p["b_enc"] - theta, k, options=EXACT)  # the k largest margins pre - threshold
    return jnp.where(v > 0, v + theta[i], 0.0), i


def truncated(values) -> jax.Array:
    """Rows whose every one of the k slots is active (a capped encode may have dropped some)."""
    return values[:, -1] > 0


GATHER_BYTES = 1 << 28  # the most one gathered [N, slots, d_out] block of decoder rows may hold
DENSE_SHARE = 8  # a cap of width / this or more decodes densely


def decode(p, values, indices):
    """(values, indices) [N, k] -> x_hat [N, d_out].

    A gather of the k decoder rows of each row (no [N, w] matrix), in blocks of slots that hold at
    most GATHER_BYTES: a capped encode of a dense dictionary (ReLU, JumpReLU at high L0) has k in
    the thousands, and one [N, k, d_out] gather would be tens of GB. Where the cap is a large share
    of the width (k >= w / DENSE_SHARE) the gather costs more than the dictionary itself, and the
    codes go into a [N, w] matrix times W_dec instead."""
    w_dec = p["W_dec"]
    (n, k), (w, d) = values.shape, w_dec.shape
    dtype = jnp.promote_types(values.dtype, w_dec.dtype)
    hi = lax.Precision.HIGHEST
    if DENSE_SHARE * k >= w:
        codes = jnp.zeros((n, w), dtype).at[jnp.arange(n)[:, None], indices].add(values.astype(dtype))
        return jnp.matmul(codes, w_dec, precision=hi) + p["b_dec"]
    block = max(1, GATHER_BYTES // max(1, n * d * jnp.dtype(dtype).itemsize))
    if block >= k:
        return jnp.einsum("nk,nkd->nd", values, w_dec[indices], precision=hi) + p["b_dec"]
    pad = -k % block
    vs = jnp.pad(values, ((0, 0), (0, pad))).reshape(n, -1, block).swapaxes(0, 1)  # zero slots add nothing
    ids = jnp.pad(indices, ((0, 0), (0, pad))).reshape(n, -1, block).swapaxes(0, 1)

    def add(acc, vi):
        return acc + jnp.einsum("nk,nkd->nd", vi[0], w_dec[vi[1]], precision=hi), None

    out, _ = lax.scan(add, jnp.zeros((n, d), dtype), (vs, ids))
    return out + p["b_dec"]


@partial(jax.jit, static_argnames=("k", "chunk", "kind"))
def reconstruct(p, x, k: int, chunk: int = 1024, kind: str = "topk"):
    """(x_hat, values, indices) for x [N, d_in], N a multiple of `chunk` (or smaller than it)."""
    n = x.shape[0]
    c = min(chunk, n)
    xs = x.reshape(n // c, c, x.shape[-1])

    def one(_, xc):
        v, i = encode(p, xc, k, kind)
        return None, (decode(p, v, i), v, i)

    _, (x_hat, v, i) = lax.scan(one, None, xs)
    return x_hat.reshape(n, -1), v.reshape(n, k), i.reshape(n, k)
