"""Nightly (cron) rebuilds: schedules and their history live in the registry's state folder.

`Scheduler.tick(now)` is the whole policy: every schedule whose next cron time has come runs one
build (never two of one name at once), its outcome is appended to the history, and its next time
is computed from `now`; a failed build is recorded and tried again at the next cron time. The
state is re-read and written on every change, so a restarted scheduler (actor, cluster) carries on.
`SchedulerActor` runs `tick` in a detached, named Ray actor that sleeps until the next due time.
"""

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from croniter import croniter

from cartridges.errors import CartridgeError
from cartridges.registry.names import validate_new_name
from cartridges.registry.schedule_state import HISTORY_LIMIT, STATE_FILE, BuildOutcome, Schedule, read_schedule_state
from cartridges.registry.store import Registry

ACTOR_NAME = "cartridges-scheduler"
SCHEDULER_CPUS = 0.01


Builder = Callable[[Schedule], tuple[str, str]]  # -> (status, detail); raises on failure


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def next_time(cron: str, after: datetime) -> datetime:
    if not croniter.is_valid(cron):
        raise CartridgeError(f"--cron {cron!r} is not a cron expression; example: '0 2 * * *' (02:00 every day)")
    return croniter(cron, after).get_next(datetime)


class Scheduler:
    def __init__(self, registry: Registry, builder: Builder, clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.registry, self.builder, self.clock = registry, builder, clock
        self._running: set[str] = set()
        self._lock = threading.Lock()

    def _state(self) -> dict:
        return read_schedule_state(self.registry)

    def _save(self, state: dict) -> None:
        state["history"] = state["history"][-HISTORY_LIMIT:]
        self.registry.write_state(STATE_FILE, state)

    def add(self, name: str, corpus: str, cron: str, config: str = "default", overrides: list[str] = ()) -> Schedule:
        validate_new_name(name)
        schedule = Schedule(
            name=name,
            corpus=corpus,
            cron=cron,
            config=config,
            overrides=list(overrides),
            next_run=_iso(next_time(cron, self.clock())),
        )
        with self._lock:
            state = self._state()
            state["schedules"][name] = schedule.model_dump()
            self._save(state)
        return schedule

    def remove(self, name: str) -> None:
        with self._lock:
            state = self._state()
            if name not in state["schedules"]:
                raise CartridgeError(f"no schedule named {name!r} (see `cartridges schedule list`)")
            del state["schedules"][name]
            self._save(state)

    def schedules(self) -> list[Schedule]:
        return [Schedule(**s) for s in self._state()["schedules"].values()]

    def history(self, name: str | None = None) -> list[BuildOutcome]:
        return [BuildOutcome(**h) for h in self._state()["history"] if name in (None, h["name"])]

    def due(self) -> list[Schedule]:
        now = self.clock()
        return [s for s in self.schedules() if datetime.fromisoformat(s.next_run) <= now]

    def seconds_until_next(self) -> float | None:
        times = [datetime.fromisoformat(s.next_run) for s in self.schedules()]
        return max(0.0, (min(times) - self.clock()).total_seconds()) if times else None

    def run(self, name: str) -> BuildOutcome | None:
        """Build one schedule now; None when a build of that name is already running."""
        with self._lock:
            if name in self._running:
                return None
            self._running.add(name)
            found = self._state()["schedules"].get(name)
        if found is None:
            self._running.discard(name)
            raise CartridgeError(f"no schedule named {name!r} (see `cartridges schedule list`)")
        schedule, started = Schedule(**found), self.clock()
        try:
            status, detail = self.builder(schedule)
        except Exception as exc:  # any build failure is recorded; the schedule retries at its next time
            status, detail = "failed", f"{type(exc).__name__}: {exc}"
        finished = self.clock()
        outcome = BuildOutcome(
            name=name, started=_iso(started), finished=_iso(finished), status=status, detail=detail[:2000]
        )
        with self._lock:
            state = self._state()
            if name in state["schedules"]:
                state["schedules"][name]["next_run"] = _iso(next_time(schedule.cron, finished))
            state["history"].append(outcome.model_dump())
            self._save(state)
            self._running.discard(name)
        return outcome

    def tick(self) -> list[BuildOutcome]:
        """Run every due schedule once."""
        return [outcome for s in self.due() if (outcome := self.run(s.name)) is not None]


def build_schedule(registry_url: str) -> Builder:
    """The real builder: `cartridges build` of the schedule's corpus and config."""

    def builder(schedule: Schedule) -> tuple[str, str]:
        from cartridges.pipeline.build import build  # heavy (torch, transformers): only when a build runs
        from cartridges.pipeline.build_config import load_build_config

        result = build(
            Path(schedule.corpus),
            schedule.name,
            load_build_config(schedule.config, schedule.overrides),
            Registry(registry_url),
        )
        return ("published", result.ref) if result.built else ("unchanged", f"{result.ref} is up to date")

    return builder


class SchedulerActor:
    """Body of the detached Ray actor: sleeps until the next due schedule, then ticks."""

    def __init__(self, registry_url: str, max_sleep_seconds: float = 60.0):
        self.scheduler = Scheduler(Registry(registry_url), build_schedule(registry_url))
        self.max_sleep = max_sleep_seconds
        self._stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.scheduler.tick()
            wait = self.scheduler.seconds_until_next()
            self._stop.wait(self.max_sleep if wait is None else min(wait, self.max_sleep))

    def schedule_names(self) -> list[str]:
        return [s.name for s in self.scheduler.schedules()]

    def node(self) -> str:
        """The Ray node it runs on (it moves when that node is lost)."""
        from cartridges.cluster import node_label

        return node_label()


def ensure_actor(registry_url: str) -> list[str]:
    """Start the cluster's one scheduler actor (detached, named) when missing; returns the schedule names it sees."""
    import ray

    from cartridges.cluster import init_ray

    init_ray()
    return ray.get(scheduler_actor(registry_url).schedule_names.remote())  # also waits until the actor is up


def scheduler_actor(registry_url: str):
    """The cluster's one scheduler actor, started when missing.

    It asks for a sliver of a CPU so that it lives on a node that runs work (a head started with
    `num-cpus: 0`, as KubeRay advises, runs none), and Ray restarts it on another node, without limit,
    when its node is lost; its schedules and history are in the registry, so it carries on there.
    """
    import ray

    remote = ray.remote(num_cpus=SCHEDULER_CPUS, max_restarts=-1, max_task_retries=-1)(SchedulerActor)
    return remote.options(name=ACTOR_NAME, namespace="cartridges", lifetime="detached", get_if_exists=True).remote(
        registry_url
    )
