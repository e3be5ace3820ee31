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

Memory per device = XLA's arguments + outputs - aliased (the donated state) + temporaries, the
temporaries read from the compiler's buffer assignment (its temporaries in device memory) where
it wrote one, else XLA's memory analysis (libtpu's over-reports: see `compile_check`).
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


class CompilerRefused(CompileCheckError):
    """The target's own compiler refused the program (its HBM or VMEM check)."""


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


def state_parts(state) -> dict[str, int]:
    """Bytes per device of each part of the train state: `params`, each optimiser buffer by the
    name optax gives it (`mu`, `nu`, `count`: summed over parameters, with their dtypes), and the
    rest (the per-latent counters and bookkeeping)."""
    import jax

    parts = {"params": per_device_bytes(state["params"])}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
        names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
        key = f"optimizer {names[-1] if names else 'other'}"
        parts.setdefault(key, 0)
        parts[key] += per_device_bytes(leaf)
        dtypes = parts.setdefault(f"{key} dtypes", [])
        if str(leaf.dtype) not in dtypes:
            dtypes.append(str(leaf.dtype))
    parts["counters"] = per_device_bytes({k: v for k, v in state.items() if k not in ("params", "opt_state")})
    return parts


def big_temporaries(dump_dir: str, matrix_elems: set[int], since: float = 0.0) -> dict | None:
    """From the compiler's buffer assignment of the step (the module in `dump_dir` with the most
    temporary bytes): the distinct slices of its temporary allocations that at some point hold an
    array with as many elements as one of the parameter matrices (per device: `matrix_elems`):
    the dense float32 gradients, any copy of a parameter or moment the compiler keeps, the
    encoder's bfloat16 cast. {"bytes": the bytes of temporary memory such arrays ever occupy,
    "count": that in float32 matrices, "shapes", "heap": the bytes of all its temporaries in
    device memory}, or None when the compiler wrote no buffer assignment. `since` (seconds since the epoch): older files are an earlier compile's."""
    import glob
    import os
    import re

    value = re.compile(r"value: <\d+ \S+ @\d+> \(size=(\d+),offset=(\d+)\): (\w+)\[([\d,]*)\]")
    best, best_temp = None, -1
    for f in glob.glob(f"{dump_dir}/*after_optimizations-buffer-assignment.txt"):
        if os.path.getmtime(f) < since:  # an earlier compile's, in a dump folder the user named
            continue
        slices, temp, heap, in_temp = {}, 0, 0, False
        for line in open(f):
            if line.startswith("allocation "):
                in_temp = "preallocated-temp" in line
                if in_temp:
                    n = re.match(r"allocation (\d+): size (\d+)", line)
                    temp += int(n.group(2))
                    heap += int(n.group(2)) if ", color " not in line else 0  # device memory, not VMEM / SMEM
                    alloc = int(n.group(1))
                continue
            m = in_temp and value.search(line)
            if not m:
                continue
            size, offset, dtype, shape = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            if dtype in ("f32", "bf16") and shape and int(np.prod([int(d) for d in shape.split(",")])) in matrix_elems:
                slices.setdefault((alloc, offset, size), []).append(f"{dtype}[{shape}]")
        if temp > best_temp:
            best, best_temp, best_heap = slices, temp, heap
    if best is None:
        return None
    # the bytes those arrays ever occupy: the union of their slices (slices of one allocation
    # may overlap, time-sharing its bytes), in matrices of the largest parameter-sized array
    union, shapes = 0, set()
    for alloc in {a for a, _, _ in best}:
        end = -1
        for _, off, size in sorted(k for k in best if k[0] == alloc):
            union += max(0, off + size - max(off, end))
            end = max(end, off + size)
    for v in best.values():
        shapes.update(v)
    matrix = max((4 * e for e in matrix_elems), default=1)
    return {"count": round(union / matrix, 2), "bytes": union, "shapes": sorted(shapes), "heap": best_heap}


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
    t0, wall0 = time.perf_counter(), time.time()
    dump = _dump_dir()
    try:
        with compiling(mesh):  # traced and lowered for the target: the encoder's `auto` and the Pallas kernels, not this host's
            try:
                compiled = step.lower(*args).compile(compiler_options=dump.options)
            except jax.errors.JaxRuntimeError as e:  # the target's compiler refuses (HBM or VMEM out of memory)
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                first = " ".join(str(e).split("See https")[0].split())
                raise CompilerRefused(
                    f"refused by the {dev_kind(devices[0])} compiler: {first[:600]} (state {per_device_bytes(args[0]) / GIB:.2f} GiB per device); "
                    "raise train.mesh_model (latents over more devices), lower train.batch_size or the widths, or use more devices"
                ) from None
        elems = {int(np.prod(a.sharding.shard_shape(a.shape))) for a in jax.tree.leaves(state["params"]) if a.ndim >= 3}
        big = big_temporaries(dump.path, elems, since=wall0 - 1)
    finally:
        dump.cleanup()
    compile_s = time.perf_counter() - t0

    ma = compiled.memory_analysis()
    # the temporaries as the compiler's buffer assignment lays them out (what libtpu checks against
    # the HBM); libtpu's memory_analysis reports more (5.01 GB of buffers at 2^18 latents on a
    # v5e chip against 7.32 GB reported; 51.6 GiB against 80.9 GiB on v5p:4x4x8 at 2^26), the
    # CUDA compiler's the same bytes
    temp = big["heap"] if big and big.get("heap") else ma.temp_size_in_bytes
    peak_bytes = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + temp
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = step_flops(spec, t.batch_size)
    dev = mesh.devices.flat[0]
    kind = dev_kind(dev)
    peak = chips.peak_tflops(getattr(dev, "device_kind", ""), peak_tflops)
    limit = (
        memory_gib * GIB
        if memory_gib
        else (chips.usable_bytes(getattr(dev, "device_kind", "")) if topology or gpu else chips.device_memory())
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
            "state_parts": state_parts(state),
            "gradients": per_device_bytes(
                jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding), state["params"])
            ),
            "temporaries_parameter_sized": big,
            "state": per_device_bytes(state),
            "batch": per_device_bytes(args[1:]),
            "xla_arguments": int(ma.argument_size_in_bytes),
            "xla_outputs": int(ma.output_size_in_bytes),
            "xla_aliased": int(ma.alias_size_in_bytes),
            "xla_temporaries": int(ma.temp_size_in_bytes),
            "temporaries": int(temp),
            "peak": int(peak_bytes),
        },
        "step_flops": flops,
        "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
        "peak_tflops_per_device": peak,
        "mfu": mfu,
        "tokens_per_s": t.batch_size / (flops / (mesh.devices.size * peak * 1e12 * mfu)) if peak else None,
        "memory_limit_bytes": limit,
        "hbm_bytes": None if memory_gib else chips.hbm_bytes(getattr(dev, "device_kind", "")),
        "fits": None if limit is None else bool(peak_bytes <= limit),
        "hlo_roofline": _gpu_roofline(compiled, gpu, spec.size * t.batch_size // n_data),
    }
    return rep


class _Dump:
    def __init__(self, path: str, options: dict | None, owned: bool):
        self.path, self.options, self.owned = path, options, owned

    def cleanup(self) -> None:
        if self.owned:
            import shutil

            shutil.rmtree(self.path, ignore_errors=True)


def _dump_dir() -> _Dump:
    """Where the compiler writes its memory-usage report: the user's `--xla_dump_to` when
    XLA_FLAGS names one (kept), else a temporary folder (removed after reading)."""
    import os
    import re
    import tempfile

    m = re.search(r"--xla_dump_to=(\S+)", os.environ.get("XLA_FLAGS", ""))
    if m:
        return _Dump(m.group(1), None, owned=False)
    path = tempfile.mkdtemp(prefix="sae_jax_compile_check_")
    return _Dump(path, {"xla_dump_to": path}, owned=True)


def widest_fitting(c, widths: tuple[int, ...], granule: int, **kw) -> dict:
    """The widest bank like `c`'s that fits the target: every member's width scaled by one factor,
    the largest a multiple of `granule`. Per-device bytes grow linearly with the width (state
    exactly, temporaries nearly), so two compiles at a half and a quarter of the width (an eighth
    if the compiler refuses a half) give the line; its crossing with the limit is compiled to
    confirm and stepped down until it fits. `kw`: compile_check's. Returns {"widths", "peak",
    "compiles"}; raises CompileCheckError when not even the narrowest tried fits."""
    top = max(widths)

    def at(width: int):
        f = width / top
        ws = [max(granule, int(w * f) // granule * granule) for w in widths]
        cc = c.copy_and_resolve_references()
        cc.train.widths = ",".join(map(str, ws))
        try:
            return ws, compile_check(cc, **kw)
        except CompilerRefused:
            return ws, None

    if top // 2 < granule:
        raise CompileCheckError(f"no narrower width to try: the widest width {top:,} is under twice the search's step of {granule:,}")
    points, compiles = [], 0
    for frac in (2, 4, 8, 16):
        w = max(granule, top // frac // granule * granule)
        ws, rep = at(w)
        compiles += 1
        if rep is not None:
            points.append((max(ws), rep["bytes_per_device"]["peak"], rep["memory_limit_bytes"], ws, rep["fits"]))
        if len(points) == 2 or w == granule:
            break
    fitting = [p for p in points if p[4]]
    if not fitting:
        raise CompileCheckError(f"no width down to {points[-1][0] if points else granule:,} fits the target")
    best = max(fitting, key=lambda p: p[0])
    if len(points) == 2:
        (w1, b1, limit, _, _), (w2, b2, _, _, _) = points
        slope = (b1 - b2) / (w1 - w2)
        guess = int((w1 + (limit - b1) / slope) // granule * granule) if slope > 0 else best[0]
        guess = min(guess, (top - 1) // granule * granule)  # the refused width itself does not fit
        for _ in range(4):
            if guess <= best[0]:
                break
            ws, rep = at(guess)
            compiles += 1
            if rep is not None and rep["fits"]:
                best = (max(ws), rep["bytes_per_device"]["peak"], rep["memory_limit_bytes"], ws, True)
                break
            guess = (int(guess * 0.97) // granule) * granule
    return {"widths": best[3], "peak": best[1], "compiles": compiles}


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
        f"state      {mib(b['state'])} per device: {_parts(b['state_parts'], mib)}; batch {mib(b['batch'])}",
        f"XLA        arguments {mib(b['xla_arguments'])}, outputs {mib(b['xla_outputs'])} (aliased {mib(b['xla_aliased'])}), "
        f"temporaries {mib(b['temporaries'])}"
        + (f" (buffer assignment; memory_analysis says {mib(b['xla_temporaries'])})" if b["temporaries"] != b["xla_temporaries"] else ""),
        f"temporary  {_temporaries(b, mib)}",
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
        hbm = rep.get("hbm_bytes")
        share = (
            f" ({rep['memory_limit_bytes'] / hbm:.0%} of {hbm / GIB:,.0f} GiB of HBM)" if hbm and hbm != rep["memory_limit_bytes"] else ""
        )
        lines.append(f"limit      {lim:,.2f} GiB per device{share}: {verdict} ({b['peak'] / rep['memory_limit_bytes']:.0%} of it)")
    return "\n".join(lines)


def _parts(parts: dict, mib) -> str:
    out = [f"params {mib(parts['params'])}"]
    for key, n in parts.items():
        if key.startswith("optimizer ") and not key.endswith(" dtypes") and n >= 2**10:  # not the step counts
            out.append(f"{key} {mib(n)} ({'/'.join(parts[key + ' dtypes'])})")
    return ", ".join(out + [f"counters {mib(parts['counters'])}"])


def _temporaries(b: dict, mib) -> str:
    big = b.get("temporaries_parameter_sized")
    grads = f"(dense float32 gradients of every parameter: {mib(b['gradients'])})"
    if big is None:
        return f"{mib(b['temporaries'])}; the compiler wrote no memory report to break it down {grads}"
    return (
        f"parameter-sized arrays {mib(big['bytes'])} ({big['count']:g} float32 matrices: gradients, casts, copies), "
        f"the rest {mib(max(b['temporaries'] - big['bytes'], 0))} {grads}"
    )


def widest_line(w: dict) -> str:
    return (
        f"train.widths={','.join(map(str, w['widths']))} fits ({w['peak'] / GIB:.2f} GiB per device at the step's peak; "
        f"{w['compiles']} more compiles)"
    )


def refusal(rep: dict) -> str:
    b = rep["bytes_per_device"]
    widest = f"; the widest that fits: {widest_line(rep['widest'])}" if rep.get("widest") else ""
    if rep.get("widest_error"):
        widest = f"; {rep['widest_error']}"
    return (
        f"the step needs {b['peak'] / GIB:.2f} GiB per device (state {b['state'] / GIB:.2f}, batch {b['batch'] / GIB:.2f}, "
        f"temporaries {b['temporaries'] / GIB:.2f}), over the {rep['memory_limit_bytes'] / GIB:.2f} GiB limit: "
        "raise train.mesh_model (latents over more devices), lower train.batch_size or the widths, or use more devices" + widest
    )
