"""The language model's weights on a device mesh: logical axes per weight, one rule table.

Tensor parallelism in the Megatron pattern over the mesh's `model` axis: the query, key and value
projections split by heads (their output columns), the attention output projection by heads (its
input rows), the MLP's gate / up (or fc) by its hidden units and down (or proj) by the same rows,
the embedding table by vocabulary. Each block then ends in two all-reduces over `model` (after
the attention output and the MLP output); everything else is local to a device. Contexts are split
over the `data` axis. Norms, biases of the residual stream and RoPE tables are small and
replicated.

Why tensor parallel rather than FSDP: a harvest is a forward only, run for many batches with the
same weights. FSDP would all-gather every layer's weights on every batch (the whole model's bytes
per forward on every device); tensor parallelism moves only activations (2 x batch x ctx x d_model
per layer), which for the batch a harvest runs is far less, and keeps each device's weight shard
resident.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sae_jax.errors import SaeJaxError

# logical axis -> mesh axis (None: replicated)
RULES = {"vocab": "model", "heads": "model", "kv_heads": "model", "mlp": "model", "embed": None, "head_dim": None, "position": None}

# the weights' logical axes, by the short names `Transformer` takes ([in, out] orientation)
WEIGHT_AXES = {
    "embed_tokens": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "pos_embed": ("position", "embed"),
    "norm": ("embed",),
    "norm_bias": ("embed",),
    "norm1": ("embed",),
    "norm1_bias": ("embed",),
    "norm2": ("embed",),
    "norm2_bias": ("embed",),
    "post_attn_norm": ("embed",),
    "post_mlp_norm": ("embed",),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "q_bias": ("heads",),
    "k_bias": ("kv_heads",),
    "v_bias": ("kv_heads",),
    "o_bias": ("embed",),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "fc": ("embed", "mlp"),
    "fc_bias": ("mlp",),
    "proj": ("mlp", "embed"),
    "proj_bias": ("embed",),
}

# the attribute names of `Transformer` / `Block` parameters -> the short names above (norm weights
# and biases, whose paths end in `weight` / `bias`, are replicated)
ATTRS = {
    "embed": "embed_tokens",
    "lm_head": "lm_head",
    "pos_embed": "pos_embed",
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "bq": "q_bias",
    "bk": "k_bias",
    "bv": "v_bias",
    "bo": "o_bias",
    "w_gate": "gate_proj",
    "w_up": "up_proj",
    "w_down": "down_proj",
    "w_fc": "fc",
    "b_fc": "fc_bias",
    "w_proj": "proj",
    "b_proj": "proj_bias",
}

# of a device's memory the automatic mesh lets the weights take (the rest: activations, the
# runtime); `compile-check --job harvest` then measures the real peak
WEIGHT_SHARE = 0.75

TOKENS = P("data", None)  # [batch, ctx]
ACTIVATIONS = P("data", None, None)  # [batch, ctx, width]: every hook output, whole on each model column


class ModelShardingError(SaeJaxError, ValueError):
    pass


def splits(cfg, model: int) -> bool:
    """Whether a model axis of `model` splits this model: whole query heads and MLP units per
    device. Key / value heads split too when the axis divides them; past that (a model axis
    larger than Llama 3.3 70B's 8 kv heads) each device keeps every key / value projection, a
    small share of the weights, and computes them redundantly."""
    return not (cfg.n_heads % model or cfg.d_mlp % model)


def check_model_axis(cfg, model: int) -> None:
    """A model axis must split the heads and the MLP evenly (names what it does not divide)."""
    if model <= 1 or splits(cfg, model):
        return
    bad = [f"{name} {n}" for name, n in (("n_heads", cfg.n_heads), ("d_mlp", cfg.d_mlp)) if n % model]
    fits = [m for m in range(1, max(cfg.n_heads, 8) + 1) if splits(cfg, m)]
    raise ModelShardingError(
        f"harvest.mesh_model={model} does not divide the model's {' and '.join(bad)} "
        f"(the model axis splits query heads and MLP units; model axes that do: {', '.join(map(str, fits))})"
    )


def _kv_split(cfg, model: int) -> bool:
    return cfg is None or cfg.n_kv_heads % model == 0


def weight_spec(name: str, shape: tuple[int, ...], model: int, cfg=None) -> P:
    """The PartitionSpec of weight `name` (a short name; `layers.i.` prefixes are ignored).
    A vocabulary that the model axis does not divide stays whole (replicated), and so do the
    key / value projections when it does not divide the kv heads (`cfg` says)."""
    axes = WEIGHT_AXES[name.rsplit(".", 1)[-1]]
    out = []
    for ax, n in zip(axes, shape, strict=True):
        mesh_ax = RULES[ax]
        if ax == "kv_heads" and not _kv_split(cfg, model):
            mesh_ax = None
        out.append(mesh_ax if mesh_ax and model > 1 and n % model == 0 else None)
    return P(*out)


def weight_sharding(mesh: Mesh | None, name: str, shape: tuple[int, ...], cfg=None):
    """Where weight `name` lives: its shards on `mesh`, or whole on the default device (no mesh)."""
    if mesh is None:
        return jax.sharding.make_single_device_sharding(jax.devices()[0])
    return NamedSharding(mesh, weight_spec(name, shape, mesh.shape["model"], cfg))


def state_shardings(state, mesh: Mesh, cfg=None):
    """NamedShardings for a `Transformer`'s nnx state (its parameters by attribute name)."""

    def one(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        attr = next((n for n in reversed(names) if isinstance(n, str) and n in ATTRS), None)
        if attr is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, weight_spec(ATTRS[attr], tuple(leaf.shape), mesh.shape["model"], cfg))

    return jax.tree_util.tree_map_with_path(one, state)


def harvest_mesh(cfg, h, itemsize: int, devices=None, log=print, memory_limit: int | None = None) -> Mesh:
    """The harvest's mesh (`data` x `model`) over `devices` (default: every device of every
    process; on CPUs the first device of each process: XLA's simulated CPU devices share one host's
    cores and memory, and eight would hold eight copies of the weights for a small gain).

    `harvest.mesh_model` 0 picks the smallest model axis whose weight shards fit `WEIGHT_SHARE`
    of a device's memory (the rest for activations); devices that report no memory (CPUs) take the
    model whole. `harvest.mesh_data` 0 puts every other device on `data`."""
    from sae_jax import parallel

    if devices is None:
        devices = jax.devices()
        if devices[0].platform == "cpu" and not (h.mesh_data or h.mesh_model):
            devices = [next(d for d in devices if d.process_index == p) for p in range(jax.process_count())]
    devices = list(devices)
    n = len(devices)
    model = int(h.mesh_model)
    if model < 0 or h.mesh_data < 0:
        raise ModelShardingError(f"harvest.mesh_data={h.mesh_data}, harvest.mesh_model={h.mesh_model}: 0 (automatic) or a device count")
    if not model:
        limit = memory_limit or _memory_limit(devices[0])
        need = weight_bytes_per_device(cfg, 1, itemsize)
        if limit is None or need <= WEIGHT_SHARE * limit:
            model = 1
        else:
            fit = next((m for m in model_axes(cfg, n) if weight_bytes_per_device(cfg, m, itemsize) <= WEIGHT_SHARE * limit), None)
            if fit is None:
                best = model_axes(cfg, n)[-1]
                raise ModelShardingError(
                    f"the model's weights need {weight_bytes_per_device(cfg, best, itemsize) / 2**30:.2f} GiB per device even split "
                    f"{best} ways, over {WEIGHT_SHARE:.0%} of the {limit / 2**30:.2f} GiB a device has: use more devices (harvest.mesh_model) "
                    "or a smaller model.dtype"
                )
            model = fit
            log(f"harvest mesh: the weights ({need / 2**30:.2f} GiB) do not fit one device; split {model} ways over `model`")
    check_model_axis(cfg, model)
    if n % model:
        raise ModelShardingError(f"harvest.mesh_model={model} does not divide the {n} devices")
    data = int(h.mesh_data) or n // model
    if data * model != n:
        raise ModelShardingError(f"harvest mesh data={data} x model={model} needs {data * model} devices, there are {n}")
    if h.batch_size % data:
        raise ModelShardingError(
            f"harvest.batch_size={h.batch_size} does not split over the mesh's data axis ({data} devices): "
            f"give a multiple of {data} (or set harvest.mesh_data)"
        )
    return parallel.make_mesh(data, model, devices)


def _memory_limit(dev) -> int | None:
    try:
        return (dev.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001  (CPU devices have no memory stats)
        return None


def param_count(cfg) -> int:
    """Parameters of the model (every layer, the embedding, the head when untied)."""
    total = cfg.n_layers * layer_params(cfg) + cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    if cfg.learned_positions:
        total += cfg.max_position * cfg.d_model
    return int(total)


def layer_params(cfg) -> int:
    """Matmul parameters of one decoder layer (attention projections and MLP)."""
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.d_mlp
    return d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2 + (3 if cfg.gated_mlp else 2) * d * f


def forward_flops_per_token(cfg, last_layer: int, ctx_len: int) -> float:
    """Matmul FLOPs per token of a forward that stops after `last_layer` (no unembedding):
    2 x the parameters it multiplies by, plus attention's scores and weighted sum (causal: half
    the context on average)."""
    layers = last_layer + 1
    attn = 2 * 2 * cfg.n_heads * cfg.head_dim * (ctx_len / 2)
    return float(layers * (2 * layer_params(cfg) + attn))


def model_axes(cfg, devices: int) -> list[int]:
    """Model axes that split this model and divide the device count, smallest first."""
    return [m for m in range(1, devices + 1) if devices % m == 0 and splits(cfg, m)]


def weight_bytes_per_device(cfg, model: int, itemsize: int) -> int:
    """Bytes of weights one device holds on a model axis of `model` (sharded weights / model,
    replicated ones whole; the embedding split only when the axis divides the vocabulary)."""
    emb = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    emb_dev = emb // model if cfg.vocab_size % model == 0 else emb
    kv = cfg.n_layers * 2 * cfg.d_model * cfg.n_kv_heads * cfg.head_dim
    kv_dev = kv / model if _kv_split(cfg, model) else kv
    rest = param_count(cfg) - emb - kv
    return int((rest / model + emb_dev + kv_dev) * itemsize)


def smallest_model_axis(cfg, devices: int | None, itemsize: int, budget: float) -> int | None:
    """The smallest model axis (dividing `devices`; None: any up to 1024) whose per-device
    weights take at most `budget` bytes."""
    axes = model_axes(cfg, devices) if devices else [m for m in range(1, 1025) if splits(cfg, m)]
    return next((m for m in axes if weight_bytes_per_device(cfg, m, itemsize) <= budget), None)
