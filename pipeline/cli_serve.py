"""`cartridges serve`: the OpenAI-compatible server on this machine."""

import os
import socket
from typing import Annotated

import typer

from cartridges.errors import CartridgeError
from cartridges.pipeline.cli_app import ModelOption, RegistryOption, app, console, open_registry
from cartridges.serving.api import Limits


@app.command("serve")
def serve_command(
    host: Annotated[
        str, typer.Option("--host", help="address to bind; 0.0.0.0 exposes it to the network")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    model: ModelOption = None,
    registry: RegistryOption = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="require Authorization: Bearer KEY (default: $CARTRIDGES_API_KEY)")
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="requests decoded together")] = 16,
    cartridge_memory_mb: Annotated[
        int, typer.Option("--cartridge-memory-mb", min=1, help="loaded cartridges kept in memory (LRU)")
    ] = 1024,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="largest max_tokens a request may ask")] = 1024,
    prefill_tokens: Annotated[
        int,
        typer.Option(
            "--prefill-tokens",
            min=1,
            help="prompt tokens computed a step: lower, a short request waits less beside a long prompt",
        ),
    ] = Limits.prefill_tokens,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", min=0.1, help="seconds a client may take to send its body, or to take a streamed token"
        ),
    ] = Limits.send_seconds,
    ray: Annotated[
        bool, typer.Option("--ray", help="serve as Ray Serve replicas on the cluster at RAY_ADDRESS (local when unset)")
    ] = False,
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="with --ray: replicas, each with its model")] = 1,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="torch threads for the model (default: torch's, one a core)")
    ] = None,
    library_budget: Annotated[
        int | None,
        typer.Option(
            "--library-budget",
            min=2,
            help="KV tokens a library routes per request unless the request says (default: each library's own)",
        ),
    ] = None,
    no_ui: Annotated[bool, typer.Option("--no-ui", help="serve the API only: no page at /")] = False,
) -> None:
    """Serve the model and the registry's cartridges with the OpenAI API (chat, completions, models).

    Example: cartridges serve --port 8000, then OpenAI(base_url="http://127.0.0.1:8000/v1").chat.completions.create(
    model="legal@latest", messages=[...])
    """
    import uvicorn

    from cartridges.serving.server import build_server, create_app, load_serving_model

    # An empty or blank key (--api-key "", CARTRIDGES_API_KEY="") would serve without any key: a mistake
    # in a deployment's secret, not a wish for an open server. Unset is the way to serve without one.
    given = "--api-key" if api_key is not None else "CARTRIDGES_API_KEY"
    key = api_key if api_key is not None else os.environ.get("CARTRIDGES_API_KEY")
    if key is not None and not key.strip():
        raise CartridgeError(f"{given} is empty: pass a key, or unset it to serve without one")
    reg = open_registry(registry)
    limits = Limits(max_tokens=max_tokens, prefill_tokens=prefill_tokens, body_seconds=timeout, send_seconds=timeout)
    if ray:
        from cartridges.cluster import cpus_per_actor
        from cartridges.serving.serve_on_ray import ReplicaSettings, serve_on_ray

        if reg.is_transient:
            raise CartridgeError("--ray needs a registry every replica can read: a folder or an object store URL")
        console.print(f"serving on Ray: {replicas} replica(s), http://{host}:{port}/v1", soft_wrap=True)
        memory = cartridge_memory_mb << 20
        cpus = cpus_per_actor(replicas, None)
        settings = ReplicaSettings(model, reg.url, limits, key, max_batch, memory, threads, library_budget, not no_ui)
        serve_on_ray(settings, replicas, host, port, cpus)
        return
    listening = bind_listening_socket(host, port)  # a port in use is one line before the model loads
    loaded, decoder_threads = load_serving_model(model, threads)
    server = build_server(
        loaded, reg, limits, key, max_batch, cartridge_memory_mb << 20, decoder_threads, library_budget
    )
    console.print(
        f"serving {loaded.model_id} and the cartridges of {reg.url} on http://{host}:{port}/v1"
        f"{' (API key required)' if key else ''}{'' if no_ui else f'; the page: http://{host}:{port}/'}",
        soft_wrap=True,
    )
    config = uvicorn.Config(
        create_app(server, page=not no_ui), log_level="warning", timeout_keep_alive=limits.keep_alive_seconds
    )
    try:
        uvicorn.Server(config).run(sockets=[listening])
    finally:
        server.decoder.close()
        listening.close()


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn, or one line saying why it cannot be (in use, no such address)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise CartridgeError(
            f"--host {host!r}: not an address of this machine ({exc.strerror}); use 127.0.0.1"
        ) from None
    listening = socket.socket(family, kind, proto)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind(address)
    except OSError as exc:
        listening.close()
        raise CartridgeError(
            f"cannot serve on {host}:{port}: {exc.strerror or exc}; pass another --port or stop what uses it"
        ) from None
    listening.set_inheritable(True)
    return listening
