"""The native CPU top-k (`sae_jax.kernels.native`): lax.top_k's values and indices exactly, on
every shape and value the training step can hand it; built once per machine; and a missing or
failing compiler leaves training on XLA's top-k with the same results."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sae_jax.kernels import native, topk

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler on this machine: XLA's top-k is used")


def test_it_builds_where_there_is_a_compiler():
    assert native.available(), "a C++ compiler is here but the native top-k did not build (see the warning)"


def lax_top_k(pre, k, bias=None):
    return lax.top_k(pre if bias is None else pre + bias, k)


def check(pre, k, bias=None):
    pre = jnp.asarray(pre, jnp.float32)
    bias = None if bias is None else jnp.asarray(bias, jnp.float32)
    got = jax.jit(lambda p, b: native.top_k(p, k, b))(pre, bias)
    want = jax.jit(lambda p, b: lax_top_k(p, k, b))(pre, bias)
    # bitwise: values (NaN and the sign of zero included) and indices, ties to the lower index
    np.testing.assert_array_equal(np.asarray(got[0]).view(np.int32), np.asarray(want[0]).view(np.int32))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    assert got[1].dtype == jnp.int32


@pytest.mark.parametrize(
    "rows,s,k",
    [
        (64, 16384, 32),  # the training shape: ~2k segments of 128
        (33, 4096, 8),
        (17, 1000, 7),  # s not a multiple of 16
        (8, 300, 64),  # fewer segments than k: no bar, compactions only
        (5, 40, 40),  # k = s
        (9, 3, 1),  # a row shorter than one vector
        (128, 16384, 512),  # AuxK's k
    ],
)
def test_values_and_indices_equal_lax_top_k(rows, s, k):
    rng = np.random.default_rng(rows * 7 + s + k)
    pre = rng.standard_normal((rows, s)).astype(np.float32)
    check(pre, k)
    check(pre, k, rng.standard_normal(s) * 0.5)


def test_ties_special_values_and_orderings():
    rng = np.random.default_rng(0)
    s = 2048
    ties = rng.integers(-3, 4, (16, s)).astype(np.float32)  # thousands of equal values a row
    check(ties, 50)
    check(ties, 50, rng.integers(0, 2, s))
    zeros = np.where(rng.random((4, s)) < 0.5, -0.0, 0.0).astype(np.float32)
    check(zeros, 20)  # +0.0 ranks above -0.0 (XLA's total order), without a bias to add
    special = rng.standard_normal((6, s)).astype(np.float32)
    special[0, ::7] = np.inf
    special[1, ::5] = -np.inf
    special[2, 100] = np.nan
    special[3, :] = -np.inf
    special[4, 3::9] = -np.nan
    check(special, 40)
    # AuxK's bias: -inf for live latents, so most of a row is -inf and the selection runs into it
    aux = np.where(rng.random(s) < 0.01, 0.0, -np.inf).astype(np.float32)
    check(rng.standard_normal((8, s)).astype(np.float32), 64, aux)
    # ascending and descending rows: the bar is as weak as it gets / is met by the first entries
    ramp = np.tile(np.arange(s, dtype=np.float32), (3, 1))
    check(ramp, 33)
    check(-ramp, 33)
    check(np.zeros((2, s), np.float32), 16)


def test_batches_vmap_and_empty():
    rng = np.random.default_rng(1)
    pre = jnp.asarray(rng.standard_normal((3, 2, 40, 512)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((3, 512)), jnp.float32)
    v, i = jax.jit(lambda p: native.top_k(p, 9))(pre)  # leading axes are rows
    rv, ri = lax.top_k(pre, 9)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(rv))
    np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))
    # a bias per vmapped member (a bank of dictionaries), an unbatched input broadcast to it
    f = jax.jit(jax.vmap(lambda p, b: native.top_k(p, 9, b), in_axes=(0, 0)))
    v, i = f(pre[:, 0], bias)
    rv, ri = jax.vmap(lambda p, b: lax.top_k(p + b, 9))(pre[:, 0], bias)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(rv))
    np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))
    v, i = jax.jit(jax.vmap(lambda b: native.top_k(pre[0, 0], 9, b)))(bias)
    rv, ri = jax.vmap(lambda b: lax.top_k(pre[0, 0] + b, 9))(bias)
    np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))
    v, i = native.top_k(jnp.zeros((0, 64), jnp.float32), 4)
    assert v.shape == i.shape == (0, 4)
    with pytest.raises(ValueError, match="k=65 must be in 1..64"):
        native.top_k(jnp.zeros((2, 64), jnp.float32), 65)
    with pytest.raises(ValueError, match=r"bias \(32,\) must be \[64\]"):
        native.top_k(jnp.zeros((2, 64), jnp.float32), 4, jnp.zeros((32,)))


def test_the_encoders_pick_it_on_cpu_and_match_xla(monkeypatch):
    """topk_pre with the native kernels equals the XLA path (SAE_JAX_NATIVE=0): the selections
    bitwise, the sparse backward to float32 rounding, for the row-block, streaming and dense
    encoders, with AuxK's second selection."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 2048)) / 8, jnp.float32)
    b = jnp.asarray(rng.standard_normal(2048) / 10, jnp.float32)
    aux = jnp.where(jnp.arange(2048) % 13 == 0, b, -jnp.inf)

    def run(encoder):
        def loss(x, w, b):
            v, i, av, ai = topk.topk_pre(x, w, b, 16, aux_b=aux, k_aux=96, options=topk.EncoderOptions(encoder, 512, "float32"))
            return jnp.sum(v**2) + jnp.sum(av**2), (v, i, av, ai)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w, b)

    calls = []
    real = native.top_k
    monkeypatch.setattr(native, "top_k", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for encoder in ("rows", "stream", "dense"):
        calls.clear()
        got = run(encoder)
        assert calls, f"{encoder}: the native top-k was not used on a CPU"
        with monkeypatch.context() as mp:
            mp.setenv("SAE_JAX_NATIVE", "0")
            calls.clear()
            want = run(encoder)
            assert not calls
        (grads, fwd), (want_grads, want_fwd) = got, want
        for a, c in zip(fwd, want_fwd, strict=True):  # the selection: bitwise
            np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
        for a, c in zip(grads, want_grads, strict=True):  # the sparse backward: float32 sums in another order
            c = np.asarray(c)
            np.testing.assert_allclose(np.asarray(a), c, rtol=1e-5, atol=1e-6 * np.abs(c).max())


@pytest.mark.heavy
def test_built_once_whole_and_a_failed_build_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SAE_JAX_CACHE_DIR", str(tmp_path / "cache"))
    path = native.library_path()
    assert path.parent == tmp_path / "cache" and path.stat().st_size > 0
    stamp = path.stat().st_mtime_ns
    assert native.library_path() == path and path.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left beside it

    # a compiler that fails: no library, no temporary, a warning, and XLA's top-k in its place
    monkeypatch.setenv("SAE_JAX_CACHE_DIR", str(tmp_path / "broken"))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(native.NativeBuildError, match="failed"):
        native.library_path()
    assert list((tmp_path / "broken").iterdir()) == []
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native.NativeBuildError, match="does not run"):
        native.library_path()
    native._load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="sae_jax.kernels.native"):
            assert not native.available()
        assert "XLA's top-k and gathers are used instead" in caplog.text and "no-such-compiler" in caplog.text
        x = jnp.asarray(np.random.default_rng(3).standard_normal((64, 32)), jnp.float32)
        w = jnp.asarray(np.random.default_rng(4).standard_normal((32, 1024)), jnp.float32)
        v, i = topk.topk_encode(x, w, jnp.zeros(1024), 8, options=topk.EncoderOptions("rows", dtype="float32"))
        rv, ri = lax.top_k(jax.nn.relu(x @ w), 8)
        np.testing.assert_allclose(np.asarray(v), np.asarray(rv), rtol=1e-6)
        np.testing.assert_allclose(
            np.asarray(topk.sparse_decode(v, i, w.T)), np.asarray(jnp.einsum("rk,rkd->rd", v, w.T[i])), rtol=1e-5, atol=1e-5
        )
    finally:
        native._load.cache_clear()
        monkeypatch.undo()
    assert native.available()  # registered again under the same name


def _sparse_case(seed, rows=96, k=12, width=300, d=40):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, width, (rows, k)).astype(np.int32)
    idx[:, 1] = idx[:, 0]  # a latent twice in one row
    idx[:8] = 7  # and in many rows
    return (
        jnp.asarray(idx),
        jnp.asarray(rng.standard_normal((rows, k)), jnp.float32),
        jnp.asarray(rng.standard_normal((width, d)), jnp.float32),
        jnp.asarray(rng.standard_normal((rows, d)), jnp.float32),
    )


@pytest.mark.parametrize("d", [40, 576, 3])
def test_sparse_kernels_equal_their_dense_definitions(d):
    idx, coef, table, src = _sparse_case(d, d=d)
    width = table.shape[0]
    c, t, x = (np.asarray(a, np.float64) for a in (coef, table, src))
    onehot = np.eye(width)[idx]  # [R, K, W], float64: the exact sums to compare with
    want_sum, mag_sum = (np.einsum("rk,rkw,wd->rd", f(c), onehot, f(t)) for f in (np.asarray, np.abs))
    want_dots, mag_dots = (np.einsum("rkw,wd,rd->rk", onehot, f(t), f(x)) for f in (np.asarray, np.abs))
    want_scatter, mag_scatter = (np.einsum("rk,rkw,rd->wd", f(c), onehot, f(x)) for f in (np.asarray, np.abs))
    got_sum = jax.jit(native.gather_sum)(coef, idx, table)
    got_dots = jax.jit(native.gather_dots)(table, src, idx)
    got_scatter = jax.jit(native.scatter_rows, static_argnums=(3, 4))(src, coef, idx, width)
    got_t = jax.jit(native.scatter_rows, static_argnums=(3, 4))(src, coef, idx, width, True)
    # float32 sums against exact ones: within a few float32 ulps of the sum of the terms' sizes
    for got, want, mag in ((got_sum, want_sum, mag_sum), (got_dots, want_dots, mag_dots), (got_scatter, want_scatter, mag_scatter)):
        err = np.abs(np.asarray(got, np.float64) - want)
        assert (err <= 4 * np.finfo(np.float32).eps * mag).all(), float((err / mag).max())
    np.testing.assert_array_equal(np.asarray(got_t), np.asarray(got_scatter).T)
    untouched = np.setdiff1d(np.arange(width), np.asarray(idx))
    assert untouched.size and not np.asarray(got_scatter)[untouched].any()  # latents without slots: zeros


def test_sparse_kernels_sum_in_slot_order_and_batch_under_vmap():
    idx, coef, table, src = _sparse_case(5)
    width = table.shape[0]
    # the order is fixed: each latent's terms in slot order, as the sorted XLA scatter sums them
    want = topk.scatter_rows(src, coef, idx, width, topk.sort_slots(idx))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAE_JAX_NATIVE", "0")
        want = jax.jit(lambda s, c, i: topk.scatter_rows(s, c, i, width, topk.sort_slots(i)))(src, coef, idx)
    got = jax.jit(lambda s, c, i: native.scatter_rows(s, c, i, width))(src, coef, idx)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # bitwise: products, then sums in slot order
    # a vmapped bank of two members, and an unbatched table broadcast to a batched index
    idx2, coef2, table2, src2 = _sparse_case(6)
    stack = lambda a, b: jnp.stack([a, b])  # noqa: E731
    Ix, C, T, S = stack(idx, idx2), stack(coef, coef2), stack(table, table2), stack(src, src2)
    for f, args in (
        (native.gather_sum, (C, Ix, T)),
        (native.gather_dots, (T, S, Ix)),
        (lambda s, c, i: native.scatter_rows(s, c, i, width), (S, C, Ix)),
        (lambda s, c, i: native.scatter_rows(s, c, i, width, True), (S, C, Ix)),
    ):
        batched = jax.jit(jax.vmap(f))(*args)
        for m in range(2):
            np.testing.assert_array_equal(np.asarray(batched[m]), np.asarray(jax.jit(f)(*(a[m] for a in args))))
    both = jax.jit(jax.vmap(native.gather_sum, in_axes=(0, 0, None)))(C, Ix, table)
    np.testing.assert_array_equal(np.asarray(both[1]), np.asarray(native.gather_sum(coef2, idx2, table)))


def test_sparse_kernels_out_of_range_indices_like_xla():
    """As jnp's `table[idx]` and `.at[idx].add`: a negative index counts from the end; one still
    outside [0, W) is clamped by a gather and dropped by a scatter."""
    idx, coef, table, src = _sparse_case(7)
    width = table.shape[0]
    bad = idx.at[0, 0].set(width + 5).at[1, 2].set(-3).at[2, 3].set(-width - 4)
    np.testing.assert_allclose(
        np.asarray(native.gather_sum(coef, bad, table)), np.asarray(jnp.einsum("rk,rkd->rd", coef, table[bad])), rtol=1e-5, atol=1e-5
    )
    want = (
        jnp.zeros((width, src.shape[1])).at[bad.reshape(-1)].add((coef[..., None] * src[:, None, :]).reshape(-1, src.shape[1]), mode="drop")
    )
    np.testing.assert_allclose(np.asarray(native.scatter_rows(src, coef, bad, width)), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"idx \(96,\) must be \[R, K\]"):
        native.gather_sum(coef[:, 0], idx[:, 0], table)


PORTABLE_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from sae_jax.kernels import native, topk
assert native.available()
rng = np.random.default_rng(0)
cases = [rng.standard_normal((40, 16384)), rng.integers(-3, 4, (8, 1000)), np.tile(np.arange(2048.0), (2, 1))]
special = rng.standard_normal((3, 999))
special[0, ::7], special[1, 5] = np.inf, np.nan
for pre in cases + [special]:
    pre = jnp.asarray(pre, jnp.float32)
    for k in (1, 7, 32):
        b = jnp.asarray(rng.standard_normal(pre.shape[1]), jnp.float32)
        for got, want in ((native.top_k(pre, k), lax.top_k(pre, k)), (native.top_k(pre, k, b), lax.top_k(pre + b, k))):
            assert np.array_equal(np.asarray(got[0]).view(np.int32), np.asarray(want[0]).view(np.int32)), k
            assert np.array_equal(np.asarray(got[1]), np.asarray(want[1])), k
idx = jnp.asarray(rng.integers(0, 300, (96, 12)), jnp.int32)
coef, table, src = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((96, 12), (300, 40), (96, 40)))
got = native.scatter_rows(src, coef, idx, 300)
assert np.array_equal(np.asarray(got), np.asarray(topk.scatter_rows(src, coef, idx, 300, topk.sort_slots(idx))))
assert np.array_equal(np.asarray(native.scatter_rows(src, coef, idx, 300, True)), np.asarray(got).T)
np.testing.assert_allclose(np.asarray(native.gather_sum(coef, idx, table)), np.asarray(jnp.einsum("rk,rkd->rd", coef, table[idx])), rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(np.asarray(native.gather_dots(table, src, idx)), np.asarray(jnp.einsum("rkd,rd->rk", table[idx], src)), rtol=1e-5, atol=1e-5)
print("portable ok")
"""


@pytest.mark.heavy
@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="x86-64 -march levels")
def test_the_portable_build_without_avx512(tmp_path):
    """Built for x86-64-v3 (AVX2, no AVX-512: the kernels' plain loops, as on many AMD and older
    Intel CPUs), the kernels give the same results."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SAE_JAX_NATIVE_MARCH": "x86-64-v3", "SAE_JAX_CACHE_DIR": str(tmp_path), "XLA_FLAGS": ""}
    r = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "portable ok" in r.stdout, r.stderr[-3000:]
    (lib,) = tmp_path.glob("sae_jax_cpu-*.so")
    nm = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True)
    if nm.returncode == 0:  # no AVX-512 instruction in the portable build (zmm registers)
        assert "%zmm" not in nm.stdout


def test_an_installed_package_carries_every_source():
    """The wheel's package data (pyproject) must cover each file the build reads, or an installed
    (non-editable) sae_jax could not build its kernels (a wheel once left parallel.h out)."""
    import fnmatch
    import tomllib

    from conftest import REPO

    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sae_jax"]
    pkg = REPO / "sae_jax"
    for f in native.SOURCES + native.HEADERS:
        rel = f.relative_to(pkg).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not in pyproject's package-data {globs}"
    assert {p.name for p in native.CSRC.iterdir()} == {f.name for f in native.SOURCES + native.HEADERS}
