"""User-facing errors.

A ``GradflowError`` means the *user* asked for something impossible (a missing store, a bad option
value, a model without parameters). The CLI prints its message as one line and exits with code 2,
without a traceback; library callers get an ordinary exception they can catch. Bugs are not
GradflowErrors and keep their tracebacks.
"""


class GradflowError(ValueError):
    """A user mistake, reported as one clear line (exit code 2 on the command line)."""


class GradflowWarning(UserWarning):
    """Something went wrong that training survives (e.g. a store write failed); one line."""
