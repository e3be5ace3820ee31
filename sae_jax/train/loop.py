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

SIGINT (Ctrl-C) and SIGTERM stop a run at the next step boundary: that step is saved and
`train` raises `errors.Interrupted` ("interrupted at step N of M: saved; run the same command to
continue"; the CLI exits 130 or 143). A second Ctrl-C stops at once, leaving the last complete
checkpoint (Orbax finalizes a checkpoint only once it is whole).
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from sae_jax import parallel
from sae_jax.data.loader import activation_dataset, iterator
from sae_jax.data.store import Store, open_store
from sae_jax.errors import Interrupted
from sae_jax.sae.bank import BankSpec
from sae_jax.train.checkpoint import Checkpoints
from sae_jax.train.metrics import MetricsWriter, host
from sae_jax.train.plan import TrainError, bank_spec, make_mesh, settings_for
from sae_jax.train.settings import TrainSettings
from sae_jax.train.step import TrainStep


class TrainResult(NamedTuple):
    spec: BankSpec
    state: dict  # the final train state (on the devices)
    last: dict | None  # the last metrics record (None: the run was already complete)
    run: Path
    plots: list[Path]


def train(c, log=print) -> TrainResult:
    """Train the bank `c.train` describes; resume from the run directory's latest checkpoint."""
    s = settings_for(c, jax.device_count())
    store = open_store(s.store, verify=s.verify_store)
    spec = bank_spec(s, store)
    mesh = make_mesh(s)
    group, groups = parallel.data_group(mesh)
    local_batch = _local_batch(s, store, groups)
    scale, out_scale = input_scales(store, spec.hooks), input_scales(store, spec.targets)
    records = train_records(store, s.holdout_shards)
    read = sorted(set(spec.hooks) | set(spec.targets))
    # data: this process's slice of every global batch (its checks: enough records for a batch)
    data = activation_dataset(store, read, local_batch, seed=s.seed, records=records, shard_index=group, shard_count=groups)

    # every check above has passed: only now is anything written
    run = Path(s.run_dir).expanduser()
    s = _open_run_dir(run, s, c, log)
    it = iterator(data)

    # model: the step, its state created sharded (b_dec from a sample drawn apart from the stream)
    step = TrainStep(spec, mesh, s, scale, out_scale)
    state = step.init_state(jax.random.key(s.seed), _b_dec_sample(store, s, spec, read, records, out_scale))

    # checkpoints: resume where the latest one left off
    ckpt = Checkpoints(run, s.checkpoint_every, s.keep_checkpoints)
    state, start = ckpt.restore(state, it)
    if start:
        log(
            f"{run}: resumed from step {start}"
            + (f" (process {jax.process_index()} of {jax.process_count()})" if jax.process_count() > 1 else "")
        )
    if jax.process_index() == 0:
        (run / "members.json").write_text(json.dumps([spec.name(m) for m in range(spec.size)]))
        write_bank_json(run, spec, store, scale, records, out_scale)

    writer = MetricsWriter(
        run, [spec.name(m) for m in range(spec.size)], steps=s.steps, start=start, batch_size=s.batch_size, progress=s.progress
    )
    global_shape = lambda hooks: (len(hooks), s.batch_size, store.width(hooks[0]))  # noqa: E731
    try:
        with _preemption(ckpt) as preempted:
            stopped = 0  # the signal that stopped the run (0: none)
            resampled = None  # latents resampled since the last record [M] (on the device: no sync)
            for done in range(start + 1, s.steps + 1):
                batch = next(it)
                xs = [parallel.global_batch(mesh, "x", _stack(batch, hooks), global_shape(hooks)) for hooks in _inputs(spec)]
                if step.resamples_before(done - 1):
                    state, n = step.resample(state, *xs)
                    resampled = n if resampled is None else resampled + n
                state, metrics = step(state, *xs)
                writer.tick()
                if done % s.log_every == 0 or done == s.steps:
                    if step.resample_every:
                        metrics = {**metrics, "resampled": np.zeros(spec.size, np.int32) if resampled is None else resampled}
                        resampled = None
                    rec = writer.log(done, metrics, state)
                    _check_nan_streak(rec, s.max_nan_streak)
                stopped = preempted(done)
                ckpt.save(done, state, it, force=bool(stopped) or done == s.steps)
                if stopped:
                    break
        ckpt.wait()
        _write_density(run, state, s, spec)
    finally:
        writer.close()
        ckpt.close()
    if stopped:
        code = 128 + (stopped if isinstance(stopped, int) and not isinstance(stopped, bool) else signal.SIGTERM)
        raise Interrupted(f"interrupted at step {done} of {s.steps}: saved; run the same command to continue", code)
    return TrainResult(spec, state, writer.last, run, _plots(run))


# ---- settings x store ------------------------------------------------------------------------
def _local_batch(s: TrainSettings, store: Store, groups: int) -> int:
    local = s.batch_size // groups
    if local % store.rows_per_record:
        raise TrainError(
            f"train.batch_size={s.batch_size} over {groups} data-parallel process groups gives {local} rows per group, "
            f"not a multiple of the store's {store.rows_per_record} rows per record ({store.root}/manifest.json)"
        )
    return local


def input_scales(store: Store, hooks) -> np.ndarray:
    """Per member, the factor that brings its hook to unit mean squared norm (the manifest's
    statistics; the biases' raw-unit learning rate depends on it too). A hook whose activations
    are all zero, or whose statistic is not a positive number, has no such factor."""
    out = []
    for h in hooks:
        ms = store.hooks[h]["mean_sq_norm"]
        if not (isinstance(ms, int | float) and np.isfinite(ms) and ms > 0):
            raise TrainError(
                f"{store.root}/manifest.json: hook {h!r} has mean squared norm {ms!r}; training scales each hook to unit mean "
                "squared norm, which needs a positive finite value (activations all zero, or a damaged manifest)"
            )
        out.append(1.0 / np.sqrt(ms))
    return np.asarray(out, np.float32)


def train_records(store, holdout_shards: int) -> tuple[int, int]:
    """The record range training reads: every shard but the last `holdout_shards` (kept for eval)."""
    n = len(store.shards)
    if not 0 <= holdout_shards < n:
        raise TrainError(
            f"train.holdout_shards={holdout_shards}: the store {store.root} has {n} shard(s); at least one must remain for "
            "training (set train.holdout_shards=0 to train on all of them, leaving eval no held-out rows)"
        )
    return 0, sum(s["records"] for s in store.shards[: n - holdout_shards])


def _b_dec_sample(store, s: TrainSettings, spec: BankSpec, read, records, out_scale) -> np.ndarray:
    """4096 scaled target rows from a stream apart from training's (seed + 1): the same on every process."""
    ds = activation_dataset(store, read, s.batch_size, seed=s.seed + 1, records=records)
    sample = _stack(next(iterator(ds, num_threads=0)), spec.targets)
    return sample[:, :4096].astype(np.float32) * out_scale[:, None, None]


def _inputs(spec: BankSpec) -> list[tuple[str, ...]]:
    """The hooks of the step's arguments: x (and a transcoder's targets y)."""
    return [spec.hooks, spec.targets] if spec.transcoder else [spec.hooks]


def _stack(batch, hooks) -> np.ndarray:
    """{hook: [B, d]} -> [M, B, d] in member order."""
    return np.stack([batch[h] for h in hooks])


# ---- the run directory -----------------------------------------------------------------------
def _open_run_dir(run: Path, s: TrainSettings, c, log=print) -> TrainSettings:
    """Process 0 creates `run` and writes config.json (or checks the run already there has the
    same settings); the others check after it. Returns the settings with `encoder_dtype: auto`
    resolved as the run records it (`_auto_encoder_dtype`)."""
    cfg_json = json.dumps({"train_identity": s.identity(), "config": json.loads(c.to_json_best_effort())}, indent=1)
    if jax.process_index() == 0:
        _prepare_run_dir(run, cfg_json)
        chosen = _auto_encoder_dtype(run / "config.json", s, log)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("sae_jax.train: run directory ready")
        if jax.process_index() != 0:
            _prepare_run_dir(run, cfg_json, write=False)
            chosen = _auto_encoder_dtype(run / "config.json", s, log, write=False)
    return s if chosen is None else s.replace(encoder_dtype=chosen)


AUTO_DTYPE_KEY = "encoder_dtype_auto"  # config.json: {"platform", "dtype"}: what `auto` chose when the run began


def _auto_encoder_dtype(cfg_file: Path, s: TrainSettings, log=print, write: bool = True) -> str | None:
    """What `train.encoder_dtype: auto` runs as (None: the setting names a dtype). On a CPU `auto`
    is measured (`kernels.topk.host_bf16_faster`), and a measurement may come out otherwise in
    another process: the run records its choice in config.json when it begins, and a resume on
    the same platform keeps it, so a resumed run computes what an unbroken one does. `write`
    False (processes other than 0): read the choice process 0 recorded."""
    from sae_jax.kernels.pallas import target_platform
    from sae_jax.kernels.topk import resolve_encoder_dtype

    if s.encoder_dtype != "auto":
        return None
    cfg = json.loads(cfg_file.read_text())
    platform = target_platform()
    rec = cfg.get(AUTO_DTYPE_KEY) or {}
    if rec.get("platform") == platform and rec.get("dtype") in ("float32", "bfloat16"):
        if platform == "cpu" and write:
            log(f"encoder matmul in {rec['dtype']} (train.encoder_dtype=auto, as this run chose when it began: {cfg_file.name})")
        return rec["dtype"]
    if not write:
        raise TrainError(f"{cfg_file} records no {AUTO_DTYPE_KEY} for {platform} after process 0 opened the run")
    dtype = resolve_encoder_dtype("auto")
    cfg[AUTO_DTYPE_KEY] = {"platform": platform, "dtype": dtype}
    tmp = cfg_file.with_name(cfg_file.name + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=1))
    tmp.replace(cfg_file)
    if platform == "cpu":
        log(f"encoder matmul in {dtype} (train.encoder_dtype=auto, measured on this CPU; recorded in {cfg_file.name})")
    return dtype


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
        "d_out": spec.d_out,
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
        # a run written before a setting existed had its default; lists compare as parsed
        old = TrainSettings.canonical_identity(json.loads(cfg_file.read_text()).get("train_identity", {}))
        new = json.loads(cfg_json)["train_identity"]
        if old != new and _saved_anything(run):
            diff = ", ".join(f"{k}: {old[k]!r} there, {new[k]!r} here" for k in new if old[k] != new[k])
            same = " ".join(f"--config.train.{k}={old[k]}" for k in new if old[k] != new[k] and k != "lr_rule")
            raise TrainError(
                f"{run} holds a run with other settings ({diff}; {cfg_file}); choose another train.run_dir"
                + (f", or continue that run with its settings: {same}" if same else "")
            )
        if old != new and write:  # a start that failed before its first checkpoint: not a run to keep
            cfg_file.write_text(cfg_json)
    elif write:
        cfg_file.write_text(cfg_json)


def _saved_anything(run: Path) -> bool:
    """Whether `run` holds a checkpoint or a metrics record: a run, not only what a start that
    failed before its first step wrote (config.json)."""
    ckpts = run / "checkpoints"
    has_step = ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
    metrics = run / "metrics.jsonl"
    return has_step or (metrics.is_file() and metrics.stat().st_size > 0)


# ---- the loop's pieces -----------------------------------------------------------------------
@contextlib.contextmanager
def _preemption(ckpt: Checkpoints):
    """Yields `preempted(step)`: the signal that asked the run to stop (0: none yet). One process:
    our handler of SIGINT and SIGTERM (a second SIGINT raises KeyboardInterrupt at once); several:
    JAX's preemption sync point (True), so that every process saves at the same step."""
    if jax.process_count() > 1:
        yield ckpt.reached_preemption
        return
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield lambda step: 0
        return
    got = {"signal": 0}

    def handler(signum, _frame):
        if got["signal"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        got["signal"] = got["signal"] or signum

    prev = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda step: got["signal"]
    finally:
        for sig, h in prev.items():
            signal.signal(sig, h)


def _check_nan_streak(rec: dict, limit: int) -> None:
    if rec["nan_streak"] >= limit:
        raise TrainError(
            f"{rec['nan_streak']} batches in a row gave non-finite loss or gradients (step {rec['step']}); stopping. "
            "Parameters were not updated by them; the last checkpoint is intact."
        )


def _write_density(run: Path, state, s: TrainSettings, spec: BankSpec) -> None:
    """Each latent's firing frequency over the whole run (the density histogram), once it is complete."""
    done = int(host(state["step"]))
    if done == s.steps:
        counts = host(state["fire_counts"])  # a collective: every process
        if jax.process_index() == 0:
            np.savez(run / "latent_density.npz", density=counts / (done * s.batch_size), widths=np.asarray(spec.widths))


def _plots(run: Path) -> list[Path]:
    from sae_jax.train.plots import plot_run

    return plot_run(run) if jax.process_index() == 0 and (run / "metrics.jsonl").is_file() else []


def run_summary(result: TrainResult) -> str:
    """What `sae-jax train` prints at the end: the run, its last step, each member's FVU, L0 and dead share, the plots."""
    spec, last = result.spec, result.last
    lines = [f"run        {result.run}"]
    if last is None:
        return "\n".join(lines + ["(no steps run: the run was already complete)"])
    lines.append(f"step       {last['step']} ({last['tokens']:,} tokens, {last['tok_s']:,.0f} tok/s)")
    for m in range(spec.size):
        lines.append(f"  {spec.name(m):<48} FVU {last['fvu'][m]:.4f}  L0 {last['l0'][m]:5.1f}  dead {100 * last['dead_frac'][m]:5.1f}%")
    lines += [f"plot       {p}" for p in result.plots]
    return "\n".join(lines)
