"""The `cartridges` Typer app and what every command group shares: consoles, options, the registry."""

import os
from typing import Annotated

import typer
from rich.console import Console

from cartridges.errors import CartridgeError
from cartridges.home import default_registry_url
from cartridges.registry.store import Registry

app = typer.Typer(
    help="Turn a corpus into a cartridge: a trained KV-cache prefix a model loads instead of the corpus.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

model_app = typer.Typer(help="Manage the embedded default model.", no_args_is_help=True)
app.add_typer(model_app, name="model")

config_app = typer.Typer(help="Build configurations: what a build would use.", no_args_is_help=True)
app.add_typer(config_app, name="config")

schedule_app = typer.Typer(
    help="Nightly rebuilds on Ray; schedules and history live in the registry.", no_args_is_help=True
)
app.add_typer(schedule_app, name="schedule")

console = Console()

errors = Console(stderr=True, soft_wrap=True)

RegistryOption = Annotated[
    str | None,
    typer.Option(
        "--registry", help="Registry folder or fsspec URL (default: $CARTRIDGES_REGISTRY or $CARTRIDGES_HOME/registry)."
    ),
]

ConfigOption = Annotated[
    str, typer.Option("--config", help="YAML file or shipped config: default, tiny, gpu (configs/)")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="override one setting of the config, e.g. --set distill.steps=100 (repeatable)"),
]

ModelOption = Annotated[
    str | None,
    typer.Option("--model", help="'default' (embedded SmolLM2-135M-Instruct), a local HF model folder, or a hub id."),
]

BudgetOption = Annotated[
    int | None,
    typer.Option("--budget", min=2, help="KV tokens a library routes per question (default: the library's own)"),
]


def open_registry(url: str | None, writing: bool = False) -> Registry:
    """The registry of --registry, $CARTRIDGES_REGISTRY or $CARTRIDGES_HOME; `writing`: refuse one that keeps nothing."""
    registry = Registry(url or os.environ.get("CARTRIDGES_REGISTRY") or default_registry_url())
    if writing and registry.is_transient:
        raise CartridgeError(
            f"--registry {registry.url} lives only inside this process: what this command writes would be gone when it exits; "
            "use a folder or an object store URL (s3://bucket/registry)"
        )
    return registry


def report_skipped(skipped: list) -> None:
    """Files and folders of the corpus that were not read, with the reason for each."""
    if skipped:
        shown = "; ".join(str(item) for item in skipped[:8])
        more = f"; and {len(skipped) - 8} more (see ingest.json in the run folder)" if len(skipped) > 8 else ""
        errors.print(f"[yellow]skipped {len(skipped)} file(s) or folder(s): {shown}{more}[/yellow]", highlight=False)
