"""One exception type for every error a user can fix: the CLI prints it as one line."""


class SiclipError(Exception):
    """A user-facing error: the message names what is wrong and where."""
