"""Defaults: SmolLM2-135M (embedded GGUF) over the King James Bible, two hooks of layer 12.

sae-jax harvest --config=configs/default.py --config.harvest.out=runs/store
"""

from sae_jax.config import default_config


def get_config():
    return default_config()
