"""The one exception type for user mistakes.

The CLI turns a `CartridgeError` into a single line on stderr and exit code 2; anything else is a
bug and keeps its traceback.
"""


class CartridgeError(Exception):
    """A problem the user can fix: the message names what is wrong and what to do."""
