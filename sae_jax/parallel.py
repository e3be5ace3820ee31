"""Mesh, logical-axis rules and shardings.

One rule table maps logical axes to mesh axes: `batch` -> `data`, `d_sae` -> `model`; `bank`
and `d_in` are replicated. The same code runs on 1 device (a 1x1 mesh), on 8 simulated CPU
devices in any data x model shape, on a GPU node or a TPU slice.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

RULES = {"batch": "data", "d_sae": "model", "bank": None, "d_in": None, "d_out": None, "k": None}

# logical axes of each array the train step touches
LOGICAL = {
    "W_enc": ("bank", "d_in", "d_sae"),
    "b_enc": ("bank", "d_sae"),
    "W_dec": ("bank", "d_sae", "d_out"),
    "b_dec": ("bank", "d_out"),
    "threshold": ("bank", "d_sae"),
    "W_skip": ("bank", "d_in", "d_out"),
    "x": ("bank", "batch", "d_in"),
    "latents": ("bank", "d_sae"),
    "topk": ("bank", "batch", "k"),
}


class MeshError(ValueError):
    pass


def spec(name: str) -> P:
    return P(*(RULES[a] for a in LOGICAL[name]))


def make_mesh(data: int, model: int, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or model < 1:
        raise MeshError(f"mesh {data}x{model}: both axes must be at least 1")
    if data * model != len(devices):
        raise MeshError(f"mesh data={data} x model={model} needs {data * model} devices, there are {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def sharding(mesh: Mesh, name: str) -> NamedSharding:
    return NamedSharding(mesh, spec(name))


def param_names(bank=None) -> tuple[str, ...]:
    """The parameter arrays of a bank (`sae.bank.BankSpec`; None: a TopK SAE bank)."""
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    if bank is not None and bank.architecture == "jumprelu":
        names += ("threshold",)
    if bank is not None and bank.skip:
        names += ("W_skip",)
    return names


def param_shardings(mesh: Mesh, bank=None) -> dict:
    return {k: sharding(mesh, k) for k in param_names(bank)}
