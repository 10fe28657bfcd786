#!/usr/bin/env bash
# Install the project and run the whole pipeline on the embedded demo data (no download).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install -q -e .
exec dcgan-pipeline demo "$@"
