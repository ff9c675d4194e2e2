"""Progress display for long stages: items done, items/s, generated tokens/s and ETA.

On a terminal this is a rich progress bar. Anywhere else (CI, `nohup`, a log file, the nightly
scheduler) a bar prints nothing useful, so a plain line goes to stderr every
`$CARTRIDGES_PROGRESS_SECONDS` seconds (default 30) and when the stage ends.
"""

import os
import time
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PLAIN_INTERVAL_SECONDS = 30.0


def plain_interval() -> float:
    return float(os.environ.get("CARTRIDGES_PROGRESS_SECONDS", PLAIN_INTERVAL_SECONDS))


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class ThroughputProgress:
    """Progress whose text shows rates; `advance(items, tokens)` after each unit of work."""

    def __init__(self, description: str, total: int, unit: str = "samples", console: Console | None = None):
        self.description, self.total, self.unit = description, total, unit
        self.console = console or Console(stderr=True)
        self.started = time.perf_counter()
        self.last_line = self.started
        self.items = 0
        self.tokens = 0
        self.first_unit: tuple[float, int] | None = None  # (when, items) at the first advance
        self.progress = None
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rates]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task(description, total=total, rates="")

    def __enter__(self) -> "ThroughputProgress":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
        elif self.items:
            self._print_line()

    def _rates(self, elapsed: float) -> str:
        return f"{self.items / elapsed:.2f} {self.unit}/s, {self.tokens / elapsed:.1f} tok/s"

    def steady_rate(self, now: float) -> float:
        """Items per second since the first unit finished: the first unit also carries the start-up
        (a Ray cluster, an engine actor loading the model: minutes on a CPU), which the remaining
        units do not pay; averaged over the whole elapsed time it tripled the early ETAs of a build."""
        if self.first_unit is not None and self.items > self.first_unit[1] and now > self.first_unit[0]:
            return (self.items - self.first_unit[1]) / (now - self.first_unit[0])
        return self.items / max(now - self.started, 1e-9)

    def plain_line(self) -> str:
        """`distill: 40/200 steps (20%), 0.52 steps/s, 230.4 tok/s, elapsed 0:01:17, ETA 0:05:08`."""
        now = time.perf_counter()
        elapsed = max(now - self.started, 1e-9)
        rate = self.steady_rate(now)
        eta = _clock((self.total - self.items) / rate) if rate > 0 else "unknown"
        share = f" ({100 * self.items / self.total:.0f}%)" if self.total else ""
        return (
            f"{self.description}: {self.items}/{self.total} {self.unit}{share}, {self._rates(elapsed)}, "
            f"elapsed {_clock(elapsed)}, ETA {eta}"
        )

    def _print_line(self) -> None:
        self.console.print(self.plain_line(), highlight=False, markup=False, soft_wrap=True)
        self.last_line = time.perf_counter()

    def advance(self, items: int, tokens: int = 0) -> None:
        self.items += items
        self.tokens += tokens
        if self.first_unit is None:
            self.first_unit = (time.perf_counter(), self.items)
        if self.progress is not None:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            self.progress.update(self.task, advance=items, rates=self._rates(elapsed))
        elif time.perf_counter() - self.last_line >= plain_interval() and self.items < self.total:
            self._print_line()
