"""One dictionary on raw activations (folded, as exported), for eval, splicing and the atlas.

`p` holds W_enc [d_in, w], b_enc [w], W_dec [w, d_out], b_dec [d_out] and, for JumpReLU-type
dictionaries, `threshold [w]` (`Run.folded`). `kind` is the activation at inference:

- `topk`: the k largest of relu(pre), by the trainer's streaming / fused encoder (`kernels.topk`);
- `jumprelu` (JumpReLU, and BatchTopK with its running threshold): pre where pre > threshold;
- `relu`: relu(pre).

The last two have no bound on active latents per row: they are encoded *capped* at k per row
(the k largest of pre - threshold, by the same streaming encoder, no [N, w] pre-activation),
which is exact for every row with at most k active latents; `truncated` counts the others.
The decode works from (values, indices).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax.kernels.topk import topk_encode, topk_pre

KINDS = ("topk", "jumprelu", "relu")


def encode(p, x, k: int, kind: str = "topk", transcoder: bool = False):
    """x [N, d_in] -> (values [N, k] >= 0, indices [N, k]): topk descending; jumprelu / relu the
    (at most k) active latents, zeros after them."""
    xin = x.astype(jnp.float32) if transcoder else x.astype(jnp.float32) - p["b_dec"]
    if kind == "topk":
        return topk_encode(xin, p["W_enc"], p["b_enc"], k)
    if kind not in KINDS:
        raise ValueError(f"unknown dictionary kind {kind!r} ({', '.join(KINDS)})")
    theta = p["threshold"] if kind == "jumprelu" else jnp.zeros_like(p["b_enc"])
    v, i = topk_pre(xin, p["W_enc"], p["b_enc"] - theta, k)  # the k largest margins pre - threshold
    return jnp.where(v > 0, v + theta[i], 0.0), i


def truncated(values) -> jax.Array:
    """Rows whose every one of the k slots is active (a capped encode may have dropped some)."""
    return values[:, -1] > 0


def decode(p, values, indices):
    """(values, indices) [N, k] -> x_hat [N, d_out]: a gather of k decoder rows per row, no [N, w] matrix."""
    return jnp.einsum("nk,nkd->nd", values, p["W_dec"][indices]) + p["b_dec"]


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
