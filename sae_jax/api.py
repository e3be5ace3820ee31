"""The Python API: train, load, encode, decode and evaluate from a notebook, without the CLI.

    import sae_jax

    result = sae_jax.fit(store="runs/demo/store", run_dir="runs/mine", widths=[16384], ks=[32], steps=400)
    saes = sae_jax.load("runs/mine")          # a run; or an export folder: sae_jax.load(DIR, store=STORE)
    sae = saes[0]                               # or saes["blocks.6.hook_resid_post.topk.w16384.k32"]
    values, indices = sae.encode(x)             # x [N, d_in]: raw activations of sae.hook
    x_hat = sae.decode(values, indices)         # or sae(x)
    report = sae_jax.evaluate("runs/mine", tokens=100_000)
    atlas = sae_jax.read_atlas("runs/mine/atlas")   # after `sae-jax atlas runs/mine`
    atlas.record(0, 123)                        # latent 123 of the first member: stats, examples as tokens

`fit` (the name `sae_jax.train` is the trainer's package) takes the `train` settings of `sae_jax/config.py` as keywords (lists for the list
settings) or a whole config (`config=`); the same command resumes. A `Dictionary` holds one
dictionary's folded weights (raw activations in, raw activations out: the training scale and, for
SAELens / sparsify folders, their conventions folded in) as numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np


def fit(config=None, *, log=print, **settings):
    """Train the bank a config describes (`config`: an `ml_collections.ConfigDict` such as
    `sae_jax.config.default_config()`, or None for the defaults), with `settings` (the `train`
    section's keys: `store`, `run_dir`, `widths`, `ks`, `steps`, ...) applied on top. Returns the
    `TrainResult` (spec, final state, last metrics, run directory, plots)."""
    from sae_jax.config import default_config
    from sae_jax.train.loop import train as run_training
    from sae_jax.train.settings import SettingsError

    c = default_config() if config is None else config
    for key, value in settings.items():
        if key not in c.train:
            raise SettingsError(f"train.{key}: no such setting (the train section's keys: sae_jax/config.py)")
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        if isinstance(value, Path):
            value = str(value)
        c.train[key] = value
    return run_training(c, log=log)


class Dictionary:
    """One trained dictionary on raw activations: `encode(x) -> (values, indices)` of the latents
    it keeps per row (TopK: k; JumpReLU / ReLU: the active ones, at most `k`), `decode(values,
    indices) -> x_hat`, `dictionary(x)` for both; the weights as numpy arrays (`W_enc [d_in, w]`,
    `b_enc`, `W_dec [w, d_out]`, `b_dec`, `threshold` where it has one)."""

    def __init__(self, name: str, hook: str, kind: str, k: int, params: dict, out_hook: str | None = None):
        self.name, self.hook, self.kind, self.k, self.out_hook = name, hook, kind, k, out_hook
        self.params = params

    @property
    def width(self) -> int:
        return self.params["W_dec"].shape[0]

    def __getattr__(self, name):  # W_enc, b_enc, W_dec, b_dec, threshold, W_skip
        params = self.__dict__.get("params", {})
        if name in params:
            return params[name]
        raise AttributeError(f"{type(self).__name__} {self.__dict__.get('name')!r} has no {name!r}")

    @cached_property
    def _device_params(self):
        import jax.numpy as jnp

        return {n: jnp.asarray(a) for n, a in self.params.items()}

    @cached_property
    def _fns(self):
        import jax

        from sae_jax.sae import folded

        enc = jax.jit(lambda p, x: folded.encode(p, x, self.k, self.kind, self.out_hook is not None))
        dec = jax.jit(folded.decode)
        return enc, dec

    def encode(self, x):
        """(values [N, k], indices [N, k]) of raw activations `x [N, d_in]` (numpy or JAX)."""
        if not hasattr(x, "ndim"):  # a list: numpy; numpy and JAX arrays pass as they are
            x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.params["W_enc"].shape[0]:
            raise ValueError(
                f"{self.name}: x of shape {tuple(x.shape)}; expected [N, {self.params['W_enc'].shape[0]}] activations of {self.hook}"
            )
        return self._fns[0](self._device_params, x)

    def decode(self, values, indices):
        """x_hat [N, d_out] from `encode`'s (values, indices)."""
        return self._fns[1](self._device_params, values, indices)

    def __call__(self, x):
        return self.decode(*self.encode(x))

    def __repr__(self) -> str:
        return f"Dictionary({self.name!r}, hook={self.hook!r}, kind={self.kind!r}, width={self.width}, k={self.k})"


class Dictionaries(Sequence):
    """The dictionaries of a run or an export folder, by position or by name."""

    def __init__(self, run, items: list[Dictionary]):
        self.run, self._items = run, items

    def __getitem__(self, key):
        if isinstance(key, str):
            for d in self._items:
                if d.name == key:
                    return d
            raise KeyError(f"{self.run.root}: no dictionary {key!r} (it has: {', '.join(self.names)})")
        return self._items[key]

    def __len__(self) -> int:
        return len(self._items)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self._items]

    def __repr__(self) -> str:
        return f"Dictionaries({str(self.run.root)!r}: {', '.join(self.names)})"


def load(path, *, step: int | None = None, store=None) -> Dictionaries:
    """The dictionaries of a sae-jax run directory (at its latest checkpoint, or `step`), or of a
    SAELens or sparsify folder (one dictionary, or what `sae-jax export` wrote; `store`: a store
    of the same hooks, which names them)."""
    from sae_jax.foreign import open_dictionaries

    run, _ = open_dictionaries(path, step, None if store is None else str(store))
    items = [Dictionary(mem.name, mem.hook, mem.inference, run.eval_k(m), run.folded(m), mem.out_hook) for m, mem in enumerate(run.members)]
    return Dictionaries(run, items)


def evaluate(path, *, log=print, **options) -> dict:
    """`sae-jax eval` as a function: the report (per member: reconstruction, sparsity, the model's
    loss with the dictionary spliced in) as a dict. `options`: step, member, store, tokens,
    contexts, split, batch_size, text, model_path (see `sae_jax.eval.core.evaluate`)."""
    from sae_jax.eval.core import evaluate as run_eval

    return run_eval(path, log=log, **options)


def read_atlas(path):
    """The atlas `sae-jax atlas` wrote in `path` (an `eval.atlas_files.Atlas`): `names`,
    `meta(member)`, `record(member, latent)` and `records(member)`, each example expanded to its
    tokens, token ids and the latent's activations over them."""
    from sae_jax.eval.atlas_files import read_atlas as read

    return read(path)
