"""A bank of sparse dictionaries: parameters with a leading bank axis, forward, init.

Architectures (one per bank; members may differ in hook, width and sparsity setting):

| architecture | activation | sparsity set by | activations per row |
| ------------ | ---------- | --------------- | ------------------- |
| `topk`       | the k largest of relu(pre) | k | k (sparse (values, indices) path) |
| `batchtopk`  | the B*k largest of relu(pre) over the batch; at inference a JumpReLU with the running threshold | k (on average) | up to `cap` (sparse path) |
| `jumprelu`   | pre * (pre > theta), per-latent theta trained with straight-through estimators | L0 coefficient | unbounded (dense path) |
| `relu`       | relu(pre), L1 penalty weighted by decoder row norms | L1 coefficient | unbounded (dense path) |

Matryoshka (with `topk` or `batchtopk`): nested prefixes of the latent list each reconstruct the
target and their losses are summed. Transcoders: encode one hook, decode another (`out_hooks`),
optionally with a linear skip `W_skip`; the encoder input is the raw input (no `b_dec`, which
lives in the output space).

Parameters per member, SAELens orientation: `W_enc [d_in, d_sae]`, `b_enc [d_sae]`,
`W_dec [d_sae, d_out]`, `b_dec [d_out]`; `threshold [d_sae]` (JumpReLU; trained directly, kept
>= 0), `W_skip
[d_in, d_out]` (skip transcoders). Stacked over the bank: leading axis M. Every member is padded
to the bank's widest width (rounded up to a multiple of the `model` mesh axis) and its padded
latents never fire. Padding costs `M * max_width / sum(widths)` of the encoder work.

The forward is written for one device's shard of a mesh with axes `data` (tokens) and `model`
(latents) and runs inside `jax.shard_map` (on a one-device mesh, under size-1 vmaps that bind the
same axis names: `train.step.sharded_forward`).

Sparse path (`topk`, `batchtopk`): each shard streams its own latents through the TopK encoder
(`sae_jax.kernels.topk`: no dense [batch, d_sae] pre-activation, a sparse backward), the
candidates are all-gathered over `model` and the global top of them taken (exact); each shard
decodes the winners it owns from (values, indices) and the partial reconstructions are summed
over `model`. BatchTopK keeps `cap` candidates per row and finds the batch's (B*k)-th largest
among all candidates of the global batch (gathered over `data`): exact unless a row has more
than `cap` winners, which is counted (`capped_frac`).

AuxK (the sparse path, while some latent is dead): the top k_aux of the dead latents'
pre-activations reconstruct the residual the live ones left. With `aux_pool` (the default
`train.aux_pool`), each step takes a window of at most `aux_pool` dead latents (`aux_window`: per
`model` shard, consecutive runs of its dead latents in id order, the window moving on by its own
size every step, so every dead latent is in it once every ceil(dead / pool) steps; all of them
every step while no more are dead, when the selection equals the whole dead set's), gathers their
encoder columns and decoder rows, and encodes, selects and decodes them by dense products of
[B, pool]: k_aux slots a row (8-16x the main path's k) through the sparse decode and backward
cost more than the main step itself on a GPU, where five [B, pool] products cost 5 x pool / width
of the encoder's matmul (docs/benchmarks.md, "AuxK over a pool of dead latents"). `aux_pool = 0`
selects over every dead latent in the encoder's own pass (the fused kernels' second selection)
and decodes sparsely.

Dense path (`jumprelu`, `relu`): their activation count per row is unbounded, so each shard
computes its [B_local, S_local] block of pre-activations, as the PyTorch trainers do.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sae_jax.kernels.topk import EncoderOptions, select_top_k, sparse_decode_parts, topk_pre

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")
SPARSE = ("topk", "batchtopk")


@dataclass(frozen=True)
class BankSpec:
    hooks: tuple[str, ...]  # input hook per member
    widths: tuple[int, ...]
    ks: tuple[int, ...]  # topk / batchtopk: k per member; 0 for the others
    d_in: int
    width: int  # padded width (all members)
    k_aux: int
    architecture: str  # one of ARCHITECTURES
    coefs: tuple[float, ...] = ()  # relu: L1 coefficient, jumprelu: L0 coefficient, per member
    out_hooks: tuple[str, ...] = ()  # transcoders: the output hook per member; () for SAEs
    d_out: int = 0  # the target's width; 0 (given): d_in
    skip: bool = False  # transcoders: a linear skip W_skip
    prefixes: tuple[int, ...] = ()  # Matryoshka: nested prefix sizes, increasing, below every width
    cap: int = 0  # batchtopk: candidates kept per row (>= max k)
    # AuxK's pool: 0, every dead latent (selected in the encoder's pass, decoded sparsely); else
    # at most this many dead latents a step (>= k_aux, < width), by dense products (`aux_window`)
    aux_pool: int = 0

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r}: choose from {', '.join(ARCHITECTURES)}")
        if not self.d_out:
            object.__setattr__(self, "d_out", self.d_in)

    @property
    def size(self) -> int:
        return len(self.hooks)

    @property
    def k_max(self) -> int:
        return max(self.ks)

    @property
    def sparse(self) -> bool:
        return self.architecture in SPARSE

    @property
    def transcoder(self) -> bool:
        return bool(self.out_hooks)

    @property
    def targets(self) -> tuple[str, ...]:
        """The hook each member reconstructs."""
        return self.out_hooks or self.hooks

    @property
    def n_candidates(self) -> int:
        """Activations per row on the sparse path (the encoder's k)."""
        return self.cap if self.architecture == "batchtopk" else self.k_max

    @property
    def padding_cost(self) -> float:
        return self.size * self.width / sum(self.widths)

    def latent_mask(self) -> np.ndarray:
        return np.arange(self.width)[None, :] < np.asarray(self.widths)[:, None]  # [M, S]

    def kind(self) -> str:
        """The architecture as exported names spell it (`matryoshka_batchtopk`, `topk`, ...)."""
        return ("matryoshka_" if self.prefixes else "") + self.architecture

    def name(self, m: int) -> str:
        hook = self.hooks[m] + (f".to.{self.out_hooks[m]}" if self.transcoder else "")
        if self.sparse:
            setting = f"k{self.ks[m]}"
        else:
            setting = ("l1c" if self.architecture == "relu" else "l0c") + f"{self.coefs[m]:g}"
        return f"{hook}.{self.kind()}{'.skip' if self.skip else ''}.w{self.widths[m]}.{setting}"


def batchtopk_threshold(threshold_ema, threshold_norm) -> np.ndarray:
    """BatchTopK's inference (JumpReLU) threshold per member [M], in the units the step trains in:
    the bias-corrected running mean of the batch thresholds (train state `threshold_ema`,
    `threshold_norm`)."""
    return np.asarray(threshold_ema, np.float64) / max(float(threshold_norm), 1e-12)


def init_params(spec: BankSpec, key, b_dec: jax.Array | None, *, init_threshold: float, encoder_scale: float) -> dict:
    """Decoder rows random unit vectors, encoder = decoder transpose x `encoder_scale` (when d_in ==
    d_out; random columns of that norm otherwise), b_enc = 0 (b_dec: the given one, else 0),
    JumpReLU thresholds `init_threshold`, W_skip = 0. The two scales are `train.encoder_init_scale`
    and `train.jumprelu_init_threshold` (sae_jax/config.py says why they are what they are)."""
    k_dec, k_enc = jax.random.split(key)
    w = jax.random.normal(k_dec, (spec.size, spec.width, spec.d_out), jnp.float32)
    w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    if spec.d_out == spec.d_in:
        w_enc = jnp.swapaxes(w, 1, 2) * encoder_scale
    else:
        w_enc = jax.random.normal(k_enc, (spec.size, spec.d_in, spec.width), jnp.float32)
        w_enc = w_enc / jnp.linalg.norm(w_enc, axis=1, keepdims=True) * encoder_scale
    p = {
        "W_enc": w_enc,
        "b_enc": jnp.zeros((spec.size, spec.width), jnp.float32),
        "W_dec": w,
        "b_dec": jnp.zeros((spec.size, spec.d_out), jnp.float32) if b_dec is None else b_dec.astype(jnp.float32),
    }
    if spec.architecture == "jumprelu":
        p["threshold"] = jnp.full((spec.size, spec.width), init_threshold, jnp.float32)
    if spec.skip:
        p["W_skip"] = jnp.zeros((spec.size, spec.d_in, spec.d_out), jnp.float32)
    return p


def _model_offset(s_local: int):
    """The first global latent id of this `model` shard; a static 0 on a 1-wide model axis (so
    nothing downstream is batched where the one-device step binds the axis by a vmap)."""
    return 0 if lax.axis_size("model") == 1 else lax.axis_index("model") * s_local


def _global_topk(v, i, k: int, n_model: int):
    """Exact global top-k from each `model` shard's local candidates `v, i [M, B, kl]` (global ids)."""
    if n_model > 1:
        v = lax.all_gather(v, "model", axis=2, tiled=True)  # [M, B, n_model * kl]
        i = lax.all_gather(i, "model", axis=2, tiled=True)
        v, pos = lax.top_k(v, k)
        i = jnp.take_along_axis(i, pos, axis=-1)
    return v, i


def _encode(
    x,
    w_enc,
    b_enc,
    latent_mask,
    dead,
    k: int,
    k_aux: int,
    n_model: int,
    with_aux: bool,
    options: EncoderOptions,
    shift=None,
):
    """Each shard streams its own latents (`kernels.topk`: no [B, d_sae] pre-activation, sparse
    backward); the global top-k over `model` is exact. AuxK's selection over dead latents shares
    the pass. `x` is data (no cotangent); `shift` [M, d] (b_dec) is subtracted from it inside the
    encoder (`topk_pre`'s b_shift). Returns (v, i) and, with_aux, (dead v, dead i):
    pre-activations, global ids."""
    s_local = w_enc.shape[-1]
    off = _model_offset(s_local)
    neg = jnp.asarray(-jnp.inf, b_enc.dtype)
    b_main = jnp.where(latent_mask, b_enc, neg)
    kl, kal = min(k, s_local), min(k_aux, s_local)
    if with_aux:
        b_aux = jnp.where(dead & latent_mask, b_enc, neg)
        enc = partial(topk_pre, k=kl, k_aux=kal, options=options, x_grad=False)
        v, i, av, ai = jax.vmap(lambda x, w, b, ba, sh: enc(x, w, b, aux_b=ba, b_shift=sh))(x, w_enc, b_main, b_aux, shift)
        return _global_topk(v, i + off, k, n_model), _global_topk(av, ai + off, k_aux, n_model)
    enc = partial(topk_pre, k=kl, options=options, x_grad=False)
    v, i = jax.vmap(lambda x, w, b, sh: enc(x, w, b, b_shift=sh))(x, w_enc, b_main, shift)
    return _global_topk(v, i + off, k, n_model), None


def aux_window(dead, step, pool: int, n_model: int):
    """The dead latents AuxK may pick this step: `dead [M, S]` restricted, in each of the `n_model`
    contiguous shards of the latent axis, to ceil(pool / n_model) consecutive dead latents (in id
    order, wrapping), the window starting at `step` x its size (mod the shard's dead count, in
    whole windows). Every dead latent when a shard has no more than that. Pure; `step` traced."""
    m, s = dead.shape
    s_local = s // n_model
    p = min(-(-pool // n_model), s_local)
    d = dead.reshape(m, n_model, s_local)
    rank = jnp.cumsum(d, axis=-1, dtype=jnp.int32) - 1
    n = jnp.maximum(d.sum(-1, keepdims=True, dtype=jnp.int32), 1)
    start = (jnp.asarray(step, jnp.int32) % ((n + p - 1) // p)) * p  # < n + p: no overflow at any step
    return (d & ((rank - start) % n < p)).reshape(m, s)


def _aux_pool(x, w_enc, b_enc, w_dec, shift, cand, *, pool: int, k_aux: int, n_model: int, options: EncoderOptions):
    """AuxK's reconstruction from this shard's window of dead latents (`cand [M, S_local]`, at most
    ceil(pool / n_model) of them, `aux_window`), to be summed over `model`: their encoder columns
    and decoder rows gathered into [d, p] / [p, d] (p = that bound), the pre-activations
    `(x - shift) @ W_enc + b_enc` of the window as a dense [M, B, p] product (the encoder's
    dtype), the global top k_aux of them (exact over `model`), and their decode as a dense
    product. Plain JAX, differentiated as it is: the gradients reach W_enc, b_enc, W_dec and
    b_dec (through `shift`) by the gathers' transposes, p columns / rows each."""
    m, _, s_local = w_enc.shape
    p = min(-(-pool // n_model), s_local)
    mi = jnp.arange(m)[:, None]
    rank = jnp.where(cand, jnp.cumsum(cand, axis=1, dtype=jnp.int32) - 1, p)
    lat = jnp.broadcast_to(jnp.arange(s_local, dtype=jnp.int32), cand.shape)
    ids = jnp.full((m, p), s_local, jnp.int32).at[mi, rank].set(lat, mode="drop")  # [M, p]: s_local where empty
    valid = ids < s_local
    safe = jnp.where(valid, ids, 0)
    wc = jnp.take_along_axis(w_enc, safe[:, None, :], axis=2)  # [M, d_in, p]
    b = jnp.take_along_axis(b_enc, safe, axis=1)
    if shift is not None:
        b = b - jnp.einsum("md,mdp->mp", shift.astype(jnp.float32), wc.astype(jnp.float32))
    b = jnp.where(valid, b, -jnp.inf)
    cast = options.resolved().cast
    xc, wcc = (x, wc) if cast is None else (x.astype(cast), wc.astype(cast))
    pre = jnp.einsum("mbd,mdp->mbp", xc, wcc, preferred_element_type=jnp.float32) + b[:, None, :]
    v, pos = jax.vmap(lambda a: select_top_k(a, min(k_aux, p)))(lax.stop_gradient(pre))
    off = _model_offset(p)
    _, win = _global_topk(v, pos.astype(jnp.int32) + off, k_aux, n_model)  # positions in the model-wide window
    local = jnp.where((win >= off) & (win < off + p), win - off, p)
    rows = jnp.arange(x.shape[1])[None, :, None]
    chosen = jnp.zeros(pre.shape, bool).at[mi[:, :, None], rows, local].set(True, mode="drop")
    vals = jnp.where(chosen, jax.nn.relu(pre), 0.0)
    w_dec_c = jnp.take_along_axis(w_dec, safe[:, :, None], axis=1)  # [M, p, d_out]
    if cast is not None:  # the decode in the encoder's dtype too (on a GPU float32 products miss the tensor cores)
        vals, w_dec_c = vals.astype(cast), w_dec_c.astype(cast)
    return jnp.einsum("mbp,mpd->mbd", vals, w_dec_c, preferred_element_type=jnp.float32)


def _decode(parts, w_dec):
    """Sum over the shard's own winners of value x decoder row, for each (values, indices) of
    `parts`; psum over `model` by the caller. Returns (reconstructions, (own, local) of the
    first part: which of its winners are this shard's, and their local ids).

    `kernels.topk.sparse_decode_parts`: a scan over blocks of rows gathering their decoder rows,
    with a custom VJP (gather-dot for the values, scatter-add into the selected rows for W_dec,
    every part into one gradient) that saves nothing but its inputs: no dense [B, d_sae]
    activation matrix and no [B, k, d_out] gather, forward or backward.
    """
    s_local = w_dec.shape[1]
    if lax.axis_size("model") == 1:  # every winner is this shard's: the indices pass as they are (the
        # backward's sort of them is then the encoder backward's, which XLA computes once)
        values, indices = tuple(v for v, _ in parts), tuple(i for _, i in parts)
        own0 = jnp.ones(indices[0].shape, bool)
        return jax.vmap(sparse_decode_parts)(values, indices, w_dec), (own0, indices[0])
    off = _model_offset(s_local)
    owns = [(i >= off) & (i < off + s_local) for _, i in parts]
    locals_ = tuple(jnp.where(o, i - off, 0) for o, (_, i) in zip(owns, parts))
    vals = tuple(jnp.where(o, v, 0.0) for o, (v, _) in zip(owns, parts))
    return jax.vmap(sparse_decode_parts)(vals, locals_, w_dec), (owns[0], locals_[0])


def _batch_select(rv, ks, k_max: int):
    """BatchTopK over the global batch: keep the values >= the (B*k)-th largest candidate of the
    member's batch (all `data` shards). rv [M, B_local, C] >= 0, descending per row; ks [M].
    Returns (values, threshold [M], fraction of rows whose every candidate was kept [M])."""
    allv = lax.all_gather(lax.stop_gradient(rv), "data", axis=1, tiled=True)  # [M, B, C]
    m, b, c = allv.shape
    top = lax.top_k(allv.reshape(m, b * c), b * k_max)[0]  # [M, B * k_max], descending
    thr = jnp.take_along_axis(top, (b * ks - 1)[:, None], axis=1)[:, 0]
    keep = (rv >= thr[:, None, None]) & (rv > 0)
    capped = lax.psum(keep[..., -1].sum(-1), "data") / b
    return jnp.where(keep, rv, 0.0), thr, capped


def forward_sparse(
    params,
    x,
    latent_mask,
    ks,
    dead,
    *,
    spec: BankSpec,
    n_model: int,
    with_aux: bool,
    options: EncoderOptions,
):
    """One device's part of a TopK / BatchTopK bank forward (inside shard_map).

    x: [M, B_local, d_in]; params sharded on the latent axis; latent_mask, dead: [M, S_local];
    ks [M]. `with_aux=False` skips AuxK (e_hat = 0): the train step picks the variant with
    `lax.cond` at its top level, since a `cond` inside the differentiated function ran both
    branches. `options`: the TopK encoder (`kernels.topk.EncoderOptions`).

    Returns a dict: `x_hat [P, M, B_local, d_out]` (one reconstruction per Matryoshka prefix, the
    full dictionary last; without W_skip), `values`/`indices [M, B_local, C]` (global ids),
    `e_hat` (AuxK's reconstruction of the residual), `fired [M, S_local]` (summed over `data`),
    `l0 [M, B_local]`, `threshold`/`capped [M]` (BatchTopK's batch threshold and capped rows).
    """
    w_enc, b_enc, w_dec, b_dec = params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"]
    # SAEs encode x - b_dec: the encoder takes b_dec as a shift of its input (`topk_pre`'s
    # b_shift: (x - b_dec) @ W_enc + b_enc = x @ W_enc + (b_enc - b_dec @ W_enc)), so the input
    # stays data and b_dec's gradient arrives through the bias (no [B, d] dx)
    shift = None if spec.transcoder else b_dec
    C = spec.n_candidates
    pooled = with_aux and spec.aux_pool > 0  # AuxK by dense products over a window of dead latents
    fused = with_aux and not pooled  # AuxK's selection in the encoder's pass, its decode sparse
    (v, idx), aux = _encode(lax.stop_gradient(x), w_enc, b_enc, latent_mask, dead, C, spec.k_aux, n_model, fused, options, shift)
    rv = jax.nn.relu(v)
    m = rv.shape[0]
    if spec.architecture == "batchtopk":
        vals, thr, capped = _batch_select(rv, ks, spec.k_max)
    else:
        vals = rv * (jnp.arange(C)[None, :] < ks[:, None])[:, None, :]
        thr, capped = jnp.zeros(m), jnp.zeros(m)

    # Matryoshka: decode each band of latents [p_{j-1}, p_j) once; prefix j is the sum of bands <= j.
    # AuxK: the top k_aux of the dead latents reconstruct the residual the live ones left. One
    # decode for all of them: their decoder gradients share one accumulator.
    edges = (0, *spec.prefixes, spec.width)
    bands = [(vals if len(edges) == 2 else jnp.where((idx >= lo) & (idx < hi), vals, 0.0), idx) for lo, hi in zip(edges[:-1], edges[1:])]
    if fused:
        dv, di = aux
        bands.append((jax.nn.relu(dv), di))
    outs, (own, local) = _decode(bands, w_dec)
    parts = outs[: len(edges) - 1]
    x_hat = jnp.cumsum(lax.psum(jnp.stack(parts), "model"), axis=0) + b_dec[None, :, None, :]

    fired = jax.vmap(
        lambda o, loc, val: jnp.zeros(w_dec.shape[1], jnp.int32).at[loc.reshape(-1)].add(((val > 0) & o).reshape(-1).astype(jnp.int32))
    )(own, local, vals)
    fired = lax.psum(fired, "data")

    e_hat = jnp.zeros(x.shape[:2] + (w_dec.shape[-1],), x.dtype)
    if pooled:
        opts = dict(pool=spec.aux_pool, k_aux=spec.k_aux, n_model=n_model, options=options)
        e_hat = lax.psum(_aux_pool(lax.stop_gradient(x), w_enc, b_enc, w_dec, shift, dead & latent_mask, **opts), "model")
    elif fused:
        e_hat = lax.psum(outs[-1], "model")
    l0 = (vals > 0).sum(-1).astype(jnp.float32)
    return {
        "x_hat": x_hat,
        "values": vals,
        "indices": idx,
        "e_hat": e_hat,
        "fired": fired,
        "l0": l0,
        "penalty": jnp.zeros_like(l0),
        "threshold": thr,
        "capped": capped,
    }


def _rect(u):
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z, theta, jumprelu_bandwidth: float):
    """z * (z > theta); backward: dz = H(z - theta) g, dtheta = -(theta / e) K((z - theta) / e) g
    with e = `jumprelu_bandwidth` and K the rectangle kernel (Rajamanoharan et al. 2024, the Gemma Scope recipe)."""
    return z * (z > theta)


def _jumprelu_fwd(z, theta, jumprelu_bandwidth):
    return jumprelu(z, theta, jumprelu_bandwidth), (z, theta)


def _jumprelu_bwd(jumprelu_bandwidth, res, g):
    z, theta = res
    e = jumprelu_bandwidth
    return g * (z > theta), -(theta / e) * _rect((z - theta) / e) * g


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(z, theta, jumprelu_bandwidth: float):
    """H(z - theta) (the L0 count); backward: dz = 0, dtheta = -(1 / e) K((z - theta) / e) g (e = `jumprelu_bandwidth`)."""
    return (z > theta).astype(z.dtype)


def _heaviside_fwd(z, theta, jumprelu_bandwidth):
    return heaviside(z, theta, jumprelu_bandwidth), (z, theta)


def _heaviside_bwd(jumprelu_bandwidth, res, g):
    z, theta = res
    e = jumprelu_bandwidth
    return jnp.zeros_like(z), -(1.0 / e) * _rect((z - theta) / e) * g


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)


def forward_dense(params, x, latent_mask, ks, dead, *, spec: BankSpec, jumprelu_bandwidth: float, options: EncoderOptions):
    """One device's part of a JumpReLU / ReLU bank forward (inside shard_map): the same contract
    as `forward_sparse` (no `values`/`indices`; `penalty [M, B_local]` is the per-row sparsity
    term: the L0 count through the straight-through estimator, or sum_i f_i ||W_dec_i||)."""
    del ks, dead
    w_enc, b_enc, w_dec, b_dec = params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"]
    enc_in = x if spec.transcoder else x - b_dec[:, None, :]
    # `auto` is float32 here: the dense architectures' weight gradients come from the same matmul
    cd = jnp.float32 if options.dtype == "auto" else options.dtype
    pre = jnp.einsum("mbd,mds->mbs", enc_in.astype(cd), w_enc.astype(cd), preferred_element_type=jnp.float32) + b_enc[:, None, :]
    mask = latent_mask[:, None, :].astype(jnp.float32)
    if spec.architecture == "relu":
        acts = jax.nn.relu(pre) * mask
        penalty = jnp.einsum("mbs,ms->mb", acts, jnp.linalg.norm(w_dec, axis=-1))
    else:
        theta = jnp.broadcast_to(params["threshold"][:, None, :], pre.shape)
        acts = jumprelu(pre, theta, jumprelu_bandwidth) * mask
        penalty = (heaviside(pre, theta, jumprelu_bandwidth) * mask).sum(-1)
    penalty = lax.psum(penalty, "model")
    fired_rows = acts > 0
    x_hat = lax.psum(jnp.einsum("mbs,msd->mbd", acts, w_dec), "model") + b_dec[:, None, :]
    m = x.shape[0]
    return {
        "x_hat": x_hat[None],
        "e_hat": jnp.zeros_like(x_hat),
        "fired": lax.psum(fired_rows.sum(1).astype(jnp.int32), "data"),
        "l0": lax.psum(fired_rows.sum(-1).astype(jnp.float32), "model"),
        "penalty": penalty,
        "threshold": jnp.zeros(m),
        "capped": jnp.zeros(m),
    }


def losses(y, x_hat, e_hat, dead_count, k_aux: int):
    """Per member, over the global batch: FVU of each reconstruction in `x_hat [P, M, B, d]`
    (sparsify's definition) [P, M], and the AuxK loss [M]. `y [M, B, d]` is the target."""
    centered = y - y.mean(axis=1, keepdims=True)
    total_var = jnp.sum(centered**2, axis=(1, 2))
    err = y[None] - x_hat
    fvu = jnp.sum(err**2, axis=(2, 3)) / total_var
    e = lax.stop_gradient(err[-1])
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
