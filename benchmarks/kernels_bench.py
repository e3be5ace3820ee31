"""TopK encoder kernels on CPU: memory of the compiled train step, dense vs streaming, and time.

    .venv/bin/python benchmarks/kernels_bench.py [--widths 14,16,18] [--steps 2] [--big-d-in 256]

1. `memory_analysis()` of the compiled train step (compile only, nothing allocated) at d_in=768,
   d_sae=2^20, B=4096, k=32, for the dense and the streaming encoder: temp bytes, and whether a
   buffer of B x d_sae could fit in them.
2. Step time of dense vs streaming at d_in=768, k=32, B=4096 for each d_sae in --widths (log2),
   each next to the encoder matmul `x @ W_enc` alone in the same process; the step's cost as a
   multiple of the matmul. (A dense width that does not fit in memory is reported, not run.)
3. Real training steps at d_sae=2^20 with d_in=--big-d-in (params + Adam = 16 bytes x d_in x 2^20
   x 2 must fit this machine's 24 GB: d_in=256 takes 8.6 GB), streaming encoder.

One process per configuration (a fresh heap each). Prints tables, writes
runs/bench/kernels_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _timing import timed, write_json

B, K = 4096, 32


def _setup(d_in: int, d_sae: int, encoder: str):
    import jax

    from sae_jax import parallel
    from sae_jax.sae.bank import BankSpec
    from sae_jax.train.settings import TrainSettings
    from sae_jax.train.step import TrainStep

    spec = BankSpec(("h",), (d_sae,), (K,), d_in, d_sae, min(d_in // 2, 512), "topk")
    mesh = parallel.make_mesh(1, 1)
    step = TrainStep(spec, mesh, TrainSettings.defaults(steps=1000, warmup_steps=10, encoder=encoder))
    return jax, spec, mesh, step


def memory(d_in: int, d_sae: int, encoder: str) -> dict:
    jax, spec, mesh, step = _setup(d_in, d_sae, encoder)
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((1, B, d_in), jnp.bfloat16)
    t0 = time.perf_counter()
    ma = step.lower(step.abstract_state(), x).compile().memory_analysis()
    return {
        "what": "memory",
        "encoder": encoder,
        "d_in": d_in,
        "d_sae": d_sae,
        "temp_bytes": ma.temp_size_in_bytes,
        "argument_bytes": ma.argument_size_in_bytes,
        "dense_pre_bytes": B * d_sae * 4,
        "compile_s": time.perf_counter() - t0,
    }


def timing(d_in: int, d_sae: int, encoder: str, steps: int, with_matmul: bool) -> dict:
    jax, spec, mesh, step = _setup(d_in, d_sae, encoder)
    import jax.numpy as jnp
    import numpy as np

    state = step.init_state(jax.random.key(0), None)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, B, d_in)), jnp.bfloat16)

    holder = {"s": state}

    def one():
        holder["s"], m = step(holder["s"], x)
        return m["loss"]

    t_step = timed(one, steps)
    res = {"what": "time", "encoder": encoder, "d_in": d_in, "d_sae": d_sae, "step_s": t_step, "tok_s": B / t_step}
    if with_matmul:
        w = holder["s"]["params"]["W_enc"][0]
        if B * d_sae * 4 <= 4 << 30:
            enc = jax.jit(lambda x, w: x[0].astype(jnp.float32) @ w)  # writes the [B, d_sae] product
        else:  # too big to materialise: the same matmul in 4096-column blocks, each reduced by a max
            blk = 4096

            def enc(x, w):
                xf = x[0].astype(jnp.float32)
                return jax.lax.map(lambda j: jnp.max(xf @ jax.lax.dynamic_slice_in_dim(w, j * blk, blk, 1)), jnp.arange(d_sae // blk))

            enc = jax.jit(enc)
            res["matmul_blocked"] = True
        res["matmul_s"] = timed(lambda: enc(x, w), steps)
        res["step_over_matmul"] = t_step / res["matmul_s"]
    res["loss"] = float(one())
    return res


def _run(kind: str, *args) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    r = subprocess.run([sys.executable, __file__, "--one", json.dumps([kind, *args])], env=env, capture_output=True, text=True)
    if r.returncode:
        return {"what": kind, "args": args, "error": (r.stderr.strip().splitlines() or ["killed"])[-1][-300:], "rc": r.returncode}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="14,16,18", help="log2 d_sae for the timing table")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--big-d-in", type=int, default=256)
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        kind, *args = json.loads(a.one)
        print(json.dumps(memory(*args) if kind == "memory" else timing(*args)))
        return
    rows = []
    print(f"TopK train step on CPU ({os.cpu_count()} cores), B={B}, k={K}")
    print("\n1. memory_analysis of the compiled step, d_in=768, d_sae=2^20")
    for enc in ("dense", "stream"):
        r = _run("memory", 768, 1 << 20, enc)
        rows.append(r)
        if "error" in r:
            print(f"  {enc:>7}: {r['error']}")
        else:
            print(
                f"  {enc:>7}: temp {r['temp_bytes'] / 2**30:7.2f} GiB  (a [B, d_sae] f32 buffer is {r['dense_pre_bytes'] / 2**30:.0f} GiB)"
            )
    print("\n2. step time, d_in=768 (dense vs streaming, each against x @ W_enc in its process)")
    print(f"  {'d_sae':>8} {'encoder':>7} {'step s':>8} {'tok/s':>7} {'matmul s':>9} {'step/matmul':>12}")
    for lg in (int(v) for v in a.widths.split(",")):
        for enc in ("dense", "stream"):
            r = _run("time", 768, 1 << lg, enc, a.steps, True)
            rows.append(r)
            if "error" in r:
                print(f"  {'2^' + str(lg):>8} {enc:>7} failed: {r['error']}")
            else:
                print(
                    f"  {'2^' + str(lg):>8} {enc:>7} {r['step_s']:>8.2f} {r['tok_s']:>7,.0f} {r['matmul_s']:>9.2f} {r['step_over_matmul']:>12.2f}"
                )
    print(f"\n3. training steps at d_sae=2^20, d_in={a.big_d_in} (streaming)")
    r = _run("time", a.big_d_in, 1 << 20, "stream", a.steps, True)
    rows.append(r)
    if "error" in r:
        print(f"  failed: {r['error']}")
    else:
        print(
            f"  {r['step_s']:.2f} s/step, {r['tok_s']:,.0f} tok/s, matmul {r['matmul_s']:.2f} s, step/matmul {r['step_over_matmul']:.2f}, loss {r['loss']:.4f}"
        )
    write_json("kernels_bench.json", rows)


if __name__ == "__main__":
    main()
