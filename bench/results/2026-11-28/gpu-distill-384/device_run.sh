#!/bin/bash
# Device run for #17 lever 3: gold NLL against samples in one epoch, four SQuAD articles, P=256.
set -u
source bench/device_model.sh
prepare_model
CORPORA="--corpus-id squad2-Sky_(United_Kingdom) --corpus-id squad2-Normans --corpus-id squad2-Computational_complexity_theory --corpus-id squad2-Victoria_(Australia)"
START=$(date +%s)
for S in 384 1536 6144; do
  STEPS=$((S / 4))
  LEFT=$(( ${BUDGET:-500} - ($(date +%s) - START) ))
  echo "=== samples $S, steps $STEPS, $LEFT s left"
  [ $LEFT -lt 30 ] && break
  timeout $LEFT python3 bench/distill_sweep.py --qa .dev/b/squad.json $CORPORA --samples $S --trial corpus/2e-3/$STEPS/256 \
    --model /tmp/model --engine hf --engine-batch 64 --shard-size 512 --out /tmp/sweep-$S --results /tmp/res-$S 2>&1 | grep -v Warning | tail -15
  mkdir -p $OUT/s$S; cp /tmp/res-$S/results.json /tmp/res-$S/results.md $OUT/s$S/ 2>/dev/null
done
ls -R $OUT | head -20
