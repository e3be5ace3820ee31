"""FVU against L0 for each architecture at equal width and tokens, and tokens/s against TopK.

    .venv/bin/python benchmarks/architectures.py [--part fvu|speed|all] [--store runs/demo/store] [--steps 80]
        [--only relu] [--set FIELD=VALUE ...]

On the embedded model's store (`sae-jax demo` makes runs/demo/store; harvested here if missing),
hook blocks.6.hook_resid_post (d_in 576), width 4608 (8x), batch 2048 tokens: one bank per
architecture, trained by `sae-jax train`'s own loop in this process, three sparsity settings
each (TopK / BatchTopK / Matryoshka-BatchTopK k in 16, 32, 64; JumpReLU L0 coefficient and ReLU
L1 coefficient over a range that spans similar L0s). Every run sees the same tokens in the same
order (same seed). Each member is then evaluated on the store's held-out shard with the
exported (folded) dictionary: FVU and L0 at inference (BatchTopK: its JumpReLU threshold).

Throughput (`--part speed`, run it on a quiet machine): the same banks' jitted train steps on
one device, compiled once each, then timed in interleaved rounds (every architecture once per
round, so machine noise hits all alike); median seconds per step and the ratio to TopK.

Prints tables and writes runs/bench/architectures.json (FVU part) and
runs/bench/architectures_speed.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ARCHS = [
    ("topk", {"ks": "16,32,64"}),
    ("batchtopk", {"ks": "16,32,64"}),
    ("matryoshka_batchtopk", {"ks": "32", "matryoshka_prefixes": "288,1152"}),
    ("jumprelu", {"l0_coefs": "0.001,0.003,0.01"}),
    ("relu", {"l1_coefs": "0.01,0.03,0.1"}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="runs/demo/store")
    ap.add_argument("--hook", default="blocks.6.hook_resid_post")
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--only", default="", help="comma-separated subset of the architectures")
    ap.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="a train setting for every bank (FVU part; repeatable)"
    )
    ap.add_argument("--out", default="runs/bench/architectures.json")
    ap.add_argument("--part", choices=("fvu", "speed", "all"), default="all")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers import parse_sets

    a.set = parse_sets(a.set, flag="--set")
    if a.part in ("speed", "all"):
        speed(a)
    if a.part in ("fvu", "all"):
        fvu(a)


def _bank(name: str, settings: dict, width: int, d_in: int):
    from sae_jax.sae.bank import BankSpec

    arch = name.replace("matryoshka_", "")
    if arch in ("topk", "batchtopk"):
        ks = tuple(int(k) for k in settings["ks"].split(","))
        coefs = ()
    else:
        coefs = tuple(float(v) for v in settings["l0_coefs" if arch == "jumprelu" else "l1_coefs"].split(","))
        ks = (0,) * len(coefs)
    prefixes = tuple(int(p) for p in settings.get("matryoshka_prefixes", "").split(",") if p)
    n = len(ks)
    return BankSpec(
        ("h",) * n, (width,) * n, ks, d_in, width, d_in // 2, arch, coefs, prefixes=prefixes, cap=4 * max(ks) if arch == "batchtopk" else 0
    )


def speed(a) -> None:
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from sae_jax import parallel
    from sae_jax.train.settings import TrainSettings
    from sae_jax.train.step import TrainStep

    d_in = 576
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    fns = {}
    for name, settings in ARCHS:
        spec = _bank(name, settings, a.width, d_in)
        step = TrainStep(spec, mesh, TrainSettings.defaults(steps=1000, warmup_steps=10), np.full(spec.size, 0.05))
        st = step.init_state(jax.random.key(0), None)
        x = jnp.asarray(rng.normal(size=(spec.size, a.batch, d_in)), jnp.float32)
        st, m = step(st, x)  # compile
        jax.block_until_ready(m["loss"])
        fns[name] = {"step": step, "state": st, "x": x, "members": spec.size, "times": []}
        print(f"compiled {name}", flush=True)
    for _ in range(a.rounds):
        for f in fns.values():
            t0 = time.perf_counter()
            for _ in range(2):
                f["state"], m = f["step"](f["state"], f["x"])
            jax.block_until_ready(m["loss"])
            f["times"].append((time.perf_counter() - t0) / 2)
    base = float(np.median(fns["topk"]["times"]))
    rows = []
    print(f"\n1 device, batch {a.batch}, width {a.width}, d_in {d_in}; median of {a.rounds} interleaved rounds of 2 steps")
    print(f"{'architecture':<22} {'members':>7} {'s/step':>8} {'tok/s per member':>17} {'step vs topk':>13}")
    for name, f in fns.items():
        t = float(np.median(f["times"]))
        rows.append({"architecture": name, "members": f["members"], "s_per_step": t, "tok_s": a.batch / t, "vs_topk": t / base})
        print(f"{name:<22} {f['members']:>7} {t:8.2f} {a.batch / t:17,.0f} {t / base:13.2f}")
    out = Path(a.out).with_name("architectures_speed.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"batch": a.batch, "width": a.width, "d_in": d_in, "rounds": a.rounds, "results": rows}, indent=1))
    print(f"wrote {out}")


def fvu(a) -> None:
    import shutil

    import numpy as np

    from sae_jax.config import default_config
    from sae_jax.data.store import open_store
    from sae_jax.eval.core import reconstruction_metrics
    from sae_jax.eval.inputs import heldout_rows
    from sae_jax.runs import open_run
    from sae_jax.train.loop import train

    if not (Path(a.store) / "manifest.json").is_file():
        from sae_jax.harvest import harvest

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "configs"))
        import demo

        c = demo.get_config()
        c.harvest.out = a.store
        print(f"harvesting {a.store} (the demo's store)")
        harvest(c)
    store = open_store(a.store)
    rows = None
    results, tok_s = [], {}
    only = {s for s in a.only.split(",") if s}
    for name, settings in ARCHS:
        if only and name not in only:
            continue
        c = default_config()
        t = c.train
        t.store, t.hooks, t.widths, t.batch_size, t.steps = a.store, a.hook, str(a.width), a.batch, a.steps
        t.architecture = name.replace("matryoshka_", "")
        t.warmup_steps, t.log_every, t.checkpoint_every, t.progress = 10, max(a.steps // 5, 1), a.steps, False
        for k, v in {**settings, **a.set}.items():
            t[k] = v
        t.run_dir = str(Path(a.out).parent / f"arch-{name}-{a.steps}")
        shutil.rmtree(t.run_dir, ignore_errors=True)  # a fresh run each time
        t0 = time.perf_counter()
        res = train(c, log=lambda *x: None)
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in (Path(t.run_dir) / "metrics.jsonl").read_text().splitlines()]
        steady = [r["tok_s"] for r in lines[1:]] or [lines[-1]["tok_s"]]
        tok_s[name] = float(np.median(steady))
        run = open_run(t.run_dir)
        if rows is None:
            rows, where = heldout_rows(run, store, a.hook, 20_000)
        for m, mem in enumerate(run.members):
            rec = reconstruction_metrics(run.folded(m), rows, run.eval_k(m), mem.inference)
            results.append(
                {
                    "architecture": name,
                    "member": mem.name,
                    "setting": f"k={mem.k}" if mem.inference == "topk" or mem.architecture == "batchtopk" else f"coef={mem.coef:g}",
                    "fvu": rec["latents"]["fvu"],
                    "l0": rec["sparsity"]["l0"],
                    "dead_frac": rec["latents"]["dead_frac"],
                    "truncated_frac": rec["sparsity"]["truncated_frac"],
                    "train_fvu": res.last["fvu"][m],
                    "train_l0": res.last["l0"][m],
                }
            )
        print(f"{name}: {wall:.0f} s, {tok_s[name]:,.0f} tok/s", flush=True)
    base = tok_s.get("topk")
    print(f"\nheld-out rows: {len(rows):,} ({where}); {a.steps} steps x {a.batch} tokens = {a.steps * a.batch:,} tokens per bank")
    print(f"{'architecture':<22} {'setting':<12} {'L0':>7} {'FVU':>7} {'dead %':>7} {'capped %':>9} {'loop tok/s (bank)':>18}")
    for r in results:
        ts = tok_s[r["architecture"]]
        print(
            f"{r['architecture']:<22} {r['setting']:<12} {r['l0']:7.1f} {r['fvu']:7.4f} {100 * r['dead_frac']:7.1f} "
            f"{100 * r['truncated_frac']:9.2f} {ts:18,.0f}"
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "store": a.store,
                "hook": a.hook,
                "width": a.width,
                "steps": a.steps,
                "batch": a.batch,
                "heldout_rows": len(rows),
                "tok_s": tok_s,
                "tok_s_vs_topk": {k: v / base for k, v in tok_s.items()} if base else None,
                "results": results,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
