"""What a synthesis makes (`SynthesisConfig`: a new run folder when it changes) and how it runs
(`SynthesisRunSettings`), and whether its prompts fit the model's window."""

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from cartridges.cluster import Executor
from cartridges.errors import CartridgeError
from cartridges.settings import STRICT_SETTINGS
from cartridges.stages.synthesis.engines import EngineName
from cartridges.stages.synthesis.seed_prompts import (
    ALL_KINDS,
)

PROMPT_OVERHEAD_TOKENS = 256  # title, chat template and system instruction around chunk and message

# Measured with SmolLM2-135M as teacher (BENCHMARKS.md, distillation sweep): cartridges trained on the
# corpus-answered kinds alone beat those trained on every kind; a stronger teacher may profit from
# adding model-written kinds (--set 'synthesis.kinds={question: 2, use_case: 1, quote: 1}'); at lr 6e-3 the
# `EVERY_KIND` mix was measured worse again on all four issue-17 articles (BENCHMARKS.md, lever 4).
DEFAULT_KINDS = {"quote": 1.0, "continuation": 1.0, "fill_span": 1.0}
# Every kind, model-written and corpus-answered (the default before that sweep; the benchmarks' `all` mix).
EVERY_KIND = {
    "question": 2.0,
    "use_case": 1.0,
    "summarization": 1.0,
    "structuring": 1.0,
    "creative": 0.5,
    "generic": 0.5,
    "quote": 2.0,
    "continuation": 2.0,
    "fill_span": 1.0,
}


class SynthesisConfig(BaseModel):
    """Settings that decide which samples are made; changing one needs a new run folder."""

    model_config = STRICT_SETTINGS

    samples: int = Field(
        128, ge=1, description="number of samples to write (128: the 15-minute default build on a 2-core CPU)"
    )
    seed: int = Field(0, description="seed of the sample plan (chunks, kinds, sampling seeds)")
    kinds: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_KINDS), description="seed kind -> weight")
    top_k: int = Field(20, ge=1, le=100, description="teacher log-probabilities kept per answer token")
    max_message_tokens: int = Field(96, ge=8)
    max_answer_tokens: int = Field(192, ge=8)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    samples_per_chunk: int = Field(
        1,
        ge=1,
        description="consecutive samples that share one chunk: the teacher reads each chunk once per group, so a "
        "corpus of more chunks than samples costs less per sample, and covers fewer chunks",
    )
    chunk_min_tokens: int = Field(512, ge=1)
    chunk_max_tokens: int = Field(
        1024, ge=2, description="the default recipe's chunks (BENCHMARKS.md, 'A 15-minute default build')"
    )
    teacher_context: Literal["chunk", "window"] = Field(
        "chunk",
        description="what the teacher reads: the sample's chunk, or the window: consecutive chunks packed up to the "
        "model's window less the sample's budget (the whole corpus when it fits, as icl reads it)",
    )
    corpus_description: str | None = Field(
        None, description="one line about the corpus; default: 'a corpus of N documents'"
    )
    shard_size: int = Field(32, ge=1)
    max_attempts: int = Field(3, ge=1, description="tries per sample when filters reject it")

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(kinds) - set(ALL_KINDS))
        if unknown:
            raise ValueError(f"unknown seed kind(s) {unknown}; known: {', '.join(ALL_KINDS)}")
        if any(w < 0 for w in kinds.values()) or sum(kinds.values()) <= 0:
            raise ValueError("kind weights must be >= 0 with a positive sum")
        return kinds


# Settings added after runs were recorded: a record without one was made with this value.
ADDED_SETTING_DEFAULTS = {"teacher_context": "chunk", "samples_per_chunk": 1}


def with_added_defaults(recorded: dict) -> dict:
    """A recorded synthesis config as today's code writes it: settings added since get the value the
    record was made with, so an older run folder still resumes and its samples can still be reused."""
    return ADDED_SETTING_DEFAULTS | recorded


class SynthesisRunSettings(BaseModel):
    """How the work runs; does not change which samples are made (except HF batching, see docs)."""

    model_config = STRICT_SETTINGS

    engine: EngineName = "auto"
    engines: int = Field(1, ge=1, description="engine actors (one per GPU on GPU nodes)")
    batch_size: int = Field(16, ge=1, description="HF engine batch size")
    threads: int | None = Field(None, ge=1, description="torch threads per HF engine")
    cpus_per_engine: float | None = Field(
        None, gt=0, description="Ray CPUs per engine actor (default: this machine's cores / engines)"
    )
    gpus_per_engine: float = Field(0, ge=0, description="Ray GPUs per engine actor (1 on GPU nodes with vLLM)")
    executor: Executor = Field("auto", description="ray, local, or auto: Ray with RAY_ADDRESS or engines > 1")


def room_for_corpus_text(config: SynthesisConfig, window: int) -> int:
    """Tokens of corpus text that fit in the window beside one sample's chat, message and answer."""
    return window - PROMPT_OVERHEAD_TOKENS - config.max_message_tokens - config.max_answer_tokens


def teacher_context_tokens(config: SynthesisConfig, window: int) -> int:
    """Tokens of corpus text the teacher reads at most: a chunk, or all the room in the window."""
    if config.teacher_context == "chunk":
        return config.chunk_max_tokens
    return room_for_corpus_text(config, window)


def max_prompt_tokens(config: SynthesisConfig, window: int) -> int:
    """Upper bound of a teacher prompt: its corpus text, title(s), chat template and the user message."""
    return teacher_context_tokens(config, window) + PROMPT_OVERHEAD_TOKENS + config.max_message_tokens


def check_fits_window(config: SynthesisConfig, window: int) -> None:
    """A chunk, and every prompt with its answer, must fit the model's window."""
    budget = room_for_corpus_text(config, window)
    if config.chunk_max_tokens > budget:
        needed = config.chunk_max_tokens + window - budget
        raise CartridgeError(
            f"chunk_max_tokens={config.chunk_max_tokens} plus prompt and answer needs {needed} tokens, more than "
            f"the model's window of {window}: lower chunk_max_tokens to {budget} or less"
        )
