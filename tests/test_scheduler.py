"""The scheduler on an injected clock: due schedules fire once, failures are retried, state survives restarts."""

import threading
from datetime import UTC, datetime, timedelta

import pytest

from cartridges.errors import CartridgeError
from cartridges.pipeline.scheduler import Scheduler, build_schedule
from cartridges.registry.store import Registry

MIDNIGHT = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


def test_a_due_schedule_fires_once_per_cron_time(registry):
    clock, built = Clock(MIDNIGHT), []
    scheduler = Scheduler(registry, lambda s: built.append(s.name) or ("published", f"{s.name}@1"), clock)
    scheduler.add("legal", "/corpus", "0 2 * * *")
    clock.now = MIDNIGHT + timedelta(hours=1, minutes=59)
    assert scheduler.tick() == [] and built == []
    clock.now = MIDNIGHT + timedelta(hours=2)
    assert [o.status for o in scheduler.tick()] == ["published"]
    clock.now = MIDNIGHT + timedelta(hours=2, minutes=30)
    assert scheduler.tick() == [] and built == ["legal"]
    assert scheduler.schedules()[0].next_run == "2026-01-02T02:00:00+00:00"


def test_a_failed_build_is_recorded_and_retried_at_the_next_time(registry):
    clock, calls = Clock(MIDNIGHT), []

    def flaky(schedule):
        calls.append(clock.now)
        if len(calls) == 1:
            raise RuntimeError("disk full")
        return "published", "legal@1"

    scheduler = Scheduler(registry, flaky, clock)
    scheduler.add("legal", "/corpus", "0 2 * * *")
    clock.now = MIDNIGHT + timedelta(hours=2)
    scheduler.tick()
    clock.now = MIDNIGHT + timedelta(days=1, hours=2)
    scheduler.tick()
    assert [(h.status, h.detail) for h in scheduler.history("legal")] == [
        ("failed", "RuntimeError: disk full"),
        ("published", "legal@1"),
    ]


def test_schedules_and_history_survive_a_new_scheduler(registry):
    clock = Clock(MIDNIGHT)
    first = Scheduler(registry, lambda s: ("published", "legal@1"), clock)
    first.add("legal", "/corpus", "*/10 * * * *")
    clock.now = MIDNIGHT + timedelta(minutes=10)
    first.tick()
    second = Scheduler(
        registry, lambda s: ("unchanged", "legal@1 is up to date"), clock
    )  # e.g. after the actor was killed
    assert [s.name for s in second.schedules()] == ["legal"] and len(second.history()) == 1
    clock.now = MIDNIGHT + timedelta(minutes=20)
    assert [o.status for o in second.tick()] == ["unchanged"]


def test_never_two_builds_of_one_name_at_once(registry):
    release, started = threading.Event(), threading.Event()

    def slow(schedule):
        started.set()
        release.wait(10)
        return "published", "legal@1"

    scheduler = Scheduler(registry, slow, Clock(MIDNIGHT))
    scheduler.add("legal", "/corpus", "0 2 * * *")
    worker = threading.Thread(target=scheduler.run, args=("legal",))
    worker.start()
    started.wait(10)
    assert scheduler.run("legal") is None
    release.set()
    worker.join()
    assert len(scheduler.history()) == 1


def test_bad_cron_and_unknown_names_are_clear_errors(registry):
    scheduler = Scheduler(registry, lambda s: ("published", ""), Clock(MIDNIGHT))
    with pytest.raises(CartridgeError, match="not a cron expression"):
        scheduler.add("legal", "/corpus", "every night")
    with pytest.raises(CartridgeError, match="no schedule named 'tax'"):
        scheduler.remove("tax")


def test_an_unchanged_corpus_publishes_nothing_on_the_next_night(registry, tiny_model_dir, long_corpus):
    clock = Clock(MIDNIGHT)
    scheduler = Scheduler(registry, build_schedule(registry.url), clock)
    scheduler.add("legal", str(long_corpus), "0 2 * * *", config="tiny", overrides=[f"model={tiny_model_dir}"])
    for day in (0, 1):
        clock.now = MIDNIGHT + timedelta(days=day, hours=2)
        scheduler.tick()
    assert [h.status for h in scheduler.history()] == ["published", "unchanged"]
    assert registry.versions("legal") == [1]


def test_the_scheduler_actor_sees_the_schedules_again_after_it_is_killed(registry):
    import ray

    from cartridges.pipeline.scheduler import ACTOR_NAME, ensure_actor

    Scheduler(registry, lambda s: ("published", ""), Clock(MIDNIGHT)).add("legal", "/corpus", "0 2 1 1 *")
    try:
        assert ensure_actor(registry.url) == ["legal"]
        ray.kill(ray.get_actor(ACTOR_NAME, namespace="cartridges"))
        assert ensure_actor(registry.url) == ["legal"]
    finally:
        ray.shutdown()


def test_schedule_cli_add_list_history_remove(cli, monkeypatch, long_corpus, tiny_model_dir, cartridges_home):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, out, err = cli(
        "schedule", "add", str(long_corpus), "--name", "legal", "--config", "tiny", "--set", f"model={tiny_model_dir}"
    )
    assert code == 0, err
    assert "scheduled legal: 0 2 * * *" in out and "ray start --head" in out
    assert "legal" in cli("schedule", "list")[1]
    code, out, err = cli("schedule", "run-now", "legal")
    assert code == 0 and "legal: published (legal@1)" in out, err
    assert "published" in cli("schedule", "history", "legal")[1]
    code, _, err = cli("schedule", "add", str(long_corpus), "--name", "x", "--cron", "nightly")
    assert code == 2 and "not a cron expression" in err
    assert cli("schedule", "remove", "legal")[0] == 0
    code, _, err = cli("schedule", "remove", "legal")
    assert code == 2 and "no schedule named 'legal'" in err
