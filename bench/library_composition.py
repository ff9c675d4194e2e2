"""Why do units composed lose to the same text read at once? Three ways to make and compose a library's
units, against the library's own (each unit prefilled alone, its first row the attention sink, units moved
to one run of positions), on the same routed units per question, paired:

- `shared-sink`: each unit prefilled after the tokenizer's BOS, its BOS row dropped; the block is one BOS
  row, then the units (one sink for the block, not one per unit);
- `one-sink`: the library's units with every unit's first row dropped but the first unit's;
- `in-document`: each unit's rows cut from its document prefilled whole (after a BOS, restarting every
  --segment tokens), so a unit's KV has read the text before it; the block is one BOS row, then the units.

Also the gold document's units all composed (`gold-units`), each way. Gold NLL and rank accuracy per
question (no answers generated). Reads a library that `bench/library.py` built (its --registry and the
corpus folder it wrote). Writes results.json and results.md under --out.

    python bench/library_composition.py --qa ../shared/data/qa/encyclopedic_squad2.json --suite squad-all \
        --per-corpus 8 --registry /tmp/libruns/out/squad-all/kv-256/registry \
        --corpus /tmp/libruns/out/squad-all/kv-256/corpus --budget 256 --budget 1024
"""

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch

from cartridges.bench.library import collection, paired
from cartridges.bench.run_record import record_header
from cartridges.errors import run_script
from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import context_token_ids
from cartridges.library.library import Library, RoutedUnit, load_library, moved_to_their_places
from cartridges.library.units import split_units
from cartridges.models import LoadedModel, load_model
from cartridges.qa import load_qa_files
from cartridges.registry.store import Registry
from cartridges.rotary import move_keys
from cartridges.stages.evaluation.contexts import Context, FixedContext
from cartridges.stages.evaluation.evaluate import score_corpus
from cartridges.stages.ingest import read_corpus

WAYS = ("library", "shared-sink", "one-sink", "in-document")


class Compositions:
    """The rows of a unit made each way, and a block of units composed each way."""

    def __init__(self, loaded: LoadedModel, library: Library, texts: dict[str, str], segment: int):
        self.loaded, self.library, self.texts, self.segment = loaded, library, texts, segment
        self.bos = loaded.tokenizer.bos_token_id
        if self.bos is None:
            raise SystemExit("the tokenizer has no BOS token to share")
        self.sink = kv_prefix_of_tokens(loaded.model, [self.bos]).float()
        self.after_bos: dict[str, torch.Tensor] = {}
        self.in_document: dict[str, tuple[torch.Tensor, int]] = {}  # unit id: rows, position of the first

    def ids(self, unit_id: str) -> list[int]:
        return context_token_ids(self.loaded.tokenizer, self.texts[unit_id])

    def shared_sink_rows(self, unit_id: str) -> tuple[torch.Tensor, int]:
        if unit_id not in self.after_bos:
            self.after_bos[unit_id] = kv_prefix_of_tokens(self.loaded.model, [self.bos, *self.ids(unit_id)])[1:].float()
        return self.after_bos[unit_id], 1

    def in_document_rows(self, unit_id: str) -> tuple[torch.Tensor, int]:
        if not self.in_document:
            self._prefill_documents()
        return self.in_document[unit_id]

    def _prefill_documents(self) -> None:
        """Each document's units in order after one BOS, a new segment when the next unit would pass --segment."""
        segments: list[list[tuple[str, list[int]]]] = []
        source = None
        for unit in self.library.index.units:
            ids = self.ids(unit.id)
            length = sum(len(part) for _, part in segments[-1]) if segments else 0
            if unit.source != source or length + len(ids) > self.segment:
                segments.append([])
            segments[-1].append((unit.id, ids))
            source = unit.source
        for segment in segments:
            kv = kv_prefix_of_tokens(self.loaded.model, [self.bos] + [t for _, ids in segment for t in ids]).float()
            at = 1
            for unit_id, ids in segment:
                self.in_document[unit_id] = (kv[at : at + len(ids)].clone(), at)
                at += len(ids)

    def block(self, way: str, unit_ids: list[str]) -> torch.Tensor:
        model = self.loaded.model
        if way == "library":
            return torch.cat(self.library.placed([RoutedUnit(self.library.unit(u), 0.0) for u in unit_ids], model))
        if way == "one-sink":
            routed = [RoutedUnit(self.library.unit(u), 0.0) for u in unit_ids]
            parts = self.library.placed(routed, model, positions="own")
            return torch.cat(moved_to_their_places(model, parts[:1] + [p[1:] for p in parts[1:]]))
        rows_of = self.shared_sink_rows if way == "shared-sink" else self.in_document_rows
        layers, heads, _ = kv_shape(model.config)
        parts, offset = [self.sink], 1
        for unit_id in unit_ids:
            rows, first = rows_of(unit_id)
            count = rows.shape[0]
            at = torch.arange(first, first + count)[:, None, None].expand(count, layers, heads)
            parts.append(rows if first == offset else move_keys(model, rows, at, at - first + offset))
            offset += count
        return torch.cat(parts)


class Blocks:
    """Per question, the block of its units (routed within the budget, in the library's order, or pinned)."""

    def __init__(self, compositions: Compositions, way: str, units_of):
        self.compositions, self.way, self.units_of = compositions, way, units_of

    def context(self, question) -> Context:
        return Context(self.compositions.block(self.way, self.units_of(question)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qa", type=Path, required=True)
    parser.add_argument("--suite", required=True)
    parser.add_argument("--per-corpus", type=int, default=8)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--library", default=None, help="its reference (default: SUITE@1)")
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus folder the library was built from")
    parser.add_argument("--budget", type=int, action="append", default=None)
    parser.add_argument("--segment", type=int, default=4096, help="in-document: tokens prefilled at once at most")
    parser.add_argument("--distractors", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results") / date.today().isoformat() / "library")
    args = parser.parse_args()
    budgets = args.budget or [256, 1024]
    out = args.out / args.suite / "composition"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    loaded = load_model()
    corpora = load_qa_files([args.qa], None)
    questions, gold = collection(corpora, args.per_corpus, args.suite.startswith("legal"))
    registry = Registry(args.registry)
    where, path = registry.locate(args.library or f"{args.suite}@1")
    library = load_library(path, expected=where)
    units = split_units(
        read_corpus(args.corpus).documents, loaded.tokenizer, loaded.tokenizer_fingerprint, library.index.unit_tokens
    )
    if [u.digest for u in units] != [u.digest for u in library.index.units]:
        raise SystemExit(f"{args.corpus} is not the corpus {library.label} was built from")
    compositions = Compositions(loaded, library, {u.id: u.text for u in units}, args.segment)

    rows, per_question = [], {}

    def score(name: str, budget: int | None, source) -> None:
        started = time.perf_counter()
        result = score_corpus(loaded, questions, source, name, args.distractors)
        row = {"method": name, "budget": budget, "nll": result.nll, "nll_se": result.nll_se}
        row |= {"rank_accuracy": result.rank_accuracy, "seconds": time.perf_counter() - started}
        rows.append(row)
        per_question[f"{name}@{budget}"] = list(result.per_question_nll)
        print(json.dumps(row), flush=True)

    score("none", None, FixedContext(Context(None)))
    for budget in budgets:
        for way in WAYS:
            # one row of the shared sink is the block's: its units get the budget less that row
            room = budget - 1 if way in ("shared-sink", "in-document") else budget
            routed = {q.id: [r.unit.id for r in library.route(q.question, room)] for q in questions.questions}
            score(way, budget, Blocks(compositions, way, lambda q, routed=routed: routed[q.id]))
    for way in WAYS:
        score(f"gold-units {way}", None, Blocks(compositions, way, lambda q: gold_units(library, gold[q.id])))
    comparisons = [
        {
            "budget": b,
            "method": way,
            "vs": "library",
            "nll_diff": paired(per_question[f"{way}@{b}"], per_question[f"library@{b}"]),
        }
        for b in budgets
        for way in WAYS[1:]
    ]
    comparisons += [
        {
            "budget": None,
            "method": f"gold-units {way}",
            "vs": "gold-units library",
            "nll_diff": paired(per_question[f"gold-units {way}@None"], per_question["gold-units library@None"]),
        }
        for way in WAYS[1:]
    ]
    record = {
        **record_header(vars(args)),
        "suite": args.suite,
        "library": library.label,
        "questions": len(questions.questions),
    }
    record |= {"rows": rows, "paired": comparisons, "per_question": per_question}
    (out / "results.json").write_text(json.dumps(record, indent=2))
    (out / "results.md").write_text(markdown(record))
    print(markdown(record))


def gold_units(library: Library, source: str) -> list[str]:
    return [u.id for u in library.index.units if u.source == source]


def markdown(record: dict) -> str:
    lines = [f"{record['suite']}: {record['questions']} questions, library {record['library']}", ""]
    lines += ["| method | B | gold NLL ± SE | rank acc |", "|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(
            f"| {r['method']} | {r['budget'] or ''} | {r['nll']:.3f} ± {r['nll_se']:.3f} | {r['rank_accuracy']:.2f} |"
        )
    lines += ["", "| B | method | minus | gold NLL (paired ± SE) |", "|---|---|---|---|"]
    for c in record["paired"]:
        lines.append(
            f"| {c['budget'] or ''} | {c['method']} | {c['vs']} | {c['nll_diff'][0]:+.3f} ± {c['nll_diff'][1]:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_script(main)
