"""`sae-jax train` end to end: a real process killed with SIGKILL resumes bit-identically."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, run_cli

pytestmark = [pytest.mark.slow]

STEPS = 40


def _args(store, run, **kw):
    c = {
        "train.store": str(store.root),
        "train.run_dir": str(run),
        "train.widths": "64,128",
        "train.ks": "4",
        "train.batch_size": 256,
        "train.steps": STEPS,
        "train.checkpoint_every": 4,
        "train.log_every": 4,
        "train.warmup_steps": 5,
        "train.dead_tokens": 2048,
        "train.progress": False,
    }
    c.update(kw)
    return [f"--config.{k}={v}" for k, v in c.items()]


def _final_params(run):
    mngr = ocp.CheckpointManager((run / "checkpoints").absolute(), item_names=("state", "data"))
    step = mngr.latest_step()
    st = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mngr.close()
    out = {k: np.asarray(v) for k, v in st["params"].items()}
    if "threshold_ema" in st:  # BatchTopK's running threshold is state too
        out["threshold_ema"] = np.asarray(st["threshold_ema"])
    # Adam's moments (the matrices' in bfloat16 by default: train.optimizer_state)
    for path, leaf in jax.tree_util.tree_flatten_with_path(st["opt_state"])[0]:
        out["opt_state" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return step, out


def _steps_logged(run):
    try:
        return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


# a BatchTopK Matryoshka skip transcoder (attn z -> resid_post) and a JumpReLU bank with two L0 coefficients
TRANSCODER = {
    "train.architecture": "batchtopk",
    "train.hooks": "blocks.1.attn.hook_z",
    "train.out_hooks": "blocks.1.hook_resid_post",
    "train.skip": True,
    "train.matryoshka_prefixes": "16,32",
}
JUMPRELU = {"train.architecture": "jumprelu", "train.l0_coefs": "0.01,0.03"}
RESAMPLE = {"train.resample_tokens": 1024}  # dead latents resampled every 4 steps, up to step 32


@pytest.mark.parametrize(
    "devices,mesh,arch",
    [(1, (1, 1), {}), (8, (4, 2), RESAMPLE), (8, (4, 2), TRANSCODER), (1, (1, 1), JUMPRELU)],
    ids=["topk-1", "topk-resample-4x2", "transcoder-batchtopk-matryoshka-4x2", "jumprelu-1"],
)
def test_sigkill_resume_is_bit_identical(tiny_store, tmp_path, devices, mesh, arch):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    extra = {"train.mesh_data": mesh[0], "train.mesh_model": mesh[1], **arch}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    r = run_cli("train", *_args(tiny_store, ref, **extra), env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FVU" in r.stdout and "curves.png" in r.stdout
    for f in ("curves.png", "latent_density.png", "latent_density.npz", "members.json", "config.json"):
        assert (ref / f).is_file(), f
    assert list((ref / "tb").glob("events.out.tfevents.*"))
    recs = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(4, STEPS + 1, 4))
    if arch is RESAMPLE:  # latents were resampled (before steps 4, 8, ..., 28), none once the lr decays
        assert sum(sum(r["resampled"]) for r in recs) > 0 and all(sum(r["resampled"]) == 0 for r in recs if r["step"] > 32)

    p = subprocess.Popen(
        [sys.executable, "-m", "sae_jax.cli", "train", *_args(tiny_store, killed, **extra)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = random.Random().randrange(8, STEPS - 8)
    deadline = time.time() + 300
    while (max(_steps_logged(killed), default=0) < target) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "training finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = run_cli("train", *_args(tiny_store, killed, **extra), env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step" in r.stdout + r.stderr

    s_ref, p_ref = _final_params(ref)
    s_k, p_k = _final_params(killed)
    assert s_ref == s_k == STEPS
    assert p_ref.keys() == p_k.keys()
    lean = [k for k in p_ref if k.startswith("opt_state") and "W_enc" in k]
    assert lean and all(p_ref[k].dtype.name == "bfloat16" for k in lean), {k: p_ref[k].dtype for k in lean}
    for k in p_ref:
        np.testing.assert_array_equal(p_ref[k], p_k[k], err_msg=k)


def test_train_bad_input(tiny_store, tmp_path):
    r = run_cli("train", *_args(tiny_store, tmp_path / "a", **{"train.ks": "65"}))
    assert r.returncode == 1 and "train.ks='65': every k must be between 1 and the smallest width (64)" in r.stderr
    r = run_cli("train", *_args(tiny_store, tmp_path / "b", **{"train.hooks": "blocks.5.hook_mlp_out"}))
    assert r.returncode == 1 and "hook 'blocks.5.hook_mlp_out' is not in this store" in r.stderr
    r = run_cli("train", *_args(tiny_store, tmp_path / "c", **{"train.batch_sise": 3}))
    assert r.returncode == 1 and "--config.train.batch_sise: no such setting; did you mean train.batch_size?" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_cli("train", *_args(tiny_store, blocker / "run"))
    assert r.returncode == 1 and "is not writable" in r.stderr
    r = run_cli("train", *_args(tiny_store, tmp_path / "d", **{"train.mesh_data": 3, "train.mesh_model": 2}))
    assert r.returncode == 1 and "train.mesh_data=3 x train.mesh_model=2 = 6 devices, there are 8" in r.stderr


def _poison(store, hook, tmp_path):
    """A copy of the store whose `hook` rows are all NaN (checksums updated: a valid store)."""
    import shutil

    from sae_jax.data import store as st

    d = tmp_path / "nan_store"
    shutil.copytree(store.root, d)
    m = json.loads((d / "manifest.json").read_text())
    for s in m["shards"]:
        rows = np.full((s["rows"], store.width(hook)), np.nan, dtype=store.dtype)
        tmp = tmp_path / "tmpshard"
        tmp.mkdir(exist_ok=True)
        e = st.write_shard(tmp, s["index"], {hook: rows}, np.zeros((s["rows"], 3), np.int32), {}, store.rows_per_record)
        shutil.move(tmp / e["files"][hook]["name"], d / e["files"][hook]["name"])
        s["files"][hook] = e["files"][hook]
    (d / "manifest.json").write_text(json.dumps(m))
    return st.open_store(d, verify=True)


def test_nan_batches_are_skipped_then_stop(tiny_store, tmp_path):
    bad = _poison(tiny_store, "blocks.1.hook_resid_post", tmp_path)
    run = tmp_path / "run"
    r = run_cli("train", *_args(bad, run, **{"train.hooks": "blocks.1.hook_resid_post", "train.max_nan_streak": 3}))
    assert r.returncode == 1 and "batches in a row gave non-finite loss or gradients" in r.stderr, r.stderr[-2000:]
    step, params = _final_params(run)
    assert step < 4  # the stop comes before step 4 is saved; earlier checkpoints stay
    for k, v in params.items():
        assert np.isfinite(v).all(), k
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["nan_skips"] == 4 and rec["finite"] is False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_exits_non_zero_then_resumes_bit_identical(tiny_store, tmp_path, sig):
    """Ctrl-C (SIGINT) or SIGTERM at a random step: the step is saved, one line says so, the exit
    status is 128 + the signal (so `train && eval` stops), and the same command resumes to the
    parameters of an uninterrupted run, bit for bit. Then two Ctrl-Cs in a row: the run stops at
    once, and resumes from its last complete checkpoint to the same parameters."""
    import random

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    # long enough that the signal lands mid-run (tiny steps take milliseconds)
    extra = {"train.mesh_data": 1, "train.mesh_model": 1, "train.checkpoint_every": 10, "train.steps": 150}
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert run_cli("train", *_args(tiny_store, ref, **extra), env=env, timeout=600).returncode == 0
    _, want = _final_params(ref)

    def start():
        return subprocess.Popen(
            [sys.executable, "-m", "sae_jax.cli", "train", *_args(tiny_store, run, **extra)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_for(p, step):
        deadline = time.time() + 300
        while max(_steps_logged(run), default=0) < step and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert p.poll() is None, "training finished before the signal"

    at = random.Random().randint(12, 60)
    p = start()
    wait_for(p, at)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, (p.returncode, err[-2000:])
    m = re.search(r"sae-jax train: interrupted at step (\d+) of 150: saved; run the same command to continue", err)
    assert m and "Traceback" not in err, err[-2000:]
    saved, _ = _final_params(run)
    assert saved == int(m.group(1)) and at <= saved < 150  # the step it stopped at, not a checkpoint_every multiple
    # two Ctrl-Cs: out at once; what was saved last stays readable
    p = start()
    wait_for(p, saved + 5)
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    r = run_cli("train", *_args(tiny_store, run, **extra), env=env, timeout=600)
    assert r.returncode == 0 and "resumed from step" in r.stdout + r.stderr, r.stderr[-2000:]
    _, got = _final_params(run)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k], err_msg=k)


def test_auto_encoder_dtype_is_recorded_when_a_run_begins_and_kept_on_resume(tmp_path, monkeypatch):
    """`encoder_dtype: auto` on a CPU is a timing, which another process may see otherwise: the
    run's config.json records the first choice, a resume on the same platform keeps it whatever
    its own timing says, the identity is untouched, and a process other than 0 reads the record."""
    from sae_jax.kernels import topk
    from sae_jax.train import loop
    from sae_jax.train.settings import TrainSettings

    s = TrainSettings.defaults()
    assert s.encoder_dtype == "auto"
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"train_identity": s.identity(), "config": {}}))
    with pytest.raises(loop.TrainError, match="encoder_dtype_auto"):
        loop._auto_encoder_dtype(cfg, s, write=False)
    logged = []
    monkeypatch.setattr(topk, "host_bf16_faster", lambda: True)
    assert loop._auto_encoder_dtype(cfg, s, logged.append) == "bfloat16"
    assert "measured on this CPU" in logged[-1]
    saved = json.loads(cfg.read_text())
    assert saved[loop.AUTO_DTYPE_KEY] == {"platform": "cpu", "dtype": "bfloat16"}
    assert TrainSettings.canonical_identity(saved["train_identity"]) == s.identity()
    monkeypatch.setattr(topk, "host_bf16_faster", lambda: False)
    assert topk.resolve_encoder_dtype("auto") == "float32"  # a fresh timing would say otherwise now
    assert loop._auto_encoder_dtype(cfg, s, logged.append) == "bfloat16"
    assert "as this run chose when it began" in logged[-1]
    assert loop._auto_encoder_dtype(cfg, s, write=False) == "bfloat16"
    assert loop._auto_encoder_dtype(cfg, s.replace(encoder_dtype="float32")) is None  # a named dtype is used as named
    # a run begun on another platform is measured again here, and the record follows
    saved[loop.AUTO_DTYPE_KEY] = {"platform": "gpu", "dtype": "bfloat16"}
    cfg.write_text(json.dumps(saved))
    assert loop._auto_encoder_dtype(cfg, s, logged.append) == "float32"
    assert json.loads(cfg.read_text())[loop.AUTO_DTYPE_KEY] == {"platform": "cpu", "dtype": "float32"}
    assert not list(tmp_path.glob("*.tmp"))
