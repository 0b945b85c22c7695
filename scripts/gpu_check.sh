#!/usr/bin/env bash
# The one prepared check for a session that is lent a GPU (budget: 15 min of device time in all,
# so this runs in under ~6 min). Prints JSON: ResNet-50 / ResNet-18 training images/s at bf16 and
# fp16, channels_last, eager and torch.compile, trainer vs minimal loop and PGT vs CE step ratios,
# peak GPU memory, and the GPU-marked tests. See scripts/gpu_check.py.
#
# 1. Here (with network), once: fetch the wheels the GPU image lacks into the git-ignored .whl/
#    hydra-core, omegaconf, antlr4 and timm (our pinned version), 3.1 MB in all. The image already
#    has torch, torchvision, pytest, hypothesis, scikit-learn and tqdm; wandb is imported only for
#    logger=wandb; DALI is never imported on the torch/synthetic path (and is too large to travel):
#        bash scripts/gpu_check.sh --fetch-wheels
# 2. On the GPU machine (device tool: carry [".whl"], timeout_s ~420):
#        bash scripts/gpu_check.sh --out $OUT/gpu_check.json
# 3. Anywhere, to check the script itself on a CPU in ~1 min:
#        bash scripts/gpu_check.sh --device cpu --tiny --no-tests
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # The GPU image runs CPython 3.12 on x86-64; these are pure-Python wheels.
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .whl hydra-core==1.3.8 omegaconf==2.3.1 timm==1.0.31
    # antlr4 4.9.3 (the version omegaconf 2.3 requires) is published as a source archive only:
    # build its pure-Python wheel here.
    python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    du -sh .whl
    exit 0
fi

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    # No package registry on the GPU machine: install the carried wheels beside the image's.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/powergrad-site .whl/*.whl
    export PYTHONPATH="/tmp/powergrad-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
exec "$PY" scripts/gpu_check.py "$@"
