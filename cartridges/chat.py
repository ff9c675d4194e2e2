"""The terminal chat session: streaming answers, `/reset` and `/exit`, Ctrl-C to stop an answer."""

from collections.abc import Callable
from contextlib import closing

from rich.console import Console

from cartridges.errors import CartridgeError
from cartridges.runtime import CartridgeRuntime

HELP = "Type a message; /reset clears the conversation, /exit quits. Ctrl-C stops an answer; at the prompt it quits."


def describe(runtime: CartridgeRuntime) -> str:
    names = " + ".join(c.manifest.label for c in runtime.cartridges)
    return f"{names}: {runtime.num_tokens} cartridge tokens, KV memory {runtime.kv_bytes / 2**20:.1f} MB on {runtime.loaded.model_id}"


def chat_session(
    runtime: CartridgeRuntime | None,
    read_line: Callable[[], str],
    console: Console,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    route: Callable[[list[dict[str, str]]], tuple[CartridgeRuntime, str | None]] | None = None,
    title: str | None = None,
) -> None:
    """Run turns until `/exit`, end of input or Ctrl-C at the prompt; history is kept across turns until `/reset`.

    Ctrl-C while an answer streams stops it and keeps what was said so far; an error in a turn
    (a chat past the model's window, a failed generation) is one line, and the session goes on.
    With `route` (a library), each turn's runtime is `route(history)`, and the line it returns, if
    any, is shown before the answer.
    """
    console.print(f"[bold]{describe(runtime) if runtime is not None else title}[/bold]\n{HELP}")
    history: list[dict[str, str]] = []
    while True:
        try:
            line = read_line().strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            break
        if line == "/exit":
            break
        if line == "/reset":
            history.clear()
            console.print("[dim](conversation cleared)[/dim]")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        pieces: list[str] = []
        try:
            if route is not None:
                runtime, note = route(history)
                if note:
                    console.print(note, style="dim", markup=False, highlight=False)
            with closing(runtime.stream(history, max_new_tokens=max_new_tokens, temperature=temperature)) as answer:
                for piece in answer:
                    console.print(piece, end="", markup=False, highlight=False)
                    pieces.append(piece)
            console.print()
        except KeyboardInterrupt:
            console.print("\n[dim](stopped)[/dim]")
        except CartridgeError as exc:
            console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
            history.pop()
            continue
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
