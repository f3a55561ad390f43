#!/usr/bin/env bash
# Install into ./.venv and run the whole test suite (unit and end-to-end), as CI does.
# Arguments go to pytest (e.g. ./test.sh -m "not slow", ./test.sh tests/test_train.py -x); skipped
# tests are listed at the end with their reasons.
set -euo pipefail
cd "$(dirname "$0")"
./install.sh pytest selenium  # selenium: tests/test_browser.py drives the system chromium
exec .venv/bin/python -m pytest -q -rs "$@"  # -rs: the reason of every skip, at the end
