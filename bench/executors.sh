#!/bin/bash
# Ray or in-process on one box: the same synthesis and training work under each executor, in the order
# ray local local ray (so drift in the box's speed falls on both), on an otherwise idle machine.
# Usage: bench/executors.sh RUN_FOLDER CORPUS OUT [SAMPLES] [STEPS]
#   RUN_FOLDER: a finished build's run folder (its synthesis is copied for the training runs)
#   CORPUS: the corpus folder it was built from; OUT: scratch folder (times.txt is written there)
# Prints "stage executor seconds" lines; BENCHMARKS.md "Ray or in-process on one box" has a result.
set -euo pipefail
run=$1 corpus=$2 out=$3 samples=${4:-32} steps=${5:-16}
cli="$(dirname "$0")/../.venv/bin/cartridges"
mkdir -p "$out"
for executor in ray local local ray; do
  tag=$executor-$RANDOM
  start=$(date +%s.%N)
  "$cli" synthesize "$corpus" --out "$out/synthesis-$tag" --set synthesis.samples="$samples" \
    --set synthesis_run.executor="$executor" > "$out/synthesis-$tag.log" 2>&1
  echo "synthesize $executor $(echo "$(date +%s.%N) - $start" | bc)" | tee -a "$out/times.txt"
  mkdir -p "$out/distill-$tag"
  cp -r "$run"/synthesis "$run"/chunks.parquet "$run"/documents.parquet "$run"/ingest.json "$out/distill-$tag/"
  start=$(date +%s.%N)
  "$cli" distill "$out/distill-$tag" --name "executors-$executor" --set distill.steps="$steps" \
    --set distill_run.executor="$executor" > "$out/distill-$tag.log" 2>&1
  echo "distill $executor $(echo "$(date +%s.%N) - $start" | bc)" | tee -a "$out/times.txt"
done
