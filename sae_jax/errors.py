"""The one base class of "bad input" errors: the CLI reports any `SaeJaxError` in one line with
exit status 1, without a traceback. A leaf module (no imports), so every subsystem can subclass
it and the CLI can catch it without loading jax, orbax or grain."""


class SaeJaxError(Exception):
    """Bad input or a run that cannot go on as asked; the message names the file, key or shape."""
