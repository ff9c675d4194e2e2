"""Headroom: how much does putting the whole corpus in context help, per QA corpus?

For every corpus of the QA files: mean gold-answer NLL per token with no context (`none`) and with
the whole corpus in context (`icl`), the paired standard error of their difference (the same
questions both ways), and rank accuracy of the gold answer among other gold answers of the same
type. A cartridge can only show recovery where icl beats none.

    python bench/headroom.py                       # every corpus in shared/data/qa
    python bench/headroom.py --corpora housingqa-texas,squad2-normans --distractors 8
"""

import argparse
import json
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

from cartridges.bench.run_record import record_header
from cartridges.errors import run_script
from cartridges.models import load_model
from cartridges.qa import DEFAULT_QA_DIR, load_qa_file
from cartridges.stages.evaluation.evaluate import paired_gain, score_corpus
from cartridges.stages.evaluation.methods.table import context_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qa", type=Path, nargs="*", default=sorted(DEFAULT_QA_DIR.glob("*.json")))
    parser.add_argument("--corpora", default="", help="comma-separated corpus ids (default: all)")
    parser.add_argument("--distractors", type=int, default=4)
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, default=Path("bench/results") / date.today().isoformat() / "headroom")
    args = parser.parse_args()
    wanted = set(filter(None, args.corpora.split(",")))

    loaded = load_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in args.qa:
        for corpus in load_qa_file(path):
            if wanted and corpus.id not in wanted:
                continue
            started = time.perf_counter()
            none = score_corpus(
                loaded, corpus, context_source(loaded, "none", corpus.text, None), "none", args.distractors
            )
            icl = score_corpus(
                loaded, corpus, context_source(loaded, "icl", corpus.text, None), "icl", args.distractors
            )
            headroom, headroom_se = paired_gain(none.per_question_nll, icl.per_question_nll)
            row = {
                "file": path.name,
                "corpus": corpus.id,
                "none": asdict(none),
                "icl": asdict(icl),
                "headroom": headroom,
                "headroom_se": headroom_se,
                "seconds": time.perf_counter() - started,
            }
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("corpus", "headroom", "headroom_se", "seconds")}), flush=True)
            (args.out / "results.json").write_text(json.dumps({**record_header(vars(args)), "rows": rows}, indent=2))
            write_report(rows, args.distractors, args.out)  # after every corpus: an interrupted run still reports
    print((args.out / "results.md").read_text())


def write_report(rows: list[dict], distractors: int, out: Path) -> None:
    rows = sorted(rows, key=lambda r: -r["headroom"])
    lines = [
        f"Headroom per corpus: SmolLM2-135M-Instruct fp32, rank accuracy among the gold + up to {distractors} same-type answers",
        "",
        "| corpus | questions | icl KV tokens | NLL none | NLL icl | headroom (none - icl) ± paired SE | rank acc none | rank acc icl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = lambda s: "n/a" if s["rank_accuracy"] is None else f"{s['rank_accuracy']:.2f} ({s['ranked_questions']})"  # noqa: E731
        lines.append(
            f"| {r['corpus']} | {r['none']['questions']} | {r['icl']['kv_tokens']} | {r['none']['nll']:.2f} | {r['icl']['nll']:.2f} | "
            f"{r['headroom']:+.2f} ± {r['headroom_se']:.2f} | {acc(r['none'])} | {acc(r['icl'])} |"
        )
    clear = [r for r in rows if r["headroom"] > 2 * r["headroom_se"]]
    lines += ["", f"{len(clear)} of {len(rows)} corpora have headroom above 2 paired standard errors."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "headroom.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    names = [r["corpus"].replace("housingqa-", "hqa-").replace("squad2-", "sq-") for r in rows]
    ax.bar(names, [r["headroom"] for r in rows], yerr=[2 * r["headroom_se"] for r in rows], color="#36c")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("NLL none - NLL icl (nats/token)")
    ax.set_title("Headroom: gain from the whole corpus in context (error bars: 2 SE)")
    ax.tick_params(axis="x", rotation=70, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    run_script(main)
