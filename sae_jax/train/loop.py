"""`sae-jax train`: train a bank of dictionaries (TopK, BatchTopK, JumpReLU, ReLU+L1; Matryoshka;
SAEs or transcoders) on a store, checkpointing with Orbax.

The run directory holds `config.json`, `checkpoints/` (Orbax CheckpointManager: items `state`
and `data`, the Grain iterator's position) and `metrics.jsonl`. Running the same command again
resumes from the latest checkpoint; SIGTERM saves and exits.

Several processes (`distributed.*`, see `sae_jax.parallel.init_distributed`): every process runs
this same function; each data-parallel group of processes reads its own slice of every global
batch (the same rows, in the same order, as one process reading the whole batch), the processes
of a group read the same one, checkpoints are written and restored by all of them together, and
process 0 alone writes the run's files (config, metrics, plots). A checkpoint restores onto any
mesh and any number of processes: the data position follows from the step.
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
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sae_jax import parallel
from sae_jax.config import default_config
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


def _floats(s, key) -> list[float]:
    try:
        return [float(v) for v in str(s).split(",") if v.strip()]
    except ValueError:
        raise TrainError(f"{key}={s!r}: expected comma-separated numbers") from None


def _names(s) -> list[str]:
    return [h.strip() for h in str(s).split(",") if h.strip()]


def _sparsity_settings(t, arch: str) -> tuple[list[int], list[float]]:
    """(ks, coefficients) of the members; the setting of the other architectures must be unset."""
    from sae_jax.sae.bank import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise TrainError(f"train.architecture={arch!r}: choose from {', '.join(ARCHITECTURES)}")
    own = {"relu": "train.l1_coefs", "jumprelu": "train.l0_coefs"}.get(arch)
    for key in ("train.l1_coefs", "train.l0_coefs"):
        if key != own and str(t[key.split(".")[1]]).strip():
            raise TrainError(f"{key} is set but train.architecture={arch!r} does not use it")
    if own is None:
        ks = _ints(t.ks, "train.ks")
        if not ks:
            raise TrainError("train.ks needs at least one value")
        return ks, []
    coefs = _floats(t[own.split(".")[1]], own)
    if not coefs:
        raise TrainError(f"train.architecture={arch!r} needs {own} (one or more sparsity coefficients)")
    bad = [c for c in coefs if not (c >= 0 and np.isfinite(c))]
    if bad:
        raise TrainError(f"{own}={t[own.split('.')[1]]!r}: coefficients must be finite and >= 0 (got {bad[0]})")
    return [0], coefs


def _check_settings(t) -> None:
    checks = [
        ("jumprelu_bandwidth", t.jumprelu_bandwidth > 0, "> 0"),
        ("jumprelu_init_threshold", t.jumprelu_init_threshold > 0, "> 0"),
        ("threshold_decay", 0 <= t.threshold_decay < 1, "in [0, 1)"),
        ("sparsity_warmup_frac", 0 <= t.sparsity_warmup_frac <= 1, "in [0, 1]"),
        ("aux_coef", t.aux_coef >= 0, ">= 0"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise TrainError(f"train.{key}={t[key]!r}: must be {want}")


def bank_spec(c, store) -> BankSpec:
    t = c.train
    _check_settings(t)
    arch = t.architecture
    hooks = _names(t.hooks) or list(store.hooks)
    out_hooks = _names(t.out_hooks)
    for h in hooks:
        store.check_hook(h)
    for h in out_hooks:
        if h not in store.hooks:
            raise TrainError(
                f"train.out_hooks: the transcoder output hook {h!r} is not in the store {store.root} (it has: {', '.join(store.hooks)}); "
                "harvest it in the same pass as the input hook"
            )
    if out_hooks and len(out_hooks) != len(hooks):
        raise TrainError(
            f"train.out_hooks lists {len(out_hooks)} hook(s) for {len(hooks)} input hook(s) in train.hooks: give one output hook per input hook"
        )
    if t.skip and not out_hooks:
        raise TrainError("train.skip=True is a transcoder setting: set train.out_hooks too")
    widths = _ints(t.widths, "train.widths")
    if not widths or min(widths) < 1:
        raise TrainError(f"train.widths={t.widths!r}: one or more positive widths")
    ks, coefs = _sparsity_settings(t, arch)
    settings = list(itertools.product(ks, coefs or [0.0]))
    pairs = list(zip(hooks, out_hooks or hooks))
    members = [(h, o, w, k, cf) for (h, o), w, (k, cf) in itertools.product(pairs, widths, settings)]
    d_ins = {store.width(h) for h in hooks}
    d_outs = {store.width(h) for h in (out_hooks or hooks)}
    if len(d_ins) != 1 or len(d_outs) != 1:
        raise TrainError(f"a bank needs one input and one output width; the hooks {hooks + out_hooks} have widths {sorted(d_ins | d_outs)}")
    d_in, d_out = d_ins.pop(), d_outs.pop()
    if arch in ("topk", "batchtopk"):
        for h, _, w, k, _ in members:
            if not 0 < k <= w:
                raise TrainError(f"member {h} width {w}: k={k} must be between 1 and the width")
    prefixes = tuple(_ints(t.matryoshka_prefixes, "train.matryoshka_prefixes"))
    if prefixes:
        if arch not in ("topk", "batchtopk"):
            raise TrainError(f"train.matryoshka_prefixes: Matryoshka works with topk or batchtopk, not {arch!r}")
        if prefixes[0] < 1 or any(b <= a for a, b in zip(prefixes, prefixes[1:])) or prefixes[-1] >= min(widths):
            raise TrainError(
                f"train.matryoshka_prefixes={t.matryoshka_prefixes!r}: prefix sizes must be positive, strictly increasing and "
                f"below the smallest width ({min(widths)}; the full width is the last prefix)"
            )
    cap = 0
    if arch == "batchtopk":
        if t.batchtopk_cap < 1:
            raise TrainError(f"train.batchtopk_cap={t.batchtopk_cap}: at least 1 (candidates per row = cap x k)")
        cap = min(int(t.batchtopk_cap) * max(ks), min(widths))
    n_model = t.mesh_model
    width = -(-max(widths) // n_model) * n_model
    k_aux = t.k_aux or min(d_in // 2, min(widths))
    if k_aux > min(widths):
        raise TrainError(f"train.k_aux={k_aux} exceeds the smallest width")
    return BankSpec(
        hooks=tuple(m[0] for m in members),
        widths=tuple(m[2] for m in members),
        ks=tuple(m[3] for m in members),
        d_in=d_in,
        width=width,
        k_aux=k_aux,
        architecture=arch,
        coefs=tuple(m[4] for m in members) if coefs else (),
        out_hooks=tuple(m[1] for m in members) if out_hooks else (),
        d_out=d_out if out_hooks else 0,
        skip=bool(t.skip),
        prefixes=prefixes,
        cap=cap,
    )


def train_records(store, holdout_shards: int) -> tuple[int, int]:
    """The record range training reads: every shard but the last `holdout_shards` (kept for eval)."""
    n = len(store.shards)
    if not 0 <= holdout_shards < n:
        raise TrainError(
            f"train.holdout_shards={holdout_shards}: the store {store.root} has {n} shard(s); at least one must remain for "
            "training (set train.holdout_shards=0 to train on all of them, leaving eval no held-out rows)"
        )
    return 0, sum(s["records"] for s in store.shards[: n - holdout_shards])


def write_bank_json(
    run: Path, spec: BankSpec, store, scale: np.ndarray, records: tuple[int, int], out_scale: np.ndarray | None = None
) -> None:
    """What eval and export need to know of the bank without the config machinery: the members,
    the input (and output) scale each was trained with, the store's model and the held-out records."""
    m = store.manifest
    out_scale = scale if out_scale is None else out_scale

    def member(i):
        rec = {"name": spec.name(i), "hook": spec.hooks[i], "width": spec.widths[i], "k": spec.ks[i], "input_scale": float(scale[i])}
        rec["architecture"] = spec.architecture
        if spec.coefs:
            rec["coef"] = spec.coefs[i]
        if spec.transcoder:
            rec["out_hook"] = spec.out_hooks[i]
            rec["output_scale"] = float(out_scale[i])
        return rec

    meta = {
        "architecture": spec.architecture,
        "kind": spec.kind(),
        "d_in": spec.d_in,
        "d_out": spec.dout,
        "width": spec.width,
        "k_aux": spec.k_aux,
        "transcoder": spec.transcoder,
        "skip": spec.skip,
        "matryoshka_prefixes": list(spec.prefixes),
        "batchtopk_cap": spec.cap,
        "members": [member(i) for i in range(spec.size)],
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


def _stack(batch, hooks) -> np.ndarray:
    """{hook: [B, d]} -> [M, B, d] in member order."""
    return np.stack([batch[h] for h in hooks])


def _host(x) -> np.ndarray:
    """A device array on the host: its local copy where it is replicated or local, else gathered
    from every process (a collective: every process calls it at the same point)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _prepare_run_dir(run: Path, cfg_json: str, write: bool = True) -> None:
    """Check that `run` can hold this run (the same settings as any run already there); `write`:
    create it and write config.json (process 0; the others check after it)."""
    try:
        if write:
            run.mkdir(parents=True, exist_ok=True)
            probe = run / f".write-probe-{jax.process_index()}"
            probe.write_text("")
            probe.unlink()
        elif not run.is_dir():
            raise TrainError(
                f"run directory {run} is not visible from process {jax.process_index()}: the run directory must be on a filesystem every process shares"
            )
    except OSError as e:
        raise TrainError(f"run directory {run} is not writable ({e.strerror})") from None
    cfg_file = run / "config.json"
    if cfg_file.exists():
        old = json.loads(cfg_file.read_text()).get("train_identity", {})
        new = json.loads(cfg_json).get("train_identity")
        defaults = default_config().train
        # a run written before a setting existed had its default
        old = {k: old.get(k, defaults[k] if k in defaults else None) for k in new}
        if old != new:
            diff = ", ".join(f"{k}: {old[k]!r} there, {new[k]!r} here" for k in new if old[k] != new[k])
            raise TrainError(f"{run} holds a run with other settings ({diff}; {cfg_file}); choose another train.run_dir")
    elif write:
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
    group, groups = parallel.data_group(mesh)
    local_batch = t.batch_size // groups
    if local_batch % store.rows_per_record:
        raise TrainError(
            f"train.batch_size={t.batch_size} over {groups} data-parallel process groups gives {local_batch} rows per group, "
            f"not a multiple of the store's {store.rows_per_record} rows per record ({store.root}/manifest.json)"
        )
    main = jax.process_index() == 0
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
            "architecture",
            "out_hooks",
            "skip",
            "l1_coefs",
            "l0_coefs",
            "sparsity_warmup_frac",
            "jumprelu_bandwidth",
            "jumprelu_init_threshold",
            "batchtopk_cap",
            "threshold_decay",
            "matryoshka_prefixes",
            "encoder_init_scale",
        )
    }
    cfg_json = json.dumps({"train_identity": identity, "config": json.loads(c.to_json_best_effort())}, indent=1)
    if main:
        _prepare_run_dir(run, cfg_json)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("sae_jax.train: run directory ready")
        if not main:
            _prepare_run_dir(run, cfg_json, write=False)

    lrs = np.asarray([t.lr or default_lr(w) for w in spec.widths], np.float32)
    tx, sched = make_optimizer(spec, lrs, t.steps, t.warmup_steps, t.decay_frac)
    stats = lambda hooks: np.asarray([1.0 / np.sqrt(store.hooks[h]["mean_sq_norm"]) for h in hooks], np.float32)  # noqa: E731
    scale, out_scale = stats(spec.hooks), stats(spec.targets)
    records = train_records(store, t.holdout_shards)
    read = sorted(set(spec.hooks) | set(spec.targets))
    ds = activation_dataset(store, read, local_batch, seed=t.seed, records=records, shard_index=group, shard_count=groups)
    it = iterator(ds)

    # b_dec (in the target's space) from the geometric median of a sample drawn apart from the training stream
    sample_ds = activation_dataset(store, read, t.batch_size, seed=t.seed + 1, records=records)
    sample = _stack(next(iterator(sample_ds, num_threads=0)), spec.targets)
    sample = sample[:, :4096].astype(np.float32) * out_scale[:, None, None]  # the same on every process
    if not t.encoder_init_scale > 0:
        raise TrainError(f"train.encoder_init_scale={t.encoder_init_scale!r}: must be positive")
    state = init_state(spec, mesh, tx, jax.random.key(t.seed), sample, t.jumprelu_init_threshold, t.encoder_init_scale)

    mngr = ocp.CheckpointManager(
        (run / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=t.keep_checkpoints, save_interval_steps=t.checkpoint_every),
        item_names=("state", "data"),
    )
    start = mngr.latest_step() or 0
    if start:
        # the iterator's own state where this process wrote one; written by another process layout
        # (resumed on another number of processes), the position follows from the step alone
        mine = run / "checkpoints" / str(start) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if mine.is_file():
            args = ocp.args.Composite(state=ocp.args.StandardRestore(state), data=grain.checkpoint.CheckpointRestore(it))
        else:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(state))
        state = mngr.restore(start, args=args)["state"]
        if not mine.is_file():
            it.set_state({"next_index": start})
        elif it.get_state()["next_index"] != start:
            raise TrainError(f"{mine}: the data iterator is at batch {it.get_state()['next_index']}, the train state at step {start}")
        log(
            f"{run}: resumed from step {start}"
            + (f" (process {jax.process_index()} of {jax.process_count()})" if jax.process_count() > 1 else "")
        )
    try:
        resolve_impl(t.encoder)  # validated here; `auto` resolves per shape inside the step
    except ValueError as e:
        raise TrainError(f"train.encoder: {e}") from None
    if t.encoder_dtype not in ("float32", "bfloat16"):
        raise TrainError(f"train.encoder_dtype={t.encoder_dtype!r}: float32 or bfloat16")
    step_fn = make_train_step(
        spec,
        mesh,
        tx,
        sched,
        scale,
        t.dead_tokens,
        t.aux_coef,
        t.encoder,
        t.encoder_block,
        t.encoder_dtype,
        output_scale=out_scale,
        sparsity_warmup=int(round(t.sparsity_warmup_frac * t.steps)),
        bandwidth=t.jumprelu_bandwidth,
        threshold_decay=t.threshold_decay,
    )

    # SIGTERM (preemption): one process saves and stops on its own; several must agree on the
    # step, which JAX's preemption sync point (its own SIGTERM handler) gives them
    multi = jax.process_count() > 1
    stop = {"sigterm": False}
    prev = None if multi else signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    from tqdm import tqdm

    if main:
        (run / "members.json").write_text(json.dumps([spec.name(m) for m in range(spec.size)]))
        write_bank_json(run, spec, store, scale, records, out_scale)
    from tensorboardX import SummaryWriter

    tb = SummaryWriter(str(run / "tb")) if main else None
    bar = tqdm(
        total=t.steps, initial=start, unit="step", desc="train", disable=not (t.progress and main), file=sys.stderr, dynamic_ncols=True
    )
    metrics_file = open(run / "metrics.jsonl", "a") if main else None
    shape = lambda hooks: (len(hooks), t.batch_size, store.width(hooks[0]))  # noqa: E731  the global batch
    last = None
    try:
        t0, tok0 = time.perf_counter(), start
        for s in range(start, t.steps):
            batch = next(it)
            x = parallel.global_batch(mesh, "x", _stack(batch, spec.hooks), shape(spec.hooks))
            if spec.transcoder:
                state, metrics = step_fn(state, x, parallel.global_batch(mesh, "x", _stack(batch, spec.targets), shape(spec.targets)))
            else:
                state, metrics = step_fn(state, x)
            done = s + 1
            bar.update(1)
            if done % t.log_every == 0 or done == t.steps:
                m = {k: _host(v) for k, v in metrics.items()}
                streak = int(_host(state["nan_streak"]))
                dt = time.perf_counter() - t0
                rec = {"step": done, "tokens": done * t.batch_size, "tok_s": (done - tok0) * t.batch_size / max(dt, 1e-9)}
                rec.update({k: np.asarray(v).tolist() for k, v in m.items()})
                rec["nan_skips"] = int(_host(state["nan_skips"]))
                if main:
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                for key, val in rec.items() if main else ():
                    if key not in ("step", "finite"):
                        arr = np.asarray(val, np.float64)
                        if arr.ndim == 0:
                            tb.add_scalar(key, float(arr), done)
                        for j, v in enumerate(arr if arr.ndim else []):
                            for p, vp in enumerate(np.atleast_1d(v)):  # [M] or [M, P] (Matryoshka prefixes)
                                tb.add_scalar(f"{key}/{spec.name(j)}" + (f"/{p}" if arr.ndim > 1 else ""), float(vp), done)
                bar.set_postfix(fvu=f"{np.mean(m['fvu']):.3f}", l0=f"{np.mean(m['l0']):.1f}", tok_s=f"{rec['tok_s']:,.0f}")
                t0, tok0 = time.perf_counter(), done
                last = rec
                if streak >= t.max_nan_streak:
                    raise TrainError(
                        f"{streak} batches in a row gave non-finite loss or gradients (step {done}); stopping. Parameters were not updated by them; the last checkpoint is intact."
                    )
            if multi and mngr.reached_preemption(done):
                stop["sigterm"] = True
            mngr.save(
                done,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it)),
                force=stop["sigterm"] or done == t.steps,
            )
            if stop["sigterm"]:
                log(f"SIGTERM: saved step {done}; exiting")
                break
        mngr.wait_until_finished()
        done_steps = int(_host(state["step"]))
        if done_steps == t.steps:
            counts = _host(state["fire_counts"])
            if main:
                np.savez(run / "latent_density.npz", density=counts / (done_steps * t.batch_size), widths=np.asarray(spec.widths))
    finally:
        bar.close()
        if main:
            tb.close()
            metrics_file.close()
        if not multi:
            signal.signal(signal.SIGTERM, prev)
        mngr.close()
    from sae_jax.train.plots import plot_run

    plots = plot_run(run) if main and (run / "metrics.jsonl").is_file() else []
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
