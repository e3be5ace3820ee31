"""A real harvest process killed with SIGKILL and restarted ends with the uninterrupted store."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, cli_args, run_cli

pytestmark = [pytest.mark.slow]

ARGS = {"harvest.tokens": 16000, "harvest.seqs_per_shard": 12}


def _shards(root):
    m = json.loads((root / "manifest.json").read_text())
    return m, [(s["contexts"], s["rows"], {k: f["sha256"] for k, f in s["files"].items()}) for s in m["shards"]]


def _listed(root):
    try:
        return len(json.loads((root / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_killed_harvest_resumes_to_identical_store(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    r = run_cli("harvest", *cli_args(ref, **ARGS), timeout=600)
    assert r.returncode == 0, r.stderr
    m_ref, shards_ref = _shards(ref)
    assert len(shards_ref) >= 15

    rng = random.Random()
    kills = 0
    for target in (2, 8):  # kill twice, each time at a random moment after `target` shards landed
        p = subprocess.Popen(
            [sys.executable, "-m", "sae_jax.cli", "harvest", *cli_args(killed, **ARGS)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.time() + 300
        while _listed(killed) < target and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.6))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        m, _ = _shards(killed)
        assert not m["complete"], "the harvest finished before it could be killed; make it longer"
    assert kills == 2

    r = run_cli("harvest", *cli_args(killed, **ARGS), timeout=600)
    assert r.returncode == 0, r.stderr
    m_k, shards_k = _shards(killed)
    assert shards_k == shards_ref
    for key in ("hooks", "rows", "contexts", "fingerprint"):
        assert m_k[key] == m_ref[key], key
    assert not list(killed.glob(".tmp-*"))
    r = run_cli("verify", str(killed))
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
