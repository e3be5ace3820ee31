"""A roofline of the fused TopK encoder per chip: matmul, selection and HBM time, predicted.

    .venv/bin/python benchmarks/roofline.py [--rounds runs/bench/merge_rounds.json]
    .tpu-venv/bin/python benchmarks/roofline.py --xla      # adds XLA's cost_analysis from libtpu

At d_in=2304, k=64, B=8192 and d_sae 2^16..2^20, per chip (TPU v5e, v5p, v6e; H100, H200):

- matmul: 2 B d_in d_sae / peak bf16 FLOP/s;
- selection: B d_sae x (vector ops per pre-activation element) / vector op rate. The ops are
  counted from the kernel's own merge (`pallas.gated_merge` traced to a jaxpr: every op weighted
  by the elements it touches, per [tb, block] tile) as fixed + R x per-round, with R the
  measured mean rounds per block at that width (`benchmarks/merge_rounds.py` on SmolLM2
  activations with a fresh dictionary; --rounds to pass others). AuxK adds a second variant with
  its own k_aux slots: its bias add and count always, its rounds only where dead latents beat the
  aux threshold (counted here as R_aux = 1 per block: dead latents spread through every block),
  at k_aux 512 and at d_in / 2 = 1152;
- HBM: each W block is read once per row tile (B / tb tiles) plus x once: tb FLOPs per byte.

Predicted kernel time = max(matmul, HBM) + selection (the selection runs on the vector units
between matmuls; no overlap is assumed). Chip figures: vendor peak bf16 FLOP/s and HBM bandwidth;
the vector op rate is the peak divided by MXU_PER_VPU (TPU: 32 MXU FLOPs per vector op, from
the published MXU and VPU widths) or, on GPUs, one integer/compare op per CUDA core per cycle at
half the FP32 rate (132 SMs x 64 x 1.83 GHz: tensor-core bf16 / 64). These are assumptions of a
model, stated so they can be checked against a chip: `benchmarks/gpu_kernels.py` measures on one.
Prints a table, writes runs/bench/roofline.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _timing import write_json

CHIPS = {  # peak bf16 TFLOP/s, HBM GB/s, MXU (tensor-core) FLOPs per vector op, row tile, latent block
    "TPU v5e": (197.0, 819.0, 32.0, 512, 512),
    "TPU v5p": (459.0, 2765.0, 32.0, 512, 512),
    "TPU v6e": (918.0, 1640.0, 32.0, 512, 512),
    "H100 SXM": (989.0, 3350.0, 64.0, 64, 128),
    "H200": (989.0, 4800.0, 64.0, 64, 128),
}
D_IN, K, B = 2304, 64, 8192
# mean gated rounds per block measured by benchmarks/merge_rounds.py (SmolLM2 blocks.6.hook_resid_post,
# fresh dictionary, k=64, row tile 512 x block 512); widths between are interpolated in log2
MEASURED_ROUNDS = {65536: 7.76, 262144: 3.76, 1048576: 1.98}  # row tile 512 (the TPU kernel's)


def merge_ops(tb: int, kp: int, blk: int, k: int) -> tuple[float, float]:
    """(fixed, per round) vector ops per pre-activation element of one gated merge, counted from
    its jaxpr: each op weighted by the larger of its input and output sizes, over tb x blk."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sae_jax.kernels.pallas import gated_merge

    def work(eqns) -> float:
        total = 0.0
        for e in eqns:
            if e.primitive.name in ("while", "iota", "broadcast_in_dim"):
                continue
            sizes = [np.prod(v.aval.shape) for v in list(e.invars) + list(e.outvars) if hasattr(v, "aval")]
            total += max(sizes, default=0)
        return total

    jx = jax.make_jaxpr(lambda v, i, p: gated_merge(v, i, p, 0, k))(
        jnp.zeros((tb, kp)), jnp.zeros((tb, kp), jnp.int32), jnp.zeros((tb, blk))
    )
    loop = next(e for e in jx.eqns if e.primitive.name == "while")
    per_round = work(loop.params["body_jaxpr"].jaxpr.eqns)
    fixed = work(jx.eqns) + tb * blk  # + the bias add before the merge
    return fixed / (tb * blk), per_round / (tb * blk)


def rounds_at(width: int, table: dict) -> float:
    import numpy as np

    xs = sorted(table)
    lx = np.log2(xs)
    return float(np.interp(np.log2(width), lx, [table[x] for x in xs]))  # clamped at the ends (conservative above)


def slots(k: int, chip: str) -> int:
    return -(-k // 128) * 128 if chip.startswith("TPU") else 1 << (k - 1).bit_length()


def predict(chip: str, width: int, rounds: float, k_aux: int) -> dict:
    """k_aux 0: no AuxK variant; else its slots (k_aux rounded up) and one round per block."""
    peak, hbm, ratio, tb, blk = CHIPS[chip]
    fixed, per_round = merge_ops(tb, slots(K, chip), blk, K)
    ops = fixed + rounds * per_round
    if k_aux:  # the AuxK variant: bias add and count on every element, one round per block over its own slots
        a_fixed, a_round = merge_ops(tb, slots(k_aux, chip), blk, k_aux)
        ops += a_fixed + 1.0 * a_round
    flops = 2.0 * B * D_IN * width
    t_mm = flops / (peak * 1e12)
    t_sel = B * width * ops / (peak * 1e12 / ratio)
    t_hbm = ((B / tb) * D_IN * width * 2 + B * D_IN * 2) / (hbm * 1e9)
    return {
        "chip": chip,
        "width": width,
        "k_aux": k_aux,
        "rounds_per_block": rounds,
        "ops_per_element": ops,
        "matmul_ms": t_mm * 1e3,
        "selection_ms": t_sel * 1e3,
        "hbm_ms": t_hbm * 1e3,
        "selection_over_matmul": t_sel / t_mm,
        "kernel_ms": (max(t_mm, t_hbm) + t_sel) * 1e3,
        "flop_per_byte": tb,
    }


def xla_cost(width: int, encoder: str) -> dict:
    """XLA's cost_analysis of the encoder on one v5e chip through libtpu (deviceless)."""
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this host compiles; the program is for the TPU
    import jax
    import jax.numpy as jnp

    from sae_jax.chips import tpu_devices
    from sae_jax.kernels.pallas import compiling_for
    from sae_jax.kernels.topk import EncoderOptions, topk_encode

    dev = tpu_devices("v5e:1x1")[0]
    sh = jax.sharding.SingleDeviceSharding(dev)
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sh) for s in ((B, D_IN), (D_IN, width), (width,))]
    with compiling_for("tpu"):
        c = (
            jax.jit(lambda x, w, b: topk_encode(x, w, b, K, options=EncoderOptions(encoder, dtype="bfloat16")))
            .trace(*args)
            .lower()
            .compile()
        )
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "encoder": encoder,
        "width": width,
        "xla_flops": cost.get("flops"),
        "xla_bytes": cost.get("bytes accessed"),
        "xla_optimal_ms": 1e3 * cost.get("optimal_seconds", 0.0),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", default="", help="merge_rounds.py's JSON (rounds per block by width; default: the measured table above)")
    ap.add_argument("--xla", action="store_true", help="also XLA's cost_analysis of each path through libtpu (needs libtpu)")
    a = ap.parse_args()
    table = MEASURED_ROUNDS
    if a.rounds:  # several members of one width: their mean
        by = {}
        for r in json.loads(Path(a.rounds).read_text()):
            by.setdefault(r["width"], []).append(r["gated_rounds_per_block"])
        table = {w: sum(v) / len(v) for w, v in by.items()}
    rows = [predict(chip, 2**e, rounds_at(2**e, table), k_aux) for chip in CHIPS for e in (16, 18, 20) for k_aux in (0, 512, D_IN // 2)]
    print(f"\nFused TopK encoder roofline: d_in={D_IN}, k={K}, B={B}, bf16 (predicted; see the docstring for the model)")
    print(
        f"  {'chip':<9} {'d_sae':>8} {'k_aux':>5} {'rounds':>6} {'ops/el':>6} {'matmul ms':>9} {'select ms':>9} {'HBM ms':>7} {'sel/mm':>6} {'kernel ms':>9}"
    )
    for r in rows:
        print(
            f"  {r['chip']:<9} {r['width']:>8} {r['k_aux'] or '-':>5} {r['rounds_per_block']:>6.2f} {r['ops_per_element']:>6.1f} "
            f"{r['matmul_ms']:>9.2f} {r['selection_ms']:>9.2f} {r['hbm_ms']:>7.2f} {r['selection_over_matmul']:>6.2f} {r['kernel_ms']:>9.2f}"
        )
    out = {"roofline": rows}
    if a.xla:
        out["xla"] = [xla_cost(2**e, encoder) for e in (16, 18) for encoder in ("pallas_tpu", "stream")]
        print(
            "\nXLA cost_analysis through libtpu, TPU v5e (a Pallas kernel is opaque to XLA beyond the CostEstimate it declares; loops are counted once)"
        )
        for r in out["xla"]:
            print(
                f"  {r['encoder']:<11} {r['width']:>8}  flops {r['xla_flops']:.3g}  bytes {r['xla_bytes']:.3g}  optimal {r['xla_optimal_ms']:.2f} ms"
            )
    write_json("roofline.json", out)


if __name__ == "__main__":
    main()
