#!/usr/bin/env bash
# GPU benchmarks for newslora: run from a fresh clone on a machine with one CUDA GPU (venv active):
#
#     bash bench/gpu.sh profile epoch   # the next measurements to take (about 6 minutes on one H100, estimate)
#     bash bench/gpu.sh                 # every stage: well over 10 minutes on one H100 (2026-11-26: the batch-128
#                                       # epoch alone took 95 s)
#     bash bench/gpu.sh epoch infer     # some stages: profile | epoch | infer | train | compile
#
# Stages (each prints its table and writes it under $OUT, default bench/gpu-results-<UTC time>/):
#   profile  bench/profile_train.py: wall vs GPU-busy ms per step and the top CPU operators, random-init
#            roberta-base LoRA, batch PROFILE_BATCHES (128 512) (is the step bound by the Python side or by the
#            kernels?).
#   epoch    seconds per full AG News epoch for random-init roberta-base LoRA r=8 q,v (newslora defaults, so
#            TF32 on an Ampere+ GPU): 120,000 rows (the 22,490-row sample repeated), batch EPOCH_BATCH (128), then
#            each of EPOCH_VARIANTS (default: the same in bf16 autocast, the GPU default before 2026-11-26 that
#            gave 95 s; batch 512 with the learning rate scaled; the same in bf16 autocast. If a step is bound by the
#            host, a 4x larger batch is ~4x fewer steps at about the same cost each, and TF32 has none of
#            autocast's cast kernels; at batch 512 the GPU's arithmetic may start to count, where bf16 is 2x TF32's
#            rate), with peak CUDA memory. Target: <= 30 s per epoch on one H100. Also worth a variant:
#            train.dataloader_workers=2 (batch fetching off the main thread).
#   infer    bench/infer_speed.py: pipeline("text-classification") vs newslora predict_proba on the 7,600-row
#            test set (a short random-init roberta-base run is trained first; MiniLM with BACKBONE=minilm).
#   train    bench/train_speed.py: the plain HF Trainer + PEFT recipe (fp32, random batches) vs newslora
#            (precision auto = TF32 on Ampere+, length-grouped batches, fused AdamW), random-init roberta-base.
#   compile  newslora with train.torch_compile=true (default mode, then reduce-overhead: CUDA graphs), same steps as
#            train.
#   target   issue 19's figures in one prepared run: (1) a full 120,000-row epoch at batch 128 with CUDA graphs
#            (CG: regional torch.compile, dynamic shapes, mode reduce-overhead, 2 DataLoader workers); (2) plain vs
#            newslora (eager) vs CG at batch 32 over TARGET_STEPS32 steps, (3) the same at batch 128 over
#            TARGET_STEPS128 steps, with steady-state samples/s after the first WARM steps; (4) the epoch of (1)
#            with bf16 autocast. Each part has its own time limit (TARGET_LIMITS, seconds: "200 130 130 100"), so a slow
#            compile costs the parts after it, not the figures before it.
# Knobs (environment): BACKBONE (roberta-random), PROFILE_BATCHES ("128 512"), EPOCH_ROWS (120000), EPOCH_BATCH
# (128), EPOCH_VARIANTS (space-separated NAME=key=value,... as train_speed.py --variant; "" for none), STEPS (200),
# REPEATS (1), INFER_ROWS (all), INFER_REPEATS (1), STAGE_TIMEOUT (seconds per stage, 0 = none), ALLOW_CPU=1
# (smoke-test on a CPU).
# Data and the roberta-base config come from ../shared (or $NEWSLORA_SHARED), as for the CPU benches.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=true  # the one-off tokenization of 122k rows uses every core
PY=${PYTHON:-python}
STAGES=${*:-profile epoch infer train compile}
BACKBONE=${BACKBONE:-roberta-random}
EPOCH_ROWS=${EPOCH_ROWS:-120000}
EPOCH_BATCH=${EPOCH_BATCH:-128}
B512=train.batch_size=512,train.lr=2e-3
EPOCH_VARIANTS=${EPOCH_VARIANTS-bf16=train.precision=bf16 b512=$B512 b512-bf16=$B512,train.precision=bf16}
PROFILE_BATCHES=${PROFILE_BATCHES:-128 512}
STEPS=${STEPS:-200}
REPEATS=${REPEATS:-1}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-0}
export ALLOW_CPU=${ALLOW_CPU:-0}
OUT=${OUT:-bench/gpu-results-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

$PY - <<'PYEOF' | tee "$OUT/device.txt"
import os, sys, torch, transformers, peft, datasets
if not torch.cuda.is_available() and os.environ["ALLOW_CPU"] != "1":
    sys.exit("bench/gpu.sh: no CUDA GPU visible (torch.cuda.is_available() is False); ALLOW_CPU=1 to smoke-test")
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke test)"
print(f"{name} | torch {torch.__version__} | CUDA {torch.version.cuda} | transformers {transformers.__version__} "
      f"| peft {peft.__version__} | datasets {datasets.__version__}")
PYEOF
[[ ${PIPESTATUS[0]} == 0 ]] || exit 1
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)" | tee -a "$OUT/device.txt"

run() {  # run NAME COMMAND...: echo the exact command, tee its output (stderr to NAME.stderr)
    local name=$1; shift
    echo "\$ $*" | tee "$OUT/$name.txt"
    local t=()
    [[ $STAGE_TIMEOUT != 0 ]] && t=(timeout "$STAGE_TIMEOUT")
    "${t[@]}" "$@" 2>"$OUT/$name.stderr" | tee -a "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    [[ $rc == 0 ]] || { echo "stage $name failed (exit $rc); last stderr lines:"; tail -5 "$OUT/$name.stderr"; }
}

for stage in $STAGES; do
    case $stage in
    profile) cmd=""; for b in $PROFILE_BATCHES; do cmd+="${cmd:+ && }$PY bench/profile_train.py --batch-size $b"; done
             run profile sh -c "$cmd" ;;
    epoch) variants=(); for v in $EPOCH_VARIANTS; do variants+=(--variant "$v"); done
           run epoch $PY bench/train_speed.py --backbone "$BACKBONE" --full-epoch "$EPOCH_ROWS" --only newslora \
               --batch-size "$EPOCH_BATCH" "${variants[@]}" --json "$OUT/epoch.json" ;;
    infer) run infer $PY bench/infer_speed.py --backbone "$BACKBONE" --repeats "${INFER_REPEATS:-1}" \
               ${INFER_ROWS:+--rows "$INFER_ROWS"} ;;
    train) run train $PY bench/train_speed.py --backbone "$BACKBONE" --steps "$STEPS" --repeats "$REPEATS" \
               --json "$OUT/train.json" ;;
    compile) run compile $PY bench/train_speed.py --backbone "$BACKBONE" --steps "$STEPS" --only newslora \
               --variant compile=train.torch_compile=true \
               --variant compile-cudagraphs=train.torch_compile=true,train.compile_mode=reduce-overhead \
               --json "$OUT/compile.json" ;;
    target) CG=train.torch_compile=true,train.compile_mode=reduce-overhead,train.dataloader_workers=2
            read -r L1 L2 L3 L4 <<<"${TARGET_LIMITS:-}"
            L1=${L1:-200} L2=${L2:-130} L3=${L3:-130} L4=${L4:-100}
            W=${WARM:-30}
            STAGE_TIMEOUT=$L1 run target-epoch $PY bench/train_speed.py --backbone "$BACKBONE" --full-epoch "$EPOCH_ROWS" \
                --only variants --batch-size 128 --val-rows 256 --warm-steps "$W" --variant "cg=$CG" --json "$OUT/target-epoch.json" --log "$OUT/target-epoch.log"
            STAGE_TIMEOUT=$L2 run target-b32 $PY bench/train_speed.py --backbone "$BACKBONE" --steps "${TARGET_STEPS32:-300}" \
                --batch-size 32 --val-rows 256 --warm-steps "$W" --variant "cg=$CG" --json "$OUT/target-b32.json" --log "$OUT/target-b32.log"
            STAGE_TIMEOUT=$L3 run target-b128 $PY bench/train_speed.py --backbone "$BACKBONE" --steps "${TARGET_STEPS128:-150}" \
                --batch-size 128 --val-rows 256 --warm-steps "$W" --variant "cg=$CG" --json "$OUT/target-b128.json" --log "$OUT/target-b128.log"
            STAGE_TIMEOUT=$L4 run target-epoch-bf16 $PY bench/train_speed.py --backbone "$BACKBONE" --full-epoch "$EPOCH_ROWS" \
                --only variants --batch-size 128 --val-rows 256 --warm-steps "$W" --variant "cg-bf16=$CG,train.precision=bf16" \
                --json "$OUT/target-epoch-bf16.json" --log "$OUT/target-epoch-bf16.log" ;;
    *) echo "bench/gpu.sh: unknown stage '$stage' (profile, epoch, infer, train, compile, target)"; exit 2 ;;
    esac
done
echo "results in $OUT"
