"""What the settings make of a store and a set of devices, before any step runs: the checked
settings (`settings_for`), the bank of members (`bank_spec`) and the mesh (`make_mesh`).
`train` and `compile-check` both build from here.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax

from sae_jax import parallel
from sae_jax.errors import SaeJaxError
from sae_jax.sae.bank import BankSpec
from sae_jax.train.settings import TrainSettings


class TrainError(SaeJaxError, RuntimeError):
    pass


class Member(NamedTuple):
    """One dictionary of a bank: its input hook, output hook (SAEs: the same), width and sparsity
    setting (k for TopK / BatchTopK, else 0; the L1 / L0 coefficient for ReLU / JumpReLU, else 0)."""

    hook: str
    out_hook: str
    width: int
    k: int
    coef: float


def settings_for(c, devices: int | None = None) -> TrainSettings:
    """The typed train settings of config `c`, every rule checked (with the mesh rules when the
    device count is given): what the CLI calls before it opens the store."""
    s = TrainSettings.from_config(c.train)
    if devices is not None:
        s.mesh_shape(devices, f" ({jax.process_count()} processes x {jax.local_device_count()})" if jax.process_count() > 1 else "")
    return s


def members(s: TrainSettings, hooks: list[str]) -> list[Member]:
    """One member per (hook pair, width, k or coefficient), in that order."""
    sparsity = list(itertools.product(s.ks if s.sparse else [0], s.coefs or [0.0]))
    pairs = list(zip(hooks, list(s.out_hooks) or hooks))
    return [Member(h, o, w, k, cf) for (h, o), w, (k, cf) in itertools.product(pairs, s.widths, sparsity)]


def bank_spec(s: TrainSettings, store) -> BankSpec:
    """The bank the settings describe on this store (anything with `hooks`, `check_hook`, `width`
    and `root`): one member per (hook, width, k or coefficient)."""
    hooks = list(s.hooks) or list(store.hooks)
    out_hooks = list(s.out_hooks)
    for h in hooks:
        store.check_hook(h)
    for h in out_hooks:
        if h not in store.hooks:
            raise TrainError(
                f"train.out_hooks: the transcoder output hook {h!r} is not in the store {store.root} (it has: {', '.join(store.hooks)}); "
                "harvest it in the same pass as the input hook"
            )
    ms = members(s, hooks)
    d_ins = {store.width(h) for h in hooks}
    d_outs = {store.width(h) for h in (out_hooks or hooks)}
    if len(d_ins) != 1 or len(d_outs) != 1:
        raise TrainError(f"a bank needs one input and one output width; the hooks {hooks + out_hooks} have widths {sorted(d_ins | d_outs)}")
    d_in, d_out = d_ins.pop(), d_outs.pop()
    cap = min(s.batchtopk_cap * max(s.ks), min(s.widths)) if s.architecture == "batchtopk" else 0
    width = -(-max(s.widths) // s.mesh_model) * s.mesh_model
    return BankSpec(
        hooks=tuple(m.hook for m in ms),
        widths=tuple(m.width for m in ms),
        ks=tuple(m.k for m in ms),
        d_in=d_in,
        width=width,
        k_aux=s.k_aux_for(d_in),
        architecture=s.architecture,
        coefs=tuple(m.coef for m in ms) if s.coefs else (),
        out_hooks=tuple(m.out_hook for m in ms) if out_hooks else (),
        d_out=d_out if out_hooks else 0,
        skip=s.skip,
        prefixes=s.matryoshka_prefixes,
        cap=cap,
        aux_pool=s.aux_pool_for(d_in, width) if s.sparse else 0,
    )


def make_mesh(s: TrainSettings, devices=None):
    """The (data, model) mesh over every device (a mesh that leaves some idle is an error)."""
    n = jax.device_count() if devices is None else len(devices)
    return parallel.make_mesh(*s.mesh_shape(n), devices=devices)
