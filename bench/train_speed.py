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
from cartridges.pipeline.build_config import load_build_config
from cartridges.pipeline.stage_runner import StageJob, run_stages
from cartridges.stages.run_dir import RunDir
from cartridges.stages.run_mirror import RunMirror


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder with a finished synthesis")
    parser.add_argument("scratch", type=Path, help="folder to copy it into (replaced)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", default="default", help="the build config whose distill section is timed")
    args = parser.parse_args()
    shutil.rmtree(args.scratch, ignore_errors=True)
    args.scratch.mkdir(parents=True)
    for item in ["documents.parquet", "chunks.parquet", "ingest.json", "synthesis"]:
        (shutil.copytree if (args.run / item).is_dir() else shutil.copy)(args.run / item, args.scratch / item)
    overrides = [f"distill.steps={args.steps}", "distill.checkpoint_every=1000", "distill.eval_every=1000"]
    overrides += ["distill_run.executor=local", f"distill_run.threads={args.threads}"]
    config = load_build_config(args.config, overrides)
    loaded = load_model(config.model)
    started = time.perf_counter()
    run_stages(StageJob(RunMirror(RunDir(args.scratch), None), loaded, config, ("distill",)))
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
