"""The PyTorch harvest backend (transformers in a worker process) writes the store the Flax
backend writes, from the same tokens, for each family's hook presets; modules by path; errors."""

import numpy as np
import pytest
from conftest import PEER_PYTHON, tiny_config

from sae_jax.data.store import open_store
from sae_jax.harvest import harvest
from sae_jax.model.loading import ModelLoadError

pytestmark = [pytest.mark.peers]

HOOKS = "blocks.0.hook_resid_pre,blocks.0.attn.hook_z,blocks.0.hook_attn_out,blocks.0.hook_resid_mid,blocks.1.hook_mlp_in,blocks.1.hook_mlp_out,blocks.1.hook_resid_post"


def _config(out, model_dir, backend, **kw):
    c = tiny_config(out, **{"harvest.hooks": HOOKS, "harvest.dtype": "float32", "harvest.tokens": 1500, "data.ctx_len": 48, **kw})
    c.model.path, c.model.backend, c.model.torch_python = str(model_dir), backend, str(PEER_PYTHON)
    return c


@pytest.mark.parametrize("arch", ["gpt2", "qwen3", "gemma2"])
def test_torch_backend_writes_the_flax_store(tiny_hf_models, tmp_path, arch):
    stores = {}
    for backend in ("flax", "torch"):
        stores[backend] = harvest(_config(tmp_path / backend, tiny_hf_models / arch, backend), log=lambda *a: None)
    f, t = stores["flax"], stores["torch"]
    assert t.manifest["model"]["backend"] == "torch" and t.manifest["model"]["hook_modules"]
    assert t.n_rows == f.n_rows > 1000
    np.testing.assert_array_equal(t.read_all("tokens"), f.read_all("tokens"))  # same tokens, same shuffle
    worst = {}
    for hook in f.hooks:
        a, b = f.read_all(hook), t.read_all(hook)
        worst[hook] = float(np.abs(a - b).max())
        assert worst[hook] <= 2e-5 * max(1.0, float(np.abs(a).max())), (hook, worst[hook])
        assert f.hooks[hook]["mean_sq_norm"] == pytest.approx(t.hooks[hook]["mean_sq_norm"], rel=1e-5)
    print(f"{arch}: torch vs flax store, max |diff| per hook: " + ", ".join(f"{k.split('.', 1)[1]} {v:.1g}" for k, v in worst.items()))


def test_hooks_by_module_path(tiny_hf_models, tmp_path):
    hooks = "blocks.1.hook_resid_post,blocks.0.hook_mlp_out"
    preset = harvest(_config(tmp_path / "preset", tiny_hf_models / "qwen3", "torch", **{"harvest.hooks": hooks}), log=lambda *a: None)
    c = _config(tmp_path / "custom", tiny_hf_models / "qwen3", "torch", **{"harvest.hooks": hooks})
    c.model.torch_hooks = "blocks.1.hook_resid_post=model.layers.1:out, blocks.0.hook_mlp_out=model.layers.0.mlp:out"
    custom = harvest(c, log=lambda *a: None)
    for hook in preset.hooks:
        np.testing.assert_array_equal(preset.read_all(hook), custom.read_all(hook))
    assert open_store(custom.root, verify=True)


def test_torch_backend_bad_input(tiny_hf_models, tmp_path):
    c = _config(tmp_path / "a", tiny_hf_models / "qwen3", "torch", **{"harvest.hooks": "blocks.1.hook_resid_post"})
    c.model.torch_hooks = "blocks.1.hook_resid_post=model.layerz.1:out"
    with pytest.raises(ModelLoadError, match=r"the model has no module 'model.layerz.1'"):
        harvest(c, log=lambda *a: None)
    c.model.torch_hooks = "blocks.1.hook_resid_post=model.layers.1"
    with pytest.raises(ModelLoadError, match=r"is not NAME=MODULE:in or NAME=MODULE:out"):
        harvest(c, log=lambda *a: None)
    c.model.torch_hooks = "blocks.0.hook_resid_post=model.layers.0:out"
    with pytest.raises(ModelLoadError, match=r"names no module for \['blocks.1.hook_resid_post'\]"):
        harvest(c, log=lambda *a: None)
    c.model.torch_hooks, c.model.torch_python = "", "/nonexistent/python"
    with pytest.raises((ModelLoadError, FileNotFoundError)):
        harvest(c, log=lambda *a: None)
    assert not (tmp_path / "a").exists()  # nothing written
