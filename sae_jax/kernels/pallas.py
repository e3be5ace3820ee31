"""Pallas TopK encoder kernels: block matmul + bias + running top-k merge, fused.

A row tile of x [tb, d] meets the latents block by block; for each block the kernel computes
`pre = x @ w_blk + b_blk` in float32 and merges it into the tile's running top-k (values and
global indices, [tb, kp]) by kp rounds of "take the larger of the two maxima, knock it out":
only elementwise ops, row reductions (max, min, sum) and iotas, which both the Triton (GPU) and
Mosaic (TPU) lowerings support; no concatenation, no sort. The dense [B, d_sae] pre-activation
never exists: per tile, one [tb, block] block at a time.

- TPU (`backend="tpu"`): grid (row tiles, latent blocks); the latent axis is sequential
  ("arbitrary") and the running top-k lives in the output block, which stays resident across it
  (initialised at block 0). Mosaic pipelines the w blocks HBM -> VMEM.
- GPU (`backend="gpu"`, Triton): grid (row tiles,); the kernel loops over latent blocks itself
  (Triton grids are parallel), loading each w block with `pl.ds`, and over d in `d_chunk`
  slices for the matmul. Triton wants power-of-two block shapes: kp is k rounded up to a power of
  two (extra slots sliced off), tb, block and d_chunk are powers of two and inputs are zero-padded
  to multiples (padded latents get bias -inf and are never chosen before a real one).

On CPU both run in interpret mode (the TPU one under the TPU interpreter, with its race and
out-of-bounds checks), which is how the tests check them against the dense reference. The
selection cost is O(k x block) elementwise work per row and block, next to the O(d x block)
matmul: cheap for k << d (k 32-64, d 576-2304), the regime these kernels target.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

NEG = -jnp.inf
MAX_BLOCK = {"gpu": 128, "tpu": 512}
ROW_TILE = {"gpu": 64, "tpu": 512}


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def gated_merge(run_v, run_i, pre, start, k: int):
    """Merge a block of pre-activations [tb, blk] (latent ids start + column) into the running
    top-k slots (values / ids [tb, kp], unordered; slots >= k hold +inf and are never touched).

    The row's running k-th value (the minimum over its k slots) is a threshold: only block
    entries above it can enter. The loop runs as many rounds as the largest such count in the
    tile (at most k); each round puts every row's block maximum in place of its running minimum
    where it is larger, and knocks that maximum out of the block. Exact: a row with c entries
    above its threshold needs at most c rounds, since each entry that enters only raises it.
    Ties keep the running entry (a lower latent id) and take the lowest block column first."""
    tb, kp = run_v.shape
    blk = pre.shape[1]
    col_r = lax.broadcasted_iota(jnp.int32, (tb, kp), 1)
    col_b = lax.broadcasted_iota(jnp.int32, (tb, blk), 1)
    big = jnp.int32(2**30)
    thr = jnp.min(run_v, axis=1, keepdims=True)
    count = jnp.sum((pre > thr).astype(jnp.int32), axis=1, keepdims=True)
    rounds = jnp.minimum(jnp.max(count), k)

    def one_round(_, carry):
        run_v, run_i, pre = carry
        m_b = jnp.max(pre, axis=1, keepdims=True)
        p_b = jnp.min(jnp.where(pre == m_b, col_b, big), axis=1, keepdims=True)
        m_r = jnp.min(run_v, axis=1, keepdims=True)
        p_r = jnp.min(jnp.where(run_v == m_r, col_r, big), axis=1, keepdims=True)
        put = (m_b > m_r) & (col_r == p_r)
        run_v = jnp.where(put, m_b, run_v)
        run_i = jnp.where(put, p_b + start, run_i)
        pre = jnp.where(col_b == p_b, NEG, pre)
        return run_v, run_i, pre

    run_v, run_i, _ = lax.fori_loop(0, rounds, one_round, (run_v, run_i, pre))
    return run_v, run_i


def _init_slots(shape, k: int):
    """Running slots: -inf in the k real ones, +inf in the padding (never the minimum)."""
    col = lax.broadcasted_iota(jnp.int32, shape, 1)
    return jnp.where(col < k, NEG, jnp.inf).astype(jnp.float32), jnp.zeros(shape, jnp.int32)


def gated_rounds(pre, k: int, row_tile: int, block: int):
    """The gated merge's trip count for every (row tile, latent block) of `pre [B, S]`, [B / tb,
    S / block] int32, and the ungated merge's (k per block): what the kernels run, computed
    without them (pure JAX) to measure the gate on real activations."""
    B, S = pre.shape
    tiles = pre.reshape(B // row_tile, row_tile, S // block, block).transpose(2, 0, 1, 3)  # [nb, nt, tb, blk]

    def step(run, blk):  # run: the exact running top-k values [nt, tb, k]
        thr = jnp.min(run, axis=-1, keepdims=True)
        count = jnp.sum(blk > thr, axis=-1)
        rounds = jnp.minimum(jnp.max(count, axis=-1), k)
        run = lax.top_k(jnp.concatenate([run, blk], axis=-1), k)[0]
        return run, rounds

    run0 = jnp.full((B // row_tile, row_tile, k), NEG, jnp.float32)
    _, rounds = lax.scan(step, run0, tiles.astype(jnp.float32))
    return rounds.T, jnp.full((B // row_tile, S // block), k, jnp.int32)


def _tpu_kernel(x_ref, w_ref, *refs, ks: tuple[int, ...], block: int):
    """Grid (row tile, latent block): one matmul per block, then a gated merge per bias variant
    (the TopK bias, and AuxK's, -inf on live latents) into its own running slots."""
    n = len(ks)
    b_refs, outs = refs[:n], refs[n:]
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        for t, k in enumerate(ks):
            outs[2 * t][...], outs[2 * t + 1][...] = _init_slots(outs[2 * t].shape, k)

    pre = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)
    for t, k in enumerate(ks):
        v, i = gated_merge(outs[2 * t][...], outs[2 * t + 1][...], pre + b_refs[t][...].astype(jnp.float32), j * block, k)
        outs[2 * t][...] = v
        outs[2 * t + 1][...] = i


def _gpu_kernel(x_ref, w_ref, *refs, ks: tuple[int, ...], block: int, n_blocks: int, d_chunk: int, n_chunks: int):
    n = len(ks)
    b_refs, outs = refs[:n], refs[n:]
    tb = x_ref.shape[0]

    def one_block(j, carry):
        start = j * block

        def mm(c, acc):
            xs = x_ref[:, pl.ds(c * d_chunk, d_chunk)]
            ws = w_ref[pl.ds(c * d_chunk, d_chunk), pl.ds(start, block)]
            return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32)

        pre = lax.fori_loop(0, n_chunks, mm, jnp.zeros((tb, block), jnp.float32))
        return tuple(
            gated_merge(*carry[t], pre + b_refs[t][:, pl.ds(start, block)].astype(jnp.float32), start, k) for t, k in enumerate(ks)
        )

    init = tuple(_init_slots(outs[2 * t].shape, k) for t, k in enumerate(ks))
    final = lax.fori_loop(0, n_blocks, one_block, init)
    for t in range(n):
        outs[2 * t][...], outs[2 * t + 1][...] = final[t]


# the platform a program is being compiled for, where it is not this process's backend
# (deviceless ahead-of-time compilation for a TPU topology or GPU target: `compile_check`)
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("sae_jax_pallas_target", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
    """Lower the kernels for `platform` ('tpu' / 'gpu') with its real compiler, not in interpret mode."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    return _TARGET.get() or jax.default_backend()


def _interpret(backend: str, target: str):
    if target == backend:
        return False
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan")
    return True


def _pad(a, axis, mult, value=0.0):
    n = a.shape[axis]
    extra = -n % mult
    if not extra:
        return a
    pads = [(0, 0)] * a.ndim
    pads[axis] = (0, extra)
    return jnp.pad(a, pads, constant_values=value)


def _slots(k: int, backend: str) -> int:
    """Running slots for k winners: TPU vregs hold 128 lanes; Triton wants powers of two."""
    return -(-k // 128) * 128 if backend == "tpu" else _pow2(k)


VMEM_LIMIT = 64 * 2**20  # scoped VMEM the TPU kernel may use (v5e/v6e have 128 MiB, v5p 95; the default scope is 16-32)


@functools.partial(jax.jit, static_argnames=("ks", "encoder_block", "backend", "row_tile", "d_chunk", "target"))
def _fused(x, w, biases, *, ks: tuple[int, ...], encoder_block: int, backend: str, row_tile: int = 0, d_chunk: int = 64, target: str = ""):
    """[(values [B, k], ids [B, k]) per bias]: one pass over the latents, the matmul once."""
    rows, d = x.shape
    s = w.shape[1]
    kps = tuple(_slots(k, backend) for k in ks)
    # tiles sized for the hardware: a GPU program holds a [tb, block] f32 tile in registers /
    # shared memory (64 x 128); a TPU step a [tb, block] VMEM tile (lanes of 128, 8-row sublanes),
    # with tb rows sharing each streamed W block (tb FLOPs per byte of W in bf16)
    block = _pow2(min(encoder_block, MAX_BLOCK[backend], max(s, 1)))  # the tile's width: the knob, capped
    block = max(block, 128 if backend == "tpu" else 16)
    tb = row_tile or max(min(ROW_TILE[backend], _pow2(rows)), 8)
    xp = _pad(x, 0, tb)
    wp = _pad(w, 1, block)
    bps = [_pad(b.reshape(1, -1), 1, block, NEG) for b in biases]
    n_rows, n_blocks = xp.shape[0] // tb, wp.shape[1] // block
    # what XLA sees of the kernel (its scheduler and cost_analysis): the matmul, and W read once per row tile
    cost = pl.CostEstimate(
        flops=2 * xp.shape[0] * d * wp.shape[1],
        transcendentals=0,
        bytes_accessed=n_rows * wp.size * wp.dtype.itemsize + xp.size * xp.dtype.itemsize + sum(2 * xp.shape[0] * kp * 4 for kp in kps),
    )
    out_shape = []
    for kp in kps:
        out_shape += [jax.ShapeDtypeStruct((xp.shape[0], kp), jnp.float32), jax.ShapeDtypeStruct((xp.shape[0], kp), jnp.int32)]
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        outs = pl.pallas_call(
            functools.partial(_tpu_kernel, ks=ks, block=block),
            grid=(n_rows, n_blocks),
            in_specs=[pl.BlockSpec((tb, d), lambda r, j: (r, 0)), pl.BlockSpec((d, block), lambda r, j: (0, j))]
            + [pl.BlockSpec((1, block), lambda r, j: (0, j)) for _ in biases],
            out_specs=[pl.BlockSpec((tb, kp), lambda r, j: (r, 0)) for kp in kps for _ in (0, 1)],
            out_shape=out_shape,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=VMEM_LIMIT),
            cost_estimate=cost,
            interpret=_interpret("tpu", target),
        )(xp, wp, *bps)
    else:
        dc = _pow2(min(d_chunk, d))
        xp = _pad(xp, 1, dc)
        wp = _pad(wp, 0, dc)
        n_chunks = xp.shape[1] // dc
        outs = pl.pallas_call(
            functools.partial(_gpu_kernel, ks=ks, block=block, n_blocks=n_blocks, d_chunk=dc, n_chunks=n_chunks),
            grid=(n_rows,),
            in_specs=[pl.BlockSpec((tb, xp.shape[1]), lambda r: (r, 0)), pl.BlockSpec(wp.shape, lambda r: (0, 0))]
            + [pl.BlockSpec(b.shape, lambda r: (0, 0)) for b in bps],
            out_specs=[pl.BlockSpec((tb, kp), lambda r: (r, 0)) for kp in kps for _ in (0, 1)],
            out_shape=out_shape,
            cost_estimate=cost,
            interpret=_interpret("gpu", target),
        )(xp, wp, *bps)
    return [_ordered(outs[2 * t][:rows, :k], outs[2 * t + 1][:rows, :k]) for t, k in enumerate(ks)]


def _ordered(v, i):
    """The k winners in lax.top_k's order: value descending, then latent id ascending (once, at the end)."""
    neg_v, i = lax.sort((-v, i), num_keys=2)
    return -neg_v, i


def topk_candidates(x, w, biases, ks, encoder_block: int, backend: str):
    """[(values [B, k], indices [B, k]) per bias, k from `ks`]: one fused pass (AuxK's selection
    shares the TopK matmul and keeps its own slot count)."""
    return _fused(x, w, tuple(biases), ks=tuple(ks), encoder_block=encoder_block, backend=backend, target=target_platform())


def _transpose_tile(n: int) -> int:
    """A tile edge for `transpose`: the largest of 512, 384, 256, 128 dividing n, else n (a whole axis)."""
    return next((t for t in (512, 384, 256, 128) if n % t == 0), n)


def _transpose_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...].T


def transpose(a):
    """[M, n, d] -> [M, d, n] by a Pallas (Mosaic) TPU kernel, tile by tile in VMEM.

    What it is for: a custom call's operands and results keep the layouts they are given, so
    libtpu's layout assignment cannot turn this transpose into a free relabelling of `a`'s layout
    and then make `a`'s producer write it transposed, which for a block sliced from a
    parameter-sized array is a transposed copy of the whole array (`train.update`). Elsewhere
    than on TPU, `jnp.swapaxes`."""
    if target_platform() != "tpu":
        return jnp.swapaxes(a, 1, 2)
    return _transpose_tpu(a, _interpret("tpu", target_platform()))


def _transpose_tpu(a, interpret):
    from jax.experimental.pallas import tpu as pltpu

    m, n, d = a.shape
    tn, td = _transpose_tile(n), _transpose_tile(d)
    return pl.pallas_call(
        _transpose_kernel,
        grid=(m, n // tn, d // td),
        in_specs=[pl.BlockSpec((pl.squeezed, tn, td), lambda b, i, j: (b, i, j))],
        out_specs=pl.BlockSpec((pl.squeezed, td, tn), lambda b, i, j: (b, j, i)),
        out_shape=jax.ShapeDtypeStruct((m, d, n), a.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret,
    )(a)
