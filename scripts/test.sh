#!/usr/bin/env bash
# Set up, then run the test suite (CPU only; < 15 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The web page test drives a system Chromium through Playwright (Playwright's own browser download is not
# used). Debian/Ubuntu: installed here when missing; elsewhere install chromium yourself.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
if [ -z "${VIRTUAL_ENV:-}" ]; then . .venv/bin/activate; fi
python -m pytest -q "$@"
