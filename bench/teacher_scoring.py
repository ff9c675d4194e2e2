"""Benchmark: the teacher's scoring pass in synthesis, a padded batch against a packed one, side by side.

Scoring is what a corpus-answered sample costs (its answer is corpus text: no generation): the
teacher reads its context (a chunk, or the corpus up to the window: `synthesis.teacher_context`)
and the message, and gives top-k log-probabilities at every answer token. Rows of one context share
its KV. Two ways to run a batch of them, timed on the same rows in alternation:
- padded (the HF engine before 2026-11-29): the rows left-padded to the longest, the context's KV
  expanded to a copy per row, one HF forward pass with SDPA;
- packed (`HFEngine.score` now): the rows' tokens in one sequence, each attending to the one copy of
  the context's KV and causally to itself (`cartridges.serving.packed_attention.packed_logits`).
Rows are real continuation samples of a QA article (message and answer from the article). Both must
agree (largest difference of a top-k log-probability is reported). Writes results.json, results.md
and a PNG under --out.

    python bench/teacher_scoring.py --corpus-id squad2-Normans --context 2048 --context 0
"""

import argparse
import json
import os
import random
import statistics
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

from cartridges.bench.run_record import record_header, settings_of
from cartridges.errors import run_script
from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import kv_prefix_of_tokens, prefix_cache
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.models import load_model
from cartridges.qa import DEFAULT_QA_DIR, find_corpus
from cartridges.serving.batching import pad_batch
from cartridges.stages.synthesis.engines import HFEngine
from cartridges.stages.synthesis.seed_prompts import corpus_answer


def padded_logprobs(model, prefix: torch.Tensor, rows: list[list[int]], answers: list[list[int]], pad: int):
    """The earlier scoring pass: left-padded rows over a per-row copy of the prefix's KV."""
    shared = prefix.shape[0]
    ids, mask = pad_batch(rows, pad, side="left")
    keep = max(len(a) for a in answers) + 1
    positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
    cache = prefix_cache(prefix, *kv_shape(model.config), batch_size=len(rows))
    mask = torch.cat([torch.ones(len(rows), shared, dtype=mask.dtype), mask], dim=1)
    logits = model(
        input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=cache, logits_to_keep=keep
    ).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [logprobs[row, keep - len(a) - 1 : keep - 1] for row, a in enumerate(answers)]


def samples(corpus_text: str, tokenizer, count: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(chat tokens of the message, answer tokens) of `count` continuation samples of the article."""
    rng = random.Random(seed)
    made = []
    while len(made) < count:
        found = corpus_answer("continuation", corpus_text, rng, max_answer_words=140)
        answer = tokenizer(found.answer, add_special_tokens=False)["input_ids"][:191] + [tokenizer.eos_token_id]
        made.append((chat_token_ids(tokenizer, [{"role": "user", "content": found.message}]), answer))
    return made


@dataclass(frozen=True)
class ScoringSettings:
    rows: int
    repeats: int
    seed: int


def measure(loaded, corpus, context_tokens: int, settings: ScoringSettings) -> dict:
    tokenizer = loaded.tokenizer
    text = f"{corpus.id}\n\n{corpus.text}"
    context = context_token_ids(tokenizer, text)
    if context_tokens:
        context = context[:context_tokens]
    rows = samples(corpus.text, tokenizer, settings.rows, settings.seed)
    prompts = [context + message for message, _ in rows]
    answers = [answer for _, answer in rows]
    engine = HFEngine(str(loaded.path), batch_size=settings.rows)
    model = engine.model
    shared = len(os.path.commonprefix(prompts))  # the context and the chat's common beginning
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    largest_difference = 0.0
    with torch.no_grad():
        prefix = kv_prefix_of_tokens(model, prompts[0][:shared])  # neither timing includes the prefill:
        engine.score(prompts, answers, top_k=20)  # the engine keeps the KV of this beginning from here on
        suffixes = [p[shared:] + a for p, a in zip(prompts, answers, strict=True)]
        for _ in range(settings.repeats):
            started = time.perf_counter()
            reference = padded_logprobs(model, prefix, suffixes, answers, engine.pad_token_id)
            times["padded"].append(time.perf_counter() - started)
            started = time.perf_counter()
            scores = engine.score(prompts, answers, top_k=20)
            times["packed"].append(time.perf_counter() - started)
            for expected, got in zip(reference, scores, strict=True):
                top = expected.topk(20, dim=-1).values
                difference = (top - torch.tensor(got.topk_logprobs)).abs().max().item()
                largest_difference = max(largest_difference, difference)
    engine.close()
    differences = [p - q for p, q in zip(times["padded"], times["packed"], strict=True)]
    return {
        "corpus": corpus.id,
        "context_tokens": len(context),
        "rows": settings.rows,
        "row_tokens": [len(s) for s in suffixes],
        "padded_seconds": times["padded"],
        "packed_seconds": times["packed"],
        "saved_seconds": statistics.mean(differences),
        "saved_se": statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else float("nan"),
        "speedup": statistics.median(times["padded"]) / statistics.median(times["packed"]),
        "largest_topk_logprob_difference": largest_difference,
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "| corpus | context tokens | rows (answer+message tokens, mean) | padded s (median) | packed s (median) | padded - packed s (paired) | speed-up | max top-k diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['corpus']} | {r['context_tokens']} | {r['rows']} ({statistics.mean(r['row_tokens']):.0f}) | "
            f"{statistics.median(r['padded_seconds']):.2f} | {statistics.median(r['packed_seconds']):.2f} | "
            f"{r['saved_seconds']:.2f} ± {r['saved_se']:.2f} | x{r['speedup']:.2f} | {r['largest_topk_logprob_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['corpus'].removeprefix('squad2-')[:14]}\n{r['context_tokens']} tok" for r in results]
    x = range(len(results))
    ax.bar([i - 0.2 for i in x], [statistics.median(r["padded_seconds"]) for r in results], 0.4, label="padded")
    ax.bar([i + 0.2 for i in x], [statistics.median(r["packed_seconds"]) for r in results], 0.4, label="packed")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel(f"seconds per batch of {results[0]['rows']} samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qa", type=Path, default=DEFAULT_QA_DIR / "encyclopedic_squad2.json")
    parser.add_argument("--corpus-id", action="append", default=None)
    parser.add_argument(
        "--context", type=int, action="append", default=None, help="context tokens (0: the whole article; repeatable)"
    )
    parser.add_argument("--rows", type=int, default=16, help="samples per batch (the HF engine's default batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results") / date.today().isoformat() / "teacher-scoring"
    )
    args = parser.parse_args()
    loaded = load_model(args.model)
    results = []
    for corpus_id in args.corpus_id or ["squad2-Normans"]:
        corpus = find_corpus(args.qa, corpus_id)
        for context in args.context or [2048, 0]:
            results.append(measure(loaded, corpus, context, settings_of(args, ScoringSettings)))
            print(markdown(results[-1:]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({**record_header(vars(args)), "results": results}, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    plot(results, args.out / "teacher_scoring.png")
    print(markdown(results))


if __name__ == "__main__":
    run_script(main)
