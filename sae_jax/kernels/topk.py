"""TopK encoders that never build the dense [batch, d_sae] pre-activation, with a sparse backward.

`topk_pre(x, w, b, k)` returns the k largest pre-activations `x @ w + b` per row, descending, and
their latent indices. Implementations (`impl=`):

| impl        | what                                                                        |
| ----------- | --------------------------------------------------------------------------- |
| `dense`     | the reference: `lax.top_k(x @ w + b)`; builds [B, d_sae] (tests, small widths) |
| `stream`    | XLA: a scan over latent blocks of `block` columns, merging a running top-k; peak memory [B, block] |
| `pallas_gpu`| Pallas (Triton) kernel: block matmul + bias + per-block top-k candidates fused (`kernels.pallas`) |
| `pallas_tpu`| Pallas (Mosaic) kernel, the same on TPU                                      |
| `auto`      | `pallas_gpu` on GPU, `pallas_tpu` on TPU, `stream` elsewhere                 |

Every implementation shares one custom VJP: only the k selected pre-activations of a row get
gradient. With g [B, k] the cotangent of the values:

    dx = sum_s g[:, s] * w[:, idx[:, s]]         (a gather of k columns per row, slot by slot)
    dw[:, j] = sum_{(r, s): idx[r, s] = j} g[r, s] * x[r]   (a scatter-add of rows into w^T)
    db[j] = sum_{(r, s): idx[r, s] = j} g[r, s]

so the backward costs O(B k d_in) instead of the dense O(B d_sae d_in). `aux_b` adds a second
selection in the same pass (AuxK over dead latents: `b` replaced by `aux_b`, typically -inf for
live latents), sharing the matmul.

`topk_encode(x, W_enc, b_enc, k)` is the public form: (relu(values), indices).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "dense", "stream", "pallas_gpu", "pallas_tpu")
DEFAULT_BLOCK = 4096


def resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown TopK encoder implementation {impl!r} (choose from {', '.join(IMPLS)})")
    if impl != "auto":
        return impl
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "stream")


def _merge(v, i, bv, bi, k):
    """Top k of the union of (v, i) and a block's candidates (bv, bi)."""
    allv = jnp.concatenate([v, bv], axis=-1)
    alli = jnp.concatenate([i, bi], axis=-1)
    top, pos = lax.top_k(allv, k)
    return top, jnp.take_along_axis(alli, pos, axis=-1)


def _dense(x, w, biases, k, cd=None):
    pre = jnp.dot(x, w if cd is None else w.astype(cd), preferred_element_type=jnp.float32)
    out = []
    for b in biases:
        v, i = lax.top_k(pre + b.astype(jnp.float32), k)
        out.append((v, i.astype(jnp.int32)))
    return out


def _stream(x, w, biases, k, block, cd=None):
    """Scan over latent blocks; each keeps the running top-k of every bias variant."""
    d, s = w.shape
    block = min(block, s)
    n_full, tail = divmod(s, block)
    rows = x.shape[0]
    kb = min(k, block)
    init = [(jnp.full((rows, k), -jnp.inf, jnp.float32), jnp.zeros((rows, k), jnp.int32)) for _ in biases]

    def blk(carry, start, width):
        wb = lax.dynamic_slice_in_dim(w, start, width, axis=1)
        pre = jnp.dot(x, wb if cd is None else wb.astype(cd), preferred_element_type=jnp.float32)
        out = []
        for (v, i), b in zip(carry, biases, strict=True):
            pb = pre + lax.dynamic_slice_in_dim(b, start, width).astype(jnp.float32)
            bv, bi = lax.top_k(pb, min(kb, width))
            out.append(_merge(v, i, bv, bi.astype(jnp.int32) + start, k))
        return out

    def body(carry, j):
        return blk(carry, j * block, block), None

    carry, _ = lax.scan(body, init, jnp.arange(n_full, dtype=jnp.int32))
    if tail:
        carry = blk(carry, n_full * block, tail)
    return carry


def _forward(x, w, biases, k, impl, block, cd=None):
    """`cd`: the matmul's input dtype (None: as given); accumulation is always float32."""
    if cd is not None:
        x = x.astype(cd)
    if impl == "dense":
        return _dense(x, w, biases, k, cd)
    if impl == "stream":
        return _stream(x, w, biases, k, block, cd)
    if impl in ("pallas_gpu", "pallas_tpu"):
        from sae_jax.kernels import pallas

        return pallas.topk_candidates(x, w if cd is None else w.astype(cd), biases, k, block, backend=impl.removeprefix("pallas_"))
    raise ValueError(f"unknown TopK encoder implementation {impl!r}")


def _sparse_grads(x, w, idx, g):
    """(dx, dw, db) from the cotangents g [B, K] of the pre-activations at idx [B, K]."""
    s = w.shape[1]
    g = g.astype(jnp.float32)
    wt = w.T  # [S, d]: rows are gathered and scattered contiguously

    def slot(carry, gi):
        dx, dwt = carry
        gs, i = gi  # [B], [B]
        dx = dx + gs[:, None] * wt[i].astype(jnp.float32)
        dwt = dwt.at[i].add(gs[:, None] * x.astype(jnp.float32))
        return (dx, dwt), None

    zero = (jnp.zeros(x.shape, jnp.float32), jnp.zeros((s, w.shape[0]), jnp.float32))
    (dx, dwt), _ = lax.scan(slot, zero, (g.T, idx.T))
    db = jnp.zeros((s,), jnp.float32).at[idx.reshape(-1)].add(g.reshape(-1))
    return dx.astype(x.dtype), dwt.T.astype(w.dtype), db


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _topk_pre(x, w, b, aux_b, k, k_aux, impl, block, cd):
    biases = (b,) if aux_b is None else (b, aux_b)
    out = _forward(x, w, biases, k if aux_b is None else max(k, k_aux), impl, block, cd)
    (v, i) = out[0]
    v, i = v[:, :k], i[:, :k]
    if aux_b is None:
        return v, i, None, None
    av, ai = out[1]
    return v, i, av[:, :k_aux], ai[:, :k_aux]


def _fwd(x, w, b, aux_b, k, k_aux, impl, block, cd):
    v, i, av, ai = _topk_pre(x, w, b, aux_b, k, k_aux, impl, block, cd)
    return (v, i, av, ai), (x, w, i, ai, aux_b)


def _bwd(k, k_aux, impl, block, cd, res, cts):
    x, w, i, ai, aux_b = res
    gv, _, gav, _ = cts
    if aux_b is None:
        dx, dw, db = _sparse_grads(x, w, i, gv)
        return dx, dw, db.astype(w.dtype), None
    # the two selections share x and w: one pass over both sets of slots
    idx = jnp.concatenate([i, ai], axis=1)
    g = jnp.concatenate([gv, gav], axis=1)
    dx, dw, _ = _sparse_grads(x, w, idx, g)
    db = jnp.zeros((w.shape[1],), jnp.float32).at[i.reshape(-1)].add(gv.reshape(-1).astype(jnp.float32))
    dab = jnp.zeros((w.shape[1],), jnp.float32).at[ai.reshape(-1)].add(gav.reshape(-1).astype(jnp.float32))
    return dx, dw, db, dab


_topk_pre.defvjp(_fwd, _bwd)


def topk_pre(x, w, b, k: int, *, aux_b=None, k_aux: int = 0, impl: str = "auto", block: int = DEFAULT_BLOCK, compute_dtype=None):
    """(values [B, k], indices [B, k]) of the largest `x @ w + b` per row, descending; with `aux_b`
    also (aux values [B, k_aux], aux indices) of `x @ w + aux_b`. Differentiable (sparse VJP,
    computed from the parameters as given). `compute_dtype` ('bfloat16') casts the matmul's inputs
    (w block by block when streaming); accumulation stays float32."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0] or b.shape != (w.shape[1],):
        raise ValueError(f"topk_pre: x {x.shape}, w {w.shape}, b {b.shape}: expected [B, d], [d, S], [S]")
    if not 0 < k <= w.shape[1]:
        raise ValueError(f"topk_pre: k={k} must be in 1..{w.shape[1]} (the number of latents)")
    if aux_b is not None and not 0 < k_aux <= w.shape[1]:
        raise ValueError(f"topk_pre: k_aux={k_aux} must be in 1..{w.shape[1]}")
    cd = None if compute_dtype in (None, "", "float32") else jnp.dtype(compute_dtype).name
    v, i, av, ai = _topk_pre(x, w, b, aux_b, k, k_aux, resolve_impl(impl), block, cd)
    return (v, i) if aux_b is None else (v, i, av, ai)


def topk_encode(x, W_enc, b_enc, k: int, *, impl: str = "auto", block: int = DEFAULT_BLOCK, compute_dtype=None):
    """(values, indices) of a TopK encoder on `x` (already minus b_dec): relu of the k largest
    pre-activations, without a dense [B, d_sae] matrix (except `impl='dense'`)."""
    v, i = topk_pre(x, W_enc, b_enc, k, impl=impl, block=block, compute_dtype=compute_dtype)
    return jax.nn.relu(v), i


@jax.custom_vjp
def sparse_decode(values, indices, w_dec):
    """sum_s values[:, s] * w_dec[indices[:, s]] -> [B, d]: a scan over the k slots, one [B, d]
    gather per slot, so neither a dense [B, d_sae] activation nor a [B, k, d] gather exists, in
    the forward or (custom VJP: nothing saved but the inputs) the backward."""
    return _decode_fwd_only(values, indices, w_dec)


def _decode_fwd_only(values, indices, w_dec):
    def slot(acc, vi):
        v, i = vi
        return acc + v[:, None].astype(jnp.float32) * w_dec[i].astype(jnp.float32), None

    zero = jnp.zeros((values.shape[0], w_dec.shape[1]), jnp.float32)
    out, _ = lax.scan(slot, zero, (values.T, indices.T))
    return out.astype(w_dec.dtype)


def _decode_fwd(values, indices, w_dec):
    return _decode_fwd_only(values, indices, w_dec), (values, indices, w_dec)


def _decode_bwd(res, g):
    values, indices, w_dec = res
    g32 = g.astype(jnp.float32)

    def slot(dw, vi):
        v, i = vi
        dv = jnp.sum(g32 * w_dec[i].astype(jnp.float32), axis=-1)
        return dw.at[i].add(v[:, None].astype(jnp.float32) * g32), dv

    dw, dv = lax.scan(slot, jnp.zeros(w_dec.shape, jnp.float32), (values.T, indices.T))
    return dv.T.astype(values.dtype), None, dw.astype(w_dec.dtype)


sparse_decode.defvjp(_decode_fwd, _decode_bwd)
