"""sae_jax.hostmem: freed memory stays mapped, so a jitted step's scratch is not zero-filled again."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

# a jitted function whose scratch (the 64 MiB [4096, 4096] product) is well above glibc's mmap threshold
PROBE = """
import resource, statistics, sys
if sys.argv[1] == "keep":
    from sae_jax.hostmem import keep_freed_memory
    assert keep_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 256))
f = jax.jit(lambda x: jax.lax.top_k(x @ x.T, 4)[0].sum())
for _ in range(5):
    f(x).block_until_ready()
faults = []
for _ in range(15):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(statistics.median(faults))
"""


def _faults(mode: str) -> float:
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return float(r.stdout.strip().splitlines()[-1])


@pytest.mark.heavy
def test_freed_scratch_is_reused_not_faulted_in_again():
    """Page faults of the median call, after 5 warm-up calls: by default every call maps its 64
    MiB scratch afresh (16,416 faults, every call); with `keep_freed_memory` the typical call
    reuses the pages (0). Now and then a call's scratch is taken before the last one's is freed
    and the heap grows by one scratch (measured: 0-2 of 20 calls, faulting 16k), hence the
    median and not the mean."""
    plain, kept = _faults("plain"), _faults("keep")
    assert plain > 8000, plain  # 64 MiB is 16,384 pages: the default really faults them in
    assert kept < 1000, (kept, plain)


def test_train_and_demo_keep_freed_memory(monkeypatch):
    """`sae-jax train` and `sae-jax demo` set it before jax starts (here: their --help)."""
    from sae_jax import cli, hostmem

    calls = []
    monkeypatch.setattr(hostmem, "keep_freed_memory", lambda: calls.append(1) or True)
    for cmd in ("train", "demo", "eval"):
        try:
            cli.main(["sae-jax", cmd, "--help"])
        except SystemExit:
            pass
    assert len(calls) == 2
