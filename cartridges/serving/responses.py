"""What the server answers, typed like what it accepts (`serving.api`): OpenAI's chat completion and text
completion objects, whole or streamed as server-sent events, one responder per endpoint.

Both responders read the same `Answer`: the generation's tokens turned into text as they come, cut at a
stop string, with the finish reason and the token counts (usage also says which cartridges answered).
"""

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, model_serializer
from sse_starlette.sse import EventSourceResponse

from cartridges.library.library import RoutedUnit
from cartridges.serving.api import ChatRequest, GenerationRequest
from cartridges.serving.batch_decoder import BatchDecoder
from cartridges.serving.generation import Generation
from cartridges.serving.text_stream import TextStream


@dataclass
class Prepared:
    """A request turned into what the decoder runs, and what its response reports."""

    request: GenerationRequest
    generation: Generation
    labels: list[str]
    cartridge_tokens: int
    prompt_tokens: int
    units: list[RoutedUnit] = field(default_factory=list)


class UnitUsage(BaseModel):
    id: str
    source: str
    score: float
    kv_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cartridge_tokens: int  # ours: the KV tokens the cartridges held
    cartridges: list[str]  # ours: the versions that answered (`legal@3`), in composition order
    units: list[UnitUsage] | None = None  # ours: a library's routed units, in composition order


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: str
    logprobs: None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _given(self) -> dict:
        """Only what this chunk adds: `{"content": "..."}`, `{}` on the last one."""
        return {key: value for key, value in (("role", self.role), ("content", self.content)) if value is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Envelope(BaseModel):
    """What every response object and chunk of one answer carries: its id, time and the model asked for."""

    id: str
    created: int
    model: str


class ChatCompletion(Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # only in the last chunk, when the request asked for it


class TextCompletion(Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]
    usage: Usage | None = None  # streamed: only in the last chunk, when asked for


class Answer:
    """A submitted generation's text as it comes, cut at the request's stop strings."""

    def __init__(self, decoder: BatchDecoder, tokenizer, prepared: Prepared, prefix: str):
        self.prepared = prepared
        self.text = TextStream(tokenizer, prepared.request.stop_strings())
        decoder.submit(prepared.generation)
        self.meta = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": prepared.request.model}

    async def pieces(self) -> AsyncIterator[str]:
        try:
            async for token in self.prepared.generation.atokens():
                piece = self.text.add(token)
                if piece:
                    yield piece
                if self.text.stopped:
                    break
            rest = self.text.flush()
            if rest:
                yield rest
        finally:
            self.prepared.generation.cancel()  # a stop string, or a client that went away: the row leaves

    async def whole(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    @property
    def finish_reason(self) -> str:
        return "stop" if self.text.stopped else self.prepared.generation.finish_reason or "stop"

    @property
    def usage(self) -> Usage:
        prepared, completion = self.prepared, len(self.text.token_ids)
        return Usage(
            prompt_tokens=prepared.prompt_tokens,
            completion_tokens=completion,
            total_tokens=prepared.prompt_tokens + completion,
            cartridge_tokens=prepared.cartridge_tokens,
            cartridges=prepared.labels,
            units=[
                UnitUsage(id=r.unit.id, source=r.unit.source, score=r.score, kv_tokens=r.unit.num_tokens)
                for r in prepared.units
            ]
            or None,
        )

    @property
    def wants_usage_chunk(self) -> bool:
        options = self.prepared.request.stream_options
        return options is not None and options.include_usage


def _streamed(chunks: AsyncIterator[BaseModel], send_seconds: float) -> EventSourceResponse:
    async def events():
        async for chunk in chunks:
            yield chunk.model_dump_json()
        yield "[DONE]"

    return EventSourceResponse(events(), ping=15, send_timeout=send_seconds)


async def respond_chat(decoder: BatchDecoder, tokenizer, prepared: Prepared, send_seconds: float):
    """`/v1/chat/completions`: a `ChatCompletion`, or its chunks (role first, then content, then the reason)."""
    assert isinstance(prepared.request, ChatRequest)
    answer = Answer(decoder, tokenizer, prepared, "chatcmpl")
    if not prepared.request.stream:
        content = await answer.whole()
        choice = ChatChoice(message=ChatMessage(content=content), finish_reason=answer.finish_reason)
        return ChatCompletion(**answer.meta, choices=[choice], usage=answer.usage).model_dump()

    async def chunks():
        yield ChatCompletionChunk(
            **answer.meta, choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))]
        )
        async for piece in answer.pieces():
            yield ChatCompletionChunk(**answer.meta, choices=[ChatChunkChoice(delta=ChatDelta(content=piece))])
        last = ChatChunkChoice(delta=ChatDelta(), finish_reason=answer.finish_reason)
        yield ChatCompletionChunk(**answer.meta, choices=[last])
        if answer.wants_usage_chunk:
            yield ChatCompletionChunk(**answer.meta, choices=[], usage=answer.usage)

    return _streamed(chunks(), send_seconds)


async def respond_completion(decoder: BatchDecoder, tokenizer, prepared: Prepared, send_seconds: float):
    """`/v1/completions`: a `TextCompletion`, or its chunks (text, then an empty one with the reason)."""
    answer = Answer(decoder, tokenizer, prepared, "cmpl")
    if not prepared.request.stream:
        text = await answer.whole()
        choice = TextChoice(text=text, finish_reason=answer.finish_reason)
        return TextCompletion(**answer.meta, choices=[choice], usage=answer.usage).model_dump()

    async def chunks():
        async for piece in answer.pieces():
            yield TextCompletion(**answer.meta, choices=[TextChoice(text=piece)])
        yield TextCompletion(**answer.meta, choices=[TextChoice(text="", finish_reason=answer.finish_reason)])
        if answer.wants_usage_chunk:
            yield TextCompletion(**answer.meta, choices=[], usage=answer.usage)

    return _streamed(chunks(), send_seconds)
