"""A bank of four TopK SAEs trained by one step on the same batches: 2 hooks x 2 widths.

    sae-jax demo                                   # makes runs/demo/store first
    sae-jax train --config=configs/bank.py

Members: blocks.{6,12}.hook_resid_post x widths {4608, 9216}, k = 32. Padding to the widest
width costs 4 x 9216 / 27648 = 1.33x the encoder work of four separate SAEs.
"""

from sae_jax.config import default_config, small_run


def get_config():
    c = small_run(default_config(), "runs/bank")
    c.train.store = "runs/demo/store"
    c.train.hooks = "blocks.6.hook_resid_post,blocks.12.hook_resid_post"
    c.train.widths = "4608,9216"
    return c
