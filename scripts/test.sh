#!/usr/bin/env bash
# Install the project with its test tools, check style, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install -q -e '.[test]'
"$PYTHON" -m ruff check .
exec "$PYTHON" -m pytest "$@"
