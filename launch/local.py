#!/usr/bin/env python3
"""Run one sae-jax job as several JAX processes on this machine (CPU devices), the way a pod runs it.

    python launch/local.py --processes 2 --devices 4 -- train --config.train.store=S --config.train.run_dir=R
    python launch/local.py --processes 2 --devices 4 --dry-run -- train ...   # print the commands, run nothing

Process i runs `python -m sae_jax.cli JOB ARGS --config.distributed.coordinator=localhost:PORT
--config.distributed.num_processes=N --config.distributed.process_id=i` with `--devices` simulated
CPU devices (XLA_FLAGS) and CPU collectives (gloo). Output lines are prefixed `[pI]`. Fail fast:
when one process exits with an error, the others are stopped (SIGTERM, then SIGKILL after
--grace seconds) and this script exits with that process's code, naming it. SIGTERM or SIGINT to
this script is passed on to every process (a preemption: they save at the same step and exit).
Standard library only: it runs under any Python; the processes use this interpreter (or --python).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def commands(job: list[str], processes: int, devices: int, port: int, python: str) -> list[tuple[dict, list[str]]]:
    """(environment overrides, argv) of each process."""
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    out = []
    for i in range(processes):
        argv = [python, "-m", "sae_jax.cli", *job]
        argv += [
            f"--config.distributed.coordinator=localhost:{port}",
            f"--config.distributed.num_processes={processes}",
            f"--config.distributed.process_id={i}",
        ]
        out.append((env, argv))
    return out


def render(env: dict, argv: list[str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv)])


def _pump(i: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[p{i}] {line}")
        out.flush()


def run(cmds: list[tuple[dict, list[str]]], grace: float, cwd: str | None = None) -> int:
    procs, pumps = [], []
    for i, (env, argv) in enumerate(cmds):
        p = subprocess.Popen(
            argv, env={**os.environ, **env}, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        procs.append(p)
        pumps.append(threading.Thread(target=_pump, args=(i, p.stdout, sys.stdout), daemon=True))
        pumps[-1].start()

    def forward(sig, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    failures = []  # (process, code) in the order they were seen; killed by a signal first within one look
    try:
        while True:
            codes = [p.poll() for p in procs]
            new = [(i, c) for i, c in enumerate(codes) if c not in (None, 0) and i not in dict(failures)]
            failures += sorted(new, key=lambda f: (f[1] >= 0, f[0]))
            if failures or all(c is not None for c in codes):
                break
            time.sleep(0.2)
        if failures:
            live = [j for j, p in enumerate(procs) if p.poll() is None]
            for j in live:
                procs[j].terminate()
            deadline = time.monotonic() + grace
            for j in live:
                try:
                    procs[j].wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    os.killpg(procs[j].pid, signal.SIGKILL)
                    procs[j].wait()
            for t in pumps:
                t.join(timeout=5)
            i, rc = failures[0]
            others = [
                f"process {j} exited with code {p.returncode}" for j, p in enumerate(procs) if j != i and j not in live and p.returncode
            ]
            stopped = [f"stopped process(es) {', '.join(map(str, live))}"] if live else []
            print(
                f"launch/local.py: process {i} of {len(procs)} exited with code {rc}" + "".join(f"; {x}" for x in others + stopped),
                file=sys.stderr,
            )
            return rc if rc > 0 else 128 - rc
        for t in pumps:
            t.join(timeout=5)
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: launch/local.py [--processes N] [--devices D] [--port P] [--dry-run] -- JOB [ARGS...]", file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="launch/local.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", "-n", type=int, default=2)
    p.add_argument("--devices", "-d", type=int, default=4, help="simulated CPU devices per process")
    p.add_argument("--port", type=int, default=0, help="the coordinator's port (0: a free one)")
    p.add_argument("--python", default=sys.executable, help="the interpreter that has sae_jax installed")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL for the others when one fails")
    p.add_argument("--dry-run", action="store_true", help="print each process's command and run nothing")
    a = p.parse_args(argv[:cut])
    job = argv[cut + 1 :]
    if job[:1] == ["sae-jax"]:
        job = job[1:]
    if not job:
        p.error("no job after --: e.g. -- train --config.train.store=S --config.train.run_dir=R")
    if a.processes < 1 or a.devices < 1:
        p.error("--processes and --devices must be at least 1")
    cmds = commands(job, a.processes, a.devices, a.port or (12355 if a.dry_run else free_port()), a.python)
    if a.dry_run:
        for env, cmd in cmds:
            print(render(env, cmd))
        return 0
    return run(cmds, a.grace)


if __name__ == "__main__":
    sys.exit(main())
