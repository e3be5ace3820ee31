"""Decoder-only transformers as one Flax NNX module with named hook points: the Llama family
(Llama 2/3, SmolLM), Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorm), Gemma 2 (pre- and
post-norms, scaled embeddings, attention and final logit soft-capping, alternating sliding-window
and global attention), Gemma 3 (Gemma 2 with q/k norms, no soft-capping, a local and a global
RoPE base) and GPT-2 (LayerNorm, learned positions, GELU MLP, biases everywhere).

One block, switched by `ModelConfig` (the loaders in `loading.py` fill it from config.json):

    x -> norm1 -> q, k, v (+bias) -> [q/k norm] -> [RoPE] -> attention (causal, [window], [softcap])
      -> attn_z -> o_proj (+bias) -> [post-attention norm] = attn_out;  resid_mid = x + attn_out
      -> norm2 = mlp_in -> MLP (gated: down(act(gate) * up); plain: proj(act(fc))) -> [post-MLP norm]
      = mlp_out;  resid_post = resid_mid + mlp_out

`attn_out` and `mlp_out` are what each adds to the residual stream. Weights are kept in `[in,
out]` orientation (`x @ W`); the loaders transpose PyTorch's `[out, in]`. Q/K use the Hugging
Face "rotate half" RoPE layout (the GGUF loader undoes llama.cpp's interleaving).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae_jax.config import default
from sae_jax.model.hooks import Hook


@dataclass(frozen=True)
class RoPE:
    """Rotary embedding of one layer: `kind` default, linear (positions / factor) or llama3
    (Llama 3.1's frequency-dependent scaling)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        inv = 1.0 / (np.float32(self.theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
        if self.kind == "linear":
            inv = inv / np.float32(self.factor)
        elif self.kind == "llama3":
            wavelen = 2 * np.pi / inv
            low_wl = self.original_max_position / self.low_freq_factor
            high_wl = self.original_max_position / self.high_freq_factor
            scaled = np.where(wavelen > low_wl, inv / self.factor, inv)
            smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
            inv = np.where(medium, smoothed, scaled)
        return inv.astype(np.float32)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    head_dim: int
    family: str = "llama"  # llama | qwen2 | qwen3 | gemma2 | gemma3 | gpt2 (informational; the switches below decide)
    norm: str = "rms"  # rms | rms_gemma (x * (1 + w)) | layer (LayerNorm with bias)
    norm_eps: float = 1e-5
    act: str = "silu"  # silu | gelu_tanh
    gated_mlp: bool = True
    qkv_bias: bool = False  # Qwen2, GPT-2, Llama with attention_bias
    o_bias: bool = False  # GPT-2, Llama with attention_bias (the plain GELU MLP always has biases)
    qk_norm: bool = False  # Qwen3, Gemma 3: a norm over head_dim on q and k before RoPE
    post_norms: bool = False  # Gemma 2/3: norms on the attention and MLP outputs
    embed_scale: bool = False  # Gemma: embeddings x sqrt(d_model)
    learned_positions: bool = False  # GPT-2: position embeddings instead of RoPE
    max_position: int = 8192
    query_scale: float = 0.0  # scores x this (0: 1 / sqrt(head_dim))
    attn_softcap: float = 0.0  # Gemma 2: tanh(scores / c) * c (0: none)
    final_softcap: float = 0.0  # Gemma 2: the same on the logits
    windows: tuple[int, ...] = ()  # per layer: sliding-window size (0 or absent: global attention)
    rope: tuple[RoPE, ...] = field(default_factory=tuple)  # per layer (empty: RoPE() everywhere unless learned positions)
    tie_embeddings: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def hook_width(self, point: str) -> int:
        return self.n_heads * self.head_dim if point == "attn_z" else self.d_model

    def window(self, layer: int) -> int:
        return self.windows[layer] if layer < len(self.windows) else 0

    def rope_of(self, layer: int) -> RoPE:
        return self.rope[layer] if layer < len(self.rope) else RoPE()


def _param(w, dtype) -> nnx.Param:
    """A weight as a parameter in `dtype`: a device array keeps its placement (its shards), a host
    array goes to the default device, an abstract one (`jax.ShapeDtypeStruct`) stays abstract."""
    if isinstance(w, jax.ShapeDtypeStruct):
        return nnx.Param(w if w.dtype == dtype else jax.ShapeDtypeStruct(w.shape, dtype, sharding=w.sharding))
    if isinstance(w, jax.Array):
        return nnx.Param(w if w.dtype == dtype else w.astype(dtype))
    return nnx.Param(jnp.asarray(np.asarray(w), dtype=dtype))


class Norm(nnx.Module):
    """RMSNorm (`rms`: x / rms * w; `rms_gemma`: x / rms * (1 + w)) or LayerNorm (`layer`), in float32."""

    def __init__(self, kind: str, weight, eps: float, dtype, bias=None):
        self.kind, self.eps = kind, eps
        self.weight = _param(weight, dtype)
        if kind == "layer":
            self.bias = _param(bias, dtype)

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        w = self.weight[...].astype(jnp.float32)
        if self.kind == "layer":
            mu = xf.mean(-1, keepdims=True)
            var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
            return ((xf - mu) * jax.lax.rsqrt(var + self.eps) * w + self.bias[...].astype(jnp.float32)).astype(x.dtype)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + w) if self.kind == "rms_gemma" else y * w).astype(x.dtype)


def rope(x, positions, inv_freq):
    """Rotate-half RoPE on `x [B, T, N, H]` with the layer's inverse frequencies [H/2]."""
    h = x.shape[-1]
    ang = positions[:, :, None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B, T, H/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, axis=-1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : h // 2], xf[..., h // 2 :]
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rot * sin).astype(x.dtype)


ATTN_BLOCK = 512  # queries per block of the blocked attention (contexts longer than this)


def _attention(q, k, v, scale: float, window: int, softcap: float):
    """Causal attention, `q [B, T, N, H]`, `k, v [B, T, K, H]` (grouped queries); a token sees the
    `window` most recent positions including itself when window > 0; scores soft-capped when
    softcap > 0.

    Contexts longer than `ATTN_BLOCK` (and a multiple of it) go through `blocked_attention`: the
    scores of one block of queries at a time, so no [B, N, T, T] float32 array is ever built
    (the XLA form of `jax.nn.dot_product_attention` builds one). Shorter contexts use the fused op
    (`_scores_attention` when soft-capped: the fused op has no soft-capping)."""
    t = q.shape[1]
    if t > ATTN_BLOCK and t % ATTN_BLOCK == 0:
        return blocked_attention(q, k, v, scale, window, softcap, ATTN_BLOCK)
    if not softcap:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=(window - 1, 0) if window else None)
    return _scores_attention(q, k, v, scale, window, softcap, 0)


def _scores_attention(q, k, v, scale: float, window: int, softcap: float, q0):
    """Attention of queries `q [B, tq, N, H]` at positions q0.. over all keys `k, v [B, T, K, H]`,
    written out in float32 (scores [B, N, tq, T])."""
    tq, t = q.shape[1], k.shape[1]
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if softcap:
        s = jnp.tanh(s / softcap) * softcap
    i, j = q0 + jnp.arange(tq)[:, None], jnp.arange(t)[None, :]
    mask = (j <= i) & ((i - j < window) if window else True)
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", p, v.astype(jnp.float32)).astype(q.dtype)


def blocked_attention(q, k, v, scale: float, window: int, softcap: float, block: int):
    """`_scores_attention` over blocks of `block` queries in turn (a scan): each row's softmax is
    the same full row as the unblocked form, the live scores are [B, N, block, T]."""
    b, t, n, h = q.shape
    qs = q.reshape(b, t // block, block, n, h).swapaxes(0, 1)

    def one(_, x):
        i, qb = x
        return None, _scores_attention(qb, k, v, scale, window, softcap, i * block)

    _, out = jax.lax.scan(one, None, (jnp.arange(t // block), qs))
    return out.swapaxes(0, 1).reshape(b, t, n, h)


def _act(kind: str, x):
    return jax.nn.silu(x) if kind == "silu" else jax.nn.gelu(x, approximate=True)


class Block(nnx.Module):
    """One decoder layer; `w` holds the layer's weights under the short names the loaders use
    (norm1, norm2, q_proj, k_proj, v_proj, o_proj, [q/k/v/o_bias], [q_norm, k_norm],
    [post_attn_norm, post_mlp_norm], gate_proj/up_proj/down_proj or fc/proj [+ biases])."""

    def __init__(self, cfg: ModelConfig, layer: int, w: dict, dtype):
        self.cfg, self.layer = cfg, layer
        norm = lambda name: Norm(cfg.norm, w[name], cfg.norm_eps, dtype, w.get(name + "_bias"))  # noqa: E731
        self.norm1, self.norm2 = norm("norm1"), norm("norm2")
        self.wq, self.wk, self.wv, self.wo = (_param(w[n], dtype) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if cfg.qkv_bias:
            self.bq, self.bk, self.bv = (_param(w[n], dtype) for n in ("q_bias", "k_bias", "v_bias"))
        if cfg.o_bias:
            self.bo = _param(w["o_bias"], dtype)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = norm("q_norm"), norm("k_norm")
        if cfg.post_norms:
            self.post_attn_norm, self.post_mlp_norm = norm("post_attn_norm"), norm("post_mlp_norm")
        if cfg.gated_mlp:
            self.w_gate, self.w_up, self.w_down = (_param(w[n], dtype) for n in ("gate_proj", "up_proj", "down_proj"))
        else:
            self.w_fc, self.w_proj = _param(w["fc"], dtype), _param(w["proj"], dtype)
            self.b_fc, self.b_proj = _param(w["fc_bias"], dtype), _param(w["proj_bias"], dtype)
        # plain floats: static configuration, not a parameter
        self.inv_freq = None if cfg.learned_positions else tuple(float(f) for f in cfg.rope_of(layer).inv_freq(cfg.head_dim))

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
        h = self.norm1(x)
        q, k, v = h @ self.wq[...], h @ self.wk[...], h @ self.wv[...]
        if cfg.qkv_bias:
            q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
        q = q.reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.inv_freq is not None:
            q, k = rope(q, positions, self.inv_freq), rope(k, positions, self.inv_freq)
        scale = cfg.query_scale or 1.0 / math.sqrt(cfg.head_dim)
        z = _attention(q, k, v, scale, cfg.window(self.layer), cfg.attn_softcap)
        z = at("attn_z", z.reshape(b, t, cfg.n_heads * cfg.head_dim))
        a = z @ self.wo[...]
        if cfg.o_bias:
            a = a + self.bo[...]
        if cfg.post_norms:
            a = self.post_attn_norm(a)
        attn_out = at("attn_out", a)
        mid = at("resid_mid", x + attn_out)
        m_in = at("mlp_in", self.norm2(mid))
        if cfg.gated_mlp:
            m = (_act(cfg.act, m_in @ self.w_gate[...]) * (m_in @ self.w_up[...])) @ self.w_down[...]
        else:
            m = _act(cfg.act, m_in @ self.w_fc[...] + self.b_fc[...]) @ self.w_proj[...] + self.b_proj[...]
        if cfg.post_norms:
            m = self.post_mlp_norm(m)
        mlp_out = at("mlp_out", m)
        post = at("resid_post", mid + mlp_out)
        return post, out


class Transformer(nnx.Module):
    """The decoder. `weights` maps short names (`embed_tokens`, `norm` [+ `norm_bias`],
    [`lm_head`], [`pos_embed`], `layers.i` -> the block's dict) to `[in, out]` numpy arrays."""

    def __init__(self, cfg: ModelConfig, weights: dict, dtype=None):
        dtype = jnp.dtype(default("model.dtype") if dtype is None else dtype)
        self.cfg = cfg
        self.embed = _param(weights["embed_tokens"], dtype)
        if cfg.learned_positions:
            self.pos_embed = _param(weights["pos_embed"], dtype)
        self.blocks = nnx.List([Block(cfg, i, weights[f"layers.{i}"], dtype) for i in range(cfg.n_layers)])
        self.final_norm = Norm(cfg.norm, weights["norm"], cfg.norm_eps, dtype, weights.get("norm_bias"))
        if not cfg.tie_embeddings:
            self.lm_head = _param(weights["lm_head"], dtype)

    def unembed(self, x):
        w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        logits = (self.final_norm(x) @ w).astype(jnp.float32)
        if self.cfg.final_softcap:
            logits = jnp.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

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
        if self.cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(self.cfg.d_model), x.dtype)
        if self.cfg.learned_positions:
            x = x + self.pos_embed[...][:t][None]
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
