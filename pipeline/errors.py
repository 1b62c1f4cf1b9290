"""The one error type fmpipe raises for bad input.

The CLI turns it into a one-line message on stderr and a non-zero exit; anything else
escaping a command is a bug and keeps its traceback.
"""


class FmpipeError(Exception):
    """Bad input or a failed gate: the message names the file/key and what was expected."""
