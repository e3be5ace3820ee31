"""Run in .peer-venv: build latent records from a sae-jax delphi cache with delphi's own LatentDataset.

    python delphi_records.py CACHE_DIR   (CACHE_DIR: DIR/<member> as `sae-jax atlas --delphi DIR` writes it)

Prints one JSON line: per hookpoint and latent, the per-example maximum activations of the record's
examples in delphi's order (the top windows first), the token at each maximum, the token count and
the first 64 tokens of the cache.
"""

import json
import sys
from pathlib import Path

sys.stdout, PROTO = sys.stderr, sys.stdout  # library prints must not break the last-line protocol

from delphi.config import ConstructorConfig, SamplerConfig  # noqa: E402
from delphi.latents import LatentDataset  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

root = Path(sys.argv[1])
tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"))
ds = LatentDataset(
    raw_dir=str(root / "latents"),
    sampler_cfg=SamplerConfig(n_examples_train=10, n_examples_test=5, n_quantiles=5, train_type="top"),
    constructor_cfg=ConstructorConfig(min_examples=1, n_non_activating=0, example_ctx_len=16, non_activating_source="random"),
    tokenizer=tok,
)
out = {"modules": ds.modules, "tokens_shape": list(ds.tokens.shape), "tokens_head": ds.tokens.reshape(-1)[:64].tolist(), "latents": {}}
for rec in ds:
    ex = rec.examples  # every activating window, ordered by maximum activation
    maxes = [float(e.activations.max()) for e in ex]
    at = [int(e.tokens[int(e.activations.argmax())]) for e in ex]
    out["latents"][f"{rec.latent.module_name}:{rec.latent.latent_index}"] = {
        "max": maxes,
        "token": at,
        "frequency": rec.per_token_frequency,
        "train": len(rec.train),
    }
PROTO.write(json.dumps(out) + "\n")
