"""Chips: their peak FLOP/s and memory (vendor figures), and devices of chips this machine does
not have, for ahead-of-time compilation by their own compilers (`sae-jax compile-check --topology ... | --gpu ...`).

- TPU: `jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")`
  with libtpu installed (`make tpu-venv`): libtpu's compiler, its HBM and VMEM checks.
- GPU: the CUDA plugin's compile-only devices, described by a `GpuTargetConfigProto` (the chip's
  cores, memories, compute capability) written below from the vendors' figures, with the
  `cuda-aot` extra installed (jax's CUDA plugin and ptxas; `make gpu-venv`); no GPU and no
  driver needed. Pallas' Triton lowering asks the default device what GPU it targets;
  `compiling` answers with the target's kind through an abstract mesh.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

from sae_jax.errors import SaeJaxError


class TargetError(SaeJaxError, ValueError):
    pass


GIB = 2**30
# dense bf16 peak per chip or GPU (vendor figures, TFLOP/s), matched against `device_kind`
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "NVIDIA H200": 989.0,
    "NVIDIA H100": 989.0,
    "NVIDIA A100": 312.0,
}


# HBM per chip or GPU (vendor figures, GiB), for a target compiled without its memory_stats()
HBM_GIB = {
    "TPU v4": 32.0,
    "TPU v5 lite": 16.0,
    "TPU v5e": 16.0,
    "TPU v5p": 95.0,
    "TPU v5": 95.0,
    "TPU v6 lite": 32.0,
    "TPU v6e": 32.0,
    "NVIDIA H200": 141.0,
    "NVIDIA H100": 80.0,
}


def dev_kind(dev) -> str:
    """A device's platform and kind, as reports print it ('tpu TPU v5e'; a CPU: 'cpu')."""
    return dev.platform if getattr(dev, "device_kind", dev.platform) == dev.platform else f"{dev.platform} {dev.device_kind}"


def _by_kind(table: dict[str, float], kind: str) -> float | None:
    """The figure of the first entry whose name `kind` (a device_kind) starts with."""
    return next((v for name, v in table.items() if kind.startswith(name)), None)


def hbm_bytes(kind: str) -> int | None:
    """HBM bytes of a device kind (`HBM_GIB`); None for a kind not listed."""
    gib = _by_kind(HBM_GIB, kind)
    return None if gib is None else int(gib * GIB)


# the share of a GPU's HBM a step may plan for: the rest holds the CUDA context, cuBLAS / cuDNN
# workspaces and the allocator's slack (JAX itself preallocates 75% of it unless
# XLA_PYTHON_CLIENT_MEM_FRACTION says more; docs/design.md, "Optimizer state")
GPU_USABLE = 0.9


def usable_bytes(kind: str) -> int | None:
    """The memory a step on a device of `kind` may use: a TPU's HBM, `GPU_USABLE` of a GPU's."""
    n = hbm_bytes(kind)
    if n is None:
        return None
    return int(n * GPU_USABLE) if "NVIDIA" in kind else n


def peak_tflops(kind: str, given: float | None = None) -> float | None:
    """Dense bf16 TFLOP/s of a device kind: `given` when set, else `PEAK_TFLOPS`; None for a kind not listed."""
    return given or _by_kind(PEAK_TFLOPS, kind)


def device_memory() -> int | None:
    """The first local device's memory limit in bytes (None where it reports none: CPUs)."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001  (CPU devices have none)
        return None
    return stats.get("bytes_limit")


# per GPU: the figures XLA's GPU compiler plans with (bytes, Hz, counts)
GPU_SPECS = {
    "h100": {
        "name": "NVIDIA H100 80GB HBM3",
        "core_count": 132,
        "clock_rate_ghz": 1.98,
        "memory_bandwidth": 3_350_000_000_000,
        "device_memory_size": 85_520_809_984,
        "l2_cache_size": 52_428_800,
        "cc": (9, 0),
    },
    "h200": {
        "name": "NVIDIA H200",
        "core_count": 132,
        "clock_rate_ghz": 1.98,
        "memory_bandwidth": 4_800_000_000_000,
        "device_memory_size": 150_754_820_096,
        "l2_cache_size": 52_428_800,
        "cc": (9, 0),
    },
}


def gpu_target_config(chip: str) -> str:
    """The `GpuTargetConfigProto` text of a Hopper GPU (fields the CUDA plugin of jax >= 0.11 reads)."""
    g = GPU_SPECS[chip]
    major, minor = g["cc"]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048
  core_count: {g["core_count"]}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {g["memory_bandwidth"]}
  l2_cache_size: {g["l2_cache_size"]}
  clock_rate_ghz: {g["clock_rate_ghz"]}
  device_memory_size: {g["device_memory_size"]}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{g["name"]}"
"""


def tpu_devices(topology: str) -> list:
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # keeps libtpu from probing for a host it is not on
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only: several checks at once need no exclusive chip
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # noqa: BLE001  (no libtpu, or a name it does not know)
        if importlib.util.find_spec("libtpu") is None:
            raise TargetError(
                f"--topology {topology}: compiling for a TPU needs libtpu in this Python (`make tpu-venv` builds .tpu-venv with it; "
                "run .tpu-venv/bin/sae-jax compile-check ...)"
            ) from None
        raise TargetError(
            f"--topology {topology!r}: libtpu does not know it ({str(e).splitlines()[0][:300]}); e.g. v5e:2x2, v5p:2x2x1, v6e:2x2"
        ) from None


def gpu_devices(target: str) -> list:
    """`h100` or `h100:8` (8 GPUs of one host)."""
    chip, _, n = target.partition(":")
    if chip not in GPU_SPECS or (n and not (n.isdigit() and int(n) >= 1)):
        raise TargetError(f"--gpu {target!r}: one of {', '.join(GPU_SPECS)}, optionally :N GPUs (h100:8)")
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        raise TargetError(
            f"--gpu {target}: compiling for a GPU needs jax's CUDA plugin in this Python (`make gpu-venv` builds .gpu-venv with "
            "the cuda-aot extra; run .gpu-venv/bin/sae-jax compile-check ...)"
        )
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver or GPU here: compile only
    from jax.experimental import topologies

    topo = f"1x1x{int(n or 1)}"
    return list(topologies.get_topology_desc(topo, platform="cuda", target_config=gpu_target_config(chip), topology=topo).devices)


def target_devices(topology: str = "", gpu: str = "") -> list:
    """The devices to compile for: a TPU topology, a GPU target, or (neither) this process's own."""
    import jax

    if topology and gpu:
        raise TargetError("--topology and --gpu name two targets: give one")
    if topology:
        return tpu_devices(topology)
    if gpu:
        return gpu_devices(gpu)
    return jax.devices()


@contextlib.contextmanager
def compiling(mesh):
    """Trace and lower for the platform of `mesh`'s devices: Pallas kernels and `encoder=auto`
    target it (not this host), and on GPU the Triton lowering learns the chip from the mesh's
    abstract form (which must be the mesh the program's shard_map runs on)."""
    import jax

    from sae_jax.kernels.pallas import compiling_for

    platform = mesh.devices.flat[0].platform
    with contextlib.ExitStack() as stack:
        stack.enter_context(compiling_for(platform))
        if platform == "gpu" and jax.default_backend() != "gpu":
            stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
        yield
