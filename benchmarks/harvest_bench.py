"""Harvest benchmarks: the forward against the whole harvest, the shard writer, loading memory,
and the compilers' predictions for the shipped model configs.

    .venv/bin/python benchmarks/harvest_bench.py [--tokens 40000] [--out runs/bench] [--skip-compile] [--big]

Prints a table and writes runs/bench/harvest_bench.json. Run it on a quiet machine.

1. Harvest tokens/s (forward, device->host, filter, shuffle, write, checksum) against the bare
   forward (the same compiled executable over the same contexts, nothing copied or written), on
   one device and on meshes of the simulated CPU devices (8x1; 2x3 for SmolLM2's 9 heads / 3 kv
   heads). On a CPU the simulated devices share the same cores: the mesh rows show the overhead,
   not a speed-up.
2. The shard writer (`harvest.write_shard_rate`) in GB/s at 1 and 2 threads, at the demo's
   widths and at Gemma 2 9B's (two 3584-wide hooks, ctx 1024).
3. Peak host memory growth while loading a random Llama-shaped bf16 model (~1B parameters; ~3B
   with --big) onto 8 simulated devices split 8 ways, against the bytes of its weights, for the
   streaming loader (`load_model(..., mesh=)`) and for reading the whole state dict first
   (`read_model` + `build_model`, every tensor in float32 on the host).
4. `sae-jax compile-check --job harvest` for each config in configs/models/ on v5e-8
   (`--topology v5e:2x4`, libtpu), v5p-8 (`v5p:2x2x2`) and 8 H100s (`--gpu h100:8`, XLA's CUDA
   compiler): mesh, memory per chip, expected tok/s at 50% of peak, write rate per host.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from sae_jax.config import default_config  # noqa: E402
from sae_jax.data.contexts import contexts  # noqa: E402
from sae_jax.data.text import documents  # noqa: E402
from sae_jax.harvest import harvest, make_forward, write_shard_rate  # noqa: E402
from sae_jax.model.hooks import parse_hooks  # noqa: E402
from sae_jax.model.loading import load_model  # noqa: E402
from sae_jax.parallel import make_mesh  # noqa: E402

TARGETS = {"v5e-8": ["--topology", "v5e:2x4"], "v5p-8": ["--topology", "v5p:2x2x2"], "8xH100": ["--gpu", "h100:8"]}
# hooks at about 0.5 and 0.75 of the depth (the published suites' layers of interest)
MODEL_HOOKS = {
    "gemma-2-2b": "blocks.12.hook_resid_post,blocks.19.hook_resid_post",
    "gemma-2-9b": "blocks.20.hook_resid_post,blocks.31.hook_resid_post",
    "gemma-2-27b": "blocks.22.hook_resid_post,blocks.34.hook_resid_post",
    "llama-3.1-8b": "blocks.16.hook_resid_post,blocks.24.hook_resid_post",
    "llama-3.3-70b": "blocks.40.hook_resid_post,blocks.60.hook_resid_post",
    "qwen3-8b": "blocks.18.hook_resid_post,blocks.27.hook_resid_post",
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench_forward(out: Path, tokens: int, lm, data: int, model: int) -> dict:
    devices = jax.devices()[: data * model]
    c = default_config()
    c.harvest.out = str(out / f"store-{data}x{model}")
    c.harvest.tokens, c.harvest.seqs_per_shard, c.harvest.progress = tokens, 64, False
    c.harvest.mesh_data, c.harvest.mesh_model = data, model
    shutil.rmtree(c.harvest.out, ignore_errors=True)
    store = harvest(c, log=lambda *a: None, lm=lm, devices=devices)
    run = store.manifest["last_run"]
    mesh = make_mesh(data, model, devices)
    hooks = parse_hooks(c.harvest.hooks, lm.cfg.n_layers)
    fwd, state = make_forward(lm.model, hooks, jnp.bfloat16, mesh)
    tok_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    fwd = fwd.lower(state, jax.ShapeDtypeStruct((c.harvest.batch_size, c.data.ctx_len), jnp.int32, sharding=tok_sh)).compile()
    it = contexts(documents("embedded"), lm.tokenizer, c.data.ctx_len, lm.bos_id, lm.eos_id, c.data.shuffle_window, c.data.seed)
    ctx = np.stack(list(itertools.islice(it, store.manifest["contexts"])))
    pad = (-len(ctx)) % c.harvest.batch_size
    ctx = np.concatenate([ctx, ctx[:pad]]) if pad else ctx
    batches = [jax.device_put(ctx[i : i + c.harvest.batch_size], tok_sh) for i in range(0, len(ctx), c.harvest.batch_size)]
    jax.block_until_ready(fwd(state, batches[0]))
    t0 = time.perf_counter()
    for b in batches:
        r = fwd(state, b)
    jax.block_until_ready(r)
    bare = ctx.size / (time.perf_counter() - t0)
    full = run["tokens"] / run["loop_s"]
    return {
        "mesh": f"{data}x{model}",
        "tokens": run["tokens"],
        "harvest_tok_s": full,
        "bare_forward_tok_s": bare,
        "overhead": bare / full - 1,
    }


def bench_writer() -> list[dict]:
    rows = []
    for name, widths, ctx, n in (
        ("demo (2 x 576, ctx 128)", {"a": 576, "b": 576}, 128, 512),
        ("Gemma 2 9B (2 x 3584, ctx 1024)", {"a": 3584, "b": 3584}, 1024, 8),
    ):
        for threads in (1, 2):
            runs = []
            for _ in range(3):  # the best of three (the first pays page faults of fresh arrays)
                with tempfile.TemporaryDirectory() as t:
                    runs.append(write_shard_rate(Path(t), widths, ml_dtypes.bfloat16, ctx, n, threads))
            rows.append({"shape": name, "threads": threads, "gb_s": max(runs), "runs": runs})
    return rows


LOAD = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
from flax import nnx
from sae_jax.model import loading
from sae_jax.parallel import make_mesh

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def hwm():  # the peak resident set since the last reset (ru_maxrss would include the forked parent's)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

mesh = make_mesh(1, 8)
jax.device_put(0.0).block_until_ready()
before = rss()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the current resident set
t0 = __import__("time").perf_counter()
if sys.argv[2] == "stream":
    model = loading.load_model(sys.argv[1], "bfloat16", mesh=mesh).model
else:  # the whole state dict on the host first, then the model on one device
    hf, sd, *_ = loading.read_model(sys.argv[1])
    model = loading.build_model(loading.config_from_hf(hf, sys.argv[1]), sd, sys.argv[1], dtype=jax.numpy.bfloat16)
jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
dt = __import__("time").perf_counter() - t0
print(json.dumps({"before": before, "peak": hwm(), "s": dt}))
"""


def bench_loading(big: bool) -> list[dict]:
    from random_models import param_bytes, write_random_llama

    from sae_jax.model.loading import embedded_model_path, open_gguf

    tok = open_gguf(embedded_model_path())[2]
    shapes = [("1.0B", {"d_model": 2048, "n_layers": 20, "n_heads": 16, "n_kv_heads": 8, "d_mlp": 5632}, ("stream", "whole"))]
    if big:
        shapes.append(("3.1B", {"d_model": 3072, "n_layers": 26, "n_heads": 24, "n_kv_heads": 8, "d_mlp": 8192}, ("stream",)))
    rows = []
    for name, shape, ways in shapes:
        with tempfile.TemporaryDirectory() as t:
            d = write_random_llama(Path(t) / "m", tok, files=4, **shape)
            size = param_bytes(d)
            for way in ways:
                r = subprocess.run([sys.executable, "-c", LOAD, str(d), way], capture_output=True, text=True, timeout=1800)
                if r.returncode:
                    raise SystemExit(r.stderr[-2000:])
                m = json.loads(r.stdout.strip().splitlines()[-1])
                growth = m["peak"] - m["before"]
                rows.append(
                    {"model": name, "loader": way, "weights_bytes": size, "peak_growth_bytes": growth, "ratio": growth / size, "s": m["s"]}
                )
    return rows


def bench_compile(out: Path) -> list[dict]:
    rows = []
    for cfg in sorted((REPO / "configs" / "models").glob("*.json")):
        for target, flag in TARGETS.items():
            py = REPO / (".gpu-venv" if flag[0] == "--gpu" else ".tpu-venv") / "bin" / "python"
            if not py.exists():
                rows.append({"model": cfg.stem, "target": target, "error": f"{py} missing (make tpu-venv / gpu-venv)"})
                continue
            js = out / f"compile-{cfg.stem}-{target}.json"
            args = [str(py), "-m", "sae_jax.cli", "compile-check", "--job", "harvest", "--model-config", str(cfg), *flag, "--json", str(js)]
            args += [f"--config.harvest.hooks={MODEL_HOOKS[cfg.stem]}", "--config.data.ctx_len=1024", "--config.model.dtype=bfloat16"]
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost"}
            env.pop("XLA_FLAGS", None)
            r = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
            if js.exists() and r.returncode in (0, 1):
                rep = json.loads(js.read_text())
                rows.append(
                    {
                        "model": cfg.stem,
                        "target": target,
                        "mesh": f"{rep['mesh']['data']}x{rep['mesh']['model']}",
                        "gib_per_chip": rep["bytes_per_device"]["peak"] / 2**30,
                        "fits": rep["fits"],
                        "tok_s": rep["tokens_per_s"],
                        "write_gb_s_per_host": rep["write_gbps_per_host"],
                        "writer_gb_s_measured": rep["writer_gbps_measured"],
                    }
                )
            else:
                rows.append({"model": cfg.stem, "target": target, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=40_000)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--skip-compile", action="store_true", help="leave out part 4 (needs .tpu-venv and .gpu-venv; ~15 minutes)")
    p.add_argument("--big", action="store_true", help="also load a ~3B model (6 GB of weights written to a temp dir)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__}
    lm = load_model("embedded")
    res["forward"] = [bench_forward(out, a.tokens, lm, d, m) for d, m in ((1, 1), (8, 1), (2, 3))]
    res["writer"] = bench_writer()
    res["loading"] = bench_loading(a.big)
    res["compile"] = [] if a.skip_compile else bench_compile(out)
    (out / "harvest_bench.json").write_text(json.dumps(res, indent=1))

    print(f"\n{res['cpu']}, jax {res['jax']}, {res['date']}\n")
    print("harvest vs bare forward (SmolLM2-135M, 2 hooks, ctx 128, batch 16)")
    print(f"{'mesh':>6} {'harvest tok/s':>14} {'forward tok/s':>14} {'overhead':>9}")
    for r in res["forward"]:
        print(f"{r['mesh']:>6} {r['harvest_tok_s']:>14,.0f} {r['bare_forward_tok_s']:>14,.0f} {r['overhead']:>9.1%}")
    print("\nshard writer")
    for r in res["writer"]:
        print(f"  {r['shape']:<34} {r['threads']} thread(s) {r['gb_s']:.3f} GB/s")
    print("\nloading onto 8 devices (bf16, split 8 ways): peak host memory growth / weight bytes")
    for r in res["loading"]:
        print(f"  {r['model']:>5} {r['loader']:<7} {r['weights_bytes'] / 2**30:6.2f} GiB weights  x{r['ratio']:.2f}  {r['s']:.1f} s")
    if res["compile"]:
        print("\ncompile-check --job harvest (ctx 1024, bf16 model and store, hooks at 1/2 and 3/4 depth, batch 16)")
        print(f"{'model':<15} {'target':<7} {'mesh':>5} {'GiB/chip':>9} {'fits':>5} {'tok/s @50%':>11} {'GB/s/host':>10}")
        for r in res["compile"]:
            if "error" in r:
                print(f"{r['model']:<15} {r['target']:<7} {r['error']}")
                continue
            print(
                f"{r['model']:<15} {r['target']:<7} {r['mesh']:>5} {r['gib_per_chip']:>9.2f} {'yes' if r['fits'] else 'NO':>5} "
                f"{r['tok_s']:>11,.0f} {r['write_gb_s_per_host']:>10.3f}"
            )
    print(f"\nwrote {out / 'harvest_bench.json'}")


if __name__ == "__main__":
    main()
