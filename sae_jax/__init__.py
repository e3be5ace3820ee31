"""sae_jax: sparse autoencoders, transcoders and banks of them on transformer activations, in JAX.

    import sae_jax
    sae_jax.fit(store=..., run_dir=..., widths=[16384], ks=[32])   # sae_jax.api
    saes = sae_jax.load(run_dir)
    sae_jax.evaluate(run_dir)
    atlas = sae_jax.read_atlas(run_dir + "/atlas")                  # what `sae-jax atlas` wrote

Importing the package loads nothing heavy (no JAX, no model, no kernels): each function imports
what it needs when called.
"""

__all__ = ["fit", "load", "evaluate", "read_atlas", "Dictionary", "Dictionaries"]


def __getattr__(name):
    if name in __all__:
        from sae_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'sae_jax' has no attribute {name!r}")
