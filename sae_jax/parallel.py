"""Mesh, logical-axis rules and shardings.

One rule table maps logical axes to mesh axes: `batch` -> `data`, `d_sae` -> `model`; `bank`
and `d_in` are replicated. The same code runs on 1 device (a 1x1 mesh), on 8 simulated CPU
devices in any data x model shape, on several processes (`init_distributed`: CPU processes on
one machine, the hosts of a TPU pod slice, the nodes of a SLURM job), on a GPU node or a TPU slice.

Several processes: the mesh spans every process's devices, in process order, so each process
holds a contiguous block of the `data` axis (or, where one process holds only part of the
`model` axis, one row of it). Processes whose devices hold the same rows of the batch form a
data-parallel group and read the same slice of the store (`data_group`); `global_batch` turns
each process's rows into one array over the whole mesh.
"""

from __future__ import annotations

import socket
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sae_jax.errors import SaeJaxError

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


class MeshError(SaeJaxError, ValueError):
    pass


class DistributedError(SaeJaxError, RuntimeError):
    pass


def pspec(name: str) -> P:
    """The PartitionSpec of the array `name` (`LOGICAL`) under the mesh `RULES`."""
    return P(*(RULES[a] for a in LOGICAL[name]))


def make_mesh(data: int, model: int, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or model < 1:
        raise MeshError(f"mesh {data}x{model}: both axes must be at least 1")
    if data * model != len(devices):
        where = f" ({jax.process_count()} processes x {jax.local_device_count()})" if jax.process_count() > 1 else ""
        raise MeshError(f"mesh data={data} x model={model} needs {data * model} devices, there are {len(devices)}{where}")
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def _wait_for(host: str, port: int, timeout_s: float) -> None:
    """Block until something accepts TCP connections at host:port, or raise after timeout_s."""
    deadline, err = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(deadline - time.monotonic(), 0.1))):
                return
        except OSError as e:
            err = e
            time.sleep(0.5)
    raise DistributedError(
        f"distributed.coordinator={host}:{port} cannot be reached after {timeout_s:.0f} s ({err}); "
        "start process 0 first, check the address and port from this host (distributed.init_timeout_s sets the wait)"
    )


def init_distributed(d, log=print) -> bool:
    """Join the processes of a multi-process run (`d`: the config's `distributed` section).

    `d.auto`: `jax.distributed.initialize()` detects the cluster (Cloud TPU pod slices, SLURM,
    Open MPI). `d.coordinator` (host:port of process 0) with `d.num_processes` and
    `d.process_id`: explicit, e.g. CPU processes on one machine (launch/local.py). Neither:
    one process, nothing to do. Must run before anything touches a JAX backend. Returns whether
    this is a multi-process run. A dead peer is detected by JAX's heartbeat
    (`d.heartbeat_timeout_s`) and ends every process with an error instead of a hang."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    timeouts = dict(initialization_timeout=int(d.init_timeout_s), heartbeat_timeout_seconds=int(d.heartbeat_timeout_s))
    if d.auto:
        if d.coordinator:
            raise DistributedError("distributed.auto=True detects the coordinator: leave distributed.coordinator empty")
        try:
            jax.distributed.initialize(**timeouts)
        except ValueError as e:  # JAX found no cluster environment (TPU metadata, SLURM, Open MPI)
            raise DistributedError(
                f"distributed.auto=True: no cluster detected here ({e}); on one machine use launch/local.py or "
                "distributed.coordinator/num_processes/process_id"
            ) from None
        return True
    if not d.coordinator:
        if d.num_processes > 1:
            raise DistributedError(
                f"distributed.num_processes={d.num_processes} needs distributed.coordinator=HOST:PORT (or distributed.auto=True)"
            )
        return False
    host, _, port = str(d.coordinator).rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"distributed.coordinator={d.coordinator!r}: expected HOST:PORT")
    n, pid = int(d.num_processes), int(d.process_id)
    if n < 1 or not 0 <= pid < n:
        raise DistributedError(f"distributed.process_id={pid} of distributed.num_processes={n}: need 0 <= process_id < num_processes")
    if pid == 0:
        log(f"process 0 of {n}: coordinator at {d.coordinator}, waiting up to {d.init_timeout_s} s for the others")
    else:
        _wait_for(host, int(port), d.init_timeout_s)
    jax.distributed.initialize(str(d.coordinator), n, pid, **timeouts)
    return True


def data_group(mesh: Mesh) -> tuple[int, int]:
    """(group, groups): which slice of each global batch this process reads, of how many.

    The processes whose devices hold the same rows of the batch are one group; on one process
    the answer is (0, 1)."""
    me = jax.process_index()
    rows = sorted({i for i, row in enumerate(mesh.devices) if any(d.process_index == me for d in row)})
    per, n = len(rows), mesh.shape["data"]
    if rows != list(range(rows[0], rows[0] + per)) or rows[0] % per or n % per:
        raise MeshError(f"process {me} holds rows {rows} of the mesh's data axis ({n}): not one aligned block")
    return rows[0] // per, n // per


def global_batch(mesh: Mesh, name: str, local: np.ndarray, global_shape: tuple[int, ...]) -> jax.Array:
    """This process's rows of a batch (its data group's slice) -> one array over the mesh."""
    return jax.make_array_from_process_local_data(sharding(mesh, name), local, global_shape)


def sharding(mesh: Mesh, name: str) -> NamedSharding:
    return NamedSharding(mesh, pspec(name))


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
