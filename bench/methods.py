"""Does a cartridge beat the alternatives at the same KV budget? Every method side by side in one run.

For each QA corpus and KV budget B: `none`, `icl` (whole corpus), `ape` (its documents encoded in
parallel), `truncated`, `rag` (BM25), the presses `knorm` and `streaming`, query-aware `snapkv`,
prompt compression `lingua`, and the given cartridges, all scored with the shared layout
(gold-answer NLL per token, rank accuracy among same-type gold answers). Cost per method: KV bytes,
time to build the context block (prefill of the corpus part), tokens prefilled per question (rag's
passages; snapkv's whole corpus), decode tokens/s at batch 1 and 16. With cartridges of two corpora,
questions of each are also asked with both composed (A+B, B+A), with both corpora in one context
(icl) and with both encoded in parallel (ape). `--storage`: the corpus KV, each cartridge and each
--prefix stored at fp32/fp16/int8 and read back (bench/kv_storage.py; `--storage cartridges`: not the
corpus KV). Writes results.json, results.md and PNG plots under --out.

    python bench/methods.py --corpus-id "squad2-Sky_(United_Kingdom)" --budget 256
    python bench/methods.py --corpus-id A --corpus-id B --cartridge A=a@1 --cartridge B=b@1
"""

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import load_file

from cartridges.bench.baseline_rows import WHOLE_METHODS, earlier_rows, scored_rows
from cartridges.bench.kv_storage import storage_rows
from cartridges.bench.methods_report import BUDGET_METHODS, ReportSettings, add_paired_flag, markdown, plot, summarize
from cartridges.bench.run_record import record_header, settings_of
from cartridges.errors import run_script
from cartridges.home import default_registry_url
from cartridges.kv_layout import kv_shape
from cartridges.layout import chat_token_ids
from cartridges.loading import open_cartridge
from cartridges.models import load_model
from cartridges.qa import load_qa_files
from cartridges.registry.store import Registry
from cartridges.runtime import concat_prefixes, prefix_cache
from cartridges.stages.evaluation.contexts import Context, ContextSource, FixedContext, corpus_kv
from cartridges.stages.evaluation.evaluate import CorpusScore, score_corpus
from cartridges.stages.evaluation.methods.ape import parallel_context
from cartridges.stages.evaluation.methods.table import context_source
from cartridges.stages.ingest import DOCUMENT_SEPARATOR

DECODE_TOKENS = 32


@torch.no_grad()
def decode_tokens_per_second(loaded, context: Context, question: str, batch: int) -> float:
    """Greedy decoding of DECODE_TOKENS tokens for `batch` copies of a question after the context block."""
    shape = kv_shape(loaded.model.config)
    ids = torch.tensor([chat_token_ids(loaded.tokenizer, [{"role": "user", "content": question}])] * batch)
    cached = context.kv_tokens
    first = cached if context.start_position is None else context.start_position
    cache = prefix_cache(context.prefix, *shape, batch_size=batch) if cached else None
    length = ids.shape[1]
    mask = torch.ones(batch, cached + length, dtype=torch.long)
    out = loaded.model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=torch.arange(first, first + length).expand(batch, -1),
        past_key_values=cache,
        use_cache=True,
    )
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    started = time.perf_counter()
    for step in range(DECODE_TOKENS):
        mask = torch.ones(batch, cached + length + step + 1, dtype=torch.long)
        position = torch.full((batch, 1), first + length + step)
        out = loaded.model(
            input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True
        )
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return batch * DECODE_TOKENS / (time.perf_counter() - started)


def probe(spec: dict) -> None:
    """In a fresh process: build one method's context and decode at batch 16; print the peak RSS in MB."""
    torch.set_grad_enabled(False)
    corpus = load_qa_files([Path(p) for p in spec["qa"]] if spec["qa"] else None, [spec["corpus"]])[0]
    registry = Registry(spec["registry"] or default_registry_url())
    cartridge = concat_prefixes([open_cartridge(ref, registry) for ref in spec["refs"]]) if spec["refs"] else None
    loaded = load_model(spec["model"])
    context = context_source(loaded, spec["method"], corpus.text, spec["budget"], cartridge=cartridge).context(
        corpus.questions[0]
    )
    decode_tokens_per_second(loaded, context, corpus.questions[0].question, 16)
    print(json.dumps({"peak_rss_mb": peak_rss_of_this_process_mb()}))


@dataclass(frozen=True)
class Scoring:
    """The flags that decide how a method is measured (and, for its peak memory, in which process)."""

    qa: list[Path] | None
    model: str
    registry: str | None
    distractors: int
    answer_tokens: int
    skip_decode: bool


@dataclass(frozen=True)
class MethodRow:
    """One method at one budget on one corpus: a row of results.json (`as_json`, the shape earlier runs
    wrote and the reports and `--baselines` read)."""

    corpus: str
    method: str  # the method, or the label of a composed or given block
    budget: int | None
    score: CorpusScore
    build_seconds: float
    kv_bytes: int
    prefill_per_question: int  # tokens a deployment prefills per question (rag's passages, snapkv's corpus)
    decode_tokens_per_second: dict[int, float] | None = None  # by batch size; None with --skip-decode
    peak_rss_mb: float | None = None

    def as_json(self) -> dict:
        row = {
            "corpus": self.corpus,
            "method": self.method,
            "budget": self.budget,
            **asdict(self.score),
            "build_seconds": self.build_seconds,
            "kv_bytes": self.kv_bytes,
            "prefill_per_question": self.prefill_per_question,
        }
        if self.decode_tokens_per_second is not None:
            row |= {f"decode_tps_batch{b}": tps for b, tps in self.decode_tokens_per_second.items()}
            row["peak_rss_mb"] = self.peak_rss_mb
        return row


def reused_row(loaded, row: dict) -> dict:
    """An earlier run's row with the cost fields of this report (its build time was not recorded there)."""
    layers, heads, head_dim = kv_shape(loaded.model.config)
    per_token = layers * 2 * heads * head_dim * loaded.model.dtype.itemsize
    return {"kv_bytes": row["kv_tokens"] * per_token, "build_seconds": float("nan"), "prefill_per_question": 0} | row


def peak_rss_of_this_process_mb() -> float:
    """VmHWM: unlike getrusage's ru_maxrss, it is not inherited from the parent across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def peak_rss_mb(scoring: Scoring, corpus_id: str, method: str, budget: int | None, refs: list[str]) -> float:
    spec = {
        "qa": [str(p) for p in scoring.qa or []],
        "corpus": corpus_id,
        "method": method,
        "budget": budget,
        "refs": refs,
        "model": scoring.model,
        "registry": scoring.registry,
    }
    result = subprocess.run(
        [sys.executable, __file__, "--probe", json.dumps(spec)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def measure(
    loaded,
    corpus,
    method: str,
    budget: int | None,
    scoring: Scoring,
    refs: tuple[str, ...] = (),
    cartridges: dict | None = None,
    label: str | None = None,
    make_source=None,
) -> MethodRow:
    cartridge = concat_prefixes([cartridges[ref] for ref in refs]) if refs else None
    started = time.perf_counter()
    source = make_source() if make_source else context_source(loaded, method, corpus.text, budget, cartridge=cartridge)
    first = source.context(corpus.questions[0])
    build_seconds = time.perf_counter() - started
    score = score_corpus(
        loaded, corpus, source, label or method, scoring.distractors, answer_tokens=scoring.answer_tokens
    )
    decode, peak = None, None
    if not scoring.skip_decode:
        question = corpus.questions[0].question
        decode = {b: decode_tokens_per_second(loaded, first, question, b) for b in (1, 16)}
        peak = peak_rss_mb(scoring, corpus.id, method, budget, list(refs))
    row = MethodRow(
        corpus.id,
        label or method,
        budget,
        score,
        build_seconds,
        0 if first.prefix is None else first.kv_tokens * first.prefix.shape[1] * first.prefix.element_size(),
        # what a deployment prefills for each question (the evaluation caches the corpus KV for snapkv)
        {"snapkv": first.start_position or first.kv_tokens, "rag": first.kv_tokens}.get(method, 0),
        decode,
        peak,
    )
    print(
        f"{corpus.id} {row.method} B={budget}: NLL {score.nll:.3f}, rank {score.rank_accuracy}, KV {score.kv_tokens} tokens, "
        f"built in {build_seconds:.1f} s",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--qa", type=Path, action="append", default=None, help="QA file (repeatable; default: shared/data/qa)"
    )
    parser.add_argument("--corpus-id", action="append", default=None, help="QA corpus (repeatable; default: all)")
    parser.add_argument(
        "--budget",
        type=int,
        action="append",
        default=None,
        help="KV budget in tokens (repeatable; default 128 256 512 1024)",
    )
    parser.add_argument(
        "--cartridge", action="append", default=[], help="CORPUS_ID=REF: a cartridge for that corpus (repeatable)"
    )
    parser.add_argument("--distractors", type=int, default=4)
    parser.add_argument(
        "--answer-tokens", type=int, default=0, help="also score each method's greedy answer (token F1, exact match)"
    )
    parser.add_argument("--skip-decode", action="store_true", help="no decode throughput and memory measurement")
    add_paired_flag(parser)
    parser.add_argument(
        "--storage",
        nargs="?",
        const="all",
        choices=["all", "cartridges"],
        help="also store at fp32/fp16/int8 and read back: the corpus KV and every cartridge and --prefix (all), "
        "or the cartridges and --prefix files only (cartridges)",
    )
    parser.add_argument(
        "--method",
        action="append",
        default=None,
        help="budget method to run (repeatable; default: all; --method '' runs none of them)",
    )
    parser.add_argument(
        "--prefix",
        action="append",
        default=[],
        metavar="CORPUS_ID=LABEL=FILE",
        help="a trained or initial prefix file of a run (distill/final_prefix.safetensors, init_prefix.safetensors), "
        "scored as method LABEL on that corpus (repeatable)",
    )
    parser.add_argument(
        "--control-method",
        action="append",
        default=[],
        help="also score this budget method's block of the previous corpus (the last for the first) on each corpus's "
        "questions, labelled 'METHOD of CORPUS': the control a claim of recovery is over (repeatable; the "
        "method's blocks are built once and reused)",
    )
    parser.add_argument(
        "--whole-method",
        action="append",
        default=None,
        choices=WHOLE_METHODS,
        help="whole-corpus method to run (repeatable; default: none icl ape)",
    )
    parser.add_argument(
        "--baselines",
        type=Path,
        action="append",
        default=[],
        help="results.json of an earlier run (methods.py or distill_sweep.py, same questions): its whole-corpus rows "
        "are reused instead of measured again (repeatable)",
    )
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one method's peak RSS, in a fresh process
    parser.add_argument("--model", default="default")
    parser.add_argument("--registry", default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results") / date.today().isoformat() / "methods")
    args = parser.parse_args()
    if args.probe:
        probe(json.loads(args.probe))
        return
    args.budget = args.budget or [128, 256, 512, 1024]

    torch.set_grad_enabled(False)
    corpora = load_qa_files(args.qa, args.corpus_id)
    registry = Registry(args.registry or default_registry_url())
    refs = dict(item.partition("=")[::2] for item in args.cartridge)  # corpus id -> cartridge reference
    cartridges = {ref: open_cartridge(ref, registry) for ref in refs.values()}
    loaded = load_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    methods = BUDGET_METHODS if args.method is None else [m for m in args.method if m]
    prefixes: dict[str, list[tuple[str, Path]]] = {}
    for spec in args.prefix:
        corpus_id, label, file = spec.split("=", 2)
        prefixes.setdefault(corpus_id, []).append((label, Path(file)))
    storage = []
    partial = args.out / "results.partial.json"  # each row as it is measured: a run cut short keeps them
    header = record_header(vars(args))
    scoring = settings_of(args, Scoring)

    def keep(row: MethodRow | dict) -> None:  # a dict: an earlier run's row, reused
        rows.append(row.as_json() if isinstance(row, MethodRow) else row)
        partial.write_text(json.dumps({**header, "rows": rows}, indent=2))

    reusable = earlier_rows(scored_rows(args.baselines, args.distractors, args.answer_tokens))
    blocks: dict[tuple[str, str, int], ContextSource] = {}  # the control methods' blocks, built once

    def block_of(method: str, corpus, budget: int) -> ContextSource:
        if (method, corpus.id, budget) not in blocks:
            blocks[method, corpus.id, budget] = context_source(loaded, method, corpus.text, budget)
        return blocks[method, corpus.id, budget]

    for corpus in corpora:
        for method in args.whole_method or WHOLE_METHODS:
            earlier = reusable.get((corpus.id, method))
            keep(reused_row(loaded, earlier) if earlier else measure(loaded, corpus, method, None, scoring))
        for budget in args.budget:
            for method in methods:
                build = (
                    (lambda m=method, b=budget, c=corpus: block_of(m, c, b)) if method in args.control_method else None
                )
                keep(measure(loaded, corpus, method, budget, scoring, make_source=build))

        if corpus.id in refs:
            keep(measure(loaded, corpus, "cartridge", None, scoring, (refs[corpus.id],), cartridges))
        given = {label: load_file(str(file))["prefix"] for label, file in prefixes.get(corpus.id, [])}
        for label, prefix in given.items():
            keep(
                measure(
                    loaded,
                    corpus,
                    label,
                    None,
                    scoring,
                    label=label,
                    make_source=lambda p=prefix: FixedContext(Context(p)),
                )
            )
        if args.storage:
            mine = (
                {f"cartridge {refs[corpus.id]}": cartridges[refs[corpus.id]].prompt_embeddings}
                if corpus.id in refs
                else {}
            )
            mine |= given
            storage += storage_rows(loaded, corpus, args.distractors, mine, corpus_kv_too=args.storage == "all")
    for corpus, other in zip(corpora, corpora[-1:] + corpora[:-1]) if len(corpora) > 1 else ():
        for budget in args.budget:  # after every corpus's own rows, so that each block's build time is its own
            for method in args.control_method:
                keep(
                    measure(
                        loaded,
                        corpus,
                        method,
                        budget,
                        scoring,
                        label=f"{method} of {other.id}",
                        make_source=lambda m=method, b=budget, o=other: block_of(m, o, b),
                    )
                )
    with_cartridges = [c for c in corpora if c.id in refs]
    for a, b in zip(with_cartridges, with_cartridges[1:] + with_cartridges[:1]) if len(with_cartridges) > 1 else ():
        for label, order in ((f"cartridge {a.id}+{b.id}", [a, b]), (f"cartridge {b.id}+{a.id}", [b, a])):
            keep(measure(loaded, a, "cartridge", None, scoring, tuple(refs[c.id] for c in order), cartridges, label))
        texts = [a.text, b.text]
        keep(
            measure(
                loaded,
                a,
                "ape",
                None,
                scoring,
                label=f"ape {a.id}+{b.id}",
                make_source=lambda texts=texts: FixedContext(parallel_context(loaded, texts)),
            )
        )
        joined = DOCUMENT_SEPARATOR.join(texts)
        keep(
            measure(
                loaded,
                a,
                "icl",
                None,
                scoring,
                label=f"icl {a.id}+{b.id}",
                make_source=lambda joined=joined: FixedContext(Context(corpus_kv(loaded, joined))),
            )
        )
    summary = summarize(rows)
    record = {
        **header,
        "seconds": time.perf_counter() - started,
        "corpora": summary,
        "rows": rows,
        "storage": storage,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    partial.unlink(missing_ok=True)
    table = markdown(rows, summary, settings_of(args, ReportSettings), storage, {c.id: c.questions for c in corpora})
    (args.out / "results.md").write_text(table)
    plot(rows, args.out)
    print(table)
    print(f"wall time {record['seconds']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    run_script(main)
