"""Runs in the peer venv (torch + transformers): tiny randomly initialised models of every
architecture the Flax zoo loads, saved with `save_pretrained`, and their activations.

    python tiny_models.py OUT_DIR [ARCH ...]

For each architecture: OUT_DIR/ARCH/ (config.json, model.safetensors, tokenizer.json) and
OUT_DIR/ARCH.npz with `tokens [2, T]`, `logits [2, T, V]` and, per layer L, the hook points
captured with forward hooks on the PyTorch modules (fp32, eager attention):
resid_pre.L, attn_z.L (the input of the attention output projection), attn_out.L (what the
attention adds to the residual stream), resid_mid.L, mlp_in.L (the MLP's input), mlp_out.L (what
the MLP adds), resid_post.L.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers as tf
from tokenizers import Regex, Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel

V, T = 96, 20
COMMON = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    bos_token_id=1,
    eos_token_id=2,
)


def configs() -> dict:
    return {
        "gpt2": tf.GPT2Config(
            vocab_size=V,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "llama": tf.LlamaConfig(**COMMON, num_hidden_layers=2, tie_word_embeddings=False, rope_theta=5000.0, rms_norm_eps=1e-5),
        "llama3_rope": tf.LlamaConfig(
            **COMMON,
            num_hidden_layers=2,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
            rope_theta=500000.0,
        ),
        "qwen2": tf.Qwen2Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=True),
        "qwen3": tf.Qwen3Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=True),
        "gemma2": tf.Gemma2Config(
            **COMMON,
            num_hidden_layers=3,
            sliding_window=6,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
        "gemma3": tf.Gemma3TextConfig(
            **COMMON,
            num_hidden_layers=3,
            sliding_window=6,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_theta=100000.0,
            rope_local_base_freq=1000.0,
        ),
    }


MODELS = {
    "gpt2": tf.GPT2LMHeadModel,
    "llama": tf.LlamaForCausalLM,
    "llama3_rope": tf.LlamaForCausalLM,
    "qwen2": tf.Qwen2ForCausalLM,
    "qwen3": tf.Qwen3ForCausalLM,
    "gemma2": tf.Gemma2ForCausalLM,
    "gemma3": tf.Gemma3ForCausalLM,
}


def _tokenizer() -> Tokenizer:
    """Characters: ids 3..94 for the printable ASCII characters from space, 0-2 for unknown, BOS, EOS
    (so real text gives varied ids below the tiny vocabulary)."""
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{chr(32 + i): 3 + i for i in range(V - 3)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return tok


def _parts(model, arch):
    """(decoder layers, per layer: (o_proj, mlp, attn-out module, mlp-out module))."""
    if arch == "gpt2":
        layers = model.transformer.h
        return layers, [(b.attn.c_proj, b.mlp, b.attn, b.mlp) for b in layers]
    layers = model.model.layers
    gemma = arch.startswith("gemma")
    return layers, [
        (
            b.self_attn.o_proj,
            b.mlp,
            b.post_attention_layernorm if gemma else b.self_attn,
            b.post_feedforward_layernorm if gemma else b.mlp,
        )
        for b in layers
    ]


def dump(arch: str, out: Path) -> None:
    torch.manual_seed(0)
    cfg = configs()[arch]
    cfg._attn_implementation = "eager"
    model = MODELS[arch](cfg).eval()
    with torch.no_grad():  # random init is small: spread the weights so every part of the forward matters
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.mul_(3.0 if p.ndim > 1 else 1.0).add_(0.05 * torch.randn_like(p) if p.ndim == 1 else 0)
    d = out / arch
    model.save_pretrained(d, safe_serialization=True)
    _tokenizer().save(str(d / "tokenizer.json"))
    acts = {}

    def first(x):
        return x[0] if isinstance(x, tuple) else x

    hooks = []
    layers, parts = _parts(model, arch)
    for i, (layer, (o_proj, mlp, attn_out, mlp_out)) in enumerate(zip(layers, parts)):
        hooks.append(
            layer.register_forward_pre_hook(
                lambda m, a, kw, i=i: acts.__setitem__(f"resid_pre.{i}", (a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True
            )
        )
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(f"resid_post.{i}", first(o).clone())))
        hooks.append(o_proj.register_forward_pre_hook(lambda m, a, i=i: acts.__setitem__(f"attn_z.{i}", a[0].clone())))
        hooks.append(attn_out.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(f"attn_out.{i}", first(o).clone())))
        hooks.append(mlp.register_forward_pre_hook(lambda m, a, i=i: acts.__setitem__(f"mlp_in.{i}", a[0].clone())))
        hooks.append(mlp_out.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(f"mlp_out.{i}", first(o).clone())))
    tokens = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens).logits
    for h in hooks:
        h.remove()
    for i in range(len(layers)):
        acts[f"resid_mid.{i}"] = acts[f"resid_pre.{i}"] + acts[f"attn_out.{i}"]
    np.savez(out / f"{arch}.npz", tokens=tokens.numpy(), logits=logits.numpy(), **{k: v.numpy() for k, v in acts.items()})
    info = json.loads((d / "config.json").read_text())
    print(arch, info.get("architectures"), f"transformers {tf.__version__}")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for arch in sys.argv[2:] or list(MODELS):
        dump(arch, out)
