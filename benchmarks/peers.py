"""sae_jax against the PyTorch peers (sparsify, SAELens): the same TopK dictionary on the same rows.

    .venv/bin/python benchmarks/peers.py [--store runs/demo/store] [--widths 16384,65536]
        [--steps 100,30] [--rounds 5] [--seeds 0]

For each width: one process per trainer (`benchmarks/peer_worker.py`; sae_jax in .venv, the peers
in .peer-venv, which this script builds with `make peer-venv` if it is missing), all on the same
token rows of one hook exported from the store (train.npy / eval.npy beside the JSON: runs/bench/peers/),
the same d_in, d_sae, k, batch, Adam, schedule (warmup, constant, linear decay over the last
20%), AuxK coefficient 1/32 with a 10M-token dead window, token budget and initial directions;
each library at its own default learning rate and betas (sae_jax 1.2e-3 with b1 0.7 and its
bias and decoder rates, sparsify's Adam rule 2e-4 with torch's 0.9 / 0.999, both / sqrt(d_sae /
2^14); SAELens, which has no rule, at sparsify's), or every one at sae_jax's lr with `--peer-lr
ours`. Every trainer takes one untimed step first
(compilation, allocation; it counts toward the budget), then the rest in `--rounds` chunks,
trainer order rotating every round, so that the machine's noise falls on all of them alike.

Reported per trainer: tokens/s over the timed steps, the ratio to sparsify, the process's peak
RSS, and FVU / L0 / dead-latent fraction on the store's held-out shard computed with each
library's own encoder and decoder (benchmarks/_heldout.py; dead = fires on no held-out row), and
the fraction of latents that fired on none of the last `--dead-window` training batches. Also
the sae_jax loader's rows/s from the store against the sae_jax step's consumption. A table is
printed; JSON goes to runs/bench/peers.json.
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

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "peer_worker.py"
PEER_PY = ROOT / ".peer-venv" / "bin" / "python"
TRAINERS = ("sae_jax", "sparsify", "saelens")
PEER_LR = 2e-4  # sparsify's Adam rule at 2^14 latents (scaled by 1/sqrt(d_sae / 2^14)); SAELens has no default, given the same


def ensure_peer_venv() -> None:
    ok = PEER_PY.exists() and subprocess.run([str(PEER_PY), "-c", "import sparsify, sae_lens, torch"], capture_output=True).returncode == 0
    if not ok:
        print("building .peer-venv (Python 3.11, torch 2.13.0 CPU, sae-lens, eai-sparsify): make peer-venv", flush=True)
        subprocess.run(["make", "-C", str(ROOT), "peer-venv"], check=True)


def ensure_store(store: Path) -> None:
    if (store / "manifest.json").exists():
        return
    if store != ROOT / "runs/demo/store":
        sys.exit(f"no store at {store} (manifest.json missing): harvest one with `sae-jax harvest`")
    print(f"harvesting the demo store into {store} (sae-jax harvest --config=configs/demo.py, ~3 min)", flush=True)
    subprocess.run([str(ROOT / ".venv/bin/sae-jax"), "harvest", f"--config={ROOT / 'configs/demo.py'}"], check=True, cwd=ROOT)


def export_rows(store_dir: Path, hook: str, out: Path) -> dict:
    """The hook's training rows (every shard but the last) and held-out rows (the last shard), as
    float32 .npy for every trainer; the store's statistics give sae_jax's input scale."""
    from sae_jax.data.store import open_store
    from sae_jax.train.loop import input_scales, train_records

    store = open_store(store_dir, verify=True)
    if hook not in store.hooks:
        sys.exit(f"hook {hook!r} is not in {store_dir} (it has {', '.join(store.hooks)})")
    _, end = train_records(store, 1)
    rows = store.read_all(hook)
    cut = end * store.rows_per_record
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train.npy", rows[:cut].astype(np.float32))
    np.save(out / "eval.npy", rows[cut:].astype(np.float32))
    return {
        "store": str(store_dir),
        "hook": hook,
        "d_in": store.width(hook),
        "train_rows": int(cut),
        "eval_rows": int(len(rows) - cut),
        "input_scale": float(input_scales(store, [hook])[0]),
        "dtype": str(store.dtype),
    }


def loader_rate(store_dir: Path, hook: str, batch: int, batches: int) -> float:
    """Rows/s of the sae_jax loader (Grain over the ArrayRecord shards, 4 threads), as training reads."""
    from sae_jax.data.loader import activation_dataset, iterator
    from sae_jax.data.store import open_store
    from sae_jax.train.loop import train_records

    store = open_store(store_dir)
    it = iterator(activation_dataset(store, [hook], batch, seed=0, records=train_records(store, 1)))
    next(it)  # warm-up (threads, first reads)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


class Worker:
    def __init__(self, name: str):
        py = sys.executable if name == "sae_jax" else str(PEER_PY)
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
        self.name = name
        self.p = subprocess.Popen([py, str(WORKER), name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def ask(self, **msg) -> dict:
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            sys.exit(f"{self.name} worker died (exit {self.p.wait()}); its stderr is above")
        r = json.loads(line)
        if not r.get("ok"):
            sys.exit(r.get("error"))
        return r

    def close(self) -> None:
        try:
            self.ask(cmd="quit")
        finally:
            self.p.wait(timeout=60)


def downstream(worker: Worker, name: str, folder: Path, meta: dict, args) -> dict:
    """The trainer saves its dictionary in its library's own layout (sae_jax: sparsify's), and
    `sae-jax eval FOLDER --store STORE` splices it into the model on held-out text."""
    import shutil

    from sae_jax.model.hf_modules import hf_module

    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    worker.ask(cmd="save", folder=str(folder), hook=meta["hook"], hookpoint=hf_module(meta["hook"]) or meta["hook"])
    cmd = [str(ROOT / ".venv/bin/sae-jax"), "eval", str(folder), "--store", meta["store"], "--tokens", "4096"]
    if args.text:  # a store harvested from plain text has no held-out split of its own
        cmd += ["--text", args.text]
    r = subprocess.run([*cmd, "--contexts", str(args.downstream), "--out", str(folder / "eval")], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"{name}: sae-jax eval failed:\n{r.stderr[-3000:]}")
    (rep,) = json.loads((folder / "eval" / "eval.json").read_text())["members"].values()
    perf, behav = rep["model_performance_preservation"], rep["model_behavior_preservation"]
    return {"loss_recovered": perf["ce_loss_score"], "ce_with_sae": perf["ce_loss_with_sae"], "kl_with_sae": behav["kl_div_with_sae"]}


def parse_sets(items: list[str], flag: str = "--sae-jax-set") -> dict:
    """`FIELD=VALUE` pairs into TrainSettings overrides (VALUE read as a Python literal, else a string)."""
    import ast
    import dataclasses

    from sae_jax.train.settings import TrainSettings

    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            sys.exit(f"{flag} {item!r}: expected FIELD=VALUE with FIELD a TrainSettings field ({', '.join(sorted(fields))})")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def run_width(width: int, steps: int, rounds: int, seed: int, meta: dict, data: Path, args) -> list[dict]:
    from sae_jax.train.optimizer import default_lr

    rng = np.random.default_rng(seed)
    D = rng.standard_normal((width, meta["d_in"])).astype(np.float32)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    np.save(data / "init.npy", D)
    cfg = {
        "train": str(data / "train.npy"),
        "init": str(data / "init.npy"),
        "d_in": meta["d_in"],
        "width": width,
        "k": args.k,
        "batch": args.batch,
        "steps": steps,
        "lr": default_lr(width, "topk"),  # sae_jax's default; the peers' own below unless --peer-lr ours
        "warmup": args.warmup,
        "decay_frac": 0.2,
        "aux_coef": 1 / 32,
        "dead_tokens": 10_000_000,
        "seed": seed,
        "dead_window": args.dead_window,
        "input_scale": meta["input_scale"],
        "sae_jax_set": args.sae_jax_set,
    }
    workers = {n: Worker(n) for n in args.trainers}
    try:
        res = {n: {"trainer": n, "width": width, "seed": seed, "steps": steps, "seconds": 0.0} for n in workers}
        for n, w in workers.items():
            lr = cfg["lr"] if n == "sae_jax" or args.peer_lr == "ours" else PEER_LR / float(np.sqrt(width / 2**14))
            lr = args.sae_jax_set.get("lr", lr) if n == "sae_jax" else lr
            res[n]["lr"] = lr
            init = w.ask(cmd="init", **{**cfg, "lr": lr})
            res[n]["init_s"], res[n]["threads"] = init["init_s"], init["threads"]
            if "encoder_dtype" in init:
                res[n]["encoder_dtype"] = init["encoder_dtype"]
            res[n]["first_step_s"] = w.ask(cmd="train", steps=1)["seconds"]
        left, order = steps - 1, list(workers)
        for r in range(rounds):
            chunk = left // (rounds - r)
            for n in order:
                out = workers[n].ask(cmd="train", steps=chunk)
                res[n]["seconds"] += out["seconds"]
                res[n]["peak_rss_mib"] = out["peak_rss_mib"]
                print(f"  d_sae {width} round {r + 1}/{rounds}: {n:<8} {chunk} steps {out['seconds']:7.1f} s", flush=True)
            left -= chunk
            order = order[1:] + order[:1]
        for n, w in workers.items():
            ev = w.ask(cmd="eval", rows=str(data / "eval.npy"))
            res[n].update({k: ev[k] for k in ("fvu", "l0", "dead_frac", "window_dead_frac", "eval_rows")})
            res[n]["tok_s"] = (steps - 1) * args.batch / res[n]["seconds"]
            if n == "sae_jax":  # step / its floor, the encoder matmul, timed in the same process
                res[n]["matmul_s"] = w.ask(cmd="matmul")["seconds"]
                res[n]["step_over_matmul"] = res[n]["seconds"] / (steps - 1) / res[n]["matmul_s"]
            if args.downstream:
                res[n].update(downstream(w, n, data / "dicts" / f"w{width}.s{seed}.{n}", meta, args))
    finally:
        for w in workers.values():
            if w.p.poll() is None:
                w.close()
    return list(res.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=str(ROOT / "runs/demo/store"))
    ap.add_argument("--hook", default="", help="default: the store's first hook")
    ap.add_argument("--widths", default="16384,65536")
    ap.add_argument("--steps", default="100,30", help="steps per width (one value: every width)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dead-window", type=int, default=10, help="steps: dead in training = no fire in the last this many batches")
    ap.add_argument("--seeds", default="0", help="comma-separated: repeat each width per seed (FVU noise)")
    ap.add_argument("--trainers", default=",".join(TRAINERS))
    ap.add_argument(
        "--downstream",
        type=int,
        default=0,
        help="held-out text contexts to splice each trained dictionary into the model on (sae-jax eval; 0: none)",
    )
    ap.add_argument(
        "--text",
        default="",
        help="held-out text for --downstream (file, directory or glob), needed when the store was harvested from plain text",
    )
    ap.add_argument(
        "--peer-lr", default="own", choices=("own", "ours"), help="the peers' Adam lr: their rule (2e-4 / sqrt(d_sae / 2^14)) or sae_jax's"
    )
    ap.add_argument(
        "--sae-jax-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a TrainSettings field for sae_jax's step (e.g. bias_lr_scale=0.3; repeatable): what-if runs against the defaults",
    )
    ap.add_argument("--out", default=str(ROOT / "runs/bench/peers.json"))
    args = ap.parse_args()
    args.sae_jax_set = parse_sets(args.sae_jax_set)
    args.trainers = [t for t in args.trainers.split(",") if t]
    if bad := [t for t in args.trainers if t not in TRAINERS]:
        sys.exit(f"--trainers: unknown {bad} (choose from {', '.join(TRAINERS)})")
    widths = [int(w) for w in args.widths.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    steps = steps * len(widths) if len(steps) == 1 else steps
    if len(steps) != len(widths) or min(steps) < args.rounds + 1:
        sys.exit(f"--steps: one value per width ({len(widths)}), each at least --rounds + 1 = {args.rounds + 1}")

    store = Path(args.store).resolve()
    ensure_store(store)
    if set(args.trainers) - {"sae_jax"}:
        ensure_peer_venv()
    from sae_jax.data.store import open_store

    hook = args.hook or next(iter(open_store(store).hooks))
    data = Path(args.out).with_suffix("")  # runs/bench/peers/: the exported rows and directions
    meta = export_rows(store, hook, data)
    print(f"{meta['train_rows']:,} training rows, {meta['eval_rows']:,} held-out rows of {hook} (d_in {meta['d_in']}) from {store}")
    meta["loader_rows_s"] = loader_rate(store, hook, args.batch, 20)

    rows = []
    for width, n in zip(widths, steps, strict=True):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += run_width(width, n, args.rounds, seed, meta, data, args)

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}"
    report = {"machine": machine, "data": meta, "settings": {k: v for k, v in vars(args).items()}, "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))

    print(f"\nTopK, d_in {meta['d_in']}, k {args.k}, batch {args.batch} ({machine})")
    print(
        f"  {'d_sae':>6} {'seed':>4} {'trainer':<8} {'threads':>7} {'lr':>8} {'tokens':>9} {'tok/s':>7} {'vs sparsify':>11} {'peak RSS':>9} {'FVU':>7} {'L0':>6} {'dead %':>7} {'dead % (train)':>14}"
    )
    for r in rows:
        base = next((b for b in rows if b["trainer"] == "sparsify" and b["width"] == r["width"] and b["seed"] == r["seed"]), None)
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "-"
        print(
            f"  {r['width']:>6} {r['seed']:>4} {r['trainer']:<8} {r['threads']:>7} {r['lr']:>8.1e} {r['steps'] * args.batch:>9,} {r['tok_s']:>7,.0f} {ratio:>11} "
            f"{r['peak_rss_mib']:>6,.0f} MiB {r['fvu']:>7.4f} {r['l0']:>6.1f} {100 * r['dead_frac']:>7.2f} {100 * r['window_dead_frac']:>14.2f}"
        )
    if args.downstream:
        print(f"\nspliced into the model (sae-jax eval, {args.downstream} held-out contexts):")
        for r in rows:
            print(
                f"  {r['width']:>6} {r['seed']:>4} {r['trainer']:<8} loss recovered {r['loss_recovered']:.4f}  "
                f"CE with it {r['ce_with_sae']:.4f}  KL {r['kl_with_sae']:.4f}"
            )
    sj = [r for r in rows if r["trainer"] == "sae_jax"]
    for r in sj:
        print(
            f"  sae_jax d_sae {r['width']} seed {r['seed']}: step {r['seconds'] / (r['steps'] - 1):.3f} s, encoder matmul alone ({r.get('encoder_dtype', '?')}) {r['matmul_s']:.3f} s: step / matmul {r['step_over_matmul']:.2f}"
        )
    if sj:
        consume = max(r["tok_s"] for r in sj)
        print(
            f"\nloader: {meta['loader_rows_s']:,.0f} rows/s from the store; the sae_jax step consumes at most {consume:,.0f}/s ({meta['loader_rows_s'] / consume:.1f}x headroom)"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
