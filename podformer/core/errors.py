"""The one exception type for bad input: its message names the problem and the fix, on one line."""


class UserError(Exception):
    """Raised for bad configs, flags, data or workdirs; entry points print it as one line and exit 2."""
