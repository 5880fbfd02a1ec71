"""The one base class for bad input: the CLI and the nodes report these as one line, never a traceback."""


class ZitError(ValueError):
    """Bad input the user can fix; the message names the file, key, field or value."""
