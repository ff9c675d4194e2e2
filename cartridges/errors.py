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


def first_problem(exc) -> tuple[str, str, str]:
    """(dotted key, pydantic's message, the value given, shortened) of a ValidationError's first problem."""
    first = exc.errors()[0]
    given = repr(first.get("input"))
    return ".".join(str(part) for part in first["loc"]), first["msg"], given if len(given) <= 80 else given[:77] + "..."


def invalid_settings(exc, source: str, what: str = "setting") -> CartridgeError:
    """One line for a pydantic ValidationError of a config or a record read from `source`."""
    where, message, given = first_problem(exc)
    return CartridgeError(f"{source}: invalid {what} {where or '(top level)'!r}: {message} (got {given})")


def run_script(main: Callable[[], None]) -> None:
    """Run a script's `main` (the benchmarks): a CartridgeError becomes one line on stderr and exit code 2."""
    try:
        main()
    except CartridgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
