#!/usr/bin/env bash
# AdapterHub's `adapters` 1.3 pins transformers ~=4.57 while the rest of the project is tested on the
# current transformers: its tests run in a virtualenv layered over the environment that runs this script
# (same torch, peft, edgeadapt), which only swaps transformers and adds adapters.
#
# Layering: `python -m venv --system-site-packages` would layer over the base interpreter, not over a user's
# virtualenv. Instead the layer gets a .pth file that adds the outer environment's site directories (its
# sys.path entries named site-packages / dist-packages, with their own .pth files: editable installs) after
# its own, so what the layer installs wins and everything else comes from the outer environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
VENV=${EDGEADAPT_ADAPTERHUB_VENV:-.venv-adapterhub}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
inner=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PYTHON" - "$inner/_edgeadapt_outer_env.pth" <<'EOF'
import os, sys
dirs = [p for p in sys.path if os.path.basename(p.rstrip("/")) in ("site-packages", "dist-packages") and os.path.isdir(p)]
with open(sys.argv[1], "w") as f:  # one line: .pth lines starting with "import" run, addsitedir reads .pth files too
    f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
EOF
"$VENV/bin/python" -m pip install -q transformers==4.57.6 adapters==1.3.0
"$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider tests/test_adapterhub.py
