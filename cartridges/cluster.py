"""Connect to Ray: the cluster at `RAY_ADDRESS` when set, else a local one."""

import os


def init_ray() -> None:
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, include_dashboard=False, logging_level="ERROR")
