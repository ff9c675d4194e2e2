"""Benchmark: self-study synthesis with the HF and vLLM engines, side by side in one run.

Each engine runs `cartridges synthesize` in its own process (vLLM gets tcmalloc and Intel OpenMP
preloaded, as it recommends on CPU) on the same corpus and settings. Writes results.json, a
Markdown table and a PNG plot under bench/results/<date>/synthesis/.

    python bench/synthesis_engines.py --corpus-id housingqa-texas --samples 256
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pyarrow.parquet as pq

from cartridges.bench.run_record import record_header, settings_of
from cartridges.errors import CartridgeError, run_script
from cartridges.qa import DEFAULT_QA_DIR, QACorpus, find_corpus
from cartridges.stages.synthesis.config import EVERY_KIND

# Every seed kind, model-written and corpus-answered, so generation speed is measured on real chat turns.
ALL_KINDS_MIX = json.dumps(EVERY_KIND)
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def engine_env(engine: str) -> dict[str, str]:
    env = dict(os.environ)
    if engine == "vllm":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        preload = [str(p) for p in (TCMALLOC, Path(sys.prefix) / "lib" / "libiomp5.so") if p.is_file()]
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
    return env


@dataclass(frozen=True)
class EngineBench:
    """What both engines are run on and with."""

    qa: Path
    corpus_id: str
    corpus: str | None
    samples: int
    seed: int
    executor: str
    kinds: str


def run_engine(engine: str, corpus_dir: Path, run_dir: Path, bench: EngineBench) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "cartridges.pipeline.cli",
        "synthesize",
        str(corpus_dir),
        "--out",
        str(run_dir),
        "--set",
        f"synthesis.samples={bench.samples}",
        "--set",
        f"synthesis_run.engine={engine}",
        "--set",
        f"synthesis.seed={bench.seed}",
        "--set",
        f"synthesis_run.executor={bench.executor}",
        "--set",
        f"synthesis.kinds={bench.kinds}",
    ]
    started = time.perf_counter()
    result = subprocess.run(command, env=engine_env(engine), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        return {"engine": engine, "ok": False, "wall_seconds": wall, "error": (result.stderr or result.stdout)[-3000:]}
    summary = json.loads((run_dir / "synthesis" / "summary.json").read_text())
    return {
        "engine": engine,
        "ok": True,
        "wall_seconds": wall,
        "engine_seconds": summary["engine_seconds"],
        "startup_seconds": wall - summary["engine_seconds"],
        "samples": summary["samples"],
        "generated_tokens": summary["generated_tokens"],
        "samples_per_second_wall": summary["samples"] / wall,
        "samples_per_second_engine": summary["samples_per_second"],
        "generated_tokens_per_second": summary["generated_tokens_per_second"],
        "kinds": summary["kinds"],
        "rejected": summary["rejected"],
    }


def markdown(rows: list[dict], bench: EngineBench) -> str:
    lines = [
        f"Synthesis, {bench.samples} samples of `{bench.corpus or bench.corpus_id}`, SmolLM2-135M-Instruct fp32, seed {bench.seed}, executor {bench.executor}, kinds {bench.kinds}",
        "",
        "| engine | wall s | start-up s | engine s | samples | samples/s (engine) | generated tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["ok"]:
            lines.append(
                f"| {r['engine']} | {r['wall_seconds']:.0f} | {r['startup_seconds']:.0f} | {r['engine_seconds']:.0f} | {r['samples']} | "
                f"{r['samples_per_second_engine']:.3f} | {r['generated_tokens_per_second']:.1f} |"
            )
        else:
            lines.append(f"| {r['engine']} | failed after {r['wall_seconds']:.0f} s | | | | | |")
    ok = {r["engine"]: r for r in rows if r["ok"]}
    if {"hf", "vllm"} <= ok.keys():
        lines += [
            "",
            f"vLLM / HF: generated tok/s x{ok['vllm']['generated_tokens_per_second'] / ok['hf']['generated_tokens_per_second']:.2f}, "
            f"samples/s (engine) x{ok['vllm']['samples_per_second_engine'] / ok['hf']['samples_per_second_engine']:.2f}, "
            f"wall time x{ok['hf']['wall_seconds'] / ok['vllm']['wall_seconds']:.2f} faster",
        ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["ok"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["engine"] for r in ok]
    axes[0].bar(names, [r["generated_tokens_per_second"] for r in ok], color=["#888", "#36c"][: len(ok)])
    axes[0].set_title("generated tokens/s (engine time)")
    axes[1].bar(names, [r["startup_seconds"] for r in ok], label="start-up", color="#bbb")
    axes[1].bar(
        names,
        [r["engine_seconds"] for r in ok],
        bottom=[r["startup_seconds"] for r in ok],
        label="synthesis",
        color="#36c",
    )
    axes[1].set_title("wall time, s")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def sample_preview(run_dir: Path, count: int, seed: int) -> list[dict]:
    rows = pq.read_table(run_dir / "synthesis" / "shards", columns=["sample_id", "seed_kind", "messages"]).to_pylist()
    return random.Random(seed).sample(rows, min(count, len(rows)))


def corpus_source(bench: EngineBench) -> Path | QACorpus:
    """What both engines read: --corpus as a folder, the default corpus, or a QA set's corpus (written
    to the scratch folder later). Bad input fails here, before anything is written."""
    if bench.corpus == "default":
        from cartridges.default_corpus import gather_license_corpus

        return gather_license_corpus()
    if bench.corpus:
        if not Path(bench.corpus).is_dir():
            raise CartridgeError(f"--corpus {bench.corpus}: not a folder; pass a corpus folder or 'default'")
        return Path(bench.corpus)
    return find_corpus(bench.qa, bench.corpus_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qa", type=Path, default=DEFAULT_QA_DIR / "legal_housingqa.json")
    parser.add_argument("--corpus-id", default="housingqa-texas")
    parser.add_argument(
        "--corpus",
        help="a corpus folder instead of a QA set's corpus; 'default' = the default corpus (license texts)",
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--executor", default="local", choices=["ray", "local"])
    parser.add_argument(
        "--kinds",
        default=ALL_KINDS_MIX,
        help='seed kind weights as YAML, e.g. "{question: 2, quote: 1}" (default: every kind)',
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results") / date.today().isoformat() / "synthesis")
    args = parser.parse_args()

    bench = settings_of(args, EngineBench)
    source = corpus_source(bench)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="synthesis-bench-"))  # corpus copy and run folders: not results
    if isinstance(source, QACorpus):
        corpus_dir = scratch / "corpus"
        corpus_dir.mkdir()
        (corpus_dir / f"{source.id}.txt").write_text(source.text)
    else:
        corpus_dir = source
    rows = []
    for engine in args.engines.split(","):
        print(f"running {engine}...", flush=True)
        rows.append(run_engine(engine, corpus_dir, scratch / f"run-{engine}", bench))
        print(json.dumps(rows[-1], indent=1), flush=True)
    (args.out / "results.json").write_text(json.dumps({**record_header(vars(args)), "rows": rows}, indent=2))
    table = markdown(rows, bench)
    (args.out / "results.md").write_text(table)
    plot(rows, args.out / "synthesis_engines.png")
    print(table)
    for row in rows:
        if row["ok"]:
            preview = sample_preview(scratch / f"run-{row['engine']}", 5, args.seed)
            (args.out / f"samples-{row['engine']}.json").write_text(json.dumps(preview, indent=2))
    shutil.rmtree(scratch)


if __name__ == "__main__":
    run_script(main)
