"""Does a cartridge beat the alternatives at the same KV budget? Every method side by side in one run.

For each QA corpus and KV budget B: `none`, `icl` (whole corpus), `truncated`, `rag` (BM25),
the presses `knorm` and `streaming`, and the given cartridges, all scored with the shared layout
(gold-answer NLL per token, rank accuracy among same-type gold answers). Cost per method: KV bytes,
time to build the context block (prefill of the corpus part), decode tokens/s at batch 1 and 16.
With cartridges of two corpora, questions of each are also asked with both composed (A+B, B+A).
Writes results.json, results.md and PNG plots under --out.

    python bench/methods.py --corpus-id "squad2-Sky_(United_Kingdom)" --budget 256
    python bench/methods.py --corpus-id A --corpus-id B --cartridge A=a@1 --cartridge B=b@1
"""

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

import torch

from cartridges.artifact import kv_shape
from cartridges.errors import run_script
from cartridges.home import default_registry_url
from cartridges.layout import chat_token_ids
from cartridges.loading import open_cartridge
from cartridges.models import load_model
from cartridges.qa import load_qa_files
from cartridges.registry import Registry
from cartridges.runtime import concat_prefixes, prefix_cache
from cartridges.stages.contexts import Context, context_source
from cartridges.stages.evaluate import paired_gain, score_corpus

BUDGET_METHODS = ("truncated", "rag", "knorm", "streaming")
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


def peak_rss_of_this_process_mb() -> float:
    """VmHWM: unlike getrusage's ru_maxrss, it is not inherited from the parent across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def peak_rss_mb(args, corpus_id: str, method: str, budget: int | None, refs: list[str]) -> float:
    spec = {
        "qa": [str(p) for p in args.qa or []],
        "corpus": corpus_id,
        "method": method,
        "budget": budget,
        "refs": refs,
        "model": args.model,
        "registry": args.registry,
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
    args,
    refs: tuple[str, ...] = (),
    cartridges: dict | None = None,
    label: str | None = None,
) -> dict:
    cartridge = concat_prefixes([cartridges[ref] for ref in refs]) if refs else None
    started = time.perf_counter()
    source = context_source(loaded, method, corpus.text, budget, cartridge=cartridge)
    first = source.context(corpus.questions[0])
    build_seconds = time.perf_counter() - started
    score = score_corpus(loaded, corpus, source, label or method, args.distractors, answer_tokens=args.answer_tokens)
    row = {
        "corpus": corpus.id,
        "method": label or method,
        "budget": budget,
        **asdict(score),
        "build_seconds": build_seconds,
        "kv_bytes": 0 if first.prefix is None else first.prefix.numel() * first.prefix.element_size(),
    }
    if not args.skip_decode:
        row |= {
            f"decode_tps_batch{b}": decode_tokens_per_second(loaded, first, corpus.questions[0].question, b)
            for b in (1, 16)
        }
        row["peak_rss_mb"] = peak_rss_mb(args, corpus.id, method, budget, list(refs))
    print(
        f"{corpus.id} {row['method']} B={budget}: NLL {score.nll:.3f}, rank {score.rank_accuracy}, KV {score.kv_tokens} tokens, "
        f"built in {build_seconds:.1f} s",
        flush=True,
    )
    return row


def summarize(rows: list[dict]) -> dict:
    """Headroom per corpus (paired SE), and recovery of every row on corpora whose headroom is > 2 SE."""
    corpora = {}
    for corpus in dict.fromkeys(r["corpus"] for r in rows):
        none = next(r for r in rows if r["corpus"] == corpus and r["method"] == "none")
        icl = next(r for r in rows if r["corpus"] == corpus and r["method"] == "icl")
        headroom, se = paired_gain(none["per_question_nll"], icl["per_question_nll"])
        corpora[corpus] = {
            "none": none["nll"],
            "icl": icl["nll"],
            "headroom": headroom,
            "headroom_se": se,
            "eligible": headroom > 2 * se,
        }
    for row in rows:
        c = corpora[row["corpus"]]
        row["recovery"] = (c["none"] - row["nll"]) / (c["none"] - c["icl"]) if c["eligible"] else None
    return corpora


def markdown(rows: list[dict], corpora: dict, args) -> str:
    eligible = [c for c, v in corpora.items() if v["eligible"]]
    lines = [
        f"Methods at KV budgets {args.budget}, distractors {args.distractors}; {len(eligible)} of {len(corpora)} corpora have headroom above 2 paired SE.",
        "",
        "| corpus | none | icl | headroom ± paired SE | recovery computed |",
        "|---|---|---|---|---|",
    ]
    for corpus, c in corpora.items():
        lines.append(
            f"| {corpus} | {c['none']:.3f} | {c['icl']:.3f} | {c['headroom']:+.3f} ± {c['headroom_se']:.3f} | {'yes' if c['eligible'] else 'no'} |"
        )
    lines += [
        "",
        "| corpus | method | B | KV tokens | KV MB | gold NLL ± SE | rank acc | recovery | build s | decode tok/s b1 | b16 | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        recovery = "" if r["recovery"] is None else f"{r['recovery']:.2f}"
        accuracy = "n/a" if r["rank_accuracy"] is None else f"{r['rank_accuracy']:.2f}"
        lines.append(
            f"| {r['corpus']} | {r['method']} | {r['budget'] or ''} | {r['kv_tokens']} | {r['kv_bytes'] / 1e6:.1f} | {r['nll']:.3f} ± {r['nll_se']:.3f} | "
            f"{accuracy} | {recovery} | {r['build_seconds']:.1f} | {r.get('decode_tps_batch1', float('nan')):.1f} | {r.get('decode_tps_batch16', float('nan')):.1f} | "
            f"{r.get('peak_rss_mb', float('nan')):.0f} |"
        )
    if args.answer_tokens:
        lines += answer_tables(rows)
    return "\n".join(lines) + "\n"


def answer_tables(rows: list[dict], shown_questions: int = 5) -> list[str]:
    """What a user reads: answer F1 / exact match / containment per method, and five questions'
    answers side by side (none, icl, rag, cartridges) per corpus."""
    lines = ["", "| corpus | method | B | answer F1 | exact | contains |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['corpus']} | {r['method']} | {r['budget'] or ''} | {r['answer_f1']:.3f} | "
            f"{r['exact_match']:.2f} | {r['answer_contains']:.2f} |"
        )
    for corpus in dict.fromkeys(r["corpus"] for r in rows):
        side = [
            r
            for r in rows
            if r["corpus"] == corpus and (r["method"] in ("none", "icl", "rag") or r["method"].startswith("cartridge"))
        ]
        lines += ["", f"Answers on {corpus}:", "", "| question | " + " | ".join(r["method"] for r in side) + " |"]
        lines.append("|---" * (len(side) + 1) + "|")
        for i in range(min(shown_questions, len(side[0]["answers"]))):
            cells = [r["answers"][i].replace("|", "/").replace("\n", " ")[:80] for r in side]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in [*BUDGET_METHODS, *sorted({r["method"] for r in rows if r["method"].startswith("cartridge")})]:
        points: dict[int, list[float]] = {}
        for r in rows:
            if r["method"] == method and r["recovery"] is not None:
                points.setdefault(r["kv_tokens"] if method.startswith("cartridge") else r["budget"], []).append(
                    r["recovery"]
                )
        if points:
            xs = sorted(points)
            ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], marker="o", label=method)
    ax.axhline(1.0, color="#888", linestyle="--", label="icl")
    ax.axhline(0.0, color="#bbb", linestyle=":", label="none")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV budget (tokens)")
    ax.set_ylabel("recovery of the none-to-icl NLL gap")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "recovery_vs_budget.png", dpi=120)

    largest = max((r["budget"] or 0) for r in rows)
    shown = [r for r in rows if r["corpus"] == rows[0]["corpus"] and (r["budget"] in (None, largest))]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r["method"] for r in shown]
    axes[0].bar(names, [r["kv_bytes"] / 1e6 for r in shown], color="#36c")
    axes[0].set_title(f"KV MB ({rows[0]['corpus']}, B={largest})")
    if "decode_tps_batch1" in shown[0]:
        width = 0.4
        xs = range(len(shown))
        axes[1].bar([x - width / 2 for x in xs], [r["decode_tps_batch1"] for r in shown], width, label="batch 1")
        axes[1].bar([x + width / 2 for x in xs], [r["decode_tps_batch16"] for r in shown], width, label="batch 16")
        axes[1].set_xticks(list(xs), names)
        axes[1].legend()
    axes[1].set_title("decode tokens/s")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=120)


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
    for corpus in corpora:
        rows += [measure(loaded, corpus, "none", None, args), measure(loaded, corpus, "icl", None, args)]
        rows += [measure(loaded, corpus, method, budget, args) for budget in args.budget for method in BUDGET_METHODS]
        if corpus.id in refs:
            rows.append(measure(loaded, corpus, "cartridge", None, args, (refs[corpus.id],), cartridges))
    with_cartridges = [c for c in corpora if c.id in refs]
    for a, b in zip(with_cartridges, with_cartridges[1:] + with_cartridges[:1]) if len(with_cartridges) > 1 else ():
        for label, order in ((f"cartridge {a.id}+{b.id}", [a, b]), (f"cartridge {b.id}+{a.id}", [b, a])):
            rows.append(
                measure(loaded, a, "cartridge", None, args, tuple(refs[c.id] for c in order), cartridges, label)
            )
    summary = summarize(rows)
    record = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "seconds": time.perf_counter() - started,
        "corpora": summary,
        "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    table = markdown(rows, summary, args)
    (args.out / "results.md").write_text(table)
    plot(rows, args.out)
    print(table)
    print(f"wall time {record['seconds']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    run_script(main)
