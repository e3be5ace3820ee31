"""TopK encoders that never build the dense [batch, d_sae] pre-activation, with a sparse backward.

`topk_pre(x, w, b, k)` returns the k largest pre-activations `x @ w + b` per row, descending, and
their latent indices. Implementations (`encoder=`):

| encoder     | what                                                                        |
| ----------- | --------------------------------------------------------------------------- |
| `dense`     | the reference: `lax.top_k(x @ w + b)`; builds [B, d_sae] (tests, small widths) |
| `stream`    | XLA: a scan over latent blocks of `encoder_block` columns, merging a running top-k; peak memory [B, encoder_block] |
| `rows`      | XLA: a map over row blocks, each a dense [R, d_sae] block (R x d_sae <= 2^25) and its top-k; on a CPU the block stays in cache and the step runs at the matmul's speed |
| `pallas_gpu`| Pallas (Triton) kernel: block matmul + bias + per-block top-k candidates fused (`kernels.pallas`) |
| `pallas_tpu`| Pallas (Mosaic) kernel, the same on TPU                                      |
| `auto`      | `pallas_tpu` on TPU; `rows` on GPU (blocks of up to 2^29 pre-activations: cuBLAS + the tournament top-k of `kernels.select`, W streamed a few times per step); elsewhere `rows` where a block of at least 128 rows fits, else `stream` |

On a CPU the XLA paths (`dense`, `stream`, `rows`) hand the row selection, the sparse decode
and the sparse backward's gathers and scatters to native kernels (`kernels.native`: C++ through
the XLA FFI, built on first use, both cores, summed in cache) where they could be built, and
use the XLA forms below where not: the same selections, sums equal to float32 rounding.

Every implementation shares one custom VJP: only the k selected pre-activations of a row get
gradient. With g [B, k] the cotangent of the values:

    dx = sum_s g[:, s] * w[:, idx[:, s]]         (a gather of k columns per row, slot by slot)
    dw[:, j] = sum_{(r, s): idx[r, s] = j} g[r, s] * x[r]   (a scatter-add of rows into w^T)
    db[j] = sum_{(r, s): idx[r, s] = j} g[r, s]

so the backward costs O(B k d_in) instead of the dense O(B d_sae d_in). The scatter-adds (here and
in `sparse_decode`'s backward) and the decoder's gather-dot visit the slots sorted by latent
(`sort_slots`, stable: each latent's sum keeps slot order), so the [width, d] tables are written
and read row after row, not at random, when the table is larger than a CPU's caches
(`latent_order`); smaller tables are walked in row order. `aux_b` adds a second
selection in the same pass (AuxK over dead latents: `b` replaced by `aux_b`, typically -inf for
live latents), sharing the matmul.

`topk_encode(x, W_enc, b_enc, k)` is the public form: (relu(values), indices).
"""

from __future__ import annotations

import dataclasses
import functools
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

# imported with this module, not when a step is first traced: importing Pallas defines jax config
# options, and a jitted step traced before that has another tracing context than its next call,
# which then traces and compiles the whole step again
from sae_jax.kernels import native, pallas
from sae_jax.kernels.pallas import target_platform
from sae_jax.kernels.select import tree_top_k, tree_top_ks

ENCODERS = ("auto", "dense", "stream", "rows", "pallas_gpu", "pallas_tpu")
ENCODER_DTYPES = ("auto", "float32", "bfloat16")


def _configured(name: str):
    from sae_jax.config import default

    return default(f"train.{name}")


@dataclasses.dataclass(frozen=True)
class EncoderOptions:
    """How the TopK encoder runs, as one value from the settings down to the kernels: the
    implementation (`train.encoder`), latents per streamed block (`train.encoder_block`) and the
    matmul's input dtype (`train.encoder_dtype`). A field left out takes its default from
    `sae_jax/config.py`. Hashable: it is a static argument of the jitted and custom-VJP functions.
    `resolved(rows, width)` is what `auto` means for a [rows, width] selection on this platform."""

    encoder: str = dataclasses.field(default_factory=lambda: _configured("encoder"))
    block: int = dataclasses.field(default_factory=lambda: _configured("encoder_block"))
    dtype: str = dataclasses.field(default_factory=lambda: _configured("encoder_dtype"))

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown TopK encoder implementation {self.encoder!r} (choose from {', '.join(ENCODERS)})")
        if self.dtype not in ENCODER_DTYPES:
            raise ValueError(f"unknown encoder dtype {self.dtype!r} (choose from {', '.join(ENCODER_DTYPES)})")
        if not (isinstance(self.block, int) and self.block >= 1):
            raise ValueError(f"encoder block {self.block!r}: must be a positive number of latents")

    def resolved(self, rows: int = 0, width: int = 0) -> EncoderOptions:
        """The implementation and dtype `auto` stands for here (`resolve_encoder`, `resolve_encoder_dtype`)."""
        return dataclasses.replace(self, encoder=resolve_encoder(self.encoder, rows, width), dtype=resolve_encoder_dtype(self.dtype))

    @property
    def cast(self) -> str | None:
        """The dtype the matmul's inputs are cast to; None for float32 (no cast)."""
        return None if self.dtype == "float32" else self.dtype


ROWS_BUDGET = 2**25  # `rows`: elements of one [R, d_sae] pre-activation block (128 MiB in float32)
ROWS_MAX = 1024  # `rows`: rows per block at most (the fastest on CPU; docs/benchmarks.md)
MIN_ROWS = 128  # `auto` streams over latents when fewer rows than this fit the budget


SLOTS_BUDGET = 2**21  # the sparse decode / backward: elements of one [R, k, d] block of gathered rows (8 MiB)
# `scatter_rows` / `gather_dots`: elements of one [n, d] block of the sorted slots' rows (4 MiB:
# larger blocks leave a CPU's cache)
SORTED_BUDGET = 2**20
# `latent_order`: [width, d] tables of at least this many elements (16 MiB in float32) are
# walked in latent order (where sorting the slots starts to pay; docs/benchmarks.md)
LATENT_ORDER_MIN = 2**22


# On a GPU each scan iteration is a kernel launch, and a carry laid out for its consumer may be
# transposed every iteration: there the gathered decoder rows take 512 MiB blocks, and the sorted
# slots' scatter-adds and gather-dots run whole (XLA fuses the gathers into them; what the CPU
# budgets cost in the compiled H100 step: docs/benchmarks.md, "The GPU step read from its compiled HLO")
GPU_SLOTS_BUDGET = 2**27
GPU_SORTED_BUDGET = 2**34


def _slots_budget() -> int:
    return GPU_SLOTS_BUDGET if target_platform() == "gpu" else SLOTS_BUDGET


def _sorted_budget() -> int:
    return GPU_SORTED_BUDGET if target_platform() == "gpu" else SORTED_BUDGET


# `rows` on a GPU: blocks of up to 2^29 pre-activations (2 GiB in float32; HBM holds them) so that
# W streams from HBM a few times per step, not once per 1024 rows
GPU_ROWS_BUDGET, GPU_ROWS_MAX = 2**29, 16384
# the Triton kernel keeps a row tile's slots in registers: an AuxK selection wider than this runs
# on the XLA path beside it (see `_forward`)
TRITON_MAX_SLOTS = 256


def row_block(rows: int, width: int, budget: int = ROWS_BUDGET, rows_max: int = ROWS_MAX) -> int:
    """A block of rows: the largest divisor of `rows` up to rows_max with block x width <= budget (at least 1)."""
    cap = max(1, min(rows, rows_max, budget // max(width, 1)))
    return next(r for r in range(cap, 0, -1) if rows % r == 0)


def resolve_encoder(encoder: str, rows: int = 0, width: int = 0) -> str:
    """The implementation `encoder` names; `auto` by backend and, on CPU, by the shape [rows, width]."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown TopK encoder implementation {encoder!r} (choose from {', '.join(ENCODERS)})")
    if encoder != "auto":
        return encoder
    backend = target_platform()
    if backend == "tpu":
        return "pallas_tpu"
    if backend == "gpu":  # cuBLAS + the tournament top-k in large row blocks (benchmarks/roofline.py)
        return "rows"
    if rows <= 0 or width <= 0:
        return "stream"
    return "rows" if row_block(rows, width) >= min(MIN_ROWS, rows) else "stream"


@functools.cache
def host_bf16_dot() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX-BF16, from
    /proc/cpuinfo's flags; False where there is no such file)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


# `auto` on a CPU that has bf16 dot instructions: the probe's matmul [rows, d] x [d, width], and how
# much faster bfloat16 must run to be chosen (at most 0.95 of float32's time): having the
# instructions does not make bf16 faster on every CPU (docs/design.md, "Encoder matmul dtype")
PROBE_SHAPE = (1024, 512, 4096)
BF16_MARGIN = 0.95


@functools.cache
def host_bf16_faster() -> bool:
    """Whether XLA's bfloat16 encoder matmul (inputs cast from float32, float32 accumulation) runs
    faster than its float32 one on this CPU: False without `host_bf16_dot`, else timed once per
    process on `PROBE_SHAPE` (7 interleaved runs each, ~0.4 s); bfloat16's fastest run must take
    at most `BF16_MARGIN` of float32's fastest. The fastest, not the median: on a busy machine
    another process's work lands on some runs, and a median of 5 once picked bf16 where it is
    1.2x slower (docs/design.md, "Encoder matmul dtype")."""
    if not host_bf16_dot():
        return False
    import time

    import numpy as np

    with jax.ensure_compile_time_eval():  # run now, also when first asked while a step is traced
        rows, d, width = PROBE_SHAPE
        cpu = jax.devices("cpu")[0]
        rng = np.random.default_rng(0)
        x = jax.device_put(rng.standard_normal((rows, d), np.float32), cpu)
        w = jax.device_put(rng.standard_normal((d, width), np.float32) / np.sqrt(d), cpu)
        fns = {
            dt: jax.jit(lambda a, b, dt=dt: jnp.dot(a.astype(dt), b.astype(dt), preferred_element_type=jnp.float32))
            for dt in (jnp.float32, jnp.bfloat16)
        }
        times = {dt: [] for dt in fns}
        for f in fns.values():
            f(x, w).block_until_ready()
        for _ in range(7):
            for dt, f in fns.items():
                t0 = time.perf_counter()
                f(x, w).block_until_ready()
                times[dt].append(time.perf_counter() - t0)
    return min(times[jnp.bfloat16]) <= BF16_MARGIN * min(times[jnp.float32])


def resolve_encoder_dtype(encoder_dtype: str) -> str:
    """The TopK encoder matmul's input dtype, 'float32' or 'bfloat16'; `auto` is bfloat16 where the
    platform multiplies it natively and faster (TPU, GPU, a CPU where `host_bf16_faster`) and
    float32 elsewhere. Accumulation is float32 either way, and the sparse backward reads the
    float32 inputs, so only the selection and the selected values see the rounding (its cost in
    FVU: docs/benchmarks.md). A training run records what `auto` chose on a CPU and keeps it when
    resumed there (`train.loop`), so that a resumed run computes what the first process did."""
    if encoder_dtype not in ENCODER_DTYPES:
        raise ValueError(f"unknown encoder dtype {encoder_dtype!r} (choose from {', '.join(ENCODER_DTYPES)})")
    if encoder_dtype != "auto":
        return encoder_dtype
    platform = target_platform()
    return "bfloat16" if platform in ("tpu", "gpu") or (platform == "cpu" and host_bf16_faster()) else "float32"


def row_top_k(pre, k: int, group: int = 0, bias=None):
    """`lax.top_k(pre + bias, k)` over the last axis of a [B, S] block, by way of group maxima: the k
    largest entries of a row lie in the k groups (of `group` consecutive columns) with the largest
    maxima (an entry outside them is beaten by k group maxima), so the top k of those k x group
    candidates is exact. The same values in the same (descending) order as `lax.top_k`; among
    tied values the indices may differ. XLA:CPU's top_k costs several ns per element and this
    replaces it with a max-reduction and two top_ks over S / group and k x group entries.
    `group` 0 picks the largest of 16, 8, 4 that leaves at least 4 k groups (AuxK's k of a few
    hundred takes 8 or 4); rows too short for any go to `lax.top_k` directly. `bias [S]` is added
    where it is read (the group maxima, the gathered candidates), so pre + bias is never written
    out."""
    rows, s = pre.shape
    if not group:
        group = next((g for g in (16, 8, 4) if s % g == 0 and s // g >= 4 * k), 0)
    if not group or s % group or s // group < 4 * k:
        return lax.top_k(pre if bias is None else pre + bias, k)
    g = pre.reshape(rows, s // group, group)
    gb = None if bias is None else jnp.asarray(bias).reshape(s // group, group)
    _, gi = lax.top_k((g if gb is None else g + gb).max(axis=-1), k)  # [B, k] the groups holding the top k
    cand = jnp.take_along_axis(g, gi[:, :, None], axis=1)
    if gb is not None:
        cand = cand + gb[gi]
    v, p = lax.top_k(cand.reshape(rows, k * group), k)
    return v, jnp.take_along_axis(gi, p // group, axis=1) * group + p % group


def select_top_k(pre, k: int, bias=None):
    """The k largest `pre + bias` per row of [B, S], descending, and their indices: on a CPU the
    native kernel (`kernels.native`: both cores, two vectorised passes a row, where XLA's TopK
    runs on one thread) where it could be built; on a GPU `select.tree_top_k` (XLA:GPU sorts the
    whole row for a wide `top_k`; the tournament sorts k x 16 candidates a level); else
    `row_top_k`. The same values every way; among tied values `row_top_k`'s indices may differ."""
    if _native():
        return native.top_k(pre, k, bias)
    if target_platform() == "gpu":
        return tree_top_k(pre, k, bias)
    return row_top_k(pre, k, bias=bias)


def grads_latent_major() -> bool:
    """Whether the sparse backward (`_sparse_grads`) builds an encoder's dw latent-major (as dw^T,
    [S, d], then transposed): everywhere but where the native CPU kernels write it [d, S]."""
    return not _native()


def _native() -> bool:
    """Whether this trace targets a CPU on which the native kernels (`kernels.native`) are built."""
    return target_platform() == "cpu" and native.available()


def _merge(v, i, bv, bi, k):
    """Top k of the union of (v, i) and a block's candidates (bv, bi)."""
    allv = jnp.concatenate([v, bv], axis=-1)
    alli = jnp.concatenate([i, bi], axis=-1)
    top, pos = lax.top_k(allv, k)
    return top, jnp.take_along_axis(alli, pos, axis=-1)


def _dense(x, w, biases, ks, encoder_dtype=None):
    pre = jnp.dot(x, w if encoder_dtype is None else w.astype(encoder_dtype), preferred_element_type=jnp.float32)
    if target_platform() == "gpu":  # the main and AuxK selections read the block once, together
        return tree_top_ks(pre, [b.astype(jnp.float32) for b in biases], ks)
    out = []
    for b, k in zip(biases, ks, strict=True):
        v, i = select_top_k(pre, k, bias=b.astype(jnp.float32))
        out.append((v, i.astype(jnp.int32)))
    return out


def _stream(x, w, biases, ks, encoder_block, encoder_dtype=None):
    """Scan over latent blocks; each keeps the running top-k of every bias variant (its own k)."""
    d, s = w.shape
    block = min(encoder_block, s)
    n_full, tail = divmod(s, block)
    rows = x.shape[0]
    init = [(jnp.full((rows, k), -jnp.inf, jnp.float32), jnp.zeros((rows, k), jnp.int32)) for k in ks]

    def blk(carry, start, width):
        wb = lax.dynamic_slice_in_dim(w, start, width, axis=1)
        pre = jnp.dot(x, wb if encoder_dtype is None else wb.astype(encoder_dtype), preferred_element_type=jnp.float32)
        out = []
        for (v, i), b, k in zip(carry, biases, ks, strict=True):
            bv, bi = select_top_k(pre, min(k, width), lax.dynamic_slice_in_dim(b, start, width).astype(jnp.float32))
            out.append(_merge(v, i, bv, bi.astype(jnp.int32) + start, k))
        return out

    def body(carry, j):
        return blk(carry, j * block, block), None

    carry, _ = lax.scan(body, init, jnp.arange(n_full, dtype=jnp.int32))
    if tail:
        carry = blk(carry, n_full * block, tail)
    return carry


def _rows(x, w, biases, ks, encoder_dtype=None):
    """A map over blocks of rows: each block's dense pre-activations and their top-k (exact, no merge)."""
    rows, d = x.shape
    gpu = target_platform() == "gpu"
    r = row_block(rows, w.shape[1], *((GPU_ROWS_BUDGET, GPU_ROWS_MAX) if gpu else (ROWS_BUDGET, ROWS_MAX)))
    out = lax.map(lambda xb: _dense(xb, w, biases, ks, encoder_dtype), x.reshape(rows // r, r, d))
    return [(v.reshape(rows, -1), i.reshape(rows, -1)) for v, i in out]


def _forward(x, w, biases, ks, opts: EncoderOptions):
    """[(values, ids) per bias, its k from `ks`] (the Pallas kernels may return more; callers slice).
    `opts`: resolved (`EncoderOptions.resolved`); its `cast` is the matmul's input dtype (None: as
    given); accumulation is always float32. Each bias is selected at its own k: AuxK's few hundred
    would otherwise make the main selection a top-k_aux too (on CPU that doubled an AuxK step's
    selection time)."""
    encoder, encoder_block, encoder_dtype = opts.encoder, opts.block, opts.cast
    if encoder_dtype is not None:
        x = x.astype(encoder_dtype)
    if encoder == "dense":
        return _dense(x, w, biases, ks, encoder_dtype)
    if encoder == "rows":  # w cast once, not once per row block
        return _rows(x, w if encoder_dtype is None else w.astype(encoder_dtype), biases, ks)
    if encoder == "stream":
        return _stream(x, w, biases, ks, encoder_block, encoder_dtype)
    if encoder in ("pallas_gpu", "pallas_tpu"):
        w = w if encoder_dtype is None else w.astype(encoder_dtype)
        if encoder == "pallas_gpu" and len(ks) > 1 and ks[1] > TRITON_MAX_SLOTS:
            head = pallas.topk_candidates(x, w, biases[:1], ks[:1], encoder_block, backend="gpu")
            return head + _stream(x, w, biases[1:], ks[1:], encoder_block, encoder_dtype)
        return pallas.topk_candidates(x, w, biases, ks, encoder_block, backend=encoder.removeprefix("pallas_"))
    raise ValueError(f"unknown TopK encoder implementation {encoder!r}")


def _blocks(*arrays, r: int):
    """[B, ...] arrays as [B / r, r, ...] for a scan over blocks of r rows."""
    return tuple(a.reshape((a.shape[0] // r, r) + a.shape[1:]) for a in arrays)


def sort_slots(idx):
    """The B*K slots of idx [B, K] sorted by latent (stable): (latents, rows, order), each [B*K]
    int32, order the slots' flat positions. The sparse backward's scatter-adds and gathers walk
    the slots in this order, so that the [width, d] table is read or written row after row."""
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    return flat[order], order // idx.shape[1], order


def _slot_block(slots: int, d: int) -> int:
    return row_block(slots, d, _sorted_budget(), slots)


def latent_order(width: int, d: int) -> bool:
    """Whether the backward walks the slots in latent order: when the [width, d] table outgrows a
    CPU's caches (`LATENT_ORDER_MIN` elements). Below, the sort costs more than it saves (d 256,
    4,096 latents, k 8, B 1024: the step 12% slower sorted; 2^13 and 2^14 latents at d 576:
    6-10% faster)."""
    return width * d >= LATENT_ORDER_MIN


def scatter_rows(src, coef, idx, width: int, slots=None, init=None):
    """out[j] = sum over slots (r, s) with idx[r, s] = j of coef[r, s] * src[r]: [width, d] float32.

    src [B, d], coef and idx [B, K]. With `slots` (`sort_slots(idx)`) the slots are taken in
    latent order in blocks of `SORTED_BUDGET` elements whose updates (coef x gathered src rows)
    are built in cache; without, in row order, blocks of rows (SLOTS_BUDGET). Either way each
    latent's terms are summed in slot order. `init` ([width, d] float32): add into it instead of
    zeros (one accumulator for several sets of slots)."""
    d = src.shape[1]
    src = src.astype(jnp.float32)
    zeros = jnp.zeros((width, d), jnp.float32) if init is None else init
    if slots is None:
        rows, kk = idx.shape

        def rblk(out, a):
            sb, cb, ib = a
            upd = cb.astype(jnp.float32)[..., None] * sb[:, None, :]  # [R, K, d]
            return out.at[ib.reshape(-1)].add(upd.reshape(-1, d)), None

        return lax.scan(rblk, zeros, _blocks(src, coef, idx, r=row_block(rows, kk * d, _slots_budget())))[0]
    lat, rows, order = slots
    n = _slot_block(lat.shape[0], d)

    def blk(out, a):
        lb, rb, cb = a
        return out.at[lb].add(cb[:, None] * src[rb], indices_are_sorted=True), None

    parts = (lat, rows, coef.reshape(-1)[order].astype(jnp.float32))
    return lax.scan(blk, zeros, tuple(p.reshape(-1, n) for p in parts))[0]


def gather_dots(table, src, idx, slots=None):
    """out[r, s] = <table[idx[r, s]], src[r]>: [B, K] float32 (table [width, d], src [B, d]),
    the table's rows read in latent order with `slots`, else in row order (as `scatter_rows`).
    On a GPU in row order always, by groups of slots (`_gpu_slot_groups`): one kernel per group
    reads its gathered rows and each src row once, where the latent order reads a src row per slot
    (for an H100 at k 64, 2^16 latents, d 2304: 5.1 GB moved instead of 9.7)."""
    if target_platform() == "gpu":
        (ids,) = _gpu_slot_groups(idx)
        src = src.astype(jnp.float32)

        def group(_, ib):
            return None, jnp.sum(table[ib].astype(jnp.float32) * src[:, None, :], axis=-1)

        _, out = lax.scan(group, None, ids)  # [G, B, c]
        return out.transpose(1, 0, 2).reshape(idx.shape[0], -1)[:, : idx.shape[1]]
    if slots is None:
        rows, kk = idx.shape

        def rblk(_, a):
            ib, sb = a
            return None, jnp.einsum("rd,rkd->rk", sb.astype(jnp.float32), table[ib].astype(jnp.float32))

        _, out = lax.scan(rblk, None, _blocks(idx, src, r=row_block(rows, kk * src.shape[1], _slots_budget())))
        return out.reshape(idx.shape)
    lat, rows, order = slots
    n = _slot_block(lat.shape[0], src.shape[1])

    def blk(_, a):
        lb, rb = a
        return None, jnp.einsum("nd,nd->n", table[lb].astype(jnp.float32), src[rb].astype(jnp.float32))

    _, dots = lax.scan(blk, None, (lat.reshape(-1, n), rows.reshape(-1, n)))
    return jnp.zeros(lat.shape, jnp.float32).at[order].set(dots.reshape(-1), unique_indices=True).reshape(idx.shape)


def _sparse_grads(x, w, idx, g, x_grad: bool = True, shift=None):
    """(dx, dw, db) from the cotangents g [B, K] of the pre-activations at idx [B, K]; dx is None
    unless `x_grad` (it costs a gather of k rows of w per row: a scan over blocks of rows, R from
    SLOTS_BUDGET). dw is `scatter_rows` into w^T. `shift` ([d], `topk_pre`'s `b_shift`): the
    pre-activations were (x - shift) @ w + b, and dw has the dense term -shift (x) db too, which
    is the scatter's starting value (one [S, d] buffer, written in place)."""
    s = w.shape[1]
    db = jnp.zeros((s,), jnp.float32).at[idx.reshape(-1)].add(g.reshape(-1).astype(jnp.float32))
    if _native():  # each row / latent summed in cache, dw^T written transposed, no sort
        dx = native.gather_sum(g, idx, w.T).astype(x.dtype) if x_grad else None
        dw = native.scatter_rows(x, g, idx, s, transposed=True)
        if shift is not None:
            dw = dw - shift.astype(jnp.float32)[:, None] * db[None, :]
        return dx, dw.astype(w.dtype), db
    dx = None
    if x_grad and target_platform() == "gpu":
        dx = gather_sum(g, idx, w.T).astype(x.dtype)
    elif x_grad:
        rows, kk = idx.shape
        wt = w.T  # [S, d]: rows are gathered contiguously

        def blk(_, a):
            gb, ib = a
            return None, jnp.einsum("rk,rkd->rd", gb.astype(jnp.float32), wt[ib].astype(jnp.float32))

        _, dx = lax.scan(blk, None, _blocks(g, idx, r=row_block(rows, kk * x.shape[1], _slots_budget())))
        dx = dx.reshape(x.shape).astype(x.dtype)
    slots = sort_slots(idx) if latent_order(s, x.shape[1]) else None
    init = None if shift is None else -db[:, None] * shift.astype(jnp.float32)[None, :]
    return dx, scatter_rows(x, g, idx, s, slots, init=init).T.astype(w.dtype), db


def _shifted(b, w, shift):
    """b - shift @ w ([S]): the bias of (x - shift) @ w + b written as x @ w + bias."""
    return b if shift is None else b - jnp.dot(shift.astype(jnp.float32), w.astype(jnp.float32))


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _topk_pre(x, w, b, aux_b, shift, k, k_aux, opts, x_grad):
    b = _shifted(b, w, shift)
    aux_b = None if aux_b is None else _shifted(aux_b, w, shift)
    biases = (b,) if aux_b is None else (b, aux_b)
    out = _forward(x, w, biases, (k,) if aux_b is None else (k, k_aux), opts)
    (v, i) = out[0]
    v, i = v[:, :k], i[:, :k]
    if aux_b is None:
        return v, i, None, None
    av, ai = out[1]
    return v, i, av[:, :k_aux], ai[:, :k_aux]


def _fwd(x, w, b, aux_b, shift, k, k_aux, opts, x_grad):
    v, i, av, ai = _topk_pre(x, w, b, aux_b, shift, k, k_aux, opts, x_grad)
    return (v, i, av, ai), (x, w, i, ai, aux_b, shift)


def _bwd(k, k_aux, opts, x_grad, res, cts):
    x, w, i, ai, aux_b, shift = res
    gv, _, gav, _ = cts
    if aux_b is None:
        dx, dw, db = _sparse_grads(x, w, i, gv, x_grad, shift)
        dshift = None if shift is None else -jnp.dot(w.astype(jnp.float32), db).astype(shift.dtype)
        return dx, dw, db.astype(w.dtype), None, dshift
    # the two selections share x and w: one pass over both sets of slots
    idx = jnp.concatenate([i, ai], axis=1)
    g = jnp.concatenate([gv, gav], axis=1)
    dx, dw, both = _sparse_grads(x, w, idx, g, x_grad, shift)
    db = jnp.zeros((w.shape[1],), jnp.float32).at[i.reshape(-1)].add(gv.reshape(-1).astype(jnp.float32))
    dab = jnp.zeros((w.shape[1],), jnp.float32).at[ai.reshape(-1)].add(gav.reshape(-1).astype(jnp.float32))
    dshift = None if shift is None else -jnp.dot(w.astype(jnp.float32), both).astype(shift.dtype)
    return dx, dw, db, dab, dshift


_topk_pre.defvjp(_fwd, _bwd)


def topk_pre(x, w, b, k: int, *, aux_b=None, k_aux: int = 0, options: EncoderOptions | None = None, x_grad: bool = True, b_shift=None):
    """(values [B, k], indices [B, k]) of the largest `x @ w + b` per row, descending; with `aux_b`
    also (aux values [B, k_aux], aux indices) of `x @ w + aux_b`. Differentiable (sparse VJP,
    computed from the parameters as given). `options` (`EncoderOptions`; None: the config's
    defaults) picks the implementation; a bfloat16 dtype casts the matmul's inputs (w block by
    block when streaming) and accumulation stays float32. `x_grad=False`: x is data, its
    cotangent is zero (the backward skips its gather). `b_shift` ([d]): select from
    `(x - b_shift) @ w + b` (and `+ aux_b`) with x kept as data: b_shift enters as the bias
    `b - b_shift @ w` and its gradient costs a matrix-vector product, not a [B, d] dx; w's dense
    gradient term from it starts the sparse backward's accumulator."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0] or b.shape != (w.shape[1],):
        raise ValueError(f"topk_pre: x {x.shape}, w {w.shape}, b {b.shape}: expected [B, d], [d, S], [S]")
    if not 0 < k <= w.shape[1]:
        raise ValueError(f"topk_pre: k={k} must be in 1..{w.shape[1]} (the number of latents)")
    if aux_b is not None and not 0 < k_aux <= w.shape[1]:
        raise ValueError(f"topk_pre: k_aux={k_aux} must be in 1..{w.shape[1]}")
    opts = (options or EncoderOptions()).resolved(x.shape[0], w.shape[1])
    if b_shift is not None and b_shift.shape != (w.shape[0],):
        raise ValueError(f"topk_pre: b_shift {b_shift.shape}: expected [{w.shape[0]}]")
    v, i, av, ai = _topk_pre(x, w, b, aux_b, b_shift, k, k_aux, opts, x_grad)
    return (v, i) if aux_b is None else (v, i, av, ai)


def topk_encode(x, W_enc, b_enc, k: int, *, options: EncoderOptions | None = None):
    """(values, indices) of a TopK encoder on `x` (already minus b_dec): relu of the k largest
    pre-activations, without a dense [B, d_sae] matrix (except `EncoderOptions(encoder='dense')`)."""
    v, i = topk_pre(x, W_enc, b_enc, k, options=options)
    return jax.nn.relu(v), i


def sparse_decode(values, indices, w_dec):
    """sum_s values[:, s] * w_dec[indices[:, s]] -> [B, d]: a scan over blocks of rows, each
    gathering its [R, k, d] decoder rows (R from SLOTS_BUDGET, 8 MiB: in a CPU's cache), so neither a
    dense [B, d_sae] activation nor a [B, k, d] gather exists, in the forward or (custom VJP:
    nothing saved but the inputs) the backward. One set of `sparse_decode_parts`."""
    return sparse_decode_parts((values,), (indices,), w_dec)[0]


# `gather_sum` on a GPU: slots summed this many at a time, one kernel per group
GPU_SUM_SLOTS = 16


def gather_sum(values, idx, table):
    """out[r] = sum_s values[r, s] * table[idx[r, s]] -> [B, d] float32 (values, idx [B, K];
    table [width, d]), summed in slot order, for a GPU: a scan over groups of `GPU_SUM_SLOTS`
    slots, each group one kernel that reads its gathered rows once and adds them into the [B, d]
    accumulator. (The same sum written as an einsum over gathered [R, K, d] blocks compiles, for
    an H100, to a gather written out transposed and read back by a reduction: three passes over
    the gathered rows instead of one; docs/benchmarks.md, "The sparse decode and gather-dots by
    groups of slots".)"""
    vs, ids = _gpu_slot_groups(values.astype(jnp.float32), idx)

    def group(acc, a):
        vb, ib = a
        for j in range(vb.shape[1]):  # unrolled: the group's gathers fuse into one sum
            acc = acc + vb[:, j, None] * table[ib[:, j]].astype(jnp.float32)
        return acc, None

    return lax.scan(group, jnp.zeros((idx.shape[0], table.shape[1]), jnp.float32), (vs, ids))[0]


def _gpu_slot_groups(*arrays):
    """[B, K] arrays (values, indices) as [G, B, c]: groups of c = min(GPU_SUM_SLOTS, K) slots, the
    last group padded with zeros (slots of value 0 at latent 0)."""
    rows, k = arrays[0].shape
    c = min(GPU_SUM_SLOTS, k)
    return tuple(jnp.pad(a, ((0, 0), (0, -k % c))).reshape(rows, -1, c).transpose(1, 0, 2) for a in arrays)


def _decode_fwd_only(values, indices, w_dec):
    if _native():
        return native.gather_sum(values, indices, w_dec).astype(w_dec.dtype)
    if target_platform() == "gpu":
        return gather_sum(values, indices, w_dec).astype(w_dec.dtype)
    rows, k = indices.shape
    r = row_block(rows, k * w_dec.shape[1], _slots_budget())

    def blk(_, a):
        vb, ib = a
        return None, jnp.einsum("rk,rkd->rd", vb.astype(jnp.float32), w_dec[ib].astype(jnp.float32))

    _, out = lax.scan(blk, None, _blocks(values, indices, r=r))
    return out.reshape(rows, w_dec.shape[1]).astype(w_dec.dtype)


@jax.custom_vjp
def sparse_decode_parts(values: tuple, indices: tuple, w_dec) -> tuple:
    """`sparse_decode` of several (values [B, k_p], indices [B, k_p]) sets with one decoder: one
    reconstruction [B, d] per set. The backward adds every set's decoder gradient into one [S, d]
    accumulator (in set order), where a `sparse_decode` per set gives one dense gradient each,
    which autodiff then adds: a parameter-sized float32 buffer per set more (the main and AuxK
    reconstructions; Matryoshka's bands). (The native CPU kernels add per set.)"""
    return tuple(_decode_fwd_only(v, i, w_dec) for v, i in zip(values, indices, strict=True))


def _parts_fwd(values, indices, w_dec):
    return sparse_decode_parts(values, indices, w_dec), (values, indices, w_dec)


def _parts_bwd(res, gs):
    values, indices, w_dec = res
    dvs, dw = [], None
    shared = not _native()  # one accumulator (XLA)
    for v, i, g in zip(values, indices, gs, strict=True):
        if _native():
            dvs.append(native.gather_dots(w_dec, g, i).astype(v.dtype))
            part = native.scatter_rows(g, v, i, w_dec.shape[0])
        else:  # one sort of the slots for the gather and the scatter
            slots = sort_slots(i) if latent_order(*w_dec.shape) else None
            dvs.append(gather_dots(w_dec, g, i, slots).astype(v.dtype))
            part = scatter_rows(g, v, i, w_dec.shape[0], slots, init=dw if shared else None)
        dw = part if shared or dw is None else dw + part
    return tuple(dvs), tuple(None for _ in indices), dw.astype(w_dec.dtype)


sparse_decode_parts.defvjp(_parts_fwd, _parts_bwd)
