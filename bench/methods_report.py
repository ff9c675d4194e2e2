"""Tables and plots of `bench/methods.py`: recovery per method, what a user reads, cost.

Also merges runs: a grid split across runs (each fits a session) is reported as one, later runs'
rows replacing earlier ones of the same corpus, method and budget:

    python bench/methods_report.py RUN1/results.json RUN2/results.partial.json --out MERGED
"""

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from cartridges.bench.kv_storage import storage_table
from cartridges.errors import run_script
from cartridges.qa import load_qa_files
from cartridges.stages.evaluation.answer_quality import score_answer
from cartridges.stages.evaluation.evaluate import mean_and_se, paired_gain
from cartridges.stages.evaluation.methods.table import BUDGET_METHODS


@dataclass(frozen=True)
class ReportSettings:
    """How the rows of a report were scored (its header says so)."""

    budget: list[int]
    distractors: int
    answer_tokens: int
    paired: list[str] = field(default_factory=list)  # methods each row's gold NLL is paired against


def summarize(rows: list[dict]) -> dict:
    """Headroom per corpus (paired SE), and recovery of every row on corpora whose headroom is > 2 SE."""
    corpora = {}
    for corpus in dict.fromkeys(r["corpus"] for r in rows):
        none = next((r for r in rows if r["corpus"] == corpus and r["method"] == "none"), None)
        icl = next((r for r in rows if r["corpus"] == corpus and r["method"] == "icl"), None)
        if none is None or icl is None:  # run without them (--whole-method): no recovery
            corpora[corpus] = {
                "none": float("nan"),
                "icl": float("nan"),
                "headroom": float("nan"),
                "headroom_se": float("nan"),
                "eligible": False,
            }
            continue
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


def markdown(
    rows: list[dict], corpora: dict, settings: ReportSettings, storage: list[dict] = (), questions: dict | None = None
) -> str:
    eligible = [c for c, v in corpora.items() if v["eligible"]]
    lines = [
        f"Methods at KV budgets {settings.budget}, distractors {settings.distractors}; {len(eligible)} of {len(corpora)} corpora have headroom above 2 paired SE.",
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
        "| corpus | method | B | KV tokens | KV MB | gold NLL ± SE | rank acc | margin | recovery | build s | prefill/question | decode tok/s b1 | b16 | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        recovery = "" if r["recovery"] is None else f"{r['recovery']:.2f}"
        accuracy = "n/a" if r["rank_accuracy"] is None else f"{r['rank_accuracy']:.2f}"
        margin = "" if r.get("contrastive_margin") is None else f"{r['contrastive_margin']:+.3f}"
        lines.append(
            f"| {r['corpus']} | {r['method']} | {r['budget'] or ''} | {r['kv_tokens']} | {r['kv_bytes'] / 1e6:.1f} | {r['nll']:.3f} ± {r['nll_se']:.3f} | "
            f"{accuracy} | {margin} | {recovery} | {r['build_seconds']:.1f} | {r.get('prefill_per_question', 0)} | {r.get('decode_tps_batch1', float('nan')):.1f} | {r.get('decode_tps_batch16', float('nan')):.1f} | "
            f"{r.get('peak_rss_mb', float('nan')):.0f} |"
        )
    if settings.paired:
        lines += paired_table(rows, settings.paired)
    if settings.answer_tokens:
        lines += answer_tables(rows, questions)
    if storage:
        lines += storage_table(storage)
    return "\n".join(lines) + "\n"


def paired_table(rows: list[dict], against: list[str]) -> list[str]:
    """Each row's gold NLL minus that of each method in `against` on the same corpus and questions (mean ±
    SE of the per-question differences; negative: the row is better), the other method taken at the row's
    budget, or without one (`icl`, `none`)."""
    lines = ["", "| corpus | method | B | gold NLL | " + " | ".join(f"- {m} (paired)" for m in against) + " |"]
    lines.append("|---|---|---|---|" + "---|" * len(against))
    by_key = {(r["corpus"], r["method"], r["budget"]): r for r in rows}
    for r in rows:
        cells = []
        for method in against:
            other = by_key.get((r["corpus"], method, r["budget"])) or by_key.get((r["corpus"], method, None))
            if other is None or other is r:
                cells.append("")
                continue
            differences = [a - b for a, b in zip(r["per_question_nll"], other["per_question_nll"], strict=True)]
            cells.append("{:+.3f} ± {:.3f}".format(*mean_and_se(differences)))
        lines.append(
            f"| {r['corpus']} | {r['method']} | {r['budget'] or ''} | {r['nll']:.3f} | " + " | ".join(cells) + " |"
        )
    return lines


def answer_tables(rows: list[dict], questions: dict[str, list] | None = None, shown_questions: int = 5) -> list[str]:
    """What a user reads: answer F1 / exact match / containment per method, each method's difference
    from `icl` on the same questions (paired, ± SE), and five questions' answers side by side.
    `questions`: corpus id -> its QA questions (for the side-by-side table's question and gold answer)."""
    lines = [
        "",
        "| corpus | method | B | answer F1 | F1 - icl (paired) | contains | contains - icl (paired) | exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    icl = {r["corpus"]: r for r in rows if r["method"] == "icl" and r.get("answers")}
    for r in rows:
        if not r.get("answers"):
            continue
        against = icl.get(r["corpus"])
        f1_gap = contains_gap = ""
        if against is not None and r is not against and questions and r["corpus"] in questions:
            golds = [[q.answer, *q.alt_answers] for q in questions[r["corpus"]]]
            mine, theirs = (
                [score_answer(a, g) for a, g in zip(row["answers"], golds, strict=True)] for row in (r, against)
            )
            f1_gap = "{:+.3f} ± {:.3f}".format(*mean_and_se([m.f1 - t.f1 for m, t in zip(mine, theirs)]))
            contains_gap = "{:+.2f} ± {:.2f}".format(
                *mean_and_se([float(m.contains) - float(t.contains) for m, t in zip(mine, theirs)])
            )
        lines.append(
            f"| {r['corpus']} | {r['method']} | {r['budget'] or ''} | {r['answer_f1']:.3f} | {f1_gap} | "
            f"{r['answer_contains']:.2f} | {contains_gap} | {r['exact_match']:.2f} |"
        )
    for corpus in dict.fromkeys(r["corpus"] for r in rows if r.get("answers")):
        side = [r for r in rows if r["corpus"] == corpus and r.get("answers")]
        names = [f"{r['method']} {r['budget'] or ''}".strip() for r in side]
        lines += ["", f"Answers on {corpus}:", "", "| question (gold) | " + " | ".join(names) + " |"]
        lines.append("|---" * (len(side) + 1) + "|")
        asked = (questions or {}).get(corpus)
        for i in range(min(shown_questions, len(side[0]["answers"]))):
            question = f"{asked[i].question} ({asked[i].answer})" if asked else str(i + 1)
            cells = [_cell(question, 160), *(_cell(r["answers"][i]) for r in side)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cell(text: str, width: int = 80) -> str:
    return text.replace("|", "/").replace("\n", " ")[:width]


def plot(rows: list[dict], out: Path, trained: list[dict] = ()) -> None:
    """recovery_vs_budget.png, cost.png and recovery_vs_build_seconds.png; `trained` rows (`trained_rows`)
    join the two recovery plots beside the untrained blocks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    cartridges = sorted({r["method"] for r in rows if r["method"].startswith("cartridge")})
    for method in [*BUDGET_METHODS, *cartridges, *sorted({r["method"] for r in trained})]:
        points = recovery_by_budget([*rows, *trained], method)
        if points:
            xs = sorted(points)
            count = len(next(iter(points.values())))
            ax.plot(xs, [sum(points[x]) / count for x in xs], marker="o", label=f"{method} ({count} corpora)")
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

    fig, ax = plt.subplots(figsize=(7, 4.5))  # what each block's quality costs to build, one point per corpus
    for method in [*BUDGET_METHODS, *sorted({r["method"] for r in trained})]:
        points = [
            (r["build_seconds"], r["recovery"])
            for r in [*rows, *trained]
            if r["method"] == method and r["recovery"] is not None and r["build_seconds"] is not None
        ]
        if points:
            ax.scatter(*zip(*points), label=method)
    ax.axhline(1.0, color="#888", linestyle="--", label="icl")
    ax.set_xlabel("build seconds (this box)")
    ax.set_ylabel("recovery of the none-to-icl NLL gap")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "recovery_vs_build_seconds.png", dpi=120)


def recovery_by_budget(rows: list[dict], method: str) -> dict[int, list[float]]:
    """Budget (a cartridge's KV tokens) -> `method`'s recovery on each corpus it was measured on at *every*
    one of its budgets, so that a line's slope is the budget's, not a change in which corpora are averaged."""
    found: dict[int, dict[str, float]] = {}
    for r in rows:
        if r["method"] == method and r["recovery"] is not None:
            found.setdefault(r["kv_tokens"] if method.startswith("cartridge") else r["budget"], {})[r["corpus"]] = r[
                "recovery"
            ]
    common = set.intersection(*(set(by_corpus) for by_corpus in found.values())) if found else set()
    return {budget: [by_corpus[c] for c in sorted(common)] for budget, by_corpus in found.items()} if common else {}


def start_of(row: dict) -> str:
    """A sweep row's start: its `init_method`, or in sweeps older than that field the method its untrained
    score was recorded under (`init-select-p256`; `init-p1024` or `truncated` for the first tokens)."""
    if row.get("init_method"):
        return row["init_method"]
    recorded = (row.get("init") or {}).get("method", "")
    parts = recorded.split("-")  # init-METHOD-pP; init-pP and truncated are the first tokens
    return parts[1] if recorded.startswith("init-") and len(parts) > 2 else "first_tokens"


def trained_rows(sweeps: list[dict]) -> list[dict]:
    """The trained cartridges of bench/distill_sweep.py results as plot rows: method `trained from INIT, lr
    LR`, budget its P, recovery of its corpus's none-to-icl gap (that run's baselines), build seconds its
    start and training (synthesis not counted: it is shared by every start)."""
    found = []
    for sweep in sweeps:
        for row in sweep["rows"]:
            base = sweep["baselines"].get(row["corpus"], {})
            if "none" not in base or "icl" not in base:
                continue
            none, icl = base["none"]["nll"], base["icl"]["nll"]
            found.append(
                {
                    "corpus": row["corpus"],
                    "method": f"trained from {start_of(row)}, lr {row['lr']:g}",
                    "budget": row["num_tokens"],
                    "kv_tokens": row["num_tokens"],
                    "recovery": (none - row["distilled"]["nll"]) / (none - icl),
                    "build_seconds": row.get("train_seconds"),
                }
            )
    return found


def merged_rows(records: list[dict]) -> list[dict]:
    """Rows of several runs; a later run's row replaces an earlier one of the same corpus, method and budget."""
    rows: dict[tuple, dict] = {}
    for record in records:
        for row in record["rows"]:
            rows[(row["corpus"], row["method"], row["budget"])] = row
    return list(rows.values())


def add_paired_flag(parser: argparse.ArgumentParser) -> None:
    """`--paired METHOD`, read into `ReportSettings.paired` by this report and by `bench/methods.py`."""
    parser.add_argument(
        "--paired",
        action="append",
        default=[],
        metavar="METHOD",
        help="add a table of every row's gold NLL paired against this method's (repeatable; e.g. select, icl)",
    )


def scored_alike(records: list[dict]) -> tuple[int, int]:
    """The distractors and answer tokens every run was scored with. A run without answers (`--skip-decode`
    or 0 answer tokens) merges with runs that have them: its rows have no F1 to compare and are left out
    of the answer tables; answers of different lengths do not merge, nor rank accuracies over different
    distractors."""
    distractors = {int(r["args"].get("distractors", 4)) for r in records}
    answered = {int(r["args"].get("answer_tokens", 0)) for r in records} - {0}
    if len(distractors) > 1 or len(answered) > 1:
        raise SystemExit(
            f"the runs were scored differently (distractors {sorted(distractors)}, answer tokens {sorted(answered)}): "
            "merge runs scored alike"
        )
    return distractors.pop(), answered.pop() if answered else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "results", type=Path, nargs="+", help="results.json (or results.partial.json) of bench/methods.py"
    )
    parser.add_argument("--qa", type=Path, action="append", default=None, help="QA files (default: shared/data/qa)")
    add_paired_flag(parser)
    parser.add_argument(
        "--trials",
        type=Path,
        action="append",
        default=[],
        help="results.json of bench/distill_sweep.py: its trained cartridges join the recovery plots (repeatable)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    records = [json.loads(path.read_text()) for path in args.results]
    distractors, answer_tokens = scored_alike(records)
    rows = merged_rows(records)
    settings = ReportSettings(
        budget=sorted({r["budget"] for r in rows if r["budget"]}),
        distractors=distractors,
        answer_tokens=answer_tokens,
        paired=args.paired,
    )
    corpora = summarize(rows)
    questions = {c.id: c.questions for c in load_qa_files(args.qa, list(corpora))}
    args.out.mkdir(parents=True, exist_ok=True)
    sources = [str(p) for p in args.results]
    (args.out / "results.json").write_text(
        json.dumps(
            {
                # how every merged row was scored, so a merged file is itself a --baselines or merge input
                "args": {"distractors": distractors, "answer_tokens": answer_tokens},
                "merged_from": sources,
                "corpora": corpora,
                "rows": rows,
            },
            indent=2,
        )
    )
    table = markdown(rows, corpora, settings, questions=questions)
    (args.out / "results.md").write_text(table)
    plot(rows, args.out, trained_rows([json.loads(path.read_text()) for path in args.trials]))
    print(table)


if __name__ == "__main__":
    run_script(main)
