"""A skip transcoder of layer 6's MLP (its normalised input to its output) on the embedded model.

    sae-jax harvest --config=configs/transcoder.py      # both hooks in one pass: runs/transcoder/store
    sae-jax train   --config=configs/transcoder.py

TopK, 4608 latents, k = 32, with a linear skip W_skip. Export with `--format sparsify` (TopK
transcoders) or switch `train.architecture` to jumprelu (and set `train.l0_coefs`) for SAELens.
"""

from sae_jax.config import default_config, small_run


def get_config():
    c = small_run(default_config(), "runs/transcoder/train")
    c.harvest.out = "runs/transcoder/store"
    c.harvest.hooks = "blocks.6.hook_mlp_in,blocks.6.hook_mlp_out"
    c.harvest.tokens = 200_000
    c.harvest.seqs_per_shard = 256

    c.train.store = c.harvest.out
    c.train.hooks = "blocks.6.hook_mlp_in"
    c.train.out_hooks = "blocks.6.hook_mlp_out"
    c.train.skip = True
    return c
