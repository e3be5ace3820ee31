"""`sae-jax compile-check`: compile the train step for a mesh and config, train nothing, and say
what a step needs per device and what it should deliver.

    sae-jax compile-check --devices 64 --memory-gib 16 --peak-tflops 197 \\
        --config.train.store=STORE --config.train.widths=1048576 --config.train.mesh_model=8

The step is lowered from abstract arrays (`jax.ShapeDtypeStruct` with the run's shardings:
nothing is allocated, so a configuration far larger than this machine compiles) and compiled by
the backend at hand. `--devices N` compiles for N simulated CPU devices, which is how a pod's
mesh is checked from a laptop: the state and batch bytes per device are then exact (they follow
from the shapes and the shardings), the temporaries are the CPU compiler's buffer assignment
(the TPU and GPU compilers' differ; check on the target for the last few percent).

Memory per device = XLA's arguments + outputs - aliased (the donated state) + temporaries.
FLOPs per step are the formula of docs/design.md section 8 (encoder matmul 2·B·d_in·W per member plus the
sparse decoder and backward terms, or their dense counterparts for ReLU / JumpReLU); tokens/s =
batch / (FLOPs / (devices x peak x MFU)).
"""

from __future__ import annotations

import time

import numpy as np

from sae_jax import chips
from sae_jax.chips import GIB, dev_kind
from sae_jax.errors import SaeJaxError


class CompileCheckError(SaeJaxError, ValueError):
    pass


class _Shapes:
    """Stands in for a store when there is none here (`--d-in`): the hooks and their width."""

    def __init__(self, hooks: list[str], d_in: int):
        self.root = f"(no store: --d-in {d_in})"
        self.hooks = {h: {"width": d_in} for h in hooks}
        self.rows_per_record = 1

    def check_hook(self, h: str) -> None:
        if h not in self.hooks:
            raise CompileCheckError(f"hook {h!r}: with --d-in every hook is named in train.hooks")

    def width(self, h: str) -> int:
        self.check_hook(h)
        return self.hooks[h]["width"]


def step_flops(spec, batch: int) -> float:
    """FLOPs of one train step of the bank (forward and backward), AuxK excluded."""
    W, d_in, d_out = spec.width, spec.d_in, spec.d_out
    total = 0.0
    for k in spec.ks:
        if spec.sparse:  # encoder matmul; decode, its two gradients and the encoder's sparse gradient over the k winners
            total += 2 * batch * d_in * W + 2 * batch * k * (3 * d_out + d_in)
        else:  # dense: encoder forward and weight gradient, decoder forward and both gradients
            total += 4 * batch * d_in * W + 6 * batch * W * d_out
    return total


def per_device_bytes(tree) -> int:
    """Bytes one device holds of abstract arrays with shardings (exact: shapes and shardings)."""
    import jax

    return int(sum(np.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def compile_check(
    c,
    *,
    d_in: int | None = None,
    peak_tflops: float | None = None,
    mfu: float = 0.5,
    memory_gib: float | None = None,
    topology: str = "",
    gpu: str = "",
) -> dict:
    import jax
    import jax.numpy as jnp

    from sae_jax import parallel
    from sae_jax.chips import compiling, target_devices
    from sae_jax.data.store import DTYPES, open_store
    from sae_jax.train.plan import bank_spec, make_mesh, settings_for
    from sae_jax.train.step import TrainStep

    devices = target_devices(topology, gpu)
    t = settings_for(c, len(devices))
    if not 0 < mfu <= 1:
        raise CompileCheckError(f"--mfu {mfu}: a fraction in (0, 1]")
    if d_in:
        if not t.hooks:
            raise CompileCheckError("--d-in: name the hooks in train.hooks (there is no store to list them)")
        store, dtype = _Shapes(list(t.hooks + t.out_hooks), d_in), jnp.bfloat16
    else:
        store = open_store(t.store)
        dtype = DTYPES[store.manifest["dtype"]]
    spec = bank_spec(t, store)
    mesh = make_mesh(t, devices)
    n_data = mesh.shape["data"]
    step = TrainStep(spec, mesh, t)
    state = step.abstract_state()
    x_sharding = parallel.sharding(mesh, "x")
    x = jax.ShapeDtypeStruct((spec.size, t.batch_size, spec.d_in), dtype, sharding=x_sharding)
    args = (state, x) + (
        (jax.ShapeDtypeStruct((spec.size, t.batch_size, spec.d_out), dtype, sharding=x_sharding),) if spec.transcoder else ()
    )
    t0 = time.perf_counter()
    with compiling(mesh):  # traced and lowered for the target: the encoder's `auto` and the Pallas kernels, not this host's
        try:
            compiled = step.lower(*args).compile()
        except jax.errors.JaxRuntimeError as e:  # the target's compiler refuses (HBM or VMEM out of memory)
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            first = " ".join(str(e).split("See https")[0].split())
            raise CompileCheckError(
                f"refused by the {dev_kind(devices[0])} compiler: {first[:600]} (state {per_device_bytes(args[0]) / GIB:.2f} GiB per device); "
                "raise train.mesh_model (latents over more devices), lower train.batch_size or the widths, or use more devices"
            ) from None
    compile_s = time.perf_counter() - t0

    ma = compiled.memory_analysis()
    peak_bytes = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = step_flops(spec, t.batch_size)
    dev = mesh.devices.flat[0]
    kind = dev_kind(dev)
    peak = chips.peak_tflops(getattr(dev, "device_kind", ""), peak_tflops)
    limit = (
        memory_gib * GIB if memory_gib else (chips.hbm_bytes(getattr(dev, "device_kind", "")) if topology or gpu else chips.device_memory())
    )
    rep = {
        "mesh": {"data": n_data, "model": mesh.shape["model"]},
        "devices": mesh.devices.size,
        "device_kind": kind,
        "members": spec.size,
        "width": spec.width,
        "d_in": spec.d_in,
        "batch": t.batch_size,
        "compile_s": compile_s,
        "bytes_per_device": {
            "params": per_device_bytes(state["params"]),
            "optimizer": per_device_bytes(state["opt_state"]),
            "state": per_device_bytes(state),
            "batch": per_device_bytes(args[1:]),
            "xla_arguments": int(ma.argument_size_in_bytes),
            "xla_outputs": int(ma.output_size_in_bytes),
            "xla_aliased": int(ma.alias_size_in_bytes),
            "xla_temporaries": int(ma.temp_size_in_bytes),
            "peak": int(peak_bytes),
        },
        "step_flops": flops,
        "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
        "peak_tflops_per_device": peak,
        "mfu": mfu,
        "tokens_per_s": t.batch_size / (flops / (mesh.devices.size * peak * 1e12 * mfu)) if peak else None,
        "memory_limit_bytes": limit,
        "fits": None if limit is None else bool(peak_bytes <= limit),
        "hlo_roofline": _gpu_roofline(compiled, gpu, spec.size * t.batch_size // n_data),
    }
    return rep


def _gpu_roofline(compiled, gpu: str, rows: int) -> dict | None:
    """For a GPU target: `hlo_cost`'s roofline of the step as the CUDA compiler built it (`rows`
    selected per device: batch rows x members)."""
    from sae_jax import hlo_cost

    chip = gpu.split(":")[0].lower()
    if chip not in hlo_cost.GPUS:
        return None
    return hlo_cost.gpu_roofline(hlo_cost.step_cost(compiled.as_text()), chip, rows)


def report(rep: dict) -> str:
    b = rep["bytes_per_device"]
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    m = rep["mesh"]
    lines = [
        f"mesh       data={m['data']} x model={m['model']} on {rep['devices']} {rep['device_kind']} devices",
        f"bank       {rep['members']} member(s), width {rep['width']:,}, d_in {rep['d_in']}, batch {rep['batch']:,} ({rep['batch'] // m['data']:,} rows per device)",
        f"compile    {rep['compile_s']:.1f} s",
        f"state      {mib(b['state'])} per device (params {mib(b['params'])}, optimizer {mib(b['optimizer'])}); batch {mib(b['batch'])}",
        f"XLA        arguments {mib(b['xla_arguments'])}, outputs {mib(b['xla_outputs'])} (aliased {mib(b['xla_aliased'])}), "
        f"temporaries {mib(b['xla_temporaries'])}",
        f"memory     {mib(b['peak'])} per device at the step's peak",
        f"flops      {rep['step_flops']:.3g} per step ({rep['step_flops'] / rep['devices']:.3g} per device)"
        + (f"; XLA counts {rep['xla_flops_per_device']:.3g} per device (loops counted once)" if rep["xla_flops_per_device"] else ""),
    ]
    if rep["tokens_per_s"]:
        sec = rep["batch"] / rep["tokens_per_s"]
        lines.append(
            f"expected   {rep['tokens_per_s']:,.0f} tok/s ({sec * 1e3:.2f} ms/step) at {rep['mfu']:.0%} of "
            f"{rep['peak_tflops_per_device']:g} TFLOP/s x {rep['devices']} devices"
        )
    else:
        lines.append("expected   (give --peak-tflops: the device's peak is not in the table)")
    r = rep.get("hlo_roofline")
    if r:
        m, a = r["main"], r["aux"]
        lines.append(
            f"roofline   from the compiled HLO on an {r['gpu'].upper()}: matmuls {m['matmul_ms']:.2f} ms, TopK selection "
            f"{m['select_ms']:.2f} ms ({m['select_over_matmul']:.2f} x matmul; {m['select_sorted_per_row'] or 0:,.0f} keys sorted per row), "
            f"other kernels {m['other_ms']:.2f} ms, {m['launches']:,.0f} launches {m['launch_ms']:.2f} ms: {m['step_ms']:.2f} ms/step; "
            f"AuxK live: selection {a['select_ms']:.2f} ms, {a['step_ms']:.2f} ms/step"
        )
    if rep["memory_limit_bytes"] is not None:
        lim = rep["memory_limit_bytes"] / GIB
        verdict = "fits" if rep["fits"] else "DOES NOT FIT"
        lines.append(f"limit      {lim:,.2f} GiB per device: {verdict} ({b['peak'] / rep['memory_limit_bytes']:.0%} of it)")
    return "\n".join(lines)


def refusal(rep: dict) -> str:
    b = rep["bytes_per_device"]
    return (
        f"the step needs {b['peak'] / GIB:.2f} GiB per device (state {b['state'] / GIB:.2f}, batch {b['batch'] / GIB:.2f}, "
        f"temporaries {b['xla_temporaries'] / GIB:.2f}), over the {rep['memory_limit_bytes'] / GIB:.2f} GiB limit: "
        "raise train.mesh_model (latents over more devices), lower train.batch_size or the widths, or use more devices"
    )
