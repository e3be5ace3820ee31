"""Where each hook point lives in a Hugging Face transformers model: (module path, "in" | "out").

"out" is the module's output (its first element when it returns a tuple), "in" its first
input (the `hidden_states` argument). The PyTorch harvest backend hooks these modules; the
points mean what they mean in the Flax model (`sae_jax/model/transformer.py`): `attn_out` and
`mlp_out` are what attention and the MLP add to the residual stream (after Gemma's post-norms),
`mlp_in` the MLP's normalised input, `resid_mid` the stream between them.
"""

from __future__ import annotations

from sae_jax.model.hooks import Hook, transformer_hook

_LLAMA = {  # Llama, Qwen2, Qwen3: model.layers.L
    "resid_pre": ("model.layers.{L}", "in"),
    "attn_z": ("model.layers.{L}.self_attn.o_proj", "in"),
    "attn_out": ("model.layers.{L}.self_attn", "out"),
    "resid_mid": ("model.layers.{L}.post_attention_layernorm", "in"),
    "mlp_in": ("model.layers.{L}.mlp", "in"),
    "mlp_out": ("model.layers.{L}.mlp", "out"),
    "resid_post": ("model.layers.{L}", "out"),
}
_GEMMA = {  # Gemma 2 / 3: post-norms on both sub-blocks
    **_LLAMA,
    "attn_out": ("model.layers.{L}.post_attention_layernorm", "out"),
    "resid_mid": ("model.layers.{L}.pre_feedforward_layernorm", "in"),
    "mlp_out": ("model.layers.{L}.post_feedforward_layernorm", "out"),
}
_GPT2 = {
    "resid_pre": ("transformer.h.{L}", "in"),
    "attn_z": ("transformer.h.{L}.attn.c_proj", "in"),
    "attn_out": ("transformer.h.{L}.attn", "out"),
    "resid_mid": ("transformer.h.{L}.ln_2", "in"),
    "mlp_in": ("transformer.h.{L}.mlp", "in"),
    "mlp_out": ("transformer.h.{L}.mlp", "out"),
    "resid_post": ("transformer.h.{L}", "out"),
}
PRESETS = {"llama": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma2": _GEMMA, "gemma3": _GEMMA, "gpt2": _GPT2}


def module_of(hook: Hook, family: str) -> tuple[str, str]:
    """(module path, "in" | "out") of a hook point in a transformers model of `family`."""
    if family not in PRESETS:
        raise KeyError(f"no hook preset for the {family!r} family (presets: {', '.join(PRESETS)}); name the modules yourself")
    path, where = PRESETS[family][hook.point]
    return path.format(L=hook.layer), where


# The module whose *output* a hook point is, relative to the base model (what sparsify calls a
# hookpoint, `layers.6` for Llama, `h.6` for GPT-2); None where no module outputs it.
_OUT = {
    "llama": {
        "resid_post": "layers.{L}",
        "attn_out": "layers.{L}.self_attn",
        "mlp_in": "layers.{L}.post_attention_layernorm",
        "mlp_out": "layers.{L}.mlp",
    },
    "gemma": {
        "resid_post": "layers.{L}",
        "attn_out": "layers.{L}.post_attention_layernorm",
        "mlp_in": "layers.{L}.pre_feedforward_layernorm",
        "mlp_out": "layers.{L}.post_feedforward_layernorm",
    },
    "gpt2": {"resid_post": "h.{L}", "attn_out": "h.{L}.attn", "mlp_in": "h.{L}.ln_2", "mlp_out": "h.{L}.mlp"},
}
_FIRST = {"llama": "embed_tokens", "gemma": None, "gpt2": "drop"}  # resid_pre.0 (Gemma scales the embedding outside a module)


def output_module(hook: Hook, family: str = "llama") -> str | None:
    table = "gemma" if family in ("gemma2", "gemma3") else "gpt2" if family == "gpt2" else "llama"
    if hook.point == "resid_pre":
        return _OUT[table]["resid_post"].format(L=hook.layer - 1) if hook.layer > 0 else _FIRST[table]
    f = _OUT[table].get(hook.point)
    return f.format(L=hook.layer) if f else None


def hf_module(hook: str, architecture: str | None = "LlamaForCausalLM") -> str | None:
    """The Hugging Face module (relative to the base model) whose output a hook is; None for a
    hook name that is not a transformer hook or a store without a model the zoo knows."""
    from sae_jax.model.loading import FAMILIES

    parsed = transformer_hook(hook)
    if parsed is None or architecture is None:
        return None
    return output_module(parsed, FAMILIES.get(architecture, "llama"))
