"""The nightly schedules and their build history as the registry keeps them (`.state/schedules.json`).

The scheduler (`pipeline/scheduler.py`) writes this state; the server's page and its JSON endpoint read
it. Kept here, beside the registry and free of the scheduler, so that reading it needs no cron or Ray.
"""

from pydantic import BaseModel

from cartridges.registry.store import Registry

STATE_FILE = "schedules.json"
HISTORY_LIMIT = 200  # outcomes kept, newest last


class Schedule(BaseModel):
    name: str
    corpus: str
    cron: str
    config: str = "default"
    overrides: list[str] = []
    next_run: str  # ISO time, UTC


class BuildOutcome(BaseModel):
    name: str
    started: str
    finished: str
    status: str  # published | unchanged | failed
    detail: str


def read_schedule_state(registry: Registry) -> dict:
    """The state as stored ({"schedules": {name: ...}, "history": [...]}); empty when nothing was scheduled."""
    return registry.read_state(STATE_FILE) or {"schedules": {}, "history": []}


def schedules_and_history(registry: Registry) -> tuple[list[Schedule], list[BuildOutcome]]:
    state = read_schedule_state(registry)
    return [Schedule(**s) for s in state["schedules"].values()], [BuildOutcome(**h) for h in state["history"]]
