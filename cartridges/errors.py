"""The one exception type for user mistakes.

The CLI turns a `CartridgeError` into a single line on stderr and exit code 2; anything else is a
bug and keeps its traceback.
"""

import reprlib
import sys
from collections.abc import Callable

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 60, 60, 40
_SHORT.maxdict = _SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = 4


def short_repr(value) -> str:
    """`repr` of at most about 80 characters, built without the repr of the whole value (which, for a
    huge or deeply nested input, costs as much as the input)."""
    text = _SHORT.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class CartridgeError(Exception):
    """A problem the user can fix: the message names what is wrong and what to do."""


class NotFound(CartridgeError):
    """A reference names no live version: no such name, version or alias (a server answers 404)."""


def short_list(items: list, shown: int = 6) -> str:
    """A list for a one-line message: the first and last few, and how many between."""
    texts = [str(item) for item in items]
    if len(texts) <= shown:
        return ", ".join(texts)
    half = shown // 2
    return f"{', '.join(texts[:half])}, ... ({len(texts) - shown} more) ..., {', '.join(texts[-half:])}"


def first_problem(exc) -> tuple[str, str, str]:
    """(dotted key, pydantic's message, the value given, shortened) of a ValidationError's first problem."""
    first = exc.errors()[0]
    return ".".join(str(part) for part in first["loc"]), first["msg"], short_repr(first.get("input"))


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
