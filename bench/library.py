"""Does a library of per-document cartridges, routed per question, beat retrieval at the same KV budget?

One QA file's corpora become one corpus folder (a file per corpus, written under --out, never in the
repository) and one library (`cartridges build` with the library config). Every question is asked of
the whole collection; a HousingQA question is prefixed with its jurisdiction ("In Delaware: ..."),
since HousingQA asks the same questions of every state. At each KV budget B, side by side and paired
per question: the library (units routed within B), BM25 `rag` of B tokens over the whole collection,
`truncated` (the collection's first B tokens), the control (the library with the gold document's
units taken out: the best-scoring wrong units), and once: `none`, the oracle (the gold document's
text in context) and the gold document's units composed. Reported: gold NLL, recovery of the
none-to-oracle gap, rank accuracy, answer F1, the router's hit rate (gold document among the routed
units), KV tokens and bytes per question, time to first token (the block made for the question, then
the chat's prefill: rag pays its passages' prefill, the library concatenates stored rows) and the
library's build time. Writes results.json, results.md and a PNG under --out.

    python bench/library.py --qa ../shared/data/qa/encyclopedic_squad2.json --suite squad-all --per-corpus 16
"""

import argparse
import json
import math
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from cartridges.bench.run_record import record_header
from cartridges.errors import run_script
from cartridges.kv_layout import kv_shape
from cartridges.layout import chat_token_ids
from cartridges.library.library import RoutedUnit, load_library
from cartridges.loading import open_cartridge
from cartridges.models import load_model
from cartridges.qa import QACorpus, load_qa_files
from cartridges.registry.store import Registry
from cartridges.runtime import prefix_logits
from cartridges.stages.evaluation.contexts import Context, FixedContext, corpus_kv
from cartridges.stages.evaluation.evaluate import score_corpus
from cartridges.stages.evaluation.methods.library import RoutedContext
from cartridges.stages.evaluation.methods.select import evenly_spaced
from cartridges.stages.evaluation.methods.table import context_source
from cartridges.stages.ingest import DOCUMENT_SEPARATOR, read_corpus
from cartridges.stages.library.build import build_library
from cartridges.stages.library.config import LibraryConfig

TTFT_QUESTIONS = 8


def jurisdiction(corpus_id: str) -> str:
    """`housingqa-new-york` -> `New York`."""
    return " ".join(word.capitalize() for word in corpus_id.removeprefix("housingqa-").split("-"))


def collection(corpora: list[QACorpus], per_corpus: int, prefix_state: bool) -> tuple[QACorpus, dict[str, str]]:
    """All corpora as one QA corpus (questions evenly sampled per corpus) and each question's gold file."""
    questions, gold = [], {}
    for corpus in corpora:
        picked = [corpus.questions[i] for i in evenly_spaced(len(corpus.questions), per_corpus)]
        for q in picked:
            text = f"In {jurisdiction(corpus.id)}: {q.question}" if prefix_state else q.question
            questions.append(replace(q, question=text))
            gold[q.id] = f"{corpus.id}.txt"
    text = DOCUMENT_SEPARATOR.join(corpus.text for corpus in corpora)
    return QACorpus(id="all", title="all", text=text, questions=tuple(questions)), gold


class PerQuestion:
    """A block chosen by the question's gold document (the oracles), made once per document."""

    def __init__(self, gold: dict[str, str], block_of):
        self.gold, self.block_of, self.blocks = gold, block_of, {}

    def context(self, question) -> Context:
        source = self.gold[question.id]
        if source not in self.blocks:
            self.blocks[source] = self.block_of(source)
        return self.blocks[source]


@torch.no_grad()
def first_token_seconds(loaded, make_source, questions) -> float:
    """Mean seconds from a question to its first token's logits: a fresh block for the question, then the chat."""
    shape = kv_shape(loaded.model.config)
    total = 0.0
    for question in questions:
        source = make_source()
        started = time.perf_counter()
        context = source.context(question)
        ids = torch.tensor([chat_token_ids(loaded.tokenizer, [{"role": "user", "content": question.question}])])
        prefix_logits(loaded.model, context.prefix, shape, ids, start_position=context.start_position)
        total += time.perf_counter() - started
    return total / len(questions)


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
    return mean, math.sqrt(var / len(d))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qa", type=Path, required=True)
    parser.add_argument("--suite", required=True, help="legal-all or squad-all (names the results)")
    parser.add_argument("--budget", type=int, action="append", default=None)
    parser.add_argument("--per-corpus", type=int, default=16, help="questions per corpus, evenly spaced")
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--distractors", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], help="library config field=value (repeatable)")
    parser.add_argument(
        "--methods",
        default="none,oracle,oracle-units,library,rag,truncated,control",
        help="comma list; variants: library-own (each unit at its own positions), library-best-first",
    )
    parser.add_argument(
        "--cartridge", default=None, help="REF in --cartridge-registry: a whole-corpus cartridge, scored as `cartridge`"
    )
    parser.add_argument("--cartridge-registry", default=None)
    parser.add_argument("--tag", default="", help="a subfolder of --out/SUITE for this run (a variant's results)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, default=Path("bench/results") / date.today().isoformat() / "library")
    args = parser.parse_args()
    budgets = args.budget or [256, 1024, 2048]
    out = args.out / args.suite / args.tag if args.tag else args.out / args.suite
    wanted = set(args.methods.split(","))
    out.mkdir(parents=True, exist_ok=True)
    fields = dict(item.split("=", 1) for item in args.set)
    config = LibraryConfig.model_validate({**fields}, strict=False)

    torch.set_grad_enabled(False)  # scoring only: no autograd graph behind any block
    loaded = load_model(args.model)
    corpora = load_qa_files([args.qa], None)
    folder = out / "corpus"
    folder.mkdir(exist_ok=True)
    for corpus in corpora:
        (folder / f"{corpus.id}.txt").write_text(corpus.text)
    registry = Registry(out / "registry")
    built = build_library(read_corpus(folder), loaded, args.suite, config, registry)
    print(f"library {built.ref}: {built.units} units, {built.num_tokens} KV tokens, {built.seconds:.0f} s", flush=True)
    library = load_library(*reversed(registry.locate(built.ref)))
    questions, gold = collection(corpora, args.per_corpus, args.suite.startswith("legal"))
    texts = {f"{corpus.id}.txt": corpus.text for corpus in corpora}
    width = library.cartridge.prompt_embeddings.shape[1]

    rows, per_question = [], {}

    def score(method, budget, source, ttft_source=None, routed: RoutedContext | None = None, answers: bool = True):
        if method not in wanted:
            return
        started = time.perf_counter()
        answer_tokens = args.answer_tokens if answers else 0
        result = score_corpus(loaded, questions, source, method, args.distractors, answer_tokens=answer_tokens)
        kv = [source.context(q).kv_tokens for q in questions.questions]
        row = {
            "method": method,
            "budget": budget,
            "nll": result.nll,
            "nll_se": result.nll_se,
            "rank_accuracy": result.rank_accuracy,
            "answer_f1": result.answer_f1,
            "kv_tokens": sum(kv) / len(kv),
            "kv_bytes": sum(kv) / len(kv) * width * 4,
            "score_seconds": time.perf_counter() - started,
        }
        if routed is not None:
            hits = [gold[q.id] in {r.unit.source for r in routed.routes[q.id]} for q in questions.questions]
            row["hit_rate"] = sum(hits) / len(hits)
        if ttft_source is not None:
            row["ttft_s"] = first_token_seconds(loaded, ttft_source, questions.questions[:TTFT_QUESTIONS])
        rows.append(row)
        per_question[f"{method}@{budget}"] = {"nll": list(result.per_question_nll), "f1": list(result.per_question_f1)}
        print(json.dumps(row), flush=True)

    wanted |= {"none", "oracle"}  # recovery is measured between them
    score("none", None, FixedContext(Context(None)))
    # the oracle's greedy answers after a whole article take minutes a question here: NLL and rank only
    score("oracle", None, PerQuestion(gold, lambda source: Context(corpus_kv(loaded, texts[source]))), answers=False)

    def gold_units(source: str) -> Context:
        """The gold document's units in document order, composed as the library composes (its positions);
        before 2026-12-08 each unit was read at its own positions whatever the library's."""
        units = [RoutedUnit(u, 0.0) for u in library.index.units if u.source == source]
        return Context(torch.cat(library.placed(units, loaded.model)))

    score("oracle-units", None, PerQuestion(gold, gold_units))
    if args.cartridge:
        whole = open_cartridge(args.cartridge, Registry(args.cartridge_registry))
        wanted.add("cartridge")
        score("cartridge", whole.manifest.num_tokens, FixedContext(Context(whole.prompt_embeddings)))
    for budget in budgets:
        routed = RoutedContext(library, budget, loaded.model)
        score("library", budget, routed, lambda b=budget: RoutedContext(library, b, loaded.model), routed)
        score(
            "rag",
            budget,
            context_source(loaded, "rag", questions.text, budget),
            lambda b=budget: context_source(loaded, "rag", questions.text, b),
        )
        score("truncated", budget, context_source(loaded, "truncated", questions.text, budget))
        control = RoutedContext(library, budget, loaded.model, gold_source=lambda q: gold[q.id])
        score("control", budget, control, routed=control)
        variants = {"library-own": (None, "own"), "library-best-first": ("best_first", None)}
        for name, (order, positions) in variants.items():
            if name in wanted:
                variant = RoutedContext(library, budget, loaded.model, order=order, positions=positions)
                score(name, budget, variant, routed=variant)

    none, oracle = per_question["none@None"]["nll"], per_question["oracle@None"]["nll"]
    gap = sum(none) / len(none) - sum(oracle) / len(oracle)
    for row in rows:
        row["recovery"] = (sum(none) / len(none) - row["nll"]) / gap if gap else None
    comparisons = []
    for budget in budgets:
        for mine in sorted(m for m in wanted if m.startswith("library")):
            lib = per_question.get(f"{mine}@{budget}")
            if lib is None:
                continue
            for other in ("rag", "truncated", "control", "library", "oracle", "cartridge"):
                theirs = per_question.get(f"{other}@{budget if other != 'oracle' else None}")
                if other == "cartridge":
                    theirs = next((v for k, v in per_question.items() if k.startswith("cartridge@")), None)
                if theirs is None or other == mine:
                    continue
                f1 = paired(lib["f1"], theirs["f1"]) if lib["f1"] and theirs["f1"] else (None, None)
                comparisons.append(
                    {
                        "budget": budget,
                        "method": mine,
                        "vs": other,
                        "nll_diff": paired(lib["nll"], theirs["nll"]),
                        "f1_diff": f1,
                    }
                )
    record = {
        **record_header(vars(args)),
        "suite": args.suite,
        "questions": len(questions.questions),
        "library": {
            "config": config.model_dump(),
            "ref": built.ref,
            "units": built.units,
            "kv_tokens": built.num_tokens,
            "text_tokens": built.text_tokens,
            "build_seconds": built.seconds,
            "made": built.made,
        },
        "rows": rows,
        "paired": comparisons,
        "per_question": per_question,
    }
    (out / "results.json").write_text(json.dumps(record, indent=2))
    (out / "results.md").write_text(markdown(record))
    plot(record, out / "recovery_vs_budget.png")
    print(markdown(record))


def markdown(record: dict) -> str:
    lines = [
        f"{record['suite']}: {record['questions']} questions; library {record['library']['units']} units, "
        f"{record['library']['kv_tokens']} KV tokens from {record['library']['text_tokens']} text tokens, built in "
        f"{record['library']['build_seconds']:.0f} s",
        "",
        "| method | B | gold NLL ± SE | recovery | rank acc | answer F1 | hit rate | KV tokens | KV MB | TTFT s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:

        def fmt(value, spec):
            return "" if value is None else format(value, spec)

        lines.append(
            f"| {r['method']} | {r['budget'] or ''} | {r['nll']:.3f} ± {r['nll_se']:.3f} | {fmt(r.get('recovery'), '.2f')} | "
            f"{fmt(r['rank_accuracy'], '.2f')} | {fmt(r['answer_f1'], '.3f')} | {fmt(r.get('hit_rate'), '.2f')} | "
            f"{r['kv_tokens']:.0f} | {r['kv_bytes'] / 2**20:.1f} | {fmt(r.get('ttft_s'), '.3f')} |"
        )
    lines += ["", "| B | method | minus | gold NLL (paired ± SE) | answer F1 (paired ± SE) |", "|---|---|---|---|---|"]
    for c in record["paired"]:
        f1 = "" if c["f1_diff"][0] is None else f"{c['f1_diff'][0]:+.3f} ± {c['f1_diff'][1]:.3f}"
        lines.append(
            f"| {c['budget']} | {c['method']} | {c['vs']} | {c['nll_diff'][0]:+.3f} ± {c['nll_diff'][1]:.3f} | {f1} |"
        )
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in record["rows"] if r["budget"] is not None}):
        points = sorted((r["budget"], r["recovery"]) for r in record["rows"] if r["method"] == method)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    for method in ("oracle-units",):
        for r in record["rows"]:
            if r["method"] == method:
                ax.axhline(r["recovery"], linestyle="--", color="grey", label=f"{method} ({r['kv_tokens']:.0f} tokens)")
    ax.axhline(1.0, linestyle=":", color="black", label="oracle (gold document in context)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV budget B (tokens)")
    ax.set_ylabel("recovery of none-to-oracle gold NLL gap")
    ax.set_title(record["suite"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    run_script(main)
