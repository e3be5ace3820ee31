"""Several JAX processes on this machine (launch/local.py: CPU devices, gloo collectives), the
way a pod runs: training matches one process, checkpoints move between process counts and
meshes, a harvest split over processes writes the same store, and failures end every process."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, cli_args, run_cli

from sae_jax.runs import open_run

pytestmark = [pytest.mark.slow]

LAUNCH = [sys.executable, str(REPO / "launch" / "local.py")]
STEPS = 12


def _settings(store, run, **kw) -> dict:
    return {
        "train.store": str(store.root),
        "train.run_dir": str(run),
        "train.widths": "64",
        "train.ks": "8",
        "train.batch_size": 256,
        "train.steps": STEPS,
        "train.checkpoint_every": 4,
        "train.log_every": 4,
        "train.warmup_steps": 5,
        "train.dead_tokens": 2048,
        "train.progress": False,
        **kw,
    }


def _train_args(store, run, **kw) -> list[str]:
    return ["train", *(f"--config.{k}={v}" for k, v in _settings(store, run, **kw).items())]


def _launch(processes: int, devices: int, job: list[str], timeout=600, **kw) -> subprocess.CompletedProcess:
    cmd = [*LAUNCH, "-n", str(processes), "-d", str(devices), "--", *job]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout, **kw)


def _params(run) -> dict[str, np.ndarray]:
    r = open_run(run)
    assert r.step == STEPS
    return r.params


def _max_diff(a, b) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _truncate(src: Path, dst: Path, keep: int) -> Path:
    """A copy of a run as if it had been killed after its checkpoint at step `keep`."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) > keep:
            shutil.rmtree(d)
    return dst


def test_two_processes_match_one_and_resume_across_process_counts(tiny_store, tmp_path):
    # a float32 encoder: the in-process and gloo all-reduces leave the parameters ~1e-7 apart, and
    # rounded to bf16 for the encoder matmul (`auto` on a CPU with AVX512-BF16) such a difference
    # can move a weight by one bf16 step and flip a near-tie of the selection (measured: 2.7e-5
    # apart after 12 steps with bf16, 2.5e-7 with float32). Adam's b1 pinned at 0.9 (optax's; the
    # default is 0.7), so the test does not move with the default: at b1 0.5 the first moment
    # weighs the newest gradient 0.5, not 0.1, so a rounding difference of the all-reduce moves an
    # update 5x as far; at 64 latents the decoder learns at 0.096 a step (the width rule, x5) and after 12
    # steps the two runs were 1.1e-6 apart at 0.5 (2.6e-7 at 0.9; at 0.5 with the decoder at 1x,
    # W_enc 2.3e-6: the gap is chaotic, not a bias). And float32 Adam moments: a bfloat16 moment
    # crossing a rounding boundary on a 1e-7 difference moves the next update by a bfloat16 ulp of it
    # (conftest.MESH_MATH); the lean state's processes-and-meshes equality is the next test's
    mesh = {
        "train.mesh_data": 8,
        "train.mesh_model": 1,
        "train.encoder_dtype": "float32",
        "train.adam_b1": 0.9,
        "train.optimizer_state": "float32",
    }
    two, one, plain = tmp_path / "two", tmp_path / "one", tmp_path / "plain"
    r = _launch(2, 4, _train_args(tiny_store, two, **mesh))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "[p0] step       12" in r.stdout and "[p1] step" not in r.stdout  # process 0 reports
    assert [json.loads(x)["step"] for x in (two / "metrics.jsonl").read_text().splitlines()] == [4, 8, 12]
    assert sorted(p.name for p in (two / "checkpoints" / "12" / "data").glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]
    # the same run as one process with the same 8 devices and the same (gloo) collectives: bit-identical
    r = _launch(1, 8, _train_args(tiny_store, one, **mesh))
    assert r.returncode == 0, r.stdout[-3000:]
    p2, p1 = _params(two), _params(one)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)
    # a plain single-process run (XLA's in-process all-reduce sums in another order): equal to float32 rounding
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = run_cli(*_train_args(tiny_store, plain, **mesh), env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = _max_diff(_params(plain), p2)
    print(f"two processes vs one with in-process collectives: max |diff| {d:.3g} after {STEPS} steps")
    assert d < 1e-6, d
    # killed after step 4, resumed by the same two processes (each restores its own iterator state) ...
    again = _truncate(two, tmp_path / "two-again", 4)
    r = _launch(2, 4, _train_args(tiny_store, again, **mesh))
    assert r.returncode == 0 and "[p1] " in r.stdout and "resumed from step 4 (process 1 of 2)" in r.stdout, r.stdout[-3000:]
    # ... and the one-process run resumed on two processes (the data position follows from the step)
    moved = _truncate(one, tmp_path / "one-on-two", 4)
    r = _launch(2, 4, _train_args(tiny_store, moved, **mesh))
    assert r.returncode == 0, r.stdout[-3000:]
    for run in (again, moved):
        p = _params(run)
        for k in p2:
            np.testing.assert_array_equal(p[k], p2[k], err_msg=f"{run.name}: {k}")


def test_model_axis_across_processes_reads_identical_batches(tiny_store, tmp_path):
    """data=1 x model=8: both processes form one data-parallel group (the same rows) and the
    latents are split over all 8 devices (the top-k merges candidates across processes). With
    the default settings, so the bfloat16 Adam state's rounding bits agree across processes."""
    mesh = {"train.mesh_data": 1, "train.mesh_model": 8}
    two, one = tmp_path / "two", tmp_path / "one"
    r = _launch(2, 4, _train_args(tiny_store, two, **mesh))
    assert r.returncode == 0, r.stdout[-3000:]
    r = _launch(1, 8, _train_args(tiny_store, one, **mesh))
    assert r.returncode == 0, r.stdout[-3000:]
    p2, p1 = _params(two), _params(one)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)


def test_checkpoint_restores_onto_another_mesh(tiny_store, tmp_path):
    """Written with data=8, restored onto data=2 x model=4: the run continues as the unresharded
    resume does (equal to float32 rounding: the reductions are split differently)."""
    from sae_jax.config import default_config
    from sae_jax.train.loop import train

    def run(path, data, model):
        c = default_config()
        # a float32 encoder: with bf16 inputs (`auto` on a CPU with AVX512-BF16) XLA:CPU's dot
        # kernels differ by shard shape, so near-ties of the selection can flip (measured: 1.2e-3
        # apart at step 12); in float32 the two runs are 1.6e-7 apart. Float32 Adam moments too
        # (conftest.MESH_MATH: bfloat16 moments carry such differences a rounding step further)
        mesh = {"train.mesh_data": data, "train.mesh_model": model, "train.encoder_dtype": "float32", "train.optimizer_state": "float32"}
        for key, val in _settings(tiny_store, path, **mesh).items():
            section, name = key.split(".")
            c[section][name] = val
        logs = []
        train(c, log=logs.append)
        return logs

    base = tmp_path / "base"
    run(base, 8, 1)
    resharded = _truncate(base, tmp_path / "resharded", 4)
    same = _truncate(base, tmp_path / "same", 4)
    assert any("resumed from step 4" in x for x in run(resharded, 2, 4))
    assert any("resumed from step 4" in x for x in run(same, 8, 1))
    p_same, p_resharded = _params(same), _params(resharded)
    d = _max_diff(p_same, p_resharded)
    print(f"resharded (data=8 -> data=2 x model=4 at step 4) vs unresharded resume: max |diff| {d:.3g} at step {STEPS}")
    assert d < 1e-6, d
    np.testing.assert_array_equal(_params(base)["W_dec"], p_same["W_dec"])  # the unresharded resume is the uninterrupted run


def test_harvest_over_two_processes_writes_the_single_process_store(tiny_store, tmp_path):
    out = tmp_path / "two"
    args = [a for a in cli_args(out) if not a.startswith("--config.harvest.out=")] + [f"--config.harvest.out={out}"]
    r = _launch(2, 1, ["harvest", *args])
    assert r.returncode == 0, r.stdout[-3000:]
    assert not list(out.glob("manifest.process-*"))
    assert not (out / ".tokens").exists()  # the processes' shared tokenization, removed once the store is complete
    ref = Path(tiny_store.root)
    files = sorted(p.name for p in ref.glob("shard-*"))
    assert files == sorted(p.name for p in out.glob("shard-*"))
    for name in files:  # byte for byte: shards 0, 2 from process 0, 1, 3 from process 1
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (ref, out))
    assert {k for k in a if a[k] != b.get(k)} == {"created", "last_run"}
    assert b["last_run"]["processes"] == 2


def test_harvest_resumes_a_two_process_harvest_on_one(tiny_store, tmp_path, lm):
    """Process 1 of a two-process harvest finished its shards, process 0 was killed after its
    first: one process folds process 1's part into the manifest and writes only shard 2."""
    from conftest import tiny_config

    from sae_jax.data import store as st
    from sae_jax.harvest import harvest

    ref = Path(tiny_store.root)
    out = tmp_path / "partial"
    out.mkdir()
    m = json.loads((ref / "manifest.json").read_text())
    shards = {s["index"]: s for s in m["shards"]}
    for s in (0, 1, 3):
        for f in shards[s]["files"].values():
            shutil.copy(ref / f["name"], out / f["name"])
    for k in ("contexts", "rows", "rows_dropped", "rows_outliers", "corpus_exhausted", "forward", "last_run"):
        m.pop(k, None)
    st.atomic_write_text(out / "manifest.json", json.dumps({**m, "shards": [shards[0]], "complete": False}))
    st.atomic_write_text(
        out / "manifest.process-1-of-2.json", json.dumps({"fingerprint": m["fingerprint"], "shards": [shards[1], shards[3]]})
    )
    logs = []
    store = harvest(tiny_config(out), log=logs.append, lm=lm)
    assert any("3 of 4 shards done" in x for x in logs), logs
    assert store.manifest["last_run"]["tokens"] == 16 * 64  # one shard of 16 contexts
    for name in sorted(p.name for p in ref.glob("shard-*")):
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
    assert store.manifest["hooks"] == tiny_store.manifest["hooks"]


# ---- failures -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_unreachable_coordinator_times_out_with_a_clear_error(tiny_store, tmp_path):
    dist = {"distributed.coordinator": f"localhost:{_free_port()}", "distributed.num_processes": 2, "distributed.process_id": 1}
    dist["distributed.init_timeout_s"] = 3
    t0 = time.monotonic()
    r = run_cli(*_train_args(tiny_store, tmp_path / "r"), *(f"--config.{k}={v}" for k, v in dist.items()), timeout=120)
    assert r.returncode == 1 and time.monotonic() - t0 < 60
    assert "distributed.coordinator=localhost:" in r.stderr and "cannot be reached after 3 s" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "r").exists()


def test_bad_distributed_settings(tiny_store, tmp_path):
    r = run_cli(
        *_train_args(tiny_store, tmp_path / "r"), "--config.distributed.coordinator=nohostport", "--config.distributed.num_processes=2"
    )
    assert r.returncode == 1 and "expected HOST:PORT" in r.stderr, r.stderr[-2000:]
    r = run_cli(
        *_train_args(tiny_store, tmp_path / "r"),
        "--config.distributed.coordinator=localhost:1",
        "--config.distributed.num_processes=2",
        "--config.distributed.process_id=2",
    )
    assert r.returncode == 1 and "process_id=2 of distributed.num_processes=2" in r.stderr, r.stderr[-2000:]
    r = run_cli(*_train_args(tiny_store, tmp_path / "r"), "--config.distributed.num_processes=2")
    assert r.returncode == 1 and "needs distributed.coordinator" in r.stderr, r.stderr[-2000:]


def test_mesh_and_store_slice_errors_on_two_processes(tiny_store, tmp_path):
    r = _launch(2, 4, _train_args(tiny_store, tmp_path / "a", **{"train.mesh_data": 3, "train.mesh_model": 2}))
    assert r.returncode == 1, r.stdout[-2000:]
    assert "train.mesh_data=3 x train.mesh_model=2 = 6 devices, there are 8 (2 processes x 4)" in r.stdout
    # the training records (all shards but the last) hold fewer rows than one global batch
    n_train = sum(s["records"] for s in tiny_store.shards[:-1])
    batch = (n_train + 1) * tiny_store.rows_per_record
    batch += -batch % 8
    r = _launch(2, 4, _train_args(tiny_store, tmp_path / "b", **{"train.batch_size": batch}))
    assert r.returncode == 1, r.stdout[-2000:]
    assert f"split over 2 data-parallel group(s) leave fewer than one batch of {batch // 2} rows per group" in r.stdout


def _child_pid(run_dir: Path, process_id: int) -> int | None:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"--config.train.run_dir={run_dir}".encode() in cmd and f"--config.distributed.process_id={process_id}".encode() in cmd:
                return int(p.name)
    return None


def _wait_for_step(run_dir: Path, proc, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        m = run_dir / "metrics.jsonl"
        if m.is_file() and m.read_text().strip():
            return
        time.sleep(0.1)
    raise AssertionError("training did not start")


def test_a_dead_process_stops_the_launcher_and_the_others(tiny_store, tmp_path):
    run = tmp_path / "r"
    args = _train_args(tiny_store, run, **{"train.steps": 100000, "train.log_every": 1})
    launcher = subprocess.Popen(
        [*LAUNCH, "-n", "2", "-d", "4", "--", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_step(run, launcher)
        pid0, pid1 = _child_pid(run, 0), _child_pid(run, 1)
        assert pid0 and pid1
        os.kill(pid1, signal.SIGKILL)
        t0 = time.monotonic()
        out, err = launcher.communicate(timeout=60)
        assert time.monotonic() - t0 < 30
    finally:
        launcher.kill()
    assert launcher.returncode == 137, (launcher.returncode, err[-2000:])
    assert "process 1 of 2 exited with code -9" in err, err[-2000:]
    assert _child_pid(run, 0) is None


def test_a_dead_peer_ends_the_survivor_without_a_launcher(tiny_store, tmp_path):
    """Started by hand (no launcher to stop it): JAX's heartbeat ends the survivor with an error."""
    run, port = tmp_path / "r", _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = []
    for i in range(2):
        dist = [
            f"--config.distributed.coordinator=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
        ]
        dist.append("--config.distributed.heartbeat_timeout_s=5")
        args = _train_args(tiny_store, run, **{"train.steps": 100000, "train.log_every": 1})
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "sae_jax.cli", *args, *dist],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        _wait_for_step(run, procs[0])
        procs[1].kill()
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0 and elapsed < 60, (procs[0].returncode, elapsed)
    assert "unhealthy" in err or "died" in err or "Connection" in err, err[-3000:]


@pytest.mark.parametrize("n", [1, 3])
def test_local_launcher_dry_run(n):
    r = subprocess.run(
        [*LAUNCH, "-n", str(n), "-d", "2", "--port", "4321", "--dry-run", "--", "sae-jax", "train", "--config.train.steps=5"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == n
    for i, line in enumerate(lines):
        assert line.startswith("XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1 ")
        assert (
            f" -m sae_jax.cli train --config.train.steps=5 --config.distributed.coordinator=localhost:4321 --config.distributed.num_processes={n} --config.distributed.process_id={i}"
            in line
        )


def test_sigterm_saves_every_process_at_one_step(tiny_store, tmp_path):
    """A preemption: SIGTERM to the launcher reaches both processes, which agree on a step
    through JAX's preemption sync point, save it together and exit 143, each saying so in one line."""
    import re

    run = tmp_path / "r"
    args = _train_args(tiny_store, run, **{"train.steps": 100000, "train.log_every": 1, "train.checkpoint_every": 100000})
    launcher = subprocess.Popen(
        [*LAUNCH, "-n", "2", "-d", "4", "--", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_step(run, launcher)
        launcher.send_signal(signal.SIGTERM)
        out, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 143, out[-2000:] + err[-2000:]  # 128 + SIGTERM: stopped, not finished
    saved = {int(s) for s in re.findall(r"\[p[01]\] sae-jax train: interrupted at step (\d+) of 100000: saved", out)}
    assert len(saved) == 1 and len(re.findall(r"interrupted at step", out)) == 2, out[-3000:]
    step = saved.pop()
    assert sorted(p.name for p in (run / "checkpoints" / str(step) / "data").glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    assert open_run(run).step == step
