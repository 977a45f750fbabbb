#!/usr/bin/env bash
# The GPU figures (WRN-28-2, B=64, mu=7, 32x32x3): precision and compile, scaling over every
# visible GPU, packed trials. Extra arguments go to bench/gpu.py (e.g. --parts precision).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python bench/gpu.py --device cuda "$@"
