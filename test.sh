#!/usr/bin/env bash
# Install into ./.venv and run the whole test suite (unit and end-to-end), as CI does.
set -euo pipefail
cd "$(dirname "$0")"
source ./install.sh pytest
exec .venv/bin/python -m pytest -q "$@"
