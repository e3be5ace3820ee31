"""Dead latents re-initialised toward what the bank reconstructs worst (`train.resample_tokens`).

Every `resample_tokens` tokens (rounded to whole steps), before the step, each member's latents
that fired on none of the last `resample_tokens` tokens are given new directions: rows of the
step's batch are drawn without replacement with probability proportional to their squared
reconstruction error (Gumbel top-k of log error); a drawn row whose residual (target minus
reconstruction) is within cosine `SIMILAR` of an earlier drawn row's is passed over, so one
direction gets one latent (on language-model activations the worst rows are often alike, e.g.
the first token's outsized activations, and a few hundred latents on one direction fire
together: FVU 150 on the batch after it, measured); the i-th kept row's normalised residual
becomes the i-th resampled latent's decoder row and, scaled to the mean encoder norm of the
member's live latents, its encoder column (transcoders: the row's normalised input, which is what
the encoder reads). Its encoder bias is set to 0 and its Adam moments (W_enc, W_dec, b_enc) to 0;
its `tokens_since_fired` restarts. At most half a batch (and `MAX_PER_EVENT`) of latents per
member per event, from twice as many rows drawn; which dead latents, when there are more, rotates
by a random offset. Nothing is resampled once the learning rate decays, so the last ones have
time to settle.

The idea is Anthropic's resampling ("Towards Monosemanticity", 2023): a latent that never fires
gets no gradient under TopK, and a residual row points at what the live latents miss. Measured in
docs/benchmarks.md ("Resampling dead latents"). Pure and deterministic given (state, batch, key):
a resumed run resamples as the uninterrupted one did.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from sae_jax import parallel

NAMES = ("W_enc", "W_dec", "b_enc")  # what a resampled latent gets anew (its column / row / entry)
MAX_PER_EVENT = 4096  # latents resampled per member per event, at most (and at most half a batch)
SIMILAR = 0.5  # cosine above which two drawn rows' residuals count as one direction


def resample_steps(batch_size: int, resample_tokens: int) -> int:
    """The period in steps (0: never): `resample_tokens` rounded to whole batches, at least 1."""
    return 0 if resample_tokens <= 0 else max(1, round(resample_tokens / batch_size))


def resamples_at(step: int, every: int, steps: int, decay_frac: float) -> bool:
    """Whether the resampling runs before step `step` (0-based): every `every` steps, not at the
    first, and not once the learning rate decays (`train.decay_frac`)."""
    return every > 0 and step > 0 and step % every == 0 and step < int(steps * (1 - decay_frac))


def choose(x, y, x_hat, dead, lat_mask, w_enc, key, transcoder: bool):
    """What to write, replicated over the mesh: (ids [M, n] global latent ids, the width where
    unused; dec_dirs [M, n, d_out]; enc_cols [M, n, d_in]). `x`, `y`, `x_hat` scaled, [M, B, d];
    `dead` [M, S] the latents to resample; `w_enc` [M, d_in, S] for the live latents' norm."""
    m, b, _ = y.shape
    s = dead.shape[1]
    n = max(min(b // 2, s, MAX_PER_EVENT), 1)
    pool = min(b, 2 * n)  # rows drawn, of which up to n are used
    err = y - x_hat
    l2 = jnp.sum(err**2, axis=-1)  # [M, B]
    score = jnp.where(l2 > 0, jnp.log(jnp.maximum(l2, 1e-30)) + jax.random.gumbel(key, l2.shape), -jnp.inf)
    top, rows = jax.lax.top_k(score, pool)  # [M, pool]: rows drawn without replacement, weight ~ error^2
    unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    dirs = unit(jnp.take_along_axis(err, rows[..., None], axis=1))
    # one latent per direction: a row whose residual is within SIMILAR of a row drawn before it
    # is not used (on LLM activations the worst rows are often alike, e.g. the first token's
    # outsized activations; many latents on one direction would all fire together)
    cos = jnp.einsum("mid,mjd->mij", dirs, dirs)
    earlier = jnp.tril(jnp.ones((pool, pool), bool), -1)
    usable = jnp.isfinite(top) & ~jnp.any((cos > SIMILAR) & earlier, axis=2)
    keep = jnp.argsort(~usable, axis=1, stable=True)[:, :n]  # the first n usable ones, in the order drawn
    rows = jnp.take_along_axis(rows, keep, axis=1)
    usable = jnp.take_along_axis(usable, keep, axis=1)
    dec_dirs = jnp.take_along_axis(dirs, keep[..., None], axis=1)
    live = lat_mask & ~dead
    norms = jnp.linalg.norm(w_enc.astype(jnp.float32), axis=1)  # [M, S]
    count = live.sum(1)
    mean_norm = jnp.where(count > 0, (norms * live).sum(1) / jnp.maximum(count, 1), norms.mean(1))
    enc_cols = (unit(jnp.take_along_axis(x, rows[..., None], axis=1)) if transcoder else dec_dirs) * mean_norm[:, None, None]
    # the dead latents in rotating order: rank 0 is the first dead one at or after a random offset
    n_dead = dead.sum(1)
    order = jnp.cumsum(dead, axis=1) - 1
    off = jax.random.randint(jax.random.fold_in(key, 1), (m,), 0, jnp.maximum(n_dead, 1))
    rank = jnp.where(dead, (order - off[:, None]) % jnp.maximum(n_dead, 1)[:, None], n)
    n_use = jnp.sum(usable, axis=1)
    rank = jnp.where(rank < n_use[:, None], rank, n)  # past what the batch gives: not resampled
    ids = jnp.full((m, n), s, jnp.int32)
    ids = ids.at[jnp.arange(m)[:, None], rank].set(jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (m, s)), mode="drop")
    return ids, dec_dirs, enc_cols


def write(params, opt_state, since, ids, dec_dirs, enc_cols, offset):
    """The chosen latents rewritten on this device's own latents (`offset`: its first global id):
    params, the moments of NAMES in `opt_state`, `since` [M, S_local]."""
    s_local = params["W_dec"].shape[1]
    local = jnp.where((ids >= offset) & (ids < offset + s_local), ids - offset, s_local)  # elsewhere: dropped
    mi = jnp.arange(ids.shape[0])[:, None]

    def put(name, a, value):
        if name == "W_enc":  # [M, d_in, S]: the indexed axes first in the update's shape, [M, n, d_in]
            return a.at[mi, :, local].set(jnp.broadcast_to(value, (*local.shape, a.shape[1])).astype(a.dtype), mode="drop")
        if name == "W_dec":
            return a.at[mi, local].set(jnp.broadcast_to(value, (*local.shape, a.shape[2])).astype(a.dtype), mode="drop")
        return a.at[mi, local].set(jnp.asarray(value, a.dtype), mode="drop")

    new = dict(params)
    new["W_enc"] = put("W_enc", params["W_enc"], enc_cols)
    new["W_dec"] = put("W_dec", params["W_dec"], dec_dirs)
    new["b_enc"] = put("b_enc", params["b_enc"], 0.0)

    def moment(path, leaf):
        name = next((k.key for k in path if isinstance(k, jax.tree_util.DictKey) and k.key in NAMES), None)
        if name is None or getattr(leaf, "shape", None) != params[name].shape:
            return leaf
        return put(name, leaf, 0.0)

    opt_state = jax.tree_util.tree_map_with_path(moment, opt_state)
    since = since.at[mi, local].set(0, mode="drop")
    return new, opt_state, since


def apply(params, opt_state, since, ids, dec_dirs, enc_cols, *, mesh, tx, width: int):
    """`write` on every device's own latents (`shard_map` over the mesh, as the update is)."""
    if mesh.size == 1:
        return write(params, opt_state, since, ids, dec_dirs, enc_cols, 0)
    n_model = mesh.shape["model"]
    S, P = parallel.pspec, parallel.P
    pspecs = {k: S(k) for k in params}
    ospecs = optax.tree_utils.tree_map_params(tx, lambda _, sp: sp, opt_state, pspecs, transform_non_params=lambda _: P())

    def local(p, o, t, i, dd, ec):
        offset = 0 if n_model == 1 else jax.lax.axis_index("model") * (width // n_model)
        return write(p, o, t, i, dd, ec, offset)

    fn = partial(jax.shard_map, mesh=mesh, check_vma=False)
    return fn(local, in_specs=(pspecs, ospecs, S("latents"), P(), P(), P()), out_specs=(pspecs, ospecs, S("latents")))(
        params, opt_state, since, ids, dec_dirs, enc_cols
    )


def count(ids, width: int):
    """Latents resampled per member [M]."""
    return jnp.sum(ids < width, axis=1)
