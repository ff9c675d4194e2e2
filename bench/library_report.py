"""Several `library` runs of one suite (the same questions) as one table and two plots: recovery against the
KV budget per method, and recovery against time to first token (cost against quality).

A library row is named by the run's library recipe (`library kv/256`, `library select/1024`, and the unit
budget ratio where a closed-form init compresses: `library select/1024 P=0.50`), so the runs of different
recipes line up beside the baselines (taken from the first run that has them).

    python bench/library_report.py bench/results/2026-12-07/library/squad-all/*/results.json --out DIR
"""

import argparse
import json
from pathlib import Path


def labelled_rows(paths: list[Path]) -> list[dict]:
    """Every row of every run; a library method's row renamed after its run's recipe, a baseline kept once."""
    rows, seen = [], set()
    for path in paths:
        record = json.loads(path.read_text())
        config = record["library"]["config"]
        recipe = f"{config['init']}/{config['unit_tokens']}"
        if config["init"] in ("select", "matched"):  # a unit keeps ratio x its tokens (`library.ratio`)
            recipe += f" P={config['ratio']:.2f}"
        for row in record["rows"]:
            name = row["method"]
            if name.startswith("library"):
                name = f"{name} {recipe}"
            key = (name, row["budget"])
            if key not in seen:
                seen.add(key)
                rows.append({**row, "method": name})
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| method | B | gold NLL ± SE | recovery | rank acc | answer F1 | hit rate | KV tokens | TTFT s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["budget"] or 0, r["method"])):

        def fmt(value, spec: str) -> str:
            return "" if value is None else format(value, spec)

        lines.append(
            f"| {r['method']} | {r['budget'] or ''} | {r['nll']:.3f} ± {r['nll_se']:.3f} | {fmt(r.get('recovery'), '.2f')} "
            f"| {fmt(r['rank_accuracy'], '.2f')} | {fmt(r['answer_f1'], '.3f')} | {fmt(r.get('hit_rate'), '.2f')} "
            f"| {r['kv_tokens']:.0f} | {fmt(r.get('ttft_s'), '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], suite: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({r["method"] for r in rows if r["budget"] is not None}):
        points = sorted((r["budget"], r["recovery"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.axhline(1.0, linestyle=":", color="black", label="oracle: the gold document in context")
    ax.axhline(0.0, linestyle="-", color="grey", linewidth=0.5)
    ax.set(
        xscale="log", xlabel="KV budget B (tokens)", ylabel="recovery of the none-to-oracle gold-NLL gap", title=suite
    )
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "recovery_vs_budget.png", dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r.get("ttft_s") is not None:
            ax.scatter(r["ttft_s"], r["recovery"])
            ax.annotate(f"{r['method']} B={r['budget']}", (r["ttft_s"], r["recovery"]), fontsize=7)
    ax.set(
        xscale="log",
        xlabel="time to first token (s, mean of 8 questions)",
        ylabel="recovery",
        title=f"{suite}: cost against quality",
    )
    fig.tight_layout()
    fig.savefig(out / "ttft_vs_recovery.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = labelled_rows(args.results)
    suite = json.loads(args.results[0].read_text())["suite"]
    (args.out / "report.md").write_text(table(rows))
    plots(rows, suite, args.out)
    print(table(rows))


if __name__ == "__main__":
    main()
