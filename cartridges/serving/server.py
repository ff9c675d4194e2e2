"""An OpenAI-compatible HTTP server whose requests pick their cartridges.

`model` is the base model or a cartridge reference (`legal`, `legal@3`, `legal@stable`); the
Tokasaurus-shaped `cartridges: [{"id": ...}]` list (OpenAI clients send it as `extra_body`) adds
more, composed in order. Generation runs in one `BatchDecoder`, so concurrent requests share decode
steps. Every error is OpenAI-shaped JSON; nothing a client sends yields a traceback.
"""

import asyncio
import hmac

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from cartridges.errors import CartridgeError, NotFound
from cartridges.kv_layout import kv_shape
from cartridges.layout import chat_token_ids
from cartridges.models import LoadedModel
from cartridges.registry.object_store import storage_problem
from cartridges.runtime import stop_token_ids
from cartridges.serving.api import ApiError, ChatRequest, CompletionRequest, GenerationRequest, Limits, parse_request
from cartridges.serving.batch_decoder import BatchDecoder
from cartridges.serving.cartridge_store import CartridgeStore, Routing
from cartridges.serving.catalog_routes import add_catalog_routes
from cartridges.serving.generation import Generation, Sampling
from cartridges.serving.page import add_page
from cartridges.serving.responses import Prepared, respond_chat, respond_completion

__all__ = ["Limits", "Server", "build_server", "create_app", "load_serving_model"]


class Server:
    def __init__(
        self,
        loaded: LoadedModel,
        store: CartridgeStore,
        decoder: BatchDecoder,
        limits: Limits,
        api_key=None,
        library_budget: int | None = None,
    ):
        self.loaded, self.store, self.decoder, self.limits, self.api_key = loaded, store, decoder, limits, api_key
        self.library_budget = library_budget  # KV tokens a library routes per request; None: each library's own
        config = loaded.model.config
        self.window = config.max_position_embeddings
        self.stop_ids = stop_token_ids(loaded)

    def base_names(self) -> set[str]:
        return {self.loaded.model_id, "default"}

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>", None, "invalid_api_key")

    async def read(self, request: Request, kind: type[GenerationRequest]) -> GenerationRequest:
        self.check_key(request)
        body = bytearray()
        try:
            async with asyncio.timeout(self.limits.body_seconds):
                async for piece in request.stream():
                    body += piece
                    if len(body) > self.limits.max_body_bytes:
                        raise ApiError(413, f"the request body is over {self.limits.max_body_bytes} bytes")
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.limits.body_seconds:g} s") from None
        except ClientDisconnect:  # nobody reads the answer; an ApiError keeps it out of the log as a traceback
            raise ApiError(400, "the client disconnected before sending the whole body") from None
        return parse_request(kind, bytes(body))

    def public(self, message: str) -> str:
        """An error message as a client may see it: the registry's own location (a server path) left out."""
        return message.replace(self.store.registry.root.rstrip("/"), "registry:").replace("registry:/", "registry:")

    def prepare(self, request: GenerationRequest) -> Prepared:
        references = [] if request.model in self.base_names() else [request.model]
        references += [choice.id for choice in request.cartridges]
        labels, prefix, units = [], None, []
        if references:
            try:
                labels, prefix, units = self.store.prefix(references, self.routing(request))
            except NotFound as exc:
                raise ApiError(404, self.public(str(exc)), "model", "model_not_found") from None
            except CartridgeError as exc:  # a bad name, another model's cartridge, a damaged artifact
                raise ApiError(400, self.public(str(exc)), "model") from None
        if request.library is not None and not units:
            raise ApiError(400, f"library: {request.model} and the request's cartridges hold no library", "library")
        cartridge_tokens = 0 if prefix is None else prefix.shape[0]
        prompt = self.prompt_ids(request, with_prefix=prefix is not None)
        if not prompt:
            raise ApiError(400, "the prompt is empty: send some text to complete", "prompt")
        room = self.window - cartridge_tokens - len(prompt)
        if len(prompt) > self.limits.max_prompt_tokens or room < 1:
            raise ApiError(
                400,
                f"the prompt is {len(prompt)} tokens and the cartridges {cartridge_tokens}: the model reads "
                f"{self.window} positions and this server takes prompts of up to {self.limits.max_prompt_tokens} tokens",
                "messages" if isinstance(request, ChatRequest) else "prompt",
                "context_length_exceeded",
            )
        asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
        if asked is not None and asked > self.limits.max_tokens:
            raise ApiError(
                400, f"max_tokens is {asked}; this server allows up to {self.limits.max_tokens}", "max_tokens"
            )
        sampling = Sampling(
            min(asked or self.limits.max_tokens, room), request.temperature, request.top_p, request.seed
        )
        generation = Generation(prefix, prompt, sampling, self.stop_ids)
        return Prepared(request, generation, labels, cartridge_tokens, len(prompt), units)

    def routing(self, request: GenerationRequest) -> Routing:
        """A library routes on the last user message (a completion: its prompt), within the request's budget,
        else the server's, else the library's own; or takes the units the request pins."""
        if isinstance(request, ChatRequest):
            users = [m.text() for m in request.messages if m.role == "user"]
            text = users[-1] if users else request.messages[-1].text()
        else:
            text = request.prompt if isinstance(request.prompt, str) else "".join(request.prompt)
        choice = request.library
        budget = choice.budget if choice is not None and choice.budget is not None else self.library_budget
        return Routing(text, budget, tuple(choice.units) if choice is not None else ())

    def prompt_ids(self, request: GenerationRequest, with_prefix: bool) -> list[int]:
        tokenizer = self.loaded.tokenizer
        if isinstance(request, ChatRequest):
            return chat_token_ids(tokenizer, [{"role": m.role, "content": m.text()} for m in request.messages])
        prompt = request.prompt if isinstance(request.prompt, str) else "".join(request.prompt)
        return tokenizer(prompt, add_special_tokens=not with_prefix)["input_ids"]


def create_app(server: Server, page: bool = True) -> FastAPI:
    """The API (OpenAI's endpoints, the registry's JSON), and the page at `/` unless `page` is False."""
    app = FastAPI(title="cartridges", docs_url=None, redoc_url=None, openapi_url=None)
    add_catalog_routes(app, server)
    if page:
        add_page(app)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:  # a bug: answered, logged, server up
        problem = storage_problem(exc)  # the registry's store is down or refuses: the server's side, said in words
        if problem is not None:
            return JSONResponse(ApiError(503, server.public(problem)).body(), status_code=503)
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}").body(), status_code=500)

    @app.exception_handler(404)
    async def no_route(request: Request, _exc) -> JSONResponse:
        return JSONResponse(ApiError(404, f"no route {request.url.path}").body(), status_code=404)

    @app.exception_handler(405)
    async def wrong_method(request: Request, _exc) -> JSONResponse:
        return JSONResponse(ApiError(405, f"{request.method} is not allowed here").body(), status_code=405)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "running": server.decoder.running,
            "cartridge_bytes": server.store.held_bytes,
            "kv_bytes": server.decoder.held_bytes,
            "steps": server.decoder.steps,
            "step_seconds": server.decoder.step_seconds,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        server.check_key(request)
        names = [server.loaded.model_id]
        listing = await asyncio.to_thread(server.store.registry.list)
        for entry in listing.entries:
            names += [entry.manifest.label, *(f"{entry.name}@{alias}" for alias in entry.aliases)]
        latest = {entry.name: entry.manifest.label for entry in listing.entries}
        names += [f"{name}@latest" for name in latest] + list(latest)
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "cartridges"} for n in names],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        prepared = await asyncio.to_thread(server.prepare, await server.read(request, ChatRequest))
        return await respond_chat(server.decoder, server.loaded.tokenizer, prepared, server.limits.send_seconds)

    @app.post("/v1/completions")
    async def completions(request: Request):
        prepared = await asyncio.to_thread(server.prepare, await server.read(request, CompletionRequest))
        return await respond_completion(server.decoder, server.loaded.tokenizer, prepared, server.limits.send_seconds)

    return app


def load_serving_model(spec: str | None, threads: int | None) -> tuple[LoadedModel, int]:
    """The model, loaded by this thread computing with one torch thread, and the threads its decoder will
    use (`threads`, or torch's default: one a core). See `BatchDecoder`'s `threads` for why."""
    import torch

    from cartridges.models import load_model

    decoder_threads = threads or torch.get_num_threads()
    torch.set_num_threads(1)
    return load_model(spec), decoder_threads


def build_server(
    loaded: LoadedModel,
    registry,
    limits: Limits,
    api_key=None,
    max_batch=16,
    memory_bytes=1 << 30,
    threads=None,
    library_budget: int | None = None,
):
    """The server's parts on one model: the cartridge store and the decoder (computing with `threads` torch
    threads, the rest of the process with one; None: torch's settings as they are)."""
    decoder = BatchDecoder(
        loaded.model, kv_shape(loaded.model.config), max_batch, prefill_tokens=limits.prefill_tokens, threads=threads
    )
    return Server(loaded, CartridgeStore(registry, loaded, memory_bytes), decoder, limits, api_key, library_budget)
