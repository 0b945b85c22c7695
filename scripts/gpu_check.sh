#!/usr/bin/env bash
# The one command a session with a lent GPU runs (see scripts/gpu_check.py's docstring and
# results/gpu/README.md for the exact device-tool call and what it measures).
#
#   bash scripts/gpu_check.sh --prepare              here, with a package registry: the wheels the
#                                                    GPU image lacks into the git-ignored .whl/
#   bash scripts/gpu_check.sh --out-dir $OUT         on the GPU machine (carry [".whl"]):
#                                                    installs .whl/ offline, runs the check
#   bash scripts/gpu_check.sh --device cpu --tiny --out-dir /tmp/dry    a dry run anywhere
#
# Other arguments go to scripts/gpu_check.py (--only, --cap, --budget-s).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if [[ "${1:-}" != "--prepare" ]] && compgen -G ".whl/*.whl" > /dev/null; then
    # No package registry on the GPU machine: the carried pure-Python wheels go beside the
    # image's packages (and before them on the path: the carried timm is constraints.txt's).
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/powergrad-site .whl/*.whl
    export PYTHONPATH="/tmp/powergrad-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
exec "$PY" scripts/gpu_check.py "$@"
