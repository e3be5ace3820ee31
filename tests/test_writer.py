"""Stores from your own arrays (`StoreWriter`) and SAELens activation caches, both ways."""

import json
import os
import subprocess
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import REPO, run_cli

from sae_jax.data.store import open_store
from sae_jax.data.writer import StoreWriter, WriterError

PEER_PYTHON = Path(os.environ.get("SAE_JAX_PEER_PYTHON", REPO / ".peer-venv" / "bin" / "python"))
BF16 = ml_dtypes.bfloat16


def _rows(n, d, seed):
    return (np.random.default_rng(seed).normal(size=(n, d)) * 4 + 1).astype(np.float32)


def test_store_from_numpy_and_jax_arrays(tmp_path):
    a, b = _rows(1000, 48, 0), _rows(1000, 16, 1)
    out = tmp_path / "s"
    with StoreWriter(out, {"A": 48, "B": 16}, rows_per_record=64, shard_rows=256, seed=3) as w:
        for lo, hi in ((0, 300), (300, 301), (301, 1000)):
            # JAX arrays for one hook, numpy for the other; token ids = the input row
            w.add({"A": jnp.asarray(a[lo:hi]), "B": b[lo:hi]}, tokens=np.arange(lo, hi))
    s = open_store(out, verify=True)  # checksums and statistics agree
    # 3 shards of 256 rows, then the last 232 rows cut to whole records (192) and 40 dropped
    assert [sh["rows"] for sh in s.shards] == [256, 256, 256, 192] and s.manifest["rows_dropped"] == 40
    toks = s.read_all("tokens")
    rows = toks[:, 0]
    assert len(set(rows)) == 960 and set(rows) <= set(range(1000))
    assert not np.array_equal(rows[:256], np.arange(256))  # shuffled within the shard
    assert (toks[:, 1] == toks[:, 0]).all()  # without contexts, each row is its own
    for hook, src in (("A", a), ("B", b)):
        got = s.read_all(hook)
        np.testing.assert_array_equal(got.view(np.uint16), src[rows].astype(BF16).view(np.uint16))
        f = got.astype(np.float64)
        np.testing.assert_allclose(s.hooks[hook]["mean"], f.mean(0), rtol=1e-6, atol=1e-9)
        assert s.hooks[hook]["mean_sq_norm"] == pytest.approx((f**2).sum(1).mean(), rel=1e-9)
    assert s.manifest["complete"] and s.manifest["model"]["name"] == "external"


def test_a_written_store_trains(tmp_path):
    from sae_jax.config import default_config
    from sae_jax.train.loop import train

    out = tmp_path / "s"
    with StoreWriter(out, {"blocks.0.hook_resid_post": 32}, rows_per_record=64, shard_rows=512) as w:
        w.add({"blocks.0.hook_resid_post": _rows(4096, 32, 5)})
    c = default_config()
    t = c.train
    t.store, t.run_dir, t.widths, t.ks, t.batch_size, t.steps, t.progress = str(out), str(tmp_path / "run"), "64", "4", 256, 6, False
    t.log_every, t.mesh_data = 6, 0
    r = train(c, log=lambda *x: None)
    assert r.last["step"] == 6 and 0 < r.last["fvu"][0] < 2


def test_a_store_of_zeros_is_refused_by_train_naming_the_hook(tmp_path):
    """Activations all zero have no unit-norm scale (nor a raw-unit bias rate): train stops
    before any step with an error naming the manifest and the hook, and writes no checkpoint."""
    from sae_jax.config import default_config
    from sae_jax.errors import SaeJaxError
    from sae_jax.train.loop import train

    out = tmp_path / "s"
    with StoreWriter(out, {"blocks.0.hook_resid_post": 32}, rows_per_record=64, shard_rows=512) as w:
        w.add({"blocks.0.hook_resid_post": np.zeros((1024, 32), np.float32)})
    c = default_config()
    t = c.train
    t.store, t.run_dir, t.widths, t.ks, t.batch_size, t.steps, t.progress = str(out), str(tmp_path / "run"), "64", "4", 256, 2, False
    with pytest.raises(SaeJaxError, match=r"manifest.json: hook 'blocks.0.hook_resid_post' has mean squared norm 0.0"):
        train(c, log=lambda *x: None)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_writer_bad_input(tmp_path):
    w = StoreWriter(tmp_path / "s", {"A": 8, "B": 4}, rows_per_record=4, shard_rows=8)
    ok = {"A": np.zeros((4, 8), np.float32), "B": np.zeros((4, 4), np.float32)}
    with pytest.raises(WriterError, match=r"hook 'A': array of shape \(4, 7\), the store's width is 8"):
        w.add({**ok, "A": np.zeros((4, 7), np.float32)})
    with pytest.raises(WriterError, match=r"missing \['B'\]"):
        w.add({"A": ok["A"]})
    with pytest.raises(WriterError, match=r"not in the store: \['C'\]"):
        w.add({**ok, "C": ok["B"]})
    with pytest.raises(WriterError, match="hook 'B': dtype int32 is not floating point"):
        w.add({**ok, "B": np.zeros((4, 4), np.int32)})
    with pytest.raises(WriterError, match="hook 'B' has 3 rows, another hook 4"):
        w.add({**ok, "B": np.zeros((3, 4), np.float32)})
    with pytest.raises(WriterError, match=r"hook 'A': non-finite values \(NaN or Inf\) in rows 0..4"):
        w.add({**ok, "A": np.full((4, 8), np.nan, np.float32)})
    with pytest.raises(WriterError, match=r"tokens of shape \(4, 2\)"):
        w.add(ok, tokens=np.zeros((4, 2), np.int32))
    with pytest.raises(WriterError, match="t already holds other files: remove it or choose another path"):
        (tmp_path / "t").mkdir()
        (tmp_path / "t" / "x").write_text("")
        StoreWriter(tmp_path / "t", {"A": 8})
    with pytest.raises(WriterError, match="fewer than one record of 4"):
        w.add({"A": ok["A"][:2], "B": ok["B"][:2]})
        w.close()
    assert not (tmp_path / "s").exists()
    # an exception inside the block leaves nothing behind, and the fixed script then runs
    with pytest.raises(RuntimeError, match="pipeline broke"):
        with StoreWriter(tmp_path / "u", {"A": 8}, rows_per_record=4, shard_rows=8) as w2:
            w2.add({"A": np.ones((12, 8), np.float32)})
            assert not (tmp_path / "u").exists()  # written beside it, moved there when complete
            raise RuntimeError("pipeline broke")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    with StoreWriter(tmp_path / "u", {"A": 8}, rows_per_record=4, shard_rows=8) as w2:
        w2.add({"A": np.ones((12, 8), np.float32)})
    assert open_store(tmp_path / "u").manifest["complete"]
    with pytest.raises(WriterError, match="u already holds a store: remove it or choose another path"):
        StoreWriter(tmp_path / "u", {"A": 8})
    (tmp_path / "v").mkdir()  # an empty folder is a fine place for a store
    with StoreWriter(tmp_path / "v", {"A": 8}, rows_per_record=4, shard_rows=8) as w3:
        w3.add({"A": np.ones((8, 8), np.float32)})
    assert open_store(tmp_path / "v").manifest["rows"] == 8
    with pytest.raises(WriterError, match="cannot write a store there"):
        StoreWriter(Path("/proc/no-store-here"), {"A": 8})


def _peer(*args):
    assert PEER_PYTHON.exists(), f"{PEER_PYTHON} missing: `make peer-venv` builds the SAELens venv these tests need"
    r = subprocess.run(
        [str(PEER_PYTHON), str(REPO / "tests" / "peers" / "saelens_cache.py"), *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]


HOOK = "blocks.2.hook_resid_post"


@pytest.mark.peers
def test_import_a_cache_saelens_wrote(tmp_path):
    cache = tmp_path / "cache"
    _peer("make", cache, HOOK, 16, 24, 20, 7)  # SAELens's CacheActivationsRunner._create_shard + save_to_disk
    ref = np.load(f"{cache}.npz")
    out = tmp_path / "store"
    r = run_cli("import-cache", str(cache), "--out", str(out), "--dtype", "float32", "--rows-per-record", "32", "--shard-rows", "128")
    assert r.returncode == 0, r.stderr[-3000:]
    s = open_store(out, verify=True)
    assert s.n_rows == 320 and s.width(HOOK) == 24 and s.manifest["ctx_len"] == 16
    toks = s.read_all("tokens")
    ctx, pos = toks[:, 1], toks[:, 2]
    np.testing.assert_array_equal(s.read_all(HOOK), ref["acts"][ctx, pos])  # every row where SAELens put it
    np.testing.assert_array_equal(toks[:, 0], ref["token_ids"][ctx, pos])
    assert len({(c, p) for c, p in zip(ctx, pos)}) == 320


@pytest.mark.peers
def test_export_a_store_saelens_reads(tiny_store, tmp_path):
    out = tmp_path / "cache"
    r = run_cli("export-cache", str(tiny_store.root), "--out", str(out), "--hooks", "blocks.1.hook_resid_post", "--context-size", "64")
    assert r.returncode == 0, r.stderr[-3000:]
    got = tmp_path / "read.npz"
    _peer("read", out, "blocks.1.hook_resid_post", 64, 576, 2, got)  # SAELens's cached-activation loader
    g = np.load(got)
    n = (tiny_store.n_rows // 64) // 2 * 2 * 64  # SAELens reads whole batches of 2 contexts
    want = tiny_store.read_all("blocks.1.hook_resid_post")[:n].astype(np.float32)
    np.testing.assert_array_equal(g["acts"], want)
    np.testing.assert_array_equal(g["token_ids"], tiny_store.read_all("tokens")[:n, 0])


@pytest.mark.peers
def test_cache_bad_input(tiny_store, tmp_path):
    cache = tmp_path / "cache"
    _peer("make", cache, HOOK, 8, 4, 4, 0)
    r = run_cli("import-cache", str(cache), "--out", str(tmp_path / "a"), "--hooks", "blocks.3.hook_resid_post")
    assert (
        r.returncode == 1
        and f"no activation column for hook 'blocks.3.hook_resid_post'; the cache's hook columns are ['{HOOK}']" in r.stderr
    )
    r = run_cli("import-cache", str(cache), "--out", str(tmp_path / "b"), "--hooks", "token_ids")
    assert r.returncode == 1 and "'token_ids' is a column but not an Array2D of activations" in r.stderr
    r = run_cli("import-cache", str(tmp_path / "nope"), "--out", str(tmp_path / "c"))
    assert r.returncode == 1 and "no such directory" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    r = run_cli("export-cache", str(tiny_store.root), "--out", str(tmp_path / "full"))
    assert r.returncode == 1 and "exists and is not empty" in r.stderr
    r = run_cli("export-cache", str(tiny_store.root), "--out", str(tmp_path / "d"), "--hooks", "blocks.9.hook_mlp_out")
    assert r.returncode == 1 and "hook 'blocks.9.hook_mlp_out' is not in this store" in r.stderr


def test_feature_world_fires_at_its_probabilities_and_scores_recovery():
    """benchmarks/recovery.py's ground truth: each feature fires at its marginal rate (solo
    firings plus its group's events), the total is the base rates' total, rows are sums of unit
    features, and a decoder holding the true features recovers all of them."""
    from sae_jax.data.synthetic import FeatureWorld, WorldSpec

    spec = WorldSpec(d_in=64, n_features=256, mean_active=6, skew=0.8, mag_sigma=0.5, corr=0.3, group=4, noise=0.0)
    w = FeatureWorld(spec, seed=3)
    rng = np.random.default_rng(0)
    n = 200_000
    rows, feats = w.firings(n, rng)
    freq = np.bincount(feats, minlength=spec.n_features) / n
    top = slice(0, 32)  # frequent enough that sampling noise is small
    np.testing.assert_allclose(freq[top], w.marginal[top], rtol=0.05)
    assert w.marginal.sum() == pytest.approx(w.probs.sum(), rel=1e-9)  # grouping moves firings, adds none
    assert abs(freq.sum() - w.probs.sum()) / w.probs.sum() < 0.01
    x = w.sample(4096, rng)
    assert x.shape == (4096, 64) and np.isfinite(x).all()
    full = w.recovery(w.features)
    assert full["recovered"] == 1.0 and full["mean_max_cos"] == pytest.approx(1.0, abs=1e-5)
    half = w.recovery(w.features[::2])
    assert half["recovered"] == pytest.approx(0.5, abs=0.01)  # random unit vectors in 64-d are far apart


@pytest.mark.heavy
def test_a_failed_start_writes_nothing_and_blocks_nothing(tmp_path):
    """A start that fails its checks (every shard held out, a batch larger than the store) writes
    nothing; a run directory holding only what a failed start wrote (config.json, no checkpoint)
    does not refuse the corrected command as "another run"; one that saved a step does."""
    from sae_jax.config import default_config
    from sae_jax.errors import SaeJaxError
    from sae_jax.train.loop import train

    out = tmp_path / "s"
    with StoreWriter(out, {"blocks.0.hook_resid_post": 32}, rows_per_record=64, shard_rows=512) as w:
        w.add({"blocks.0.hook_resid_post": _rows(1024, 32, 7)})
    run = tmp_path / "run"

    def config(**kw):
        c = default_config()
        t = c.train
        t.store, t.run_dir, t.widths, t.ks, t.batch_size, t.steps, t.progress = str(out), str(run), "64", "4", 256, 4, False
        t.log_every, t.checkpoint_every = 2, 2
        for k, v in kw.items():
            t[k] = v
        return c

    for bad, says in (({"holdout_shards": 2}, "holdout_shards=2"), ({"batch_size": 4096, "holdout_shards": 0}, "fewer than one batch")):
        with pytest.raises(SaeJaxError, match=says):
            train(config(**bad), log=lambda *x: None)
        assert not run.exists(), bad
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train_identity": {"widths": "999", "steps": 7}, "config": {}}))
    r = train(config(), log=lambda *x: None)  # config.json of a start that never saved a step: replaced
    assert r.last["step"] == 4 and json.loads((run / "config.json").read_text())["train_identity"]["widths"] == "64"
    with pytest.raises(SaeJaxError, match="holds a run with other settings"):
        train(config(widths="128"), log=lambda *x: None)
    # a run written before train.optimizer_state existed trained with float32 moments: today's
    # default is another run, and the refusal says how to continue it
    saved = json.loads((run / "config.json").read_text())
    del saved["train_identity"]["optimizer_state"]
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(SaeJaxError, match="continue that run with its settings: --config.train.optimizer_state=float32"):
        train(config(), log=lambda *x: None)
    r = train(config(optimizer_state="float32"), log=lambda *x: None)  # the same run: already complete
    assert r.last is None and int(r.state["step"]) == 4 and r.state["opt_state"][0].mu["W_enc"].dtype == "float32"
