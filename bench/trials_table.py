"""Trials of several bench/distill_sweep.py runs side by side, paired per question with one reference trial.

Each run trained some trials on some corpora; this puts every named trial of every corpus in one
table: its init alone and trained (gold NLL, recovery of the none-to-icl gap, rank accuracy, answer
F1), each paired per question with the reference trial's init and trained prefix, and the trained
answers paired with `icl`'s. A trial found in several files is taken from the last one given.

    python bench/trials_table.py --result A/results.json --result B/results.json \
        --reference corpus-lr0.006-s32-p256 --trial corpus-lr0.006-s32-p256-sampled --out /tmp/table
"""

import argparse
import json
from pathlib import Path

from cartridges.errors import run_script
from cartridges.stages.evaluate import paired_gain


def collected(paths: list[Path]) -> tuple[dict[tuple[str, str], dict], dict[str, dict]]:
    """(corpus, trial name) -> row, and corpus -> its none/icl scores, over all files."""
    rows, baselines = {}, {}
    for path in paths:
        result = json.loads(path.read_text())
        for row in result["rows"]:
            rows[(row["corpus"], row["name"])] = row
        for corpus, scores in result["baselines"].items():
            if "none" in scores and "icl" in scores:
                baselines.setdefault(corpus, scores)
    return rows, baselines


def paired(here: dict, there: dict, key: str) -> str:
    if not here.get(key) or not there.get(key):
        return ""
    return "{:+.3f} ± {:.3f}".format(*paired_gain(here[key], there[key]))  # here minus there


def table(rows: dict, baselines: dict, reference: str, trials: list[str]) -> str:
    lines = [
        f"Paired columns: this trial minus `{reference}` per question (init with init, trained with trained); "
        "F1 - icl: trained answers minus icl's.",
        "",
        "| corpus | trial | init NLL | trained NLL ± SE | init - ref init | trained - ref trained | recovery init / trained "
        "| rank acc init / trained | F1 init / trained | F1 trained - icl | contains init / trained | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for corpus in sorted({c for c, _ in rows}):
        if corpus not in baselines:
            continue
        none, icl = baselines[corpus]["none"], baselines[corpus]["icl"]
        ref = rows.get((corpus, reference))
        for name in [reference, *trials]:
            row = rows.get((corpus, name))
            if row is None:
                continue
            init, dist = row["init"], row["distilled"]
            recovery = [(none["nll"] - s["nll"]) / (none["nll"] - icl["nll"]) for s in (init, dist)]
            f1 = " / ".join(f"{s['answer_f1']:.3f}" if s.get("answer_f1") is not None else "-" for s in (init, dist))
            contains = " / ".join(
                f"{s['answer_contains']:.2f}" if s.get("answer_contains") is not None else "-" for s in (init, dist)
            )
            versus = ref is not None and name != reference
            lines.append(
                f"| {corpus.removeprefix('squad2-')} | {name} | {init['nll']:.3f} | {dist['nll']:.3f} ± {dist['nll_se']:.3f} | "
                f"{paired(init, ref['init'], 'per_question_nll') if versus else ''} | "
                f"{paired(dist, ref['distilled'], 'per_question_nll') if versus else ''} | "
                f"{recovery[0]:.2f} / {recovery[1]:.2f} | {init['rank_accuracy']:.2f} / {dist['rank_accuracy']:.2f} | "
                f"{f1} | {paired(dist, icl, 'per_question_f1')} | {contains} | {row['train_seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result", type=Path, action="append", required=True, help="distill_sweep results.json")
    parser.add_argument("--reference", required=True, help="trial name every other trial is paired with")
    parser.add_argument("--trial", action="append", default=[], help="trial name to show (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for path in args.result:
        if not path.is_file():
            raise SystemExit(f"--result {path}: no such file (a bench/distill_sweep.py results.json)")
    rows, baselines = collected(args.result)
    names = {name for _, name in rows}
    missing = [name for name in [args.reference, *args.trial] if name not in names]
    if missing:
        raise SystemExit(f"no trial named {', '.join(missing)} in --result; found: {', '.join(sorted(names))}")
    text = table(rows, baselines, args.reference, args.trial)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trials.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run_script(main)
