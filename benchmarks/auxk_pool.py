"""The train step with AuxK live: over a pool of dead latents (`train.aux_pool`, the default) against
over every dead latent (`aux_pool = -1`), beside the step with no latent dead.

    .venv/bin/python benchmarks/auxk_pool.py [--widths 16384,65536] [--dead 0.02,0.3] [--rounds 5]

One TopK SAE (d_in 576, k 32, batch 4096, the config's defaults: k_aux = d_in / 2 = 288, pool
4 x k_aux = 1,152) on this process's first device, the same random rows for every variant. Before
each step the state's `tokens_since_fired` marks the first `dead` share of the latents dead (past
`train.dead_tokens`), so AuxK's branch runs every step (no latent dead: the main branch). Each
round times a few steps of each variant, the order alternating, so that the machine's noise falls
on all alike; reported: the median step per variant, and each AuxK variant over the main step.
Prints a table, writes runs/bench/auxk_pool.json.
"""

from __future__ import annotations

import argparse
import time

from _timing import write_json
from optimizer_state import cpu_name


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sae_jax import parallel
    from sae_jax.sae.bank import BankSpec
    from sae_jax.train.settings import TrainSettings
    from sae_jax.train.step import TrainStep

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="16384,65536")
    ap.add_argument("--dead", default="0.02,0.3", help="shares of the latents dead, one AuxK case each")
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    args = ap.parse_args()

    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, args.batch, args.d_in)).astype(np.float32))
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        s = TrainSettings.defaults(widths=(width,), ks=(args.k,), batch_size=args.batch, steps=100_000)
        k_aux, pool = s.k_aux_for(args.d_in), s.aux_pool_for(args.d_in, width)
        spec = dict(hooks=("h",), widths=(width,), ks=(args.k,), d_in=args.d_in, width=width, k_aux=k_aux, architecture="topk")
        variants = {"main": (0.0, 0)}
        for f in (float(v) for v in args.dead.split(",")):
            variants[f"every {f:g}"] = (f, 0)
            variants[f"pool {f:g}"] = (f, pool)
        steps, states, since, times = {}, {}, {}, {v: [] for v in variants}
        for v, (frac, p) in variants.items():
            steps[v] = TrainStep(BankSpec(**spec, aux_pool=p), mesh, s)
            st = steps[v].init_state(jax.random.key(0), np.asarray(x[:, :256]))
            mark = np.zeros((1, width), np.int32)
            mark[:, : int(frac * width)] = 2 * s.dead_tokens
            since[v] = (mark, st["tokens_since_fired"].sharding)  # put anew each step: the state is donated
            states[v], m = steps[v]({**st, "tokens_since_fired": jax.device_put(*since[v])}, x)  # compile
            jax.block_until_ready(m)
        names = list(variants)
        for r in range(args.rounds):
            for v in names if r % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    states[v], m = steps[v]({**states[v], "tokens_since_fired": jax.device_put(*since[v])}, x)
                jax.block_until_ready((states[v]["params"], m))
                times[v].append((time.perf_counter() - t0) / args.steps)
        med = {v: float(np.median(t)) for v, t in times.items()}
        row = {"width": width, "d_in": args.d_in, "k_aux": k_aux, "pool": pool, "step_s": med, "times": times}
        rows.append(row)
        print(f"width {width:>7,} (k_aux {k_aux}, pool {pool:,}): main step {med['main'] * 1e3:8.1f} ms", flush=True)
        for v in names[1:]:
            print(f"  AuxK live, {v:<12} {med[v] * 1e3:8.1f} ms  ({med[v] / med['main']:.2f}x the main step)", flush=True)
    write_json("auxk_pool.json", {"cpu": cpu_name(), "rows": rows})


if __name__ == "__main__":
    main()
