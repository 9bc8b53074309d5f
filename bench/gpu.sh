#!/usr/bin/env bash
# GPU benchmarks for newslora: run from a fresh clone on a machine with one CUDA GPU (venv active):
#
#     bash bench/gpu.sh            # everything, about 8-10 minutes on one H100
#     bash bench/gpu.sh epoch      # one stage: train | infer | epoch
#
# Stages (each prints its table and writes it under $OUT, default bench/gpu-results-<UTC time>/):
#   train  bench/train_speed.py on CUDA: the plain HF Trainer + PEFT recipe (fp32, random batches) vs newslora
#          (bf16 autocast, length-grouped batches, fused AdamW, pad_to_multiple_of=8), MiniLM and random-init
#          roberta-base, plus newslora with train.torch_compile=true on roberta.
#   infer  bench/infer_speed.py on CUDA: pipeline("text-classification") vs newslora predict_proba on the
#          7,600-row test set (trains a short MiniLM run first).
#   epoch  seconds per full AG News epoch for random-init roberta-base LoRA (newslora defaults): 120,000 rows
#          (the 22,490-row sample repeated), batch 32 (recipe default) and batch 128, with peak CUDA memory.
#          Target: <= 30 s per epoch on one H100.
# Data and the roberta-base config come from ../shared (or $NEWSLORA_SHARED), as for the CPU benches.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=true  # the one-off tokenization of 122k rows uses every core
PY=${PYTHON:-python}
STAGE=${1:-all}
OUT=${OUT:-bench/gpu-results-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

$PY - <<'EOF' | tee "$OUT/device.txt"
import sys, torch, transformers, peft
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: no CUDA GPU visible (torch.cuda.is_available() is False)")
print(f"{torch.cuda.get_device_name(0)} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"transformers {transformers.__version__} | peft {peft.__version__}")
EOF
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)" | tee -a "$OUT/device.txt"

run() {  # run NAME COMMAND...: echo the exact command, tee its output
    local name=$1; shift
    echo "\$ $*" | tee "$OUT/$name.txt"
    "$@" 2>"$OUT/$name.stderr" | tee -a "$OUT/$name.txt"
}

if [[ $STAGE == all || $STAGE == train ]]; then
    run train_minilm $PY bench/train_speed.py --backbone minilm --steps 300 --repeats 2 \
        --json "$OUT/train_minilm.json"
    run train_roberta $PY bench/train_speed.py --backbone roberta-random --steps 200 --repeats 2 \
        --variant compile=train.torch_compile=true --json "$OUT/train_roberta.json"
fi
if [[ $STAGE == all || $STAGE == infer ]]; then
    run infer $PY bench/infer_speed.py --repeats 3
fi
if [[ $STAGE == all || $STAGE == epoch ]]; then
    run epoch $PY bench/train_speed.py --backbone roberta-random --full-epoch 120000 --only newslora \
        --variant batch128=train.batch_size=128 --json "$OUT/epoch.json"
fi
echo "results in $OUT"
