"""`sae-jax train`: train a bank of TopK SAEs on a store, checkpointing with Orbax.

The run directory holds `config.json`, `checkpoints/` (Orbax CheckpointManager: items `state`
and `data`, the Grain iterator's position) and `metrics.jsonl`. Running the same command again
resumes from the latest checkpoint; SIGTERM saves and exits.
"""

from __future__ import annotations

import itertools
import json
import signal
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sae_jax import parallel
from sae_jax.data.loader import activation_dataset, iterator
from sae_jax.data.store import open_store
from sae_jax.kernels.topk import resolve_impl
from sae_jax.sae.bank import BankSpec
from sae_jax.train.step import default_lr, init_state, make_optimizer, make_train_step


class TrainError(RuntimeError):
    pass


def _ints(s, key) -> list[int]:
    try:
        return [int(v) for v in str(s).split(",") if v.strip()]
    except ValueError:
        raise TrainError(f"{key}={s!r}: expected comma-separated integers") from None


def bank_spec(c, store) -> BankSpec:
    t = c.train
    hooks = [h.strip() for h in t.hooks.split(",") if h.strip()] or list(store.hooks)
    for h in hooks:
        store.check_hook(h)
    widths, ks = _ints(t.widths, "train.widths"), _ints(t.ks, "train.ks")
    if not widths or not ks:
        raise TrainError("train.widths and train.ks need at least one value each")
    members = list(itertools.product(hooks, widths, ks))
    d_ins = {store.width(h) for h in hooks}
    if len(d_ins) != 1:
        raise TrainError(f"a bank needs one d_in; the hooks {hooks} have widths {sorted(d_ins)}")
    d_in = d_ins.pop()
    for h, w, k in members:
        if not 0 < k <= w:
            raise TrainError(f"member {h} width {w}: k={k} must be between 1 and the width")
    n_model = t.mesh_model
    width = -(-max(w for _, w, _ in members) // n_model) * n_model
    k_aux = t.k_aux or min(d_in // 2, min(w for _, w, _ in members))
    if k_aux > min(w for _, w, _ in members):
        raise TrainError(f"train.k_aux={k_aux} exceeds the smallest width")
    return BankSpec(tuple(m[0] for m in members), tuple(m[1] for m in members), tuple(m[2] for m in members), d_in, width, k_aux)


def train_records(store, holdout_shards: int) -> tuple[int, int]:
    """The record range training reads: every shard but the last `holdout_shards` (kept for eval)."""
    n = len(store.shards)
    if not 0 <= holdout_shards < n:
        raise TrainError(
            f"train.holdout_shards={holdout_shards}: the store {store.root} has {n} shard(s); at least one must remain for "
            "training (set train.holdout_shards=0 to train on all of them, leaving eval no held-out rows)"
        )
    return 0, sum(s["records"] for s in store.shards[: n - holdout_shards])


def write_bank_json(run: Path, spec: BankSpec, store, scale: np.ndarray, records: tuple[int, int]) -> None:
    """What eval and export need to know of the bank without the config machinery: the members,
    the input scale each was trained with, the store's model and the held-out records."""
    m = store.manifest
    meta = {
        "architecture": "topk",
        "d_in": spec.d_in,
        "width": spec.width,
        "k_aux": spec.k_aux,
        "members": [
            {"name": spec.name(i), "hook": spec.hooks[i], "width": spec.widths[i], "k": spec.ks[i], "input_scale": float(scale[i])}
            for i in range(spec.size)
        ],
        "store": {
            "root": str(Path(store.root).absolute()),
            "model": m["model"],
            "tokenizer": m["tokenizer"],
            "source": m["source"],
            "ctx_len": m["ctx_len"],
            "bos_prepended": m["bos_prepended"],
            "exclude_special": m["exclude_special"],
            "outlier_ratio": m["outlier_ratio"],
            "dtype": m["dtype"],
            "train_records": list(records),
            "n_records": store.n_records,
        },
    }
    (run / "bank.json").write_text(json.dumps(meta, indent=1))


def _mesh(t):
    n = jax.device_count()
    model = t.mesh_model
    data = t.mesh_data or n // max(model, 1)
    return parallel.make_mesh(data, model)  # every device: a mesh that leaves some idle is an error


def _stack(batch, spec: BankSpec) -> np.ndarray:
    """{hook: [B, d]} -> [M, B, d] in member order."""
    return np.stack([batch[h] for h in spec.hooks])


def _prepare_run_dir(run: Path, cfg_json: str) -> None:
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"run directory {run} is not writable ({e.strerror})") from None
    cfg_file = run / "config.json"
    if cfg_file.exists():
        old = json.loads(cfg_file.read_text())
        if old.get("train_identity") != json.loads(cfg_json).get("train_identity"):
            raise TrainError(f"{run} holds a run with other settings ({cfg_file}); choose another train.run_dir")
    else:
        cfg_file.write_text(cfg_json)


def train(c, log=print) -> dict:
    t = c.train
    if t.batch_size < 1 or t.steps < 1:
        raise TrainError("train.batch_size and train.steps must be positive")
    store = open_store(t.store, verify=t.verify_store)
    spec = bank_spec(c, store)
    mesh = _mesh(t)
    if t.batch_size % mesh.shape["data"]:
        raise TrainError(f"train.batch_size={t.batch_size} does not divide over {mesh.shape['data']} data-parallel devices")
    run = Path(t.run_dir).expanduser()
    identity = {
        k: t[k]
        for k in (
            "store",
            "hooks",
            "widths",
            "ks",
            "batch_size",
            "steps",
            "lr",
            "warmup_steps",
            "decay_frac",
            "dead_tokens",
            "aux_coef",
            "k_aux",
            "seed",
            "holdout_shards",
        )
    }
    _prepare_run_dir(run, json.dumps({"train_identity": identity, "config": json.loads(c.to_json_best_effort())}, indent=1))

    lrs = np.asarray([t.lr or default_lr(w) for w in spec.widths], np.float32)
    tx, sched = make_optimizer(spec, lrs, t.steps, t.warmup_steps, t.decay_frac)
    scale = np.asarray([1.0 / np.sqrt(store.hooks[h]["mean_sq_norm"]) for h in spec.hooks], np.float32)
    records = train_records(store, t.holdout_shards)
    ds = activation_dataset(store, sorted(set(spec.hooks)), t.batch_size, seed=t.seed, records=records)
    it = iterator(ds)

    # b_dec from the geometric median of a sample drawn apart from the training stream
    sample_ds = activation_dataset(store, sorted(set(spec.hooks)), t.batch_size, seed=t.seed + 1, records=records)
    sample = _stack(next(iterator(sample_ds, num_threads=0)), spec)
    sample = jnp.asarray(sample[:, :4096].astype(np.float32) * scale[:, None, None])
    state = init_state(spec, mesh, tx, jax.random.key(t.seed), sample)

    mngr = ocp.CheckpointManager(
        (run / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=t.keep_checkpoints, save_interval_steps=t.checkpoint_every),
        item_names=("state", "data"),
    )
    start = mngr.latest_step() or 0
    if start:
        restored = mngr.restore(
            start, args=ocp.args.Composite(state=ocp.args.StandardRestore(state), data=grain.checkpoint.CheckpointRestore(it))
        )
        state = restored["state"]
        log(f"{run}: resumed from step {start}")
    try:
        encoder = resolve_impl(t.encoder)
    except ValueError as e:
        raise TrainError(f"train.encoder: {e}") from None
    if t.encoder_dtype not in ("float32", "bfloat16"):
        raise TrainError(f"train.encoder_dtype={t.encoder_dtype!r}: float32 or bfloat16")
    step_fn = make_train_step(spec, mesh, tx, sched, scale, t.dead_tokens, t.aux_coef, encoder, t.encoder_block, t.encoder_dtype)

    stop = {"sigterm": False}
    prev = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    from tqdm import tqdm

    (run / "members.json").write_text(json.dumps([spec.name(m) for m in range(spec.size)]))
    write_bank_json(run, spec, store, scale, records)
    from tensorboardX import SummaryWriter

    tb = SummaryWriter(str(run / "tb"))
    bar = tqdm(total=t.steps, initial=start, unit="step", desc="train", disable=not t.progress, file=sys.stderr, dynamic_ncols=True)
    metrics_file = open(run / "metrics.jsonl", "a")
    last = None
    try:
        t0, tok0 = time.perf_counter(), start
        for s in range(start, t.steps):
            x = _stack(next(it), spec)
            state, metrics = step_fn(state, x)
            done = s + 1
            bar.update(1)
            if done % t.log_every == 0 or done == t.steps:
                m = jax.device_get(metrics)
                streak = int(state["nan_streak"])
                dt = time.perf_counter() - t0
                rec = {"step": done, "tokens": done * t.batch_size, "tok_s": (done - tok0) * t.batch_size / max(dt, 1e-9)}
                rec.update({k: np.asarray(v).tolist() for k, v in m.items()})
                rec["nan_skips"] = int(state["nan_skips"])
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
                for key, val in rec.items():
                    if key not in ("step", "finite"):
                        for j, v in enumerate(np.atleast_1d(val)):
                            tb.add_scalar(f"{key}/{spec.name(j)}" if np.ndim(val) else key, float(v), done)
                bar.set_postfix(fvu=f"{np.mean(m['fvu']):.3f}", l0=f"{np.mean(m['l0']):.1f}", tok_s=f"{rec['tok_s']:,.0f}")
                t0, tok0 = time.perf_counter(), done
                last = rec
                if streak >= t.max_nan_streak:
                    raise TrainError(
                        f"{streak} batches in a row gave non-finite loss or gradients (step {done}); stopping. Parameters were not updated by them; the last checkpoint is intact."
                    )
            mngr.save(
                done,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it)),
                force=stop["sigterm"] or done == t.steps,
            )
            if stop["sigterm"]:
                log(f"SIGTERM: saved step {done}; exiting")
                break
        mngr.wait_until_finished()
        done_steps = int(state["step"])
        if done_steps == t.steps:
            counts = np.asarray(jax.device_get(state["fire_counts"]))
            np.savez(run / "latent_density.npz", density=counts / (done_steps * t.batch_size), widths=np.asarray(spec.widths))
    finally:
        bar.close()
        tb.close()
        metrics_file.close()
        signal.signal(signal.SIGTERM, prev)
        mngr.close()
    from sae_jax.train.plots import plot_run

    plots = plot_run(run) if (run / "metrics.jsonl").is_file() else []
    return {"spec": spec, "state": state, "last": last, "run": run, "plots": plots}


def summary(result: dict) -> str:
    spec, last = result["spec"], result["last"]
    lines = [f"run        {result['run']}"]
    if last is None:
        return "\n".join(lines + ["(no steps run: the run was already complete)"])
    lines.append(f"step       {last['step']} ({last['tokens']:,} tokens, {last['tok_s']:,.0f} tok/s)")
    for m in range(spec.size):
        lines.append(f"  {spec.name(m):<48} FVU {last['fvu'][m]:.4f}  L0 {last['l0'][m]:5.1f}  dead {100 * last['dead_frac'][m]:5.1f}%")
    lines += [f"plot       {p}" for p in result.get("plots", [])]
    return "\n".join(lines)
