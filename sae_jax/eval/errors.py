class EvalError(RuntimeError):
    """An evaluation that cannot run as asked (a store of another model, no held-out rows, ...)."""
