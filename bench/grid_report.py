"""Issue 19's grid as one report: every method and the default cartridge, per corpus and KV budget.

The grid is measured in parts (each fits a session): bench/methods.py runs for the methods, and
bench/distill_sweep.py runs for the cartridges (a trial of P tokens is the cartridge at budget P).
This reads them all, a later part's row replacing an earlier one of the same corpus, method and
budget, and compares them on what every part scored: gold-answer NLL and rank accuracy (rows of runs
that also scored answers lose their answer fields, as in baseline_rows.scored_rows). Writes under --out:

- grid.md: per corpus and budget, every method ranked by gold NLL with its recovery of the none-to-icl
  gap, the cartridge minus it (paired per question, ± SE) and its cost; then which method wins where.
- recovery_vs_budget.png: recovery against the budget, one panel per corpus.
- cost.png: recovery against what a method costs, once (seconds to build its block) and per question
  (tokens prefilled for each question).
- grid.json: the table's numbers.

    python bench/grid_report.py --methods A/results.json --methods B/results.json \
        --cartridges SWEEP/results.json --trial corpus-lr0.006-s32-p256 --trial corpus-lr0.006-s32-p1024 --out OUT
"""

import argparse
import json
import math
from pathlib import Path

from cartridges.bench.baseline_rows import scored_rows
from cartridges.bench.methods_report import BUDGET_METHODS, merged_rows, summarize
from cartridges.errors import run_script
from cartridges.stages.evaluation.evaluate import paired_gain

CARTRIDGE = "cartridge"
# Methods whose block depends on the question: a deployment computes it again for every question.
SEES_THE_QUESTION = ("rag", "snapkv")
REFERENCES = ("none", "icl", "ape")


def method_rows(paths: list[Path]) -> list[dict]:
    """The methods.py rows of every part, merged; none/icl/ape are whole-corpus rows (budget None)."""
    records = [{"rows": scored_rows([path], distractors=4, answer_tokens=0)} for path in paths]
    return merged_rows(records)


def cartridge_rows(paths: list[Path], trials: list[str]) -> list[dict]:
    """Each named trial of the sweeps as a row of method `cartridge` at budget P; its build cost is the
    synthesis engine's seconds plus the training's, both as that sweep measured them."""
    found: dict[tuple[str, int], dict] = {}
    for path in paths:
        result = json.loads(path.read_text())
        for row in result["rows"]:
            if row["name"] not in trials:
                continue
            synthesis = result.get("synthesis", {}).get(row["corpus"], {}).get(row["mix"], {})
            scored = row["distilled"]
            found[(row["corpus"], row["num_tokens"])] = {
                "corpus": row["corpus"],
                "method": CARTRIDGE,
                "budget": row["num_tokens"],
                "trial": row["name"],
                "kv_tokens": scored["kv_tokens"],
                "nll": scored["nll"],
                "nll_se": scored["nll_se"],
                "rank_accuracy": scored["rank_accuracy"],
                "per_question_nll": scored["per_question_nll"],
                "build_seconds": synthesis.get("engine_seconds", math.nan) + row["train_seconds"],
                "prefill_per_question": 0,
                "reused_from": str(path),
            }
    return list(found.values())


def versus(here: dict | None, there: dict | None) -> tuple[float, float] | None:
    """here minus there in gold NLL, paired per question (mean, SE); None when either row is missing."""
    return paired_gain(here["per_question_nll"], there["per_question_nll"]) if here and there else None


def gain_text(gain: tuple[float, float] | None) -> str:
    return "" if gain is None else "{:+.3f} ± {:.3f}".format(*gain)


def cell(value: float | None, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def budget_cells(rows: list[dict], corpus: str, budget: int) -> list[dict]:
    """The rows of one corpus at one budget, best gold NLL first."""
    return sorted((r for r in rows if r["corpus"] == corpus and r["budget"] == budget), key=lambda r: r["nll"])


def winners(rows: list[dict], corpora: list[str], budgets: list[int]) -> list[dict]:
    """Per corpus and budget: the best block, the best that needs neither the question nor an index at
    serving time (everything but rag and snapkv), and where the cartridge stands against them and icl."""
    found = []
    for corpus in corpora:
        icl = next((r for r in rows if r["corpus"] == corpus and r["method"] == "icl"), None)
        for budget in budgets:
            ranked = budget_cells(rows, corpus, budget)
            if not ranked:
                continue
            blind = [r for r in ranked if r["method"] not in SEES_THE_QUESTION]
            cartridge = next((r for r in ranked if r["method"] == CARTRIDGE), None)
            rival = next((r for r in blind if r["method"] != CARTRIDGE), None)
            rag = next((r for r in ranked if r["method"] == "rag"), None)
            found.append(
                {
                    "corpus": corpus,
                    "budget": budget,
                    "methods": len(ranked),
                    "best": ranked[0]["method"],
                    "best_recovery": ranked[0]["recovery"],
                    "best_blind": blind[0]["method"] if blind else None,
                    "cartridge_place": ranked.index(cartridge) + 1 if cartridge else None,
                    "cartridge_recovery": cartridge["recovery"] if cartridge else None,
                    "best_other_blind": rival["method"] if rival else None,
                    "cartridge_minus_other_blind": versus(cartridge, rival),
                    "cartridge_minus_rag": versus(cartridge, rag),
                    "cartridge_minus_icl": versus(cartridge, icl),
                }
            )
    return found


def markdown(rows: list[dict], corpora: dict, budgets: list[int], won: list[dict]) -> str:
    lines = [
        "Gold-answer NLL per token (lower is better), paired per question. Recovery: (none - method) / (none - icl).",
        "",
        "| corpus | questions | corpus tokens | none | icl | headroom ± paired SE | ape (its documents in parallel) |",
        "|---|---|---|---|---|---|---|",
    ]
    for corpus, c in corpora.items():
        icl = next(r for r in rows if r["corpus"] == corpus and r["method"] == "icl")
        ape = next((r for r in rows if r["corpus"] == corpus and r["method"] == "ape"), None)
        ape_text = f"{ape['nll']:.3f} (recovery {cell(ape['recovery'])})" if ape else ""
        lines.append(
            f"| {corpus} | {icl['questions']} | {icl['kv_tokens']} | {c['none']:.3f} | {c['icl']:.3f} | "
            f"{c['headroom']:+.3f} ± {c['headroom_se']:.3f} | {ape_text} |"
        )
    lines += [
        "",
        "| corpus | B | method | gold NLL ± SE | recovery | rank acc | cartridge - method (paired) | built in s | "
        "prefilled per question |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for corpus in corpora:
        for budget in budgets:
            ranked = budget_cells(rows, corpus, budget)
            cartridge = next((r for r in ranked if r["method"] == CARTRIDGE), None)
            for r in ranked:
                name = f"**{r['method']}**" if r["method"] == CARTRIDGE else r["method"]
                difference = "0" if r is cartridge else gain_text(versus(cartridge, r))
                lines.append(
                    f"| {corpus} | {budget} | {name} | {r['nll']:.3f} ± {r['nll_se']:.3f} | {cell(r['recovery'])} | "
                    f"{cell(r['rank_accuracy'])} | {difference} | {cell(r.get('build_seconds'), 1)} | "
                    f"{r.get('prefill_per_question', 0)} |"
                )
    lines += [
        "",
        "Who wins where (blind: needs neither the question nor an index at serving time, i.e. all but rag and snapkv):",
        "",
        "| corpus | B | methods | best (recovery) | best blind | cartridge's place | cartridge recovery | "
        "cartridge - best other blind | cartridge - rag | cartridge - icl |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in won:
        lines.append(
            f"| {w['corpus']} | {w['budget']} | {w['methods']} | {w['best']} ({cell(w['best_recovery'])}) | "
            f"{w['best_blind'] or ''} | {w['cartridge_place'] or ''} | {cell(w['cartridge_recovery'])} | "
            f"{w['best_other_blind'] or ''} {gain_text(w['cartridge_minus_other_blind'])} | "
            f"{gain_text(w['cartridge_minus_rag'])} | {gain_text(w['cartridge_minus_icl'])} |"
        )
    return "\n".join(lines) + "\n"


def method_colours(rows: list[dict]) -> dict[str, tuple | str]:
    """One colour per budget method present, the same in every plot; the cartridge in black."""
    import matplotlib.pyplot as plt

    present = {r["method"] for r in rows if r["budget"] is not None}
    shown = [m for m in BUDGET_METHODS if m in present]
    colours: dict[str, tuple | str] = dict(zip(shown, plt.get_cmap("tab10").colors, strict=False))
    return colours | ({CARTRIDGE: "black"} if CARTRIDGE in present else {})


def plot_recovery(rows: list[dict], corpora: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(corpora))
    lines = math.ceil(len(corpora) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines), squeeze=False, sharey=True)
    colours = method_colours(rows)
    for ax, corpus in zip(axes.flat, corpora, strict=False):
        for method, colour in colours.items():
            points = sorted(
                (r["budget"], r["recovery"])
                for r in rows
                if r["corpus"] == corpus and r["method"] == method and r["budget"] and r["recovery"] is not None
            )
            if points:
                width = 3 if method == CARTRIDGE else 1.5
                ax.plot(*zip(*points, strict=True), marker="o", label=method, color=colour, linewidth=width)
        ax.axhline(1.0, color="#888", linestyle="--")
        ax.axhline(0.0, color="#bbb", linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_title(corpus.replace("squad2-", "").replace("housingqa-", "HousingQA "), fontsize=9)
        ax.set_xlabel("KV budget (tokens)")
    for ax in axes[:, 0]:
        ax.set_ylabel("recovery (icl = 1, none = 0)")
    for ax in axes.flat[len(corpora) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out / "recovery_vs_budget.png", dpi=110)
    plt.close(fig)


def plot_cost(rows: list[dict], budgets: list[int], out: Path) -> None:
    """Mean recovery over the corpora where the method has a row at that budget (the count is in the label),
    against the seconds to build its block once and the tokens it prefills for each question."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    markers = dict(zip(budgets, "os^D", strict=False))
    for method, colour in method_colours(rows).items():
        for budget in budgets:
            mine = [r for r in rows if r["method"] == method and r["budget"] == budget and r["recovery"] is not None]
            if not mine:
                continue
            recovery = sum(r["recovery"] for r in mine) / len(mine)
            built = sum(r["build_seconds"] for r in mine) / len(mine)
            prefill = sum(r.get("prefill_per_question", 0) for r in mine) / len(mine)
            label = f"{method} {budget} ({len(mine)})"
            for ax, x in zip(axes, (built, prefill), strict=True):
                ax.scatter([x], [recovery], marker=markers[budget], color=colour)
                if ax is axes[0] or prefill:  # at x = 0 on the right the labels would overlap: the left names them
                    ax.annotate(label, (x, recovery), fontsize=6, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("seconds to build the block once (cartridge: synthesis + training)")
    axes[1].set_xscale("symlog", linthresh=100)
    axes[1].set_xlim(left=-20)
    axes[1].set_xlabel("tokens prefilled for each question (at 0: every block built once, named on the left)")
    axes[0].set_ylabel("mean recovery over the corpora (count)")
    for ax in axes:
        ax.axhline(1.0, color="#888", linestyle="--")
        ax.axhline(0.0, color="#bbb", linestyle=":")
    fig.suptitle(f"cost of each method at B = {', '.join(map(str, budgets))} (o, s: the budgets in that order)")
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=Path, help="a JSON file listing methods, cartridges, trials and out")
    parser.add_argument("--methods", type=Path, action="append", default=[], help="bench/methods.py results.json")
    parser.add_argument(
        "--cartridges", type=Path, action="append", default=[], help="bench/distill_sweep.py results.json"
    )
    parser.add_argument("--trial", action="append", default=[], help="sweep trial shown as the cartridge at its P")
    parser.add_argument("--budget", type=int, action="append", default=None, help="budgets shown (default 256 1024)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.parts is not None:  # paths in the file are relative to its folder
        parts, base = json.loads(args.parts.read_text()), args.parts.parent
        args.methods += [base / path for path in parts["methods"]]
        args.cartridges += [base / path for path in parts.get("cartridges", [])]
        args.trial += parts.get("trials", [])
        args.out = args.out or base / parts["out"]
    if not args.methods or args.out is None:
        raise SystemExit("give --parts FILE, or --methods (one or more) and --out")
    for path in [*args.methods, *args.cartridges]:
        if not path.is_file():
            raise SystemExit(f"no results file {path}: give the results.json of a finished run")
    budgets = args.budget or [256, 1024]
    rows = [r for r in method_rows(args.methods) if r["method"] in (*REFERENCES, *BUDGET_METHODS)]
    rows += cartridge_rows(args.cartridges, args.trial)
    rows = [r for r in rows if r["budget"] is None or r["budget"] in budgets]
    corpora = {c: v for c, v in summarize(rows).items() if not math.isnan(v["headroom"])}
    missing = sorted({r["corpus"] for r in rows} - set(corpora))
    if missing:
        raise SystemExit(f"no none and icl rows for {', '.join(missing)}: add a --methods run that scored them")
    won = winners(rows, list(corpora), budgets)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, corpora, budgets, won)
    (args.out / "grid.md").write_text(table)
    kept = [{k: v for k, v in r.items() if k != "per_question_nll"} for r in rows]
    sources = [str(p) for p in [*args.methods, *args.cartridges]]
    (args.out / "grid.json").write_text(
        json.dumps({"sources": sources, "corpora": corpora, "rows": kept, "winners": won}, indent=2)
    )
    plot_recovery(rows, list(corpora), args.out)
    plot_cost(rows, budgets, args.out)
    print(table)


if __name__ == "__main__":
    run_script(main)
