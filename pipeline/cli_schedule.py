"""Nightly rebuilds on Ray: schedule add, start, list, remove, run-now, history."""

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cartridges.errors import CartridgeError
from cartridges.pipeline.cli_app import (
    ConfigOption,
    RegistryOption,
    SetOption,
    console,
    open_registry,
    schedule_app,
)


def _scheduler(registry: str | None, writing: bool = False):
    from cartridges.pipeline.scheduler import Scheduler, build_schedule

    reg = open_registry(registry, writing)
    return Scheduler(reg, build_schedule(reg.url))


@schedule_app.command("add")
def schedule_add(
    corpus: Annotated[Path, typer.Argument(help="corpus folder to rebuild from")],
    name: Annotated[str, typer.Option("--name", help="registry name of the cartridge")],
    cron: Annotated[str, typer.Option("--cron", help="cron expression, UTC")] = "0 2 * * *",
    config: ConfigOption = "default",
    overrides: SetOption = None,
    registry: RegistryOption = None,
) -> None:
    """Rebuild a cartridge at cron times (replaces a schedule of the same name).

    Example: cartridges schedule add legal/ --name legal --cron "0 2 * * *"
    """
    from cartridges.pipeline.build_config import load_build_config

    if not corpus.is_dir():
        raise CartridgeError(f"corpus folder {corpus} does not exist: pass a folder of documents")
    load_build_config(config, overrides or [])  # a bad config fails now, not at 2 a.m.
    scheduler = _scheduler(registry, writing=True)
    schedule = scheduler.add(name, str(corpus.resolve()), cron, config, overrides or [])
    console.print(f"scheduled {schedule.name}: {schedule.cron} (next {schedule.next_run})")
    if os.environ.get("RAY_ADDRESS"):
        from cartridges.pipeline.scheduler import ensure_actor

        ensure_actor(scheduler.registry.url)
        console.print("the scheduler actor is running on the Ray cluster")
    else:
        console.print(
            "start the scheduler on a Ray cluster to run it: ray start --head; RAY_ADDRESS=auto cartridges schedule start"
        )


@schedule_app.command("start")
def schedule_start(registry: RegistryOption = None) -> None:
    """Start the cluster's scheduler actor (detached, named; a no-op when it runs).

    Example: RAY_ADDRESS=auto cartridges schedule start
    """
    from cartridges.pipeline.scheduler import ensure_actor

    if not os.environ.get("RAY_ADDRESS"):
        raise CartridgeError("the scheduler needs a running Ray cluster: `ray start --head`, then set RAY_ADDRESS=auto")
    names = ensure_actor(open_registry(registry).url)
    console.print(f"scheduler running ({names})")


@schedule_app.command("list")
def schedule_list(registry: RegistryOption = None) -> None:
    """Every schedule, its next time and its last outcome.

    Example: cartridges schedule list
    """
    scheduler = _scheduler(registry)
    last = {h.name: h for h in scheduler.history()}
    table = Table("name", "corpus", "cron", "next run (UTC)", "last outcome")
    for s in scheduler.schedules():
        outcome = last.get(s.name)
        table.add_row(s.name, s.corpus, s.cron, s.next_run, f"{outcome.status} {outcome.finished}" if outcome else "")
    console.print(table)


@schedule_app.command("remove")
def schedule_remove(
    name: Annotated[str, typer.Argument(help="schedule name")], registry: RegistryOption = None
) -> None:
    """Stop rebuilding NAME (its cartridges stay).

    Example: cartridges schedule remove legal
    """
    _scheduler(registry, writing=True).remove(name)
    console.print(f"removed schedule {name}")


@schedule_app.command("run-now")
def schedule_run_now(
    name: Annotated[str, typer.Argument(help="schedule name")], registry: RegistryOption = None
) -> None:
    """Build a schedule now, in this process, and record the outcome.

    Example: cartridges schedule run-now legal
    """
    outcome = _scheduler(registry, writing=True).run(name)
    if outcome is None:
        raise CartridgeError(f"a build of {name} is already running")
    console.print(f"{name}: {outcome.status} ({outcome.detail})")
    if outcome.status == "failed":
        raise typer.Exit(1)


@schedule_app.command("history")
def schedule_history(
    name: Annotated[str | None, typer.Argument(help="only this schedule")] = None, registry: RegistryOption = None
) -> None:
    """Past scheduled builds, oldest first.

    Example: cartridges schedule history legal
    """
    table = Table("name", "started", "finished", "status", "detail")
    for h in _scheduler(registry).history(name):
        table.add_row(h.name, h.started, h.finished, h.status, h.detail)
    console.print(table)
