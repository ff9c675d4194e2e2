"""Tokens/s of the training loop alone (in-process, 2 threads) on a copy of a run folder's samples.

For A/B checks of training speed across commits: run it on one commit, check out another's
`cartridges/ stages/ pipeline/`, run it again on the same run folder, alternate.

    python bench/train_speed.py ~/.cache/cartridges/runs/legal-... /tmp/speed --steps 8
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from cartridges.errors import run_script
from cartridges.models import load_model
from cartridges.stages.distillation.config import DistillConfig, DistillRunSettings
from cartridges.stages.distillation.run import run_training
from cartridges.stages.run_dir import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder with a finished synthesis")
    parser.add_argument("scratch", type=Path, help="folder to copy it into (replaced)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    shutil.rmtree(args.scratch, ignore_errors=True)
    args.scratch.mkdir(parents=True)
    for item in ["documents.parquet", "chunks.parquet", "ingest.json", "synthesis"]:
        (shutil.copytree if (args.run / item).is_dir() else shutil.copy)(args.run / item, args.scratch / item)
    loaded = load_model()
    config = DistillConfig(num_tokens=256, steps=args.steps, checkpoint_every=1000, eval_every=1000, eval_samples=16)
    run, settings = RunDir(args.scratch), DistillRunSettings(executor="local", threads=args.threads)
    started = time.perf_counter()
    run_training(run, loaded, config, settings)
    records = [json.loads(line) for line in (args.scratch / "distill" / "metrics.jsonl").read_text().splitlines()]
    print(
        json.dumps(
            {
                "seconds": round(time.perf_counter() - started, 1),
                "tokens_per_second": round(records[-1]["tokens_per_second"], 1),
                "tokens": sum(r["tokens"] for r in records),
            }
        )
    )


if __name__ == "__main__":
    run_script(main)
