"""How many insertion rounds the Pallas kernels' gated merge runs, on real activations.

    .venv/bin/python benchmarks/merge_rounds.py --store runs/demo/store --run runs/demo/train \\
        [--rows 4096] [--row-tile 256] [--block 512]

Per (row tile, latent block) the gated merge runs as many rounds as the tile's largest count of
block entries above the running k-th value (at most k); the unrolled merge it replaced ran k
(rounded up to a power of two) every time. This reads held-out rows of the store, encodes them
with every member of the trained run (folded to raw activations, as exported), counts both with
`kernels.pallas.gated_rounds` (the kernels' trip-count rule in plain JAX) and checks the TPU
kernel (interpret mode) against `lax.top_k` on the same rows. Without --run: a fresh dictionary
(decoder rows random, encoder = decoder transpose) on the same rows. Prints a table, writes
runs/bench/merge_rounds.json.
"""

from __future__ import annotations

import argparse

from _timing import write_json


def measure(x, w_enc, b_enc, k: int, row_tile: int, block: int) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from sae_jax.kernels.pallas import gated_rounds

    unrolled = 1 << max(0, (k - 1).bit_length())  # the unrolled merge ran k rounded up to a power of two

    s = w_enc.shape[1] // block * block
    pre = jnp.dot(jnp.asarray(x), jnp.asarray(w_enc[:, :s])) + jnp.asarray(b_enc[:s])
    rounds, _ = gated_rounds(pre, k, row_tile, block)
    rounds = np.asarray(rounds)  # [tiles, blocks]
    half = rounds.shape[1] // 2
    return {
        "width": int(s),
        "k": k,
        "blocks": int(rounds.shape[1]),
        "gated_rounds_per_block": float(rounds.mean()),
        "gated_rounds_second_half": float(rounds[:, half:].mean()),
        "unrolled_rounds_per_block": unrolled,
        "reduction": unrolled / max(float(rounds.mean()), 1e-9),
    }


def exact(x, w_enc, b_enc, k: int) -> bool:
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from sae_jax.kernels.topk import EncoderOptions, topk_encode

    v, _ = topk_encode(jnp.asarray(x), jnp.asarray(w_enc), jnp.asarray(b_enc), k, options=EncoderOptions("pallas_tpu", 512, "float32"))
    rv, _ = lax.top_k(jnp.maximum(jnp.dot(jnp.asarray(x), jnp.asarray(w_enc)) + b_enc, 0), k)
    return bool(np.allclose(np.asarray(v), np.asarray(rv), rtol=1e-5, atol=1e-5))


def main() -> None:
    import numpy as np

    from sae_jax.data.store import open_store

    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--run", default="", help="a trained run on that store (default: a fresh dictionary of --width)")
    ap.add_argument("--hook", default="", help="without --run: the hook (default: the store's first)")
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--row-tile", type=int, default=256)
    ap.add_argument("--block", type=int, default=512)
    a = ap.parse_args()
    store = open_store(a.store)
    dicts = []
    if a.run:
        from sae_jax.runs import open_run

        run = open_run(a.run)
        for m, mem in enumerate(run.members):
            f = run.folded(m)
            dicts.append((mem.name, mem.hook, f["W_enc"], f["b_enc"] - f["b_dec"] @ f["W_enc"], mem.k))
    else:
        hook = a.hook or next(iter(store.hooks))
        rng = np.random.default_rng(0)
        w = rng.standard_normal((a.width, store.width(hook))).astype(np.float32)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        dicts.append((f"fresh {a.width}", hook, w.T.copy(), np.zeros(a.width, np.float32), a.k))
    rows = []
    for name, hook, w_enc, b_enc, k in dicts:
        x = store.read_all(hook)[-a.rows :].astype(np.float32)  # the held-out end of the store
        x = x[: len(x) // a.row_tile * a.row_tile]
        r = measure(x, w_enc, b_enc, k, a.row_tile, a.block)
        r.update(member=name, hook=hook, rows=len(x), exact=exact(x[: a.row_tile], w_enc, b_enc, k))
        rows.append(r)
    print(f"\nGated merge rounds per (row tile {a.row_tile}, latent block {a.block}) on {a.store}")
    print(f"  {'member':<44} {'width':>7} {'k':>3} {'gated':>7} {'2nd half':>8} {'unrolled':>8} {'reduction':>9} {'exact':>5}")
    for r in rows:
        print(
            f"  {r['member']:<44} {r['width']:>7} {r['k']:>3} {r['gated_rounds_per_block']:>7.2f} {r['gated_rounds_second_half']:>8.2f} "
            f"{r['unrolled_rounds_per_block']:>8} {r['reduction']:>8.1f}x {str(r['exact']):>5}"
        )
    write_json("merge_rounds.json", rows)


if __name__ == "__main__":
    main()
