"""Adam's moments in bfloat16 against float32 (`train.optimizer_state`): step time and state bytes.

    .venv/bin/python benchmarks/optimizer_state.py [--widths 16384,65536] [--d-in 576] [--rounds 5]

One TopK SAE (k 32, batch 4096, the config's other defaults, AuxK branch as the run takes it) on
this process's devices, the same random rows for both. Each round times a few steps of each
variant, the order alternating, so that the machine's noise falls on both alike; reported: the
median step time per variant, their ratio (bfloat16 / float32), and the optimiser state's bytes.
Quality at these widths is benchmarks/peers.py's (`--sae-jax-set optimizer_state=float32`).
Prints a table, writes runs/bench/optimizer_state.json.
"""

from __future__ import annotations

import argparse
import platform
import time

from _timing import write_json

VARIANTS = ("float32", "bfloat16")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    args = ap.parse_args()

    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, args.batch, args.d_in)).astype(np.float32))
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        spec = BankSpec(
            hooks=("h",), widths=(width,), ks=(args.k,), d_in=args.d_in, width=width, k_aux=min(256, args.d_in // 2), architecture="topk"
        )
        steps, states, times, nbytes = {}, {}, {v: [] for v in VARIANTS}, {}
        for v in VARIANTS:
            s = TrainSettings.defaults(widths=(width,), ks=(args.k,), batch_size=args.batch, steps=1000, optimizer_state=v)
            steps[v] = TrainStep(spec, mesh, s)
            states[v] = steps[v].init_state(jax.random.key(0), np.asarray(x[:, :256]))
            nbytes[v] = sum(a.nbytes for a in jax.tree.leaves(states[v]["opt_state"]))
            states[v], m = steps[v](states[v], x)  # compile
            jax.block_until_ready(m)
        for r in range(args.rounds):
            for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    states[v], m = steps[v](states[v], x)
                jax.block_until_ready((states[v]["params"], m))
                times[v].append((time.perf_counter() - t0) / args.steps)
        med = {v: float(np.median(times[v])) for v in VARIANTS}
        row = {
            "width": width,
            "d_in": args.d_in,
            "step_s": med,
            "ratio_bf16_over_f32": med["bfloat16"] / med["float32"],
            "optimizer_bytes": nbytes,
            "times": times,
        }
        rows.append(row)
        print(
            f"width {width:>7,}: step float32 {med['float32'] * 1e3:8.1f} ms, bfloat16 {med['bfloat16'] * 1e3:8.1f} ms "
            f"(ratio {row['ratio_bf16_over_f32']:.3f}); optimizer state {nbytes['float32'] / 2**20:,.1f} -> "
            f"{nbytes['bfloat16'] / 2**20:,.1f} MiB",
            flush=True,
        )
    write_json("optimizer_state.json", {"cpu": cpu_name(), "rows": rows})


if __name__ == "__main__":
    main()
