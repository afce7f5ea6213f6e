"""Errors the command line turns into one clear line on stderr (design.md §5 exit codes)."""


class WsigenError(Exception):
    """A runtime error the user can act on: exit code 1, message says what and what to do."""

    exit_code = 1


class UsageError(WsigenError):
    """Options that cannot work together or are out of range: exit code 2."""

    exit_code = 2


class PeerLost(WsigenError):
    """A collective or point-to-point transfer failed: another worker has died or stopped."""
