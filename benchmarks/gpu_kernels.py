"""TopK encoder kernels on one GPU (or TPU chip): fused vs dense, encoder alone and full step, MFU.

    python benchmarks/gpu_kernels.py                 # d_in=2304, k=64, B=8192, bf16, d_sae 2^16, 2^18, 2^20
    python benchmarks/gpu_kernels.py --smoke         # tiny shapes, any backend (checks the script runs)

For each d_sae: the encoder matmul alone (`x @ W_enc`, bf16: the step's floor), the encoder
(`topk_encode`, forward, bf16 inputs) and the full train step (forward with bf16 encoder
matmuls, `train.encoder_dtype=bfloat16`; sparse backward; Adam; decoder renormalisation; float32
parameters) without dead latents and with every latent dead after the first step (the AuxK
branch on every step: `train.dead_tokens=1`), for each implementation: `dense` (the reference),
`rows` (XLA in large row blocks: `auto` on GPU) and the platform's Pallas kernel (`auto` on TPU).
Beside each, `benchmarks/roofline.py`'s predicted fused-kernel time for the chip. Per width
also the row selection alone on the matmul's output, `lax.top_k` against the tournament
`kernels.select.tree_top_k` (at k and at AuxK's k_aux), and what `sae_jax.hlo_cost` predicts for
the selection and the whole step (main path, AuxK live) from the step this GPU's compiler built,
to hold against the measured `rows` step and `+dead` step. MFU as docs/design.md (section 8) defines it: (2 B d_in d_sae + the sparse
terms 2 B k d_in x 3 for decode, dx and dW) / (time x the chip's peak bf16 FLOP/s); the encoder
alone counts 2 B d_in d_sae. A configuration that fails (out of memory) is reported as such.
Goals (issue 16): encoder MFU >= 50% at 2^18; the full step <= 1.3x the encoder matmul; 2^20
trains on one chip (the compile check says: an H200, not an H100). Prepared to run on an H100/H200 in one
go, under 10 minutes on an H100/H200.
Writes runs/bench/gpu_kernels.json.
"""

from __future__ import annotations

import argparse
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from _timing import timed, write_json

PEAK_BF16 = {  # dense bf16 FLOP/s per chip
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def peak(device) -> float | None:
    kind = device.device_kind
    for name, p in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return p
    return None


def cell(r: dict, key: str, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    v = r.get(key)
    if v is None:
        return "fail" if f"{key.split('_')[0]}_error" in r else "-"
    return fmt.format(v * scale)


def encoder_time(B, d, S, k, encoder, reps):
    from sae_jax.kernels.topk import EncoderOptions, topk_encode

    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (B, d), jnp.bfloat16)
    w = (jax.random.normal(kw, (d, S), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
    b = jnp.zeros((S,), jnp.bfloat16)
    f = jax.jit(lambda x, w, b: topk_encode(x, w, b, k, options=EncoderOptions(encoder, dtype="bfloat16")))
    return timed(lambda: f(x, w, b), reps)


def matmul_time(B, d, S, reps):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (B, d), jnp.bfloat16)
    w = (jax.random.normal(kw, (d, S), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
    f = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).sum())
    return timed(lambda: f(x, w), reps)


def selection_times(B, d, S, k, k_aux, reps) -> dict:
    """The row selection alone on the matmul's float32 output [B, S]: XLA's `lax.top_k` (what the
    `rows` encoder ran before: a sort of every row on a GPU) against `kernels.select.tree_top_k`
    (the tournament of group maxima), at k and, over a quarter of the latents (dead), at k_aux."""
    from jax import lax

    from sae_jax.kernels.select import tree_top_k

    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (B, d), jnp.bfloat16)
    w = (jax.random.normal(kw, (d, S), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
    pre = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))(x, w)
    dead = jnp.where(jnp.arange(S) % 4 == 0, 0.0, -jnp.inf)
    out = {}
    for name, fn in (("lax_top_k", lambda p, b, kk: lax.top_k(p + b, kk)), ("tree_top_k", lambda p, b, kk: tree_top_k(p, kk, b))):
        for tag, b, kk in (("k", jnp.zeros(S), k), ("k_aux", dead, k_aux)):
            f = jax.jit(lambda p, b, fn=fn, kk=kk: fn(p, b, kk)[0].sum())
            try:
                out[f"{name}_{tag}_s"] = timed(lambda f=f, b=b: f(pre, b), reps)
            except Exception as e:  # noqa: BLE001  (out of memory)
                out[f"{name}_{tag}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


def predicted_selection(B, d, S, k, encoder) -> dict | None:
    """`sae_jax.hlo_cost`'s roofline of the step as this GPU's compiler built it (None off H100 / H200)."""
    from sae_jax import hlo_cost

    kind = jax.devices()[0].device_kind.lower()
    gpu = next((g for g in hlo_cost.GPUS if g in kind), None)
    if gpu is None:
        return None
    step, x = _step(B, d, S, k, encoder, dead=False)
    text = step.lower(step.abstract_state(), x).compile().as_text()
    return hlo_cost.gpu_roofline(hlo_cost.step_cost(text), gpu, B)


def _step(B, d, S, k, encoder, dead: bool):
    from sae_jax import parallel
    from sae_jax.sae.bank import BankSpec
    from sae_jax.train.settings import TrainSettings
    from sae_jax.train.step import TrainStep

    spec = BankSpec(("h",), (S,), (k,), d, S, min(d // 2, 512), "topk")
    mesh = parallel.make_mesh(jax.device_count(), 1)
    dead_tokens = 1 if dead else 10**9  # 1: every latent not in the last batch's top-k is dead (AuxK every step)
    settings = TrainSettings.defaults(steps=1000, warmup_steps=10, dead_tokens=dead_tokens, encoder=encoder, encoder_dtype="bfloat16")
    step = TrainStep(spec, mesh, settings)
    x = jax.random.normal(jax.random.key(1), (1, B, d), jnp.bfloat16)
    return step, x


def step_time(B, d, S, k, encoder, reps, dead: bool = False):
    step, x = _step(B, d, S, k, encoder, dead)
    state = step.init_state(jax.random.key(0), None)
    holder = {"s": state}

    def one():
        holder["s"], m = step(holder["s"], x)
        return m["loss"]

    return timed(one, reps)


def _roofline_ms(kind: str, S: int, B: int, d: int, k: int) -> float | None:
    """benchmarks/roofline.py's predicted fused-kernel time on this chip (its own shape: d_in 2304, k 64, B 8192)."""
    try:
        import roofline
    except ImportError:
        return None
    kinds = {"TPU v5 lite": "TPU v5e", "TPU v6 lite": "TPU v6e", "TPU v5": "TPU v5p", "H100": "H100 SXM", "H200": "H200"}
    chip = next((c for name, c in kinds.items() if name.lower() in kind.lower()), None)
    if chip is None or (B, d, k) != (roofline.B, roofline.D_IN, roofline.K):
        return None
    return roofline.predict(chip, S, roofline.rounds_at(S, roofline.MEASURED_ROUNDS), 0)["kernel_ms"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="16,18,20")
    ap.add_argument("--d-in", type=int, default=2304)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: check the script on any backend")
    a = ap.parse_args()
    if a.smoke:
        a.widths, a.d_in, a.k, a.batch, a.reps = "10,11", 64, 8, 64, 1
    dev = jax.devices()[0]
    pk = peak(dev)
    B, d, k = a.batch, a.d_in, a.k
    print(f"{dev.device_kind} ({jax.default_backend()}), peak bf16 {pk / 1e12 if pk else float('nan'):.0f} TFLOP/s; B={B}, d_in={d}, k={k}")
    backend = jax.default_backend()
    encoders = ["dense", "rows"] + ([f"pallas_{backend}"] if backend in ("gpu", "tpu") else [])
    print(
        f"  {'d_sae':>7} {'path':>11} {'matmul ms':>9} {'encoder ms':>11} {'enc MFU':>8} {'step ms':>9} {'step MFU':>9} "
        f"{'step/mm':>8} {'+dead ms':>9} {'tok/s':>10} {'roofline ms':>11}"
    )
    rows = []
    for lg in (int(v) for v in a.widths.split(",")):
        S = 1 << lg
        flops_enc = 2 * B * d * S
        flops_step = flops_enc + 3 * 2 * B * k * d
        try:
            t_mm = matmul_time(B, d, S, a.reps)
        except Exception as e:  # noqa: BLE001
            t_mm = None
            print(f"  matmul at 2^{lg} failed: {type(e).__name__}")
        predicted = _roofline_ms(dev.device_kind, S, B, d, k)
        sel = selection_times(B, d, S, k, min(d // 2, 512), a.reps)
        try:
            hlo = predicted_selection(B, d, S, k, "rows")
        except Exception as e:  # noqa: BLE001
            hlo = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        rows.append({"d_sae": S, "path": "selection", "device": dev.device_kind, "matmul_s": t_mm, **sel, "hlo_roofline": hlo})
        main = (hlo or {}).get("main", {})
        print(
            f"  {'2^' + str(lg):>7} selection: lax.top_k {cell(sel, 'lax_top_k_k_s', 1e3)} ms (k_aux {cell(sel, 'lax_top_k_k_aux_s', 1e3)}), "
            f"tree_top_k {cell(sel, 'tree_top_k_k_s', 1e3)} ms (k_aux {cell(sel, 'tree_top_k_k_aux_s', 1e3)}); "
            f"predicted from the compiled step: selection {main.get('select_ms', float('nan')):.2f} ms = "
            f"{main.get('select_over_matmul', float('nan')):.2f} x matmul; step {main.get('step_ms', float('nan')):.1f} ms, "
            f"AuxK live {(hlo or {}).get('aux', {}).get('step_ms', float('nan')):.1f} ms (measured: `rows` step, +dead below)"
        )
        for encoder in encoders:
            r = {"d_sae": S, "path": encoder, "device": dev.device_kind, "matmul_s": t_mm, "roofline_kernel_ms": predicted}
            for what, fn in (("encoder", encoder_time), ("step", step_time), ("dead", lambda *x: step_time(*x, dead=True))):
                try:
                    t = fn(B, d, S, k, encoder, a.reps)
                    r[f"{what}_s"] = t
                    r[f"{what}_mfu"] = ((flops_enc if what == "encoder" else flops_step) / t / pk) if pk else None
                except Exception as e:  # out of memory, or a lowering the backend lacks
                    r[f"{what}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    traceback.print_exc(limit=1)
            if t_mm and "step_s" in r:
                r["step_over_matmul"] = r["step_s"] / t_mm
            rows.append(r)
            tok_s = f"{B / r['step_s']:,.0f}" if "step_s" in r else "-"
            print(
                f"  {'2^' + str(lg):>7} {encoder:>11} {(t_mm or float('nan')) * 1e3:>9.2f} {cell(r, 'encoder_s', 1e3):>11} "
                f"{cell(r, 'encoder_mfu', 100, '{:.0f}%'):>8} {cell(r, 'step_s', 1e3):>9} {cell(r, 'step_mfu', 100, '{:.0f}%'):>9} "
                f"{cell(r, 'step_over_matmul', 1, '{:.2f}'):>8} {cell(r, 'dead_s', 1e3):>9} {tok_s:>10} "
                f"{predicted if predicted is None else round(predicted, 2)!s:>11}"
            )
    write_json("gpu_kernels.json", rows)


if __name__ == "__main__":
    main()
