"""The registry's JSON endpoints on the server (`serving.catalog`'s views), behind the server's API key.

    GET /v1/cartridges                 every name: aliases and versions (ref, created, tokens, sizes, model)
    GET /v1/cartridges/{ref}           one version: manifest, recipe, lineage, evaluation, training curve, units
    GET /v1/cartridges/{ref}/verify    {"ok": bool, "message": ...}: the checks loading makes
    GET /v1/schedules                  nightly schedules and their history, newest first

A reference the registry does not hold is a 404 and a malformed one a 400, in OpenAI's error shape.
"""

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request

from cartridges.errors import CartridgeError, NotFound
from cartridges.serving import catalog
from cartridges.serving.api import ApiError

if TYPE_CHECKING:
    from cartridges.serving.server import Server


def add_catalog_routes(app: FastAPI, server: "Server") -> None:
    async def read(request: Request, view: Callable[..., dict[str, Any]], *args: str) -> dict[str, Any]:
        server.check_key(request)
        try:
            return await asyncio.to_thread(view, server.store.registry, *args)
        except NotFound as exc:
            raise ApiError(404, server.public(str(exc)), "ref", "model_not_found") from None
        except CartridgeError as exc:
            raise ApiError(400, server.public(str(exc)), "ref") from None

    @app.get("/v1/cartridges")
    async def cartridges(request: Request) -> dict:
        return await read(request, catalog.catalog)

    @app.get("/v1/cartridges/{reference}")
    async def cartridge(request: Request, reference: str) -> dict:
        return await read(request, catalog.detail, reference)

    @app.get("/v1/cartridges/{reference}/verify")
    async def verify(request: Request, reference: str) -> dict:
        result = await read(request, catalog.verification, reference)
        return result | {"message": server.public(result["message"])}  # a client never sees a server path

    @app.get("/v1/schedules")
    async def schedules(request: Request) -> dict:
        return await read(request, catalog.schedules)
