#!/usr/bin/env bash
# Install, then run the demo end to end, offline: LoRA on the packaged MiniLM, trained on 3,000 rows of the
# shared AG News sample, evaluated on the full 7,600-row test set, exported (merged) and predicted (ID,Label).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUN="${RUN_DIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
start=$(date +%s)
newslora train --config configs/demo.yaml --run-dir "$RUN"
newslora export "$RUN"
newslora predict "$RUN/merged" --input ../shared/data/ag_news/test.csv --output "$RUN/submission.csv"
# the yardstick: TF-IDF + logistic regression trained on exactly the demo's training rows
newslora baseline --config configs/demo.yaml --output "$RUN/baseline.json"
python - "$RUN" "$start" <<'PY'
import json, sys, time
run, start = sys.argv[1], int(sys.argv[2])
ev = json.load(open(f"{run}/eval.json"))["test"]
base = json.load(open(f"{run}/baseline.json"))
rows = sum(1 for _ in open(f"{run}/submission.csv")) - 1
print(f"demo: test accuracy {ev['accuracy']:.4f} on {ev['n']} rows, macro-F1 {ev['macro_f1']:.4f}; "
      f"TF-IDF + logistic regression on the same {base['train_rows']} training rows {base['test']['accuracy']:.4f} "
      f"({100 * (ev['accuracy'] - base['test']['accuracy']):+.2f} pt); "
      f"submission {run}/submission.csv ({rows} rows); run folder {run}; {time.time() - start:.0f} s")
PY
