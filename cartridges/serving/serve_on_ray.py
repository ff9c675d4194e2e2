"""The same server as Ray Serve replicas, for a team that outgrows one box.

Each replica loads the model and builds the very app `cartridges serve` runs (its own decoder and
cartridge store); Ray Serve's proxy spreads requests over the replicas. Nothing in the server or
the decoder knows about Ray: this module only wraps them.
"""

from dataclasses import dataclass

from cartridges.cluster import init_ray
from cartridges.serving.server import Limits


@dataclass(frozen=True)
class ReplicaSettings:
    """What every replica builds its server from (the arguments of `cartridges serve`)."""

    model: str | None
    registry_url: str
    limits: Limits
    api_key: str | None
    max_batch: int
    memory: int
    threads: int | None = None
    library_budget: int | None = None
    page: bool = True  # the page at / (`--no-ui` turns it off)


class CartridgeReplica:
    """One replica: the model, its decoder and cartridge store, and the app that serves them."""

    def __init__(self, settings: ReplicaSettings):
        from cartridges.registry.store import Registry
        from cartridges.serving.server import build_server, load_serving_model

        loaded, decoder_threads = load_serving_model(settings.model, settings.threads)
        self.page = settings.page
        self.server = build_server(
            loaded,
            Registry(settings.registry_url),
            settings.limits,
            settings.api_key,
            settings.max_batch,
            settings.memory,
            decoder_threads,
            settings.library_budget,
        )

    def __serve_build_asgi_app__(self):  # Ray Serve asks for the app once the replica is constructed
        from cartridges.serving.server import create_app

        return create_app(self.server, self.page)


def serve_on_ray(
    settings: ReplicaSettings,
    replicas: int,
    host: str,
    port: int,
    cpus_per_replica: float,
    blocking: bool = True,
) -> None:
    """Deploy `replicas` replicas on the cluster at RAY_ADDRESS (a local one when unset) behind one
    HTTP address; blocks until interrupted unless `blocking` is False."""
    from ray import serve

    init_ray()
    serve.start(http_options={"host": host, "port": port})
    deployment = serve.deployment(
        serve.ingress()(CartridgeReplica),
        name="cartridges",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    app = deployment.bind(settings)
    serve.run(app, name="cartridges", route_prefix="/", blocking=blocking)
