"""Peak memory and time of reading a long one-line corpus file: `cartridges init` and a build's ingest.

Writes a seeded one-line corpus of `--words` random words (and a 20 kB cut of it, for the process's
own footprint), then runs each command in a fresh process that reports its peak RSS (VmHWM).
Results: `<out>/results.json`, `<out>/results.md` and `<out>/memory.png`.

    python bench/corpus_memory.py --out bench/results/$(date +%F)/corpus-memory
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cartridges.errors import run_script

WORDS = "landlord tenant notice rent deposit lease premises court eviction days section shall written payment default cure".split()

MEASURE = """
import json, sys, tempfile
from pathlib import Path
from cartridges.bench.methods import peak_rss_of_this_process_mb
command, corpus = sys.argv[1], Path(sys.argv[2])
if command == "init":
    from cartridges.pipeline.cli import main
    with tempfile.TemporaryDirectory() as registry:
        sys.argv = ["cartridges", "init", "--corpus", str(corpus), "--tokens", "16", "--name", "big", "--registry", registry]
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, exc.code
    detail = {{}}
else:
    from transformers import AutoTokenizer
    from cartridges.models import prepare_embedded_model
    from cartridges.pipeline.build_config import load_build_config
    from cartridges.stages.ingest import ingest
    from cartridges.stages.run_dir import RunDir
    tokenizer = AutoTokenizer.from_pretrained(prepare_embedded_model())
    chunking = load_build_config("default").synthesis  # the ingest function alone: the model's memory stays out
    with tempfile.TemporaryDirectory() as run:
        record = ingest(corpus, RunDir(Path(run)), tokenizer, "fingerprint", chunking.chunk_min_tokens, chunking.chunk_max_tokens)
    detail = {{"chunks": record.num_chunks, "tokens": record.num_tokens}}
print(json.dumps({{"peak_rss_mb": peak_rss_of_this_process_mb(), **detail}}))
"""


def write_corpus(folder: Path, words: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(words))
    (folder / "one_line.txt").write_text(text)
    return folder


def measure(command: str, corpus: Path) -> dict:
    started = time.perf_counter()
    script = MEASURE.format()
    result = subprocess.run(
        [sys.executable, "-c", script, command, str(corpus)], capture_output=True, text=True, check=True
    )
    return {
        "command": command,
        "corpus": corpus.name,
        "seconds": time.perf_counter() - started,
        **json.loads(result.stdout.strip().splitlines()[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=6_000_000, help="words in the long corpus (6M: 43 MB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        big = write_corpus(Path(scratch) / "long", args.words, args.seed)
        small = Path(scratch) / "small"
        small.mkdir()
        (small / "one_line.txt").write_text((big / "one_line.txt").read_text()[:20_000])
        size_mb = (big / "one_line.txt").stat().st_size / 1e6
        rows = [measure(command, corpus) for command in ("init", "ingest") for corpus in (big, small)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"corpus_mb": size_mb, "words": args.words, "rows": rows}, indent=2)
    )
    lines = [
        f"Long corpus: one line, {size_mb:.1f} MB ({args.words} words, seed {args.seed}); small: its first 20 kB.",
        "",
        "| command | corpus | peak RSS MB | seconds | detail |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        detail = ", ".join(f"{k} {v}" for k, v in row.items() if k in ("chunks", "tokens"))
        lines.append(
            f"| {row['command']} | {row['corpus']} | {row['peak_rss_mb']:.0f} | {row['seconds']:.0f} | {detail} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, args.out / "memory.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['command']}\n{r['corpus']}" for r in rows]
    axis.bar(
        labels,
        [r["peak_rss_mb"] for r in rows],
        color=["tab:red" if r["corpus"] == "long" else "tab:gray" for r in rows],
    )
    axis.set_ylabel("peak RSS (MB)")
    axis.set_title("Reading a one-line corpus file")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    run_script(main)
