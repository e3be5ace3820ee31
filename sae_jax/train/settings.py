"""`TrainSettings`: the `train` section of a config read once into a typed, frozen value, with
every rule that does not need the store checked before any work (MaxText's
`validate_train_config`). `train`, `compile-check` and the benchmarks all build from it.

    s = TrainSettings.from_config(c.train)            # the CLI, before the store is opened
    s = TrainSettings.defaults(widths=(4096,), ks=(8,))  # code: the config's defaults, a few changed
    data, model = s.mesh_shape(jax.device_count())    # the rules that need the device count

The defaults live in one place, `sae_jax/config.py` (with a comment per field, which is also
what `sae-jax train --help` prints); this module only types and checks them. A bad value is a
`SettingsError` naming the key (`train.lr=-1.0: must be >= 0 ...`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

from sae_jax.config import ARCH_LR_AT_2_14, AUX_POOL_PER_K, K_AUX_MAX, LR_AT_2_14
from sae_jax.errors import SaeJaxError

# the fields that make a run what it is: a run directory holding other values is another run
IDENTITY = (
    "store", "hooks", "widths", "ks", "batch_size", "steps", "lr", "warmup_steps", "decay_frac", "dead_tokens",
    "aux_coef", "k_aux", "seed", "holdout_shards", "architecture", "out_hooks", "skip", "l1_coefs", "l0_coefs",
    "sparsity_warmup_frac", "jumprelu_bandwidth", "jumprelu_init_threshold", "batchtopk_cap", "threshold_decay",
    "matryoshka_prefixes", "encoder_init_scale", "bias_lr_scale", "bias_lr_units", "decoder_lr_scale",
    "adam_b1", "adam_b2", "adam_eps", "optimizer_state", "resample_tokens", "aux_pool",
)  # fmt: skip


def base_lr(architecture: str) -> float:
    """The default learning rate at 2^14 latents for an architecture (`train.lr = 0`)."""
    return ARCH_LR_AT_2_14.get(architecture, LR_AT_2_14)


def lr_rule(architecture: str) -> str:
    """The learning rate `train.lr = 0` stands for, as a run's identity records it."""
    return f"{base_lr(architecture):g} / sqrt(width / 2^14)"


LR_RULE = lr_rule("topk")
# identity fields added after runs existed: the value those runs trained with (not today's default)
LEGACY = {
    "bias_lr_scale": 1.0,
    "bias_lr_units": "scaled",
    "decoder_lr_scale": 1.0,
    "adam_b1": 0.9,
    "adam_b2": 0.999,
    "adam_eps": 1e-8,
    "optimizer_state": "float32",
    "aux_pool": -1,
    "lr_rule": "0.0002 / sqrt(width / 2^14)",
}
BIAS_LR_UNITS = ("raw", "scaled")
OPTIMIZER_STATES = (
    "bfloat16",
    "float32",
)  # train.optimizer_state (train/optimizer.py, `scale_by_adam_lean`)  # how train.bias_lr_scale is read (train/step.py, `bias_lr_factors`)


class SettingsError(SaeJaxError, ValueError):
    """A train setting with a value no run can use; the message names the key."""


@dataclass(frozen=True)
class TrainSettings:
    """Every field of `config.train`, typed (see `sae_jax/config.py` for what each one means)."""

    store: str
    run_dir: str
    architecture: str
    hooks: tuple[str, ...]
    out_hooks: tuple[str, ...]
    skip: bool
    widths: tuple[int, ...]
    ks: tuple[int, ...]
    l1_coefs: tuple[float, ...]
    l0_coefs: tuple[float, ...]
    sparsity_warmup_frac: float
    jumprelu_bandwidth: float
    jumprelu_init_threshold: float
    batchtopk_cap: int
    threshold_decay: float
    matryoshka_prefixes: tuple[int, ...]
    batch_size: int
    steps: int
    lr: float
    bias_lr_scale: float
    bias_lr_units: str
    decoder_lr_scale: float
    adam_b1: float
    adam_b2: float
    adam_eps: float
    optimizer_state: str
    warmup_steps: int
    decay_frac: float
    dead_tokens: int
    aux_coef: float
    k_aux: int
    aux_pool: int
    resample_tokens: int
    encoder_init_scale: float
    encoder: str
    encoder_block: int
    encoder_dtype: str
    mesh_data: int
    mesh_model: int
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    seed: int
    holdout_shards: int
    max_nan_streak: int
    verify_store: bool
    progress: bool

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, t) -> TrainSettings:
        """Read `config.train` (a ConfigDict or a mapping): every field parsed to its type and checked."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in t]
        if missing:
            raise SettingsError(f"train.{missing[0]}: missing from the config (start from sae_jax.config.default_config())")
        hints = typing.get_type_hints(cls)
        return cls(**{n: _parse(n, t[n], hints[n]) for n in names})

    @classmethod
    def defaults(cls, **overrides) -> TrainSettings:
        """The config's defaults with `overrides` (typed values: tuples for lists) applied and checked."""
        from sae_jax.config import default_config

        return dataclasses.replace(cls.from_config(default_config().train), **overrides)

    def replace(self, **overrides) -> TrainSettings:
        return dataclasses.replace(self, **overrides)

    def __post_init__(self):
        _check(self)

    # ---- derived values ------------------------------------------------------------------------
    @property
    def sparse(self) -> bool:
        from sae_jax.sae.bank import SPARSE

        return self.architecture in SPARSE

    @property
    def coefs(self) -> tuple[float, ...]:
        """The sparsity coefficients of this architecture (relu: L1, jumprelu: L0); () for TopK."""
        return {"relu": self.l1_coefs, "jumprelu": self.l0_coefs}.get(self.architecture, ())

    @property
    def encoder_options(self):
        """The TopK encoder's settings as the one value the kernels take (`kernels.topk.EncoderOptions`)."""
        from sae_jax.kernels.topk import EncoderOptions

        return EncoderOptions(self.encoder, self.encoder_block, self.encoder_dtype)

    def k_aux_for(self, d_in: int) -> int:
        """AuxK's k for inputs of width d_in: `train.k_aux`, or (0) d_in // 2 capped by `config.K_AUX_MAX` and the smallest width."""
        return self.k_aux or min(d_in // 2, K_AUX_MAX, min(self.widths))

    def aux_pool_for(self, d_in: int, width: int) -> int:
        """AuxK's pool for a bank of (padded) `width` latents: `train.aux_pool`, or (0) 4 x k_aux
        (`config.AUX_POOL_PER_K`); 0 when it covers the width (-1, or >= width: every dead latent,
        the sparse path). A pool below AuxK's k is an error naming both."""
        k_aux = self.k_aux_for(d_in)
        pool = self.aux_pool or AUX_POOL_PER_K * k_aux
        if pool < 0 or pool >= width:
            return 0
        if pool < k_aux:
            raise SettingsError(
                f"train.aux_pool={pool}: must be at least AuxK's k ({k_aux}; train.k_aux), or 0 (auto) / -1 (every dead latent)"
            )
        return pool

    @property
    def sparsity_warmup_steps(self) -> int:
        return int(round(self.sparsity_warmup_frac * self.steps))

    def mesh_shape(self, devices: int, where: str = "") -> tuple[int, int]:
        """(data, model) over `devices` devices (`where`: how they are spread, for the message):
        every device used, the batch split evenly over `data`."""
        model = self.mesh_model
        if devices % model:
            raise SettingsError(
                f"train.mesh_model={model} does not divide the {devices} devices{where}: choose a divisor of {devices} "
                f"({', '.join(str(d) for d in range(1, devices + 1) if devices % d == 0)})"
            )
        data = self.mesh_data or devices // model
        if data * model != devices:
            raise SettingsError(
                f"train.mesh_data={data} x train.mesh_model={model} = {data * model} devices, there are {devices}{where}: "
                f"set train.mesh_data={devices // model} (or 0 for every device not on the model axis)"
            )
        if self.batch_size % data:
            raise SettingsError(f"train.batch_size={self.batch_size} does not divide over {data} data-parallel devices (train.mesh_data)")
        return data, model

    def identity(self) -> dict:
        """The run-defining fields as JSON values (lists joined by commas, as in the config), and
        the rule `lr = 0` stands for (a run resumed under another rule would be another run)."""
        return {**{k: _canonical(getattr(self, k)) for k in IDENTITY}, "lr_rule": lr_rule(self.architecture) if self.lr == 0 else ""}

    @classmethod
    def canonical_identity(cls, raw: dict) -> dict:
        """An identity as written by any earlier run (missing keys: what such runs used, `LEGACY`,
        else the default), normalised like `identity()`, so that "64, 128" and "64,128" are the same run."""
        from sae_jax.config import default_config

        base = default_config().train
        hints = typing.get_type_hints(cls)
        out = {}
        for k in IDENTITY:
            v = raw.get(k, LEGACY.get(k, base[k]))
            try:
                out[k] = _canonical(_parse(k, v, hints[k]))
            except SettingsError:
                out[k] = v
        out["lr_rule"] = raw.get("lr_rule", LEGACY["lr_rule"]) if out["lr"] == 0 else ""
        return out


# ---- parsing ---------------------------------------------------------------------------------
def _parse(name: str, value, hint):
    key = f"train.{name}"
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        parts = value if isinstance(value, list | tuple) else [v.strip() for v in str(value).split(",") if v.strip()]
        try:
            return tuple(item(v.strip() if isinstance(v, str) else v) for v in parts)
        except (TypeError, ValueError):
            what = {int: "integers", float: "numbers", str: "names"}[item]
            raise SettingsError(f"{key}={value!r}: expected comma-separated {what}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "false", "0"):
            return str(value).lower() in ("true", "1")
        raise SettingsError(f"{key}={value!r}: expected True or False")
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                return int(str(value))
            except ValueError:
                raise SettingsError(f"{key}={value!r}: expected an integer") from None
        return value
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{key}={value!r}: expected a number") from None
    return str(value)


def _canonical(v):
    return ",".join(str(x) for x in v) if isinstance(v, tuple) else v


# ---- the rules -------------------------------------------------------------------------------
def _check(s: TrainSettings) -> None:
    from sae_jax.kernels.topk import ENCODER_DTYPES, ENCODERS
    from sae_jax.sae.bank import ARCHITECTURES

    def bad(name, want):
        v = getattr(s, name)
        raise SettingsError(f"train.{name}={_canonical(v)!r}: {want}")

    finite = lambda v: isinstance(v, int | float) and math.isfinite(v)  # noqa: E731
    for name in ("store", "run_dir"):
        if not getattr(s, name).strip():
            bad(name, "must name a directory")
    if s.architecture not in ARCHITECTURES:
        bad("architecture", f"choose from {', '.join(ARCHITECTURES)}")
    if not s.widths or min(s.widths) < 1:
        bad("widths", "one or more positive widths")
    own = {"relu": "l1_coefs", "jumprelu": "l0_coefs"}.get(s.architecture)
    for name in ("l1_coefs", "l0_coefs"):
        if name != own and getattr(s, name):
            bad(name, f"set, but train.architecture={s.architecture!r} does not use it")
    if own is None:
        if not s.ks:
            bad("ks", f"train.architecture={s.architecture!r} needs at least one k")
        if min(s.ks) < 1 or max(s.ks) > min(s.widths):
            bad("ks", f"every k must be between 1 and the smallest width ({min(s.widths)})")
    else:
        if not getattr(s, own):
            bad(own, f"train.architecture={s.architecture!r} needs one or more sparsity coefficients")
        for c in getattr(s, own):
            if not (finite(c) and c >= 0):
                bad(own, f"coefficients must be finite and >= 0 (got {c})")
    if s.out_hooks and s.hooks and len(s.out_hooks) != len(s.hooks):
        bad(
            "out_hooks", f"lists {len(s.out_hooks)} hook(s) for {len(s.hooks)} input hook(s) in train.hooks: one output hook per input hook"
        )
    if s.out_hooks and not s.hooks:
        bad("out_hooks", "name the transcoders' input hooks in train.hooks (one per output hook)")
    if s.skip and not s.out_hooks:
        bad("skip", "a transcoder setting: set train.out_hooks too")
    if s.matryoshka_prefixes:
        p = s.matryoshka_prefixes
        if own is not None:
            bad("matryoshka_prefixes", f"Matryoshka works with topk or batchtopk, not {s.architecture!r}")
        if p[0] < 1 or any(b <= a for a, b in zip(p, p[1:])) or p[-1] >= min(s.widths):
            bad(
                "matryoshka_prefixes",
                f"prefix sizes must be positive, strictly increasing and below the smallest width ({min(s.widths)}; the full width is the last prefix)",
            )
    rules = [
        ("sparsity_warmup_frac", 0 <= s.sparsity_warmup_frac <= 1, "must be in [0, 1]"),
        ("jumprelu_bandwidth", s.jumprelu_bandwidth > 0 and finite(s.jumprelu_bandwidth), "must be > 0"),
        ("jumprelu_init_threshold", s.jumprelu_init_threshold > 0 and finite(s.jumprelu_init_threshold), "must be > 0"),
        ("batchtopk_cap", s.batchtopk_cap >= 1, "at least 1 (candidates per row = cap x k)"),
        ("threshold_decay", 0 <= s.threshold_decay < 1, "must be in [0, 1)"),
        ("batch_size", s.batch_size >= 1, "must be positive"),
        ("steps", s.steps >= 1, "must be positive"),
        ("lr", finite(s.lr) and s.lr >= 0, f"must be >= 0 and finite (0: {LR_RULE} per member; JumpReLU {lr_rule('jumprelu')})"),
        ("bias_lr_scale", finite(s.bias_lr_scale) and s.bias_lr_scale >= 0, "must be >= 0 and finite (the biases' lr / train.lr)"),
        (
            "bias_lr_units",
            s.bias_lr_units in BIAS_LR_UNITS,
            f"choose from {', '.join(BIAS_LR_UNITS)} (the units train.bias_lr_scale is in)",
        ),
        (
            "decoder_lr_scale",
            finite(s.decoder_lr_scale) and s.decoder_lr_scale >= 0,
            "must be >= 0 and finite (the decoder weights' lr / train.lr)",
        ),
        ("adam_b1", 0 <= s.adam_b1 < 1, "must be in [0, 1) (Adam's first-moment decay)"),
        ("adam_b2", 0 <= s.adam_b2 < 1, "must be in [0, 1) (Adam's second-moment decay)"),
        ("adam_eps", finite(s.adam_eps) and s.adam_eps > 0, "must be > 0 and finite"),
        ("optimizer_state", s.optimizer_state in OPTIMIZER_STATES, f"choose from {', '.join(OPTIMIZER_STATES)} (Adam's moments' dtype)"),
        ("warmup_steps", s.warmup_steps >= 0, "must be >= 0"),
        ("decay_frac", 0 <= s.decay_frac <= 1, "must be in [0, 1]"),
        ("dead_tokens", s.dead_tokens >= 1, "must be positive (tokens without firing before a latent counts as dead)"),
        ("aux_coef", finite(s.aux_coef) and s.aux_coef >= 0, "must be >= 0 and finite"),
        (
            "k_aux",
            0 <= s.k_aux <= min(s.widths),
            f"must be in [0, {min(s.widths)}] (0: d_in // 2, at most 512; at most the smallest width)",
        ),
        ("aux_pool", s.aux_pool >= -1, "must be >= -1 (0: auto, -1: every dead latent)"),
        (
            "resample_tokens",
            s.resample_tokens >= 0 and (s.resample_tokens == 0 or s.architecture in ("topk", "batchtopk")),
            "must be >= 0 (0: never), and is for the TopK family (topk, batchtopk) only",
        ),
        ("encoder_init_scale", finite(s.encoder_init_scale) and s.encoder_init_scale > 0, "must be positive"),
        ("encoder_block", s.encoder_block >= 1, "must be positive"),
        ("encoder_dtype", s.encoder_dtype in ENCODER_DTYPES, f"choose from {', '.join(ENCODER_DTYPES)}"),
        ("mesh_data", s.mesh_data >= 0, "must be >= 0 (0: every device not on the model axis)"),
        ("mesh_model", s.mesh_model >= 1, "must be at least 1"),
        ("checkpoint_every", s.checkpoint_every >= 1, "must be positive"),
        ("keep_checkpoints", s.keep_checkpoints >= 1, "must be positive"),
        ("log_every", s.log_every >= 1, "must be positive"),
        ("seed", s.seed >= 0, "must be >= 0"),
        ("holdout_shards", s.holdout_shards >= 0, "must be >= 0"),
        ("max_nan_streak", s.max_nan_streak >= 1, "must be positive"),
    ]
    for name, ok, want in rules:
        if not ok:
            bad(name, want)
    if s.encoder not in ENCODERS:
        bad("encoder", f"unknown TopK encoder implementation (choose from {', '.join(ENCODERS)})")
