"""The train step: `train_step(state, batch) -> (state, metrics)`, one `jax.jit` over the mesh.

State is a plain dict pytree (what Orbax saves): params, Adam state, step, tokens since each
latent last fired, and NaN bookkeeping. A batch whose loss or gradients are not finite leaves
params and optimiser state untouched and is counted (`nan_skips`, `nan_streak`), so NaN never
reaches a checkpoint.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sae_jax import parallel
from sae_jax.kernels.topk import DEFAULT_ENCODER_BLOCK
from sae_jax.sae.bank import (
    ENCODER_INIT_SCALE,
    JUMPRELU_BANDWIDTH,
    JUMPRELU_INIT_THRESHOLD,
    BankSpec,
    forward_dense,
    forward_sparse,
    geometric_median,
    init_params,
    losses,
)
from sae_jax.train.settings import TrainSettings, base_lr


class Output(NamedTuple):
    x_hat: jax.Array  # [M, B, d_out]
    values: jax.Array | None  # [M, B, C] (sparse architectures; zero beyond each member's selection)
    indices: jax.Array | None  # [M, B, C] global latent ids
    fvu: jax.Array  # [M]
    auxk_loss: jax.Array  # [M]
    l0: jax.Array  # [M, B] active latents per row
    prefix_fvu: jax.Array  # [P, M] FVU of each Matryoshka prefix (P = 1 without prefixes)


def default_lr(width: int, architecture: str = "topk") -> float:
    """`settings.base_lr` at 2^14 latents (JumpReLU's own, `ARCH_LR`), scaled by 1/sqrt(width / 2^14)
    (sparsify's width rule, whose base is 2e-4: 4x lower; docs/design.md, "The recipe", has the
    measurements behind ours)."""
    return base_lr(architecture) / float(np.sqrt(width / 2**14))


BIASES = ("b_enc", "b_dec")  # the parameters `bias_lr_scale` applies to


def bias_lr_factors(settings: TrainSettings, input_scale, output_scale) -> dict[str, np.ndarray]:
    """Each bias's learning rate over its member's [M]: `train.bias_lr_scale`, in the units
    `train.bias_lr_units` names. `scaled`: as given, in the units the step trains in (inputs at
    unit mean squared norm). `raw`: times the scale of the bias's own hook (b_enc: the input's,
    b_dec: the target's), so that the bias moves at `bias_lr_scale x lr` a step in the store's
    units whatever their size: Adam moves a parameter by about its lr a step, and in scaled units
    that is 1/s = sqrt(mean squared norm) times more, relative to the data, than in raw units
    (135x on SmolLM2's residual stream, 3-4x on the synthetic worlds; docs/design.md, "The recipe")."""
    s_in = np.asarray(input_scale, np.float32)
    s_out = np.asarray(output_scale, np.float32)
    c = np.full(s_in.shape, settings.bias_lr_scale, np.float32)
    if settings.bias_lr_units == "scaled":
        return {"b_enc": c, "b_dec": c}
    return {"b_enc": c * s_in, "b_dec": c * s_out}


def make_optimizer(
    spec: BankSpec,
    lrs: np.ndarray,
    steps: int,
    warmup: int,
    decay_frac: float,
    bias_lr_scale: float | dict = 1.0,
    decoder_lr_scale: float = 1.0,
    adam: tuple[float, float, float] = (0.9, 0.999, 1e-8),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam (`adam`: b1, b2, eps); linear warmup, constant, then linear decay to 0 over the last `decay_frac` of steps.
    Each member has its own learning rate `lrs` [M] (leading bank axis); the biases (`BIASES`)
    take `bias_lr_scale` times it (a number, or per bias an array [M]: `bias_lr_factors`) and the
    decoder `decoder_lr_scale` times it (docs/design.md, "The recipe"). Returns (optimiser, schedule)."""
    decay_start = int(steps * (1 - decay_frac))

    def sched(count):  # the factor of update `count` (0-based); warmup 0: full from the first
        t = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(t / warmup, 1.0) if warmup > 0 else 1.0
        decay = jnp.clip(1.0 - (t - decay_start) / max(steps - decay_start, 1), 0.0, 1.0)
        return warm * decay

    lrs = jnp.asarray(lrs, jnp.float32)
    bias = bias_lr_scale if isinstance(bias_lr_scale, dict) else dict.fromkeys(BIASES, bias_lr_scale)
    factors = {n: jnp.asarray(f, jnp.float32) for n, f in {"W_dec": decoder_lr_scale, **bias}.items()}  # scalars or [M]

    def per_member(updates, state, params=None):
        del params

        def member(v, u):  # a scalar, or [M] along u's leading bank axis
            return v.reshape((-1,) + (1,) * (u.ndim - 1)) if v.ndim else v

        out = {n: -u * member(lrs, u) for n, u in updates.items()}
        return {n: u * member(factors[n], u) if n in factors else u for n, u in out.items()}, state

    return optax.chain(
        optax.scale_by_adam(*adam),
        optax.scale_by_schedule(sched),
        optax.GradientTransformation(lambda p: optax.EmptyState(), per_member),
    ), sched


def sharded_forward(
    spec: BankSpec,
    mesh,
    with_aux: bool = True,
    encoder: str = "auto",
    encoder_block: int = DEFAULT_ENCODER_BLOCK,
    encoder_dtype=None,
    jumprelu_bandwidth: float = JUMPRELU_BANDWIDTH,
):
    """The bank forward over the mesh: `fwd(params, x, latent_mask, ks, dead) -> dict` (see
    `bank.forward_sparse`); x is the encoder's input hook, already scaled."""
    n_model = mesh.shape["model"]
    S, P = parallel.spec, parallel.P
    if spec.sparse:
        enc = {"encoder": encoder, "encoder_block": encoder_block, "encoder_dtype": encoder_dtype}
        fn = partial(forward_sparse, spec=spec, n_model=n_model, with_aux=with_aux, **enc)
    else:
        fn = partial(forward_dense, spec=spec, jumprelu_bandwidth=jumprelu_bandwidth, encoder_dtype=encoder_dtype)
    rows = P(None, "data")
    out = {
        "x_hat": P(None, None, "data", None),
        "e_hat": S("x"),
        "fired": S("latents"),
        "l0": rows,
        "penalty": rows,
        "threshold": P(),
        "capped": P(),
    }
    if spec.sparse:
        out.update(values=S("topk"), indices=S("topk"))
    names = parallel.param_names(spec)
    if mesh.size == 1:
        return _one_device(fn)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=({k: S(k) for k in names if k != "W_skip"}, S("x"), S("latents"), P(), S("latents")),
        out_specs=out,
        check_vma=False,
    )


def _one_device(fn):
    """`fn` with the mesh's axis names bound by two vmaps of size 1 instead of shard_map: on one
    device shard_map's collectives stay in the program as one-participant all-reduces (the
    gradients' psum over `data` copied ~75 MB per step at 2^14 latents x 576 on a CPU, ~4% of the
    step), while a vmapped axis of size 1 reduces to nothing after XLA's simplification."""
    inner = jax.vmap(fn, in_axes=None, out_axes=0, axis_name="model", axis_size=1)
    outer = jax.vmap(inner, in_axes=None, out_axes=0, axis_name="data", axis_size=1)
    return lambda *args: jax.tree.map(lambda a: a[0, 0], outer(*args))


def _masks(spec: BankSpec, mesh):
    """(latent mask [M, S] sharded like the latents, ks [M] replicated), for use inside a jitted
    function: computed there from an iota (a closed-over array that spans other processes'
    devices is not allowed in a multi-process run, and this one costs nothing to build)."""
    widths = jnp.asarray(spec.widths, jnp.int32)
    lat = jax.lax.with_sharding_constraint(jnp.arange(spec.width)[None, :] < widths[:, None], parallel.sharding(mesh, "latents"))
    return lat, jnp.asarray(spec.ks, jnp.int32)


def _apply(fwd, params, x, lat, ks, dead):
    """Run the sharded forward; the skip connection (replicated, small) is added outside it."""
    inner = {k: v for k, v in params.items() if k != "W_skip"}
    out = fwd(inner, x, lat, ks, dead)
    if "W_skip" in params:
        out["x_hat"] = out["x_hat"] + jnp.einsum("mbd,mde->mbe", x, params["W_skip"])[None]
    return out


def bank_loss(fwd, params, x, y, lat, ks, dead, coefs, aux_coef: float, k_aux: int):
    """The training objective, summed over members: the FVU of every reconstruction (Matryoshka:
    each prefix), aux_coef x AuxK, and coefs x the mean per-row sparsity penalty (L1 / L0).
    Returns (loss, (fvu [P, M], auxk [M], sparsity [M], forward outputs))."""
    out = _apply(fwd, params, x, lat, ks, dead)
    fvu, auxk = losses(y, out["x_hat"], out["e_hat"], dead.sum(1), k_aux)
    sparsity = coefs * out["penalty"].mean(-1)
    return jnp.sum(fvu.sum(0) + aux_coef * auxk + sparsity), (fvu, auxk, sparsity, out)


def make_loss(
    spec: BankSpec,
    mesh,
    with_aux: bool = False,
    encoder: str = "auto",
    encoder_block: int = DEFAULT_ENCODER_BLOCK,
    jumprelu_bandwidth: float = JUMPRELU_BANDWIDTH,
):
    """`loss(params, x, y, dead, coefs, aux_coef) -> (loss, aux)` on scaled inputs: `bank_loss` over the mesh (tests, tools)."""
    fwd = sharded_forward(spec, mesh, with_aux, encoder, encoder_block, jumprelu_bandwidth=jumprelu_bandwidth)

    def loss(params, x, y, dead, coefs, aux_coef=0.0):
        lat, ks = _masks(spec, mesh)
        return bank_loss(fwd, params, x, y, lat, ks, dead & lat, coefs, aux_coef, spec.k_aux)

    return loss


def make_forward(
    spec: BankSpec, mesh, encoder: str = "auto", encoder_block: int = DEFAULT_ENCODER_BLOCK, jumprelu_bandwidth: float = JUMPRELU_BANDWIDTH
):
    """`forward(params, x, dead=None, y=None) -> Output` for inputs `x [M, B, d_in]` (already
    scaled; `y`, the transcoders' targets, default x): the training-mode forward (BatchTopK
    selects over the batch), reconstruction, latents, FVU and AuxK loss per member."""
    fwd = sharded_forward(spec, mesh, spec.sparse, encoder, encoder_block, jumprelu_bandwidth=jumprelu_bandwidth)

    @jax.jit
    def apply(params, x, dead, y):
        lat, ks = _masks(spec, mesh)
        dead = jnp.zeros_like(lat) if dead is None else dead
        x = x.astype(jnp.float32)
        out = _apply(fwd, params, x, lat, ks, dead & lat)
        fvu, auxk = losses(y.astype(jnp.float32), out["x_hat"], out["e_hat"], (dead & lat).sum(1), spec.k_aux)
        return Output(out["x_hat"][-1], out.get("values"), out.get("indices"), fvu[-1], auxk, out["l0"], fvu)

    return lambda params, x, dead=None, y=None: apply(params, x, dead, x if y is None else y)


def _project_out_parallel(g_dec, w_dec):
    """Remove the gradient component along each (unit) decoder row: keeps the update tangent."""
    return g_dec - jnp.sum(g_dec * w_dec, axis=-1, keepdims=True) * w_dec


def _renormalise(w_dec):
    return w_dec / jnp.maximum(jnp.linalg.norm(w_dec, axis=-1, keepdims=True), 1e-12)


def _state_fn(spec: BankSpec, tx, init_threshold: float, encoder_scale: float):
    def make(key, sample):
        b_dec = None if sample is None else jax.vmap(geometric_median)(sample)
        params = init_params(spec, key, b_dec, init_threshold, encoder_scale)
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


def _state_shardings(spec: BankSpec, mesh, tx, abstract) -> dict:
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


def init_state(
    spec: BankSpec,
    mesh,
    tx,
    key,
    sample: np.ndarray | None,
    init_threshold: float = JUMPRELU_INIT_THRESHOLD,
    encoder_scale: float = ENCODER_INIT_SCALE,
) -> dict:
    """Parameters created already sharded; `b_dec` from the geometric median of `sample [M, N, d_out]`
    (the targets: a transcoder's output hook)."""
    make = _state_fn(spec, tx, init_threshold, encoder_scale)
    abstract = jax.eval_shape(make, key, sample)
    return jax.jit(make, out_shardings=_state_shardings(spec, mesh, tx, abstract))(key, sample)


def abstract_state(spec: BankSpec, mesh, tx) -> dict:
    """The train state as `jax.ShapeDtypeStruct`s with their shardings, nothing allocated: for
    compiling the step ahead of time (`sae-jax compile-check`)."""
    make = _state_fn(spec, tx, JUMPRELU_INIT_THRESHOLD, ENCODER_INIT_SCALE)
    sample = jax.ShapeDtypeStruct((spec.size, 8, spec.d_out), jnp.float32)
    abstract = jax.eval_shape(make, jax.random.key(0), sample)
    shardings = _state_shardings(spec, mesh, tx, abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def batchtopk_threshold(state) -> np.ndarray:
    """The inference threshold of a BatchTopK bank [M] (scaled units): the bias-corrected running mean."""
    return np.asarray(state["threshold_ema"]) / max(float(state["threshold_norm"]), 1e-12)


class TrainStep:
    """The one step builder (`train`, `compile-check`, the benchmarks and the tests all use it):
    from the bank, the mesh and the typed settings, the optimiser (`tx`, `sched`), the jitted
    `step(state, x) -> (state, metrics)` (transcoders: `step(state, x, y)`), and the state it
    runs on (`init_state`, or `abstract_state` to compile without allocating). `x [M, B, d_in]`
    are raw activations of each member's input hook, `y [M, B, d_out]` the raw targets;
    `input_scale` / `output_scale` [M] bring them to unit mean squared norm (default 1)."""

    def __init__(self, spec: BankSpec, mesh, settings: TrainSettings, input_scale=None, output_scale=None):
        self.spec, self.mesh, self.settings = spec, mesh, settings
        input_scale = np.ones(spec.size, np.float32) if input_scale is None else np.asarray(input_scale, np.float32)
        output_scale = input_scale if output_scale is None else np.asarray(output_scale, np.float32)
        self.tx, self.sched = build_optimizer(spec, settings, input_scale, output_scale)
        self.jitted = _jit_step(spec, mesh, settings, self.tx, self.sched, input_scale, output_scale)

    def __call__(self, state, x, y=None):
        return self.jitted(state, x) if y is None else self.jitted(state, x, y)

    def lower(self, *args):
        return self.jitted.lower(*args)

    def init_state(self, key, sample: np.ndarray | None) -> dict:
        """The state, created sharded; `b_dec` from the geometric median of `sample [M, N, d_out]` (scaled targets)."""
        s = self.settings
        return init_state(self.spec, self.mesh, self.tx, key, sample, s.jumprelu_init_threshold, s.encoder_init_scale)

    def abstract_state(self) -> dict:
        return abstract_state(self.spec, self.mesh, self.tx)


def member_lrs(spec: BankSpec, settings: TrainSettings) -> np.ndarray:
    """Each member's learning rate: `train.lr`, or (0) the width rule `default_lr`."""
    return np.asarray([settings.lr or default_lr(w, spec.architecture) for w in spec.widths], np.float32)


def build_optimizer(
    spec: BankSpec, settings: TrainSettings, input_scale, output_scale
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimiser of `settings`; the members' `input_scale` / `output_scale` [M] set the
    biases' rate when `train.bias_lr_units = raw` (`bias_lr_factors`)."""
    return make_optimizer(
        spec,
        member_lrs(spec, settings),
        settings.steps,
        settings.warmup_steps,
        settings.decay_frac,
        bias_lr_factors(settings, input_scale, output_scale),
        settings.decoder_lr_scale,
        (settings.adam_b1, settings.adam_b2, settings.adam_eps),
    )


def _jit_step(spec: BankSpec, mesh, settings: TrainSettings, tx, sched, input_scale, output_scale):
    s = settings
    fwd = {
        aux: sharded_forward(spec, mesh, aux and spec.sparse, s.encoder, s.encoder_block, s.encoder_dtype, s.jumprelu_bandwidth)
        for aux in (False, True)
    }
    scale = jnp.asarray(input_scale, jnp.float32)[:, None, None]
    out_scale = jnp.asarray(output_scale, jnp.float32)[:, None, None]
    widths = jnp.asarray(spec.widths, jnp.float32)
    coefs = jnp.asarray(spec.coefs if spec.coefs else [0.0] * spec.size, jnp.float32)
    renorm = spec.architecture != "relu"  # ReLU+L1 keeps free decoder norms, penalised in the L1 term
    dead_tokens, aux_coef, sparsity_warmup, threshold_decay = s.dead_tokens, s.aux_coef, s.sparsity_warmup_steps, s.threshold_decay

    def step(state, x, y=None):
        lat_mask, ks = _masks(spec, mesh)
        y = (x if y is None else y).astype(jnp.float32) * out_scale
        x = x.astype(jnp.float32) * scale
        dead = (state["tokens_since_fired"] >= dead_tokens) & lat_mask
        dead_count = dead.sum(axis=1)
        warm = jnp.minimum((state["step"] + 1).astype(jnp.float32) / max(sparsity_warmup, 1), 1.0)

        def loss_fn(params, with_aux):
            return bank_loss(fwd[with_aux], params, x, y, lat_mask, ks, dead, coefs * warm, aux_coef, spec.k_aux)

        # AuxK's cost (a second top-k and decode) only while some latent is dead: one branch runs.
        # JumpReLU and ReLU train without AuxK, as their recipes (Gemma Scope, Anthropic's L1) do.
        branches = [partial(jax.value_and_grad(loss_fn, has_aux=True), with_aux=aux) for aux in (False, True)]
        if spec.sparse:
            (loss, (fvu, auxk, sparsity, out)), grads = jax.lax.cond(dead_count.sum() > 0, branches[1], branches[0], state["params"])
        else:
            (loss, (fvu, auxk, sparsity, out)), grads = branches[0](state["params"])
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))

        def update(grads, params, opt_state):
            if renorm:
                grads["W_dec"] = _project_out_parallel(grads["W_dec"], params["W_dec"])
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            if renorm:
                params["W_dec"] = _renormalise(params["W_dec"])
            if "threshold" in params:  # a JumpReLU threshold below 0 would let negative pre-activations through
                params["threshold"] = jnp.maximum(params["threshold"], 0.0)
            return params, opt_state

        # a non-finite batch leaves parameters and optimiser state as they were: one branch runs
        # (a select over every parameter would cost a pass over params and Adam's moments)
        params, opt_state = jax.lax.cond(finite, update, lambda g, p, o: (p, o), grads, state["params"], state["opt_state"])
        n_tokens = x.shape[1]
        fired = out["fired"]
        since = jnp.where(fired > 0, 0, state["tokens_since_fired"] + n_tokens)
        new = {
            "params": params,
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "tokens_since_fired": jnp.where(finite, since, state["tokens_since_fired"]),
            "fire_counts": state["fire_counts"] + jnp.where(finite, fired, 0).astype(jnp.float32),
            "nan_skips": state["nan_skips"] + (~finite),
            "nan_streak": jnp.where(finite, 0, state["nan_streak"] + 1),
        }
        metrics = {
            "loss": loss,
            "fvu": fvu[-1],
            "auxk_loss": auxk,
            "l0": out["l0"].mean(-1),
            "dead_frac": dead_count / widths,
            "dense_frac": ((fired > n_tokens / 10) & lat_mask).sum(1) / widths,
            "lr_factor": sched(state["step"]),
            "finite": finite,
        }
        if spec.prefixes:
            metrics["prefix_fvu"] = fvu.T  # [M, P]
        if not spec.sparse:
            metrics["sparsity_loss"] = sparsity
        if spec.architecture == "jumprelu":
            metrics["threshold_mean"] = (params["threshold"] * lat_mask).sum(1) / widths
        if spec.architecture == "batchtopk":
            d = threshold_decay
            new["threshold_ema"] = jnp.where(finite, d * state["threshold_ema"] + (1 - d) * out["threshold"], state["threshold_ema"])
            new["threshold_norm"] = jnp.where(finite, d * state["threshold_norm"] + (1 - d), state["threshold_norm"])
            metrics["threshold"] = out["threshold"]
            metrics["capped_frac"] = out["capped"]
        return new, metrics

    x_sharding = parallel.sharding(mesh, "x")
    # the new state leaves in the shardings the state was made in (`init_state`): else XLA picks
    # its own for the outputs (on a 1x1 mesh W_dec came back P() and b_dec P(None, 'model')), the
    # second step sees other input shardings and compiles the step again (4.4 s at 2^14 latents
    # on CPU), and a donated buffer cannot be reused for an output laid out otherwise
    out = (jax.tree.map(lambda a: a.sharding, abstract_state(spec, mesh, tx)), parallel.NamedSharding(mesh, parallel.P()))
    if spec.transcoder:
        return jax.jit(step, donate_argnums=0, in_shardings=(None, x_sharding, x_sharding), out_shardings=out)
    return jax.jit(lambda state, x: step(state, x), donate_argnums=0, in_shardings=(None, x_sharding), out_shardings=out)
