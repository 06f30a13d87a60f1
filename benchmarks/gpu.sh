#!/usr/bin/env bash
# Every benchmark at full size on one CUDA GPU, then short recipe runs on it (a CUDA smoke check).
#   bash benchmarks/gpu.sh [results folder]      # default benchmarks/results
# Each command has its own time limit; one failing does not stop the others.
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
run() { local limit=$1; shift; echo "+ $*"; timeout "$limit" "$@" || echo "!! exit $? from: $*"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
run 300 $py benchmarks/dino_step.py --device cuda --profile 3 \
    --loops reference,stepkit,stepkit+compile,stepkit+cudagraphs,stepkit+ckpt --find-batch \
    --out "$out/dino_step_cuda_vit-s16.json"
run 150 $py benchmarks/ijepa_step.py --device cuda --profile 3 \
    --loops reference,stepkit,stepkit+compile,stepkit+cudagraphs --out "$out/ijepa_step_cuda_vit-s16.json"
run 150 $py benchmarks/recipe_speed.py --device cuda --size vit-s16 --steps 60 \
    --out "$out/recipe_speed_cuda_vit-s16.json"
run 60 $py benchmarks/peers.py --device cuda --size vit-s16 --out "$out/peers_cuda_vit-s16.json"
run 45 $py benchmarks/ema.py --device cuda --out "$out/ema_cuda_vit-b.json"
run 60 $py benchmarks/gradcache.py --device cuda --batches 1024,4096,16384 --chunk 2048 \
    --out "$out/gradcache_cuda_tiny.json"
run 45 $py benchmarks/data.py --device cuda --out "$out/data_cuda_vit-s16.json"
# The recipes on CUDA: the CPU default, and the paper's ViT-S/16 preset for a few steps at batch 64.
runs=$(mktemp -d)
run 60 $py recipes/dino.py --device cuda --amp bf16 --train.steps 100 --run-dir "$runs/dino"
run 90 $py recipes/dino.py vit-s16 --batch-size 64 --train.steps 8 --optim.warmup-steps 2 \
    --log.every 2 --run-dir "$runs/dino_vit_s16"
run 60 $py recipes/ijepa.py --device cuda --amp bf16 --train.steps 120 --optim.warmup-steps 10 --run-dir "$runs/ijepa"
for r in dino dino_vit_s16 ijepa; do
    [ -f "$runs/$r/summary.json" ] && cp "$runs/$r/summary.json" "$out/summary_$r.json"
done
