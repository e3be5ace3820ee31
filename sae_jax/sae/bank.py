"""A bank of TopK sparse autoencoders: parameters with a leading bank axis, forward, init.

Parameters per member, SAELens orientation: `W_enc [d_in, d_sae]`, `b_enc [d_sae]`,
`W_dec [d_sae, d_in]` (unit-norm rows), `b_dec [d_in]`. Stacked over the bank: leading axis M.
Members may differ in hook, width and k: every member is padded to the bank's widest width
(rounded up to a multiple of the `model` mesh axis) and its padded latents are masked out of
the top-k; each member selects its own k out of the bank's largest k. Padding costs
`M * max_width / sum(widths)` of the encoder work (1.0 for equal widths; 2 hooks x widths
{4608, 9216}: 1.33).

The forward is written for one device's shard of a mesh with axes `data` (tokens) and
`model` (latents): `forward_shard` runs inside `jax.shard_map`. Top-k over the latent axis split
across `model` is exact: each shard streams its own latents through the TopK encoder
(`sae_jax.kernels.topk`: no dense [batch, d_sae] pre-activation, a sparse backward), the
candidates are all-gathered over `model`, and the global top-k of the candidates is taken; each
shard decodes the winners it owns and the partial reconstructions are summed over `model`. The
decoder works from (values, indices): no dense [batch, d_sae] matrix anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sae_jax.kernels.topk import sparse_decode, topk_pre


@dataclass(frozen=True)
class BankSpec:
    hooks: tuple[str, ...]  # per member
    widths: tuple[int, ...]
    ks: tuple[int, ...]
    d_in: int
    width: int  # padded width (all members)
    k_aux: int

    @property
    def size(self) -> int:
        return len(self.hooks)

    @property
    def k_max(self) -> int:
        return max(self.ks)

    @property
    def padding_cost(self) -> float:
        return self.size * self.width / sum(self.widths)

    def latent_mask(self) -> np.ndarray:
        return np.arange(self.width)[None, :] < np.asarray(self.widths)[:, None]  # [M, S]

    def k_mask(self) -> np.ndarray:
        return np.arange(self.k_max)[None, :] < np.asarray(self.ks)[:, None]  # [M, K]

    def name(self, m: int) -> str:
        return f"{self.hooks[m]}.topk.w{self.widths[m]}.k{self.ks[m]}"


class Output(NamedTuple):
    x_hat: jax.Array  # [M, B, d_in]
    values: jax.Array  # [M, B, K] (zero beyond each member's k)
    indices: jax.Array  # [M, B, K] global latent ids
    fvu: jax.Array  # [M]
    auxk_loss: jax.Array  # [M]


def init_params(spec: BankSpec, key, b_dec: jax.Array | None = None) -> dict:
    """Decoder rows random unit vectors, encoder = decoder transpose, b_enc = 0."""
    w = jax.random.normal(key, (spec.size, spec.width, spec.d_in), jnp.float32)
    w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    return {
        "W_enc": jnp.swapaxes(w, 1, 2),
        "b_enc": jnp.zeros((spec.size, spec.width), jnp.float32),
        "W_dec": w,
        "b_dec": jnp.zeros((spec.size, spec.d_in), jnp.float32) if b_dec is None else b_dec.astype(jnp.float32),
    }


def _global_topk(v, i, k: int, n_model: int):
    """Exact global top-k from each `model` shard's local candidates `v, i [M, B, kl]` (global ids)."""
    if n_model > 1:
        v = lax.all_gather(v, "model", axis=2, tiled=True)  # [M, B, n_model * kl]
        i = lax.all_gather(i, "model", axis=2, tiled=True)
        v, pos = lax.top_k(v, k)
        i = jnp.take_along_axis(i, pos, axis=-1)
    return v, i


def _encode(x, w_enc, b_enc, latent_mask, dead, k: int, k_aux: int, n_model: int, with_aux: bool, impl: str, block: int, cd=None):
    """Each shard streams its own latents (`kernels.topk`: no [B, d_sae] pre-activation, sparse
    backward); the global top-k over `model` is exact. AuxK's selection over dead latents shares
    the pass. Returns (v, i) and, with_aux, (dead v, dead i): pre-activations, global ids."""
    s_local = w_enc.shape[-1]
    off = lax.axis_index("model") * s_local
    neg = jnp.asarray(-jnp.inf, b_enc.dtype)
    b_main = jnp.where(latent_mask, b_enc, neg)
    kl, kal = min(k, s_local), min(k_aux, s_local)
    if with_aux:
        b_aux = jnp.where(dead & latent_mask, b_enc, neg)
        enc = partial(topk_pre, k=kl, k_aux=kal, impl=impl, block=block, compute_dtype=cd)
        v, i, av, ai = jax.vmap(lambda x, w, b, ba: enc(x, w, b, aux_b=ba))(x, w_enc, b_main, b_aux)
        return _global_topk(v, i + off, k, n_model), _global_topk(av, ai + off, k_aux, n_model)
    v, i = jax.vmap(partial(topk_pre, k=kl, impl=impl, block=block, compute_dtype=cd))(x, w_enc, b_main)
    return _global_topk(v, i + off, k, n_model), None


def _decode(values, indices, w_dec):
    """Sum over the shard's own winners of value x decoder row; psum over `model` by the caller.

    `kernels.topk.sparse_decode`: a scan over the k slots, each gathering one [B, d_in] slab of
    decoder rows, with a custom VJP (gather-dot for the values, scatter-add into the selected
    rows for W_dec) that saves nothing but its inputs: no dense [B, d_sae] activation matrix and
    no [B, k, d_in] gather, forward or backward.
    """
    s_local = w_dec.shape[1]
    off = lax.axis_index("model") * s_local
    own = (indices >= off) & (indices < off + s_local)
    local = jnp.where(own, indices - off, 0)
    vals = jnp.where(own, values, 0.0)

    out = jax.vmap(sparse_decode)(vals, local, w_dec)
    return out, own, local


def forward_shard(
    params,
    x,
    latent_mask,
    k_mask,
    dead,
    *,
    k_aux: int,
    n_model: int,
    with_aux: bool,
    impl: str = "auto",
    block: int = 4096,
    compute_dtype=None,
):
    """One device's part of the bank forward (inside shard_map).

    x: [M, B_local, d_in]; params sharded on the latent axis; latent_mask, dead: [M, S_local].
    `with_aux=False` skips AuxK (e_hat = 0): the train step picks the variant with `lax.cond`
    at its top level, since a `cond` inside the differentiated function ran both branches.
    `impl`/`block`/`compute_dtype`: the TopK encoder (`kernels.topk`). Returns x_hat, values, indices (global),
    auxk reconstruction of the residual, and this shard's per-latent firing counts [M, S_local]
    (summed over `data`).
    """
    w_enc, b_enc, w_dec, b_dec = params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"]
    (v, idx), aux = _encode(
        x - b_dec[:, None, :], w_enc, b_enc, latent_mask, dead, k_mask.shape[-1], k_aux, n_model, with_aux, impl, block, compute_dtype
    )
    vals = jax.nn.relu(v) * k_mask[:, None, :]
    part, own, local = _decode(vals, idx, w_dec)
    x_hat = lax.psum(part, "model") + b_dec[:, None, :]

    fired = jax.vmap(
        lambda o, loc, val: jnp.zeros(w_dec.shape[1], jnp.int32).at[loc.reshape(-1)].add(((val > 0) & o).reshape(-1).astype(jnp.int32))
    )(own, local, vals)
    fired = lax.psum(fired, "data")

    # AuxK: the top k_aux of the dead latents reconstruct the residual the live ones left.
    e_hat = jnp.zeros_like(x)
    if with_aux:
        dv, di = aux
        aux_part, _, _ = _decode(jax.nn.relu(dv), di, w_dec)
        e_hat = lax.psum(aux_part, "model")
    return x_hat, vals, idx, e_hat, fired


def losses(x, x_hat, e_hat, dead_count, k_aux: int):
    """FVU and AuxK loss per member (sparsify's definitions), over the global batch."""
    centered = x - x.mean(axis=1, keepdims=True)
    total_var = jnp.sum(centered**2, axis=(1, 2))
    err = x - x_hat
    fvu = jnp.sum(err**2, axis=(1, 2)) / total_var
    e = lax.stop_gradient(err)
    scale = jnp.minimum(dead_count / k_aux, 1.0)
    auxk = scale * jnp.sum((e_hat - e) ** 2, axis=(1, 2)) / total_var
    auxk = jnp.where(dead_count > 0, auxk, 0.0)
    return fvu, auxk


def geometric_median(x: jax.Array, iters: int = 64, eps: float = 1e-6) -> jax.Array:
    """Weiszfeld's algorithm for `x [N, d]` (float32) over its finite rows (zeros if none)."""
    x = x.astype(jnp.float32)
    ok = jnp.all(jnp.isfinite(x), axis=-1)
    x = jnp.where(ok[:, None], x, 0.0)
    n = jnp.maximum(ok.sum(), 1)

    def body(_, y):
        w = ok / jnp.maximum(jnp.linalg.norm(x - y, axis=-1), eps)
        return (w[:, None] * x).sum(0) / jnp.maximum(w.sum(), eps)

    return lax.fori_loop(0, iters, body, x.sum(0) / n)
