#!/usr/bin/env bash
# Create ./.venv (once) and install the requirements into it; extra arguments are more packages
# (./test.sh passes pytest). Run by demo.sh and test.sh; needs the package index, nothing else
# (the NLTK data the labels need ship in vocab/nltk_data).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
if ! $PY -c 'import torch' 2>/dev/null; then
  if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q torch==2.13.0  # the CPU wheel that lies on disk on the team's machines
  else
    $PY -m pip install -q 'torch>=2.1'   # anywhere else: the registry's build for this platform
  fi
fi
$PY -m pip install -q -r requirements.txt "$@"
