"""Adam whose moments of the dictionary matrices are stored in bfloat16 (`train.optimizer_state`).

    tx = scale_by_adam_lean(b1, b2, eps, "bfloat16")   # optax's scale_by_adam, leaner state

The update is optax's `scale_by_adam` (bias-corrected moments, eps outside the square root),
computed in float32 from the stored moments; only what is kept between steps changes. For every
leaf with a matrix per member (ndim >= 3: W_enc, W_dec, W_skip) the first and second moments are
kept in bfloat16, half the bytes of float32: at 2^20 latents and d_in 2304 that is 18 GiB instead
of 36. Biases and thresholds, a d_in-th of the state, keep float32.

Why stochastic rounding: bfloat16 holds 8 significant bits. Adam's second moment changes by
(1 - b2) = 0.1% a step, under half a bfloat16 ulp (2^-9 = 0.2%), so rounding to nearest would
leave nu unchanged for ever: a latent that stops receiving gradient would keep its old nu, and a
growing gradient would be seen late. Rounding up with probability equal to the distance to the
lower neighbour keeps every stored moment an unbiased estimate of the float32 one; the error is a
random walk that the decay itself damps (about 2^-9 / sqrt(1 - b2^2) ~ 4% relative for nu at
b2 = 0.999, 0.3% for mu at b1 = 0.7; docs/design.md, "Optimizer state", has the measurements).

The random bits are a hash of each element's position in the global array, the leaf and the
step: the same on any mesh and in any process, so multi-process runs and resumed runs stay
bit-identical. `float32` is optax's `scale_by_adam` itself.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import optax

LEAN_MIN_NDIM = 3  # leaves with a matrix per member keep lean moments; vectors keep float32


def _mix(h: jax.Array) -> jax.Array:
    """A 32-bit integer mixer (two multiply-xorshift rounds): every output bit depends on every input bit."""
    h = h * jnp.uint32(0x9E3779B1)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x85EBCA6B)
    return h ^ (h >> 13)


def random_bits(shape: tuple[int, ...], salt: jax.Array, start=None, full_shape: tuple[int, ...] | None = None) -> jax.Array:
    """uint32 pseudo-random bits for every element of an array of `shape`, a hash of its row-major
    position (taken mod 2^32) and `salt` (uint32): elementwise from iotas, so XLA fuses it into the
    loop that consumes it and no random array is ever stored. `start` / `full_shape`: the array is
    the block at `start` (ints or int32 scalars per axis) of a `full_shape` array, and each element
    gets the bits of its position in the full array (a block-by-block update draws what a whole one
    does)."""
    full = tuple(shape) if full_shape is None else tuple(full_shape)
    start = (0,) * len(shape) if start is None else start
    pos = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        at = jax.lax.broadcasted_iota(jnp.uint32, shape, d) + jnp.asarray(start[d]).astype(jnp.uint32)
        pos = pos + at * jnp.uint32(stride % 2**32)
        stride *= full[d]
    return _mix(pos ^ _mix(salt))


def stochastic_round(x: jax.Array, bits: jax.Array, dtype) -> jax.Array:
    """`x` (float32) rounded to bfloat16, up (in magnitude) with probability equal to its distance
    from the lower neighbour: add 16 random bits below bfloat16's last kept bit and truncate.
    `bits`: uint32, as `random_bits` gives. Non-finite values keep their class (inf stays inf; the
    step never stores NaN)."""
    if jnp.dtype(dtype) == jnp.float32:
        return x
    if jnp.dtype(dtype) != jnp.bfloat16:
        raise ValueError(f"stochastic rounding to {dtype}: only bfloat16 is supported")
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    finite = (u & jnp.uint32(0x7F800000)) != jnp.uint32(0x7F800000)
    up = jnp.where(finite, u + (bits & jnp.uint32(0xFFFF)), u)
    # a carry into the exponent is the correct round-up (to the next binade, or to inf past the largest)
    return jax.lax.bitcast_convert_type(up & jnp.uint32(0xFFFF0000), jnp.float32).astype(jnp.bfloat16)


def _lean(p, dtype) -> bool:
    return jnp.dtype(dtype) != jnp.float32 and p.ndim >= LEAN_MIN_NDIM


def scale_by_adam_lean(b1: float, b2: float, eps: float, state_dtype: str) -> optax.GradientTransformation:
    """optax's `scale_by_adam(b1, b2, eps)` with the moments of every leaf of ndim >= 3 stored in
    `state_dtype` ("bfloat16": stochastically rounded, see the module docstring; "float32": optax's
    own transformation). The state is optax's `ScaleByAdamState`, so its leaves line up with the
    parameters (shardings, `optax.tree_utils`) as Adam's do. The update may be given a tree of
    some of the parameters, or blocks of them: `blocks` (an extra argument, through `optax.chain`)
    maps a leaf's path (`jax.tree_util.keystr`) to (start, full shape) of the block it is, so that
    its stochastic rounding draws what the whole leaf's would (`train.update`)."""
    dtype = jnp.dtype(state_dtype)
    if dtype == jnp.float32:
        return optax.scale_by_adam(b1, b2, eps)

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, dtype if _lean(p, dtype) else p.dtype)  # noqa: E731
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

    def update(updates, state, params=None, blocks=None, **extra):
        del params, extra
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        c1, c2 = 1 - jnp.float32(b1) ** t, 1 - jnp.float32(b2) ** t
        paths, treedef = jax.tree_util.tree_flatten_with_path(updates)
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        out, new_mu, new_nu = [], [], []
        for (path, g), mu, nu in zip(paths, mus, nus, strict=True):
            g = g.astype(jnp.float32)
            m = b1 * mu.astype(jnp.float32) + (1 - b1) * g
            v = b2 * nu.astype(jnp.float32) + (1 - b2) * g * g
            out.append((m / c1) / (jnp.sqrt(v / c2) + eps))
            if mu.dtype == jnp.float32:
                new_mu.append(m)
                new_nu.append(v)
                continue
            # one salt per (step, leaf, moment), the leaf named by its path (the same in a tree of
            # some of the parameters); a block's elements draw by their place in the whole leaf
            salt = _mix(count.astype(jnp.uint32)) ^ jnp.uint32(zlib.crc32(jax.tree_util.keystr(path).encode()) & ~1)
            start, full = (blocks or {}).get(jax.tree_util.keystr(path), (None, None))
            new_mu.append(stochastic_round(m, random_bits(g.shape, salt, start, full), mu.dtype))
            new_nu.append(stochastic_round(v, random_bits(g.shape, salt + 1, start, full), nu.dtype))
        unflat = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
        return unflat(out), optax.ScaleByAdamState(count=count, mu=unflat(new_mu), nu=unflat(new_nu))

    return optax.GradientTransformationExtraArgs(init, update)
