"""The README's demo: about 100k tokens of two hook points of the embedded model.

    sae-jax demo            # == sae-jax harvest --config=configs/demo.py

Expected: a complete store in runs/demo/store (4 shards, 97,280 rows per hook, bf16,
216 MiB) and its summary printed; about 2 minutes on a 2-core CPU.
"""

from sae_jax.config import default_config


def get_config():
    c = default_config()
    c.harvest.out = "runs/demo/store"
    c.harvest.hooks = "blocks.12.hook_resid_post,blocks.12.hook_mlp_out"
    c.harvest.tokens = 100_000
    c.harvest.seqs_per_shard = 256  # small shards, so that the demo shows (and resumes by) several
    return c
