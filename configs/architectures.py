"""One bank per architecture on the demo store, for comparing them (see benchmarks/architectures.py).

    sae-jax demo                                          # makes runs/demo/store
    sae-jax train --config=configs/architectures.py       # TopK (default)
    sae-jax train --config=configs/architectures.py --config.train.architecture=jumprelu \\
        --config.train.l0_coefs=0.001,0.003,0.01 --config.train.run_dir=runs/arch/jumprelu
    sae-jax train --config=configs/architectures.py --config.train.architecture=batchtopk \\
        --config.train.matryoshka_prefixes=288,1152 --config.train.run_dir=runs/arch/matryoshka

Members: blocks.6.hook_resid_post x width 4608 x three sparsity settings (ks 16, 32, 64 for
TopK / BatchTopK; the L0 or L1 coefficients given on the command line for JumpReLU / ReLU).
"""

from sae_jax.config import default_config, small_run


def get_config():
    c = small_run(default_config(), "runs/arch/topk", steps=150, checkpoint_every=50)
    c.train.store = "runs/demo/store"
    c.train.hooks = "blocks.6.hook_resid_post"
    c.train.ks = "16,32,64"
    return c
