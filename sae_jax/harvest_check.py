"""`sae-jax compile-check --job harvest`: compile the harvest's forward for a model and a mesh of
chips this machine does not have, read no weights, and say whether it fits and how fast it
should run.

    sae-jax compile-check --job harvest --model-config configs/models/gemma-2-9b.json \\
        --topology v5e:2x4 --config.harvest.hooks=blocks.20.hook_resid_post,blocks.31.hook_resid_post \\
        --config.data.ctx_len=1024 --config.model.dtype=bfloat16

The model is built from its HF `config.json` with abstract weights (`jax.ShapeDtypeStruct`
carrying their shardings), so the forward of a 70B model lowers and compiles here, by libtpu's
compiler (`--topology`), XLA's CUDA compiler (`--gpu h100:8`) or for simulated CPU devices.
Memory per device is XLA's (arguments + outputs + temporaries); a forward that does not fit is
refused with the smallest model axis whose weight shards would. Expected tokens/s assume `mfu`
of the chips' peak on 2 x (parameters of the layers up to the deepest hook) FLOPs per token plus
attention; the write rate per host that implies is set beside the shard writer's rate measured
on this CPU.
"""

from __future__ import annotations

import time

import numpy as np

from sae_jax.chips import GIB
from sae_jax.errors import SaeJaxError


class HarvestCheckError(SaeJaxError, ValueError):
    pass


def model_config_of(spec: str):
    """A ModelConfig from a HF `config.json` file, a HF directory, a .gguf file or 'embedded'."""
    import json
    from pathlib import Path

    from sae_jax.model.loading import ModelLoadError, config_from_hf, model_config

    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".json":
        try:
            return config_from_hf(json.loads(p.read_text()), str(p))
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{p}: invalid JSON ({e})") from None
    return model_config(spec)


def abstract_model(cfg, dtype, mesh):
    """The Transformer with `jax.ShapeDtypeStruct` weights placed by the harvest's rule table."""
    import jax

    from sae_jax.model.loading import weight_refs
    from sae_jax.model.sharding import weight_sharding
    from sae_jax.model.transformer import Transformer

    def walk(tree, prefix=""):
        return {
            k: walk(v, f"{prefix}{k}.")
            if isinstance(v, dict)
            else jax.ShapeDtypeStruct(v.out_shape, dtype, sharding=weight_sharding(mesh, prefix + k, v.out_shape, cfg))
            for k, v in tree.items()
        }

    return Transformer(cfg, walk(weight_refs(cfg)), dtype=dtype)


def _hosts(devices) -> int:
    return len({getattr(d, "process_index", 0) for d in devices}) or 1


def harvest_compile_check(
    c,
    model_spec: str,
    *,
    topology: str = "",
    gpu: str = "",
    mfu: float = 0.5,
    peak_tflops: float | None = None,
    memory_gib: float | None = None,
    measure_writer: bool = True,
) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from sae_jax import chips
    from sae_jax.chips import compiling, dev_kind, target_devices
    from sae_jax.data.store import DTYPES
    from sae_jax.harvest import make_forward
    from sae_jax.model import sharding as msh
    from sae_jax.model.hooks import parse_hooks

    if not 0 < mfu <= 1:
        raise HarvestCheckError(f"--mfu {mfu}: a fraction in (0, 1]")
    cfg = model_config_of(model_spec)
    h, d = c.harvest, c.data
    hooks = parse_hooks(h.hooks, cfg.n_layers)
    dtype = jnp.dtype(c.model.dtype)
    store_dtype = DTYPES[h.dtype]
    devices = target_devices(topology, gpu)
    kind = getattr(devices[0], "device_kind", "")
    limit = int(memory_gib * GIB) if memory_gib else (chips.usable_bytes(kind) if (topology or gpu) else None)
    n = len(devices)

    def smallest_fit() -> str:
        m = msh.smallest_model_axis(cfg, None, dtype.itemsize, msh.WEIGHT_SHARE * limit) if limit else None
        return (
            f"the smallest mesh that holds it: model={m} ({m} devices of {limit / GIB:.0f} GiB, "
            f"{msh.weight_bytes_per_device(cfg, m, dtype.itemsize) / GIB:.2f} GiB of weights each)"
            if m
            else "no model axis up to 1024 splits it small enough"
        )

    try:
        mesh = msh.harvest_mesh(cfg, h, dtype.itemsize, devices, log=lambda *a: None, memory_limit=limit)
    except msh.ModelShardingError as e:
        if limit and not h.mesh_model and "GiB per device" in str(e):
            raise HarvestCheckError(f"refused: {e}; {smallest_fit()}") from None
        raise
    model = abstract_model(cfg, dtype, mesh)
    fwd, state = make_forward(model, hooks, jnp.dtype(store_dtype), mesh)
    tokens = jax.ShapeDtypeStruct((h.batch_size, d.ctx_len), jnp.int32, sharding=NamedSharding(mesh, msh.TOKENS))
    t0 = time.perf_counter()
    with compiling(mesh):
        try:
            compiled = fwd.lower(state, tokens).compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            first = " ".join(str(e).split("See https")[0].split())[:400]
            raise HarvestCheckError(f"refused by the {dev_kind(devices[0])} compiler: {first}; {smallest_fit()}") from None
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    # every weight is resident (the loader places all layers; XLA's arguments count only those the
    # forward reads, up to the deepest hook), plus the tokens, the hook outputs and the temporaries
    weights = int(sum(np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(state)))
    tokens_bytes = int(np.prod(tokens.sharding.shard_shape(tokens.shape))) * 4
    peak_bytes = int(weights + tokens_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes)
    last = max(x.layer for x in hooks)
    flops_tok = msh.forward_flops_per_token(cfg, last, d.ctx_len)
    peak = chips.peak_tflops(kind, peak_tflops)
    tok_s = n * peak * 1e12 * mfu / flops_tok if peak else None
    row_bytes = sum(cfg.hook_width(x.point) for x in hooks) * np.dtype(store_dtype).itemsize
    hosts = _hosts(devices)
    rep = {
        "model": model_spec,
        "params": msh.param_count(cfg),
        "mesh": {"data": mesh.shape["data"], "model": mesh.shape["model"]},
        "devices": n,
        "hosts": hosts,
        "device_kind": dev_kind(devices[0]),
        "batch": h.batch_size,
        "ctx_len": d.ctx_len,
        "hooks": [x.name for x in hooks],
        "compile_s": compile_s,
        "bytes_per_device": {
            "weights": weights,
            "xla_arguments": int(ma.argument_size_in_bytes),
            "xla_outputs": int(ma.output_size_in_bytes),
            "xla_temporaries": int(ma.temp_size_in_bytes),
            "peak": peak_bytes,
        },
        "memory_limit_bytes": limit,
        "fits": None if limit is None else peak_bytes <= limit,
        "flops_per_token": flops_tok,
        "peak_tflops_per_device": peak,
        "mfu": mfu,
        "tokens_per_s": tok_s,
        "write_bytes_per_token": row_bytes,
        "write_gbps_per_host": tok_s * row_bytes / hosts / 1e9 if tok_s else None,
        "writer_gbps_measured": measured_writer_gbps(cfg, hooks, store_dtype, d.ctx_len) if measure_writer else None,
    }
    if rep["fits"] is False:
        rep["refusal"] = (
            f"the forward needs {peak_bytes / GIB:.2f} GiB per device ({weights / GIB:.2f} GiB of weights), over the "
            f"{limit / GIB:.2f} GiB limit; {smallest_fit()}"
        )
    return rep


def measured_writer_gbps(cfg, hooks, store_dtype, ctx_len: int) -> float:
    """One shard writer's rate on this CPU (shuffle, outlier filter, statistics, checksums,
    ArrayRecord), in GB of activations per second, on a shard of ~128 MB of these hooks."""
    import tempfile
    from pathlib import Path

    from sae_jax.harvest import write_shard_rate

    widths = {x.name: cfg.hook_width(x.point) for x in hooks}
    contexts = max(1, (64 << 20) // (ctx_len * sum(widths.values())))
    with tempfile.TemporaryDirectory() as tmp:
        return write_shard_rate(Path(tmp), widths, store_dtype, ctx_len, contexts)


def report(rep: dict) -> str:
    b = rep["bytes_per_device"]
    gib = lambda x: f"{x / GIB:,.2f} GiB"  # noqa: E731
    m = rep["mesh"]
    lines = [
        f"model      {rep['model']} ({rep['params'] / 1e9:.2f}B parameters), hooks {', '.join(rep['hooks'])}",
        f"mesh       data={m['data']} x model={m['model']} on {rep['devices']} {rep['device_kind']} devices ({rep['hosts']} host(s))",
        f"forward    batch {rep['batch']} x ctx {rep['ctx_len']}; compile {rep['compile_s']:.1f} s",
        f"memory     {gib(b['peak'])} per device: weights {gib(b['weights'])}, activations out {gib(b['xla_outputs'])}, "
        f"temporaries {gib(b['xla_temporaries'])}",
    ]
    if rep["memory_limit_bytes"]:
        verdict = "fits" if rep["fits"] else "DOES NOT FIT"
        lines.append(f"limit      {gib(rep['memory_limit_bytes'])} per device: {verdict} ({b['peak'] / rep['memory_limit_bytes']:.0%})")
    if rep["tokens_per_s"]:
        lines.append(
            f"expected   {rep['tokens_per_s']:,.0f} tok/s at {rep['mfu']:.0%} of {rep['peak_tflops_per_device']:g} TFLOP/s x "
            f"{rep['devices']} ({rep['flops_per_token'] / 1e9:.2f} GFLOP per token)"
        )
        lines.append(
            f"writes     {rep['write_gbps_per_host']:.3f} GB/s per host ({rep['write_bytes_per_token']:,} B per token)"
            + (f"; this CPU's shard writer: {rep['writer_gbps_measured']:.3f} GB/s per thread" if rep["writer_gbps_measured"] else "")
        )
    else:
        lines.append("expected   (give --peak-tflops: the device's peak is not in the table)")
    return "\n".join(lines)
