"""The terminal chat session: streaming answers, `/reset` and `/exit`."""

from collections.abc import Callable

from rich.console import Console

from cartridges.runtime import CartridgeRuntime

HELP = "Type a message; /reset clears the conversation, /exit quits."


def describe(runtime: CartridgeRuntime) -> str:
    names = " + ".join(f"{c.manifest.name}@{c.manifest.version}" if c.manifest.version else c.manifest.name for c in runtime.cartridges)
    return f"{names}: {runtime.num_tokens} cartridge tokens, KV memory {runtime.kv_bytes / 2**20:.1f} MB on {runtime.loaded.model_id}"


def chat_session(
    runtime: CartridgeRuntime,
    read_line: Callable[[], str],
    console: Console,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
) -> None:
    """Run turns until `/exit` or end of input; history is kept across turns until `/reset`."""
    console.print(f"[bold]{describe(runtime)}[/bold]\n{HELP}")
    history: list[dict[str, str]] = []
    while True:
        try:
            line = read_line().strip()
        except (EOFError, KeyboardInterrupt):
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
        pieces = []
        for piece in runtime.stream(history, max_new_tokens=max_new_tokens, temperature=temperature):
            console.print(piece, end="", markup=False, highlight=False)
            pieces.append(piece)
        console.print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
