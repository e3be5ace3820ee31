"""The Flax model zoo against transformers, without downloading anything: tiny randomly
initialised models of each architecture are built and saved with `save_pretrained` by
transformers (PyTorch CPU, the peer venv), loaded here, and every hook point and the logits
compared (fp32)."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax.model.hooks import POINTS, Hook
from sae_jax.model.loading import ModelLoadError, build_model, load_model, read_model
from sae_jax.model.transformer import RoPE

pytestmark = [pytest.mark.peers]

ARCHS = ["gpt2", "llama", "llama3_rope", "qwen2", "qwen3", "gemma2", "gemma3"]


@pytest.fixture(scope="module")
def tiny(tiny_hf_models):
    return tiny_hf_models


def _run(lm, tokens):
    hooks = tuple(Hook(i, p) for i in range(lm.cfg.n_layers) for p in POINTS)
    logits, acts = lm.model(jnp.asarray(tokens), hooks)
    return np.asarray(logits), {f"{h.point}.{h.layer}": np.asarray(v) for h, v in zip(hooks, (acts[h.name] for h in hooks))}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_hook_and_the_logits_match_transformers(tiny, arch):
    lm = load_model(str(tiny / arch))
    ref = np.load(tiny / f"{arch}.npz")
    logits, acts = _run(lm, ref["tokens"])
    diffs = {"logits": float(np.abs(logits - ref["logits"]).max())}
    for name, a in acts.items():
        r = ref[name]
        diffs[name] = float(np.abs(a.reshape(r.shape) - r).max())
        assert diffs[name] <= 2e-5 * max(1.0, float(np.abs(r).max())), (name, diffs[name])
    assert diffs["logits"] <= 2e-5 * max(1.0, float(np.abs(ref["logits"]).max()))
    worst = max(diffs, key=diffs.get)
    print(f"{arch}: logits max |diff| {diffs['logits']:.2g}; worst hook {worst} {diffs[worst]:.2g} ({len(acts)} hooks)")
    assert len(acts) == lm.cfg.n_layers * len(POINTS)


@pytest.mark.parametrize(
    "arch,change",
    [
        ("gemma2", {"windows": ()}),
        ("gemma2", {"attn_softcap": 0.0}),
        ("gemma2", {"final_softcap": 0.0}),
        ("gemma2", {"embed_scale": False}),
        ("gemma3", {"rope": (RoPE(100000.0),) * 3}),
        ("llama3_rope", {"rope": (RoPE(500000.0),) * 2}),
        ("gpt2", {"act": "silu"}),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(v),
)
def test_the_comparison_sees_each_feature(tiny, arch, change):
    """The tiny models exercise what they are there to check: without the feature the model no
    longer matches transformers (so the agreement above is not vacuous)."""
    hf, sd, *_ = read_model(str(tiny / arch))
    lm = load_model(str(tiny / arch))
    changed = build_model(dataclasses.replace(lm.cfg, **change), sd, arch)
    ref = np.load(tiny / f"{arch}.npz")
    logits = np.asarray(changed(jnp.asarray(ref["tokens"]))[0])
    assert np.abs(logits - ref["logits"]).max() > 1e-3


def _copy(tiny, arch, tmp_path) -> Path:
    d = tmp_path / arch
    shutil.copytree(tiny / arch, d)
    return d


def test_unsupported_architecture_lists_the_supported_ones(tiny, tmp_path):
    d = _copy(tiny, "qwen3", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(
        ModelLoadError,
        match=r"architecture 'MambaForCausalLM' is not supported \(supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, GPT2LMHeadModel\)",
    ):
        load_model(str(d))
    (d / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ModelLoadError, match="RoPE type 'yarn' is not supported"):
        load_model(str(d))


def test_missing_or_misshapen_tensors_are_named(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(tiny, "gemma2", tmp_path)
    f = d / "model.safetensors"
    sd = load_file(str(f))
    gone = {k: v for k, v in sd.items() if k != "model.layers.1.post_feedforward_layernorm.weight"}
    save_file(gone, str(f))
    with pytest.raises(ModelLoadError, match=r"tensor 'model.layers.1.post_feedforward_layernorm.weight' is missing"):
        load_model(str(d))
    bad = {**sd, "model.layers.0.self_attn.k_proj.weight": sd["model.layers.0.self_attn.k_proj.weight"][:, :10]}
    save_file(bad, str(f))
    with pytest.raises(ModelLoadError, match=r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(32, 10\), expected \(32, 64\)"):
        load_model(str(d))
