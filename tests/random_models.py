"""Llama-shaped models with random weights, written as Hugging Face directories (config.json,
bf16 safetensors, the embedded model's tokenizer.json): shapes the harvest's mesh tests need
(heads and kv heads that split 8 ways) and sizes the loading-memory checks need."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np


def llama_config(d_model=256, n_layers=3, n_heads=16, n_kv_heads=8, d_mlp=512, vocab=49152, tie=True) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": d_model,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "intermediate_size": d_mlp,
        "head_dim": d_model // n_heads,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tie,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def _shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    d, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    hd = hf["head_dim"]
    qd, kvd = hf["num_attention_heads"] * hd, hf["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not hf["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (qd, d),
            p + "self_attn.k_proj.weight": (kvd, d),
            p + "self_attn.v_proj.weight": (kvd, d),
            p + "self_attn.o_proj.weight": (d, qd),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
    return shapes


def write_random_llama(out: Path, tokenizer, seed: int = 0, files: int = 1, **shape) -> Path:
    """A random Llama-shaped HF directory at `out` (weights ~ N(0, 0.02), norms 1, bf16),
    split over `files` safetensors files; `tokenizer`: a `tokenizers.Tokenizer` to save beside."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf = llama_config(**shape)
    rng = np.random.default_rng(seed)
    names = list(_shapes(hf).items())
    per = -(-len(names) // files)
    for i in range(files):
        sd = {}
        for name, s in names[i * per : (i + 1) * per]:
            w = np.ones(s, np.float32) if len(s) == 1 else rng.standard_normal(s, dtype=np.float32) * np.float32(0.02)
            sd[name] = w.astype(ml_dtypes.bfloat16)
        save_file(sd, str(out / f"model-{i:05d}-of-{files:05d}.safetensors"))
        del sd
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    tokenizer.save(str(out / "tokenizer.json"))
    return out


def param_bytes(out: Path) -> int:
    """Bytes of the weights in a directory written by `write_random_llama` (bf16)."""
    return sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
