#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored through .git/info/exclude) for a GPU machine with no network whose image lacks
# `datasets` and holds other transformers/peft versions: the wheels of this checkout's versions, and the parts of
# ../shared the GPU stages read (the roberta-base tokenizer and config, the training sample). The wheels are for the
# image's Python 3.12; its own huggingface_hub, tokenizers, pyarrow and fsspec are used. Then, on that machine, from
# the repo root:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/src NEWSLORA_SHARED=$PWD/.gpu/shared PYTHON=python3
#   OUT=/tmp/g19 bash bench/gpu.sh target
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${NEWSLORA_SHARED:-../shared}
exclude=$(git rev-parse --git-path info/exclude)  # also in a worktree, where .git is a file
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
mkdir -p .gpu/whl .gpu/shared/models .gpu/shared/data/ag_news
cp -r "$SHARED/models/roberta-base" .gpu/shared/models/
cp "$SHARED/data/ag_news/train_sample.csv" "$SHARED/data/ag_news/classes.txt" .gpu/shared/data/ag_news/
v() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
    "transformers==$(v transformers)" "peft==$(v peft)" "datasets==$(v datasets)" "dill==$(v dill)" \
    "multiprocess==$(v multiprocess)"
du -sh .gpu
