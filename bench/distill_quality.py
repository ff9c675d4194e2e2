"""Does a distilled cartridge beat `none` and `init`, and how close does it get to `icl`?

For one QA corpus: synthesize self-study samples, distill a P-token cartridge, then score the
corpus's questions with no context, the init cartridge (KV of the first P corpus tokens), the
distilled cartridge and the whole corpus in context, side by side.

    python bench/distill_quality.py --corpus-id squad2-Normans --samples 128 --steps 100 --engine vllm
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

from safetensors.torch import load_file

from cartridges.models import load_model
from cartridges.qa import DEFAULT_QA_DIR, load_qa_file
from cartridges.stages.distill import DISTILL_DIR, FINAL_FILE, INIT_FILE, DistillConfig, TrainSettings, run_training
from cartridges.stages.evaluate import corpus_prefix, score_corpus

from synthesis_engines import engine_env  # bench/ is on sys.path when a script here runs


def find(corpus_id: str, files: list[Path]):
    for path in files:
        for corpus in load_qa_file(path):
            if corpus.id == corpus_id:
                return corpus
    raise SystemExit(f"no corpus {corpus_id}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-id", default="squad2-Normans")
    parser.add_argument("--qa", type=Path, nargs="*", default=sorted(DEFAULT_QA_DIR.glob("*.json")))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--engine", default="vllm")
    parser.add_argument("--kinds", default="")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--distractors", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results") / date.today().isoformat() / "distill")
    args = parser.parse_args()

    corpus = find(args.corpus_id, args.qa)
    out = args.out / corpus.id
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    (out / "corpus" / f"{corpus.id}.txt").write_text(corpus.text)
    run = out / "run"
    timings = {}
    started = time.perf_counter()
    command = [sys.executable, "-m", "cartridges.pipeline.cli", "synthesize", str(out / "corpus"), "--out", str(run),
               "--samples", str(args.samples), "--engine", args.engine, "--executor", "local"]
    if args.kinds:
        command += ["--kinds", args.kinds]
    subprocess.run(command, env=engine_env(args.engine), check=True)
    timings["synthesis_seconds"] = time.perf_counter() - started

    loaded = load_model()
    config = DistillConfig(num_tokens=args.tokens, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                           eval_every=max(1, args.steps // 4), checkpoint_every=max(1, args.steps // 2))
    started = time.perf_counter()
    run_training(run, loaded, config, TrainSettings(executor="local", threads=os.cpu_count()))
    timings["training_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    methods = {
        "none": None,
        "init": load_file(str(run / DISTILL_DIR / INIT_FILE))["prefix"],
        "distilled": load_file(str(run / DISTILL_DIR / FINAL_FILE))["prefix"],
        "icl": corpus_prefix(loaded, corpus, None),
    }
    scores = {name: asdict(score_corpus(loaded, corpus, prefix, name, args.distractors)) for name, prefix in methods.items()}
    timings["evaluation_seconds"] = time.perf_counter() - started
    summary = json.loads((run / "synthesis" / "summary.json").read_text())
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "scores": scores, "timings": timings, "synthesis": summary,
              "distill_config": config.model_dump()}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"`{corpus.id}`: {summary['samples']} samples ({args.engine}), P={args.tokens}, {args.steps} steps, lr {args.lr}, batch {args.batch_size}",
        "",
        "| method | KV tokens | gold NLL ± SE | rank accuracy |",
        "|---|---|---|---|",
    ]
    for name, s in scores.items():
        acc = "n/a" if s["rank_accuracy"] is None else f"{s['rank_accuracy']:.2f} ({s['ranked_questions']} q)"
        lines.append(f"| {name} | {s['kv_tokens']} | {s['nll']:.3f} ± {s['nll_se']:.3f} | {acc} |")
    lines += ["", "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
