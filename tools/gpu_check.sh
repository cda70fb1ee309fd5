#!/usr/bin/env bash
# The GPU check of issue 18 on the lent device machine (docs/PERFORMANCE.md, "GPU check (issue 18)").
#
#   bash tools/gpu_check.sh prepare        here, where pip reaches the registry: the wheels into .whl/ (ignored)
#   bash tools/gpu_check.sh [ARGS...]      there, through the device tool's run with carry [".whl"]:
#                                          installs .whl/*.whl into /tmp/site, then
#                                          python -m tools.bench gpu --out $OUT/gpu.json ARGS...
#
# What travels: the working tree (tracked + untracked-not-ignored files, ~11 MB) and .whl/ (carried):
#   bitsandbytes 0.50.2  the machine's image has none; slimmed to its CUDA 13 and CPU libraries (the image's
#                        torch is 2.11.0+cu130), ~3 MB instead of 43 MB (the tree may carry 64 MiB in all)
#   transformers 5.23.0  the pinned version (the image has 5.17.0); its needs (tokenizers 0.23.2,
#                        huggingface_hub 1.33, safetensors, accelerate 1.15, timm, psutil) are in the image
# The check needs no gradio, fastapi or pydantic (it imports the engine and the loaders only).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "prepare" ]]; then
    mkdir -p .git/info .whl
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -f .whl/bitsandbytes-*.whl .whl/transformers-*.whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2 transformers==5.23.0
    python3 - <<'PY'
"""Slim the bitsandbytes wheel: keep its CUDA 13.x and CPU libraries, drop CUDA 11/12, ROCm and XPU ones."""
import glob, os, re, zipfile
src = glob.glob(".whl/bitsandbytes-*.whl")[0]
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so$")
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if drop.search(item.filename):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(keepends=True) if not drop.search(l.split(b",")[0].decode()))
        zout.writestr(item, data)
os.replace(tmp, src)
PY
    ls -la .whl
    exit 0
fi

: "${OUT:=bench-results}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | tee "$OUT/gpu-smi.txt" || true
python3 -c "import torch, bitsandbytes, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'bitsandbytes', bitsandbytes.__version__, 'transformers', transformers.__version__)"
python3 -m tools.bench gpu --out "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/gpu-log.txt"
