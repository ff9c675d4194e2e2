"""The one exception type for user mistakes.

The CLI turns a `CartridgeError` into a single line on stderr and exit code 2; anything else is a
bug and keeps its traceback.
"""

import sys
from collections.abc import Callable


class CartridgeError(Exception):
    """A problem the user can fix: the message names what is wrong and what to do."""


class NotFound(CartridgeError):
    """A reference names no live version: no such name, version or alias (a server answers 404)."""


def invalid_settings(exc, source: str, what: str = "setting") -> CartridgeError:
    """One line for a pydantic ValidationError of a config or a record read from `source`: where, the first
    problem's dotted key, pydantic's message and the value given (shortened)."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    given = repr(first.get("input"))
    given = given if len(given) <= 80 else given[:77] + "..."
    return CartridgeError(f"{source}: invalid {what} {where!r}: {first['msg']} (got {given})")


def run_script(main: Callable[[], None]) -> None:
    """Run a script's `main` (the benchmarks): a CartridgeError becomes one line on stderr and exit code 2."""
    try:
        main()
    except CartridgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
