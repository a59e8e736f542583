"""One exception type for every error a user can fix: the CLI prints it as one line."""


class SiclipError(Exception):
    """A user-facing error: the message names what is wrong and where."""


class DiskError(SiclipError):
    """A write that the disk refused (full, over quota, read-only): nothing written before is lost,
    and the same command, rerun once there is room, goes on."""
