"""Feature recovery: dictionaries trained on synthetic activations with known features, scored on held-out rows.

    .venv/bin/python benchmarks/recovery.py [--worlds skewed,flat] [--tokens 500000,1500000]
        [--seeds 0,1,2] [--trainers sae_jax,sparsify,sparsify_adam,saelens]

Each world (`sae_jax.data.synthetic.WorldSpec`: frequency skew, heavy-tailed magnitudes,
co-occurring groups, noise, d_in, overcompleteness) and seed gives one store written through
`StoreWriter` (float32; hook `world`, a name no transformer has): the largest token budget's rows,
then one held-out shard (the store's last, which `sae-jax train` leaves out). At each budget:

- `sae_jax`: `sae-jax train` on the store with its defaults (widths, ks, batch_size, steps, seed
  set; nothing else), the dictionary read back folded to raw activations (`open_run(...).folded`);
- `sparsify`: eai-sparsify's own default recipe (its SparseCoder and init; schedule-free SignSGD,
  lr 5e-3 / sqrt(d_sae / 2^14), momentum 0.95, no AuxK; b_dec the first batch's mean; the averaged
  weights at the end), driven by benchmarks/peer_worker.py in .peer-venv on the same training rows;
- `sparsify_adam`: the same SparseCoder with sparsify's Adam rule (2e-4 / sqrt(d_sae / 2^14)) at
  sae_jax's schedule (as in benchmarks/peers.py); `saelens`: SAELens's TopK trainer with that lr
  and schedule.

The peers read the store's training rows in store order; `sae-jax train` reads the same rows in its
loader's seeded record order (the rows are i.i.d., so at a budget below the store's rows each reads
a different subset of one distribution). Scores on the held-out shard, one definition for all
(benchmarks/_heldout.py, plus `FeatureWorld.recovery`): FVU, L0, dead share (latents firing on no
held-out row), mean over true features of the best decoder cosine, share of features recovered at
cosine > 0.9 (all, and the most frequent tenth), tokens/s of the training (sae_jax: its own
metrics, compile excluded; peers: the timed steps). A table is printed; JSON goes to
runs/bench/recovery.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _heldout import Accumulator  # noqa: E402
from peers import PEER_LR, ROOT, Worker, ensure_peer_venv, export_rows, parse_sets  # noqa: E402

from sae_jax.data.synthetic import FeatureWorld, WorldSpec  # noqa: E402
from sae_jax.kernels.topk import resolve_encoder_dtype  # noqa: E402
from sae_jax.train.settings import TrainSettings, base_lr  # noqa: E402

HOOK = "world"
HELDOUT = 65536  # rows: one shard
# name: (world, d_sae, k)
WORLDS = {
    "skewed": (WorldSpec(d_in=256, n_features=2048, mean_active=8, skew=0.8, mag_sigma=0.5, corr=0.3, noise=0.05), 4096, 8),
    "flat": (WorldSpec(d_in=256, n_features=2048, mean_active=8, skew=0.3, mag_sigma=0.25, corr=0.0, noise=0.02), 4096, 8),
    "dense": (WorldSpec(d_in=128, n_features=4096, mean_active=16, skew=0.8, mag_sigma=0.5, corr=0.3, noise=0.05), 8192, 16),
}
PEERS = ("sparsify", "sparsify_adam", "saelens")
_D = TrainSettings.defaults()
# sae_jax's defaults, in its runs' names (the encoder dtype resolved for this machine: `auto`)
RECIPE = (
    f"lr{base_lr('topk'):g}.b{_D.bias_lr_scale:g}{_D.bias_lr_units}.d{_D.decoder_lr_scale:g}.adam{_D.adam_b1:g}-{_D.adam_b2:g}-{_D.adam_eps:g}"
    f".{resolve_encoder_dtype(_D.encoder_dtype)}.state{_D.optimizer_state}"
)


def write_world(world: FeatureWorld, rows: int, seed: int, out: Path) -> None:
    from sae_jax.data.writer import StoreWriter

    if (out / "manifest.json").exists() and json.loads((out / "manifest.json").read_text()).get("complete"):
        return
    rng = np.random.default_rng([seed, 3])
    with StoreWriter(
        out,
        {HOOK: world.spec.d_in},
        dtype="float32",
        shard_rows=HELDOUT,
        seed=seed,
        header={"source": {"kind": "synthetic", "world": repr(world.spec)}},
    ) as w:
        for _ in range(0, rows + HELDOUT, HELDOUT):
            w.add({HOOK: world.sample(HELDOUT, rng)})


def train_sae_jax(store: Path, run: Path, width: int, k: int, batch: int, steps: int, seed: int, sets: dict) -> dict:
    from sae_jax.runs import open_run

    settings = dict(
        store=store, run_dir=run, widths=width, ks=k, batch_size=batch, steps=steps, seed=seed, progress=False, verify_store=False, **sets
    )
    cmd = [str(ROOT / ".venv/bin/sae-jax"), "train", *[f"--config.train.{a}={b}" for a, b in settings.items()]]
    if not (run / "config.json").exists() or not open_run(run).finished:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            sys.exit(f"sae-jax train failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [m["tok_s"] for m in recs][1:]  # the first includes compilation
    p = open_run(run).folded(0)
    return {"params": p, "tok_s": float(np.median(rates)) if rates else float("nan")}


def score(world: FeatureWorld, eval_rows: np.ndarray, k: int, params: dict | None = None, dec: np.ndarray | None = None) -> dict:
    import jax.numpy as jnp

    from sae_jax.sae import folded

    out = {}
    if params is not None:
        raw = {n: jnp.asarray(params[n]) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        acc = Accumulator(params["W_dec"].shape[0])
        for c in range(0, len(eval_rows), 4096):
            x = jnp.asarray(eval_rows[c : c + 4096])
            v, i = folded.encode(raw, x, k)
            acc.add(eval_rows[c : c + 4096], np.asarray(folded.decode(raw, v, i)), np.asarray(i), np.asarray(v))
        out = acc.result()
        dec = params["W_dec"]
    return {**out, **world.recovery(dec)}


def run_peer(name: str, data: Path, meta: dict, width: int, k: int, batch: int, steps: int, seed: int) -> dict:
    cfg = {
        "train": str(data / "train.npy"),
        "d_in": meta["d_in"],
        "width": width,
        "k": k,
        "batch": batch,
        "steps": steps,
        "lr": PEER_LR / float(np.sqrt(width / 2**14)),  # sparsify's Adam rule
        "warmup": 20,
        "decay_frac": 0.2,
        "aux_coef": 1 / 32,
        "dead_tokens": 10_000_000,
        "seed": seed,
        "dead_window": 10,
        "input_scale": meta["input_scale"],
        "dec_out": str(data / f"{name}_dec.npy"),
    }
    if name == "sparsify":
        cfg.update(optimizer="signum", lr=5e-3 / float(np.sqrt(width / 2**14)), aux_coef=0.0)
    w = Worker("sparsify" if name.startswith("sparsify") else name)
    try:
        w.ask(cmd="init", **cfg)
        w.ask(cmd="train", steps=1)  # untimed: allocation, first-step work
        seconds = w.ask(cmd="train", steps=steps - 1)["seconds"]
        ev = w.ask(cmd="eval", rows=str(data / "eval.npy"))
    finally:
        if w.p.poll() is None:
            w.close()
    return {"fvu": ev["fvu"], "l0": ev["l0"], "dead_frac": ev["dead_frac"], "tok_s": (steps - 1) * batch / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="skewed,flat", help=f"of {', '.join(WORLDS)}")
    ap.add_argument("--tokens", default="500000,1500000", help="token budgets (rounded up to whole batches)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--trainers", default="sae_jax,sparsify,sparsify_adam")
    ap.add_argument("--dir", default=str(ROOT / "runs/bench/recovery"), help="stores and runs (reused when complete)")
    ap.add_argument(
        "--sae-jax-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a train setting for sae_jax (e.g. optimizer_state=float32; repeatable): what-if runs, cached under their own name",
    )
    ap.add_argument("--out", default=str(ROOT / "runs/bench/recovery.json"))
    args = ap.parse_args()
    sets = parse_sets(args.sae_jax_set)
    recipe = RECIPE + "".join(f".{k}={v}" for k, v in sorted(sets.items()))
    trainers = args.trainers.split(",")
    bad = [t for t in trainers if t not in ("sae_jax", *PEERS)] + [w for w in args.worlds.split(",") if w not in WORLDS]
    if bad:
        sys.exit(f"unknown trainer or world: {', '.join(bad)} (trainers: sae_jax, {', '.join(PEERS)}; worlds: {', '.join(WORLDS)})")
    if any(t in PEERS for t in trainers):
        ensure_peer_venv()
    budgets = sorted(int(t) for t in args.tokens.split(","))
    rows = []
    for wname in args.worlds.split(","):
        spec, width, k = WORLDS[wname]
        for seed in (int(s) for s in args.seeds.split(",")):
            world = FeatureWorld(spec, seed)
            base = Path(args.dir) / f"{wname}.s{seed}"
            n_train = -(-budgets[-1] // HELDOUT) * HELDOUT
            write_world(world, n_train, seed, base / "store")
            meta = export_rows(base / "store", HOOK, base / "rows")
            eval_rows = np.load(base / "rows/eval.npy")
            for tokens in budgets:
                steps = -(-tokens // args.batch)
                for t in trainers:
                    # results are kept per (trainer, budget) and reused: sae_jax's under its recipe's name
                    name = f"{t}.{recipe}" if t == "sae_jax" else t
                    cached = base / "results" / f"{name}.t{tokens}.json"
                    if cached.exists():
                        row = res = json.loads(cached.read_text())
                        rows.append(row)
                    else:
                        t0 = time.perf_counter()
                        if t == "sae_jax":
                            r = train_sae_jax(base / "store", base / f"{name}.t{tokens}", width, k, args.batch, steps, seed, sets)
                            res = {**score(world, eval_rows, k, params=r["params"]), "tok_s": r["tok_s"]}
                        else:
                            res = run_peer(t, base / "rows", meta, width, k, args.batch, steps, seed)
                            res.update(score(world, eval_rows, k, dec=np.load(base / f"rows/{t}_dec.npy")))
                        row = {"world": wname, "seed": seed, "tokens": steps * args.batch, "trainer": t, "d_sae": width, "k": k, **res}
                        row["wall_s"] = time.perf_counter() - t0
                        rows.append(row)
                        cached.parent.mkdir(exist_ok=True)
                        cached.write_text(json.dumps(row))
                    print(
                        f"  {wname:<7} seed {seed} {row['tokens']:>9,} {t:<14} FVU {res['fvu']:.4f} cos {res['mean_max_cos']:.3f} "
                        f"rec {res['recovered']:.3f} dead {res['dead_frac']:.3f} {res['tok_s']:>8,.0f} tok/s",
                        flush=True,
                    )
    report(rows, trainers)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    out.write_text(json.dumps({"machine": machine, "worlds": {w: repr(WORLDS[w]) for w in args.worlds.split(",")}, "rows": rows}, indent=1))
    print(f"wrote {out}")


def report(rows: list[dict], trainers: list[str]) -> None:
    """Means over seeds per (world, tokens, trainer), and sae_jax minus each peer paired by seed."""
    keys = sorted({(r["world"], r["tokens"]) for r in rows})
    cols = ("fvu", "mean_max_cos", "recovered", "recovered_frequent", "dead_frac", "l0", "tok_s")
    print(f"\n  {'world':<7} {'tokens':>9} {'trainer':<14} " + " ".join(f"{c:>18}" for c in cols))
    for wk in keys:
        for t in trainers:
            sel = [r for r in rows if (r["world"], r["tokens"]) == wk and r["trainer"] == t]
            cells = []
            for c in cols:
                v = np.array([r[c] for r in sel])
                cells.append(
                    f"{v.mean():>10.4f} ±{v.std(ddof=1) if len(v) > 1 else 0:>6.4f}" if c != "tok_s" else f"{np.median(v):>18,.0f}"
                )
            print(f"  {wk[0]:<7} {wk[1]:>9,} {t:<14} " + " ".join(cells))


if __name__ == "__main__":
    main()
