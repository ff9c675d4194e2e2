"""Trials of several bench/distill_sweep.py runs side by side, paired per question with one reference trial.

Each run trained some trials on some corpora; this puts every named trial of every corpus in one
table: its init alone and trained (gold NLL, recovery of the none-to-icl gap, rank accuracy, answer
F1), each paired per question with the reference trial's init and trained prefix, and the trained
answers paired with `icl`'s. A trial found in several files is taken from the last one given; a run
whose teacher read more than its chunk names its trials with `-teacher-window`. `--methods` adds
bench/methods.py rows (`--method rag/256`) as trials without an init, paired the same way.

    python bench/trials_table.py --result A/results.json --result B/results.json \
        --reference corpus-lr0.006-s32-p256 --trial corpus-lr0.006-s32-p256-sampled --methods M/results.json --method rag/256 --out /tmp/table
"""

import argparse
import json
from pathlib import Path

from cartridges.errors import run_script
from cartridges.stages.evaluation.evaluate import paired_gain


def collected(paths: list[Path]) -> tuple[dict[tuple[str, str], dict], dict[str, dict]]:
    """(corpus, trial name) -> row, and corpus -> its none/icl scores, over all files: the first scores that
    carry icl's answers (a run scored without answers has none to pair F1 with), else the first found."""
    rows, baselines = {}, {}
    for path in paths:
        result = json.loads(path.read_text())
        for row in result["rows"]:
            rows[(row["corpus"], row["name"] + teacher_suffix(result))] = row
        for corpus, scores in result["baselines"].items():
            earlier = baselines.get(corpus)
            if (
                "none" in scores
                and "icl" in scores
                and (earlier is None or (has_answers(scores) and not has_answers(earlier)))
            ):
                baselines[corpus] = scores
    return rows, baselines


def has_answers(scores: dict) -> bool:
    return "per_question_f1" in scores["icl"]


def teacher_suffix(result: dict) -> str:
    """The same recipe with another teacher context is another trial: `-teacher-window` names it (a run's
    trial names leave the teacher out, as the sweep pairs such runs by name). A run given no
    `--teacher-context` used its config's (its results record the config; older ones did not)."""
    teacher = result["args"].get("teacher_context", "chunk")
    if teacher in (None, "None"):
        teacher = result.get("config", {}).get("synthesis", {}).get("teacher_context", "chunk")
    return "" if teacher == "chunk" else f"-teacher-{teacher}"


def paired(here: dict, there: dict, key: str) -> str:
    if not here.get(key) or not there.get(key):
        return ""
    return "{:+.3f} ± {:.3f}".format(*paired_gain(here[key], there[key]))  # here minus there


def table(rows: dict, baselines: dict, reference: str, trials: list[str]) -> str:
    """One line per corpus and trial; a method's row (from --methods) has no init, so its init columns stay empty."""
    lines = [
        f"Paired columns: this trial minus `{reference}` per question (init with init, trained with trained); "
        "F1 columns: trained answers minus the reference's or icl's.",
        "",
        "| corpus | trial | init NLL | trained NLL ± SE | init - ref init | trained - ref trained | recovery init / trained "
        "| rank acc init / trained | F1 init / trained | F1 trained - ref trained | F1 trained - icl | contains init / trained "
        "| train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
            versus = ref is not None and name != reference
            scores = (init or {}, dist)

            def both(key: str, form: str, scores=scores) -> str:
                return " / ".join(form.format(s[key]) if s.get(key) is not None else "-" for s in scores)

            recovery = " / ".join(
                f"{(none['nll'] - s['nll']) / (none['nll'] - icl['nll']):.2f}" if s else "-" for s in scores
            )
            seconds = "" if row.get("train_seconds") is None else f"{row['train_seconds']:.0f}"
            lines.append(
                f"| {corpus.removeprefix('squad2-')} | {name} | {format(init['nll'], '.3f') if init else ''} | "
                f"{dist['nll']:.3f} ± {dist['nll_se']:.3f} | "
                f"{paired(init, ref['init'], 'per_question_nll') if versus and init else ''} | "
                f"{paired(dist, ref['distilled'], 'per_question_nll') if versus else ''} | "
                f"{recovery} | {both('rank_accuracy', '{:.2f}')} | "
                f"{both('answer_f1', '{:.3f}')} | {paired(dist, ref['distilled'], 'per_question_f1') if versus else ''} | "
                f"{paired(dist, icl, 'per_question_f1')} | {both('answer_contains', '{:.2f}')} | {seconds} |"
            )
    return "\n".join(lines) + "\n"


def method_rows(paths: list[Path], wanted: list[str]) -> dict[tuple[str, str], dict]:
    """(corpus, "METHOD B") -> a trial-shaped row (no init) from bench/methods.py results, for `METHOD/B` in `wanted`
    (`icl`, `rag/256`, ...): the other blocks a user could choose, in the same table."""
    out = {}
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            spec = row["method"] if row["budget"] is None else f"{row['method']}/{row['budget']}"
            if spec in wanted:
                out[(row["corpus"], method_name(spec))] = {"init": None, "distilled": row, "train_seconds": None}
    return out


def method_name(spec: str) -> str:
    """`rag/256` -> the row's trial name, `rag 256`."""
    return spec.replace("/", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result", type=Path, action="append", required=True, help="distill_sweep results.json")
    parser.add_argument("--reference", required=True, help="trial name every other trial is paired with")
    parser.add_argument("--trial", action="append", default=[], help="trial name to show (repeatable)")
    parser.add_argument(
        "--methods", type=Path, action="append", default=[], help="bench/methods.py results.json with --method rows"
    )
    parser.add_argument(
        "--method", action="append", default=[], help="METHOD/BUDGET (or a whole-corpus METHOD) to show from --methods"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for flag, paths, script in (("--result", args.result, "distill_sweep"), ("--methods", args.methods, "methods")):
        for path in paths:
            if not path.is_file():
                raise SystemExit(f"{flag} {path}: no such file (a bench/{script}.py results.json)")
    rows, baselines = collected(args.result)
    names = {name for _, name in rows}
    missing = [name for name in [args.reference, *args.trial] if name not in names]
    if missing:
        raise SystemExit(f"no trial named {', '.join(missing)} in --result; found: {', '.join(sorted(names))}")
    methods = method_rows(args.methods, args.method)
    method_names = list(dict.fromkeys(name for _, name in methods))
    absent = [m for m in args.method if method_name(m) not in method_names]
    if absent:
        raise SystemExit(f"no row {', '.join(absent)} in --methods (METHOD/BUDGET, e.g. rag/256, or icl)")
    rows |= methods
    text = table(rows, baselines, args.reference, [*args.trial, *method_names])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trials.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run_script(main)
