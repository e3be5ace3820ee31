"""`sae_jax.hlo_cost`: what a compiled module does, counted from its optimized HLO. Checked on
modules this CPU's compiler builds, where the counts follow from the program's shapes."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sae_jax.hlo_cost import GPUS, gpu_roofline, step_cost


def _hlo(f, *args) -> str:
    return jax.jit(f).lower(*args).compile().as_text()


def test_matmuls_in_loops_count_every_trip_and_sorts_their_rows():
    """A matmul inside a 7-trip loop (that the compiler cannot hoist) counts 7 times; a sort of
    [32, 100] counts 32 rows of 100 keys and a bitonic network's compare-exchanges."""

    def f(x, w):
        y = lax.fori_loop(0, 7, lambda i, acc: acc + jnp.tanh(jnp.dot(x * acc, w)).sum(), 0.0)
        return lax.sort(x[:, :100] * y)

    c = step_cost(_hlo(f, jnp.ones((32, 128)), jnp.ones((128, 256))))["main"]
    assert c.flops == 7 * 2 * 32 * 128 * 256
    assert c.sort_keys == {100: 32}
    assert c.sort_ce == 32 * 64 * 7 * 8 / 2  # 100 keys padded to 128: 64 pairs x 28 stages
    assert c.launches >= 7


def test_a_slice_written_in_place_counts_the_slice_not_the_buffer():
    """A loop writing one [1, 256] row per trip into a [4096, 256] buffer moves about a row per
    trip, not the buffer (XLA updates it in place)."""

    def f(x):
        return lax.fori_loop(0, 4096, lambda i, b: lax.dynamic_update_slice(b, jnp.sin(b[i][None] + i), (i, 0)), x)

    c = step_cost(_hlo(f, jnp.ones((4096, 256))))["main"]
    buffer = 4096 * 256 * 4
    assert c.hbm < 10 * buffer  # per trip a few rows; the whole buffer per trip would be 4096 x


def test_the_conditional_that_sorts_more_is_the_aux_path():
    """Of a `cond` whose branches sort differently, 'main' takes the one that sorts less and
    'aux' the other (the train step's AuxK branch); the roofline names the selection's sorts
    (under `topk_select` or `top_k`) and says how many keys each row sorts."""
    from sae_jax.kernels.select import tree_top_k

    def f(pre, live):
        small = lambda p: tree_top_k(p, 8)[0].sum()  # noqa: E731
        big = lambda p: tree_top_k(p, 8)[0].sum() + tree_top_k(p, 64, jnp.where(jnp.arange(p.shape[1]) % 2 == 0, 0.0, -jnp.inf))[0].sum()  # noqa: E731
        return lax.cond(live, big, small, pre)

    pre = jnp.asarray(np.random.default_rng(0).normal(size=(64, 8192)).astype(np.float32))
    cost = step_cost(_hlo(f, pre, True))
    assert cost["aux"].sort_ce > cost["main"].sort_ce > 0
    r = gpu_roofline(cost, "h100", rows=64)
    assert r["main"]["select_ms"] > 0 and r["aux"]["select_ms"] > r["main"]["select_ms"]
    assert 0 < r["main"]["select_sorted_per_row"] <= 4 * 256  # a few candidate sets of 4k (k 8: 256), never the row's 8192
    assert set(GPUS) == {"h100", "h200"}
