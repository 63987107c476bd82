"""What a command raises to fail in one line (exit status 2)."""


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""
