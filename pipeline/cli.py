"""The `cartridges` command line: the app (`cli_app`) with its command groups registered, and `main`."""

import os
import sys

import typer

from cartridges.errors import CartridgeError
from cartridges.pipeline import cli_build, cli_registry, cli_schedule, cli_serve, cli_use  # noqa: F401  (they register the commands)
from cartridges.pipeline.cli_app import app, errors
from cartridges.registry.object_store import storage_problem

# `cartridges --help` lists the commands in the order a newcomer uses them.
HELP_ORDER = ["build", "ask", "chat", "serve", "ls", "show", "verify", "alias", "rm", "compose", "init", "eval"]
HELP_ORDER += ["synthesize", "distill", "gc"]
app.registered_commands.sort(  # a command not listed goes last rather than breaking the CLI at import
    key=lambda command: HELP_ORDER.index(command.name) if command.name in HELP_ORDER else len(HELP_ORDER)
)


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2; Ctrl-C one line and 130."""
    if not sys.stderr.isatty():  # tqdm bars (the one-time GGUF conversion) are carriage-return noise in a log
        os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # sub-second weight loading; the bars only add noise
    try:
        code = app(standalone_mode=False)  # click's usage errors come here as exceptions, said in one line below
    except typer.TyperException as exc:  # a mistyped option, a value out of range, a missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":  # `cartridges` or a group alone: its help, as before
            errors.print(exc.ctx.get_help() if exc.ctx else exc.format_message(), highlight=False)
            sys.exit(2)
        command = exc.ctx.command_path if getattr(exc, "ctx", None) else "cartridges"
        message = " ".join(exc.format_message().split())
        errors.print(f"[bold red]error:[/bold red] {message} (see `{command} --help`)", highlight=False)
        sys.exit(2)
    except typer.Abort:
        errors.print("interrupted", highlight=False)
        sys.exit(130)
    except CartridgeError as exc:
        errors.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        errors.print("interrupted", highlight=False)
        sys.exit(130)
    except Exception as exc:  # a store that cannot be reached or used is the user's to fix; anything else is a bug
        problem = storage_problem(exc)
        if problem is None:
            raise
        errors.print(f"[bold red]error:[/bold red] {problem}", highlight=False)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)  # typer.Exit(code) and --help come back as a code


if __name__ == "__main__":
    main()
