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


def test_at_most_half_a_batch_per_event_rotating_over_the_dead():
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    spec, step, state, x = _setup(mesh, [np.arange(S), np.arange(S // 2)])  # every latent dead
    picked = []
    for t in (4, 8):
        s2 = jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else a, state)
        s2 = {**s2, "step": jnp.asarray(t, s2["step"].dtype)}
        s2, n = step.resample(s2, x)
        np.testing.assert_array_equal(np.asarray(n), [B // 2, B // 2])
        picked.append(set(np.where(np.asarray(s2["tokens_since_fired"])[0] == 0)[0].tolist()))
    assert picked[0] != picked[1]  # another key, another offset into the dead


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
