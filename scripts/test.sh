#!/usr/bin/env bash
# Install, then run the whole test suite (offline; needs ../shared next to the repo root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q --durations=15 "$@"
