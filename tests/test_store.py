"""Harvest into a store: content, statistics, atomicity, and bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from sae_jax.data import store as st
from sae_jax.data.contexts import EmptyCorpusError, contexts
from sae_jax.data.text import documents
from sae_jax.harvest import HarvestError, harvest
from sae_jax.model.hooks import HookError, parse_hooks

HOOKS = ["blocks.1.hook_resid_post", "blocks.1.attn.hook_z"]
quiet = {"log": lambda *a: None}


def test_manifest_contract(tiny_store):
    m = tiny_store.manifest
    assert m["complete"] and m["format"] == st.FORMAT
    assert list(m["hooks"]) == HOOKS
    assert m["hooks"]["blocks.1.attn.hook_z"]["width"] == 9 * 64
    assert m["dtype"] == "bfloat16" and m["rows_per_record"] == 128 and m["ctx_len"] == 64
    assert m["model"]["digest"].startswith("sha256:") and m["model"]["architecture"] == "LlamaForCausalLM"
    assert m["source"]["source"] == "embedded"
    assert m["forward"] == {"batch": 8, "ctx_len": 64}
    # 4000 tokens / 63 per context -> 64 contexts in shards of 16
    assert m["contexts"] == 64 and len(m["shards"]) == 4
    assert [s["contexts"] for s in m["shards"]] == [[0, 16], [16, 32], [32, 48], [48, 64]]
    for s in m["shards"]:
        assert s["rows"] == s["records"] * 128
        assert set(s["files"]) == {"tokens", "stats", *HOOKS}
        for f in s["files"].values():
            assert len(f["sha256"]) == 64 and f["bytes"] > 0
    assert tiny_store.verify() == []


def test_rows_are_the_model_activations(tiny_store, lm):
    """Each stored row is the model's activation at its (context, position), in bf16; BOS excluded."""
    toks = tiny_store.read_all("tokens")
    assert len(toks) == tiny_store.n_rows
    assert not np.isin(toks[:, 0], sorted(lm.special_ids)).any()
    assert (toks[:, 2] > 0).all()  # position 0 holds BOS
    # every (context, position) at most once
    assert len({(c, p) for _, c, p in toks}) == len(toks)
    # recompute the contexts and the activations of the first 16
    c = tiny_config("x")
    ctxs = np.stack(list(contexts(documents("embedded"), lm.tokenizer, 64, lm.bos_id, lm.eos_id, c.data.shuffle_window, c.data.seed)))[:64]
    np.testing.assert_array_equal(ctxs[toks[:, 1], toks[:, 2]], toks[:, 0])
    gd, state = nnx.split(lm.model)
    hooks = tuple(parse_hooks(HOOKS))
    _, acts = jax.jit(lambda s, t: nnx.merge(gd, s)(t, hooks, logits=False))(state, jnp.asarray(ctxs[:16]))
    sel = toks[:, 1] < 16
    for h in HOOKS:
        stored = tiny_store.read_all(h)[sel].astype(np.float32)
        want = np.asarray(acts[h])[toks[sel, 1], toks[sel, 2]].astype(ml_dtypes.bfloat16).astype(np.float32)
        # the harvest ran in batches of 8, this in one batch of 16: XLA's f32 sums may differ in
        # the last bit before the cast, which bf16 rounding turns into at most one bf16 ulp.
        np.testing.assert_allclose(stored, want, rtol=2**-7, atol=1e-6)
        assert (stored == want).mean() > 0.99


def test_rows_are_shuffled_across_contexts(tiny_store):
    toks = tiny_store.read_all("tokens")
    first = toks[: tiny_store.rows_per_record]  # the first record
    assert len(np.unique(first[:, 1])) >= 12  # of the 16 contexts in its shard
    assert not (np.diff(first[:, 2]) == 1).all()


def test_statistics_match_the_rows(tiny_store):
    for h in HOOKS:
        x = tiny_store.read_all(h).astype(np.float64)
        meta = tiny_store.hooks[h]
        np.testing.assert_allclose(meta["mean"], x.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(meta["mean_sq_norm"], (x**2).sum(1).mean(), rtol=1e-9)


def test_float32_store(tmp_path, lm):
    s = harvest(tiny_config(tmp_path / "f32", **{"harvest.dtype": "float32", "harvest.tokens": 1000}), lm=lm, **quiet)
    assert s.dtype == np.float32 and s.read_all(HOOKS[0]).dtype == np.float32


def test_rerun_of_complete_store_is_a_noop(tiny_store, lm):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_store.root.iterdir()}
    harvest(tiny_config(tiny_store.root), lm=lm, **quiet)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_store.root.iterdir()} == before


def _copy(store, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(store.root, dst)
    return dst


def test_corrupted_shard_is_named(tiny_store, tmp_path):
    d = _copy(tiny_store, tmp_path)
    f = d / "shard-00002.blocks.1.attn.hook_z.array_record"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    problems = st.open_store(d).verify()
    assert problems == [f"{f}: checksum mismatch (the file is corrupted)"]
    with pytest.raises(st.StoreError, match=r"shard-00002\.blocks\.1\.attn\.hook_z\.array_record: checksum mismatch"):
        st.open_store(d, verify=True)


def test_truncated_shard_is_named(tiny_store, tmp_path):
    d = _copy(tiny_store, tmp_path)
    f = d / "shard-00001.tokens.array_record"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(st.StoreError, match=r"shard-00001\.tokens\.array_record: \d+ bytes, the manifest says \d+ \(truncated"):
        st.open_store(d)


def test_manifest_disagreeing_with_shards(tiny_store, tmp_path):
    d = _copy(tiny_store, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][0]["records"] += 1
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(st.StoreError, match=r"shard-00000\.tokens\.array_record: holds \d+ records, the manifest says"):
        st.open_store(d)
    m["shards"][0]["records"] -= 1
    m["hooks"][HOOKS[0]]["mean_sq_norm"] *= 1.01
    (d / "manifest.json").write_text(json.dumps(m))
    assert any("statistics disagree" in p for p in st.open_store(d).verify())
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(st.StoreError, match="manifest.json: invalid JSON"):
        st.open_store(d)
    (d / "manifest.json").unlink()
    with pytest.raises(st.StoreError, match="not an activation store"):
        st.open_store(d)


def test_refuses_a_different_store(tiny_store, tmp_path, lm):
    d = _copy(tiny_store, tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(st.StoreError, match=r"already holds a different store \(settings differ: data.ctx_len, harvest.tokens\)"):
        harvest(tiny_config(d, **{"data.ctx_len": 32, "harvest.tokens": 100}), lm=lm, **quiet)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_refuses_a_directory_with_other_files(tmp_path, lm):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(st.StoreError, match="holds files but no manifest.json"):
        harvest(tiny_config(d), lm=lm, **quiet)
    assert [p.name for p in d.iterdir()] == ["notes.txt"]


def test_bad_settings(tmp_path, lm):
    with pytest.raises(HookError, match="unknown hook name 'blocks.1.hook_resid'"):
        harvest(tiny_config(tmp_path / "a", **{"harvest.hooks": "blocks.1.hook_resid"}), lm=lm, **quiet)
    with pytest.raises(HookError, match="layer 31 is out of range"):
        harvest(tiny_config(tmp_path / "b", **{"harvest.hooks": "blocks.31.hook_mlp_out"}), lm=lm, **quiet)
    with pytest.raises(HarvestError, match="harvest.dtype='int8'"):
        harvest(tiny_config(tmp_path / "c", **{"harvest.dtype": "int8"}), lm=lm, **quiet)
    for name in "abc":
        assert not (tmp_path / name).exists()


def test_empty_corpus(tmp_path, lm):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(EmptyCorpusError, match="not even one context"):
        harvest(tiny_config(tmp_path / "out", **{"data.source": "text", "data.path": str(tmp_path / "empty.txt")}), lm=lm, **quiet)
    assert not (tmp_path / "out").exists()


def test_outlier_rows_are_left_out_for_all_hooks():
    from sae_jax.harvest import outlier_rows

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 8, 16)).astype(np.float32)
    b = rng.normal(size=(4, 8, 32)).astype(np.float32)
    a[1, 3] *= 50  # squared norm 2500x: an attention-sink-like row in hook a only
    b[2, 5] *= 5  # 25x: a heavy but ordinary row
    ci, pi = np.nonzero(np.ones((4, 8), bool))
    bad = outlier_rows({"a": a, "b": b}, ci, pi, 100.0)
    assert [(int(c), int(p)) for c, p in zip(ci[bad], pi[bad])] == [(1, 3)]
    assert not outlier_rows({"a": a, "b": b}, ci, pi, 0).any()


def test_store_has_no_sink_rows(tiny_store):
    m = tiny_store.manifest
    assert m["outlier_ratio"] == 100.0
    for shard in m["shards"]:
        assert shard["rows_outliers"] >= 0
    for h in HOOKS:
        x = tiny_store.read_all(h).astype(np.float32)
        sq = (x**2).sum(1)
        assert sq.max() <= 100 * np.median(sq) * 1.5  # the per-shard medians differ a little from the global one


def test_crash_between_rename_and_manifest_update(tiny_store, tmp_path, lm):
    """Killed after a shard's files were renamed but before the manifest listed it, with another
    shard half-written under a temporary name: the rerun rewrites both and ends identical."""
    d = _copy(tiny_store, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["shards"] = m["shards"][:2]
    m["complete"] = False
    (d / "manifest.json").write_text(json.dumps(m))
    (d / ".tmp-shard-00003.tokens.array_record").write_bytes(b"half a shard")
    stale = d / "shard-00002.blocks.1.attn.hook_z.array_record"
    stale.write_bytes(stale.read_bytes()[:1000])  # an unlisted file is never trusted
    s = harvest(tiny_config(d), lm=lm, **quiet)
    assert [sh["files"] for sh in s.shards] == [sh["files"] for sh in tiny_store.shards]
    assert s.manifest["hooks"] == tiny_store.manifest["hooks"]
    assert not list(d.glob(".tmp-*"))
