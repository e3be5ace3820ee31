"""The train step, `train_step(state, x, y=None, *, spec, mesh, settings, ...) -> (state, metrics)`:
one optimiser step of a bank on a batch, a pure function that `TrainStep` jits over the mesh
(donating the state, fixing the shardings of what it returns).

A batch whose loss or gradients are not finite leaves params and optimiser state untouched and
is counted (`nan_skips`, `nan_streak`), so NaN never reaches a checkpoint. The state and its
shardings: `train.state`; the optimiser: `train.optimizer`.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sae_jax import parallel
from sae_jax.kernels.topk import EncoderOptions, grads_latent_major
from sae_jax.sae.bank import BankSpec, aux_window, forward_dense, forward_sparse, losses
from sae_jax.train import resample
from sae_jax.train.optimizer import build_optimizer
from sae_jax.train.settings import TrainSettings
from sae_jax.train.state import abstract_state, init_state
from sae_jax.train.update import apply_update, platform_budget


class Output(NamedTuple):
    x_hat: jax.Array  # [M, B, d_out]
    values: jax.Array | None  # [M, B, C] (sparse architectures; zero beyond each member's selection)
    indices: jax.Array | None  # [M, B, C] global latent ids
    fvu: jax.Array  # [M]
    auxk_loss: jax.Array  # [M]
    l0: jax.Array  # [M, B] active latents per row
    prefix_fvu: jax.Array  # [P, M] FVU of each Matryoshka prefix (P = 1 without prefixes)


def sharded_forward(spec: BankSpec, mesh, with_aux: bool, options: EncoderOptions, jumprelu_bandwidth: float):
    """The bank forward over the mesh: `fwd(params, x, latent_mask, ks, dead) -> dict` (see
    `bank.forward_sparse`); x is the encoder's input hook, already scaled. `options`: the TopK
    encoder; `jumprelu_bandwidth`: JumpReLU's straight-through kernel width."""
    n_model = mesh.shape["model"]
    S, P = parallel.pspec, parallel.P
    if spec.sparse:
        fn = partial(forward_sparse, spec=spec, n_model=n_model, with_aux=with_aux, options=options)
    else:
        fn = partial(forward_dense, spec=spec, jumprelu_bandwidth=jumprelu_bandwidth, options=options)
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
    in_specs = ({k: S(k) for k in names if k != "W_skip"}, S("x"), S("latents"), P(), S("latents"))
    if mesh.size == 1:
        return _one_device(fn)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out, check_vma=False)


def _one_device(fn):
    """`fn` with the mesh's axis names bound by two vmaps of size 1 instead of shard_map: on one
    device shard_map's collectives stay in the program as one-participant all-reduces (a copy of
    the gradients every step), while a vmapped axis of size 1 reduces to nothing after XLA's
    simplification."""
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


def bank_loss(fwd, params, x, y, lat, ks, dead, coefs, aux_coef: float, k_aux: int, window=None):
    """The training objective, summed over members: the FVU of every reconstruction (Matryoshka:
    each prefix), aux_coef x AuxK, and coefs x the mean per-row sparsity penalty (L1 / L0).
    `window`: the dead latents AuxK picks from this step (`bank.aux_window`; default all of
    `dead`); AuxK's weight counts all of them. Returns (loss, (fvu [P, M], auxk [M], sparsity [M],
    forward outputs))."""
    out = _apply(fwd, params, x, lat, ks, dead if window is None else window)
    fvu, auxk = losses(y, out["x_hat"], out["e_hat"], dead.sum(1), k_aux)
    sparsity = coefs * out["penalty"].mean(-1)
    return jnp.sum(fvu.sum(0) + aux_coef * auxk + sparsity), (fvu, auxk, sparsity, out)


def make_loss(spec: BankSpec, mesh, settings: TrainSettings | None = None, with_aux: bool = False):
    """`loss(params, x, y, dead, coefs, aux_coef) -> (loss, aux)` on scaled inputs: `bank_loss` over
    the mesh (tests, tools); `settings` (None: the config's defaults) choose the encoder."""
    s = settings or TrainSettings.defaults()
    fwd = sharded_forward(spec, mesh, with_aux, s.encoder_options, s.jumprelu_bandwidth)

    def loss(params, x, y, dead, coefs, aux_coef=0.0, step=0):
        lat, ks = _masks(spec, mesh)
        dead = dead & lat
        return bank_loss(fwd, params, x, y, lat, ks, dead, coefs, aux_coef, spec.k_aux, _window(spec, mesh, dead, step))

    return loss


def make_bank_forward(spec: BankSpec, mesh, settings: TrainSettings | None = None):
    """`forward(params, x, dead=None, y=None) -> Output` for inputs `x [M, B, d_in]` (already
    scaled; `y`, the transcoders' targets, default x): the training-mode forward (BatchTopK
    selects over the batch), reconstruction, latents, FVU and AuxK loss per member. `settings`
    (None: the config's defaults) choose the encoder."""
    s = settings or TrainSettings.defaults()
    fwd = sharded_forward(spec, mesh, spec.sparse, s.encoder_options, s.jumprelu_bandwidth)

    @jax.jit
    def apply(params, x, dead, y):
        lat, ks = _masks(spec, mesh)
        dead = jnp.zeros_like(lat) if dead is None else dead
        x = x.astype(jnp.float32)
        out = _apply(fwd, params, x, lat, ks, _window(spec, mesh, dead & lat, 0))
        fvu, auxk = losses(y.astype(jnp.float32), out["x_hat"], out["e_hat"], (dead & lat).sum(1), spec.k_aux)
        return Output(out["x_hat"][-1], out.get("values"), out.get("indices"), fvu[-1], auxk, out["l0"], fvu)

    return lambda params, x, dead=None, y=None: apply(params, x, dead, x if y is None else y)


def _window(spec: BankSpec, mesh, dead, step):
    """The dead latents AuxK picks from at `step`: `bank.aux_window` with the bank's pool, or all."""
    return aux_window(dead, step, spec.aux_pool, mesh.shape["model"]) if spec.aux_pool else dead


def _scales(spec: BankSpec, input_scale, output_scale) -> tuple[np.ndarray, np.ndarray]:
    """[M] factors bringing each member's input and target hooks to unit mean squared norm (default 1)."""
    s_in = np.ones(spec.size, np.float32) if input_scale is None else np.asarray(input_scale, np.float32)
    return s_in, (s_in if output_scale is None else np.asarray(output_scale, np.float32))


def _prepared(spec: BankSpec, mesh, settings: TrainSettings, x, y, input_scale, output_scale):
    """What a step and a resampling both begin with: (optimiser, schedule, latent mask, ks, x, y),
    x and y (default x) scaled to unit mean squared norm in float32."""
    input_scale, output_scale = _scales(spec, input_scale, output_scale)
    tx, sched = build_optimizer(spec, settings, input_scale, output_scale)
    lat_mask, ks = _masks(spec, mesh)
    y = (x if y is None else y).astype(jnp.float32) * jnp.asarray(output_scale)[:, None, None]
    x = x.astype(jnp.float32) * jnp.asarray(input_scale)[:, None, None]
    return tx, sched, lat_mask, ks, x, y


def _update(grads, state, tx, spec: BankSpec, mesh, finite, enc_latent_major: bool):
    """(params, opt_state, ok) after the optimiser's step (`train.update.apply_update`), on each
    device's own latents: the matrices' block loop slices the latent axis, which `shard_map` keeps
    local where the latents are split over `model`. `finite`: whether the loss is; `ok`: whether
    it and every gradient are (each device checks its own part, then all agree). Checked here,
    after the conditional that chose the AuxK branch and inside the per-device program: checked
    in the branches or between the two, libtpu's compiler kept parameter-sized boolean arrays and
    copies of the gradients among the branches' results (v5p:4x4x8, 2^26 latents: 98.40 G
    needed with the check there, 83.77 GiB with it here)."""
    renorm = spec.architecture != "relu"  # ReLU+L1 keeps free decoder norms, penalised in the L1 term
    fn = partial(apply_update, tx=tx, renorm=renorm, enc_latent_major=enc_latent_major, latents=spec.width, budget=platform_budget())
    params, opt_state = state["params"], state["opt_state"]

    def all_finite(g, loss_finite, axes=()):
        ok = loss_finite & jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(g)]))
        return ok if not axes else jax.lax.pmin(ok.astype(jnp.int32), axes).astype(bool)

    if mesh.size == 1:
        ok = all_finite(grads, finite)
        return (*fn(grads, params, opt_state, finite=ok), ok)
    n_model = mesh.shape["model"]
    S, P = parallel.pspec, parallel.P
    pspecs = {k: S(k) for k in params}
    gspecs = {**pspecs, "W_enc": P(None, "model", None)} if enc_latent_major else pspecs
    ospecs = optax.tree_utils.tree_map_params(tx, lambda _, s: s, opt_state, pspecs, transform_non_params=lambda _: P())

    def local(g, p, o, loss_finite):
        offset = 0 if n_model == 1 else jax.lax.axis_index("model") * (spec.width // n_model)
        ok = all_finite(g, loss_finite, ("data", "model"))
        return (*fn(g, p, o, finite=ok, latent_offset=offset), ok)

    return jax.shard_map(local, mesh=mesh, in_specs=(gspecs, pspecs, ospecs, P()), out_specs=(pspecs, ospecs, P()), check_vma=False)(
        grads, params, opt_state, finite
    )


def train_step(
    state: dict,
    x: jax.Array,
    y: jax.Array | None = None,
    *,
    spec: BankSpec,
    mesh,
    settings: TrainSettings,
    input_scale=None,
    output_scale=None,
) -> tuple[dict, dict]:
    """One optimiser step of the bank `spec` on a batch: `x [M, B, d_in]` raw activations of each
    member's input hook, `y [M, B, d_out]` a transcoder's raw targets (SAEs: x). `input_scale` /
    `output_scale` [M] bring them to unit mean squared norm (default 1). Returns (the new state,
    metrics: loss, fvu, auxk_loss, l0, dead_frac, dense_frac, lr_factor, finite, and per
    architecture prefix_fvu, sparsity_loss, threshold_mean, threshold, capped_frac). Pure: jit it
    over `mesh` (`TrainStep` does)."""
    s = settings
    tx, sched, lat_mask, ks, x, y = _prepared(spec, mesh, s, x, y, input_scale, output_scale)
    widths = jnp.asarray(spec.widths, jnp.float32)
    coefs = jnp.asarray(spec.coefs if spec.coefs else [0.0] * spec.size, jnp.float32)
    dead = (state["tokens_since_fired"] >= s.dead_tokens) & lat_mask
    dead_count = dead.sum(axis=1)
    window = _window(spec, mesh, dead, state["step"])
    warm = jnp.minimum((state["step"] + 1).astype(jnp.float32) / max(s.sparsity_warmup_steps, 1), 1.0)

    def loss_fn(params, with_aux):
        fwd = sharded_forward(spec, mesh, with_aux and spec.sparse, s.encoder_options, s.jumprelu_bandwidth)
        return bank_loss(fwd, params, x, y, lat_mask, ks, dead, coefs * warm, s.aux_coef, spec.k_aux, window)

    # AuxK's cost (a second top-k and decode) only while some latent is dead: one branch runs.
    # JumpReLU and ReLU train without AuxK, as their recipes (Gemma Scope, Anthropic's L1) do.
    # The sparse backward builds W_enc's gradient latent-major ([M, S, d_in]; the native CPU
    # kernels write it transposed): the branches return it so, and the update reads it block by
    # block, transposing each block (a whole transpose would be a parameter-sized copy).
    enc_latent_major = spec.sparse and grads_latent_major() and platform_budget() is not None

    # On a TPU mesh of more than one chip the update runs inside each branch: with it after the
    # `cond`, libtpu kept each gradient twice and a parameter-sized finite map among the branch's
    # results (v5e:2x2, 2^18 latents a chip over model=4: 18.61 GiB needed, 15.84 with it inside).
    # One device, and GPUs (whole-array update), update after it: inside, the H100 step at 2^20
    # latents needs 8.8 GiB more (docs/benchmarks.md, "The step on a mesh of TPU chips").
    update_inside = mesh.size > 1 and platform_budget() is not None

    def branch(aux):
        def run(operand):
            params, opt_state = operand if update_inside else (operand, None)
            (loss, aux_out), grads = jax.value_and_grad(partial(loss_fn, with_aux=aux), has_aux=True)(params)
            if enc_latent_major:
                grads = {**grads, "W_enc": jnp.swapaxes(grads["W_enc"], 1, 2)}
            if not update_inside:
                return (loss, aux_out), grads
            # a non-finite batch leaves parameters and optimiser state as they were
            return (loss, aux_out), _update(
                grads, {"params": params, "opt_state": opt_state}, tx, spec, mesh, jnp.isfinite(loss), enc_latent_major
            )

        return run

    operand = (state["params"], state["opt_state"]) if update_inside else state["params"]
    if spec.sparse:
        (loss, (fvu, auxk, sparsity, out)), res = jax.lax.cond(dead_count.sum() > 0, branch(True), branch(False), operand)
    else:
        (loss, (fvu, auxk, sparsity, out)), res = branch(False)(operand)
    if update_inside:
        params, opt_state, finite = res
    else:  # a non-finite batch leaves parameters and optimiser state as they were
        params, opt_state, finite = _update(res, state, tx, spec, mesh, jnp.isfinite(loss), enc_latent_major)
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
        d = s.threshold_decay
        new["threshold_ema"] = jnp.where(finite, d * state["threshold_ema"] + (1 - d) * out["threshold"], state["threshold_ema"])
        new["threshold_norm"] = jnp.where(finite, d * state["threshold_norm"] + (1 - d), state["threshold_norm"])
        metrics["threshold"] = out["threshold"]
        metrics["capped_frac"] = out["capped"]
    return new, metrics


def resample_state(
    state: dict,
    x: jax.Array,
    y: jax.Array | None = None,
    *,
    spec: BankSpec,
    mesh,
    settings: TrainSettings,
    input_scale=None,
    output_scale=None,
) -> tuple[dict, jax.Array]:
    """The dead latents of the bank resampled before a step on the batch `x` (`y`: transcoders'
    targets), as `train.resample` describes: latents that fired on none of the last
    `train.resample_tokens` tokens. Returns (the new state, latents resampled per member [M]). Pure:
    jit it over `mesh` (`TrainStep.resample`)."""
    s = settings
    tx, _, lat_mask, ks, x, y = _prepared(spec, mesh, s, x, y, input_scale, output_scale)
    window = resample.resample_steps(s.batch_size, s.resample_tokens) * x.shape[1]
    dead = (state["tokens_since_fired"] >= window) & lat_mask
    fwd = sharded_forward(spec, mesh, False, s.encoder_options, s.jumprelu_bandwidth)
    x_hat = _apply(fwd, state["params"], x, lat_mask, ks, jnp.zeros_like(dead))["x_hat"][-1]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(s.seed), 0x5E5A), state["step"])
    ids, dec_dirs, enc_cols = resample.choose(x, y, x_hat, dead, lat_mask, state["params"]["W_enc"], key, spec.transcoder)
    params, opt_state, since = resample.apply(
        state["params"], state["opt_state"], state["tokens_since_fired"], ids, dec_dirs, enc_cols, mesh=mesh, tx=tx, width=spec.width
    )
    return {**state, "params": params, "opt_state": opt_state, "tokens_since_fired": since}, resample.count(ids, spec.width)


class TrainStep:
    """`train_step` jitted over the mesh (`train`, `compile-check`, the benchmarks and the tests all
    use it): `step(state, x) -> (state, metrics)` (transcoders: `step(state, x, y)`), the state
    donated, and the state it runs on (`init_state`, or `abstract_state` to compile without
    allocating). `tx`, `sched`: the optimiser and its schedule."""

    def __init__(self, spec: BankSpec, mesh, settings: TrainSettings, input_scale=None, output_scale=None):
        self.spec, self.mesh, self.settings = spec, mesh, settings
        input_scale, output_scale = _scales(spec, input_scale, output_scale)
        self.tx, self.sched = build_optimizer(spec, settings, input_scale, output_scale)
        x_sharding = parallel.sharding(mesh, "x")
        # the new state leaves in the shardings the state was made in (`init_state`): else XLA
        # picks its own for the outputs, the second step sees other input shardings and compiles
        # again, and a donated buffer cannot be reused for an output laid out otherwise
        out = (jax.tree.map(lambda a: a.sharding, self.abstract_state()), parallel.NamedSharding(mesh, parallel.P()))

        def jit(f):
            """`f(state, x[, y])` over the mesh, the state donated (transcoders take y, SAEs not)."""
            f = partial(f, spec=spec, mesh=mesh, settings=settings, input_scale=input_scale, output_scale=output_scale)
            if spec.transcoder:
                return jax.jit(f, donate_argnums=0, in_shardings=(None, x_sharding, x_sharding), out_shardings=out)
            return jax.jit(lambda state, x: f(state, x), donate_argnums=0, in_shardings=(None, x_sharding), out_shardings=out)

        self.jitted = jit(train_step)
        # dead latents resampled every `resample_every` steps (0: never; `train.resample`), a program apart
        self.resample_every = resample.resample_steps(settings.batch_size, settings.resample_tokens)
        self.resample_jitted = jit(resample_state)

    def __call__(self, state, x, y=None):
        return self.jitted(state, x) if y is None else self.jitted(state, x, y)

    def lower(self, *args):
        return self.jitted.lower(*args)

    def resamples_before(self, step: int) -> bool:
        """Whether the dead latents are resampled before step `step` (0-based; `train.resample`)."""
        s = self.settings
        return resample.resamples_at(step, self.resample_every, s.steps, s.decay_frac)

    def resample(self, state, x, y=None):
        """`resample_state` jitted over the mesh, the state donated: (state, latents resampled [M])."""
        return self.resample_jitted(state, x) if y is None else self.resample_jitted(state, x, y)

    def init_state(self, key, sample: np.ndarray | None) -> dict:
        """The state, created sharded; `b_dec` from the geometric median of `sample [M, N, d_out]` (scaled targets)."""
        s = self.settings
        return init_state(
            self.spec, self.mesh, self.tx, key, sample, init_threshold=s.jumprelu_init_threshold, encoder_scale=s.encoder_init_scale
        )

    def abstract_state(self) -> dict:
        return abstract_state(self.spec, self.mesh, self.tx)
