#!/usr/bin/env bash
# GPU-ready checks in one command (see benchmarks/gpu_check.py); pass --cpu for the CPU smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
exec "$PY" benchmarks/gpu_check.py "$@"
