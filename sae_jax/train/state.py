"""The train state and where it lives on the mesh.

State is a plain dict pytree (what Orbax saves): `params`, the optimiser's `opt_state`, `step`,
`tokens_since_fired` and `fire_counts` per latent, NaN bookkeeping (`nan_skips`, `nan_streak`),
and for BatchTopK the running batch threshold (`threshold_ema`, `threshold_norm`). Parameters,
the optimiser's moments and the per-latent counters are split over `model` like the latents;
everything else is replicated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sae_jax import parallel
from sae_jax.sae import bank
from sae_jax.sae.bank import BankSpec, geometric_median, init_params


def _state_fn(spec: BankSpec, tx, init_threshold: float, encoder_scale: float):
    def make(key, sample):
        b_dec = None if sample is None else jax.vmap(geometric_median)(sample)
        params = init_params(spec, key, b_dec, init_threshold=init_threshold, encoder_scale=encoder_scale)
        state = {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "tokens_since_fired": jnp.zeros((spec.size, spec.width), jnp.int32),
            "fire_counts": jnp.zeros((spec.size, spec.width), jnp.float32),  # for the density histogram
            "nan_skips": jnp.zeros((), jnp.int32),
            "nan_streak": jnp.zeros((), jnp.int32),
        }
        if spec.architecture == "batchtopk":
            # running (exponential, bias-corrected) mean of the batch threshold: the inference JumpReLU threshold
            state["threshold_ema"] = jnp.zeros((spec.size,), jnp.float32)
            state["threshold_norm"] = jnp.zeros((), jnp.float32)
        return state

    return make


def state_shardings(spec: BankSpec, mesh, tx, abstract) -> dict:
    """The sharding of each leaf of the state `abstract` (from `jax.eval_shape`)."""
    pshard = parallel.param_shardings(mesh, spec)
    rep = parallel.NamedSharding(mesh, parallel.P())
    shardings = jax.tree.map(lambda _: rep, abstract)
    shardings["params"] = pshard
    shardings["tokens_since_fired"] = parallel.sharding(mesh, "latents")
    shardings["fire_counts"] = parallel.sharding(mesh, "latents")
    # optimiser moments mirror the params' shardings; counts are replicated
    shardings["opt_state"] = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, abstract["opt_state"], pshard, transform_non_params=lambda _: rep
    )
    return shardings


def init_state(spec: BankSpec, mesh, tx, key, sample: np.ndarray | None, *, init_threshold: float, encoder_scale: float) -> dict:
    """The state, created already sharded: parameters from `bank.init_params` (`init_threshold`,
    `encoder_scale`: `train.jumprelu_init_threshold`, `train.encoder_init_scale`), `b_dec` from
    the geometric median of `sample [M, N, d_out]` (the scaled targets: a transcoder's output hook)."""
    make = _state_fn(spec, tx, init_threshold, encoder_scale)
    abstract = jax.eval_shape(make, key, sample)
    return jax.jit(make, out_shardings=state_shardings(spec, mesh, tx, abstract))(key, sample)


def abstract_state(spec: BankSpec, mesh, tx) -> dict:
    """The train state as `jax.ShapeDtypeStruct`s with their shardings, nothing allocated: for
    compiling the step ahead of time (`sae-jax compile-check`)."""
    make = _state_fn(spec, tx, init_threshold=1.0, encoder_scale=1.0)  # values do not change shapes
    sample = jax.ShapeDtypeStruct((spec.size, 8, spec.d_out), jnp.float32)
    abstract = jax.eval_shape(make, jax.random.key(0), sample)
    shardings = state_shardings(spec, mesh, tx, abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def batchtopk_threshold(state) -> np.ndarray:
    """The inference threshold of a BatchTopK bank's state [M] (scaled units): `bank.batchtopk_threshold`."""
    return bank.batchtopk_threshold(state["threshold_ema"], state["threshold_norm"])
