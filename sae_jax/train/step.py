"""The train step: `train_step(state, batch) -> (state, metrics)`, one `jax.jit` over the mesh.

State is a plain dict pytree (what Orbax saves): params, Adam state, step, tokens since each
latent last fired, and NaN bookkeeping. A batch whose loss or gradients are not finite leaves
params and optimiser state untouched and is counted (`nan_skips`, `nan_streak`), so NaN never
reaches a checkpoint.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sae_jax import parallel
from sae_jax.sae.bank import BankSpec, Output, forward_shard, geometric_median, init_params, losses


def default_lr(width: int) -> float:
    """sparsify's rule: 2e-4 at 2^14 latents, scaled by 1/sqrt(width / 2^14)."""
    return 2e-4 / float(np.sqrt(width / 2**14))


def make_optimizer(
    spec: BankSpec, lrs: np.ndarray, steps: int, warmup: int, decay_frac: float
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam; linear warmup, constant, then linear decay to 0 over the last `decay_frac` of steps.
    Each member has its own learning rate (leading bank axis). Returns (optimiser, schedule)."""
    decay_start = int(steps * (1 - decay_frac))
    sched = optax.join_schedules(
        [
            optax.linear_schedule(0.0, 1.0, max(warmup, 1)),
            optax.constant_schedule(1.0),
            optax.linear_schedule(1.0, 0.0, max(steps - decay_start, 1)),
        ],
        [max(warmup, 1), max(decay_start, warmup + 1)],
    )
    lrs = jnp.asarray(lrs, jnp.float32)

    def per_member(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: -u * lrs.reshape((-1,) + (1,) * (u.ndim - 1)), updates), state

    return optax.chain(
        optax.scale_by_adam(),
        optax.scale_by_schedule(sched),
        optax.GradientTransformation(lambda p: optax.EmptyState(), per_member),
    ), sched


def _sharded_forward(spec: BankSpec, mesh, with_aux: bool = True, encoder: str = "auto", block: int = 4096, compute_dtype=None):
    n_model = mesh.shape["model"]
    S = parallel.spec
    fn = partial(
        forward_shard, k_aux=spec.k_aux, n_model=n_model, with_aux=with_aux, impl=encoder, block=block, compute_dtype=compute_dtype
    )
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=({k: S(k) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}, S("x"), S("latents"), parallel.P(), S("latents")),
        out_specs=(S("x"), S("topk"), S("topk"), S("x"), S("latents")),
        check_vma=False,
    )


def _masks(spec: BankSpec, mesh):
    """(latent mask [M, S] sharded like the latents, k mask [M, K] replicated)."""
    lat = jax.device_put(jnp.asarray(spec.latent_mask()), parallel.sharding(mesh, "latents"))
    return lat, jnp.asarray(spec.k_mask(), jnp.float32)


def make_forward(spec: BankSpec, mesh, encoder: str = "auto", block: int = 4096):
    """`forward(params, x, dead=None) -> Output` for inputs `x [M, B, d_in]` (already scaled):
    reconstruction, latent values and global indices, FVU and AuxK loss per member."""
    fwd = _sharded_forward(spec, mesh, True, encoder, block)
    lat, k_mask = _masks(spec, mesh)

    @jax.jit
    def apply(params, x, dead):
        x = x.astype(jnp.float32)
        x_hat, vals, idx, e_hat, _ = fwd(params, x, lat, k_mask, dead & lat)
        fvu, auxk = losses(x, x_hat, e_hat, (dead & lat).sum(1), spec.k_aux)
        return Output(x_hat, vals, idx, fvu, auxk)

    return lambda params, x, dead=None: apply(params, x, jnp.zeros_like(lat) if dead is None else dead)


def _project_out_parallel(g_dec, w_dec):
    """Remove the gradient component along each (unit) decoder row: keeps the update tangent."""
    return g_dec - jnp.sum(g_dec * w_dec, axis=-1, keepdims=True) * w_dec


def _renormalise(w_dec):
    return w_dec / jnp.maximum(jnp.linalg.norm(w_dec, axis=-1, keepdims=True), 1e-12)


def init_state(spec: BankSpec, mesh, tx, key, sample: np.ndarray | None) -> dict:
    """Parameters created already sharded; `b_dec` from the geometric median of `sample [M, N, d]`."""
    pshard = parallel.param_shardings(mesh)
    rep = parallel.NamedSharding(mesh, parallel.P())

    def make(key, sample):
        b_dec = None if sample is None else jax.vmap(geometric_median)(sample)
        params = init_params(spec, key, b_dec)
        return {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "tokens_since_fired": jnp.zeros((spec.size, spec.width), jnp.int32),
            "fire_counts": jnp.zeros((spec.size, spec.width), jnp.float32),  # for the density histogram
            "nan_skips": jnp.zeros((), jnp.int32),
            "nan_streak": jnp.zeros((), jnp.int32),
        }

    abstract = jax.eval_shape(make, key, sample)
    shardings = jax.tree.map(lambda _: rep, abstract)
    shardings["params"] = pshard
    shardings["tokens_since_fired"] = parallel.sharding(mesh, "latents")
    shardings["fire_counts"] = parallel.sharding(mesh, "latents")
    # optimiser moments mirror the params' shardings; counts are replicated
    shardings["opt_state"] = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, abstract["opt_state"], pshard, transform_non_params=lambda _: rep
    )
    return jax.jit(make, out_shardings=shardings)(key, sample)


def make_train_step(
    spec: BankSpec,
    mesh,
    tx,
    sched,
    input_scale: np.ndarray,
    dead_tokens: int,
    aux_coef: float,
    encoder: str = "auto",
    block: int = 4096,
    compute_dtype=None,
):
    """Build the jitted `step(state, x) -> (state, metrics)`; `x [M, B, d_in]` raw activations.
    `encoder`: the TopK encoder implementation (`kernels.topk.IMPLS`), `block` its latent block,
    `compute_dtype` its matmul input dtype (None: the parameters' float32)."""
    fwd = {aux: _sharded_forward(spec, mesh, aux, encoder, block, compute_dtype) for aux in (False, True)}
    lat_mask, k_mask = _masks(spec, mesh)
    scale = jnp.asarray(input_scale, jnp.float32)[:, None, None]
    widths = jnp.asarray(spec.widths, jnp.float32)

    def step(state, x):
        x = x.astype(jnp.float32) * scale
        dead = (state["tokens_since_fired"] >= dead_tokens) & lat_mask
        dead_count = dead.sum(axis=1)

        def loss_fn(params, with_aux):
            x_hat, vals, idx, e_hat, fired = fwd[with_aux](params, x, lat_mask, k_mask, dead)
            fvu, auxk = losses(x, x_hat, e_hat, dead_count, spec.k_aux)
            return jnp.sum(fvu + aux_coef * auxk), (fvu, auxk, vals, fired)

        # AuxK's cost (a second top-k and decode) only while some latent is dead: one branch runs
        branches = [partial(jax.value_and_grad(loss_fn, has_aux=True), with_aux=aux) for aux in (False, True)]
        (loss, (fvu, auxk, vals, fired)), grads = jax.lax.cond(dead_count.sum() > 0, branches[1], branches[0], state["params"])
        grads["W_dec"] = _project_out_parallel(grads["W_dec"], state["params"]["W_dec"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params["W_dec"] = _renormalise(params["W_dec"])

        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        n_tokens = x.shape[1]
        since = jnp.where(fired > 0, 0, state["tokens_since_fired"] + n_tokens)
        new = {
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "step": state["step"] + 1,
            "tokens_since_fired": jnp.where(finite, since, state["tokens_since_fired"]),
            "fire_counts": state["fire_counts"] + jnp.where(finite, fired, 0).astype(jnp.float32),
            "nan_skips": state["nan_skips"] + (~finite),
            "nan_streak": jnp.where(finite, 0, state["nan_streak"] + 1),
        }
        metrics = {
            "loss": loss,
            "fvu": fvu,
            "auxk_loss": auxk,
            "l0": (vals > 0).sum(-1).mean(-1).astype(jnp.float32),
            "dead_frac": dead_count / widths,
            "dense_frac": ((fired > n_tokens / 10) & lat_mask).sum(1) / widths,
            "lr_factor": sched(state["step"]),
            "finite": finite,
        }
        return new, metrics

    x_sharding = parallel.sharding(mesh, "x")
    return jax.jit(step, donate_argnums=0, in_shardings=(None, x_sharding))
