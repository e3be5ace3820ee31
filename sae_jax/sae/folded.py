"""One TopK dictionary on raw activations (folded, as exported), for eval, splicing and the atlas.

`p` holds W_enc [d_in, w], b_enc [w], W_dec [w, d_in], b_dec [d_in] (`Run.folded`). The encoder
is the trainer's (`kernels.topk.topk_encode`, streaming); the decode works from (values, indices).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from sae_jax.kernels.topk import topk_encode


def encode(p, x, k: int):
    """x [N, d_in] -> (values [N, k] >= 0, indices [N, k]), the k largest of relu(pre), descending;
    the streaming / fused encoder of `kernels.topk` (no [N, w] pre-activation)."""
    return topk_encode(x.astype(jnp.float32) - p["b_dec"], p["W_enc"], p["b_enc"], k)


def decode(p, values, indices):
    """(values, indices) [N, k] -> x_hat [N, d_in]: a gather of k decoder rows per row, no [N, w] matrix."""
    return jnp.einsum("nk,nkd->nd", values, p["W_dec"][indices]) + p["b_dec"]


@partial(jax.jit, static_argnames=("k", "chunk"))
def reconstruct(p, x, k: int, chunk: int = 1024):
    """(x_hat, values, indices) for x [N, d_in], N a multiple of `chunk` (or smaller than it)."""
    n = x.shape[0]
    c = min(chunk, n)
    xs = x.reshape(n // c, c, x.shape[-1])

    def one(_, xc):
        v, i = encode(p, xc, k)
        return None, (decode(p, v, i), v, i)

    _, (x_hat, v, i) = lax.scan(one, None, xs)
    return x_hat.reshape(n, -1), v.reshape(n, k), i.reshape(n, k)
