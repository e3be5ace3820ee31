"""SAELens and sparsify folders opened as runs: eval and atlas compare other trainers' dictionaries."""

import json
import shutil

import numpy as np
import pytest

from sae_jax.data.store import open_store
from sae_jax.export import export_run
from sae_jax.foreign import kind, open_dictionaries
from sae_jax.runs import RunError, open_run


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    run = open_run(tiny_run)
    out = tmp_path_factory.mktemp("foreign")
    return run, {fmt: export_run(run, fmt, out / fmt) for fmt in ("saelens", "sparsify")}


def test_exports_open_as_the_same_dictionaries(exported, tiny_store):
    run, folders = exported
    for fmt, dirs in folders.items():
        for m, folder in enumerate(dirs):
            assert kind(folder) == fmt
            other, store = open_dictionaries(folder, store=str(tiny_store.root))
            assert store == str(tiny_store.root) and len(other.members) == 1
            mem = other.members[0]
            assert (mem.hook, mem.width, mem.k, mem.inference) == (run.members[m].hook, run.members[m].width, run.members[m].k, "topk")
            want, got = run.folded(m), other.folded(0)
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=f"{fmt} {name}")
            # held out as the run holds out: the store's last shard
            assert other.store_meta["train_records"] == run.store_meta["train_records"]


def test_an_export_root_opens_as_all_its_dictionaries(exported, tiny_store):
    """The folder `sae-jax export --out DIR` wrote (one folder per member; sparsify's hookpoint
    folders one level further down) opens as every member, in the run's order of names."""
    run, folders = exported
    for fmt, dirs in folders.items():
        root = dirs[0].parent
        assert kind(root) == fmt
        other, _ = open_dictionaries(root, store=str(tiny_store.root))
        by_folder = sorted(range(len(dirs)), key=lambda m: dirs[m].name)  # the folders are read in name order
        assert len(other.members) == len(run.members) == len({mem.name for mem in other.members})
        for j, m in enumerate(by_folder):
            assert (other.members[j].hook, other.members[j].width, other.members[j].k) == (
                run.members[m].hook,
                run.members[m].width,
                run.members[m].k,
            )
            np.testing.assert_allclose(other.folded(j)["W_dec"], run.folded(m)["W_dec"], rtol=1e-6, atol=1e-7, err_msg=fmt)


def test_sparsify_hookpoint_maps_to_the_store_hook(exported, tiny_store, tmp_path):
    """A folder as sparsify's Trainer writes it (one sub-folder per hookpoint, no sae_jax.json)."""
    run, folders = exported
    first = {}  # one dictionary per hookpoint, as sparsify writes
    for m, d in enumerate(folders["sparsify"]):
        first.setdefault(run.members[m].hook, (m, d))
    for _, d in first.values():
        (sub,) = [s for s in d.iterdir() if s.is_dir()]
        shutil.copytree(sub, tmp_path / sub.name)
    other, _ = open_dictionaries(tmp_path, store=str(tiny_store.root))
    got = {mem.hook: (mem.width, mem.k) for mem in other.members}
    assert got == {h: (run.members[m].width, run.members[m].k) for h, (m, _) in first.items()}
    for j, mem in enumerate(other.members):
        m = first[mem.hook][0]
        np.testing.assert_allclose(other.folded(j)["W_enc"], run.folded(m)["W_enc"], rtol=1e-6, atol=1e-7)


@pytest.mark.heavy
def test_eval_cli_on_a_saelens_folder_matches_the_run(exported, tiny_run, tiny_store, tmp_path):
    from conftest import run_cli

    run, folders = exported
    folder = folders["saelens"][0]
    name = run.members[0].name
    a = run_cli("eval", str(tiny_run), "--member", name, "--tokens", "512", "--contexts", "2", "--out", str(tmp_path / "a"))
    b = run_cli("eval", str(folder), "--store", str(tiny_store.root), "--tokens", "512", "--contexts", "2", "--out", str(tmp_path / "b"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-2000:] + b.stderr[-2000:]
    ra = json.loads((tmp_path / "a/eval.json").read_text())["members"][name]
    (rb,) = json.loads((tmp_path / "b/eval.json").read_text())["members"].values()
    compared = 0
    for group in ("reconstruction_quality", "sparsity", "model_performance_preservation", "model_behavior_preservation"):
        for key, v in ra[group].items():
            if isinstance(v, float):
                assert rb[group][key] == pytest.approx(v, rel=1e-4, abs=1e-6), (group, key)
                compared += 1
    assert compared >= 6
    r = run_cli("eval", str(folder))
    assert r.returncode == 1 and "give --store" in r.stderr and "Traceback" not in r.stderr
    c = run_cli(
        "eval", str(folder.parent), "--store", str(tiny_store.root), "--tokens", "512", "--contexts", "2", "--out", str(tmp_path / "c")
    )
    assert c.returncode == 0, c.stderr[-2000:]
    rc = json.loads((tmp_path / "c/eval.json").read_text())
    assert len(rc["members"]) == len(run.members) and rc["source"] == "saelens"
    assert f"(SAELens dictionaries, {len(run.members)})" in c.stdout and "(step 0)" not in c.stdout


def _copy(folder, tmp_path):
    dst = tmp_path / "sae"
    shutil.copytree(folder, dst)
    return dst


def test_bad_foreign_folders_are_named(exported, tiny_store, tmp_path):
    _, folders = exported
    store = str(tiny_store.root)
    d = _copy(folders["saelens"][0], tmp_path / "hook")
    cfg = json.loads((d / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps({**cfg, "hook_name": "blocks.9.hook_mlp_out"}))
    with pytest.raises(RunError, match=r"hook_name 'blocks.9.hook_mlp_out' is not a hook of"):
        open_dictionaries(d, store=store)
    (d / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "expected_average_only_in"}))
    with pytest.raises(RunError, match="normalize_activations"):
        open_dictionaries(d, store=store)
    (d / "cfg.json").write_text(json.dumps(cfg))
    data = (d / "sae_weights.safetensors").read_bytes()
    (d / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match=r"sae_weights.safetensors: not a readable safetensors file"):
        open_dictionaries(d, store=store)
    with pytest.raises(RunError, match="--step applies to sae-jax runs"):
        open_dictionaries(folders["sparsify"][0], step=3, store=store)
    (tmp_path / "empty" / "a" / "b").mkdir(parents=True)  # no dictionary at any depth searched
    with pytest.raises(RunError, match="neither a sae-jax run"):
        from sae_jax.foreign import open_foreign

        open_foreign(tmp_path / "empty", open_store(store))


def test_saelens_rescale_and_no_b_dec_on_input_fold_to_the_same_map(exported, tiny_store, tmp_path):
    """SAELens's own TopK forward (rescale_acts_by_decoder_norm, apply_b_dec_to_input false),
    written out in numpy, equals the folded dictionary the loader returns."""
    from safetensors.numpy import save_file

    from sae_jax.sae import folded

    run, folders = exported
    src = folders["saelens"][0]
    d = _copy(src, tmp_path)
    hook, d_in = run.members[0].hook, run.meta["d_in"]
    rng = np.random.default_rng(0)
    w = run.members[0].width
    a = {
        "W_enc": rng.normal(size=(d_in, w)).astype(np.float32),
        "b_enc": rng.normal(size=w).astype(np.float32),
        "W_dec": (rng.normal(size=(w, d_in)) * rng.uniform(0.2, 3.0, (w, 1))).astype(np.float32),
        "b_dec": rng.normal(size=d_in).astype(np.float32),
    }
    save_file(a, str(d / "sae_weights.safetensors"))
    cfg = json.loads((d / "cfg.json").read_text())
    cfg.update(rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False, k=4)
    (d / "cfg.json").write_text(json.dumps(cfg))
    x = rng.normal(size=(64, d_in)).astype(np.float32)
    n = np.linalg.norm(a["W_dec"], axis=1)
    pre = (x @ a["W_enc"] + a["b_enc"]) * n  # SAELens TopKSAE.encode
    idx = np.argsort(-pre, axis=1)[:, :4]
    acts = np.zeros_like(pre)
    np.put_along_axis(acts, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
    want = (acts / n) @ a["W_dec"] + a["b_dec"]  # act_times_W_dec + b_dec
    other, _ = open_dictionaries(d, store=str(tiny_store.root))
    assert other.members[0].hook == hook and other.members[0].k == 4
    p = other.folded(0)
    v, i = folded.encode(p, x, 4)
    # float32 reassociation only (b_dec and the norms folded): errors ~1e-6 of the rows' scale
    np.testing.assert_allclose(np.asarray(folded.decode(p, v, i)), want, rtol=1e-4, atol=2e-6 * np.abs(want).max())
    np.testing.assert_array_equal(np.sort(np.asarray(i), 1), np.sort(idx, 1))


def test_atlas_cli_on_an_export_root_matches_the_run(exported, tiny_run, tiny_store, tmp_path):
    """`sae-jax atlas DIR --store STORE` on the folder `sae-jax export` wrote: every dictionary in
    it (several hooks, attn.hook_z among them, one forward pass), the same atlas as the run's."""
    from conftest import run_cli

    from sae_jax.eval.atlas_files import read_atlas

    run, folders = exported
    dirs = folders["sparsify"]
    args = ["--contexts", "6", "--top", "3", "--samples", "3", "--batch-size", "3"]
    a = run_cli("atlas", str(tiny_run), *args, "--out", str(tmp_path / "a"))
    b = run_cli("atlas", str(dirs[0].parent), "--store", str(tiny_store.root), *args, "--out", str(tmp_path / "b"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-2000:] + b.stderr[-2000:]
    ra, rb = read_atlas(tmp_path / "a"), read_atlas(tmp_path / "b")
    assert len(rb.names) == len(run.members) and len({run.members[0].hook, run.members[-1].hook}) == 2
    by_folder = sorted(range(len(dirs)), key=lambda m: dirs[m].name)  # the export root's order
    for j, m in enumerate(by_folder):
        x, y = list(ra.records(m)), list(rb.records(j))
        assert ra.meta(m)["positions_read"] == rb.meta(j)["positions_read"] > 0
        cx, cy = np.array([r["count"] for r in x]), np.array([r["count"] for r in y])
        # the export's weights are the run's to float32 rounding: a near-tie at the k-th latent may
        # flip one selection in many thousands
        assert np.abs(cx - cy).sum() <= max(2, cx.sum() // 1000), (run.members[m].name, np.abs(cx - cy).sum(), cx.sum())
        same = [lat for lat in range(len(x)) if cx[lat] == cy[lat] > 0]
        assert len(same) > 0.9 * (cx > 0).sum()
        for lat in same:
            assert [e["activation"] for e in y[lat]["top"]] == pytest.approx([e["activation"] for e in x[lat]["top"]], rel=1e-4, abs=1e-5)
            assert "head_attribution" in y[lat] if "hook_z" in run.members[m].hook else "head_attribution" not in y[lat]
