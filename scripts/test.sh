#!/usr/bin/env bash
# Set up the machine and run the whole test suite (real servers included).
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --vllm
# Tests that need vLLM fail instead of skipping when this is set.
export TPO_REQUIRE_VLLM=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
