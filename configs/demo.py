"""The README's demo: harvest ~200k tokens of two layers of the embedded model, then train a bank
of two TopK SAEs (one per layer, 4608 = 8 x d_model latents, k = 32) on them.

    sae-jax demo            # == make demo

Expected on a 2-core CPU: see the README (time, FVU reached); prints the store summary, FVU,
L0 and dead % per SAE, and the paths of the plots written into runs/demo/train.
"""

from sae_jax.config import default_config, small_run


def get_config():
    c = small_run(default_config(), "runs/demo/train")
    c.harvest.out = "runs/demo/store"
    c.harvest.hooks = "blocks.6.hook_resid_post,blocks.12.hook_resid_post"
    c.harvest.tokens = 200_000
    c.harvest.seqs_per_shard = 256  # small shards, so the demo shows (and resumes by) several

    c.train.store = c.harvest.out
    c.train.log_every = 5
    return c
