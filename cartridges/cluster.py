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
