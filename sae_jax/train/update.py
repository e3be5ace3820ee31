"""The optimiser's step on the parameters, block by block of latents:

    params, opt_state = apply_update(grads, params, opt_state, tx, renorm=True, finite=ok)

`tx` is the optax chain of `train.optimizer`; `finite` (a bool scalar) false leaves parameters
and moments as they were. Decoder rows stay unit-norm (`renorm`: their gradient made tangent,
the updated rows divided by their norm) and JumpReLU thresholds >= 0.

Why blocks. The dictionary matrices (W_enc [M, d_in, S], W_dec [M, S, d_out]) are updated one
block of latents at a time in a loop that writes each block back into the donated parameter and
moment buffers (`update_block` latents per block, `BLOCK_BUDGET` elements; on TPU, where it
matters: see `BLOCK_BUDGET`). Updated whole, libtpu's compiler
keeps a parameter-sized float32 temporary per matrix: the decoder's new rows must be written
beside the old ones until its moments, which read the old rows, are written; and the encoder's
gradient, which the sparse backward builds latent-major ([M, S, d_in]: one row per latent,
`kernels.topk`), is transposed into a second [M, d_in, S] copy for an update that XLA does not
fuse with the transpose. A block's transpose and temporaries are a few MiB; at 2^18 latents and
d_in 2304 each whole-matrix temporary is 2.25 GiB (docs/design.md, "Optimizer state").

Every element's arithmetic is the same as a whole-array update (the stochastic rounding of lean
moments draws by each element's place in the whole matrix: `adam.scale_by_adam_lean`'s
`blocks`), so blocks change memory, not results. Under a mesh the function runs per device
(`shard_map` over `model`, see `train.step`): `latent_offset` is the device's first latent and
`latents` the global width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sae_jax.kernels import pallas

# the dictionary matrices and their latent axis
LATENT_AXIS = {"W_enc": 2, "W_dec": 1}
# elements of one block of a matrix (64 MiB in float32), by platform. Only libtpu's compiler
# needs the blocks: the CUDA compiler keeps no parameter-sized temporary beyond the gradients
# with whole-array updates (2^20 latents on an H100: 18.26 GiB of temporaries either way), and a
# CPU has the memory; there the update stays one pass per array.
BLOCK_BUDGET = {"tpu": 2**24}


def platform_budget() -> int | None:
    """The block budget where this step is compiled for (`kernels.pallas.target_platform`); None: whole arrays."""
    return BLOCK_BUDGET.get(pallas.target_platform())


def update_block(shape: tuple[int, ...], axis: int, budget: int) -> int:
    """Latents per block of an array of `shape` whose latent axis is `axis`: all of them when the
    array has at most `budget` elements, else the largest divisor of the latent count whose block
    fits the budget, a multiple of 128 where one is (a TPU tile's lanes)."""
    n = shape[axis]
    per = max(1, math.prod(shape) // max(n, 1))
    cap = max(1, budget // per)
    if cap >= n:
        return n
    divisors = [b for b in range(cap, 0, -1) if n % b == 0]
    return next((b for b in divisors if b % 128 == 0), divisors[0])


def _dicts(tree) -> bool:
    return isinstance(tree, dict)


def _restrict(opt_state, names):
    """`opt_state` with every dict of parameters in it (Adam's moments) cut down to `names`."""
    return jax.tree.map(lambda d: {n: d[n] for n in names} if _dicts(d) else d, opt_state, is_leaf=_dicts)


def _merge(opt_state, *parts):
    """`opt_state` with the dicts of each of `parts` (trees of the same structure) merged into its own."""
    return jax.tree.map(
        lambda d, *ps: {**d, **{k: v for p in ps for k, v in p.items()}} if _dicts(d) else d, opt_state, *parts, is_leaf=_dicts
    )


def _project_out_parallel(g_dec, w_dec):
    """Remove the gradient component along each (unit) decoder row: keeps the update tangent."""
    return g_dec - jnp.sum(g_dec * w_dec, axis=-1, keepdims=True) * w_dec


def _whole(grads, params, opt_state, tx, renorm: bool, finite, blocks=None):
    """The update of the arrays in `params` at once (each may be a block of a matrix: `blocks`).

    Written so that each parameter's update is one elementwise pass that can write over its
    donated input: `finite` chooses the moments and zeroes the update inside that pass, and the
    decoder's renormalisation divides the updated rows only (by 1 when the step is skipped: the
    rows are then the old ones). A `lax.cond` on `finite`, or a choice between the renormalised
    rows and the old ones after the row norms, makes XLA keep the old parameters beside the new."""
    if renorm and "W_dec" in grads:
        grads = {**grads, "W_dec": _project_out_parallel(grads["W_dec"], params["W_dec"])}
    updates, new_opt = tx.update(grads, opt_state, params, blocks=blocks)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    new = optax.apply_updates(params, updates)
    if renorm and "W_dec" in new:
        norm = jnp.maximum(jnp.linalg.norm(new["W_dec"], axis=-1, keepdims=True), 1e-12)
        new["W_dec"] = new["W_dec"] / jnp.where(finite, norm, 1.0)
    if "threshold" in new:
        new["threshold"] = jnp.maximum(new["threshold"], 0.0)
    return new, jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_opt, opt_state)


def _blocked(name: str, block: int, grad, p, opt_state, tx, renorm, finite, enc_latent_major, latent_offset, latents):
    """The update of the matrix `name` a block of `block` latents at a time, written back in place:
    (new matrix, its moments as `_restrict(opt_state, [name])` has them)."""
    axis = LATENT_AXIS[name]
    full = p.shape[:axis] + (latents,) + p.shape[axis + 1 :]
    key = jax.tree_util.keystr((jax.tree_util.DictKey(name),))
    state = _restrict(opt_state, [name])
    moments = [leaf for leaf in jax.tree.leaves(state, is_leaf=_dicts) if _dicts(leaf)]

    def body(j, carry):
        p_c, ms = carry
        start = j * block
        cut = lambda a: lax.dynamic_slice_in_dim(a, start, block, axis)  # noqa: E731
        lm = name == "W_enc" and enc_latent_major  # [M, S, d]: the block's rows, transposed below (small)
        g = lax.dynamic_slice_in_dim(grad, start, block, 1) if lm else cut(grad)
        # the block's old values read out first (a barrier: not fused into their consumers), so
        # that nothing reads the whole buffers after a block is written back into them; else XLA
        # copies the buffers to keep the old values
        p_b, g, ms_b = lax.optimization_barrier((cut(p_c), g, [cut(m) for m in ms]))
        g = pallas.transpose(g) if lm else g
        it = iter(ms_b)
        st = jax.tree.map(lambda d: {name: next(it)} if _dicts(d) else d, state, is_leaf=_dicts)
        at = tuple(start + latent_offset if a == axis else 0 for a in range(p.ndim))
        new_p, new_st = _whole({name: g}, {name: p_b}, st, tx, renorm, finite, blocks={key: (at, full)})
        put = lambda a, b: lax.dynamic_update_slice_in_dim(a, b.astype(a.dtype), start, axis)  # noqa: E731
        news = [leaf[name] for leaf in jax.tree.leaves(new_st, is_leaf=_dicts) if _dicts(leaf)]
        return put(p_c, new_p[name]), [put(m, n) for m, n in zip(ms, news, strict=True)]

    new_p, new_ms = lax.fori_loop(0, p.shape[axis] // block, body, (p, [m[name] for m in moments]))
    it = iter(new_ms)
    return new_p, jax.tree.map(lambda d: {name: next(it)} if _dicts(d) else d, state, is_leaf=_dicts)


def apply_update(
    grads: dict,
    params: dict,
    opt_state,
    tx,
    *,
    renorm: bool,
    finite,
    enc_latent_major: bool = False,
    budget: int | None = None,
    latent_offset=0,
    latents: int | None = None,
):
    """(new params, new optimiser state): see the module docstring. `enc_latent_major`:
    grads["W_enc"] is [M, S, d_in] (the sparse backward's layout), not W_enc's [M, d_in, S].
    `budget`: elements per block of a matrix (None: whole arrays). `latent_offset` / `latents`: this device's first
    latent and the global width (default: one device, all of them)."""
    grads = dict(grads)
    blocks = {}
    for name, axis in LATENT_AXIS.items():
        if name in params:
            b = update_block(params[name].shape, axis, budget) if budget else params[name].shape[axis]
            if b < params[name].shape[axis]:
                blocks[name] = b
    if enc_latent_major and "W_enc" in grads and "W_enc" not in blocks:
        grads["W_enc"] = jnp.swapaxes(grads["W_enc"], 1, 2)
    rest = [n for n in params if n not in blocks]
    new, new_opt = _whole({n: grads[n] for n in rest}, {n: params[n] for n in rest}, _restrict(opt_state, rest), tx, renorm, finite)
    parts = []
    for name, b in blocks.items():
        width = latents or params[name].shape[LATENT_AXIS[name]]
        new[name], part = _blocked(
            name, b, grads[name], params[name], opt_state, tx, renorm, finite, enc_latent_major, latent_offset, width
        )
        parts.append(part)
    return {n: new[n] for n in params}, _merge(new_opt, *parts)
