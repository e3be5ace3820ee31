"""The harvest's forward on real chips against the compiler's prediction: one run, a few minutes,
no network, nothing but jax and flax (random weights made on the devices; no store is written).

    python benchmarks/gpu_harvest.py [--model-config configs/models/llama-3.1-8b.json] [--ctx 1024] [--batch 16]
    python benchmarks/gpu_harvest.py --smoke        # any backend, a tiny model: checks the script itself

For each model config: the harvest mesh for the devices at hand (`harvest.mesh_*` automatic, or
`--mesh-model`), the forward compiled once, timed over `--steps` batches after a warm-up; printed
with tok/s, MFU (2 x parameters to the deepest hook plus attention, per token, against the
devices' bf16 peak) and the tok/s `compile-check --job harvest` expects at 50% of peak.
Writes runs/bench/gpu_harvest.json (or $OUT/gpu_harvest.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from sae_jax.chips import dev_kind, peak_tflops  # noqa: E402
from sae_jax.config import default_config  # noqa: E402
from sae_jax.harvest import make_forward  # noqa: E402
from sae_jax.harvest_check import abstract_model, model_config_of  # noqa: E402
from sae_jax.model import sharding as msh  # noqa: E402
from sae_jax.model.hooks import parse_hooks  # noqa: E402

DEFAULTS = {
    "llama-3.1-8b": "blocks.16.hook_resid_post,blocks.24.hook_resid_post",
    "gemma-2-2b": "blocks.12.hook_resid_post,blocks.19.hook_resid_post",
    "gemma-2-9b": "blocks.20.hook_resid_post,blocks.31.hook_resid_post",
}


def random_state(state, shardings, seed: int = 0):
    """Weights ~ N(0, 0.02) (norm scales 1), made on the devices in their shards."""
    leaves, tree = jax.tree.flatten(state)
    shard_leaves = jax.tree.leaves(shardings)

    def make(key):
        keys = jax.random.split(key, len(leaves))
        out = [
            jnp.ones(a.shape, a.dtype) if a.ndim == 1 else (0.02 * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype)
            for k, a in zip(keys, leaves, strict=True)
        ]
        return jax.tree.unflatten(tree, out)

    return jax.jit(make, out_shardings=jax.tree.unflatten(tree, shard_leaves))(jax.random.key(seed))


def bench(model_spec: str, hooks: str, ctx: int, batch: int, steps: int, mesh_model: int, dtype: str) -> dict:
    cfg = model_config_of(model_spec)
    c = default_config()
    c.harvest.batch_size, c.harvest.mesh_model = batch, mesh_model
    dt = jnp.dtype(dtype)
    mesh = msh.harvest_mesh(cfg, c.harvest, dt.itemsize, jax.devices(), log=print)
    hk = parse_hooks(hooks, cfg.n_layers)
    model = abstract_model(cfg, dt, mesh)
    fwd, abstract = make_forward(model, hk, jnp.bfloat16, mesh)
    state = random_state(abstract, msh.state_shardings(abstract, mesh, cfg))
    tok_sh = NamedSharding(mesh, msh.TOKENS)
    rng = np.random.default_rng(0)
    batches = [jax.device_put(rng.integers(3, cfg.vocab_size, (batch, ctx), dtype=np.int32), tok_sh) for _ in range(4)]
    t0 = time.perf_counter()
    compiled = fwd.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(state, batches[0]))
    t0 = time.perf_counter()
    for i in range(steps):
        out = compiled(state, batches[i % len(batches)])
    jax.block_until_ready(out)
    sec = (time.perf_counter() - t0) / steps
    n = mesh.devices.size
    flops_tok = msh.forward_flops_per_token(cfg, max(x.layer for x in hk), ctx)
    peak = peak_tflops(getattr(jax.devices()[0], "device_kind", ""))
    tok_s = batch * ctx / sec
    return {
        "model": Path(model_spec).stem,
        "device": dev_kind(jax.devices()[0]),
        "devices": n,
        "mesh": f"{mesh.shape['data']}x{mesh.shape['model']}",
        "batch": batch,
        "ctx": ctx,
        "compile_s": compile_s,
        "ms_per_batch": sec * 1e3,
        "tok_s": tok_s,
        "mfu": tok_s * flops_tok / (n * peak * 1e12) if peak else None,
        "expected_tok_s_at_50pct": n * peak * 1e12 * 0.5 / flops_tok if peak else None,
        "nnx_params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(nnx.state(model)))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-config", action="append", default=[], help="configs/models/*.json (repeatable)")
    p.add_argument("--hooks", default="", help="default: layers at about 1/2 and 3/4 of the depth")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--mesh-model", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--smoke", action="store_true", help="a tiny config on any backend (checks the script)")
    a = p.parse_args()
    rows = []
    if a.smoke:
        tiny = Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_harvest_tiny.json"
        sys.path.insert(0, str(REPO / "tests"))
        from random_models import llama_config

        tiny.write_text(json.dumps(llama_config(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=256, vocab=512)))
        rows.append(bench(str(tiny), "blocks.1.hook_resid_post", 64, 4, 3, a.mesh_model, "float32"))
    else:
        for spec in a.model_config or [str(REPO / "configs/models/llama-3.1-8b.json"), str(REPO / "configs/models/gemma-2-2b.json")]:
            hooks = a.hooks or DEFAULTS.get(Path(spec).stem, "")
            rows.append(bench(spec, hooks, a.ctx, a.batch, a.steps, a.mesh_model, a.dtype))
            print(rows[-1], flush=True)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "runs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_harvest.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'model':<14} {'device':<28} {'mesh':>5} {'ms/batch':>9} {'tok/s':>10} {'MFU':>6} {'expected @50%':>14}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        exp = f"{r['expected_tok_s_at_50pct']:,.0f}" if r["expected_tok_s_at_50pct"] else "-"
        print(f"{r['model']:<14} {r['device']:<28} {r['mesh']:>5} {r['ms_per_batch']:>9.1f} {r['tok_s']:>10,.0f} {mfu:>6} {exp:>14}")


if __name__ == "__main__":
    main()
