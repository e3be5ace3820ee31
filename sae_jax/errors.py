"""The one base class of "bad input" errors: the CLI reports any `SaeJaxError` in one line with
exit status 1, without a traceback. A leaf module (no imports), so every subsystem can subclass
it and the CLI can catch it without loading jax, orbax or grain."""


class SaeJaxError(Exception):
    """Bad input or a run that cannot go on as asked; the message names the file, key or shape."""


class Interrupted(SaeJaxError):
    """A run stopped by a signal after saving what it had done: the CLI prints the message in one
    line and exits with `exit_code`, 128 + the signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
