"""The run's metric writer: what it records per log step."""

import json
import time

import jax
import jax.numpy as jnp

from sae_jax.train.metrics import MetricsWriter


@jax.jit
def _slow(x):
    """Seconds of matmuls on the device, dispatched asynchronously like a train step; returns x."""
    a = jnp.ones((1024, 1024), jnp.float32) * x[0] * 1e-3
    a = jax.lax.fori_loop(0, 200, lambda _, a: jnp.tanh(a @ a), a)
    return x + 0 * a[0, :1]


def test_tokens_per_second_counts_the_steps_not_their_dispatch(tmp_path):
    _slow(jnp.ones((1,))).block_until_ready()  # compiled
    w = MetricsWriter(tmp_path, ["m"], steps=2, start=0, batch_size=1000, progress=False)
    t0 = time.perf_counter()
    metrics = {"fvu": _slow(jnp.ones((1,))), "l0": jnp.ones((1,))}
    dispatched = time.perf_counter() - t0
    state = {"nan_skips": jnp.zeros((), jnp.int32), "nan_streak": jnp.zeros((), jnp.int32)}
    rec = w.log(2, metrics, state)
    wall = time.perf_counter() - t0
    w.close()
    assert dispatched < wall / 4, (dispatched, wall)  # the work ran after the call returned
    assert rec["tok_s"] <= 2 * 1000 / (0.9 * wall), (rec["tok_s"], wall)  # the rate of the whole wait, not the dispatch
    assert rec["tokens"] == 2000 and rec["nan_streak"] == 0 and rec["fvu"] == [1.0]
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert line == rec
    assert any((tmp_path / "tb").iterdir())  # TensorBoard events written
