"""Dead latents resampled toward the worst-reconstructed rows (`train.resample`): what changes,
what does not, and the same result on a mesh as on one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MESH_MATH

from sae_jax import parallel
from sae_jax.errors import SaeJaxError
from sae_jax.sae.bank import BankSpec
from sae_jax.train import resample
from sae_jax.train.settings import TrainSettings
from sae_jax.train.step import TrainStep, make_bank_forward

M, D, S, B = 2, 32, 256, 64


def _setup(mesh, dead_ids, **kw):
    spec = BankSpec(hooks=("a", "b"), widths=(S, S // 2), ks=(8, 4), d_in=D, width=S, k_aux=16, architecture="topk")
    s = TrainSettings.defaults(widths=spec.widths, ks=spec.ks, batch_size=B, steps=100, resample_tokens=4 * B, **MESH_MATH, **kw)
    step = TrainStep(spec, mesh, s)
    rng = np.random.default_rng(0)
    state = step.init_state(jax.random.key(0), rng.standard_normal((M, 256, D)).astype(np.float32))
    # a few steps so that the moments are not zero, then mark `dead_ids` as not firing for a period
    xs = [rng.standard_normal((M, B, D)).astype(np.float32) for _ in range(4)]
    for x in xs[:3]:
        state, _ = step(state, jax.device_put(x, parallel.sharding(mesh, "x")))
    since = np.zeros((M, S), np.int32)
    for m, ids in enumerate(dead_ids):
        since[m, ids] = 4 * B
    state = {**state, "tokens_since_fired": jax.device_put(jnp.asarray(since), state["tokens_since_fired"].sharding)}
    return spec, step, state, jax.device_put(xs[3], parallel.sharding(mesh, "x"))


def _host(state):
    return jax.tree.map(np.asarray, state)


def test_only_the_dead_latents_change_and_point_at_residuals():
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    dead = [np.array([3, 17, 100, 200]), np.array([0, 127, 128, 255])]  # member b: 128 latents; 128 and 255 are padding
    spec, step, state, x = _setup(mesh, dead)
    before = _host(state)
    fwd = make_bank_forward(spec, mesh, step.settings)
    x_hat = np.asarray(fwd(state["params"], x, None, x).x_hat)
    resid = np.asarray(x) - x_hat  # [M, B, D]
    assert step.resamples_before(4) and not step.resamples_before(3) and not step.resamples_before(0)
    assert not step.resamples_before(80)  # the decay's steps (decay_frac 0.2 of 100)
    state, n = step.resample(state, x)
    after = _host(state)
    np.testing.assert_array_equal(np.asarray(n), [4, 2])
    adam = after["opt_state"][0]
    adam0 = before["opt_state"][0]
    for m, ids in enumerate(dead):
        ids = ids[ids < spec.widths[m]]
        live = np.setdiff1d(np.arange(S), ids)
        for name, ax in (("W_enc", 2), ("W_dec", 1), ("b_enc", 1)):
            take = lambda a, sel, ax=ax, m=m: np.take(a[m], sel, axis=ax - 1)  # noqa: E731
            np.testing.assert_array_equal(take(after["params"][name], live), take(before["params"][name], live), err_msg=name)
            for mom, mom0 in ((adam.mu, adam0.mu), (adam.nu, adam0.nu)):
                np.testing.assert_array_equal(take(mom[name], live), take(mom0[name], live), err_msg=name)
                assert np.all(take(mom[name], ids) == 0), name
                assert np.any(take(mom0[name], ids) != 0), name  # they were not zero before
        assert np.all(after["params"]["b_enc"][m, ids] == 0)
        assert np.all(after["tokens_since_fired"][m, ids] == 0)
        # each new decoder row is a distinct row's normalised residual; the encoder column is it
        # times the live latents' mean encoder norm
        unit = resid[m] / np.linalg.norm(resid[m], axis=1, keepdims=True)
        rows = [int(np.argmax(unit @ after["params"]["W_dec"][m, j])) for j in ids]
        assert len(set(rows)) == len(rows)
        np.testing.assert_allclose(after["params"]["W_dec"][m, ids], unit[rows], atol=1e-5)
        norms = np.linalg.norm(before["params"]["W_enc"][m], axis=0)
        mean_live = norms[np.setdiff1d(np.arange(spec.widths[m]), ids)].mean()
        np.testing.assert_allclose(after["params"]["W_enc"][m][:, ids].T, unit[rows] * mean_live, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(after["params"]["b_dec"], before["params"]["b_dec"])
    for k in ("step", "fire_counts", "nan_skips"):
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_at_most_half_a_batch_per_event_one_per_direction_rotating_over_the_dead():
    """Every latent dead: at most half a batch resampled per event, no two new decoder rows within
    `resample.SIMILAR` of each other, and another step's key starts elsewhere among the dead.
    Then a batch whose rows are 40 copies of one outsized row and 24 ordinary ones: that
    direction gets one latent, not one per copy."""
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    spec, step, state, x = _setup(mesh, [np.arange(S), np.arange(S // 2)])  # every latent dead
    picked = []
    for t in (4, 8):
        s2 = jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else a, state)
        s2 = {**s2, "step": jnp.asarray(t, s2["step"].dtype)}
        s2, n = step.resample(s2, x)
        n = np.asarray(n)
        assert np.all(n <= B // 2) and np.all(n >= B // 4), n
        new = np.where(np.asarray(s2["tokens_since_fired"])[0] == 0)[0]
        w = np.asarray(s2["params"]["W_dec"])[0, new]
        cos = w @ w.T - 2 * np.eye(len(new))
        assert cos.max() <= resample.SIMILAR + 1e-6
        picked.append(set(new.tolist()))
    assert picked[0] != picked[1]  # another key, another offset into the dead

    rng = np.random.default_rng(3)
    xs = rng.standard_normal((M, B, D)).astype(np.float32)
    xs[:, :40] = 30.0 * rng.standard_normal((M, 1, D))  # the same outsized row 40 times
    x_hat = np.asarray(make_bank_forward(spec, mesh, step.settings)(state["params"], jnp.asarray(xs), None, jnp.asarray(xs)).x_hat)
    big = xs[0, 0] - x_hat[0, 0]
    s2, n = step.resample(jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else a, state), jnp.asarray(xs))
    new = np.where(np.asarray(s2["tokens_since_fired"])[0] == 0)[0]
    w = np.asarray(s2["params"]["W_dec"])[0, new]
    assert np.sum(w @ big / np.linalg.norm(big) > 0.99) == 1  # one latent on that direction
    assert 16 <= np.asarray(n)[0] <= 1 + (B - 40)  # the ordinary rows fill the rest


def test_a_mesh_resamples_as_one_device_does():
    dead = [np.array([1, 5, 64, 65, 130, 250]), np.array([2, 70, 100])]
    out = []
    for shape in ((1, 1), (2, 4)):
        mesh = parallel.make_mesh(*shape, jax.devices()[: shape[0] * shape[1]])
        _, step, state, x = _setup(mesh, dead)
        state, n = step.resample(state, x)
        out.append((_host(state), np.asarray(n)))
    (a, na), (b, nb) = out
    np.testing.assert_array_equal(na, nb)
    np.testing.assert_array_equal(a["tokens_since_fired"], b["tokens_since_fired"])
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a["params"]), jax.tree.leaves(b["params"]), strict=True):
        np.testing.assert_allclose(u, v, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_resampling_is_for_the_topk_family(arch):
    with pytest.raises(SaeJaxError, match="train.resample_tokens"):
        TrainSettings.defaults(
            architecture=arch, resample_tokens=1000, **({"l1_coefs": (1.0,)} if arch == "relu" else {"l0_coefs": (0.01,)})
        )


def test_the_period_rounds_to_whole_steps():
    assert resample.resample_steps(1024, 51200) == 50
    assert resample.resample_steps(4096, 100) == 1
    assert resample.resample_steps(4096, 0) == 0
    assert [t for t in range(20) if resample.resamples_at(t, 5, 20, 0.2)] == [5, 10, 15]


def test_a_transcoder_takes_the_input_row_for_its_encoder():
    """A BatchTopK Matryoshka skip transcoder (d_in 24 -> d_out 40): the decoder row is the output
    residual's direction, the encoder column the same row's input direction."""
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    d_in, d_out, s = 24, 40, 128
    spec = BankSpec(("a",), (s,), (4,), d_in, s, 8, "batchtopk", out_hooks=("b",), d_out=d_out, skip=True, prefixes=(32,), cap=4)
    t = TrainSettings.defaults(
        architecture="batchtopk", widths=(s,), ks=(4,), batch_size=B, steps=100, resample_tokens=B, matryoshka_prefixes=(32,), **MESH_MATH
    )
    step = TrainStep(spec, mesh, t)
    rng = np.random.default_rng(1)
    state = step.init_state(jax.random.key(1), rng.standard_normal((1, 256, d_out)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((1, B, d_in)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((1, B, d_out)), jnp.float32)
    state, _ = step(state, x, y)
    since = np.zeros((1, s), np.int32)
    ids = np.array([5, 40, 77])
    since[0, ids] = B
    state = {**state, "tokens_since_fired": jnp.asarray(since), "step": jnp.asarray(1, state["step"].dtype)}
    x_hat = np.asarray(make_bank_forward(spec, mesh, t)(state["params"], x, None, y).x_hat)
    before = _host(state)
    state, n = step.resample(state, x, y)
    after = _host(state)
    np.testing.assert_array_equal(np.asarray(n), [3])
    resid = np.asarray(y)[0] - x_hat[0]
    unit_out = resid / np.linalg.norm(resid, axis=1, keepdims=True)
    unit_in = np.asarray(x)[0] / np.linalg.norm(np.asarray(x)[0], axis=1, keepdims=True)
    rows = [int(np.argmax(unit_out @ after["params"]["W_dec"][0, j])) for j in ids]
    np.testing.assert_allclose(after["params"]["W_dec"][0, ids], unit_out[rows], atol=1e-5)
    live = np.setdiff1d(np.arange(s), ids)
    mean_live = np.linalg.norm(before["params"]["W_enc"][0], axis=0)[live].mean()
    np.testing.assert_allclose(after["params"]["W_enc"][0][:, ids].T, unit_in[rows] * mean_live, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(after["params"]["W_skip"], before["params"]["W_skip"])


def test_rows_that_are_not_finite_are_never_drawn():
    """A batch with NaN and inf rows (a step would skip it): the latents resampled get finite
    directions from the finite rows only, and nothing non-finite reaches the state."""
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    _, step, state, x = _setup(mesh, [np.arange(S), np.arange(S // 2)])
    xs = np.array(x)
    xs[:, ::3] = np.nan
    xs[:, 1::3] = np.inf
    state, n = step.resample(state, jnp.asarray(xs))
    n = np.asarray(n)
    assert np.all(n >= 1) and np.all(n <= -(-B // 3)), n  # only the finite third can be drawn
    for path, leaf in jax.tree_util.tree_leaves_with_path(_host(state)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), jax.tree_util.keystr(path)
