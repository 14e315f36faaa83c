#!/usr/bin/env bash
# Set up, then run the test suite (CPU only; < 15 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${VIRTUAL_ENV:-}" ]; then . .venv/bin/activate; fi
python -m pytest -q "$@"
