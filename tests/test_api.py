"""The Python API (`import sae_jax`): train, reload, encode, decode and evaluate in one process."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO


def test_importing_the_package_loads_nothing_heavy():
    r = subprocess.run(
        [sys.executable, "-c", "import sys, sae_jax; print(sorted(m for m in ('jax', 'numpy', 'orbax', 'grain') if m in sys.modules))"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    import sae_jax

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sae_jax.nope  # noqa: B018


@pytest.mark.heavy
def test_train_load_encode_decode_evaluate_and_an_export(tiny_store, tmp_path):
    """Trained from keywords, reloaded by name and position: encode/decode reconstruct as the
    folded weights say; the export folder loads as the same dictionaries; evaluate reports each."""
    import sae_jax
    from sae_jax.export import export_run
    from sae_jax.train.settings import SettingsError

    hook = "blocks.1.hook_resid_post"
    run_dir = tmp_path / "run"
    kw = dict(store=tiny_store.root, run_dir=run_dir, hooks=[hook], widths=[64, 96], ks=[4], batch_size=256, steps=6, progress=False)
    result = sae_jax.fit(log=lambda *a: None, **kw)
    assert result.last["step"] == 6
    with pytest.raises(SettingsError, match="train.widht: no such setting"):
        sae_jax.fit(widht=[64])
    saes = sae_jax.load(run_dir)
    assert len(saes) == 2 and saes.names == [f"{hook}.topk.w64.k4", f"{hook}.topk.w96.k4"]
    sae = saes[f"{hook}.topk.w96.k4"]
    assert sae is saes[1] and (sae.width, sae.k, sae.kind, sae.hook) == (96, 4, "topk", hook)
    x = tiny_store.read_all(hook)[:128].astype(np.float32)
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (128, 4)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    want = np.sort(np.maximum(np.sort(pre, axis=1)[:, -4:], 0), axis=1)
    np.testing.assert_allclose(np.sort(np.asarray(values), axis=1), want, rtol=1e-4, atol=1e-5)
    dense = np.zeros((128, 96), np.float32)
    np.put_along_axis(dense, np.asarray(indices), np.asarray(values), axis=1)
    np.testing.assert_allclose(np.asarray(sae(x)), dense @ sae.W_dec + sae.b_dec, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=rf"expected \[N, {x.shape[1]}\] activations of {hook}"):
        sae.encode(x[:, :10])
    with pytest.raises(KeyError, match="no dictionary 'nope'"):
        saes["nope"]

    export_run(saes.run, "saelens", tmp_path / "exp")
    other = sae_jax.load(tmp_path / "exp", store=tiny_store.root)
    assert len(other) == 2
    np.testing.assert_allclose(np.asarray(other[1](x)), np.asarray(sae(x)), rtol=1e-4, atol=1e-4)

    report = sae_jax.evaluate(run_dir, tokens=512, contexts=2, log=lambda *a: None)
    assert set(report["members"]) == set(saes.names)
    assert all(-1 < m["reconstruction_quality"]["explained_variance"] <= 1 for m in report["members"].values())
