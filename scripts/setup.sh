#!/usr/bin/env bash
# Creates the virtual environment and installs veomni_omni without ever replacing the
# installed torch (on a GPU-less machine: the local CPU wheel, no CUDA download).
#   bash scripts/setup.sh [VENV_DIR] [EXTRAS]      e.g. bash scripts/setup.sh .venv test,gpu
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
EXTRAS=${2:-test}
PYTHON=${PYTHON:-python3}

if "$PYTHON" -c "import torch" 2>/dev/null; then
    # A machine that already has torch (e.g. a CUDA build on a GPU box): reuse it.
    "$PYTHON" -m venv --system-site-packages "$VENV"
else
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
    # Exact pin: a bare 'torch' or a range would pull the registry's newest CUDA build.
    "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi

CONSTRAINTS="$VENV/constraints.txt"
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$CONSTRAINTS"

# Our dependencies (and the requested extras) from pyproject.toml, minus veomni itself.
mapfile -t REQS < <("$PY" - "$EXTRAS" <<'PYEOF'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = [r for r in project["dependencies"] if not r.startswith("veomni")]
for extra in filter(None, sys.argv[1].split(",")):
    reqs += project["optional-dependencies"][extra]
print("\n".join(reqs))
PYEOF
)
"$PY" -m pip install -q -c "$CONSTRAINTS" "${REQS[@]}"
"$PY" -m pip install -q --no-deps "veomni==0.1.12"
"$PY" -m pip install -q --no-deps -e .
"$PY" -c "import torch, transformers, veomni_omni; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__)"
