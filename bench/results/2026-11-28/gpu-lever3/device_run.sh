#!/bin/bash
# Device run for #17 lever 3 (more distinct samples, one epoch each): 1,536 samples per article, P=256,
# the four SQuAD articles one at a time. Two calls: `prep` carries .dev/a (first part of the GGUF and the
# wheels the device lacks), `run` carries .dev/b (the rest of the GGUF, the QA file) and trains.
set -u
source bench/device_model.sh
if [ "$1" = prep ]; then
  mkdir -p /tmp/dev && cp .dev/a/gguf.part /tmp/dev/ && python3 -m pip install -q --no-deps --target /tmp/site .dev/a/w/*.whl
  python3 -c "import pydantic, gguf; print('prep ok', pydantic.VERSION)"
  exit
fi
prepare_model
START=$(date +%s)
S=${SAMPLES:-1536}; STEPS=$((S / 4)); i=0
for ID in "squad2-Sky_(United_Kingdom)" squad2-Normans squad2-Computational_complexity_theory "squad2-Victoria_(Australia)"; do
  i=$((i + 1))
  LEFT=$(( ${BUDGET:-540} - ($(date +%s) - START) ))
  echo "=== $ID samples $S steps $STEPS, $LEFT s left"
  [ $LEFT -lt 60 ] && break
  timeout $LEFT python3 bench/distill_sweep.py --qa .dev/b/squad.json --corpus-id "$ID" --samples $S --trial corpus/2e-3/$STEPS/256 \
    --model /tmp/model --engine hf --engine-batch 64 --shard-size 512 --out /tmp/sweep-$S-$i --results /tmp/res-$S-$i 2>&1 | grep -v Warning | tail -8
  mkdir -p $OUT/s$S-$i; cp /tmp/res-$S-$i/results.json /tmp/res-$S-$i/results.md $OUT/s$S-$i/ 2>/dev/null
done
