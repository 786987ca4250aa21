"""The one user-facing error type: the CLI prints its message on one line and exits with code 2."""


class LinglabError(Exception):
    """A user-facing error: the CLI prints its one-line message and exits with code 2."""
