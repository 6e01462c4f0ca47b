#!/usr/bin/env bash
# AdapterHub's `adapters` 1.3 pins transformers ~=4.57 while the rest of the project is tested on the
# current transformers: its tests run in a virtualenv layered over this environment (same torch, peft,
# edgeadapt), which only swaps transformers and adds adapters.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EDGEADAPT_ADAPTERHUB_VENV:-.venv-adapterhub}
[ -x "$VENV/bin/python" ] || python -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q transformers==4.57.6 adapters==1.3.0
"$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider tests/test_adapterhub.py
