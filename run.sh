#!/usr/bin/env bash
# Sets up mm-fusion on a fresh machine (idempotent: a second run reuses .venv) and runs the main job on the
# built-in default. Everything it needs comes from this file: Python 3.10+ with venv is the only prerequisite.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PYTHON" -m venv .venv
fi
echo "==> installing torch 2.14.1 and mm-fusion[dev,demo] into .venv"
# torch first and pinned: pip then takes the release this project is tested on instead of resolving a newer one
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev,demo]"

echo "==> main job"
exec .venv/bin/python -m training.main_job "$@"
