"""The optimiser's step block by block of latents (`train.update`) against the whole-array step:
the same parameters and moments, on one device and split over a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import parallel
from sae_jax.sae.bank import BankSpec
from sae_jax.train import update
from sae_jax.train.optimizer import build_optimizer
from sae_jax.train.settings import TrainSettings
from sae_jax.train.step import TrainStep
from sae_jax.train.update import apply_update, update_block

M, D, S = 2, 48, 1024


def _problem(seed: int, state_dtype: str):
    spec = BankSpec(hooks=("a", "b"), widths=(S, S // 2), ks=(8, 4), d_in=D, width=S, k_aux=16, architecture="topk")
    s = TrainSettings.defaults(widths=spec.widths, ks=spec.ks, optimizer_state=state_dtype, steps=50, warmup_steps=0)
    tx, _ = build_optimizer(spec, s, np.ones(M, np.float32), np.ones(M, np.float32))
    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((M, S, D)).astype(np.float32)
    params = {
        "W_enc": jnp.asarray(rng.standard_normal((M, D, S)), jnp.float32),
        "b_enc": jnp.asarray(rng.standard_normal((M, S)), jnp.float32),
        "W_dec": jnp.asarray(w_dec / np.linalg.norm(w_dec, axis=-1, keepdims=True)),
        "b_dec": jnp.asarray(rng.standard_normal((M, D)), jnp.float32),
    }
    grads = [{n: jnp.asarray(rng.standard_normal(p.shape) * 1e-2, jnp.float32) for n, p in params.items()} for _ in range(3)]
    return tx, params, grads


@pytest.mark.parametrize("state_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("latent_major", [False, True])
def test_blocks_update_as_the_whole_arrays_do(state_dtype, latent_major):
    """Three steps (the second with a non-finite gradient: nothing may change) with blocks of 128
    latents (8 blocks per matrix) give the parameters and moments of the whole-array update: the
    same arithmetic per element, the stochastic rounding drawing by place in the whole matrix. W_enc's
    gradient given latent-major ([M, S, d]) is read as its transpose."""
    tx, params, grads = _problem(0, state_dtype)
    assert update_block((M, D, S), 2, M * D * 128) == 128
    runs = {}
    for budget in (None, M * D * 128):
        p, o = params, tx.init(params)

        @jax.jit
        def step(g, p, o, finite, budget=budget):
            if latent_major:
                g = {**g, "W_enc": jnp.swapaxes(g["W_enc"], 1, 2)}
            return apply_update(g, p, o, tx, renorm=True, finite=finite, enc_latent_major=latent_major, budget=budget)

        for t, g in enumerate(grads):
            p, o = step(g, p, o, jnp.asarray(t != 1))
        runs[budget] = (p, o)
    (p0, o0), (p1, o1) = runs.values()
    for n in params:
        np.testing.assert_allclose(np.asarray(p1[n]), np.asarray(p0[n]), rtol=1e-6, atol=1e-7, err_msg=n)
    for a, b in zip(jax.tree.leaves(o1), jax.tree.leaves(o0), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-9)
    # the update moved every matrix, and decoder rows stayed unit-norm
    assert not np.allclose(np.asarray(p0["W_enc"]), np.asarray(params["W_enc"]))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(p1["W_dec"]), axis=-1), 1.0, rtol=1e-5)


def test_update_block_sizes():
    assert update_block((1, 2304, 2**18), 2, 2**24) == 4096
    assert update_block((1, 2**18, 2304), 1, 2**24) == 4096
    assert update_block((2, 64, 4096), 2, 2**24) == 4096  # fits whole
    assert update_block((1, 8, 3000), 2, 8 * 1000) == 1000  # no multiple of 128 divides 3000 under 1000


@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 4)])
def test_train_steps_with_blocks_match_whole_arrays(monkeypatch, mesh_shape):
    """Whole train steps (AuxK live from the second: a latent that did not fire is dead) with
    blocks of 64 latents against whole-array updates, on one device and on a 2x4 mesh (each
    device's 256 latents in 4 blocks). float32 moments: the decoder rows' dot products and norms
    are summed in another order over a block than over the whole array (XLA fuses them per
    shape), an ulp apart, which Adam's first steps (tiny second moments) carry into the
    parameters at ~1e-6; with bfloat16 moments an ulp can also move a stochastic rounding to the
    other neighbour (a bfloat16 ulp, 0.4%). The rounding's block places are checked exactly by
    `test_blocks_on_a_mesh_round_as_one_device_does`."""
    spec = BankSpec(hooks=("a",), widths=(1024,), ks=(8,), d_in=32, width=1024, k_aux=16, architecture="topk")
    s = TrainSettings.defaults(widths=spec.widths, ks=spec.ks, steps=20, warmup_steps=0, dead_tokens=1, optimizer_state="float32")
    x = np.random.default_rng(1).standard_normal((3, 1, 64, 32)).astype(np.float32)
    n = mesh_shape[0] * mesh_shape[1]
    mesh = parallel.make_mesh(*mesh_shape, jax.devices()[:n])
    states = []
    for budget in ({}, {"cpu": 64 * 32}):
        monkeypatch.setattr(update, "BLOCK_BUDGET", budget)
        step = TrainStep(spec, mesh, s)
        state = step.init_state(jax.random.key(0), x[0])
        for xb in x:
            state, metrics = step(state, jax.device_put(xb, parallel.sharding(mesh, "x")))
        assert float(metrics["auxk_loss"][0]) > 0
        # a batch with a NaN leaves parameters and moments as they were (on a TPU mesh the update
        # runs inside the AuxK branches, as it does here with blocks on the 2x4 mesh)
        before = jax.tree.map(np.asarray, (state["params"], state["opt_state"]))
        bad = x[0].copy()
        bad[0, 3, 5] = np.nan
        state, metrics = step(state, jax.device_put(bad, parallel.sharding(mesh, "x")))
        assert not bool(metrics["finite"]) and int(state["nan_skips"]) == 1
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state["params"], state["opt_state"])), strict=True):
            np.testing.assert_array_equal(np.asarray(b), a)
        states.append(dict(jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, state))))
    assert states[0].keys() == states[1].keys()
    for path, a in states[0].items():
        b = states[1][path]
        np.testing.assert_allclose(
            np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path)
        )


def test_blocks_on_a_mesh_round_as_one_device_does(monkeypatch):
    """The step's update (`train.step._update`) on a 1x8 mesh (128 latents per device, blocks of
    64) against one device updating whole arrays, bfloat16 moments, the same gradients: each
    device's blocks draw the rounding bits of their global places, so the moments agree."""
    from sae_jax.train.step import _update

    tx, params, grads = _problem(2, "bfloat16")
    spec = BankSpec(hooks=("a", "b"), widths=(S, S // 2), ks=(8, 4), d_in=D, width=S, k_aux=16, architecture="topk")
    runs = []
    for mesh, budget in (
        (parallel.make_mesh(1, 1, jax.devices()[:1]), {}),
        (parallel.make_mesh(1, 8, jax.devices()[:8]), {"cpu": M * D * 64}),
    ):
        monkeypatch.setattr(update, "BLOCK_BUDGET", budget)
        shard = {n: parallel.sharding(mesh, n) for n in params}
        p = {n: jax.device_put(a, shard[n]) for n, a in params.items()}
        o = tx.init(p)
        fn = jax.jit(lambda g, p, o, mesh=mesh: _update(g, {"params": p, "opt_state": o}, tx, spec, mesh, jnp.asarray(True), False))
        for g in grads:
            p, o, ok = fn({n: jax.device_put(a, shard[n]) for n, a in g.items()}, p, o)
            assert bool(ok)
        runs.append(jax.tree.map(lambda a: np.asarray(a, np.float32), (p, o)))
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1]), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9)


def test_the_tpu_transpose_kernel_transposes():
    """`kernels.pallas.transpose`'s Mosaic kernel (the TPU update's block transpose), run by the
    TPU interpreter: tiles of 384 x 256 and a whole-axis tile (d 48)."""
    from sae_jax.kernels import pallas

    a = jnp.asarray(np.random.default_rng(3).standard_normal((2, 768, 512)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(pallas._transpose_tpu(a, pallas._interpret("tpu", "cpu"))), np.swapaxes(np.asarray(a), 1, 2))
    b = a[:, :128, :48]
    np.testing.assert_array_equal(np.asarray(pallas._transpose_tpu(b, pallas._interpret("tpu", "cpu"))), np.swapaxes(np.asarray(b), 1, 2))
