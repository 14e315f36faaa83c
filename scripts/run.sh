#!/usr/bin/env bash
# The main job: set up, then run the whole recipe implemented so far on the embedded default mixture.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${VIRTUAL_ENV:-}" ]; then . .venv/bin/activate; fi
gptlab speedrun "$@"
