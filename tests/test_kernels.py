"""TopK encoders: every implementation equals the dense reference on awkward shapes, and the
sparse custom VJP equals dense autodiff of the reference (ReLU-clipped selections included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sae_jax.kernels.topk import EncoderOptions, topk_encode, topk_pre

# (batch, d_in, d_sae, k, block): d_sae not a multiple of the block, k bigger than a block, batch 1,
# and a width where `rows` selects through group maxima (d_sae / 16 >= 4 k)
SHAPES = [(7, 16, 100, 5, 32), (1, 8, 70, 12, 8), (33, 24, 256, 40, 64), (16, 12, 50, 50, 16), (9, 16, 1024, 6, 128)]
ENCODERS = ["stream", "rows", "pallas_gpu", "pallas_tpu"]


def _data(shape, dtype, seed=0):
    b, d, s, k, _ = shape
    kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (b, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (d, s), jnp.float32) / np.sqrt(d)).astype(dtype)
    bias = (0.5 * jax.random.normal(kb, (s,), jnp.float32) - 1.0).astype(dtype)  # ~19% of pre > 0: some rows have < k
    return x, w, bias


def _ref(x, w, b, k):
    pre = jnp.dot(x, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)
    return lax.top_k(jax.nn.relu(pre), k)


def _check_same(v, i, rv, ri, x, w, b, tol):
    np.testing.assert_allclose(np.asarray(v), np.asarray(rv), rtol=tol, atol=tol)
    # indices up to ties: the chosen latents must carry the reference's values
    pre = np.asarray(jnp.dot(x, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32))
    got = np.maximum(np.take_along_axis(pre, np.asarray(i), 1), 0)
    np.testing.assert_allclose(got, np.asarray(rv), rtol=tol, atol=tol)
    for r in range(v.shape[0]):  # no latent twice in a row
        assert len(set(np.asarray(i)[r].tolist())) == i.shape[1]


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_equals_dense_reference(encoder, shape, dtype):
    x, w, b = _data(shape, dtype)
    k, block = shape[3], shape[4]
    v, i = topk_encode(x, w, b, k, options=EncoderOptions(encoder, block, "float32"))
    rv, ri = _ref(x, w, b, k)
    assert v.shape == (shape[0], k) and i.dtype == jnp.int32
    _check_same(v, i, rv, ri, x, w, b, 1e-5 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("order", ["rows", "latents"])
@pytest.mark.parametrize("encoder", ["dense", *ENCODERS])
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_vjp_equals_dense_autodiff(encoder, shape, order, monkeypatch):
    """`order`: the backward's slots in row order (these small tables' own) or, forced, in latent order."""
    from sae_jax.kernels import topk

    monkeypatch.setattr(topk, "LATENT_ORDER_MIN", 2**62 if order == "rows" else 0)
    x, w, b = _data(shape, jnp.float32, seed=1)
    k, block = shape[3], shape[4]
    tgt = jax.random.normal(jax.random.key(9), (shape[0], k))

    def loss_ours(x, w, b):
        v, _ = topk_encode(x, w, b, k, options=EncoderOptions(encoder, block, "float32"))
        return jnp.sum((v - tgt) ** 2 * jnp.arange(1, k + 1))

    def loss_ref(x, w, b):
        v, _ = _ref(x, w, b, k)
        return jnp.sum((v - tgt) ** 2 * jnp.arange(1, k + 1))

    clipped = np.mean(np.asarray(_ref(x, w, b, k)[0]) == 0)
    if 4 * shape[3] >= shape[2]:
        assert clipped > 0  # the case where selected values are clipped by ReLU is exercised
    got = jax.grad(loss_ours, argnums=(0, 1, 2))(x, w, b)
    want = jax.grad(loss_ref, argnums=(0, 1, 2))(x, w, b)
    for g, r, name in zip(got, want, ("dx", "dW_enc", "db_enc"), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_aux_selection_shares_the_pass(encoder):
    """AuxK's top-k over dead latents (aux bias -inf on live ones) equals its dense reference, and
    the gradients of both selections together equal dense autodiff."""
    shape = (9, 16, 90, 6, 32)
    x, w, b = _data(shape, jnp.float32, seed=2)
    dead = jnp.arange(90) % 3 == 0

    def ours(x, w, b):
        v, i, av, ai = topk_pre(x, w, b, 6, aux_b=jnp.where(dead, b, -jnp.inf), k_aux=4, options=EncoderOptions(encoder, 32, "float32"))
        return jnp.sum(jax.nn.relu(v) ** 2) + jnp.sum(jax.nn.relu(av) * 3.0), (i, ai)

    def ref(x, w, b):
        pre = x @ w + b
        v, i = lax.top_k(pre, 6)
        av, ai = lax.top_k(jnp.where(dead, pre, -jnp.inf), 4)
        return jnp.sum(jax.nn.relu(v) ** 2) + jnp.sum(jax.nn.relu(av) * 3.0), (i, ai)

    (lo, (i, ai)), go = jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True)(x, w, b)
    (lr, (ri, rai)), gr = jax.value_and_grad(ref, argnums=(0, 1, 2), has_aux=True)(x, w, b)
    assert np.all(np.asarray(dead)[np.asarray(ai)])
    np.testing.assert_allclose(lo, lr, rtol=1e-5)
    for g, r in zip(go, gr, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_row_top_k_equals_lax_top_k():
    """The group-maxima top-k returns lax.top_k's values in its order, and indices that carry
    them, with ties, -inf entries (masked latents) and rows whose winners share one group; at
    each group size it picks (k 1-32: 16, 64: 8, 96: 4, AuxK-like 200: lax.top_k itself)."""
    from sae_jax.kernels.topk import row_top_k

    rng = np.random.default_rng(0)
    pre = rng.standard_normal((64, 2048)).astype(np.float32)
    pre[:8] = np.round(pre[:8], 1)  # many ties
    pre[8:16, :1900] = -np.inf  # only the last 148 latents live
    pre[16:24, 160:176] += 10.0  # the top k in one group of 16
    pre[24] = -np.inf  # a row of masked latents only
    for k in (1, 7, 32, 64, 96, 200):
        v, i = row_top_k(jnp.asarray(pre), k)
        rv, _ = lax.top_k(jnp.asarray(pre), k)
        np.testing.assert_array_equal(np.asarray(v), np.asarray(rv))
        np.testing.assert_array_equal(np.take_along_axis(pre, np.asarray(i), 1), np.asarray(rv))
        for r in range(64):
            assert len(set(np.asarray(i)[r].tolist())) == k


def test_x_grad_false_drops_only_the_input_cotangent():
    x, w, b = _data((16, 12, 512, 8, 64), jnp.float32, seed=5)

    def grads(x_grad):
        return jax.grad(
            lambda x, w, b: jnp.sum(topk_pre(x, w, b, 8, options=EncoderOptions("rows", dtype="float32"), x_grad=x_grad)[0] ** 2),
            argnums=(0, 1, 2),
        )(x, w, b)

    (dx1, dw1, db1), (dx0, dw0, db0) = grads(True), grads(False)
    np.testing.assert_array_equal(np.asarray(dw0), np.asarray(dw1))
    np.testing.assert_array_equal(np.asarray(db0), np.asarray(db1))
    assert np.abs(np.asarray(dx1)).max() > 0 and np.abs(np.asarray(dx0)).max() == 0


def test_streaming_has_no_dense_buffer():
    """The compiled streaming encoder (forward and backward) holds no [B, d_sae] buffer."""
    B, d, S, k = 1024, 16, 1 << 15, 16  # gradient buffers are [d, S]: far below [B, S]
    x = jax.ShapeDtypeStruct((B, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, S), jnp.float32)
    b = jax.ShapeDtypeStruct((S,), jnp.float32)

    def step(encoder):
        def loss(x, w, b):
            return jnp.sum(topk_encode(x, w, b, k, options=EncoderOptions(encoder, 1024, "float32"))[0])

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, w, b).compile().memory_analysis().temp_size_in_bytes

    dense, stream = step("dense"), step("stream")
    assert dense >= B * S * 4  # the reference does hold one
    assert stream < B * S * 4 / 8, (dense, stream)


def test_bad_arguments():
    x, w, b = _data((4, 8, 20, 3, 8), jnp.float32)
    with pytest.raises(ValueError, match="k=21"):
        topk_encode(x, w, b, 21)
    with pytest.raises(ValueError, match="unknown TopK encoder"):
        topk_encode(x, w, b, 3, options=EncoderOptions("cuda"))
    with pytest.raises(ValueError, match="encoder dtype 'float16'"):
        EncoderOptions(dtype="float16")
    with pytest.raises(ValueError, match="encoder block 0"):
        EncoderOptions(block=0)
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        topk_encode(x, w.T, b, 3)


@pytest.mark.parametrize("order", ["rows", "latents"])
def test_sparse_decode_and_its_vjp_equal_dense(order, monkeypatch):
    from sae_jax.kernels import topk
    from sae_jax.kernels.topk import sparse_decode

    monkeypatch.setattr(topk, "LATENT_ORDER_MIN", 2**62 if order == "rows" else 0)

    B, S, d, k = 11, 40, 6, 5
    key = jax.random.split(jax.random.key(3), 3)
    vals = jax.nn.relu(jax.random.normal(key[0], (B, k)))
    idx = jax.random.randint(key[1], (B, k), 0, S)  # repeats within a row allowed: they add up
    w = jax.random.normal(key[2], (S, d))
    tgt = jnp.arange(B * d, dtype=jnp.float32).reshape(B, d) / (B * d)

    def dense(vals, w):
        acts = jnp.zeros((B, S)).at[jnp.arange(B)[:, None], idx].add(vals)
        return acts @ w

    np.testing.assert_allclose(sparse_decode(vals, idx, w), dense(vals, w), rtol=1e-5, atol=1e-6)
    got = jax.grad(lambda v, w: jnp.sum((sparse_decode(v, idx, w) - tgt) ** 2), argnums=(0, 1))(vals, w)
    want = jax.grad(lambda v, w: jnp.sum((dense(v, w) - tgt) ** 2), argnums=(0, 1))(vals, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [5, 16, 37])
def test_gpu_gather_sum_equals_dense(k):
    """Traced for a GPU (and run here), the sparse decode and the encoder's input gradient sum
    their gathered rows by groups of slots (`topk.gather_sum`, the last group padded): the same
    as dense arithmetic, gradients included."""
    from sae_jax.kernels import pallas, topk
    from sae_jax.kernels.topk import sparse_decode

    B, S, d = 13, 70, 6
    key = jax.random.split(jax.random.key(4), 5)
    vals = jax.nn.relu(jax.random.normal(key[0], (B, k)))
    idx = jax.random.randint(key[1], (B, k), 0, S)  # repeats within a row add up
    w = jax.random.normal(key[2], (S, d))
    tgt = jax.random.normal(key[3], (B, d))

    def dense(vals, w):
        return jnp.zeros((B, S)).at[jnp.arange(B)[:, None], idx].add(vals) @ w

    want = jax.grad(lambda v, w: jnp.sum((dense(v, w) - tgt) ** 2), argnums=(0, 1))(vals, w)
    x = jax.random.normal(key[4], (B, d))
    we, be = w.T, jnp.zeros((S,))
    enc_want = jax.grad(lambda x: jnp.sum(_ref(x, we, be, k)[0] * jnp.arange(1, k + 1)))(x)
    with pallas.compiling_for("gpu"):
        assert topk.target_platform() == "gpu"
        out = jax.jit(sparse_decode)(vals, idx, w)
        got = jax.jit(jax.grad(lambda v, w: jnp.sum((sparse_decode(v, idx, w) - tgt) ** 2), argnums=(0, 1)))(vals, w)
        opts = EncoderOptions("rows", dtype="float32")
        enc_got = jax.jit(jax.grad(lambda x: jnp.sum(topk_encode(x, we, be, k, options=opts)[0] * jnp.arange(1, k + 1))))(x)
    np.testing.assert_allclose(out, dense(vals, w), rtol=1e-5, atol=1e-5)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(enc_want), 0)
    np.testing.assert_allclose(np.asarray(enc_got), np.asarray(enc_want), rtol=1e-5, atol=1e-5)


@pytest.mark.heavy
def test_sorted_scatter_and_gather_equal_dense_over_several_blocks():
    """The backward's latent-ordered scatter-add and gather-dot (`scatter_rows`, `gather_dots`)
    against dense one-hot arithmetic: slots crowded onto a few latents (long runs of one index),
    latents never selected (their rows stay zero), and more slots than one block holds."""
    from sae_jax.kernels import topk

    B, K, d, S = 600, 16, 256, 50
    assert B * K * d > 2 * topk.SORTED_BUDGET  # at least three blocks
    key = jax.random.split(jax.random.key(5), 4)
    idx = jnp.minimum(jax.random.geometric(key[0], 0.2, (B, K)) - 1, S - 11)  # latents >= S - 10 never chosen
    coef = jax.random.normal(key[1], (B, K))
    src = jax.random.normal(key[2], (B, d))
    table = jax.random.normal(key[3], (S, d))
    onehot = jax.nn.one_hot(idx, S)  # [B, K, S]
    want_rows = jnp.einsum("bks,bk,bd->sd", onehot, coef, src, precision="highest")
    want_dots = jnp.einsum("bks,sd,bd->bk", onehot, table, src, precision="highest")
    slots = topk.sort_slots(idx)
    np.testing.assert_array_equal(np.diff(np.asarray(slots[0])) >= 0, True)  # latent order
    got_rows = topk.scatter_rows(src, coef, idx, S, slots)
    np.testing.assert_allclose(np.asarray(got_rows), np.asarray(want_rows), rtol=1e-5, atol=1e-4)
    assert not np.asarray(got_rows[S - 10 :]).any()
    np.testing.assert_allclose(np.asarray(topk.gather_dots(table, src, idx, slots)), np.asarray(want_dots), rtol=1e-5, atol=1e-4)
    # without the sorted slots (tables smaller than `LATENT_ORDER_MIN`): row order, the same sums
    np.testing.assert_array_equal(np.asarray(topk.scatter_rows(src, coef, idx, S)), np.asarray(got_rows))
    np.testing.assert_allclose(np.asarray(topk.gather_dots(table, src, idx)), np.asarray(want_dots), rtol=1e-5, atol=1e-4)
    assert not topk.latent_order(4096, 256) and topk.latent_order(2**14, 576)
    # a bank vmaps them over its members (the scatter stays marked sorted): each member as alone
    two = jax.vmap(lambda s, c, i: topk.scatter_rows(s, c, i, S, topk.sort_slots(i)))(
        jnp.stack([src, -src]), jnp.stack([coef, coef]), jnp.stack([idx, S - 1 - idx])
    )
    np.testing.assert_array_equal(np.asarray(two[0]), np.asarray(got_rows))
    np.testing.assert_array_equal(
        np.asarray(two[1]), np.asarray(topk.scatter_rows(-src, coef, S - 1 - idx, S, topk.sort_slots(S - 1 - idx)))
    )


def test_train_step_memory_has_no_batch_by_latents_buffer():
    """The compiled bank train step (streaming encoder, sparse decode, AuxK branch included, over
    every dead latent or over a pool of them) holds no buffer of B x d_sae or B x k_aux x d_in
    elements; the dense encoder's step does."""
    import re

    from sae_jax import parallel
    from sae_jax.sae.bank import BankSpec
    from sae_jax.train.settings import TrainSettings
    from sae_jax.train.step import TrainStep

    n = jax.device_count()
    B, d, S, k, k_aux = 512 * n, 16, 1 << 14, 8, 8
    spec = BankSpec(("h",), (S,), (k,), d, S, k_aux, "topk")
    mesh = parallel.make_mesh(n, 1)
    B_local = B // n  # shapes in the partitioned program are per device
    x = jax.ShapeDtypeStruct((1, B, d), jnp.float32)

    def compiled(encoder, spec=spec):
        settings = TrainSettings.defaults(lr=1e-3, steps=100, warmup_steps=1, dead_tokens=100, encoder=encoder, encoder_block=1024)
        step = TrainStep(spec, mesh, settings)
        return step.lower(step.abstract_state(), x).compile()

    def sizes(c):
        return [np.prod([int(v) for v in dims.split(",")]) for dims in re.findall(r"\[([0-9,]+)\]", c.as_text()) if dims]

    stream, dense = compiled("stream"), compiled("dense")
    assert max(sizes(dense)) >= B_local * S  # the reference builds the [B, d_sae] pre-activation
    # the largest: parameter-sized (d x S) or one streamed block of pre-activations (B x 1024)
    assert max(sizes(stream)) <= max(d * S, B_local * 1024) < B_local * S / 4, max(sizes(stream))
    pooled = compiled("stream", BankSpec(("h",), (S,), (k,), d, S, k_aux, "topk", aux_pool=1024))  # [B, 1024] products
    assert max(sizes(pooled)) <= max(d * S, B_local * 1024), max(sizes(pooled))
    assert stream.memory_analysis().temp_size_in_bytes < dense.memory_analysis().temp_size_in_bytes / 2


@pytest.mark.parametrize("encoder", ["dense", *ENCODERS])
def test_bfloat16_encoder_dtype(encoder):
    """encoder_dtype='bfloat16' rounds the matmul inputs only: values within bf16 rounding of the
    float32 reference, and the backward still uses the float32 parameters (same sparse grads)."""
    shape = (16, 32, 300, 8, 64)
    x, w, b = _data(shape, jnp.float32, seed=4)
    v, i = topk_encode(x, w, b, 8, options=EncoderOptions(encoder, 64, "bfloat16"))
    xr, wr = x.astype(jnp.bfloat16).astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32)
    rv, _ = _ref(xr, wr, b, 8)
    np.testing.assert_allclose(np.asarray(v), np.asarray(rv), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda w: jnp.sum(topk_encode(x, w, b, 8, options=EncoderOptions(encoder, 64, "bfloat16"))[0]))(w)
    # gradient wrt W_enc column j = sum of x rows that selected j (float32 x)
    want = np.zeros(w.shape, np.float32)
    sel = np.asarray(v) > 0
    for r in range(x.shape[0]):
        for s_ in range(8):
            if sel[r, s_]:
                want[:, int(i[r, s_])] += np.asarray(x[r])
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-5)


def test_auto_encoder_dtype_is_bfloat16_where_the_platform_multiplies_it_faster():
    """`auto`: bfloat16 when compiling for TPU or GPU, on this CPU as its timing says (never
    without the flags); explicit names pass through; an unknown name is refused."""
    from sae_jax.kernels import pallas, topk

    for platform in ("tpu", "gpu"):
        with pallas.compiling_for(platform):
            assert topk.resolve_encoder_dtype("auto") == "bfloat16"
            assert topk.resolve_encoder_dtype("float32") == "float32"
    cpu = "bfloat16" if topk.host_bf16_faster() else "float32"
    assert topk.resolve_encoder_dtype("auto") == cpu
    if not topk.host_bf16_dot():
        assert cpu == "float32"
    with pytest.MonkeyPatch.context() as mp:  # no bf16 instructions: float32, and nothing timed
        mp.setattr(topk, "host_bf16_dot", lambda: False)
        mp.setattr(topk.jax, "devices", None)
        assert topk.host_bf16_faster.__wrapped__() is False
    # first asked while a step is traced (as a TrainStep built outside `sae-jax train` is), the
    # probe still runs its timing eagerly
    assert float(jax.jit(lambda x: x + topk.host_bf16_faster.__wrapped__())(1.0)) in (1.0, 2.0)
    with pytest.raises(ValueError, match="float16"):
        topk.resolve_encoder_dtype("float16")
    # auto selects the same latents as that dtype named explicitly
    x, w, b = _data((16, 32, 300, 8, 64), jnp.float32, seed=4)
    auto = topk_encode(x, w, b, 8, options=EncoderOptions("rows", dtype="auto"))
    named = topk_encode(x, w, b, 8, options=EncoderOptions("rows", dtype=cpu))
    for a, n in zip(auto, named, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(n))


def test_kernels_on_real_activations_and_their_gated_rounds(tiny_store):
    """SmolLM2-135M residual-stream activations (layer 1, unit mean squared norm) through a fresh
    dictionary (decoder rows random, encoder = their transpose): both Pallas kernels equal
    lax.top_k, and the gated merge runs far fewer rounds than the unrolled one's k per block."""
    from sae_jax.kernels.pallas import gated_rounds

    rows = tiny_store.read_all("blocks.1.hook_resid_post")[:512].astype(np.float32)
    rows /= np.sqrt(tiny_store.hooks["blocks.1.hook_resid_post"]["mean_sq_norm"])
    rng = np.random.default_rng(0)

    def fresh(width):
        w = rng.standard_normal((width, rows.shape[1])).astype(np.float32)
        return jnp.asarray((w / np.linalg.norm(w, axis=1, keepdims=True)).T), jnp.zeros((width,), jnp.float32)

    x = jnp.asarray(rows)
    w, b = fresh(4096)
    rv, _ = _ref(x[:128], w, b, 32)
    for encoder in ("pallas_tpu", "pallas_gpu"):
        v, i = topk_encode(x[:128], w, b, 32, options=EncoderOptions(encoder, 512, "float32"))
        _check_same(v, i, rv, None, x[:128], w, b, 1e-5)
    w, b = fresh(16384)
    rounds, unrolled = gated_rounds(jnp.dot(x, w) + b, 32, 256, 512)
    reduction = float(np.sum(unrolled) / np.sum(rounds))
    print(f"gated rounds per block {float(np.mean(rounds)):.2f} (unrolled 32): {reduction:.1f}x fewer")
    assert np.all(np.asarray(rounds) <= 32) and np.all(np.asarray(rounds)[:, 0] == 32)  # the first block fills the slots
    assert reduction >= 3.0, (
        reduction
    )  # measured 3.2x (9.9 rounds per block); 18x at 2^18 and 35x at 2^20, k 64 (benchmarks/merge_rounds.py)


# ---- the tournament top-k (kernels.select): what the GPU path selects with --------------------
def _same_top_k(pre, k, bias=None):
    from sae_jax.kernels.select import tree_top_k

    v, i = jax.jit(lambda p, b: tree_top_k(p, k, b))(pre, bias)
    rv, ri = jax.lax.top_k(pre if bias is None else pre + bias, k)
    np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))
    np.testing.assert_array_equal(np.asarray(v).view(np.int32), np.asarray(rv).view(np.int32))  # bit for bit, NaN too


def test_tree_top_k_equals_lax_top_k_on_real_activations(tiny_store):
    """SmolLM2 activations through a random encoder: the same values and indices as lax.top_k at
    the main k and at AuxK's (dead latents only: -inf elsewhere), over widths that pad a level."""
    x = jnp.asarray(tiny_store.read_all(next(iter(tiny_store.hooks)))[:256].astype(np.float32))
    rng = np.random.default_rng(0)
    for width, k, k_aux in ((5000, 32, 96), (65536, 64, 512)):
        w = jnp.asarray(rng.normal(size=(x.shape[1], width)).astype(np.float32) / np.sqrt(x.shape[1]))
        pre = x @ w
        _same_top_k(pre, k)
        dead = jnp.asarray(np.where(rng.random(width) < 0.2, 0.0, -np.inf).astype(np.float32))
        _same_top_k(pre, k_aux, dead)


def test_tree_top_k_ties_infinities_nans_and_signed_zeros():
    """Ties go to the lower index (rounded values tie by the thousand), -inf masks, NaN of both
    signs and -0 / +0 order as XLA's TopK orders them (IEEE total order); rows sorted whole, and
    trees of several levels, each padded or not (a ragged last group of 16)."""
    rng = np.random.default_rng(1)
    for s, k in ((4096, 8), (5000, 32), (3, 2), (20000, 512), (65536 + 7, 3)):
        q = jnp.asarray(np.round(rng.normal(size=(6, s)) * 2).astype(np.float32))
        _same_top_k(q, k)
        _same_top_k(q, k, jnp.asarray(np.where(rng.random(s) < 0.9, -np.inf, 0.0).astype(np.float32)))
        z = np.zeros((4, s), np.float32)
        z[:, ::3] = -0.0
        z[0, 5 % s], z[1, 7 % s], z[2, 1 % s] = np.nan, -np.nan, np.inf
        _same_top_k(jnp.asarray(z), k)
    with pytest.raises(ValueError, match="k=9"):
        from sae_jax.kernels.select import tree_top_k

        tree_top_k(jnp.zeros((2, 8)), 9)


def test_gpu_selection_and_backward_blocks():
    """Traced for a GPU, the encoder selects with the tournament (the same latents as on this
    CPU) and the sparse decode / backward take blocks large enough that their loops run a few
    iterations, not one per few rows."""
    from sae_jax.kernels import pallas, topk

    x, w, b = _data((512, 64, 4096, 32, None), jnp.float32, seed=5)
    opts = EncoderOptions("rows", dtype="float32")
    cpu = jax.jit(lambda x, w, b: topk_encode(x, w, b, 32, options=opts))(x, w, b)
    with pallas.compiling_for("gpu"):
        traced = jax.jit(lambda x, w, b: topk_encode(x, w, b, 32, options=opts)).trace(x, w, b)
        jaxpr = str(traced.jaxpr)
        assert " sort[" in jaxpr and "top_k" not in jaxpr  # the tournament's small sorts, no row-wide top_k
        assert topk._slots_budget() == topk.GPU_SLOTS_BUDGET and topk._sorted_budget() == topk.GPU_SORTED_BUDGET
    gpu = traced.lower().compile()(x, w, b)  # the GPU program's selection, run here
    for a, c in zip(gpu, cpu, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    assert topk._slots_budget() == topk.SLOTS_BUDGET
