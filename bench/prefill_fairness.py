"""Does a long prompt starve a short request? Time to first token of a short chat request sent while a
`--long-tokens` prompt is being prefilled, through the server's batch decoder on the embedded model,
for each prefill policy side by side in one run (same process, same prompts, trials paired).

Policies: `arrival` (the prompt that came first takes each step's prefill budget, as before issue 36)
and `shortest` (the row with the fewest prompt tokens left goes first), each with a budget of
`--budgets` prompt tokens a step. The unit of the result is a decode step: the median time between two
tokens of the short request when it runs alone. Each trial uses new prompts (a trial number at their
start), so the decoder's prompt cache never serves one.

    python bench/prefill_fairness.py --long-tokens 6000 --trials 3 --out bench/results/2026-12-07/fairness
"""

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from cartridges.bench.run_record import record_header
from cartridges.errors import run_script
from cartridges.kv_layout import kv_shape
from cartridges.layout import chat_token_ids
from cartridges.qa import load_qa_file
from cartridges.serving.batch_decoder import BatchDecoder
from cartridges.serving.generation import Generation, Sampling
from cartridges.serving.server import load_serving_model

QA_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "qa" / "legal_housingqa.json"


def timed(decoder: BatchDecoder, prompt: list[int], max_tokens: int, stop_ids: frozenset) -> dict:
    """Submit a generation and time its tokens (seconds from submission) on a thread of its own."""
    generation = Generation(None, prompt, Sampling(max_tokens), stop_ids)
    times: list[float] = []
    started = time.perf_counter()

    def read() -> None:
        for _ in generation.tokens():
            times.append(time.perf_counter() - started)

    reader = threading.Thread(target=read)
    decoder.submit(generation)
    reader.start()
    return {"thread": reader, "times": times}


def short_prompt(tokenizer, trial: int, tag: str) -> list[int]:
    """A short question; each (trial, tag) its own text, so the prompt cache never answers for it."""
    return chat_token_ids(tokenizer, [{"role": "user", "content": f"Question {trial}{tag}: how many days notice?"}])


def long_prompt(tokenizer, text_ids: list[int], trial: int, tokens: int) -> list[int]:
    head = tokenizer(f"Trial {trial}. ")["input_ids"]
    return (head + text_ids)[:tokens]


def run_policy(
    loaded, threads, order: str, budget: int, prompts: list[tuple[list[int], list[int], list[int]]], delay: float
):
    """Per trial: the short request alone, then the long prompt and, `delay` s later, the short one."""
    decoder = BatchDecoder(
        loaded.model, kv_shape(loaded.model.config), 16, prefill_tokens=budget, prefill_order=order, threads=threads
    )
    rows = []
    try:
        for trial, (long_ids, alone_ids, short_ids) in enumerate(prompts):
            alone = timed(decoder, alone_ids, 16, frozenset())
            alone["thread"].join()
            gaps = [b - a for a, b in zip(alone["times"], alone["times"][1:])]
            long_run = timed(decoder, long_ids, 4, frozenset())
            time.sleep(delay)
            short = timed(decoder, short_ids, 8, frozenset())
            short["thread"].join()
            long_run["thread"].join()
            rows.append(
                {
                    "trial": trial,
                    "decode_step_s": statistics.median(gaps),
                    "short_alone_ttft_s": alone["times"][0],
                    "short_ttft_s": short["times"][0],
                    "short_total_s": short["times"][-1],
                    "long_ttft_s": long_run["times"][0],
                }
            )
            print(f"{order}/{budget} trial {trial}: {json.dumps(rows[-1])}", flush=True)
    finally:
        decoder.close()
    return rows


def paired(rows: list[dict], base: list[dict], key: str) -> tuple[float, float]:
    """Mean paired difference (rows - base) of `key` over trials, and its standard error."""
    differences = [a[key] - b[key] for a, b in zip(rows, base)]
    mean = statistics.fmean(differences)
    se = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else float("nan")
    return mean, se


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    steps = [statistics.fmean(r["short_ttft_s"] / r["decode_step_s"] for r in results[n]) for n in names]
    longs = [statistics.fmean(r["long_ttft_s"] for r in results[n]) for n in names]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(names, steps, color="tab:blue")
    left.set_yscale("log")
    left.set_ylabel("short request's first token (decode steps)")
    left.set_title("beside a long prompt being prefilled")
    right.bar(names, longs, color="tab:orange")
    right.set_ylabel("long prompt's first token (s)")
    right.set_title("what the long prompt pays")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(out / "fairness.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-tokens", type=int, default=6000)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--budgets", default="512,256,128", help="prefill tokens a step, for the `shortest` policy")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds between the long and the short request")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    loaded, threads = load_serving_model(None, None)
    tokenizer = loaded.tokenizer
    text = "\n\n".join(corpus.text for corpus in load_qa_file(QA_FILE))
    text_ids = tokenizer(text)["input_ids"]
    prompts = [
        (
            long_prompt(tokenizer, text_ids, trial, args.long_tokens),
            short_prompt(tokenizer, trial, "a"),
            short_prompt(tokenizer, trial, "b"),
        )
        for trial in range(args.trials)
    ]
    policies = [("arrival", 512)] + [("shortest", int(b)) for b in args.budgets.split(",")]
    results = {
        f"{order}/{budget}": run_policy(loaded, threads, order, budget, prompts, args.delay)
        for order, budget in policies
    }
    base = results["arrival/512"]
    lines = [
        f"Long prompt {args.long_tokens} tokens, short request {len(prompts[0][2])} tokens sent {args.delay:g} s after it; "
        f"{args.trials} trials, paired against `arrival/512` (before issue 36).",
        "",
        "| policy/budget | decode step (ms) | short TTFT alone (s) | short TTFT beside the long (s) | in decode steps | "
        "vs arrival/512 (s, ± SE) | long prompt's TTFT (s) | vs arrival/512 (s, ± SE) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        step = statistics.fmean(r["decode_step_s"] for r in rows)
        ttft = statistics.fmean(r["short_ttft_s"] for r in rows)
        in_steps = statistics.fmean(r["short_ttft_s"] / r["decode_step_s"] for r in rows)
        short_diff, short_se = paired(rows, base, "short_ttft_s")
        long_diff, long_se = paired(rows, base, "long_ttft_s")
        lines.append(
            f"| {name} | {step * 1000:.0f} | {statistics.fmean(r['short_alone_ttft_s'] for r in rows):.2f} | {ttft:.2f} | "
            f"{in_steps:.1f} | {short_diff:+.2f} ± {short_se:.2f} | {statistics.fmean(r['long_ttft_s'] for r in rows):.1f} | "
            f"{long_diff:+.1f} ± {long_se:.1f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({**record_header(vars(args)), "results": results}, indent=2))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    plot(results, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    run_script(main)
