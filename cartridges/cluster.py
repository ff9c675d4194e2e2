"""Connect to Ray: the cluster at `RAY_ADDRESS` when set, else a local one; what every actor gets of it."""

import os
import sys
from typing import Literal

Executor = Literal["auto", "ray", "local"]


def on_local_ray() -> bool:
    """No `RAY_ADDRESS`: a Ray started by this command, for it alone, on this machine."""
    return not os.environ.get("RAY_ADDRESS")


def runs_on_ray(executor: Executor, actors: int) -> bool:
    """Whether a stage's work goes to Ray. `auto`: when there is a cluster to use (`RAY_ADDRESS`, or this
    process already runs in Ray, as a scheduled build does) or more than one engine or worker to run;
    otherwise in this process, because on one small box Ray's own processes take cores from the work:
    the default build's training ran at 75-81 tokens/s under Ray Train and 107-108 in-process, and its
    synthesis 18% slower under Ray Data (BENCHMARKS.md, "Ray or in-process on one box")."""
    if executor == "auto":
        return not on_local_ray() or _connected_to_ray() or actors > 1
    return executor == "ray"


def _connected_to_ray() -> bool:
    ray = sys.modules.get("ray")  # not imported: not connected (and importing it costs seconds)
    return ray is not None and ray.is_initialized()


def node_label() -> str:
    """The Ray node id this code runs on ("local" outside Ray): recorded with the work a node did."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def cpus_per_actor(actors: int, asked: float | None) -> float:
    """Ray CPUs of each of `actors` engine or training actors: `asked`, else an equal share of this machine."""
    return asked or max(1, (os.cpu_count() or 1) // actors)


def init_ray() -> None:
    import ray

    # A local Ray runs without its dashboard, so Ray Train's placement-group cleaner cannot reach the
    # State API and warns about it every second of training (over a thousand lines in one build).
    # Ray's own loggers in the workers of a local cluster log errors only; RAY_LOGGER_LEVEL=warning
    # brings the warnings back. Our progress and results do not go through Ray's loggers.
    # A local cluster started here exists for this command alone: its actors' own lines (Ray Train's
    # controller announcing worker groups, an error-level core_worker note about Ray's internal
    # PreemptionWatcher actor, weight-loading bars) are not forwarded to the terminal, where a newcomer
    # reads them as failures; they stay in Ray's session logs. Our progress comes from the stages'
    # own records, and a worker's exception still reaches the driver. A real cluster keeps Ray's default.
    local = on_local_ray()
    if local:
        os.environ.setdefault("RAY_LOGGER_LEVEL", "error")
    ray.init(
        address=os.environ.get("RAY_ADDRESS"),
        ignore_reinit_error=True,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=not local,
    )


def actor_pool_rows(
    rows: list[dict],
    worker: type,
    constructor_kwargs: dict,
    actors: int,
    cpus: float,
    gpus: float,
    start_timeout_s: float,
    in_flight: int = 1,
):
    """Ray Data: `worker` (a callable class, built once per actor) over `rows`, one row a call, on a pool of
    `actors`; iterate the returned dataset's `iter_rows()` for the results as they come. Iterating raises
    `ray.exceptions.GetTimeoutError` when the pool has not started within `start_timeout_s` (the caller
    names the settings to change)."""
    import logging
    import warnings

    import ray

    init_ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours show shards and rates; Ray Data's own lines (it warns that
    context.print_on_execution_start = False  # its bars are off, announces each finished dataset) are noise here
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Ray Data passes every actor its map function through the object store, and Ray logs an error-level
    # line for each actor that may restart with such arguments (ray-project/ray#53727). On a local Ray an
    # actor that dies is a crash of this machine's process (out of memory, a bug) that a restart repeats:
    # the run stops and the next one resumes from what it finished. A cluster keeps Ray's restarts, which
    # replace actors on lost nodes.
    # Ray 2.60 (pinned) takes max_restarts only among its deprecated free-form remote arguments.
    restarts = {"max_restarts": 0} if on_local_ray() else {}
    # Start every actor before the first row is handed out, and hand each actor `in_flight` rows at a time:
    # an actor that loaded first would otherwise queue rows that a later one could make, and a cluster that
    # cannot place the actors fails with a line instead of waiting forever.
    context.wait_for_min_actors_s = start_timeout_s
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ray.data.from_items(rows).map_batches(
            worker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=in_flight),
            num_cpus=cpus,
            num_gpus=gpus,
            fn_constructor_kwargs=constructor_kwargs,
            **restarts,
        )
