"""Progress display for long stages: items done, items/s, generated tokens/s and ETA."""

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ThroughputProgress:
    """A rich progress bar whose text shows rates; `advance(items, tokens)` after each unit of work."""

    def __init__(self, description: str, total: int, unit: str = "samples", console: Console | None = None):
        self.unit = unit
        self.started = time.perf_counter()
        self.items = 0
        self.tokens = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rates]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
        )
        self.task = self.progress.add_task(description, total=total, rates="")

    def __enter__(self) -> "ThroughputProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def advance(self, items: int, tokens: int = 0) -> None:
        self.items += items
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rates = f"{self.items / elapsed:.2f} {self.unit}/s, {self.tokens / elapsed:.1f} tok/s"
        self.progress.update(self.task, advance=items, rates=rates)
