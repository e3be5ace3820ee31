"""Train-step throughput against the encoder matmul alone, on several meshes.

    .venv/bin/python benchmarks/train_step_bench.py [--d-sae 18432] [--steps 3]

One TopK SAE, d_in=576, d_sae=18432 (32x), k=32, B=4096, on 1 CPU device and on 8 simulated
CPU devices in the meshes 8x1 and 2x4 (each configuration in its own process, since the
device count is fixed when jax starts). In each process the step and the encoder matmul
(`x @ W_enc` with the same shardings) are timed after a warm-up; the ratio says what the rest
of the step costs. Prints a table, writes runs/bench/train_step_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _timing import timed, write_json

CONFIGS = [(1, 1, 1), (8, 8, 1), (8, 2, 4)]  # (devices, data, model)


def measure(devices: int, data: int, model: int, d_sae: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sae_jax import parallel
    from sae_jax.sae.bank import BankSpec
    from sae_jax.train.settings import TrainSettings
    from sae_jax.train.step import TrainStep

    d_in, k, B = 576, 32, 4096
    spec = BankSpec(("h",), (d_sae,), (k,), d_in, d_sae, d_in // 2, "topk")
    mesh = parallel.make_mesh(data, model)
    step = TrainStep(spec, mesh, TrainSettings.defaults(steps=1000, warmup_steps=10), np.array([0.05]))
    state = step.init_state(jax.random.key(0), None)
    x = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=(1, B, d_in)), jnp.bfloat16), parallel.sharding(mesh, "x"))

    holder = {"s": state}

    def one_step():
        holder["s"], m = step(holder["s"], x)
        return m["loss"]

    t_step = timed(one_step, steps)
    w = holder["s"]["params"]["W_enc"]
    enc = jax.jit(
        lambda x, w: jnp.einsum("mbd,mds->mbs", x.astype(jnp.float32), w),
        out_shardings=parallel.NamedSharding(mesh, parallel.P(None, "data", "model")),
    )
    t_enc = timed(lambda: enc(x, w), steps)
    return {
        "devices": devices,
        "mesh": f"{data}x{model}",
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "batch": B,
        "step_s": t_step,
        "tok_s": B / t_step,
        "encoder_matmul_s": t_enc,
        "step_over_encoder": t_step / t_enc,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-sae", type=int, default=18432)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # devices,data,model: run one config here
    args = ap.parse_args()
    if args.one:
        d, a, b = (int(v) for v in args.one.split(","))
        print(json.dumps(measure(d, a, b, args.d_sae, args.steps)))
        return
    rows = []
    for d, a, b in CONFIGS:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={d}"}
        r = subprocess.run(
            [sys.executable, __file__, "--one", f"{d},{a},{b}", "--d-sae", str(args.d_sae), "--steps", str(args.steps)],
            env=env,
            capture_output=True,
            text=True,
        )
        if r.returncode:
            sys.exit(r.stderr)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"\nTopK step, d_in=576, d_sae={args.d_sae}, k=32, B=4096 ({os.cpu_count()} CPU cores)")
    print(f"  {'devices':>7} {'mesh':>5} {'step s':>8} {'tok/s':>8} {'enc matmul s':>13} {'step / matmul':>14}")
    for r in rows:
        print(
            f"  {r['devices']:>7} {r['mesh']:>5} {r['step_s']:>8.2f} {r['tok_s']:>8,.0f} {r['encoder_matmul_s']:>13.3f} {r['step_over_encoder']:>14.2f}"
        )
    write_json("train_step_bench.json", rows)


if __name__ == "__main__":
    main()
