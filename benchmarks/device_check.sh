#!/usr/bin/env bash
# One GPU check of the benchmarks (not yet run on a GPU; sized to fit a few minutes): wide_resnet50_2 with random
# weights (offline), 1,000 evaluation images, 3 training epochs of a generated 2,000-image set.
# Prints images/s, the per-stage tables and the peak GPU memory of each.
#
#   bash benchmarks/device_check.sh                              # the GPU check
#   DEVICE=cpu BACKBONE=resnet18 EVAL_IMAGES=8 TRAIN_IMAGES=64 EPOCHS=1 BATCH=16 bash benchmarks/device_check.sh
#                                                                # a tiny CPU rehearsal of the same commands
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
BACKBONE=${BACKBONE:-wide_resnet50_2}
EVAL_IMAGES=${EVAL_IMAGES:-1000}
TRAIN_IMAGES=${TRAIN_IMAGES:-2000}
EPOCHS=${EPOCHS:-3}
BATCH=${BATCH:-32}
WORKERS=${WORKERS:-8}
DATA=${DATA:-./data/bench}
AMP=${AMP:-none}

echo "== device check: $BACKBONE (random weights) on $DEVICE, $(date -u +%FT%TZ)"
python - <<'PY'
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
else:
    print(f"no GPU; torch {torch.__version__}")
PY
echo "== evaluation: $EVAL_IMAGES images"
python benchmarks/eval_speed.py --backbone "$BACKBONE" --random_weights --device "$DEVICE" \
    --images "$EVAL_IMAGES" --eval_batch_size "$BATCH" --num_workers "$WORKERS" --data "$DATA/demo" \
    --amp "$AMP" --compare
echo "== training: $EPOCHS epochs of $TRAIN_IMAGES generated images"
python benchmarks/train_speed.py --backbone "$BACKBONE" --random_weights --device "$DEVICE" \
    --data "$DATA/no-fewshot-folder" --generated_dir "$DATA/train" --images "$TRAIN_IMAGES" \
    --epochs "$EPOCHS" --batch_size "$BATCH" --eval_batch_size "$BATCH" --num_workers "$WORKERS" --amp "$AMP"
echo "== torchrun: training and evaluation images/s with 1 rank and one rank per GPU"
GPUS=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
RANKS="1"; [ "$GPUS" -gt 1 ] && RANKS="1 $GPUS"
python benchmarks/distributed_speed.py --device "$DEVICE" --ranks $RANKS --train_images 64 --test_images 64 \
    --batch_size "$BATCH"
echo "== done $(date -u +%FT%TZ)"
