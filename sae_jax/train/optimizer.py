"""The optimiser: Adam (the matrices' moments kept in `train.optimizer_state`: `train/adam.py`)
with a warmup-constant-decay schedule, one learning rate per bank member, and per-parameter
factors (biases, decoder), as one optax chain.

    tx, sched = build_optimizer(spec, settings, input_scale, output_scale)

Every number comes from `TrainSettings` (defaults: `sae_jax/config.py`); `make_optimizer` is the
same chain from explicit values, for tools and tests.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from sae_jax.sae.bank import BankSpec
from sae_jax.train.adam import scale_by_adam_lean
from sae_jax.train.settings import TrainSettings, base_lr

BIASES = ("b_enc", "b_dec")  # the parameters `bias_lr_scale` applies to


def default_lr(width: int, architecture: str) -> float:
    """`settings.base_lr` at 2^14 latents, scaled by 1/sqrt(width / 2^14) (sparsify's width rule,
    whose base is 4x lower; docs/design.md, "The recipe", has the measurements behind ours)."""
    return base_lr(architecture) / float(np.sqrt(width / 2**14))


def member_lrs(spec: BankSpec, settings: TrainSettings) -> np.ndarray:
    """Each member's learning rate: `train.lr`, or (0) the width rule `default_lr`."""
    return np.asarray([settings.lr or default_lr(w, spec.architecture) for w in spec.widths], np.float32)


def bias_lr_factors(settings: TrainSettings, input_scale, output_scale) -> dict[str, np.ndarray]:
    """Each bias's learning rate over its member's [M]: `train.bias_lr_scale`, in the units
    `train.bias_lr_units` names. `scaled`: as given, in the units the step trains in (inputs at
    unit mean squared norm). `raw`: times the scale of the bias's own hook (b_enc: the input's,
    b_dec: the target's), so that the bias moves at `bias_lr_scale x lr` a step in the store's
    units whatever their size: Adam moves a parameter by about its lr a step, and in scaled units
    that is 1/s = sqrt(mean squared norm) times more, relative to the data, than in raw units
    (docs/design.md, "The recipe", has the sizes on real and synthetic stores)."""
    s_in = np.asarray(input_scale, np.float32)
    s_out = np.asarray(output_scale, np.float32)
    c = np.full(s_in.shape, settings.bias_lr_scale, np.float32)
    if settings.bias_lr_units == "scaled":
        return {"b_enc": c, "b_dec": c}
    return {"b_enc": c * s_in, "b_dec": c * s_out}


def schedule(steps: int, warmup: int, decay_frac: float) -> optax.Schedule:
    """The learning-rate factor of update `count` (0-based): linear warmup over `warmup` updates
    (0: full from the first), constant, then linear decay to 0 over the last `decay_frac` of steps."""
    decay_start = int(steps * (1 - decay_frac))

    def sched(count):
        t = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(t / warmup, 1.0) if warmup > 0 else 1.0
        decay = jnp.clip(1.0 - (t - decay_start) / max(steps - decay_start, 1), 0.0, 1.0)
        return warm * decay

    return sched


def make_optimizer(
    lrs: np.ndarray,
    sched: optax.Schedule,
    *,
    bias_lr_scale: float | dict,
    decoder_lr_scale: float,
    adam: tuple[float, float, float],
    state_dtype: str,
) -> optax.GradientTransformation:
    """Adam (`adam`: b1, b2, eps; its matrices' moments kept in `state_dtype`: `adam.scale_by_adam_lean`) scaled by `sched`. Each member has its own learning rate `lrs`
    [M] (leading bank axis); the biases (`BIASES`) take `bias_lr_scale` times it (a number, or per
    bias an array [M]: `bias_lr_factors`) and the decoder `decoder_lr_scale` times it
    (docs/design.md, "The recipe")."""
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
        scale_by_adam_lean(*adam, state_dtype),
        optax.scale_by_schedule(sched),
        optax.GradientTransformation(lambda p: optax.EmptyState(), per_member),
    )


def build_optimizer(
    spec: BankSpec, settings: TrainSettings, input_scale, output_scale
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimiser, schedule) of `settings`; the members' `input_scale` / `output_scale` [M] set
    the biases' rate when `train.bias_lr_units = raw` (`bias_lr_factors`)."""
    s = settings
    sched = schedule(s.steps, s.warmup_steps, s.decay_frac)
    tx = make_optimizer(
        member_lrs(spec, s),
        sched,
        bias_lr_scale=bias_lr_factors(s, input_scale, output_scale),
        decoder_lr_scale=s.decoder_lr_scale,
        adam=(s.adam_b1, s.adam_b2, s.adam_eps),
        state_dtype=s.optimizer_state,
    )
    return tx, sched
