#!/usr/bin/env bash
# Reproduce the shipped tiny checkpoint: generate synthetic clips in parallel, cache their windows,
# train (docs/TRAINING.md). Usage (repo root):
#   bash flashdrive_ros/training/reproduce.sh WORKDIR CKPT_OUT [MINUTES=5.5] [JOBS=12] [STEPS=100000]
# Training data: JOBS datasets of 3 x 20 s clips at 320x180, seeds 100..100+JOBS-1;
# held-out: 6 x 20 s clips, seed 1001 (never trained on). Python: $PYTHON (default python3).
set -euo pipefail
WORK=${1:?workdir}; CKPT=${2:?checkpoint output dir}; MINUTES=${3:-5.5}; JOBS=${4:-12}; STEPS=${5:-100000}
PY=${PYTHON:-python3}
# Optional: INIT=checkpoint dir to continue from (stage 2), LR=peak learning rate (default 2e-3).
INIT_ARGS=(); [ -n "${INIT:-}" ] && INIT_ARGS=(--init "$INIT")
mkdir -p "$WORK/logs"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
gen() { $PY -m flashdrive_ros.data.generate --out "$WORK/$1" --clips "$2" --seconds 20 --width 320 --height 180 \
          --seed "$3" > "$WORK/logs/gen_$1.log" 2>&1; }
cache() { $PY -m flashdrive_ros.training.dataset --data "$WORK/$1" --out "$WORK/$1.pt" > "$WORK/logs/cache_$1.log" 2>&1; }
t=$(date +%s)
for i in $(seq 0 $((JOBS - 1))); do (gen train$i 3 $((100 + i)) && cache train$i) & done
(gen heldout 6 1001 && cache heldout) &
wait
echo "data + caches: $(( $(date +%s) - t )) s"
$PY -m flashdrive_ros.training.dataset --merge $(for i in $(seq 0 $((JOBS - 1))); do echo "$WORK/train$i.pt"; done) \
    --out "$WORK/train.pt"
[ -n "${DATA_ONLY:-}" ] && exit 0  # only the datasets + sample caches (e.g. for streaming_finetune / evaluation)
$PY -m flashdrive_ros.training.train --data "$WORK/train.pt" --heldout "$WORK/heldout.pt" --out "$CKPT" \
    --steps "$STEPS" --max-minutes "$MINUTES" --seed 0 --batch-size 32 --lr "${LR:-2e-3}" --warmup 200 "${INIT_ARGS[@]}" \
    --eval-every 500 --eval-windows 128 --threads 4 --no-progress
