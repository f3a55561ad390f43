#!/usr/bin/env bash
# Create ./.venv (once) and install the requirements into it; extra arguments are more packages
# (./test.sh passes pytest). Run by demo.sh and test.sh; needs the package index, nothing else
# (the NLTK data the labels need ship in vocab/nltk_data).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
# torch and torchvision must be a matching pair: torchvision's compiled ops (nms, roi_align) load
# only beside the torch it was built for.
if ! $PY -c 'from torchvision.ops import nms' 2>/dev/null; then
  if grep -qs 'torchvision<=0.29.1' /etc/xdg/pip/constraints.txt; then
    # The team's machines keep this pair on disk (pip takes it in about 2 minutes); the CPU-only
    # torch 2.13 wheel also there cannot load PyPI's torchvision ("torchvision::nms does not exist").
    $PY -m pip install -q torch==2.14.1 torchvision==0.29.1
  else
    $PY -m pip install -q 'torch>=2.1' 'torchvision>=0.16'  # the registry's pair for this platform
  fi
fi
$PY -m pip install -q -r requirements.txt "$@"
# The CPU's fused scoring kernel (fused.cpp): built here, once per source, compiler and CPU, into
# ~/.cache/casc, instead of in the first evaluation; without a C++ compiler scoring runs the eager code.
$PY -c 'import fused, sys; fused.library() or print("install: no fused CPU kernel (no C++ compiler?): scoring runs the eager code", file=sys.stderr)'
