"""Lever 3 of issue 17: gold NLL against the number of distinct samples, one epoch each, from earlier sweeps.

Reads bench/distill_sweep.py results (one file per sample count, or several counts per file), keeps the
rows of one recipe (mix, learning rate, P, init), and per corpus orders them by the samples the trial
trained on; each point is paired per question with the next smaller count of the same corpus. Writes
samples_curve.md (the table) and samples_curve.png (recovery of the none-to-icl gap against samples).

    python bench/samples_curve.py --result bench/results/2026-11-28/gpu-distill-384/results.json \
        --result bench/results/2026-11-28/gpu-lever3/s1536-1/results.json --lr 2e-3 --out /tmp/curve
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from cartridges.bench.distill_sweep import Trial
from cartridges.errors import run_script
from cartridges.stages.evaluation.evaluate import paired_gain


@dataclass(frozen=True)
class Point:
    corpus: str
    samples: int  # written by the synthesis the trial trained on
    steps: int
    nll: float
    nll_se: float
    per_question_nll: tuple[float, ...]
    recovery: float
    held_out_kl: float
    synthesis_seconds: float
    train_seconds: float
    source: str


def points(paths: list[Path], mix: str, lr: float, num_tokens: int, init: str) -> list[Point]:
    """The rows of the recipe in every results file, with their sample counts and baselines."""
    found = []
    for path in paths:
        result = json.loads(path.read_text())
        for row in result["rows"]:
            if row["name"] != Trial(mix, lr, row["steps"], num_tokens, init).name:  # rows keep the init in the name
                continue
            base = result["baselines"][row["corpus"]]
            made = result["synthesis"][row["corpus"]].get(mix)
            if made is None:
                raise SystemExit(f"{path}: no record of the {mix} synthesis of {row['corpus']} (run with its mix)")
            none, icl = base["none"]["nll"], base["icl"]["nll"]
            found.append(
                Point(
                    corpus=row["corpus"],
                    samples=made["samples"],
                    steps=row["steps"],
                    nll=row["distilled"]["nll"],
                    nll_se=row["distilled"]["nll_se"],
                    per_question_nll=tuple(row["distilled"]["per_question_nll"]),
                    recovery=(none - row["distilled"]["nll"]) / (none - icl),
                    held_out_kl=row["train_metrics"].get("eval_topk_kl", float("nan")),
                    synthesis_seconds=made.get("wall_seconds", float("nan")),
                    train_seconds=row["train_seconds"],
                    source=str(path.parent),
                )
            )
    return sorted(found, key=lambda p: (p.corpus, p.samples))


def table(found: list[Point]) -> str:
    lines = [
        "| corpus | samples | steps | gold NLL ± SE | minus the next smaller count (paired) | recovery | held-out KL | synthesis s | train s | results |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    previous: Point | None = None
    for point in found:
        step = ""
        if previous is not None and previous.corpus == point.corpus:
            step = "{:+.3f} ± {:.3f}".format(*paired_gain(point.per_question_nll, previous.per_question_nll))
        lines.append(
            f"| {point.corpus} | {point.samples} | {point.steps} | {point.nll:.3f} ± {point.nll_se:.3f} | {step} | "
            f"{point.recovery:.2f} | {point.held_out_kl:.3f} | {point.synthesis_seconds:.0f} | {point.train_seconds:.0f} | "
            f"`{point.source}` |"
        )
        previous = point
    return "\n".join(lines) + "\n"


def plot(found: list[Point], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for corpus in sorted({p.corpus for p in found}):
        line = [p for p in found if p.corpus == corpus]
        ax.plot([p.samples for p in line], [p.recovery for p in line], marker="o", label=corpus.removeprefix("squad2-"))
    ax.axhline(1.0, color="#888", linestyle="--", label="icl")
    ax.axhline(0.0, color="#bbb", linestyle=":", label="none")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct synthetic samples (one epoch)")
    ax.set_ylabel("recovery of the none-to-icl gold-NLL gap")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result", type=Path, action="append", required=True, help="distill_sweep results.json")
    parser.add_argument("--mix", default="corpus")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--num-tokens", type=int, default=256)
    parser.add_argument("--init", default="first_tokens")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for path in args.result:
        if not path.is_file():
            raise SystemExit(f"--result {path}: no such file (a bench/distill_sweep.py results.json)")
    found = points(args.result, args.mix, args.lr, args.num_tokens, args.init)
    if not found:
        raise SystemExit(
            f"no trial of mix {args.mix}, lr {args.lr:g}, P={args.num_tokens}, init {args.init} in --result"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"{args.mix} mix, lr {args.lr:g}, P={args.num_tokens}, init {args.init}, one epoch per count"
    (args.out / "samples_curve.md").write_text(f"{title}\n\n{table(found)}")
    plot(found, title, args.out / "samples_curve.png")
    print(table(found))


if __name__ == "__main__":
    run_script(main)
