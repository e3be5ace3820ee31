from sae_jax.errors import SaeJaxError


class EvalError(SaeJaxError, RuntimeError):
    """An evaluation that cannot run as asked (a store of another model, no held-out rows, ...)."""
