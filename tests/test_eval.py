"""`sae-jax eval`: metrics against independent numpy computations, splicing checked with a
dictionary that reconstructs exactly, and the inputs it must refuse."""

import json
import shutil

import numpy as np
import pytest
from conftest import run_cli


def _dense_topk(p, x, k):
    pre = (x.astype(np.float64) - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    acts = np.maximum(pre, 0)
    thr = -np.sort(-acts, axis=1)[:, k - 1 : k]
    acts = np.where(acts >= thr, acts, 0)
    return acts, acts @ p["W_dec"] + p["b_dec"]


def test_reconstruction_metrics_match_numpy(tiny_run, tiny_store):
    from sae_jax.eval.core import reconstruction_metrics
    from sae_jax.eval.inputs import heldout_rows
    from sae_jax.runs import open_run

    run = open_run(tiny_run)
    m = 1
    mem = run.members[m]
    x, where = heldout_rows(run, tiny_store, mem.hook, 10_000)
    # the held-out rows are exactly the store's last shard
    last = tiny_store.shards[-1]["records"] * tiny_store.rows_per_record
    np.testing.assert_array_equal(x, tiny_store.read_all(mem.hook)[-last:].astype(np.float32))
    assert "held out" in where
    p = run.folded(m)
    r = reconstruction_metrics(p, x, mem.k)
    acts, x_hat = _dense_topk(p, x, mem.k)
    err = x - x_hat
    fvu = np.sum(err**2) / np.sum((x - x.mean(0)) ** 2)
    assert r["latents"]["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert r["reconstruction_quality"]["explained_variance"] == pytest.approx(1 - fvu, rel=1e-4)
    assert r["reconstruction_quality"]["mse"] == pytest.approx(np.mean(err**2), rel=1e-4)
    cos = np.sum(x * x_hat, 1) / np.linalg.norm(x, axis=1) / np.linalg.norm(x_hat, axis=1)
    assert r["reconstruction_quality"]["cossim"] == pytest.approx(cos.mean(), rel=1e-4)
    assert r["shrinkage"]["l2_ratio"] == pytest.approx(np.mean(np.linalg.norm(x_hat, axis=1) / np.linalg.norm(x, axis=1)), rel=1e-4)
    assert r["sparsity"]["l0"] == pytest.approx(np.mean(np.sum(acts > 0, 1)), rel=1e-6)
    assert r["sparsity"]["l1"] == pytest.approx(np.mean(acts.sum(1)), rel=1e-4)
    density = np.mean(acts > 0, 0)
    assert r["latents"]["dead_frac"] == pytest.approx(np.mean(density == 0))
    assert r["latents"]["freq_over_1_percent"] == pytest.approx(np.mean(density > 0.01))
    assert sum(r["latents"]["density_log10_hist"]["counts"]) == np.sum(density > 0)


@pytest.mark.slow
def test_splice_with_an_exact_dictionary_recovers_all_the_loss(lm, tiny_run):
    """W_enc = [I, -I], W_dec = [I; -I], k = d: x_hat == x, so CE with the dictionary equals clean
    CE (score 1, KL 0) while zero-ablating the same positions hurts; BOS stays clean."""
    from sae_jax.eval.core import downstream_metrics
    from sae_jax.eval.inputs import text_contexts
    from sae_jax.runs import open_run

    meta = open_run(tiny_run).store_meta
    ctx = text_contexts(meta, lm, 6, "heldout")
    assert ctx.shape == (6, 64) and (ctx[:, 0] == lm.bos_id).all()
    d = lm.cfg.d_model
    eye = np.eye(d, dtype=np.float32)
    p = {
        "W_enc": np.concatenate([eye, -eye], 1),
        "b_enc": np.zeros(2 * d, np.float32),
        "W_dec": np.concatenate([eye, -eye], 0),
        "b_dec": np.zeros(d, np.float32),
    }
    r = downstream_metrics(lm, p, "blocks.3.hook_resid_post", d, ctx, 4, outlier_ratio=100.0)
    ce, kl = r["model_performance_preservation"], r["model_behavior_preservation"]
    assert ce["ce_loss_with_sae"] == pytest.approx(ce["ce_loss_without_sae"], abs=1e-3)
    assert ce["ce_loss_score"] == pytest.approx(1.0, abs=1e-3)
    assert kl["kl_div_with_sae"] < 1e-4 and kl["kl_div_score"] == pytest.approx(1.0, abs=1e-3)
    assert ce["ce_loss_with_ablation"] > ce["ce_loss_without_sae"] + 1.0
    stats = r["token_stats"]
    assert stats["total_tokens_eval_reconstruction"] == 6 * 63
    assert stats["positions"] == 6 * 64 and stats["spliced_positions"] <= 6 * 63  # BOS never spliced


@pytest.mark.slow
def test_eval_cli_report(tiny_run, tmp_path):
    out = tmp_path / "report"
    r = run_cli("eval", str(tiny_run), "--contexts", "4", "--batch-size", "4", "--tokens", "500", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "eval.json").read_text())
    assert len(rep["members"]) == 8 and rep["finished"]
    for name, m in rep["members"].items():
        for section, keys in {
            "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
            "model_performance_preservation": ("ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae"),
            "reconstruction_quality": ("explained_variance", "mse", "cossim"),
            "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
            "sparsity": ("l0", "l1"),
            "token_stats": ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"),
        }.items():
            assert all(np.isfinite(m[section][k]) for k in keys), (name, section)
        assert m["token_stats"]["total_tokens_eval_sparsity_variance"] == 500
        assert m["sparsity"]["l0"] <= m["k"]
        # a trained dictionary beats zero ablation
        assert m["model_performance_preservation"]["ce_loss_with_sae"] < m["model_performance_preservation"]["ce_loss_with_ablation"]
    assert "| member | FVU" in r.stdout and (out / "eval.md").is_file()
    one = next(iter(rep["members"]))
    r = run_cli(
        "eval", str(tiny_run), "--member", one, "--contexts", "2", "--batch-size", "2", "--tokens", "300", "--out", str(tmp_path / "one")
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(json.loads((tmp_path / "one" / "eval.json").read_text())["members"]) == [one]
    r = run_cli("eval", str(tiny_run), "--member", "nope", "--out", str(tmp_path / "none"))
    assert r.returncode == 1 and "nope" in r.stderr and "members:" in r.stderr


@pytest.mark.slow
def test_eval_refuses_another_models_store_and_training_rows(tiny_run, tiny_store, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_store.root, other)
    man = json.loads((other / "manifest.json").read_text())
    man["model"]["digest"] = "sha256:" + "0" * 64
    man["model"]["name"] = "another-model"
    (other / "manifest.json").write_text(json.dumps(man))
    r = run_cli("eval", str(tiny_run), "--store", str(other), "--contexts", "2", "--out", str(tmp_path / "r"))
    assert r.returncode == 1 and "another-model" in r.stderr and "trained on" in r.stderr

    r = run_cli("eval", str(tiny_run), "--split", "train", "--contexts", "2", "--out", str(tmp_path / "r"))
    assert r.returncode == 1 and "held-out split" in r.stderr

    r = run_cli("eval", str(tmp_path / "missing"))
    assert r.returncode == 1 and "missing" in r.stderr
    r = run_cli("eval", str(tiny_run), "--tokens", "lots")
    assert r.returncode == 2 and "--tokens" in r.stderr


def test_eval_without_held_out_shards_is_refused(tiny_store, tmp_path):
    from sae_jax.eval.errors import EvalError
    from sae_jax.eval.inputs import heldout_rows
    from sae_jax.runs import Run

    meta = {"store": {"root": str(tiny_store.root), "model": tiny_store.manifest["model"], "train_records": [0, tiny_store.n_records]}}
    run = Run(tmp_path, meta, {}, 1, 1, [], {})
    with pytest.raises(EvalError, match="holdout_shards=0"):
        heldout_rows(run, tiny_store, "blocks.1.hook_resid_post", 100)


@pytest.mark.parametrize("k", [3, 40])  # a gather (3 of 64 latents) and the dense path (40: a large cap)
@pytest.mark.parametrize("blocked", [False, True])
def test_decode_paths_match_numpy(k, blocked, monkeypatch):
    """`folded.decode` equals sum_j v[n, j] W_dec[i[n, j]] + b_dec on every path: one gather, a
    gather in blocks of slots (a cap too large to gather at once; padded zero slots add nothing),
    and the dense [N, w] @ W_dec at a cap that is a large share of the width."""
    import jax.numpy as jnp

    from sae_jax.sae import folded

    rng = np.random.default_rng(k)
    n, w, d = 37, 64, 16
    p = {"W_dec": rng.normal(size=(w, d)).astype(np.float32), "b_dec": rng.normal(size=d).astype(np.float32)}
    idx = np.argsort(rng.random((n, w)), axis=1)[:, :k].astype(np.int32)  # distinct latents per row
    val = np.maximum(rng.normal(size=(n, k)), 0).astype(np.float32)  # some slots inactive (0)
    want = np.einsum("nk,nkd->nd", val.astype(np.float64), p["W_dec"][idx].astype(np.float64)) + p["b_dec"]
    if blocked:  # blocks of 2 slots; the dense path needs a cap of at least w / DENSE_SHARE
        monkeypatch.setattr(folded, "GATHER_BYTES", 2 * n * d * 4)
        monkeypatch.setattr(folded, "DENSE_SHARE", 1)
    got = folded.decode({key: jnp.asarray(a) for key, a in p.items()}, jnp.asarray(val), jnp.asarray(idx))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_decode_at_a_large_cap_holds_no_gathered_block():
    """A ReLU-type dictionary decoded at a cap of its whole width (eval_k up to w): the compiled
    decode's temporaries stay within a few [N, w] codes matrices (4 MiB here: 16 MiB measured, the
    codes and the scatter's indices), far below the [N, k, d] gather it replaced (1 GiB)."""
    import jax
    import jax.numpy as jnp

    from sae_jax.sae import folded

    n, w, d = 1024, 1024, 256
    p = {"W_dec": jax.ShapeDtypeStruct((w, d), jnp.float32), "b_dec": jax.ShapeDtypeStruct((d,), jnp.float32)}
    v, i = jax.ShapeDtypeStruct((n, w), jnp.float32), jax.ShapeDtypeStruct((n, w), jnp.int32)
    mem = jax.jit(folded.decode).lower(p, v, i).compile().memory_analysis()
    codes, gather = n * w * 4, n * w * d * 4
    assert mem.temp_size_in_bytes <= 8 * codes, (mem.temp_size_in_bytes, codes, gather)


def test_names_and_the_store_are_checked_before_the_model_loads(tiny_run, tiny_store, tmp_path, monkeypatch):
    """An unknown member, or a store of another model, is refused before any weight is read."""
    import shutil

    from sae_jax.eval import core
    from sae_jax.eval.errors import EvalError

    monkeypatch.setattr(core, "load_run_model", lambda *a, **k: pytest.fail("the model was loaded before the names were checked"))
    with pytest.raises(EvalError, match="no bank member 'nope'"):
        core.evaluate(tiny_run, member="nope")
    other = tmp_path / "other"
    shutil.copytree(tiny_store.root, other)
    m = json.loads((other / "manifest.json").read_text())
    m["model"] = {**m["model"], "name": "another-model", "digest": "f" * 64}
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EvalError, match="a store of model 'another-model'.*evaluate on a store of the same model"):
        core.evaluate(tiny_run, store=str(other))
