"""`sae-jax`: one entry point, one subcommand per job.

    sae-jax harvest [--config=configs/default.py] [--config.harvest.out=DIR ...]
    sae-jax train   [--config=configs/default.py] [--config.train.store=DIR --config.train.run_dir=DIR ...]
    sae-jax demo    [--config=configs/demo.py] [--config.x=y ...]   # harvest, then train
    sae-jax plot    RUN
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


def _load_config(argv: list[str], default_file: str):
    from absl import flags
    from ml_collections import config_flags

    from sae_jax.config import default_config

    fv = flags.FlagValues()
    path = CONFIG_DIR / default_file
    try:
        if path.is_file():
            config_flags.DEFINE_config_file("config", default=str(path), flag_values=fv, lock_config=True, sys_argv=argv)
        elif any(a.startswith("--config=") for a in argv):
            config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv)
        else:  # installed without the repo's configs/: the packaged defaults
            config_flags.DEFINE_config_dict("config", default_config(), flag_values=fv, lock_config=True, sys_argv=argv)
        fv(argv)
    except (AttributeError, KeyError) as e:  # ml_collections' way of saying "no such field"
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        raise flags.Error(f"unknown config key {e} (overrides given: {' '.join(bad)})") from None
    return fv.config


def _positional_store(argv: list[str], cmd: str) -> Path:
    args = [a for a in argv[1:] if not a.startswith("-")]
    if len(args) != 1:
        raise SystemExit(f"usage: sae-jax {cmd} STORE")
    return Path(args[0])


def cmd_harvest(argv, default_file="default.py") -> int:
    from sae_jax.harvest import harvest, summary

    cfg = _load_config(argv, default_file)
    t0 = time.perf_counter()
    store = harvest(cfg)
    print(summary(store))
    print(f"time       {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_train(argv) -> int:
    from sae_jax.train.loop import summary, train

    cfg = _load_config(argv, "default.py")
    print(summary(train(cfg)))
    return 0


def cmd_demo(argv) -> int:
    """Harvest (configs/demo.py), then train its bank on the store, then print the results."""
    from sae_jax.harvest import harvest, summary
    from sae_jax.train.loop import summary as train_summary
    from sae_jax.train.loop import train

    cfg = _load_config(argv, "demo.py")
    t0 = time.perf_counter()
    print(summary(harvest(cfg)))
    t1 = time.perf_counter()
    print(f"harvest    {t1 - t0:.1f} s\n")
    print(train_summary(train(cfg)))
    print(f"train      {time.perf_counter() - t1:.1f} s")
    return 0


def cmd_plot(argv) -> int:
    from sae_jax.train.plots import plot_run

    for p in plot_run(_positional_store(argv, "plot")):
        print(p)
    return 0


def cmd_info(argv) -> int:
    from sae_jax.data.store import open_store
    from sae_jax.harvest import summary

    print(summary(open_store(_positional_store(argv, "info"), require_complete=False)))
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
    "train": cmd_train,
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
    from absl import flags

    from sae_jax.errors import USER_ERRORS

    try:
        return COMMANDS[cmd]([f"sae-jax {cmd}", *argv[2:]])
    except flags.Error as e:
        print(f"sae-jax {cmd}: bad flag: {e}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        print(f"sae-jax {cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
