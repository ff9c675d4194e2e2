"""The one exception type for user mistakes.

The CLI turns a `CartridgeError` into a single line on stderr and exit code 2; anything else is a
bug and keeps its traceback.
"""

import sys
from collections.abc import Callable


class CartridgeError(Exception):
    """A problem the user can fix: the message names what is wrong and what to do."""


def first_validation_error(exc, default_location: str) -> tuple[str, str]:
    """(dotted location, message) of the first problem in a pydantic ValidationError."""
    first = exc.errors()[0]
    return ".".join(str(part) for part in first["loc"]) or default_location, first["msg"]


def run_script(main: Callable[[], None]) -> None:
    """Run a script's `main` (the benchmarks): a CartridgeError becomes one line on stderr and exit code 2."""
    try:
        main()
    except CartridgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
