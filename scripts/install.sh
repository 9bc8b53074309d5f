#!/usr/bin/env bash
# Create .venv (if missing) and install newslora with its test extras. CPU torch by default;
# on a CUDA machine install the torch build you want first, then run this.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0   # the CPU wheel; an unpinned torch pulls CUDA
python -m pip install -q -e ".[test]"
