"""The Llama family (Llama, SmolLM, Qwen2-style) as a Flax NNX module with named hook points.

Weights are kept in `[in, out]` orientation (`x @ W`); the loaders transpose from the PyTorch
`[out, in]` layout. Q/K use the Hugging Face "rotate half" RoPE layout; the GGUF loader undoes
llama.cpp's interleaved-pairs permutation so both sources meet here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae_jax.model.hooks import Hook


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    attn_bias: bool = False  # Qwen2 has q/k/v biases
    max_position: int = 8192

    def to_dict(self) -> dict:
        return asdict(self)

    def hook_width(self, point: str) -> int:
        return self.n_heads * self.head_dim if point == "attn_z" else self.d_model


def _param(w, dtype) -> nnx.Param:
    return nnx.Param(jnp.asarray(np.asarray(w), dtype=dtype))


class RMSNorm(nnx.Module):
    def __init__(self, weight, eps: float, dtype):
        self.weight = _param(weight, dtype)
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, theta: float):
    """Rotate-half RoPE on `x [B, T, N, H]`."""
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    ang = positions[:, :, None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, axis=-1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : h // 2], xf[..., h // 2 :]
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rot * sin).astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, w: dict, dtype):
        self.cfg = cfg
        self.input_norm = RMSNorm(w["input_layernorm"], cfg.rms_eps, dtype)
        self.post_attn_norm = RMSNorm(w["post_attention_layernorm"], cfg.rms_eps, dtype)
        self.wq = _param(w["q_proj"], dtype)
        self.wk = _param(w["k_proj"], dtype)
        self.wv = _param(w["v_proj"], dtype)
        self.wo = _param(w["o_proj"], dtype)
        if cfg.attn_bias:
            self.bq = _param(w["q_bias"], dtype)
            self.bk = _param(w["k_bias"], dtype)
            self.bv = _param(w["v_bias"], dtype)
        self.w_gate = _param(w["gate_proj"], dtype)
        self.w_up = _param(w["up_proj"], dtype)
        self.w_down = _param(w["down_proj"], dtype)

    def __call__(self, x, positions, want: frozenset[str], edits: dict | None = None):
        """Returns (resid_post, {point: activation}) for the points in `want`.

        `edits` maps a point to a function of its activation whose result replaces it in the rest
        of the forward (a dictionary spliced in, a zero ablation); recorded activations are the
        edited ones."""
        cfg = self.cfg
        b, t, _ = x.shape
        out = {}
        edits = edits or {}

        def at(name, val):
            if name in edits:
                val = edits[name](val)
            if name in want:
                out[name] = val
            return val

        x = at("resid_pre", x)
        h = self.input_norm(x)
        q, k, v = h @ self.wq[...], h @ self.wk[...], h @ self.wv[...]
        if cfg.attn_bias:
            q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
        q = rope(q.reshape(b, t, cfg.n_heads, cfg.head_dim), positions, cfg.rope_theta)
        k = rope(k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim), positions, cfg.rope_theta)
        v = v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        z = at("attn_z", jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, cfg.n_heads * cfg.head_dim))
        attn_out = at("attn_out", z @ self.wo[...])
        mid = at("resid_mid", x + attn_out)
        m_in = at("mlp_in", self.post_attn_norm(mid))
        mlp_out = at("mlp_out", (jax.nn.silu(m_in @ self.w_gate[...]) * (m_in @ self.w_up[...])) @ self.w_down[...])
        post = at("resid_post", mid + mlp_out)
        return post, out


class Llama(nnx.Module):
    """Decoder-only Llama. `weights` maps HF-style short names to `[in, out]` numpy arrays."""

    def __init__(self, cfg: LlamaConfig, weights: dict, dtype=jnp.float32):
        self.cfg = cfg
        self.embed = _param(weights["embed_tokens"], dtype)
        self.blocks = nnx.List([Block(cfg, weights[f"layers.{i}"], dtype) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(weights["norm"], cfg.rms_eps, dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _param(weights["lm_head"], dtype)

    def unembed(self, x):
        w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return (self.final_norm(x) @ w).astype(jnp.float32)

    def __call__(self, tokens, hooks: tuple[Hook, ...] = (), *, logits: bool = True, edits: dict | None = None):
        """Run the model on `tokens [B, T]`.

        Returns (logits [B, T, V] or None, {hook name: activation [B, T, width]}). With
        `logits=False` the forward stops after the last layer a requested hook needs.
        `edits` maps hooks to functions that replace their activation ([B, T, width] -> same)
        for the rest of the forward: how a dictionary is spliced in for evaluation.
        """
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed[...][tokens]
        by_layer: dict[int, set[str]] = {}
        for h in hooks:
            by_layer.setdefault(h.layer, set()).add(h.point)
        edit_layer: dict[int, dict] = {}
        for h, fn in (edits or {}).items():
            edit_layer.setdefault(h.layer, {})[h.point] = fn
        last = self.cfg.n_layers - 1 if logits else max(by_layer, default=-1)
        acts = {}
        for i in range(last + 1):
            want = frozenset(by_layer.get(i, ()))
            x, out = self.blocks[i](x, positions, want, edit_layer.get(i))
            for point, val in out.items():
                acts[Hook(i, point).name] = val
        return (self.unembed(x) if logits else None), acts


def next_token_loss(logits, tokens, mask=None):
    """Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1] (float32)."""
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    if mask is None:
        return nll.mean()
    m = mask[:, 1:].astype(jnp.float32)
    return (nll * m).sum() / m.sum()
