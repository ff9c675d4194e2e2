"""The OpenAI request shapes the server accepts, and its OpenAI-shaped errors.

Parameters outside these models are refused by name (a 400), never ignored: a client that sends
`logprobs` or `tools` learns at once that it gets neither.
"""

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cartridges.errors import first_problem


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 8192
    max_tokens: int = 1024
    body_seconds: float = 60.0  # a request body must arrive within this (a stalled upload holds a connection)
    send_seconds: float = 60.0  # a streaming client that takes nothing for this long is cut
    keep_alive_seconds: int = 5  # an idle keep-alive connection is closed after this
    # Prompt tokens computed a step. Every running request waits for each step, so a step's length is what a
    # short request waits behind a long prompt: 512 kept a 39-token request 2.2 s behind a 6k-token prompt
    # (47 decode steps), 64 keeps it 0.39 s (9), for 11% more time to the long prompt's first token
    # (BENCHMARKS.md, "A long prompt beside short requests").
    prefill_tokens: int = 64


class ApiError(Exception):
    """An error the client caused (4xx) or met (5xx), answered as `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 404: "invalid_request_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class CartridgeChoice(BaseModel):
    """Tokasaurus's shape: `{"id": "legal@3", "source": "local"}`; our source is the server's registry."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200)
    source: Literal["local", "registry"] = "registry"
    force_redownload: bool = False  # accepted for Tokasaurus clients; a registry read is always current


class LibraryChoice(BaseModel):
    """`extra_body={"library": {"budget": 1024, "units": ["a.txt#2"]}}`: how a library in the request routes."""

    model_config = ConfigDict(extra="forbid")

    budget: int | None = Field(None, ge=2, description="KV tokens of units to route (default: the server's)")
    units: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(default_factory=list, max_length=64)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class GenerationRequest(BaseModel):
    """What both endpoints share; unknown fields are collected and refused by name."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # what torch's generators take
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    cartridges: list[CartridgeChoice] = Field(default_factory=list, max_length=16)
    library: LibraryChoice | None = None
    user: str | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: at most 4 non-empty strings", "stop")
        return stops


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]


def parse_request(kind: type[GenerationRequest], body: bytes) -> GenerationRequest:
    """Validate a JSON body strictly (no "yes" for a boolean, no 4.0 for a count, as OpenAI's API); the
    first problem becomes a 400 naming its parameter."""
    try:
        request = kind.model_validate_json(body, strict=True)
    except ValidationError as exc:
        where, message, _ = first_problem(exc)
        if where == "" and "JSON" in message:
            message = f"the request body is not UTF-8 JSON ({message})"
        raise ApiError(400, f"{where}: {message}" if where else message, where or None) from None
    unknown = sorted(request.model_extra or {})
    if unknown:
        raise ApiError(400, f"unsupported parameter(s): {', '.join(unknown)}", unknown[0], "unsupported_parameter")
    return request
