"""Turn planned samples into rows: the user message (turn A), the answer with the chunk in context
or from the corpus (turn B), the teacher's scores of every answer token, and the quality filters
with retries under new seeds."""

import random
from collections import Counter
from dataclasses import dataclass

from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.stages.ingest import Chunk
from cartridges.stages.synthesis.config import SynthesisConfig
from cartridges.stages.synthesis.engines import Engine, SamplingConfig, TokenScores
from cartridges.stages.synthesis.quality import answer_problem, message_problem
from cartridges.stages.synthesis.sample_plan import PlannedSample
from cartridges.stages.synthesis.seed_prompts import (
    CORPUS_ANSWERED,
    corpus_answer,
    message_instruction,
    writer_excerpt,
)

ATTEMPT_SEED_STRIDE = 1_000_003
WORDS_PER_TOKEN = 0.75
WRITER_EXCERPT_WORDS = 250


@dataclass
class Draft:
    """A sample on its way through the turns."""

    planned: PlannedSample
    chunk: Chunk
    title: str
    passage: str | None = None
    message: str | None = None
    corpus_text: str | None = None
    excerpt: str | None = None
    prompt: list[int] | None = None
    answer: list[int] | None = None
    scores: TokenScores | None = None
    truncated: bool = False


class SampleBuilder:
    """Turns planned samples into rows with one engine (the expensive state of a worker)."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        config: SynthesisConfig,
        chunks: list[Chunk],
        titles: list[str],
        teacher_texts: list[str],
        model_fingerprint: str,
    ):
        """`teacher_texts`: what the teacher reads for each chunk id (`teacher_context.teacher_texts`)."""
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.chunks, self.titles, self.model_fingerprint = chunks, titles, model_fingerprint
        self.teacher_texts = teacher_texts
        self._context_ids: dict[str, list[int]] = {}  # a block's tokens, shared by its chunks' samples
        self.description = config.corpus_description or f"a corpus of {len(titles)} documents"
        stops = {tokenizer.eos_token_id, *_as_list(getattr(tokenizer, "eos_token_ids", None))}
        self.stop_ids = tuple(sorted(t for t in stops if t is not None))
        self.message_sampling = SamplingConfig(
            config.max_message_tokens, config.temperature, config.top_p, self.stop_ids
        )
        self.answer_sampling = SamplingConfig(config.max_answer_tokens, config.temperature, config.top_p, self.stop_ids)

    def build(self, planned: list[PlannedSample]) -> tuple[list[dict], dict]:
        """Rows for `planned` (rejected samples retried with new seeds) and what making them took."""
        rows: list[dict] = []
        rejected: Counter = Counter()
        generated = 0
        pending = planned
        for attempt in range(self.config.max_attempts):
            if not pending:
                break
            made, failed, tokens = self._attempt(pending, attempt)
            rows += made
            generated += tokens
            rejected.update(reason for _, reason in failed)
            pending = [p for p, _ in failed]
        return rows, {"generated_tokens": generated, "rejected": dict(rejected), "unfilled": len(pending)}

    def _attempt(
        self, pending: list[PlannedSample], attempt: int
    ) -> tuple[list[dict], list[tuple[PlannedSample, str]], int]:
        failed: list[tuple[PlannedSample, str]] = []
        drafts: list[Draft] = []
        max_words = int(self.config.max_answer_tokens * WORDS_PER_TOKEN)
        for planned in pending:
            chunk = self.chunks[planned.chunk_id]
            draft = Draft(planned, chunk, self.titles[chunk.doc_id])
            rng = random.Random(planned.seed + attempt * ATTEMPT_SEED_STRIDE)
            if planned.kind in CORPUS_ANSWERED:
                found = corpus_answer(planned.kind, chunk.text, rng, max_words)
                if found is None:
                    failed.append((planned, "chunk_too_short"))
                    continue
                draft.passage, draft.message, draft.corpus_text = found.passage, found.message, found.answer
            if draft.message is None:
                draft.excerpt = writer_excerpt(chunk.text, rng, WRITER_EXCERPT_WORDS, around=draft.passage)
            drafts.append(draft)
        generated = self._write_messages([d for d in drafts if d.message is None], attempt, failed)
        drafts = [d for d in drafts if d.message is not None]
        for draft in drafts:
            context = self._teacher_context_ids(draft.chunk.chunk_id)
            draft.prompt = context + chat_token_ids(self.tokenizer, [{"role": "user", "content": draft.message}])
        generated += self._write_answers(drafts, attempt)
        kept = []
        for draft in drafts:
            problem = answer_problem(self.tokenizer.decode(draft.answer, skip_special_tokens=True), draft.answer)
            if problem:
                failed.append((draft.planned, problem))
            else:
                kept.append(draft)
        to_score = [d for d in kept if d.scores is None]
        if to_score:
            for draft, scores in zip(
                to_score,
                self.engine.score([d.prompt for d in to_score], [d.answer for d in to_score], self.config.top_k),
            ):
                draft.scores = scores
        return [self._row(d) for d in kept], failed, generated

    def _teacher_context_ids(self, chunk_id: int) -> list[int]:
        text = self.teacher_texts[chunk_id]
        if text not in self._context_ids:
            self._context_ids[text] = context_token_ids(self.tokenizer, text)
        return self._context_ids[text]

    def _seeds(self, drafts: list[Draft], attempt: int, turn: int) -> list[int]:
        return [(d.planned.seed + attempt * ATTEMPT_SEED_STRIDE + turn) % 2**31 for d in drafts]

    def _write_messages(self, drafts: list[Draft], attempt: int, failed: list) -> int:
        """Turn A: the model reads the chunk and writes the user message."""
        if not drafts:
            return 0
        prompts = []
        for d in drafts:
            system = f'The following is an excerpt of "{d.title}", from {self.description}.\n\n{d.excerpt}'
            user = message_instruction(d.planned.kind, d.passage)
            prompts.append(
                chat_token_ids(
                    self.tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": user}]
                )
            )
        outputs = [
            c.token_ids for c in self.engine.generate(prompts, self.message_sampling, self._seeds(drafts, attempt, 0))
        ]
        for draft, tokens in zip(drafts, outputs):
            finished = bool(tokens) and tokens[-1] in self.stop_ids
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip().strip('"').strip()
            problem = message_problem(draft.planned.kind, text, tokens, finished)
            if problem:
                failed.append((draft.planned, problem))
            else:
                draft.message = text
        return sum(len(t) for t in outputs)

    def _write_answers(self, drafts: list[Draft], attempt: int) -> int:
        """Turn B: the teacher answers with its context (the chunk, or its block) in view, its top-k
        recorded while it generates; or the answer is the corpus text (scored later in one pass)."""
        for draft in drafts:
            if draft.corpus_text is not None:
                tokens = self.tokenizer(draft.corpus_text, add_special_tokens=False)["input_ids"]
                draft.truncated = len(tokens) >= self.config.max_answer_tokens
                draft.answer = tokens[: self.config.max_answer_tokens - 1] + [self.stop_ids[0]]
        model_answered = [d for d in drafts if d.corpus_text is None]
        if not model_answered:
            return 0
        seeds = self._seeds(model_answered, attempt, 1)
        outputs = self.engine.generate(
            [d.prompt for d in model_answered], self.answer_sampling, seeds, top_k=self.config.top_k
        )
        for draft, completion in zip(model_answered, outputs):
            draft.answer, draft.scores = completion.token_ids, completion.scores
            draft.truncated = not completion.token_ids or completion.token_ids[-1] not in self.stop_ids
        return sum(len(c.token_ids) for c in outputs)

    def _row(self, draft: Draft) -> dict:
        answer_text = self.tokenizer.decode(draft.answer, skip_special_tokens=True).strip()
        return {
            "sample_id": draft.planned.sample_id,
            "chunk_id": draft.chunk.chunk_id,
            "doc_id": draft.chunk.doc_id,
            "seed_kind": draft.planned.kind,
            "seed": draft.planned.seed,
            "answer_source": "corpus" if draft.corpus_text is not None else "model",
            "messages": [{"role": "user", "content": draft.message}, {"role": "assistant", "content": answer_text}],
            "answer_ids": draft.answer,
            "topk_ids": draft.scores.topk_ids,
            "topk_logprobs": draft.scores.topk_logprobs,
            "token_logprobs": draft.scores.token_logprobs,
            "truncated": draft.truncated,
            "teacher_prompt_tokens": len(draft.prompt),
            "engine": self.engine.name,
            "model_fingerprint": self.model_fingerprint,
        }


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]
