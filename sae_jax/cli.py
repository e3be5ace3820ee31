"""`sae-jax`: one entry point, one subcommand per job.

    sae-jax harvest [--config=configs/default.py] [--config.harvest.out=DIR ...]
    sae-jax train   [--config=configs/default.py] [--config.train.store=DIR --config.train.run_dir=DIR ...]
    sae-jax demo    [--config=configs/demo.py] [--config.x=y ...]   # harvest, train, eval
    sae-jax compile-check [--devices N] [--memory-gib G] [--peak-tflops T] [--mfu F] [--d-in D] [--json PATH] [--config.x=y ...]
    sae-jax compile-check --job harvest --model-config configs/models/NAME.json [--topology T | --gpu G:N | --devices N] [--config.x=y ...]
    sae-jax eval    RUN [--member NAME] [--store DIR] [--tokens N] [--contexts N] [--out DIR]
    sae-jax export  RUN --format saelens|sparsify|npz --out DIR [--dtype float32|bfloat16|float16] [--overwrite]
    sae-jax atlas   RUN [--member NAME] [--contexts N] [--top N] [--out DIR]
    sae-jax plot    RUN
    sae-jax import-cache CACHE --out STORE [--hooks A,B] [--dtype bfloat16] [--rows-per-record N]   # a SAELens activation cache -> a store
    sae-jax export-cache STORE --out DIR [--hooks A,B] [--context-size N] [--dtype float32]         # a store -> a SAELens activation cache
    sae-jax info    STORE
    sae-jax verify  STORE

Configs are ml_collections files (`get_config()`); `--config.a.b=v` overrides a field and a
mistyped key is an error.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
USAGE = __doc__


# the config sections each config-driven job reads (what its --help lists)
SECTIONS = {
    "harvest": ("model", "data", "harvest", "distributed"),
    "train": ("train", "distributed"),
    "demo": ("model", "data", "harvest", "train"),
    "compile-check": ("train", "model", "data", "harvest"),
}


def _wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:])


def _config_help(argv: list[str], default_file: str) -> str:
    from sae_jax.config import describe_fields

    job = argv[0].split()[-1]
    return (
        f"usage: sae-jax {job} [--config=configs/{default_file}] [--config.SECTION.FIELD=VALUE ...]\n\n"
        f"Settings (defaults from sae_jax/config.py; a config file under configs/ changes a few):" + describe_fields(SECTIONS[job])
    )


def _load_config(argv: list[str], default_file: str):
    from absl import flags
    from ml_collections import config_flags

    from sae_jax.config import default_config

    if _wants_help(argv):
        print(_config_help(argv, default_file))
        raise SystemExit(0)

    for a in argv[1:]:
        if a.startswith("--config="):
            given = a.split("=", 1)[1].split(":", 1)[0]  # `file.py:arg` passes arg to get_config
            if not Path(given).expanduser().is_file():
                raise flags.Error(f"--config={given}: no such config file (the configs are in {CONFIG_DIR})")
    fv = flags.FlagValues()
    path = CONFIG_DIR / default_file
    try:
        if path.is_file():
            config_flags.DEFINE_config_file("config", default=str(path), flag_values=fv, lock_config=True, sys_argv=argv)
        elif any(a.startswith("--config=") for a in argv):
            config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv)
        else:  # installed without the repo's configs/: the packaged defaults
            config_flags.DEFINE_config_dict("config", default_config(), flag_values=fv, lock_config=True, sys_argv=argv)
        rest = fv(argv)[1:]
    except (AttributeError, KeyError):  # ml_collections' way of saying "no such field"
        raise _unknown_setting(argv) from None
    if rest:  # `sae-jax train runs/store`: a path where a setting was meant
        hint = {"harvest": "harvest.out", "demo": "harvest.out"}.get(argv[0].split()[-1], "train.store")
        raise flags.Error(
            f"unexpected argument {rest[0]!r}: settings are given as --config.section.key=value (e.g. --config.{hint}={rest[0]})"
        )
    return fv.config


POSITIONAL = {  # the commands that take one path: what it is and what they do with it
    "plot": ("RUN", "draw a run's curves.png (from metrics.jsonl) and latent_density.png (once it is complete)"),
    "info": ("STORE", "summarise a store: hooks, rows, shards, statistics, the harvest's settings"),
    "verify": ("STORE", "checksum every file of a store against its manifest"),
}


def _unknown_setting(argv: list[str]) -> Exception:
    """The error for an override naming no setting: which one, and the nearest real names."""
    import difflib

    from sae_jax.config import default_config
    from sae_jax.errors import SaeJaxError

    c = default_config()
    for a in argv[1:]:
        if not a.startswith("--config."):
            continue
        key = a[len("--config.") :].split("=", 1)[0]
        section, _, name = key.partition(".")
        if section not in c:
            near = difflib.get_close_matches(section, list(c), n=1)
        elif name not in c[section]:
            near = [f"{section}.{n}" for n in difflib.get_close_matches(name, list(c[section]), n=3)]
        else:
            continue
        hint = f"; did you mean {' or '.join(near)}?" if near else f"; `{argv[0]} --help` lists every setting"
        return SaeJaxError(f"--config.{key}: no such setting{hint}")
    return SaeJaxError(f"unknown setting among {' '.join(a for a in argv[1:] if a.startswith('--config.'))}")


def _positional_store(argv: list[str], cmd: str) -> Path:
    what, does = POSITIONAL[cmd]
    usage = f"usage: sae-jax {cmd} {what}\n  {does}"
    if _wants_help(argv):
        print(usage)
        raise SystemExit(0)
    args = [a for a in argv[1:] if not a.startswith("-")]
    if len(args) != 1 or len(args) != len(argv) - 1:
        raise SystemExit(usage)
    return Path(args[0])


def cmd_harvest(argv, default_file="default.py") -> int:
    from sae_jax.data.summary import store_summary
    from sae_jax.harvest import harvest
    from sae_jax.parallel import init_distributed

    cfg = _load_config(argv, default_file)
    init_distributed(cfg.distributed)
    t0 = time.perf_counter()
    store = harvest(cfg)
    import jax

    if jax.process_index() == 0:
        print(store_summary(store))
        print(f"time       {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_train(argv) -> int:
    from sae_jax.parallel import init_distributed
    from sae_jax.train.loop import run_summary, train
    from sae_jax.train.settings import TrainSettings

    cfg = _load_config(argv, "default.py")
    TrainSettings.from_config(cfg.train)  # every rule that needs no device, before any work
    init_distributed(cfg.distributed)
    result = train(cfg)
    import jax

    if jax.process_index() == 0:
        print(run_summary(result))
    return 0


def cmd_demo(argv) -> int:
    """Harvest (configs/demo.py), train its bank on the store, evaluate it; print the results."""
    import jax

    from sae_jax.data.summary import store_summary
    from sae_jax.eval.core import evaluate, write_report
    from sae_jax.harvest import harvest
    from sae_jax.train.loop import run_summary, settings_for, train

    cfg = _load_config(argv, "demo.py")
    settings_for(cfg, jax.device_count())  # the train settings checked before the harvest
    t0 = time.perf_counter()
    print(store_summary(harvest(cfg)))
    t1 = time.perf_counter()
    print(f"harvest    {t1 - t0:.1f} s\n")
    print(run_summary(train(cfg)))
    t2 = time.perf_counter()
    print(f"train      {t2 - t1:.1f} s\n")
    text, paths = write_report(evaluate(cfg.train.run_dir, contexts=32, log=lambda *a: None))
    print(text)
    print(f"eval       {time.perf_counter() - t2:.1f} s ({paths[0]})")
    print(f"next       sae-jax export {cfg.train.run_dir} --format saelens --out {cfg.train.run_dir}/export/saelens")
    print(f"           sae-jax atlas {cfg.train.run_dir}")
    return 0


WIDTH_GRANULE = 4096  # compile-check's widest-fit search: widths in multiples of this x train.mesh_model


def cmd_compile_check(argv) -> int:
    """Compile the train step for the configured mesh without training (sae_jax/train/compile_check.py)."""
    import argparse
    import re

    p = argparse.ArgumentParser(prog="sae-jax compile-check", description=cmd_compile_check.__doc__)
    p.add_argument("--devices", type=int, default=0, help="compile for N simulated CPU devices (a pod's mesh from here)")
    p.add_argument("--memory-gib", type=float, default=None, help="per-device memory: refuse (exit 1) a step that needs more")
    p.add_argument(
        "--no-widest", action="store_true", help="on a refusal, do not search (by a few more compiles) for the widest widths that fit"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for the tokens/s estimate (default: known TPUs/GPUs)")
    p.add_argument("--mfu", type=float, default=0.5, help="fraction of the peak the estimate assumes")
    p.add_argument("--d-in", type=int, default=0, help="the hooks' width, to check without a store (name the hooks in train.hooks)")
    p.add_argument("--json", default="", help="also write the numbers to this JSON file")
    p.add_argument(
        "--topology", default="", help="compile for a TPU topology with libtpu's compiler, e.g. v5e:2x2, v5p:2x2x1 (needs libtpu)"
    )
    p.add_argument("--gpu", default="", help="compile for GPUs with XLA's CUDA compiler: h100, h200, h100:8 (needs the cuda-aot extra)")
    p.add_argument(
        "--job", default="train", choices=("train", "harvest"), help="the step to compile: train (default) or the harvest's forward"
    )
    p.add_argument(
        "--model-config", default="", help="--job harvest: the model, as a HF config.json (configs/models/), a HF directory or a .gguf"
    )
    if _wants_help(argv):
        p.print_help()
        print("\n" + _config_help(argv, "default.py"))
        return 0
    a, rest = p.parse_known_args(argv[1:])
    if (a.topology or a.gpu) and a.devices:
        raise SystemExit("sae-jax compile-check: --topology / --gpu and --devices exclude each other (the target says the devices)")
    if a.topology or a.gpu:
        os.environ["JAX_PLATFORMS"] = "cpu"  # this host compiles; the program is for the topology's chips
    if a.devices:
        if a.devices < 1:
            raise SystemExit("sae-jax compile-check: --devices must be at least 1")
        flags_env = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags_env} --xla_force_host_platform_device_count={a.devices}".strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    cfg = _load_config([argv[0], *rest], "default.py")
    if a.job == "harvest":
        return _compile_check_harvest(a, cfg)
    from sae_jax.train.compile_check import (
        CompileCheckError,
        CompilerRefused,
        compile_check,
        refusal,
        report,
        widest_fitting,
        widest_line,
    )
    from sae_jax.train.settings import TrainSettings

    kw = dict(d_in=a.d_in or None, peak_tflops=a.peak_tflops, mfu=a.mfu, memory_gib=a.memory_gib, topology=a.topology, gpu=a.gpu)
    t = TrainSettings.from_config(cfg.train)

    def widest():
        print("searching for the widest train.widths that fits (a few more compiles) ...", file=sys.stderr, flush=True)
        return widest_fitting(cfg, t.widths, WIDTH_GRANULE * t.mesh_model, **kw)

    try:
        rep = compile_check(cfg, **kw)
    except CompilerRefused as e:
        if a.no_widest:
            raise
        raise type(e)(f"{e}; the widest that fits: {widest_line(widest())}") from None
    if rep["fits"] is False and not a.no_widest:
        try:
            rep["widest"] = widest()
        except CompileCheckError as e:
            rep["widest_error"] = str(e)
    return _check_verdict(rep, report(rep), refusal, a.json)


def _compile_check_harvest(a, cfg) -> int:
    from sae_jax.harvest_check import harvest_compile_check, report

    if a.d_in:
        raise SystemExit("sae-jax compile-check: --d-in is for --job train (the model's config gives the harvest's widths)")
    rep = harvest_compile_check(
        cfg, a.model_config or cfg.model.path, topology=a.topology, gpu=a.gpu, mfu=a.mfu, peak_tflops=a.peak_tflops, memory_gib=a.memory_gib
    )
    return _check_verdict(rep, report(rep), lambda r: r["refusal"], a.json)


def _check_verdict(rep: dict, text: str, refusal, json_path: str) -> int:
    """Print a compile-check's report (and write its JSON); one that does not fit: `refusal(rep)`
    in one line on stderr, exit 1."""
    print(text)
    if json_path:
        import json

        Path(json_path).write_text(json.dumps(rep, indent=1))
    if rep["fits"] is False:
        print(f"sae-jax compile-check: refused: {refusal(rep)}", file=sys.stderr)
        return 1
    return 0


def _argparser(cmd: str, **kw):
    import argparse

    p = argparse.ArgumentParser(prog=f"sae-jax {cmd}", **kw)  # a bad flag: usage, exit 2
    p.add_argument(
        "run",
        help="a run directory written by `sae-jax train`"
        + (" (or a SAELens / sparsify folder, with --store)" if cmd in ("eval", "atlas") else ""),
    )
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    return p


def _text_and_model_args(p) -> None:
    """The held-out text and the model that eval and atlas run the dictionaries on."""
    p.add_argument("--split", default="heldout", help="split of the store's text source to read (not the one it was harvested from)")
    p.add_argument("--text", default=None, help="held-out text instead (file, directory or glob; .jsonl as JSONL)")
    p.add_argument("--model", default=None, help="the run's model, if it moved (checked by digest)")
    p.add_argument("--batch-size", type=int, default=8, help="contexts per model forward")


def cmd_export(argv) -> int:
    from sae_jax.export import DTYPES, FORMATS, export_run
    from sae_jax.runs import open_run

    p = _argparser("export", description="Write a run's dictionaries for SAELens, sparsify or numpy.")
    p.add_argument("--format", required=True, help=" | ".join(FORMATS))
    p.add_argument("--out", required=True, help="output directory (one folder per bank member)")
    p.add_argument("--dtype", default="float32", help=" | ".join(DTYPES))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a = p.parse_args(argv[1:])
    from sae_jax.export import ExportError

    if a.format not in FORMATS:  # before loading anything
        raise ExportError(f"unknown export format {a.format!r} (choose from {', '.join(FORMATS)})")
    if a.dtype not in DTYPES:
        raise ExportError(f"--dtype {a.dtype!r} is not supported ({', '.join(DTYPES)})")
    run = open_run(a.run, a.step)
    folders = export_run(run, a.format, a.out, a.dtype, a.overwrite)
    state = "finished" if run.finished else f"NOT finished: {run.steps} planned"
    print(f"exported step {run.step} ({state}) of {run.root} as {a.format} ({a.dtype}):")
    for f in folders:
        print(f"  {f}")
    return 0


def cmd_eval(argv) -> int:
    from sae_jax.eval.core import evaluate, write_report

    p = _argparser("eval", description="Reconstruction metrics on held-out store rows and downstream loss with each dictionary spliced in.")
    p.add_argument("--member", default=None, help="bank member name (default: every member)")
    p.add_argument(
        "--store",
        default=None,
        help="a store of the same model to evaluate on (default: the run's store, its held-out shards; SAELens / sparsify folders: its last shard)",
    )
    p.add_argument("--tokens", type=int, default=200_000, help="held-out rows to evaluate reconstruction on, at most")
    p.add_argument("--contexts", type=int, default=64, help="held-out text contexts for the downstream losses")
    _text_and_model_args(p)
    p.add_argument("--out", default=None, help="report directory (default RUN/eval)")
    a = p.parse_args(argv[1:])
    report = evaluate(
        a.run,
        step=a.step,
        member=a.member,
        store=a.store,
        tokens=a.tokens,
        contexts=a.contexts,
        split=a.split,
        batch_size=a.batch_size,
        text=a.text,
        model_path=a.model,
    )
    text, paths = write_report(report, a.out)
    print(text)
    for f in paths:
        print(f"wrote {f}")
    return 0


def cmd_atlas(argv) -> int:
    from sae_jax.eval.atlas import build_atlas

    p = _argparser("atlas", description="Top activating contexts and quantile samples of every latent (an HTML page and its data files).")
    p.add_argument("--member", default=None, help="bank member name (default: every member)")
    p.add_argument("--contexts", type=int, default=512, help="text contexts to stream")
    p.add_argument("--top", type=int, default=20, help="top activating contexts kept per latent")
    p.add_argument("--samples", type=int, default=20, help="random activations kept per latent, reported across quantiles")
    p.add_argument("--store", default=None, help="SAELens / sparsify folders: the store whose model and text to read")
    p.add_argument("--delphi", default=None, help="also write a latent cache in delphi's layout (eai-delphi's LatentDataset) here")
    p.add_argument("--delphi-splits", type=int, default=5, help="latent ranges (files) per member in the delphi cache")
    p.add_argument("--rows", type=int, default=65536, help="stores without a model: held-out store rows to scan instead of text")
    p.add_argument("--window", default="24,8", help="tokens kept before and after each activating token: BEFORE,AFTER")
    _text_and_model_args(p)
    p.add_argument("--out", default=None, help="output directory (default RUN/atlas)")
    a = p.parse_args(argv[1:])
    for line in build_atlas(
        a.run,
        step=a.step,
        member=a.member,
        contexts=a.contexts,
        top=a.top,
        samples=a.samples,
        split=a.split,
        text=a.text,
        model_path=a.model,
        batch_size=a.batch_size,
        out=a.out,
        store=a.store,
        delphi=a.delphi,
        delphi_splits=a.delphi_splits,
        rows=a.rows,
        window=a.window,
    ):
        print(line)
    return 0


def cmd_import_cache(argv) -> int:
    """Import a SAELens activation cache (a datasets directory) into a store."""
    import argparse

    from sae_jax.data.saelens_cache import import_cache

    p = argparse.ArgumentParser(prog="sae-jax import-cache", description=cmd_import_cache.__doc__)
    p.add_argument("cache", help="the directory SAELens's CacheActivationsRunner saved")
    p.add_argument("--out", required=True, help="the store to write (a new or empty directory)")
    p.add_argument("--hooks", default="", help="comma-separated hook columns (default: every activation column)")
    p.add_argument("--dtype", default="bfloat16", help="store dtype: bfloat16, float16 or float32")
    p.add_argument("--rows-per-record", type=int, default=1024)
    p.add_argument("--shard-rows", type=int, default=65536, help="rows per shard (a multiple of --rows-per-record)")
    p.add_argument("--seed", type=int, default=0, help="the within-shard shuffle")
    a = p.parse_args(argv[1:])
    hooks = [h.strip() for h in a.hooks.split(",") if h.strip()] or None
    import_cache(a.cache, a.out, hooks, dtype=a.dtype, rows_per_record=a.rows_per_record, shard_rows=a.shard_rows, seed=a.seed)
    return 0


def cmd_export_cache(argv) -> int:
    """Export a store as a SAELens activation cache (a datasets directory)."""
    import argparse

    from sae_jax.data.saelens_cache import export_cache

    p = argparse.ArgumentParser(prog="sae-jax export-cache", description=cmd_export_cache.__doc__)
    p.add_argument("store")
    p.add_argument("--out", required=True, help="the cache directory to write (new or empty)")
    p.add_argument("--hooks", default="", help="comma-separated hooks (default: every hook of the store)")
    p.add_argument("--context-size", type=int, default=128, help="store rows per dataset row (SAELens's context_size)")
    p.add_argument("--dtype", default="float32", help="float32 or float16")
    a = p.parse_args(argv[1:])
    hooks = [h.strip() for h in a.hooks.split(",") if h.strip()] or None
    export_cache(a.store, a.out, hooks, context_size=a.context_size, dtype=a.dtype)
    return 0


def cmd_plot(argv) -> int:
    from sae_jax.train.plots import plot_run

    for p in plot_run(_positional_store(argv, "plot")):  # a run directory
        print(p)
    return 0


def cmd_info(argv) -> int:
    from sae_jax.data.store import open_store
    from sae_jax.data.summary import store_summary

    print(store_summary(open_store(_positional_store(argv, "info"), require_complete=False)))
    return 0


def cmd_verify(argv) -> int:
    from sae_jax.data.store import open_store

    root = _positional_store(argv, "verify")
    store = open_store(root, require_complete=False)
    problems = store.verify()
    if not store.manifest.get("complete"):
        problems.append(f"{root}: the harvest has not finished")
    if problems:
        print("FAILED\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    n = sum(len(s["files"]) for s in store.shards)
    print(f"OK: {n} files in {len(store.shards)} shards match their checksums; statistics agree")
    return 0


COMMANDS = {
    "harvest": cmd_harvest,
    "demo": cmd_demo,
    "plot": cmd_plot,
    "eval": cmd_eval,
    "export": cmd_export,
    "atlas": cmd_atlas,
    "train": cmd_train,
    "compile-check": cmd_compile_check,
    "import-cache": cmd_import_cache,
    "export-cache": cmd_export_cache,
    "info": cmd_info,
    "verify": cmd_verify,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if len(argv) >= 2 else 2
    cmd = argv[1]
    if cmd not in COMMANDS:
        print(f"sae-jax: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if cmd in ("train", "demo"):  # before jax starts its threads
        from sae_jax.hostmem import keep_freed_memory

        keep_freed_memory()
    from absl import flags

    from sae_jax.errors import Interrupted, SaeJaxError

    try:
        return COMMANDS[cmd]([f"sae-jax {cmd}", *argv[2:]])
    except flags.Error as e:
        print(f"sae-jax {cmd}: bad flag: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # saved, then stopped by a signal
        print(f"sae-jax {cmd}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop
        print(f"sae-jax {cmd}: interrupted", file=sys.stderr)
        return 130
    except SaeJaxError as e:
        print(f"sae-jax {cmd}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an output path that cannot be written, a file that cannot be read
        where = f"{e.filename}: " if e.filename else ""
        print(f"sae-jax {cmd}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
